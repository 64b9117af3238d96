//! Mounting sealed images: open a layer (unwrap its key with the node's identities, verify its
//! index against the digest pinned by the manifest), serve it with FUSE, and for a whole image
//! stack the layers read-only with overlayfs, as a container would see them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsformat::keywrap::unwrap_layer_key_by;
use fsformat::oci::{SealedLayerAnnotations, MEDIA_TYPE_SEALED_LAYER};
use fsformat::reader::{SealedLayer, UnverifiedTail};
use fsformat::{FormatError, LayerKey};
use oci_spec::image::Descriptor;

use crate::cache::{DiskCache, MemoryCache};
use crate::fetcher::{FetchConfig, FetchPool, LayerFetcher, PoolConfig};
use crate::fs::table::{LayerTable, Slot};
use crate::fs::LayerFs;
use crate::fuse::session::{FuseSession, SessionConfig};
use crate::keys::Identities;
use crate::mount_table;
pub use crate::mount_table::MountRestrictions;
use crate::oci_layout::{LayoutError, OciLayout};
use crate::source::{ChunkSource, LocalBlob, SourceError};

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The image could not be read.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A layer is not sealed.
    #[error("layer {digest} is not a sealed layer (media type {media_type}); only sealed images can be mounted")]
    NotSealed {
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer's key could not be unwrapped or its index failed verification.
    #[error("layer {digest}")]
    Layer {
        /// The layer.
        digest: String,
        /// What failed.
        #[source]
        source: FormatError,
    },
    /// The layer's index is larger than this node accepts.
    #[error("layer {digest}: its index is {size} bytes, above this node's limit of {limit} bytes (fetch.max_index_mib), so it was refused before the index was fetched or decompressed")]
    IndexTooLarge {
        /// The layer.
        digest: String,
        /// The size its annotation or footer gives.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer's blob could not be read.
    #[error("layer {digest}: reading its index")]
    Source {
        /// The layer.
        digest: String,
        /// The error.
        #[source]
        source: crate::source::SourceError,
    },
    /// Mounting failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Options shared by every layer of a mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Fetching, per layer.
    pub fetch: FetchConfig,
    /// The fetch workers every layer of the node (or of an image mount) shares.
    pub pool: PoolConfig,
    /// FUSE request threads of a session (the node's, an image's, or a lone layer's).
    pub fuse_threads: usize,
    /// Serve so that a restarted daemon gets the requests the stopped one had read, where the
    /// kernel can resend them (see [`crate::fuse::session`]).
    pub fuse_resend: bool,
    /// Where sealed chunks are cached on disk (per layer subdirectory); `None`: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Disk cache bound per layer.
    pub disk_cache_bytes: u64,
    /// Largest index a layer may have (its tail fetched, and its decompressed index), see
    /// [`DEFAULT_MAX_INDEX_BYTES`].
    pub max_index_bytes: u64,
    /// What the mounts of an image opened for inspection (`mount.sealfs`) refuse: setuid and
    /// device nodes always there, execution on request. The snapshotter's layer mounts are
    /// container lowers: the container's overlay decides, so these stay off for them.
    pub restrictions: MountRestrictions,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fetch: FetchConfig::default(),
            pool: PoolConfig::default(),
            fuse_threads: 8,
            fuse_resend: true,
            cache_dir: None,
            disk_cache_bytes: 10 << 30,
            max_index_bytes: DEFAULT_MAX_INDEX_BYTES,
            restrictions: MountRestrictions::default(),
        }
    }
}

/// A sealed layer whose index is open and verified, with a source for its chunks.
pub struct OpenedLayer {
    /// The layer digest.
    pub digest: String,
    /// The verified index and keys.
    pub layer: Arc<SealedLayer>,
    /// Where its chunks come from.
    pub source: Arc<dyn ChunkSource>,
    /// What unwrapped its key: a key id, or `provider:NAME`.
    pub opened_by: String,
}

/// Opens the sealed layer `descriptor` of `layout` with the first identity that can.
pub fn open_layer(
    layout: &OciLayout,
    descriptor: &Descriptor,
    identities: &Identities,
) -> Result<OpenedLayer, MountError> {
    let path = layout.blob_path(descriptor.digest().as_ref())?;
    let source = LocalBlob::open(&path).map_err(|source| MountError::Io {
        what: format!("opening {}", path.display()),
        source,
    })?;
    open_sealed_layer(
        descriptor,
        Arc::new(source),
        identities,
        DEFAULT_MAX_INDEX_BYTES,
    )
}

