//! One FUSE session: a `/dev/fuse` connection mounted at a directory and served by a fixed
//! number of threads, for a [`LayerTable`] of any number of layers.
//!
//! The session mounts with mount(2) itself and hands fuser the descriptor (`from_fd`) rather
//! than letting fuser mount: the session then owns both ends, so ending it is one well-defined
//! sequence (lazy unmount, abort the connection, join the threads) with nothing left to fail
//! later, and the descriptor is the one thing a restart needs to keep
//! ([`crate::session_keeper`]).
//!
//! A restarted daemon *resumes* a kept connection ([`FuseSession::resume`]): the kernel
//! negotiated it with the daemon that mounted it, so no INIT comes again, but fuser always
//! starts a session with the INIT handshake. The resumed session therefore hands fuser one end
//! of a socket pair holding a replayed INIT, lets it handshake there, and then points that
//! descriptor number at the kept connection (dup3) before any thread reads it: fuser has no
//! way to attach to an initialised connection, and this keeps its whole request loop rather
//! than a patched copy of it.
//!
//! How threads read requests depends on the kernel ([`Serving`]): where it can resend the
//! requests a dead daemon had read (`FUSE_NOTIFY_RESEND`, Linux 6.9), every thread reads the
//! kept descriptor itself, so those requests stay queued on it and the next daemon asks for
//! them again; elsewhere threads read clones of it, whose close fails exactly the requests
//! they held (ECONNABORTED) rather than leaving them waiting for ever.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::BackgroundSession;

use super::{FuseAdapter, MAX_READ};
use crate::fs::table::{LayerTable, Slot};
use crate::mount_table::{self, MountRestrictions};

/// How to mount a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Request threads for every layer of the session.
    pub threads: usize,
    /// Serve [`Serving::Shared`] where the kernel can resend requests; `false`: always
    /// [`Serving::Cloned`] (as on kernels before 6.9, or to work around one whose resend
    /// misbehaves).
    pub resend: bool,
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    /// Mount flags (nosuid, nodev, noexec).
    pub restrictions: MountRestrictions,
}

/// How a session's threads read its requests (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    /// Every thread reads the connection's descriptor; the kernel resends what a dead daemon
    /// had read.
    Shared,
    /// Threads read clones of the descriptor; a dead daemon's requests fail.
    Cloned,
}

/// A mounted FUSE session (see the module docs). Dropping it unmounts it, lazily if a file is
/// still open, and ends the connection, so no thread waits on a reader; unless it is
/// [kept](FuseSession::keep_for_restart) for the next daemon.
pub struct FuseSession {
    table: Arc<LayerTable>,
    mountpoint: PathBuf,
    /// The connection: what the session keeper holds a copy of.
    device: OwnedFd,
    serving: Serving,
    /// A resumed session not yet serving ([`FuseSession::start`]).
    pending: Mutex<Option<fuser::Session<FuseAdapter>>>,
    running: Mutex<Option<BackgroundSession>>,
    /// The connection's id in the FUSE control filesystem.
    connection: Mutex<Option<u64>>,
    /// Left mounted and connected when this process ends.
    kept: AtomicBool,
    resumed: bool,
}

impl FuseSession {
    /// Mounts `table` read-only at `mountpoint` and starts serving it.
    pub fn mount(
        table: Arc<LayerTable>,
        mountpoint: &Path,
        config: &SessionConfig,
    ) -> io::Result<Self> {
        let device = open_dev_fuse()?;
        mount_fuse(&device, mountpoint, config)?;
        // Nothing has been read yet, so asking for a resend only tells whether it works.
        let serving = choose_serving(device.as_fd(), config);
        let handshake = device.try_clone().and_then(|fuser_fd| {
            fuser::Session::from_fd(
                FuseAdapter::new(table.clone()),
                fuser_fd,
                fuser::SessionACL::All,
                fuser_options(config, serving),
            )
        });
        let started = handshake.and_then(|session| {
            if serving == Serving::Cloned {
                // The kept descriptor itself never reads a request (module docs).
                redirect(
                    session.as_fd().as_raw_fd(),
                    clone_device(device.as_fd())?.as_fd(),
                )?;
            }
            session.spawn()
        });
        let session = match started {
            Ok(session) => session,
            Err(error) => {
                let _ = mount_table::unmount(mountpoint);
                return Err(error);
            }
        };
        // Only now: until the handshake answered INIT, any look at the mount blocks.
        let connection = mount_table::fuse_connection(mountpoint);
        raise_readahead(mountpoint);
        Ok(FuseSession {
            table,
            mountpoint: mountpoint.to_path_buf(),
            device,
            serving,
            pending: Mutex::new(None),
            running: Mutex::new(Some(session)),
            connection: Mutex::new(connection),
            kept: AtomicBool::new(false),
            resumed: false,
        })
    }

