//! Remote layers: from the labels containerd sends with a layer's `Prepare` to a sealed layer
//! mounted with FUSE. Finds the layer in its image's manifest (the registry's copy, not the
//! client's labels, is trusted), unwraps its key with the node's keys, verifies its index
//! against the digest the manifest pins and mounts it. What a remote snapshot needs to be
//! mounted again after a restart is kept as a [`RemoteLayerSource`]: the reference pinned to
//! the manifest digest and the layer's descriptor, so a remount costs one range read.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fsformat::oci::{SealedLayerAnnotations, MEDIA_TYPE_SEALED_LAYER};
use fsformat::reader::UnverifiedTail;
use oci_client::Reference;
use oci_spec::image::Descriptor;
use tokio::runtime::Handle;

use crate::cache::MemoryCache;
use crate::credentials;
use crate::fetcher::FetchPool;
use crate::fs::table::Slot;
use crate::fuse::session::FuseSession;
use crate::keys::{self, KeyError};
use crate::mount::{self, MountError, MountOptions, MountedLayer};
use crate::registry::{Registry, RegistryError, RegistryOptions, RemoteManifest};
use crate::session_keeper::{Keeper, NODE_SESSION};
use crate::tails_ahead::{TailJob, TailKey, TailsAhead};

/// The label naming the committed snapshot a layer's `Prepare` is for (its chain id).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The label a remote snapshot carries: the digest of the sealed layer mounted there.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/sealfs.remote-layer";
/// A sealed layer's descriptor annotation, copied into the `Prepare` labels by containerd's
/// unpacker (it copies every `containerd.io/snapshot/` annotation): its presence says the
/// layer is sealed without asking the registry.
pub const SEALED_MARKER_LABEL: &str = fsformat::oci::ANNOTATION_INDEX_DIGEST;

/// Image reference, layer digest and manifest digest, as CRI spells them.
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// ... and as stargz-snapshotter's `ctr-remote image rpull` spells them.
const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// What a layer's `Prepare` labels say about a sealed layer to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRequest {
    /// The image reference (`HOST/REPO[:TAG][@DIGEST]`).
    pub image: String,
    /// The layer's blob digest.
    pub layer: String,
    /// The manifest digest, when the client sent it (CRI does).
    pub manifest: Option<String>,
    /// The index digest from the layer annotations of the manifest containerd pulled and
    /// verified: the manifest this node fetches must agree (a tag may have moved, or a
    /// registry may lie).
    pub index_digest: String,
}

impl LayerRequest {
    /// Reads the request from `Prepare` labels; `None` when they do not ask for a sealed
    /// layer (no target, no image or layer, or not sealed): containerd then unpacks the layer
    /// itself, as with any snapshotter.
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        let get = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
        get(TARGET_LABEL)?;
        let index_digest = get(SEALED_MARKER_LABEL)?;
        let image = get(CRI_IMAGE_REF).or_else(|| get(STARGZ_REFERENCE))?;
        let layer = get(CRI_LAYER_DIGEST).or_else(|| get(STARGZ_DIGEST))?;
        Some(LayerRequest {
            image,
            layer,
            manifest: get(CRI_MANIFEST_DIGEST),
            index_digest,
        })
    }
}

/// Where a remote snapshot's content comes from: enough to mount it again.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayerSource {
    /// The image, pinned to its manifest digest.
    pub reference: String,
    /// The layer's descriptor from that manifest (media type, size, sealed annotations).
    pub descriptor: Descriptor,
}

impl RemoteLayerSource {
    /// The layer digest.
    pub fn digest(&self) -> String {
        self.descriptor.digest().to_string()
    }

    /// The layer's diff id in its sealed image's config: derived from the tail digest the
    /// manifest pins (and the mount verifies), see [`fsformat::oci::sealed_diff_id`].
    pub fn sealed_diff_id(&self) -> String {
        let index_digest = self
            .descriptor
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SEALED_MARKER_LABEL))
            .map(String::as_str)
            .unwrap_or_default();
        fsformat::oci::sealed_diff_id(index_digest)
    }
}

