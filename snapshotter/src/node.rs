//! containerd's snapshots service: the [`SnapshotStore`] for every snapshot, and remote sealed
//! layers ([`RemoteLayers`]) mounted with FUSE as the content of committed snapshots.
//!
//! A layer `Prepare` whose labels ask for a sealed layer mounts it, records a committed
//! snapshot under the target name (the chain id) and answers `AlreadyExists`, which tells
//! containerd not to download the layer. Everything else is an ordinary overlayfs snapshot,
//! so unsealed images run unchanged. Active snapshots on remote layers are overlays whose
//! lower directories are the FUSE mount points.
//!
//! Its methods block (the store, the mounts) and return [`NodeError`]; the gRPC edge
//! ([`crate::grpc`]) runs them on tokio's blocking pool and maps the errors to statuses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::fetcher::FetchTotals;
use crate::mount::MountedLayer;
use crate::remote::{self, LayerRequest, RemoteError, RemoteLayerSource, RemoteLayers};
use crate::snapshot::{Ancestor, Info, Mount, SnapshotError, SnapshotStore};

/// Why a snapshots call failed, in the node's terms (the gRPC edge maps each to a status).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The snapshot store refused or failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A remote sealed layer could not be mounted or checked.
    #[error("sealfs: {}", crate::error_chain(.0))]
    Remote(#[from] RemoteError),
    /// A sealed layer's Prepare succeeded: its snapshot is committed under `target`, which
    /// containerd learns as `AlreadyExists` (it then downloads nothing).
    #[error("target snapshot {target}: already exists (remote sealed layer)")]
    RemoteLayerReady {
        /// The committed snapshot.
        target: String,
    },
    /// The request asks for something no snapshot can do.
    #[error("{0}")]
    InvalidArgument(String),
}

/// Counters the service keeps besides the layers' own (see [`crate::metrics`]).
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Remote layer mounts that failed (missing key, registry, damaged index).
    pub remote_failures: std::sync::atomic::AtomicU64,
}

/// The node's snapshots: the store, the remote layers and their live FUSE mounts.
pub struct Node {
    store: SnapshotStore,
    remote: RemoteLayers,
    /// Live FUSE mounts of remote snapshots, by directory id.
    mounted: Mutex<HashMap<u64, MountedLayer>>,
    /// Held shared while a remote layer is mounted and recorded, and exclusively by cleanup,
    /// so cleanup never takes a directory that is being filled for an orphan. Prepares of
    /// different layers run side by side.
    unrecorded_remote: RwLock<()>,
    /// Targets being prepared: a second Prepare of the same layer waits for the first, with
    /// a deadline, instead of mounting it twice.
    preparing: InFlightTargets,
    /// Counters.
    pub stats: ServiceStats,
    /// Fetch counters of layers removed since the start, so totals never go down.
    retired: Mutex<FetchTotals>,
}

impl Node {
    /// The node over `store` and `remote`.
    pub fn new(store: SnapshotStore, remote: RemoteLayers) -> Self {
        Node {
            store,
            remote,
            mounted: Mutex::new(HashMap::new()),
            unrecorded_remote: RwLock::new(()),
            preparing: InFlightTargets::default(),
            stats: ServiceStats::default(),
            retired: Mutex::new(FetchTotals::default()),
        }
    }

    /// The remote layers (memory cache, settings).
    pub fn remote(&self) -> &RemoteLayers {
        &self.remote
    }

    /// Fetch counters of the layers removed so far.
    pub fn retired_totals(&self) -> FetchTotals {
        self.retired.lock().expect("retired lock").clone()
    }

    /// Runs `f` on each live FUSE mount.
    pub fn for_each_mounted(&self, mut f: impl FnMut(u64, &MountedLayer)) {
        for (id, layer) in self.mounted.lock().expect("mounted lock").iter() {
            f(*id, layer);
        }
    }