/// A sealed layer's descriptor facts (annotations) and its unwrapped key: the first step of
/// opening a layer, with no I/O.
pub fn unwrap_layer(
    descriptor: &Descriptor,
    identities: &Identities,
) -> Result<(SealedLayerAnnotations, LayerKey), MountError> {
    unwrap_layer_by(descriptor, identities).map(|(facts, key, _)| (facts, key))
}

/// Like [`unwrap_layer`], also naming what unwrapped the key (a key id or `provider:NAME`).
pub fn unwrap_layer_by(
    descriptor: &Descriptor,
    identities: &Identities,
) -> Result<(SealedLayerAnnotations, LayerKey, String), MountError> {
    let facts = layer_facts(descriptor)?;
    let (key, opened_by) = unwrap_key(descriptor, &facts, identities)?;
    Ok((facts, key, opened_by))
}

/// A sealed layer descriptor's facts (its annotations: recipients, index size and digest); a
/// layer that is not sealed is refused.
pub fn layer_facts(descriptor: &Descriptor) -> Result<SealedLayerAnnotations, MountError> {
    let digest = descriptor.digest().to_string();
    if descriptor.media_type().to_string() != MEDIA_TYPE_SEALED_LAYER {
        return Err(MountError::NotSealed {
            digest,
            media_type: descriptor.media_type().to_string(),
        });
    }
    let annotations = descriptor.annotations().clone().unwrap_or_default();
    SealedLayerAnnotations::read_from(&annotations)
        .map_err(|source| MountError::Layer { digest, source })
}

/// The layer key of `descriptor` (whose facts are `facts`), unwrapped with the first identity
/// that can, and what unwrapped it.
pub fn unwrap_key(
    descriptor: &Descriptor,
    facts: &SealedLayerAnnotations,
    identities: &Identities,
) -> Result<(LayerKey, String), MountError> {
    unwrap_layer_key_by(&identities.as_dyn(), &facts.stanzas).map_err(|source| MountError::Layer {
        digest: descriptor.digest().to_string(),
        source,
    })
}

/// Fetches a sealed layer's tail (index and footer) with one range read and checks it against
/// the digest the descriptor pins before parsing any of it; no key is needed, so the footer can
/// be shown without one. A tail or a decompressed index over `max_index_bytes` is refused
/// before it is fetched or decompressed: it would be memory spent on unauthenticated bytes.
pub fn read_tail(
    descriptor: &Descriptor,
    facts: &SealedLayerAnnotations,
    source: &dyn ChunkSource,
    max_index_bytes: u64,
) -> Result<UnverifiedTail, MountError> {
    let digest = descriptor.digest().to_string();
    UnverifiedTail::read_pinned(
        source,
        descriptor.size(),
        facts.index_size,
        &facts.index_digest,
        max_index_bytes,
    )
    .map_err(|error| match error {
        FormatError::IndexTooLarge { size, limit } => MountError::IndexTooLarge {
            digest,
            size,
            limit,
        },
        FormatError::Io { context, source } => {
            match source
                .into_inner()
                .map(|inner| inner.downcast::<SourceError>())
            {
                Some(Ok(source)) => MountError::Source {
                    digest,
                    source: *source,
                },
                Some(Err(inner)) => MountError::Layer {
                    digest,
                    source: FormatError::io(context, io::Error::other(inner)),
                },
                None => MountError::Layer {
                    digest,
                    source: FormatError::io(context, io::Error::other("reading failed")),
                },
            }
        }
        source => MountError::Layer { digest, source },
    })
}

/// Opens a sealed layer whose blob is read through `source` (a local file, a registry): unwraps
/// its key with the first identity that can, fetches the tail with one range read and verifies
/// it against the digest the descriptor pins.
pub fn open_sealed_layer(
    descriptor: &Descriptor,
    source: Arc<dyn ChunkSource>,
    identities: &Identities,
    max_index_bytes: u64,
) -> Result<OpenedLayer, MountError> {
    open_sealed_layer_with_tail(descriptor, source, identities, max_index_bytes, None)
}

/// Like [`open_sealed_layer`], with the tail already fetched by [`read_tail`] when `fetched`
/// holds it (from the same descriptor: it was checked against the digest that pins).
pub fn open_sealed_layer_with_tail(
    descriptor: &Descriptor,
    source: Arc<dyn ChunkSource>,
    identities: &Identities,
    max_index_bytes: u64,
    fetched: Option<UnverifiedTail>,
) -> Result<OpenedLayer, MountError> {
    let (facts, key, opened_by) = unwrap_layer_by(descriptor, identities)?;
    open_unwrapped(
        descriptor,
        &facts,
        &key,
        opened_by,
        source,
        max_index_bytes,
        fetched,
    )
}