/// Why a remote layer could not be mounted. Messages name the layer and image; never a key.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The image reference does not parse, or the registry failed.
    #[error("layer {layer} of {image}")]
    Registry {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// What failed.
        #[source]
        source: Box<RegistryError>,
    },
    /// The registry's manifest describes the layer differently from the one containerd pulled.
    #[error("layer {layer}: the manifest of {image} in the registry pins index {found}, but the one containerd pulled pins {expected}; was the tag moved during the pull?")]
    ManifestMismatch {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The index digest in containerd's labels.
        expected: String,
        /// The index digest in the registry's manifest.
        found: String,
    },
    /// The image was sealed in an older image format, whose diff ids nothing can check.
    #[error("layer {layer} of {image}: the image was sealed in sealfs image format {found}, which this node no longer accepts (its config lists the plain layers' diff ids, which nothing on the node can check); seal the original image again with the current sealctl (format {current})", current = fsformat::oci::SEALED_IMAGE_VERSION)]
    LegacyFormat {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The format version the manifest names.
        found: String,
    },
    /// The snapshot containerd asked for (a chain id from the image config) is not the one the
    /// sealed content authenticates: the config claims diff ids its layers do not have.
    #[error("layer {layer} of {image}: containerd asked for snapshot {target}, but the sealed layer on that parent is snapshot {expected} (chain id of its sealed diff id {diff_id}); the image config claims diff ids its sealed layers do not have, so the layer is refused")]
    ChainIdMismatch {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The chain id containerd computed (the Prepare's target).
        target: String,
        /// The chain id of the sealed content on the given parent.
        expected: String,
        /// The sealed layer's diff id.
        diff_id: String,
    },
    /// The parent snapshot's chain id is unknown, so the layer's cannot be checked.
    #[error("layer {layer} of {image}: the parent snapshot {parent} has no chain id (no {TARGET_LABEL} label and not named by one), so the sealed layer's identity cannot be checked")]
    UnknownParent {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The parent snapshot.
        parent: String,
    },
    /// The manifest does not list the layer.
    #[error("layer {layer} is not in the manifest of {image}")]
    NotInManifest {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
    },
    /// The node's keys could not be read.
    #[error("loading the node's keys")]
    Keys(#[from] KeyError),
    /// The layer could not be opened (key, index) or mounted.
    #[error("layer {layer} of {image}")]
    Mount {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// What failed.
        #[source]
        source: Box<MountError>,
    },
    /// Another Prepare of the same layer did not finish in time.
    #[error("snapshot {target}: another Prepare of this layer has been running for {waited:?}; try again")]
    Busy {
        /// The target snapshot.
        target: String,
        /// How long this one waited.
        waited: Duration,
    },
    /// A stored source does not parse (a damaged database).
    #[error("remote snapshot record: {0}")]
    Record(String),
}

/// Settings of remote layers.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// The node's private keys and key shares.
    pub keys_dir: PathBuf,
    /// docker `config.json` with registry credentials (`None`: the default place).
    pub docker_config: Option<PathBuf>,
    /// Registry access.
    pub registry: RegistryOptions,
    /// Fetching, the node's fetch and FUSE threads, and disk cache bounds of each layer.
    pub mount: MountOptions,
    /// Where the node's FUSE session is mounted (each layer a directory of it, bind-mounted
    /// at its snapshot's `fs`); it must be private to root.
    pub session_dir: PathBuf,
    /// How long Prepare of a remote layer waits for its startup profile.
    pub profile_wait: Duration,
    /// Where the node's FUSE session is kept across restarts; `None`: it is not (a restart
    /// breaks the containers running on sealed layers).
    pub keeper: Option<SessionKeeping>,
}

/// The session keeper of a daemon and how to start it.
#[derive(Clone, Debug)]
pub struct SessionKeeping {
    /// Its socket.
    pub keeper: Keeper,
    /// The binary that runs `keep-sessions` (the daemon's own: `/proc/self/exe`, which works
    /// even after an upgrade replaced the file).
    pub program: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// How long a manifest resolved by tag is reused for the other layers of the same pull.
const MANIFEST_TTL: Duration = Duration::from_secs(60);

/// Opens and mounts remote sealed layers; one per daemon, shared by all snapshots.
pub struct RemoteLayers {
    config: RemoteConfig,
    runtime: Handle,
    memory: Arc<MemoryCache>,
    /// The fetch workers of every layer.
    pool: Arc<FetchPool>,
    /// The FUSE session of every layer, mounted at the first layer's mount.
    session: Mutex<Option<Arc<FuseSession>>>,
    /// One client per registry host (connection pools, tokens).
    registries: Mutex<HashMap<String, Registry>>,
    /// Recently resolved manifests, by the reference asked for.
    manifests: Mutex<lru::LruCache<String, (Instant, RemoteManifest)>>,
    /// Tails of the layers after the one being prepared, fetched meanwhile.
    tails: Arc<TailsAhead>,
}

impl RemoteLayers {
    /// How long Prepare waits for a mounted layer's startup profile.
    pub fn profile_wait(&self) -> Duration {
        self.config.profile_wait
    }