    /// Mounts every remote snapshot again (after a restart). A layer that cannot be mounted
    /// now (registry down, key gone) is logged and tried again when a snapshot on it is used;
    /// how many could not.
    pub fn restore(&self) -> Result<usize, SnapshotError> {
        let mut failed = 0;
        for snapshot in self.store.remote_snapshots()? {
            if let Err(error) = self.ensure_mounted(&snapshot) {
                failed += 1;
                tracing::warn!(snapshot = %snapshot.name, error = %crate::error_chain(&error), "remote layer not mounted; will retry on use");
            }
        }
        Ok(failed)
    }

    fn parse_source(text: &str) -> Result<RemoteLayerSource, RemoteError> {
        serde_json::from_str(text).map_err(|e| RemoteError::Record(e.to_string()))
    }

    /// Mounts a remote snapshot's layer unless it is mounted already.
    fn ensure_mounted(&self, snapshot: &Ancestor) -> Result<(), RemoteError> {
        let Some(text) = &snapshot.remote else {
            return Ok(());
        };
        let mut mounted = self.mounted.lock().expect("mounted lock");
        if mounted.contains_key(&snapshot.id) {
            return Ok(());
        }
        let source = Self::parse_source(text)?;
        let mountpoint = self.store.content_dir(snapshot.id);
        let layer = self
            .remote
            .mount(
                &source,
                &mountpoint,
                snapshot.id,
                &self.cache_dir(snapshot.id),
            )
            .inspect_err(|_| self.count_failure())?;
        tracing::info!(snapshot = %snapshot.name, layer = %source.digest(), "remote layer mounted");
        mounted.insert(snapshot.id, layer);
        Ok(())
    }

