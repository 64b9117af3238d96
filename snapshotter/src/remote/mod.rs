//! Remote layers: from the labels containerd sends with a layer's `Prepare` to a sealed layer
//! mounted with FUSE. Finds the layer in its image's manifest (the registry's copy, or the one
//! the pull stored in containerd's content store when it hashes to the digest the labels
//! name; the layer labels themselves are not trusted), unwraps its key with the keys its
//! workload may use, verifies its index
//! against the digest the manifest pins and mounts it. What a remote snapshot needs to be
//! mounted again after a restart is kept as a [`RemoteLayerSource`]: the reference pinned to
//! the manifest digest and the layer's descriptor, so a remount costs one range read.

use std::collections::HashMap;
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
use crate::content_store::ContentStore;
use crate::fetcher::FetchPool;
use crate::fs::table::Slot;
use crate::key_access::{KeyAccess, Workload};
use crate::keyprovider::KeyProviders;
use crate::keys::{self, Identities};
use crate::mount::{self, MountError, MountOptions, MountedLayer};
use crate::node_session::{NodeSession, SessionKeeping};
use crate::registry::{Registry, RegistryError, RegistryOptions, RemoteManifest};
use crate::signature::cosign::FoundSignature;
use crate::signature::{self, Requirement, SignatureError, SignaturePolicy};
use crate::tails_ahead::{TailJob, TailKey, TailsAhead};

mod error;
mod labels;

pub use error::RemoteError;
pub use labels::{
    snapshot_labels, ImageNamed, LayerRequest, RemoteLayerSource, REMOTE_LABEL,
    SEALED_MARKER_LABEL, TARGET_LABEL,
};

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
    pub keeping: Option<SessionKeeping>,
    /// Which images must be signed, by whom.
    pub signatures: Arc<SignaturePolicy>,
    /// Keyproviders asked when no private key fits.
    pub providers: KeyProviders,
    /// Which workloads each key may open layers for.
    pub key_access: Arc<KeyAccess>,
    /// containerd's content store, where a pull has put the manifest before it prepares the
    /// layers; `None`: manifests come from the registry only.
    pub content_store: Option<ContentStore>,
}

/// How long an image whose signature verified is taken as verified for its other layers and
/// later pulls: a signature removed from the registry (revoked) stops counting within it.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

/// Counters of signature checks.
#[derive(Debug, Default)]
pub struct SignatureStats {
    /// Images whose signature verified (each check; cached ones are not counted again).
    pub verified: std::sync::atomic::AtomicU64,
    /// Layers refused by the signature policy.
    pub refused: std::sync::atomic::AtomicU64,
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
    session: NodeSession,
    /// One client per registry host (connection pools, tokens).
    registries: Mutex<HashMap<String, Registry>>,
    /// Recently resolved manifests, by the reference asked for.
    manifests: Mutex<lru::LruCache<String, (Instant, RemoteManifest)>>,
    /// Tails of the layers after the one being prepared, fetched meanwhile.
    tails: Arc<TailsAhead>,
    /// Images verified lately against the signature policy: `DIGEST SCOPE` -> when.
    verified: Mutex<lru::LruCache<String, Instant>>,
    /// Signature checks.
    pub signature_stats: SignatureStats,
}

impl RemoteLayers {
    /// What pull-through mirrors did to the node's range reads.
    pub fn mirror_stats(&self) -> &crate::registry::MirrorStats {
        &self.config.registry.mirror_stats
    }

    /// The configured keyproviders (their call counts, for metrics).
    pub fn providers(&self) -> &KeyProviders {
        &self.config.providers
    }

    /// How long Prepare waits for a mounted layer's startup profile.
    pub fn profile_wait(&self) -> Duration {
        self.config.profile_wait
    }

    /// Remote layers whose registry requests run on `runtime` and whose plain chunks share
    /// `memory`.
    pub fn new(config: RemoteConfig, runtime: Handle, memory: Arc<MemoryCache>) -> Self {
        let pool = FetchPool::start(config.mount.pool.clone());
        tracing::debug!(
            threads = pool.threads(),
            "fetch pool started for every layer"
        );
        RemoteLayers {
            pool,
            session: NodeSession::new(
                config.session_dir.clone(),
                config.mount.clone(),
                config.keeping.clone(),
            ),
            config,
            runtime,
            memory,
            registries: Mutex::new(HashMap::new()),
            manifests: Mutex::new(lru::LruCache::new(NonZeroUsize::new(64).expect("64"))),
            tails: Arc::default(),
            verified: Mutex::new(lru::LruCache::new(NonZeroUsize::new(256).expect("256"))),
            signature_stats: SignatureStats::default(),
        }
    }