/// Opens a sealed layer whose key is unwrapped already (`opened_by` says by what; `facts` are
/// the descriptor's), with the tail in `fetched` or read now: the index is authenticated
/// with the key, so a wrong key fails here.
pub fn open_unwrapped(
    descriptor: &Descriptor,
    facts: &SealedLayerAnnotations,
    key: &LayerKey,
    opened_by: String,
    source: Arc<dyn ChunkSource>,
    max_index_bytes: u64,
    fetched: Option<UnverifiedTail>,
) -> Result<OpenedLayer, MountError> {
    let tail = match fetched {
        Some(tail) => tail,
        None => read_tail(descriptor, facts, &*source, max_index_bytes)?,
    };
    let digest = descriptor.digest().to_string();
    let layer = tail
        .open(key, &facts.index_digest)
        .map_err(|source| MountError::Layer {
            digest: digest.clone(),
            source,
        })?;
    Ok(OpenedLayer {
        digest,
        layer: Arc::new(layer),
        source,
        opened_by,
    })
}

/// Default for [`MountOptions::max_index_bytes`]: 64 MiB holds the index of a layer with
/// about a million files, and bounds what a hostile descriptor or footer can make a node
/// allocate before anything is authenticated.
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 64 << 20;

/// Builds the filesystem of an opened layer: caches and a fetcher on the node's `pool`.
pub fn layer_fs(
    opened: &OpenedLayer,
    key: u64,
    pool: &Arc<FetchPool>,
    memory: Arc<MemoryCache>,
    options: &MountOptions,
) -> Result<LayerFs, MountError> {
    let disk = match &options.cache_dir {
        Some(dir) => {
            let dir = dir.join(opened.digest.replace(':', "-"));
            Some(
                DiskCache::open(&dir, options.disk_cache_bytes).map_err(|source| {
                    MountError::Io {
                        what: format!("opening cache {}", dir.display()),
                        source,
                    }
                })?,
            )
        }
        None => None,
    };
    let fetcher = LayerFetcher::start(
        pool,
        opened.digest.clone(),
        key,
        opened.layer.clone(),
        opened.source.clone(),
        memory,
        disk,
        options.fetch.clone(),
    );
    Ok(LayerFs::new(fetcher))
}

/// The filesystems of an image's layers (`opened`, bottom first), sharing `pool` and
/// `memory`. A directory a layer's tar left implicit shows the metadata the layers below give
/// it, as extracting the layers in order would.
pub fn image_filesystems(
    opened: &[OpenedLayer],
    pool: &Arc<FetchPool>,
    memory: &Arc<MemoryCache>,
    options: &MountOptions,
) -> Result<Vec<LayerFs>, MountError> {
    let mut filesystems = Vec::with_capacity(opened.len());
    for (number, layer) in opened.iter().enumerate() {
        let mut fs = layer_fs(layer, number as u64, pool, memory.clone(), options)?;
        let lowers: Vec<_> = opened[..number].iter().rev().map(|l| &*l.layer).collect();
        fs.inherit_implicit_dirs(&lowers);
        filesystems.push(fs);
    }
    Ok(filesystems)
}