    /// Takes over the kept connection `device`, mounted at `mountpoint` by an earlier daemon,
    /// for `table`. Requests that daemon had read are asked for again now; none is answered
    /// until [`FuseSession::start`], so the table can be filled first.
    pub fn resume(
        table: Arc<LayerTable>,
        device: OwnedFd,
        mountpoint: &Path,
        config: &SessionConfig,
    ) -> io::Result<Self> {
        let serving = choose_serving(device.as_fd(), config);
        let (replay, fuser_end) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        nix::unistd::write(&replay, &replayed_init())?;
        let session = fuser::Session::from_fd(
            FuseAdapter::new(table.clone()),
            fuser_end,
            fuser::SessionACL::All,
            fuser_options(config, serving),
        )?;
        // fuser's INIT reply went to the socket pair; from here its descriptor number is the
        // connection (or a clone of it).
        let fuser_fd = session.as_fd().as_raw_fd();
        match serving {
            Serving::Shared => redirect(fuser_fd, device.as_fd())?,
            Serving::Cloned => redirect(fuser_fd, clone_device(device.as_fd())?.as_fd())?,
        }
        drop(replay);
        Ok(FuseSession {
            table,
            mountpoint: mountpoint.to_path_buf(),
            device,
            serving,
            pending: Mutex::new(Some(session)),
            running: Mutex::new(None),
            connection: Mutex::new(None),
            kept: AtomicBool::new(false),
            resumed: true,
        })
    }

    /// Starts serving a resumed session (a no-op for one already serving).
    pub fn start(&self) -> io::Result<()> {
        let Some(session) = self.pending.lock().expect("session lock").take() else {
            return Ok(());
        };
        *self.running.lock().expect("session lock") = Some(session.spawn()?);
        *self.connection.lock().expect("session lock") =
            mount_table::fuse_connection(&self.mountpoint);
        Ok(())
    }

    /// The connection's descriptor, for the session keeper.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// How its threads read requests.
    pub fn serving(&self) -> Serving {
        self.serving
    }

    /// Whether it took over a connection an earlier daemon mounted.
    pub fn is_resumed(&self) -> bool {
        self.resumed
    }

    /// Leaves the mount and the connection as they are when this session is dropped (the
    /// process is about to exit, and the next daemon resumes it).
    pub fn keep_for_restart(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// The layers it serves.
    pub fn table(&self) -> &Arc<LayerTable> {
        &self.table
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The directory of the layer at `slot`.
    pub fn layer_dir(&self, slot: Slot) -> PathBuf {
        self.mountpoint.join(slot.dir_name())
    }
}

impl Drop for FuseSession {
    fn drop(&mut self) {
        let session = self.running.get_mut().expect("session lock").take();
        if self.kept.load(Ordering::SeqCst) {
            // Its threads are blocked reading the connection; they end with the process,
            // and what they had read is asked for again by the next daemon.
            std::mem::forget(session);
            return;
        }
        let Some(session) = session else {
            return;
        };
        if mount_table::is_mounted(&self.mountpoint) {
            // Lazily: a plain unmount fails with EBUSY while a file on the mount is open.
            if let Err(error) = mount_table::unmount(&self.mountpoint) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "could not unmount");
            }
        }
        // Aborting the connection ends the session threads now, open files or not, so the
        // join below cannot wait on a reader; without the control filesystem the session
        // ends when the last open file closes, and the threads are left to end then.
        match *self.connection.get_mut().expect("session lock") {
            Some(id) if mount_table::abort_fuse_connection(id) => {
                let _ = session.join();
            }
            _ => drop(session),
        }
    }
}