    /// The memory cache shared by all layers.
    pub fn memory(&self) -> &Arc<MemoryCache> {
        &self.memory
    }

    /// The node's FUSE session.
    pub fn session(&self) -> &NodeSession {
        &self.session
    }

    fn registry_for(&self, reference: &Reference) -> Result<Registry, RegistryError> {
        let host = reference.resolve_registry().to_string();
        let mut registries = self.registries.lock().expect("registries lock");
        if let Some(registry) = registries.get(&host) {
            return Ok(registry.clone());
        }
        let registry = Registry::connect_with_docker_config(
            self.runtime.clone(),
            &host,
            self.config.registry.clone(),
            self.config.docker_config.as_deref(),
        )?;
        registries.insert(host, registry.clone());
        Ok(registry)
    }

    /// The image's manifest: from the cache while fresh, else from containerd's content store
    /// when the pull named its digest (`pinned`: the namespace and the digest), else from the
    /// registry.
    fn manifest(
        &self,
        registry: &Registry,
        asked: &str,
        pinned: Option<(&str, &str)>,
    ) -> Result<RemoteManifest, RegistryError> {
        if let Some((at, image)) = self.manifests.lock().expect("manifests lock").get(asked) {
            if at.elapsed() < MANIFEST_TTL {
                return Ok(image.clone());
            }
        }
        // Under key access rules the image named must be the registry's: a manifest in the
        // content store is whatever a client of that namespace wrote there, and could list
        // another image's layer under a repository the namespace may open.
        let pinned = pinned.filter(|_| self.config.key_access.is_empty());
        let local = pinned.and_then(|(namespace, digest)| {
            let bytes = self
                .config
                .content_store
                .as_ref()?
                .read_verified(namespace, digest)?;
            RemoteManifest::from_pinned_bytes(&Registry::parse(asked).ok()?, digest, bytes)
        });
        let image = match local {
            Some(image) => image,
            None => registry.resolve_manifest(&Registry::parse(asked)?)?,
        };
        self.manifests
            .lock()
            .expect("manifests lock")
            .put(asked.to_string(), (Instant::now(), image.clone()));
        Ok(image)
    }

    /// Finds the requested layer in its image's manifest, for a Prepare that mounts it: the
    /// tails of the image's following layers are fetched meanwhile. `None`: the manifest says
    /// the layer is not sealed, so containerd should unpack it.
    pub fn resolve(
        &self,
        request: &LayerRequest,
        namespace: &str,
    ) -> Result<Option<RemoteLayerSource>, RemoteError> {
        self.find_layer(request, namespace, true)
    }

    /// Finds the requested layer in its image's manifest, to check a Prepare of a layer that
    /// is mounted already (so are the image's other layers, most likely: nothing is fetched
    /// ahead).
    pub fn resolve_mounted(
        &self,
        request: &LayerRequest,
        namespace: &str,
    ) -> Result<Option<RemoteLayerSource>, RemoteError> {
        self.find_layer(request, namespace, false)
    }

