//! One FUSE session: a `/dev/fuse` connection mounted at a directory and served by a fixed
//! number of threads, for a [`LayerTable`] of any number of layers.
//!
//! The session mounts with mount(2) itself and hands fuser the descriptor (`from_fd`) rather
//! than letting fuser mount: the session then owns both ends, so ending it is one well-defined
//! sequence (lazy unmount, abort the connection, join the threads) with nothing left to fail
//! later, and the descriptor is the one thing a restart would need to keep.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::BackgroundSession;

use super::{FuseAdapter, MAX_READ};
use crate::fs::table::{LayerTable, Slot};
use crate::mount_table::{self, MountRestrictions};

/// How to mount a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Request threads for every layer of the session.
    pub threads: usize,
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    /// Mount flags (nosuid, nodev, noexec).
    pub restrictions: MountRestrictions,
}

/// A mounted FUSE session (see the module docs). Dropping it unmounts it, lazily if a file is
/// still open, and ends the connection, so no thread waits on a reader.
pub struct FuseSession {
    table: Arc<LayerTable>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    /// The connection's id in the FUSE control filesystem.
    connection: Option<u64>,
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
        let mut options = fuser::Config::default();
        // Containers run as any user; permissions are checked by the kernel
        // (default_permissions), and the listing root is root's only.
        options.acl = fuser::SessionACL::All;
        options.n_threads = Some(config.threads.max(1));
        options.clone_fd = true;
        let started = fuser::Session::from_fd(
            FuseAdapter::new(table.clone()),
            device,
            fuser::SessionACL::All,
            options,
        )
        .and_then(|session| session.spawn());
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
            session: Some(session),
            connection,
        })
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
        let Some(session) = self.session.take() else {
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
        match self.connection {
            Some(id) if mount_table::abort_fuse_connection(id) => {
                let _ = session.join();
            }
            _ => drop(session),
        }
    }
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