fn fuser_options(config: &SessionConfig, serving: Serving) -> fuser::Config {
    let mut options = fuser::Config::default();
    // Containers run as any user; permissions are checked by the kernel
    // (default_permissions), and the listing root is root's only.
    options.acl = fuser::SessionACL::All;
    options.n_threads = Some(config.threads.max(1));
    options.clone_fd = serving == Serving::Cloned;
    options
}

/// [`Serving::Shared`] if `config` wants resends and the kernel has them.
fn choose_serving(device: BorrowedFd<'_>, config: &SessionConfig) -> Serving {
    if config.resend {
        probe_serving(device)
    } else {
        Serving::Cloned
    }
}

/// `FUSE_NOTIFY_RESEND`: the kernel queues again every request read from the connection and
/// not answered. Whether the kernel has it (Linux 6.9; older ones refuse the code).
fn probe_serving(device: BorrowedFd<'_>) -> Serving {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // fuse_out_header: len, error (the notification code), unique 0 (a notification).
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    match nix::unistd::write(device, &header) {
        Ok(16) => Serving::Shared,
        Ok(_) | Err(_) => Serving::Cloned,
    }
}

/// An INIT request as the kernel sends it (7.31, the capabilities [`FuseAdapter`] asks for),
/// for the handshake of a resumed session (module docs).
fn replayed_init() -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    const HEADER: usize = 40;
    const INIT_IN: usize = 64;
    let capabilities: u32 = (1 << 13) | (1 << 18) | (1 << 22) | (1 << 23);
    let mut message = Vec::with_capacity(HEADER + INIT_IN);
    let u32s = |message: &mut Vec<u8>, values: &[u32]| {
        for value in values {
            message.extend_from_slice(&value.to_ne_bytes());
        }
    };
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen + padding.
    u32s(&mut message, &[(HEADER + INIT_IN) as u32, FUSE_INIT]);
    message.extend_from_slice(&1u64.to_ne_bytes());
    message.extend_from_slice(&0u64.to_ne_bytes());
    u32s(&mut message, &[0, 0, 0, 0]);
    // fuse_init_in: major, minor, max_readahead, flags, then flags2 and unused words.
    u32s(&mut message, &[7, 31, MAX_READ, capabilities]);
    message.resize(HEADER + INIT_IN, 0);
    message
}

/// Makes descriptor number `target` refer to `source`'s open file.
fn redirect(target: RawFd, source: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: dup3 replaces the descriptor `target` atomically; the caller owns it (fuser's
    // session, not yet reading) and `source` stays open for the call.
    if unsafe { libc::dup3(source.as_raw_fd(), target, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new descriptor of the same connection (`FUSE_DEV_IOC_CLONE`) with a request queue of its
/// own.
fn clone_device(device: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500; // _IOR(229, 0, uint32_t)
    let clone = open_dev_fuse()?;
    let mut source = device.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 (the descriptor to clone) from a live local.
    if unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut source) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

fn open_dev_fuse() -> io::Result<OwnedFd> {
    let path = c"/dev/fuse";
    // SAFETY: a static NUL-terminated path; the returned descriptor is checked, then owned.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("opening /dev/fuse: {error}"),
        ));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// mount(2) of a FUSE filesystem on `device`, as fusermount would do it for root.
fn mount_fuse(device: &OwnedFd, mountpoint: &Path, config: &SessionConfig) -> io::Result<()> {
    let fail = |error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("mounting FUSE at {}: {error}", mountpoint.display()),
        )
    };
    let c = |bytes: &[u8]| CString::new(bytes).map_err(|_| fail(io::Error::other("NUL byte")));
    let source = c(config.fs_name.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.sealfs")?;
    let data = c(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_READ}",
        device.as_raw_fd()
    )
    .as_bytes())?;
    let flags = libc::MS_RDONLY | libc::MS_NOATIME | config.restrictions.flags();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(fail(io::Error::last_os_error()));
    }
    Ok(())
}

/// The kernel's readahead for a FUSE mount defaults to 128 KiB; chunk-sized readahead turns a
/// sequential read into one request per chunk. Best effort: a failure only costs speed.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(error) = std::fs::write(&path, (MAX_READ / 1024).to_string()) {
        tracing::debug!(%path, %error, "could not raise readahead");
    }
}