    fn count_failure(&self) {
        self.stats
            .remote_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn cache_dir(&self, id: u64) -> std::path::PathBuf {
        // Inside the snapshot's own directory: removing the snapshot frees its cache.
        self.store.content_dir(id).with_file_name("cache")
    }

    /// Makes sure every remote layer below `parent` is mounted.
    fn ensure_chain_mounted(&self, parent: Option<&str>) -> Result<(), NodeError> {
        for ancestor in self.store.ancestors(parent)? {
            self.ensure_mounted(&ancestor)?;
        }
        Ok(())
    }

    /// containerd's Prepare: a sealed layer becomes a remote snapshot (answered with
    /// `AlreadyExists`), anything else an active snapshot.
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, NodeError> {
        tracing::debug!(key, ?parent, ?labels, "prepare");
        if let Some(request) = LayerRequest::from_labels(&labels) {
            let target = labels[remote::TARGET_LABEL].clone();
            match self.prepare_remote(&target, parent, &labels, &request) {
                Ok(true) => return Err(NodeError::RemoteLayerReady { target }),
                Ok(false) => {} // not sealed after all: containerd unpacks it
                Err(error) => {
                    tracing::warn!(key, layer = %request.layer, error = %crate::error_chain(&error), "remote layer refused");
                    return Err(NodeError::Remote(error));
                }
            }
        }
        self.ensure_chain_mounted(parent)?;
        Ok(self.store.prepare(key, parent, sorted(labels))?)
    }

    /// Mounts the requested sealed layer and records it as `target`. `Ok(false)`: the layer
    /// is not sealed.
    fn prepare_remote(
        &self,
        target: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
        request: &LayerRequest,
    ) -> Result<bool, RemoteError> {
        let _preparing =
            self.preparing
                .claim(target, PREPARE_WAIT)
                .ok_or_else(|| RemoteError::Busy {
                    target: target.to_string(),
                    waited: PREPARE_WAIT,
                })?;
        if self.store.stat(target).is_ok() {
            return Ok(true);
        }
        let started = std::time::Instant::now();
        let Some(source) = self
            .remote
            .resolve(request)
            .inspect_err(|_| self.count_failure())?
        else {
            return Ok(false);
        };
        // Before any key is unwrapped or anything mounted: the snapshot identity containerd
        // asks for must be the one the sealed content has.
        self.check_chain_id(target, parent, request, &source)
            .inspect_err(|_| self.count_failure())?;
        let guard = self.unrecorded_remote.read().expect("unrecorded lock");
        let record_error = |e: SnapshotError| RemoteError::Record(e.to_string());
        let id = self.store.reserve_dir().map_err(record_error)?;
        let mountpoint = self.store.content_dir(id);
        let mounted = match self
            .remote
            .mount(&source, &mountpoint, id, &self.cache_dir(id))
        {
            Ok(mounted) => mounted,
            Err(error) => {
                self.count_failure();
                let _ = std::fs::remove_dir_all(mountpoint.parent().expect("snapshot dir"));
                return Err(error);
            }
        };
        let text =
            serde_json::to_string(&source).map_err(|e| RemoteError::Record(e.to_string()))?;
        let recorded = self.store.commit_remote(
            target,
            parent,
            remote::snapshot_labels(labels, &source.digest()),
            id,
            text,
        );
        match recorded {
            Ok(()) => {
                tracing::info!(target, layer = %source.digest(), elapsed = ?started.elapsed(), "remote layer mounted");
                let fs = mounted.fs.clone();
                self.mounted
                    .lock()
                    .expect("mounted lock")
                    .insert(id, mounted);
                drop(guard);
                // The lock guards mounting and recording only; waiting for the profile must not
                // hold up other layers.
                // Like stargz's prefetch wait: the container starts with its profile present.
                let wait = self.remote.profile_wait();
                if !wait.is_zero() && !fs.fetcher().wait_for_profile(wait) {
                    tracing::info!(
                        target,
                        ?wait,
                        "startup profile still fetching; Prepare returns"
                    );
                }
                Ok(true)
            }
            // Another pull of the same layer got there first: theirs stands.
            Err(SnapshotError::AlreadyExists(_)) => {
                drop(mounted);
                let _ = std::fs::remove_dir_all(mountpoint.parent().expect("snapshot dir"));
                Ok(true)
            }
            Err(error) => {
                drop(mounted);
                let _ = std::fs::remove_dir_all(mountpoint.parent().expect("snapshot dir"));
                Err(record_error(error))
            }
        }
    }

    /// Refuses a sealed layer whose target chain id is not `chainID(parent's chain id, the
    /// layer's sealed diff id)`. containerd computes targets from the image config's diff ids
    /// and checks diff ids only when it unpacks a layer itself, never for a remote one; the
    /// sealed diff id is derived from the tail digest the manifest pins, so a config cannot
    /// claim another image's diff ids (and so its snapshots) for content of its own.
    fn check_chain_id(
        &self,
        target: &str,
        parent: Option<&str>,
        request: &LayerRequest,
        source: &RemoteLayerSource,
    ) -> Result<(), RemoteError> {
        let parent_chain = match parent {
            None => None,
            Some(parent) => {
                Some(
                    self.chain_id_of(parent)
                        .ok_or_else(|| RemoteError::UnknownParent {
                            image: request.image.clone(),
                            layer: request.layer.clone(),
                            parent: parent.to_string(),
                        })?,
                )
            }
        };
        let diff_id = source.sealed_diff_id();
        let expected = crate::oci_layout::chain_id(parent_chain.as_deref(), &diff_id);
        if expected != target {
            return Err(RemoteError::ChainIdMismatch {
                image: request.image.clone(),
                layer: request.layer.clone(),
                target: target.to_string(),
                expected,
                diff_id,
            });
        }
        Ok(())
    }

    /// The chain id of committed snapshot `name`: containerd names the layer snapshots it
    /// commits `NAMESPACE/ID/CHAINID` and remote ones are named by their target chain id, so
    /// it is the name's last segment; otherwise the target label its Prepare carried.
    fn chain_id_of(&self, name: &str) -> Option<String> {
        let last = name.rsplit('/').next().unwrap_or(name);
        if is_sha256_digest(last) {
            return Some(last.to_string());
        }
        let info = self.store.stat(name).ok()?;
        info.labels
            .get(remote::TARGET_LABEL)
            .filter(|label| is_sha256_digest(label))
            .cloned()
    }

    /// containerd's View.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, NodeError> {
        self.ensure_chain_mounted(parent)?;
        Ok(self.store.view(key, parent, sorted(labels))?)
    }

