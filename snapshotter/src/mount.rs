//! Mounting sealed images: open a layer (unwrap its key with the node's identities, verify its
//! index against the digest pinned by the manifest), serve it with FUSE, and for a whole image
//! stack the layers read-only with overlayfs, as a container would see them.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsformat::keywrap::unwrap_layer_key;
use fsformat::oci::{SealedLayerAnnotations, MEDIA_TYPE_SEALED_LAYER};
use fsformat::reader::{SealedLayer, UnverifiedTail};
use fsformat::{FormatError, Identity, LayerKey, PrivateKey};
use oci_spec::image::Descriptor;

use crate::cache::{DiskCache, MemoryCache};
use crate::fetcher::{FetchConfig, LayerFetcher};
use crate::fs::LayerFs;
use crate::fuse::MountConfig;
use crate::oci_layout::{LayoutError, OciLayout};
use crate::source::{ChunkSource, LocalBlob};

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
    /// Fetching.
    pub fetch: FetchConfig,
    /// FUSE request threads per layer.
    pub fuse_threads: usize,
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

/// Mount flags that keep an untrusted image's setuid files, device nodes and programs inert.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountRestrictions {
    /// `nosuid` and `nodev`: setuid/setgid bits and file capabilities are ignored, device
    /// nodes cannot be opened.
    pub nosuid_nodev: bool,
    /// `noexec`: nothing on the mount can be executed.
    pub noexec: bool,
}

impl MountRestrictions {
    /// What every inspection mount gets: `nosuid,nodev`, and `noexec` if asked for.
    pub fn inspection(noexec: bool) -> Self {
        MountRestrictions {
            nosuid_nodev: true,
            noexec,
        }
    }