    /// Remote layers whose registry requests run on `runtime` and whose plain chunks share
    /// `memory`.
    pub fn new(config: RemoteConfig, runtime: Handle, memory: Arc<MemoryCache>) -> Self {
        RemoteLayers {
            pool: FetchPool::start(config.mount.pool.clone()),
            session: Mutex::new(None),
            config,
            runtime,
            memory,
            registries: Mutex::new(HashMap::new()),
            manifests: Mutex::new(lru::LruCache::new(NonZeroUsize::new(64).expect("64"))),
            tails: Arc::default(),
        }
    }

    /// The memory cache shared by all layers.
    pub fn memory(&self) -> &Arc<MemoryCache> {
        &self.memory
    }

    /// The node's FUSE session, mounted now if it is not yet (and handed to the keeper). A
    /// session a dead daemon left mounted, and nobody kept, answers nothing: it is detached
    /// first.
    fn session(&self) -> Result<Arc<FuseSession>, MountError> {
        let mut session = self.session.lock().expect("session lock");
        if let Some(session) = &*session {
            return Ok(session.clone());
        }
        let dir = &self.config.session_dir;
        if crate::mount_table::detach_all(dir) > 0 {
            tracing::warn!(dir = %dir.display(), "detached a dead FUSE session a previous daemon left (nothing kept it); containers still running on its layers cannot read them");
        }
        crate::hardening::ensure_private_dir(dir).map_err(|source| MountError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mounted = Arc::new(mount::mount_session(dir, &self.config.mount, "node")?);
        tracing::info!(dir = %dir.display(), fuse_threads = self.config.mount.fuse_threads,
            fetch_threads = self.pool.threads(), serving = ?mounted.serving(),
            "FUSE session mounted for every layer");
        self.keep(&mounted);
        *session = Some(mounted.clone());
        Ok(mounted)
    }

    /// Hands the session's connection to the keeper, starting one if none runs.
    fn keep(&self, session: &FuseSession) {
        let Some(keeping) = &self.config.keeper else {
            return;
        };
        let kept = (|| {
            if !keeping.keeper.is_running() {
                keeping.keeper.spawn(&keeping.program, &keeping.log)?;
            }
            keeping.keeper.store(NODE_SESSION, session.device())
        })();
        match kept {
            Ok(()) => {
                tracing::info!(keeper = %keeping.keeper.socket().display(), "FUSE session kept for restarts")
            }
            Err(error) => {
                tracing::warn!(%error, "the FUSE session is not kept: a restart of this daemon will break the containers running on sealed layers")
            }
        }
    }

    /// Takes over the FUSE session an earlier daemon left with the keeper, if there is one and
    /// it is still mounted; it serves once [`RemoteLayers::start_resumed_session`] is called,
    /// after every layer is back in its table. Whether a session was resumed.
    pub fn resume_session(&self) -> bool {
        let Some(keeping) = &self.config.keeper else {
            return false;
        };
        let dir = &self.config.session_dir;
        let device = match keeping.keeper.take(NODE_SESSION) {
            Ok(Some(device)) => device,
            Ok(None) => return false,
            Err(error) => {
                if keeping.keeper.socket().exists() {
                    tracing::warn!(%error, "the session keeper does not answer; mounting a new FUSE session");
                }
                return false;
            }
        };
        if !crate::mount_table::is_mounted(dir) {
            // Unmounted by hand: the kept connection serves nothing any more.
            tracing::warn!(dir = %dir.display(), "the kept FUSE session is no longer mounted; releasing it");
            let _ = keeping.keeper.release(NODE_SESSION);
            return false;
        }
        let config = mount::session_config(&self.config.mount, "node");
        match FuseSession::resume(Arc::default(), device, dir, &config) {
            Ok(resumed) => {
                tracing::info!(dir = %dir.display(), serving = ?resumed.serving(), "resuming the FUSE session the previous daemon left");
                *self.session.lock().expect("session lock") = Some(Arc::new(resumed));
                true
            }
            Err(error) => {
                tracing::error!(%error, "could not resume the kept FUSE session; mounting a new one");
                false
            }
        }
    }

    /// Starts serving a resumed session: requests waiting since the restart are answered.
    pub fn start_resumed_session(&self) -> std::io::Result<()> {
        let session = self.session.lock().expect("session lock").clone();
        match session {
            Some(session) => {
                session.start()?;
                tracing::info!(
                    layers = session.table().len(),
                    "resumed FUSE session serving"
                );
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether the node's session is held by the keeper (so leaving it mounted at exit lets
    /// the next daemon resume it).
    pub fn session_is_kept(&self) -> bool {
        let Some(keeping) = &self.config.keeper else {
            return false;
        };
        self.session.lock().expect("session lock").is_some()
            && keeping
                .keeper
                .list()
                .is_ok_and(|names| names.iter().any(|name| name == NODE_SESSION))
    }

    /// Leaves the node's session mounted and connected when this daemon exits.
    pub fn keep_session_for_restart(&self) {
        if let Some(session) = &*self.session.lock().expect("session lock") {
            session.keep_for_restart();
        }
    }

    /// Unmounts the node's FUSE session (on shutdown, after every layer is gone) and tells
    /// the keeper to let it go.
    pub fn end_session(&self) {
        if self.session.lock().expect("session lock").take().is_some() {
            if let Some(keeping) = &self.config.keeper {
                let _ = keeping.keeper.release(NODE_SESSION);
            }
        }
    }

    fn registry_for(&self, reference: &Reference) -> Result<Registry, RegistryError> {
        let host = reference.resolve_registry().to_string();
        let mut registries = self.registries.lock().expect("registries lock");
        if let Some(registry) = registries.get(&host) {
            return Ok(registry.clone());
        }
        let credentials =
            credentials::load_config(self.config.docker_config.as_deref()).map_err(|e| {
                RegistryError::Invalid {
                    registry: host.clone(),
                    what: e.to_string(),
                }
            })?;
        let registry = Registry::connect(
            self.runtime.clone(),
            &host,
            self.config.registry.clone(),
            &|h| credentials.auth_for(h),
        )?;
        registries.insert(host, registry.clone());
        Ok(registry)
    }

    /// The image's manifest, from the cache while fresh.
    fn manifest(&self, registry: &Registry, asked: &str) -> Result<RemoteManifest, RegistryError> {
        if let Some((at, image)) = self.manifests.lock().expect("manifests lock").get(asked) {
            if at.elapsed() < MANIFEST_TTL {
                return Ok(image.clone());
            }
        }
        let image = registry.resolve_manifest(&Registry::parse(asked)?)?;
        self.manifests
            .lock()
            .expect("manifests lock")
            .put(asked.to_string(), (Instant::now(), image.clone()));
        Ok(image)
    }

    /// Finds the requested layer in its image's manifest. `None`: the manifest says the layer
    /// is not sealed, so containerd should unpack it.
    pub fn resolve(
        &self,
        request: &LayerRequest,
    ) -> Result<Option<RemoteLayerSource>, RemoteError> {
        let registry_error = |source| RemoteError::Registry {
            image: request.image.clone(),
            layer: request.layer.clone(),
            source: Box::new(source),
        };
        let mut asked = request.image.clone();
        if let Some(manifest) = &request.manifest {
            // Pin to what the client resolved; drop a digest the reference already carried.
            let base = asked.split('@').next().unwrap_or_default().to_string();
            asked = format!("{base}@{manifest}");
        }
        let reference = Registry::parse(&asked).map_err(registry_error)?;
        let registry = self.registry_for(&reference).map_err(registry_error)?;
        let image = self.manifest(&registry, &asked).map_err(registry_error)?;
        let descriptor = image
            .manifest
            .layers()
            .iter()
            .find(|l| l.digest().to_string() == request.layer)
            .cloned()
            .ok_or_else(|| RemoteError::NotInManifest {
                image: request.image.clone(),
                layer: request.layer.clone(),
            })?;
        if descriptor.media_type().to_string() != MEDIA_TYPE_SEALED_LAYER {
            return Ok(None);
        }
        let version = image
            .manifest
            .annotations()
            .as_ref()
            .and_then(|a| a.get(fsformat::oci::ANNOTATION_SEALED_IMAGE))
            .cloned();
        let legacy = descriptor
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(fsformat::oci::ANNOTATION_LEGACY_SOURCE_DIFF_ID));
        if legacy || version.as_deref() != Some(fsformat::oci::SEALED_IMAGE_VERSION) {
            return Err(RemoteError::LegacyFormat {
                image: request.image.clone(),
                layer: request.layer.clone(),
                found: version.unwrap_or_else(|| "v1 (unmarked)".to_string()),
            });
        }
        let found = descriptor
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SEALED_MARKER_LABEL))
            .cloned()
            .unwrap_or_default();
        if found != request.index_digest {
            return Err(RemoteError::ManifestMismatch {
                image: request.image.clone(),
                layer: request.layer.clone(),
                expected: request.index_digest.clone(),
                found,
            });
        }
        self.fetch_tails_after(&registry, &image, &descriptor);
        Ok(Some(RemoteLayerSource {
            reference: image.reference.whole(),
            descriptor,
        }))
    }

    /// Starts fetching the tails of the sealed layers that follow `current` in `image`:
    /// containerd prepares them next, one after another (see [`crate::tails_ahead`]).
    fn fetch_tails_after(&self, registry: &Registry, image: &RemoteManifest, current: &Descriptor) {
        let pinned = image.reference.whole();
        let jobs = image
            .manifest
            .layers()
            .iter()
            .skip_while(|layer| layer.digest() != current.digest())
            .skip(1)
            .filter(|layer| layer.media_type().to_string() == MEDIA_TYPE_SEALED_LAYER)
            .filter_map(|layer| {
                Some(TailJob {
                    key: TailKey::of(&pinned, layer)?,
                    descriptor: layer.clone(),
                    source: Arc::new(registry.blob(
                        &image.reference,
                        layer.digest().as_ref(),
                        layer.size(),
                    )),
                    max_index_bytes: self.config.mount.max_index_bytes,
                })
            })
            .collect();
        self.tails.schedule(jobs);
    }

    /// Opens the layer with the node's keys and mounts it at `mountpoint`; `cache_key` tells
    /// its chunks apart in the shared memory cache, `cache_dir` holds its sealed chunks.
    pub fn mount(
        &self,
        source: &RemoteLayerSource,
        mountpoint: &Path,
        cache_key: u64,
        cache_dir: &Path,
    ) -> Result<MountedLayer, RemoteError> {
        let layer = source.digest();
        let mount_error = |error: MountError| RemoteError::Mount {
            image: source.reference.clone(),
            layer: layer.clone(),
            source: Box::new(error),
        };
        let registry_error = |error| RemoteError::Registry {
            image: source.reference.clone(),
            layer: layer.clone(),
            source: Box::new(error),
        };
        let slot = u32::try_from(cache_key).map(Slot).map_err(|_| {
            mount_error(MountError::Io {
                what: format!("snapshot id {cache_key} is beyond the session's layer slots"),
                source: std::io::Error::other("too many snapshots"),
            })
        })?;
        let identities = keys::load_key_dir(&self.config.keys_dir)?;
        let reference = Registry::parse(&source.reference).map_err(registry_error)?;
        let registry = self.registry_for(&reference).map_err(registry_error)?;
        let blob = Arc::new(registry.blob(&reference, &layer, source.descriptor.size()));
        let tail = self
            .layer_tail(source, &blob, cache_dir)
            .map_err(mount_error)?;
        let opened = mount::open_sealed_layer_with_tail(
            &source.descriptor,
            blob,
            &identities,
            self.config.mount.max_index_bytes,
            Some(tail),
        )
        .map_err(mount_error)?;
        let options = MountOptions {
            cache_dir: Some(cache_dir.to_path_buf()),
            ..self.config.mount.clone()
        };
        let fs = mount::layer_fs(
            &opened,
            cache_key,
            &self.pool,
            self.memory.clone(),
            &options,
        )
        .map_err(mount_error)?;
        let session = self.session().map_err(mount_error)?;
        MountedLayer::add_bound_at(&session, fs, slot, mountpoint).map_err(mount_error)
    }

    /// The layer's tail: the copy kept beside its disk cache (so a restart reopens the layer
    /// without the registry), else the one fetched ahead, else one range read. Every copy is
    /// checked against the digest the descriptor pins before it is used; a fetched one is
    /// kept for next time.
    fn layer_tail(
        &self,
        source: &RemoteLayerSource,
        blob: &Arc<crate::registry::RegistryBlob>,
        cache_dir: &Path,
    ) -> Result<UnverifiedTail, MountError> {
        let descriptor = &source.descriptor;
        let facts = SealedLayerAnnotations::read_from(
            &descriptor.annotations().clone().unwrap_or_default(),
        )
        .map_err(|error| MountError::Layer {
            digest: source.digest(),
            source: error,
        })?;
        let kept_at = cache_dir.join(KEPT_TAIL);
        if let Ok(bytes) = std::fs::read(&kept_at) {
            match UnverifiedTail::from_pinned(descriptor.size(), bytes, &facts.index_digest) {
                Ok(tail) => return Ok(tail),
                Err(error) => {
                    tracing::warn!(path = %kept_at.display(), %error, "kept layer tail does not verify; fetching it again")
                }
            }
        }
        // One being fetched ahead is waited for rather than fetched twice; its fetch is
        // bounded by the registry's deadlines.
        let tail = match TailKey::of(&source.reference, descriptor)
            .and_then(|key| self.tails.take(&key, self.config.registry.request_timeout))
        {
            Some(tail) => tail,
            None => mount::read_tail(
                descriptor,
                &facts,
                &**blob,
                self.config.mount.max_index_bytes,
            )?,
        };
        if let Err(error) = keep_tail(cache_dir, &kept_at, &tail) {
            tracing::warn!(path = %kept_at.display(), %error, "could not keep the layer tail; a restart fetches it again");
        }
        Ok(tail)
    }
}

/// The file beside a layer's disk cache that keeps its verified tail (ciphertext index and
/// footer, as in the blob).
const KEPT_TAIL: &str = "tail";

fn keep_tail(cache_dir: &Path, path: &Path, tail: &UnverifiedTail) -> std::io::Result<()> {
    crate::hardening::ensure_private_dir(cache_dir)?;
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, tail.to_bytes())?;
    std::fs::rename(&temporary, path)
}

/// Labels of a remote snapshot: the `Prepare` labels containerd asks to keep (non-empty ones,
/// as containerd drops empty values on commit) and the remote marker.
pub fn snapshot_labels(labels: &HashMap<String, String>, layer: &str) -> BTreeMap<String, String> {
    let mut kept: BTreeMap<String, String> = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.insert(REMOTE_LABEL.to_string(), layer.to_string());
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layer_requests_come_from_cri_or_stargz_labels_of_sealed_layers() {
        let cri = labels(&[
            (TARGET_LABEL, "sha256:chain"),
            (SEALED_MARKER_LABEL, "sha256:index"),
            (CRI_IMAGE_REF, "reg.local/app:1"),
            (CRI_LAYER_DIGEST, "sha256:layer"),
            (CRI_MANIFEST_DIGEST, "sha256:manifest"),
        ]);
        assert_eq!(
            LayerRequest::from_labels(&cri),
            Some(LayerRequest {
                image: "reg.local/app:1".into(),
                layer: "sha256:layer".into(),
                manifest: Some("sha256:manifest".into()),
                index_digest: "sha256:index".into(),
            })
        );
        let stargz = labels(&[
            (TARGET_LABEL, "sha256:chain"),
            (SEALED_MARKER_LABEL, "sha256:index"),
            (STARGZ_REFERENCE, "reg.local/app:1"),
            (STARGZ_DIGEST, "sha256:layer"),
            ("containerd.io/snapshot/remote/urls", ""),
        ]);
        let request = LayerRequest::from_labels(&stargz).unwrap();
        assert_eq!(
            (request.layer.as_str(), request.manifest),
            ("sha256:layer", None)
        );

        // Not a request: no target (a container's snapshot), not sealed (a plain layer, whose
        // descriptor has no sealfs annotation), or no image to find it in.
        for missing in [
            TARGET_LABEL,
            SEALED_MARKER_LABEL,
            CRI_IMAGE_REF,
            CRI_LAYER_DIGEST,
        ] {
            let mut partial = cri.clone();
            partial.remove(missing);
            assert_eq!(
                LayerRequest::from_labels(&partial),
                None,
                "without {missing}"
            );
        }
        let mut empty = cri.clone();
        empty.insert(SEALED_MARKER_LABEL.into(), String::new());
        assert_eq!(LayerRequest::from_labels(&empty), None);
    }

    #[test]
    fn remote_snapshot_labels_keep_what_containerd_keeps_and_mark_the_layer() {
        let kept = snapshot_labels(
            &labels(&[
                (TARGET_LABEL, "sha256:chain"),
                ("containerd.io/snapshot/remote/urls", ""),
            ]),
            "sha256:layer",
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[TARGET_LABEL], "sha256:chain");
        assert_eq!(kept[REMOTE_LABEL], "sha256:layer");
    }
}