/// Mounts one FUSE session at `dir/l` serving each of `filesystems` (bottom first) as a
/// directory of it, shown as `sealfs:NAME` in the mount table. Returns the layers and the
/// overlayfs lower dirs that stack them (topmost first).
pub fn mount_each(
    filesystems: Vec<LayerFs>,
    dir: &Path,
    options: &MountOptions,
    name: &str,
) -> Result<(Vec<MountedLayer>, Vec<PathBuf>), MountError> {
    // The layers' directories show plaintext: only root may reach them.
    crate::hardening::ensure_private_dir(dir).map_err(|source| MountError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    // A short name: overlayfs takes every lower dir in one page of mount options.
    let session = Arc::new(mount_session(&dir.join("l"), options, name)?);
    let layers: Vec<MountedLayer> = filesystems
        .into_iter()
        .map(|fs| MountedLayer::add(&session, fs))
        .collect();
    let lowers = layers.iter().rev().map(|l| l.mountpoint.clone()).collect();
    Ok((layers, lowers))
}

/// Mounts an empty FUSE session at `mountpoint` (created if missing) for layers to be added to.
pub fn mount_session(
    mountpoint: &Path,
    options: &MountOptions,
    name: &str,
) -> Result<FuseSession, MountError> {
    std::fs::create_dir_all(mountpoint).map_err(|source| MountError::Io {
        what: format!("creating {}", mountpoint.display()),
        source,
    })?;
    FuseSession::mount(
        Arc::new(LayerTable::new()),
        mountpoint,
        &session_config(options, name),
    )
    .map_err(|source| MountError::Io {
        what: format!("mounting FUSE at {}", mountpoint.display()),
        source,
    })
}

/// The session settings of `options`, shown in the mount table as `sealfs:NAME`.
pub fn session_config(options: &MountOptions, name: &str) -> SessionConfig {
    SessionConfig {
        threads: options.fuse_threads,
        resend: options.fuse_resend,
        fs_name: format!("sealfs:{name}"),
        restrictions: options.restrictions,
    }
}

/// One layer served over FUSE: a directory of a shared session (optionally bind-mounted
/// elsewhere), or a session of its own.
pub struct MountedLayer {
    /// The filesystem (progress, statistics).
    pub fs: Arc<LayerFs>,
    session: Arc<FuseSession>,
    /// Its place in a shared session; `None` when the session is its own.
    slot: Option<Slot>,
    /// Where it is bind-mounted, if it is.
    bound: Option<PathBuf>,
    /// Where its tree is seen.
    pub mountpoint: PathBuf,
    /// Left mounted on drop.
    kept: bool,
}

impl MountedLayer {
    /// Mounts `fs` at `mountpoint` with a FUSE session of its own.
    pub fn mount(
        fs: LayerFs,
        mountpoint: &Path,
        options: &MountOptions,
        name: &str,
    ) -> Result<Self, MountError> {
        let fs = Arc::new(fs);
        let session = FuseSession::mount(
            Arc::new(LayerTable::single(fs.clone())),
            mountpoint,
            &session_config(options, name),
        )
        .map_err(|source| MountError::Io {
            what: format!("mounting FUSE at {}", mountpoint.display()),
            source,
        })?;
        Ok(MountedLayer {
            fs,
            session: Arc::new(session),
            slot: None,
            bound: None,
            mountpoint: mountpoint.to_path_buf(),
            kept: false,
        })
    }

    /// Serves `fs` as a new directory of `session`.
    pub fn add(session: &Arc<FuseSession>, fs: LayerFs) -> Self {
        let fs = Arc::new(fs);
        let slot = session.table().insert(fs.clone());
        Self::in_session(session, fs, slot)
    }

    /// The layer `fs`, already in `session`'s table at `slot`.
    fn in_session(session: &Arc<FuseSession>, fs: Arc<LayerFs>, slot: Slot) -> Self {
        MountedLayer {
            fs,
            session: session.clone(),
            slot: Some(slot),
            bound: None,
            mountpoint: session.layer_dir(slot),
            kept: false,
        }
    }

    /// Serves `fs` at `slot` of `session` (see [`LayerTable::insert_at`]), bind-mounted at
    /// `target`. A bind mount already at `target` in a resumed session is the one the daemon
    /// before left for this slot, and containers' overlays stand on it: it is kept. Any other
    /// mount there is a dead daemon's and answers nothing: it is replaced.
    pub fn add_bound_at(
        session: &Arc<FuseSession>,
        fs: LayerFs,
        slot: Slot,
        target: &Path,
    ) -> Result<Self, MountError> {
        let fs = Arc::new(fs);
        session
            .table()
            .insert_at(slot, fs.clone())
            .map_err(|taken| MountError::Io {
                what: format!("adding a layer for {}", target.display()),
                source: io::Error::other(taken),
            })?;
        let mut layer = Self::in_session(session, fs, slot);
        if !(session.is_resumed() && mount_table::is_mounted(target)) {
            mount_table::detach_all(target);
            mount_table::bind(&layer.mountpoint, target).map_err(|source| MountError::Io {
                what: format!(
                    "bind-mounting {} at {}",
                    layer.mountpoint.display(),
                    target.display()
                ),
                source,
            })?;
        }
        layer.bound = Some(target.to_path_buf());
        layer.mountpoint = target.to_path_buf();
        Ok(layer)
    }

    /// Leaves the layer mounted when it is dropped: the process is about to exit and the next
    /// daemon resumes its session.
    pub fn keep_for_restart(&mut self) {
        self.kept = true;
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(target) = self.bound.take() {
            if let Err(error) = mount_table::unmount(&target) {
                if error.raw_os_error() != Some(libc::EINVAL) {
                    tracing::warn!(mountpoint = %target.display(), %error, "could not unmount");
                }
            }
        }
        if let Some(slot) = self.slot {
            self.session.table().remove(slot);
        }
    }
}
