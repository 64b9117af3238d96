//! The remote side of containerd's Prepare: a layer whose labels ask for a sealed layer is
//! resolved in its image's manifest, its snapshot identity (chain id) checked against what the
//! sealed content authenticates, mounted, and recorded as a committed snapshot under the
//! target name. Prepares of one target wait for each other ([`InFlightTargets`]); those of
//! different targets run in parallel.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::remote::{self, LayerRequest, RemoteError, RemoteLayerSource};
use crate::snapshot::SnapshotError;

use super::Node;

impl Node {
    /// Mounts the requested sealed layer for containerd namespace `namespace` and records it
    /// as `target`. `Ok(false)`: the layer is not sealed.
    pub(super) fn prepare_remote(
        &self,
        target: &str,
        parent: Option<&str>,
        labels: &HashMap<String, String>,
        request: &LayerRequest,
        namespace: &str,
    ) -> Result<bool, RemoteError> {
        let _preparing =
            self.preparing
                .claim(target, PREPARE_WAIT)
                .ok_or_else(|| RemoteError::Busy {
                    target: target.to_string(),
                    waited: PREPARE_WAIT,
                })?;
        if self.store.stat(target).is_ok() {
            // Mounted already, perhaps for another namespace: containerd links it into the
            // asking namespace on `AlreadyExists`, so the key access rules are checked here.
            self.check_shared_access(target, parent, request, namespace)
                .inspect_err(|_| self.count_failure())?;
            return Ok(true);
        }
        let started = std::time::Instant::now();
        let Some(mut source) = self
            .remote
            .resolve(request, namespace)
            .inspect_err(|_| self.count_failure())?
        else {
            return Ok(false);
        };
        source.namespace = namespace.to_string();
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
            Ok((mounted, opened_by)) => {
                source.opened_by = opened_by;
                mounted
            }
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

    /// Lets `namespace` have the mounted remote snapshot `target` only if the key that opened
    /// it may be used for the image the Prepare names, and that image really has the layer
    /// (its manifest is resolved and the chain id checked, as for a fresh mount): naming an
    /// allowed image cannot borrow a layer of another.
    fn check_shared_access(
        &self,
        target: &str,
        parent: Option<&str>,
        request: &LayerRequest,
        namespace: &str,
    ) -> Result<(), RemoteError> {
        let Some(recorded) = self.remote_source_of(target) else {
            return Ok(());
        };
        let key = recorded.opened_by.as_str();
        if key.is_empty() || !self.remote.key_access().restricts(key) {
            return Ok(());
        }
        let Some(source) = self.remote.resolve_mounted(request, namespace)? else {
            return Ok(());
        };
        self.check_chain_id(target, parent, request, &source)?;
        self.remote.check_key_access(key, namespace, &source)
    }

    /// What remote snapshot `name` was mounted from; `None` if it is not a remote snapshot.
    fn remote_source_of(&self, name: &str) -> Option<RemoteLayerSource> {
        let snapshot = self.store.ancestors(Some(name)).ok()?.into_iter().next()?;
        Self::parse_source(snapshot.remote.as_ref()?).ok()
    }

    /// The chain id of committed snapshot `name`: containerd names the layer snapshots it
    /// commits `NAMESPACE/ID/CHAINID` and remote ones are named by their target chain id, so
    /// it is the name's last segment; otherwise the target label its Prepare carried.
    pub(super) fn chain_id_of(&self, name: &str) -> Option<String> {
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
}

/// How long a Prepare waits for another Prepare of the same layer before giving up. A
/// Prepare's own registry requests are bounded by their timeouts and retries; this bounds the
/// wait behind one that is slow.
const PREPARE_WAIT: Duration = Duration::from_secs(120);

/// The targets whose Prepare is running, with a wake-up for those waiting on one.
#[derive(Default)]
pub(super) struct InFlightTargets {
    targets: Mutex<HashSet<String>>,
    finished: Condvar,
}

/// A claim on one target; dropping it (however the Prepare ends) wakes the waiters.
pub(super) struct TargetClaim<'a> {
    owner: &'a InFlightTargets,
    target: String,
}

impl InFlightTargets {
    /// Claims `target`, waiting up to `wait` for a Prepare of it that is running; `None` if
    /// that one is still running then.
    pub(super) fn claim(&self, target: &str, wait: Duration) -> Option<TargetClaim<'_>> {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::remote::RemoteLayers;
    use crate::snapshot::SnapshotStore;

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