    /// The mount(2) flags.
    fn flags(self) -> libc::c_ulong {
        let mut flags = 0;
        if self.nosuid_nodev {
            flags |= libc::MS_NOSUID | libc::MS_NODEV;
        }
        if self.noexec {
            flags |= libc::MS_NOEXEC;
        }
        flags
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fetch: FetchConfig::default(),
            fuse_threads: 8,
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
}

/// Opens the sealed layer `descriptor` of `layout` with the first identity that can.
pub fn open_layer(
    layout: &OciLayout,
    descriptor: &Descriptor,
    identities: &[PrivateKey],
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
    identities: &[PrivateKey],
) -> Result<(SealedLayerAnnotations, LayerKey), MountError> {
    let digest = descriptor.digest().to_string();
    if descriptor.media_type().to_string() != MEDIA_TYPE_SEALED_LAYER {
        return Err(MountError::NotSealed {
            digest,
            media_type: descriptor.media_type().to_string(),
        });
    }
    let layer_error = |source| MountError::Layer {
        digest: digest.clone(),
        source,
    };
    let annotations = descriptor.annotations().clone().unwrap_or_default();
    let facts = SealedLayerAnnotations::read_from(&annotations).map_err(layer_error)?;
    let ids: Vec<&dyn Identity> = identities.iter().map(|k| k as &dyn Identity).collect();
    let key = unwrap_layer_key(&ids, &facts.stanzas).map_err(layer_error)?;
    Ok((facts, key))
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
    let layer_error = |source| MountError::Layer {
        digest: digest.clone(),
        source,
    };
    let too_large = |size| MountError::IndexTooLarge {
        digest: digest.clone(),
        size,
        limit: max_index_bytes,
    };
    let size = descriptor.size();
    if facts.index_size > max_index_bytes {
        return Err(too_large(facts.index_size));
    }
    if facts.index_size > size {
        return Err(layer_error(FormatError::BadFooter(format!(
            "index size {} is larger than the blob",
            facts.index_size
        ))));
    }
    let tail = source
        .read_range(size - facts.index_size, facts.index_size as usize)
        .map_err(|source| MountError::Source {
            digest: digest.clone(),
            source,
        })?;
    let tail = UnverifiedTail::from_pinned(size, tail, &facts.index_digest).map_err(layer_error)?;
    let plain_len = u64::from(tail.footer().index_plain_len);
    if plain_len > max_index_bytes {
        return Err(too_large(plain_len));
    }
    Ok(tail)
}

/// Opens a sealed layer whose blob is read through `source` (a local file, a registry): unwraps
/// its key with the first identity that can, fetches the tail with one range read and verifies
/// it against the digest the descriptor pins.
pub fn open_sealed_layer(
    descriptor: &Descriptor,
    source: Arc<dyn ChunkSource>,
    identities: &[PrivateKey],
    max_index_bytes: u64,
) -> Result<OpenedLayer, MountError> {
    let (facts, key) = unwrap_layer(descriptor, identities)?;
    let tail = read_tail(descriptor, &facts, &*source, max_index_bytes)?;
    let digest = descriptor.digest().to_string();
    let layer = tail
        .open(&key, &facts.index_digest)
        .map_err(|source| MountError::Layer {
            digest: digest.clone(),
            source,
        })?;
    Ok(OpenedLayer {
        digest,
        layer: Arc::new(layer),
        source,
    })
}

/// Default for [`MountOptions::max_index_bytes`]: 64 MiB holds the index of a layer with
/// about a million files, and bounds what a hostile descriptor or footer can make a node
/// allocate before anything is authenticated.
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 64 << 20;

/// Builds the filesystem of an opened layer: fetcher, caches, background fetch.
pub fn layer_fs(
    opened: &OpenedLayer,
    key: u64,
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

/// The filesystems of an image's layers (`opened`, bottom first), sharing `memory`. A
/// directory a layer's tar left implicit shows the metadata the layers below give it, as
/// extracting the layers in order would.
pub fn image_filesystems(
    opened: &[OpenedLayer],
    memory: &Arc<MemoryCache>,
    options: &MountOptions,
) -> Result<Vec<LayerFs>, MountError> {
    let mut filesystems = Vec::with_capacity(opened.len());
    for (number, layer) in opened.iter().enumerate() {
        let mut fs = layer_fs(layer, number as u64, memory.clone(), options)?;
        let lowers: Vec<_> = opened[..number].iter().rev().map(|l| &*l.layer).collect();
        fs.inherit_implicit_dirs(&lowers);
        filesystems.push(fs);
    }
    Ok(filesystems)
}

/// Mounts each of `filesystems` (bottom first, of the layers `opened`) at `dir/0`, `dir/1`, ...
/// Returns the mounts and the overlayfs lower dirs that stack them (topmost first).
pub fn mount_each(
    filesystems: Vec<LayerFs>,
    opened: &[OpenedLayer],
    dir: &Path,
    options: &MountOptions,
) -> Result<(Vec<MountedLayer>, Vec<PathBuf>), MountError> {
    // The layers' own mount points show plaintext: only root may reach them.
    crate::hardening::ensure_private_dir(dir).map_err(|source| MountError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let mut layers = Vec::with_capacity(filesystems.len());
    for (number, fs) in filesystems.into_iter().enumerate() {
        let point = dir.join(number.to_string());
        std::fs::create_dir_all(&point).map_err(|source| MountError::Io {
            what: format!("creating {}", point.display()),
            source,
        })?;
        layers.push(MountedLayer::mount(
            fs,
            &point,
            options,
            &opened[number].digest,
        )?);
    }
    let lowers = layers.iter().rev().map(|l| l.mountpoint.clone()).collect();
    Ok((layers, lowers))
}

/// One layer served over FUSE.
pub struct MountedLayer {
    /// The filesystem (progress, statistics).
    pub fs: Arc<LayerFs>,
    session: Option<fuser::BackgroundSession>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

impl MountedLayer {
    /// Mounts `fs` at `mountpoint`.
    pub fn mount(
        fs: LayerFs,
        mountpoint: &Path,
        options: &MountOptions,
        name: &str,
    ) -> Result<Self, MountError> {
        let fs = Arc::new(fs);
        let config = MountConfig {
            threads: options.fuse_threads,
            fs_name: format!("sealfs:{name}"),
            nosuid_nodev: options.restrictions.nosuid_nodev,
            noexec: options.restrictions.noexec,
        };
        let session = crate::fuse::mount(fs.clone(), mountpoint, &config).map_err(|source| {
            MountError::Io {
                what: format!("mounting FUSE at {}", mountpoint.display()),
                source,
            }
        })?;
        Ok(MountedLayer {
            fs,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if !is_mounted(&self.mountpoint) {
            // Unmounted already (by `umount`): the session has ended or is ending.
            let _ = session.join();
            return;
        }
        // Read before detaching: afterwards the path no longer leads to the FUSE mount.
        let connection = fuse_connection(&self.mountpoint);
        // Lazily: a plain unmount fails with EBUSY while a file on the mount is still open.
        if let Err(error) = unmount(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "could not unmount");
        }
        // Aborting the connection ends the session threads now, open files or not, so the
        // join below cannot wait on a reader; without the control filesystem the session
        // ends when the last open file closes.
        match connection {
            Some(id) if abort_fuse_connection(id) => {
                let _ = session.join();
            }
            _ => drop(session),
        }
    }
}

/// The FUSE control-filesystem id of the FUSE filesystem mounted at `mountpoint`, if that is
/// what is mounted there (checked by its statfs magic, so no other connection is touched).
fn fuse_connection(mountpoint: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;
    let path = CString::new(mountpoint.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain data filled by the kernel; `path` is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and output struct for the duration of the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0
        || stat.f_type as libc::c_long != FUSE_SUPER_MAGIC
    {
        return None;
    }
    let dev = std::fs::metadata(mountpoint).ok()?.dev();
    // FUSE superblocks use anonymous devices (major 0); the control directory is the minor.
    (libc::major(dev) == 0).then(|| u64::from(libc::minor(dev)))
}

/// Aborts FUSE connection `id` through /sys/fs/fuse/connections, mounting the control
/// filesystem there if nothing has. Whether it worked.
fn abort_fuse_connection(id: u64) -> bool {
    let control = Path::new("/sys/fs/fuse/connections");
    let abort = control.join(id.to_string()).join("abort");
    if !abort.exists() {
        let (source, target, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: static NUL-terminated strings; no data argument.
        unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    std::fs::write(&abort, "1").is_ok()
}

/// Mounts a read-only overlay of `lowers` (topmost first) at `target` for inspection, with
/// `restrictions` (see [`MountRestrictions::inspection`]).
pub fn mount_overlay(
    lowers: &[PathBuf],
    target: &Path,
    restrictions: MountRestrictions,
) -> Result<(), MountError> {
    overlay(lowers, None, target, restrictions.flags())
}

/// Mounts a writable overlay of `lowers` (topmost first) with `upper` and `work` (empty
/// directories on one filesystem) at `target`.
pub fn mount_overlay_writable(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), MountError> {
    overlay(lowers, Some((upper, work)), target, 0)
}

fn overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    flags: libc::c_ulong,
) -> Result<(), MountError> {
    let joined: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut data = format!("lowerdir={}", joined.join(":"));
    if let Some((upper, work)) = upper {
        data += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    let fail = |source| MountError::Io {
        what: format!("mounting overlay at {}", target.display()),
        source,
    };
    let c =
        |s: &[u8]| CString::new(s).map_err(|_| fail(io::Error::other("path contains a NUL byte")));
    let (source, target_c, fstype, data_c) = (
        c(b"sealfs")?,
        c(target.as_os_str().as_bytes())?,
        c(b"overlay")?,
        c(data.as_bytes())?,
    );
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags | if upper.is_some() { 0 } else { libc::MS_RDONLY },
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

/// Unmounts `target` (lazily if busy, so a crashed reader cannot pin it).
pub fn unmount(target: &Path) -> io::Result<()> {
    let c =
        CString::new(target.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in path"))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `target` is a mount point in this mount namespace.
pub fn is_mounted(target: &Path) -> bool {
    let Ok(target) = target.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines().any(|line| {
                line.split(' ')
                    .nth(4)
                    .is_some_and(|point| unescape_mountinfo(point) == target.as_os_str().as_bytes())
            })
        })
        .unwrap_or(false)
}

fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Signals that end a mount process cleanly (unmount, then exit).
const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks the termination signals in the calling thread and every thread it starts later, so
/// that [`wait_until_unmounted`] receives them instead of the process dying with its mounts
/// left behind. Call before any thread exists.
pub fn block_termination_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Why [`wait_until_unmounted`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Someone unmounted the target.
    Unmounted,
    /// A termination signal arrived (the caller unmounts).
    Signalled(i32),
}

/// Blocks until `target` is no longer mounted or a termination signal (blocked with
/// [`block_termination_signals`]) arrives. Waits on `/proc/self/mountinfo` (POLLPRI, which the
/// kernel raises on every mount table change) and a signalfd: no polling loop with sleeps.
pub fn wait_until_unmounted(target: &Path) -> io::Result<WaitOutcome> {
    use std::io::{Read, Seek};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mountinfo = std::fs::File::open("/proc/self/mountinfo")?;
    // SAFETY: as in block_termination_signals; signalfd returns a new descriptor we own.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION {
            libc::sigaddset(&mut set, signal);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    loop {
        if !is_mounted(target) {
            return Ok(WaitOutcome::Unmounted);
        }
        let mut fds = [
            libc::pollfd {
                fd: mountinfo.as_raw_fd(),
                events: libc::POLLPRI | libc::POLLERR,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
            continue;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            let mut file = std::fs::File::from(signals.try_clone()?);
            file.read_exact(&mut info)?;
            let signal = u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32;
            return Ok(WaitOutcome::Signalled(signal));
        }
        // Re-arm: the event stays signalled until the file is read from the start again.
        let mut reader = &mountinfo;
        reader.seek(io::SeekFrom::Start(0))?;
        reader.read_to_end(&mut Vec::new())?;
    }
}