    /// containerd's Mounts.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, NodeError> {
        let info = self.store.stat(key)?;
        self.ensure_chain_mounted(info.parent.as_deref())?;
        Ok(self.store.mounts(key)?)
    }

    /// containerd's Commit.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), NodeError> {
        Ok(self.store.commit(name, key, sorted(labels))?)
    }

    /// containerd's Remove: a remote snapshot's FUSE mount ends and its cache is deleted.
    pub fn remove(&self, key: &str) -> Result<(), NodeError> {
        Ok(self.store.remove_releasing(key, |removed| {
            if removed.remote.is_some() {
                let layer = self
                    .mounted
                    .lock()
                    .expect("mounted lock")
                    .remove(&removed.id);
                if let Some(layer) = layer {
                    self.retired
                        .lock()
                        .expect("retired lock")
                        .add(layer.fs.fetcher().stats());
                    drop(layer); // unmounts
                }
                self.remote.memory().forget_layer(removed.id);
                tracing::info!(snapshot = %removed.name, "remote layer unmounted");
            }
        })?)
    }

    /// containerd's Stat.
    pub fn stat(&self, key: &str) -> Result<Info, NodeError> {
        Ok(self.store.stat(key)?)
    }

    /// containerd's Update: `paths` empty replaces all labels; `labels` replaces them too;
    /// `labels.KEY` sets or (absent from `info`) deletes one.
    pub fn update(
        &self,
        name: &str,
        new_labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<Info, NodeError> {
        let current = self.store.stat(name)?;
        let mut labels = current.labels;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            labels = sorted(new_labels);
        } else {
            for path in paths {
                let Some(label) = path.strip_prefix("labels.") else {
                    return Err(NodeError::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {name}: only labels are mutable"
                    )));
                };
                match new_labels.get(label) {
                    Some(value) => labels.insert(label.to_string(), value.clone()),
                    None => labels.remove(label),
                };
            }
        }
        Ok(self.store.update_labels(name, labels)?)
    }

    /// containerd's Usage.
    pub fn usage(&self, key: &str) -> Result<crate::snapshot::Usage, NodeError> {
        let info = self.store.stat(key)?;
        if info.labels.contains_key(remote::REMOTE_LABEL) {
            // A remote layer takes no space but its cache, which containerd does not count.
            return Ok(crate::snapshot::Usage::default());
        }
        Ok(self.store.usage(key)?)
    }

    /// containerd's Walk: the snapshots that pass `filters` (containerd's syntax; none: all).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, NodeError> {
        let filters = crate::filters::Filters::parse(filters)
            .map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
        let mut infos = self.store.walk()?;
        infos.retain(|info| filters.matches(info));
        Ok(infos)
    }

    /// containerd's Cleanup: directories no snapshot owns (after a crash), their mounts first.
    pub fn cleanup(&self) -> Result<(), NodeError> {
        let _guard = self.unrecorded_remote.write().expect("unrecorded lock");
        let removed = self.store.cleanup()?;
        if !removed.is_empty() {
            tracing::info!(?removed, "removed orphaned snapshot directories");
        }
        Ok(())
    }

    /// Unmounts every remote layer (on shutdown).
    pub fn unmount_all(&self) {
        self.mounted.lock().expect("mounted lock").clear();
        self.remote.session().end();
    }

    /// Ends this daemon's part in the layers, leaving them mounted and their session with the
    /// keeper, so the next daemon resumes serving them and running containers read on.
    pub fn leave_mounted(&self) {
        self.remote.session().keep_for_restart();
        for (_, mut layer) in self.mounted.lock().expect("mounted lock").drain() {
            layer.keep_for_restart();
        }
    }
}

/// How long a Prepare waits for another Prepare of the same layer before giving up. A
/// Prepare's own registry requests are bounded by their timeouts and retries; this bounds the
/// wait behind one that is slow.
const PREPARE_WAIT: Duration = Duration::from_secs(120);

/// The targets whose Prepare is running, with a wake-up for those waiting on one.
#[derive(Default)]
struct InFlightTargets {
    targets: Mutex<HashSet<String>>,
    finished: Condvar,
}