    fn find_layer(
        &self,
        request: &LayerRequest,
        namespace: &str,
        fetch_ahead: bool,
    ) -> Result<Option<RemoteLayerSource>, RemoteError> {
        let registry_error = |source| RemoteError::Registry {
            image: request.image.clone(),
            layer: request.layer.clone(),
            source: Box::new(source),
        };
        let asked = ImageNamed {
            image: request.image.clone(),
            manifest: request.manifest.clone(),
        }
        .pinned();
        let reference = Registry::parse(&asked).map_err(registry_error)?;
        let registry = self.registry_for(&reference).map_err(registry_error)?;
        // When the client named the manifest digest (CRI, sealctl pull) and its image must be
        // signed, its signatures are fetched beside the manifest rather than after it: the
        // check then costs the pull one round trip (the payloads), not two.
        let early = request
            .manifest
            .as_deref()
            .filter(|digest| self.needs_signature_check(&reference, digest));
        let (image, fetched) = std::thread::scope(|scope| {
            let signatures = early.map(|digest| {
                scope.spawn(|| signature::fetch_signatures(&registry, &reference, digest))
            });
            let pinned = request
                .manifest
                .as_deref()
                .map(|digest| (namespace, digest));
            let image = self.manifest(&registry, &asked, pinned);
            let fetched = signatures.map(|fetching| {
                fetching
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
            (image, fetched)
        });
        let image = image.map_err(registry_error)?;
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
        self.check_signature(&registry, &image, &request.image, fetched)?;
        if fetch_ahead {
            self.fetch_tails_after(&registry, &image, &descriptor);
        }
        Ok(Some(RemoteLayerSource {
            reference: image.reference.whole(),
            descriptor,
            namespace: String::new(),
            opened_by: String::new(),
        }))
    }

    /// Holds a layer that is not sealed to the signature policy, if the policy says so
    /// (`unsealed`) and its Prepare named the image: refused unless the image is signed as
    /// its scope requires.
    pub fn check_unsealed(&self, named: &ImageNamed) -> Result<(), RemoteError> {
        if !self.config.signatures.unsealed {
            return Ok(());
        }
        let registry_error = |source| RemoteError::Registry {
            image: named.image.clone(),
            layer: "(not sealed)".to_string(),
            source: Box::new(source),
        };
        let asked = named.pinned();
        let reference = Registry::parse(&asked).map_err(registry_error)?;
        let repository = signature::repository_of(&reference);
        if let (_, Requirement::Off) = self.config.signatures.for_repository(&repository) {
            return Ok(());
        }
        let registry = self.registry_for(&reference).map_err(registry_error)?;
        let image = self
            .manifest(&registry, &asked, None)
            .map_err(registry_error)?;
        self.check_signature(&registry, &image, &named.image, None)
    }

    /// Whether the manifest `digest` of `reference`'s repository must be signed and has not
    /// been verified lately.
    fn needs_signature_check(&self, reference: &Reference, digest: &str) -> bool {
        let repository = signature::repository_of(reference);
        let (scope, requirement) = self.config.signatures.for_repository(&repository);
        matches!(requirement, Requirement::Require(_)) && !self.verified_lately(digest, scope)
    }

    fn verified_lately(&self, digest: &str, scope: &str) -> bool {
        self.verified
            .lock()
            .expect("verified lock")
            .get(&format!("{digest} {scope}"))
            .is_some_and(|at| at.elapsed() < VERIFIED_TTL)
    }

    /// Checks `image` against the signature policy before anything of it is unwrapped or
    /// mounted, with its signatures as `fetched` early if they were; a verified image is
    /// remembered for [`VERIFIED_TTL`].
    fn check_signature(
        &self,
        registry: &Registry,
        image: &RemoteManifest,
        image_name: &str,
        fetched: Option<Result<Vec<FoundSignature>, SignatureError>>,
    ) -> Result<(), RemoteError> {
        use std::sync::atomic::Ordering;
        let repository = signature::repository_of(&image.reference);
        let (scope, requirement) = self.config.signatures.for_repository(&repository);
        let Requirement::Require(keys) = requirement else {
            return Ok(());
        };
        let digest = image.descriptor.digest().to_string();
        if self.verified_lately(&digest, scope) {
            return Ok(());
        }
        // Fetched early only for the digest the client named, which `image` is pinned to.
        let verified = fetched
            .unwrap_or_else(|| signature::fetch_signatures(registry, &image.reference, &digest))
            .and_then(|found| {
                Ok(signature::cosign::check(&found, keys, &digest)?
                    .name
                    .clone())
            });
        match verified {
            Ok(key) => {
                self.signature_stats
                    .verified
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(image = image_name, %digest, scope, key, "image signature verified");
                self.verified
                    .lock()
                    .expect("verified lock")
                    .put(format!("{digest} {scope}"), Instant::now());
                Ok(())
            }
            Err(source) => {
                self.signature_stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(RemoteError::Signature {
                    image: image_name.to_string(),
                    digest,
                    scope: scope.to_string(),
                    source: Box::new(source),
                })
            }
        }
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

    /// The node's key access rules.
    pub fn key_access(&self) -> &KeyAccess {
        &self.config.key_access
    }

    /// Refuses `source` (the image it names, its layer) to containerd namespace `namespace` if
    /// the key access rules do not let it use `key`, which opened the layer.
    pub fn check_key_access(
        &self,
        key: &str,
        namespace: &str,
        source: &RemoteLayerSource,
    ) -> Result<(), RemoteError> {
        let reference =
            Registry::parse(&source.reference).map_err(|error| RemoteError::Registry {
                image: source.reference.clone(),
                layer: source.digest(),
                source: Box::new(error),
            })?;
        let repository = crate::image_scope::repository_of(&reference);
        let workload = Workload {
            namespace,
            repository: &repository,
        };
        if self.config.key_access.allows(key, workload) {
            return Ok(());
        }
        Err(RemoteError::KeyNotAuthorised {
            image: source.reference.clone(),
            layer: source.digest(),
            keys: key.to_string(),
            workload: workload.to_string(),
        })
    }

    /// The keys `source`'s workload may unwrap its layer key with (`facts`: its descriptor's,
    /// `reference`: its parsed reference): the node's private keys, then its keyproviders, as far as the key access
    /// rules let that workload use them.
    fn identities_for(
        &self,
        source: &RemoteLayerSource,
        facts: &SealedLayerAnnotations,
        reference: &Reference,
    ) -> Result<Identities, RemoteError> {
        let all = Identities {
            keys: keys::load_key_dir(&self.config.keys_dir)?,
            providers: self.config.providers.all().cloned().collect(),
        };
        let repository = crate::image_scope::repository_of(reference);
        let workload = Workload {
            namespace: &source.namespace,
            repository: &repository,
        };
        let (allowed, denied) = self.config.key_access.filter(&all, workload);
        // A layer only denied keys could open is refused as such, rather than with "no key
        // opens this layer": the operator must see that a rule, not a missing key, stops it.
        let recipients: Vec<String> = facts.stanzas.iter().map(|s| s.recipient_label()).collect();
        let opens = |label: &String| recipients.contains(label);
        let allowed_opens = allowed
            .as_dyn()
            .iter()
            .any(|identity| opens(&identity.label()));
        let denied_open: Vec<&String> = denied.iter().filter(|label| opens(label)).collect();
        if !allowed_opens && !denied_open.is_empty() {
            return Err(RemoteError::KeyNotAuthorised {
                image: source.reference.clone(),
                layer: source.digest(),
                keys: denied_open
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                workload: workload.to_string(),
            });
        }
        Ok(allowed)
    }

    /// Opens the layer with the keys its workload may use and mounts it at `mountpoint`;
    /// `cache_key` tells its chunks apart in the shared memory cache, `cache_dir` holds its
    /// sealed chunks. Also says what unwrapped the layer key.
    pub fn mount(
        &self,
        source: &RemoteLayerSource,
        mountpoint: &Path,
        cache_key: u64,
        cache_dir: &Path,
    ) -> Result<(MountedLayer, String), RemoteError> {
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
        let reference = Registry::parse(&source.reference).map_err(registry_error)?;
        let facts = mount::layer_facts(&source.descriptor).map_err(mount_error)?;
        let kept = self.kept_key(source, cache_key);
        let from_kept = kept.is_some();
        let (key, opened_by) = match kept {
            Some(kept) => kept,
            None => {
                let identities = self.identities_for(source, &facts, &reference)?;
                mount::unwrap_key(&source.descriptor, &facts, &identities).map_err(mount_error)?
            }
        };
        let registry = self.registry_for(&reference).map_err(registry_error)?;
        let blob = Arc::new(registry.blob(&reference, &layer, source.descriptor.size()));
        let tail = self
            .layer_tail(source, &facts, &blob, cache_dir)
            .map_err(mount_error)?;
        let opened = mount::open_unwrapped(
            &source.descriptor,
            &facts,
            &key,
            opened_by,
            blob,
            self.config.mount.max_index_bytes,
            Some(tail),
        )
        .inspect_err(|_| {
            // A kept key that does not open its layer (damaged) is not tried again: the
            // next attempt asks the provider.
            if from_kept {
                self.session.forget_key(cache_key);
            }
        })
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
        let session = self.session.get_or_mount().map_err(mount_error)?;
        let mounted =
            MountedLayer::add_bound_at(&session, fs, slot, mountpoint).map_err(mount_error)?;
        if opened
            .opened_by
            .starts_with(crate::keyprovider::LABEL_PREFIX)
        {
            self.session
                .keep_key(cache_key, &layer, &opened.opened_by, &key);
        }
        Ok((mounted, opened.opened_by.clone()))
    }

    /// The key kept across a restart for snapshot `id`'s layer (see [`crate::kept_keys`]), as
    /// long as the provider that unwrapped it is still configured and the key access rules
    /// still let the snapshot's workload use it; otherwise the layer is opened as at first.
    fn kept_key(
        &self,
        source: &RemoteLayerSource,
        id: u64,
    ) -> Option<(fsformat::LayerKey, String)> {
        use fsformat::Identity;
        let (key, opened_by) = self.session.kept_key(id, &source.digest())?;
        let configured = self
            .config
            .providers
            .all()
            .any(|provider| provider.label() == opened_by);
        let allowed = self
            .check_key_access(&opened_by, &source.namespace, source)
            .is_ok();
        (configured && allowed).then_some((key, opened_by))
    }

    /// The layer's tail: the copy kept beside its disk cache (so a restart reopens the layer
    /// without the registry), else the one fetched ahead, else one range read. Every copy is
    /// checked against the digest the descriptor pins before it is used; a fetched one is
    /// kept for next time.
    fn layer_tail(
        &self,
        source: &RemoteLayerSource,
        facts: &SealedLayerAnnotations,
        blob: &Arc<crate::registry::RegistryBlob>,
        cache_dir: &Path,
    ) -> Result<UnverifiedTail, MountError> {
        let descriptor = &source.descriptor;
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
                facts,
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
