//! The kernel's mount table, as sealfs uses it: overlay and bind mounts, lazy unmounts,
//! whether a path is a mount point (from `/proc/self/mountinfo`), and aborting a FUSE
//! connection through the FUSE control filesystem. Plain syscalls, no sealfs types above.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    pub fn flags(self) -> libc::c_ulong {
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

/// The FUSE control-filesystem id of the FUSE filesystem mounted at `mountpoint`, if that is
/// what is mounted there (checked by its statfs magic, so no other connection is touched).
pub fn fuse_connection(mountpoint: &Path) -> Option<u64> {
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
pub fn abort_fuse_connection(id: u64) -> bool {
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
) -> io::Result<()> {
    overlay(lowers, None, target, restrictions.flags())
}

/// Mounts a writable overlay of `lowers` (topmost first) with `upper` and `work` (empty
/// directories on one filesystem) at `target`.
pub fn mount_overlay_writable(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> io::Result<()> {
    overlay(lowers, Some((upper, work)), target, 0)
}

fn overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let joined: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut data = format!("lowerdir={}", joined.join(":"));
    if let Some((upper, work)) = upper {
        data += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    let fail = |error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("mounting overlay at {}: {error}", target.display()),
        )
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

/// Bind-mounts `source` (a directory) at `target`.
pub fn bind(source: &Path, target: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in path"))
    };
    let (source_c, target_c) = (c(source)?, c(target)?);
    // SAFETY: valid NUL-terminated paths that outlive the call; no filesystem type or data.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches every mount stacked at `target` (lazily), dead ones included: a FUSE mount whose
/// daemon died answers every lookup with ENOTCONN, so it cannot be found by path first.
/// Returns how many were detached.
pub fn detach_all(target: &Path) -> usize {
    let mut detached = 0;
    // Bounded: a path holds few stacked mounts; a stuck one must not spin forever.
    while detached < 64 && unmount(target).is_ok() {
        detached += 1;
    }
    detached
}