/// A claim on one target; dropping it (however the Prepare ends) wakes the waiters.
struct TargetClaim<'a> {
    owner: &'a InFlightTargets,
    target: String,
}

impl InFlightTargets {
    /// Claims `target`, waiting up to `wait` for a Prepare of it that is running; `None` if
    /// that one is still running then.
    fn claim(&self, target: &str, wait: Duration) -> Option<TargetClaim<'_>> {
        let targets = self.targets.lock().expect("targets lock");
        let (mut targets, timeout) = self
            .finished
            .wait_timeout_while(targets, wait, |t| t.contains(target))
            .expect("targets lock");
        if timeout.timed_out() && targets.contains(target) {
            return None;
        }
        targets.insert(target.to_string());
        Some(TargetClaim {
            owner: self,
            target: target.to_string(),
        })
    }
}

impl Drop for TargetClaim<'_> {
    fn drop(&mut self) {
        let mut targets = self.owner.targets.lock().expect("targets lock");
        targets.remove(&self.target);
        drop(targets);
        self.owner.finished.notify_all();
    }
}

fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn prepares_of_one_layer_wait_for_each_other_and_other_layers_do_not() {
        let targets = Arc::new(InFlightTargets::default());
        let first = targets.claim("sha256:a", Duration::ZERO).unwrap();
        // Another layer is not held up by the first one's Prepare.
        let other = targets.claim("sha256:b", Duration::ZERO).unwrap();
        // The same layer is: a claim with a deadline gives up (and says so with None)...
        assert!(targets
            .claim("sha256:a", Duration::from_millis(20))
            .is_none());
        // ...and one that waits gets it as soon as the first claim ends, however it ends.
        let (claimed, got) = std::sync::mpsc::channel();
        let waiter = {
            let targets = targets.clone();
            std::thread::spawn(move || {
                let claim = targets.claim("sha256:a", Duration::from_secs(600));
                claimed.send(claim.is_some()).unwrap();
            })
        };
        drop(first);
        assert!(got.recv().unwrap());
        waiter.join().unwrap();
        drop(other);
        assert!(
            targets.targets.lock().unwrap().is_empty(),
            "claims released"
        );
    }

    #[test]
    fn chain_ids_come_from_containerd_names_or_the_target_label() {
        let chain = format!("sha256:{}", "c".repeat(64));
        assert!(is_sha256_digest(&chain));
        assert!(!is_sha256_digest("sha256:abc"));
        assert!(!is_sha256_digest(&format!("sha512:{}", "c".repeat(64))));
        let temp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(temp.path()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let remote = RemoteLayers::new(
            crate::config::Config::default().remote(),
            runtime.handle().clone(),
            Arc::new(crate::cache::MemoryCache::new(1 << 20)),
        );
        let node = Node::new(store, remote);
        // containerd's own commits: NAMESPACE/ID/CHAINID.
        assert_eq!(
            node.chain_id_of(&format!("k8s.io/12/{chain}")),
            Some(chain.clone())
        );
        // A remote snapshot is named by its chain id.
        assert_eq!(node.chain_id_of(&chain), Some(chain.clone()));
        // Otherwise the target label it was committed with (containerd's unpacker commits with
        // the labels it prepared with); no label, no chain id.
        let labelled: BTreeMap<_, _> = [(remote::TARGET_LABEL.to_string(), chain.clone())].into();
        node.store
            .prepare("extract-1", None, labelled.clone())
            .unwrap();
        node.store
            .commit("ns/1/layer", "extract-1", labelled)
            .unwrap();
        assert_eq!(node.chain_id_of("ns/1/layer"), Some(chain));
        node.store
            .prepare("extract-2", None, BTreeMap::new())
            .unwrap();
        node.store
            .commit("ns/2/other", "extract-2", BTreeMap::new())
            .unwrap();
        assert_eq!(node.chain_id_of("ns/2/other"), None);
        assert_eq!(node.chain_id_of("missing"), None);
    }
}
