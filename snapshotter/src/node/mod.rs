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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use crate::fetcher::FetchTotals;
use crate::mount::MountedLayer;
use crate::remote::{self, ImageNamed, LayerRequest, RemoteError, RemoteLayerSource, RemoteLayers};
use crate::snapshot::{Ancestor, Info, Mount, SnapshotError, SnapshotStore};

mod remote_prepare;

use remote_prepare::InFlightTargets;

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
    /// Whether remote snapshots failed to mount at start and have not all been mounted since:
    /// [`Node::remount_missing`] has work only then.
    remount_pending: std::sync::atomic::AtomicBool,
}

impl Node {
    /// The node over `store` and `remote`.
    pub fn new(store: SnapshotStore, remote: RemoteLayers) -> Self {
        Node {
            store,
            remote,
            mounted: Mutex::new(HashMap::new()),
            unrecorded_remote: RwLock::new(()),
            remount_pending: std::sync::atomic::AtomicBool::new(false),
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
        self.remount_pending
            .store(failed > 0, std::sync::atomic::Ordering::Relaxed);
        Ok(failed)
    }

    /// Tries again to mount the remote snapshots that are not mounted (a restart could not
    /// open them: a keyprovider down, a key not delivered yet): how many it mounted now, and
    /// how many still are not. Each one mounted now is logged; failures were logged when they
    /// first happened.
    pub fn remount_missing(&self) -> Result<(usize, usize), SnapshotError> {
        use std::sync::atomic::Ordering;
        let (mut mounted, mut missing) = (0, 0);
        if !self.remount_pending.load(Ordering::Relaxed) {
            return Ok((mounted, missing));
        }
        for snapshot in self.store.remote_snapshots()? {
            if self
                .mounted
                .lock()
                .expect("mounted lock")
                .contains_key(&snapshot.id)
            {
                continue;
            }
            match self.ensure_mounted(&snapshot) {
                Ok(()) => {
                    mounted += 1;
                    tracing::info!(snapshot = %snapshot.name, "remote layer mounted again after failing at start");
                }
                Err(error) => {
                    missing += 1;
                    tracing::debug!(snapshot = %snapshot.name, error = %crate::error_chain(&error), "remote layer still cannot be mounted");
                }
            }
        }
        self.remount_pending.store(missing > 0, Ordering::Relaxed);
        Ok((mounted, missing))
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
        let (layer, _) = self
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
            match self.prepare_remote(&target, parent, &labels, &request, namespace_of(key)) {
                Ok(true) => return Err(NodeError::RemoteLayerReady { target }),
                Ok(false) => {} // not sealed after all: containerd unpacks it
                Err(error) => {
                    tracing::warn!(key, layer = %request.layer, error = %crate::error_chain(&error), "remote layer refused");
                    return Err(NodeError::Remote(error));
                }
            }
        }
        if let Some(named) = ImageNamed::from_labels(&labels) {
            self.remote.check_unsealed(&named).inspect_err(|error| {
                tracing::warn!(key, image = %named.image, error = %crate::error_chain(error), "layer refused");
            })?;
        }
        self.ensure_chain_mounted(parent)?;
        Ok(self.store.prepare(key, parent, sorted(labels))?)
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
                self.remote.session().forget_key(removed.id);
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

/// The containerd namespace of a snapshot key: containerd's metadata store names the keys it
/// sends a snapshotter `NAMESPACE/ID/KEY`; a key without that shape (a direct gRPC client)
/// has none.
fn namespace_of(key: &str) -> &str {
    match key.split('/').collect::<Vec<_>>().as_slice() {
        [namespace, id, _, ..] if !namespace.is_empty() && id.parse::<u64>().is_ok() => namespace,
        _ => "",
    }
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A node over a real store in a temporary root, with remote layers that are never asked
    /// for (no labels ask for a sealed layer), so nothing is mounted.
    fn node() -> (tempfile::TempDir, Node, tokio::runtime::Runtime) {
        let temp = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut config = crate::config::Config {
            root: temp.path().to_path_buf(),
            ..crate::config::Config::default()
        }
        .remote();
        config.keeping = None;
        let remote = RemoteLayers::new(
            config,
            runtime.handle().clone(),
            Arc::new(crate::cache::MemoryCache::new(1 << 20)),
        );
        let store = SnapshotStore::open(temp.path()).unwrap();
        (temp, Node::new(store, remote), runtime)
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// containerd's snapshot verbs in the node's domain terms, without a kernel: the chain of
    /// calls an unpack makes, the errors containerd maps back to errdefs, Walk's filters.
    #[test]
    fn plain_snapshots_go_through_prepare_commit_view_walk_and_remove() {
        let (_temp, node, _runtime) = node();
        // An unpack: Prepare an extract key, Commit it under the chain id; no labels ask for a
        // sealed layer, so these are ordinary overlayfs snapshots.
        node.prepare("ns/1/extract-a", None, HashMap::new())
            .unwrap();
        node.commit(
            "ns/1/sha256:aaa",
            "ns/1/extract-a",
            labels(&[("containerd.io/gc.root", "x")]),
        )
        .unwrap();
        let mounts = node
            .prepare("ns/2/container", Some("ns/1/sha256:aaa"), HashMap::new())
            .unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].kind, "overlay", "{mounts:?}");
        assert_eq!(node.mounts("ns/2/container").unwrap(), mounts);
        let view = node
            .view("ns/3/view", Some("ns/1/sha256:aaa"), HashMap::new())
            .unwrap();
        // A view of one committed layer is that layer's directory, bound read-only.
        assert_eq!(view[0].kind, "bind");
        assert!(view[0].source.ends_with("snapshots/1/fs"), "{view:?}");
        assert!(view[0].options.iter().any(|o| o == "ro"), "{view:?}");

        // Errors keep their class: containerd maps them to errdefs.
        assert!(matches!(
            node.prepare("ns/2/container", None, HashMap::new()),
            Err(NodeError::Snapshot(SnapshotError::AlreadyExists(_)))
        ));
        assert!(matches!(
            node.stat("ns/9/missing"),
            Err(NodeError::Snapshot(SnapshotError::NotFound(_)))
        ));
        assert!(matches!(
            node.remove("ns/1/sha256:aaa"),
            Err(NodeError::Snapshot(
                SnapshotError::FailedPrecondition { .. }
            ))
        ));
        assert!(matches!(
            node.list(&["labels.\"unterminated".to_string()]),
            Err(NodeError::InvalidArgument(_))
        ));

        // Walk with containerd's filter syntax.
        let committed = node.list(&["kind==committed".to_string()]).unwrap();
        assert_eq!(
            committed
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["ns/1/sha256:aaa"]
        );
        let rooted = node
            .list(&["labels.\"containerd.io/gc.root\"".to_string()])
            .unwrap();
        assert_eq!(rooted.len(), 1);

        // Children first, then the parent; Cleanup finds nothing left behind.
        node.remove("ns/2/container").unwrap();
        node.remove("ns/3/view").unwrap();
        node.remove("ns/1/sha256:aaa").unwrap();
        assert!(node.list(&[]).unwrap().is_empty());
        node.cleanup().unwrap();
        assert_eq!(
            node.restore().unwrap(),
            0,
            "no remote snapshot to mount again"
        );
    }
}
