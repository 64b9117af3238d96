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
/// what is mounted there (the topmost mount). Read from the mount table alone: asking the
/// filesystem itself (statfs, stat) would wait for ever on a session nobody serves, which is
/// exactly when a connection needs to be found and aborted.
pub fn fuse_connection(mountpoint: &Path) -> Option<u64> {
    let mountpoint = resolve_parent(mountpoint)?;
    let entry = mount_entries()
        .into_iter()
        .rfind(|entry| entry.point == mountpoint)?;
    // FUSE superblocks use anonymous devices (major 0); the control directory is the minor.
    (entry.fstype.starts_with("fuse") && entry.major == 0).then_some(u64::from(entry.minor))
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

/// Whether `target` is a mount point in this mount namespace. Only `target`'s parent is
/// resolved on the filesystem: `target` itself may be a FUSE mount nobody serves.
pub fn is_mounted(target: &Path) -> bool {
    let Some(target) = resolve_parent(target) else {
        return false;
    };
    mount_entries().iter().any(|entry| entry.point == target)
}

/// The mount points under `root` of filesystems of type `fstype` (as /proc/self/mountinfo
/// names it, e.g. `fuse.sealfs`), deepest first, so each can be unmounted in turn.
pub fn mounts_under(root: &Path, fstype: &str) -> Vec<PathBuf> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut found: Vec<PathBuf> = mount_entries()
        .into_iter()
        .filter(|entry| entry.fstype == fstype && entry.point.starts_with(&root))
        .map(|entry| entry.point)
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    found.dedup();
    found
}

/// `path` with its parent directory resolved (symlinks, `..`) and its last component kept as
/// it is, so nothing mounted at `path` is asked anything.
fn resolve_parent(path: &Path) -> Option<PathBuf> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Some(parent.canonicalize().ok()?.join(name))
        }
        // `/` (or a path ending in `..`): nothing above it can be a FUSE mount of ours.
        _ => path.canonicalize().ok(),
    }
}

/// One line of /proc/self/mountinfo, the fields sealfs uses.
struct MountEntry {
    point: PathBuf,
    major: u32,
    minor: u32,
    fstype: String,
}

/// This mount namespace's mounts, in mount order (a later one at the same point is on top).
fn mount_entries() -> Vec<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().filter_map(parse_mountinfo_line).collect()
}

/// `ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let device = fields.nth(2)?;
    let point = fields.nth(1)?;
    let (major, minor) = device.split_once(':')?;
    let (_, tail) = line.split_once(" - ")?;
    Some(MountEntry {
        point: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(point))),
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        fstype: tail.split(' ').next()?.to_string(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_point_device_and_type_past_optional_fields_and_escapes() {
        let line = "912 29 0:58 / /var/lib/sealfs/snapshots/7/my\\040fs rw,nosuid shared:5 \
                    master:1 - fuse.sealfs sealfs:node rw,user_id=0";
        let entry = parse_mountinfo_line(line).unwrap();
        assert_eq!(entry.point, Path::new("/var/lib/sealfs/snapshots/7/my fs"));
        assert_eq!((entry.major, entry.minor), (0, 58));
        assert_eq!(entry.fstype, "fuse.sealfs");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn a_path_is_resolved_up_to_its_parent_only() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        // `missing` does not exist (or could be a dead mount): it is not looked at.
        assert_eq!(
            resolve_parent(&real.join("link/missing")).unwrap(),
            real.join("missing")
        );
        assert!(is_mounted(Path::new("/proc")));
        assert!(!is_mounted(&real.join("missing")));
    }
}
