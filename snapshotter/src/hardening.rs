//! Keeping plaintext to root. Directories only root may enter: the daemon's root holds the
//! mount points of decrypted layers and the snapshots' files; a disk cache holds ciphertext,
//! but its names and sizes tell which chunks a node has read. Each is created `0700` whatever
//! the process umask, and one found with group or other bits is tightened (and logged), as
//! containerd keeps its snapshotter roots. And no core dumps: a dump would write the memory
//! cache's plaintext, decrypted indexes (file names) and key schedules to disk. Depends on
//! nothing else in the crate.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Mode of every private directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents, each `0700`) or, if it exists, removes its group and
/// other permission bits. A directory that anyone may write to and that has the sticky bit
/// (`/tmp`-like) is shared by design: it is refused rather than changed.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if mode & 0o1002 == 0o1002 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is a shared directory (mode {mode:04o}, sticky and world-writable); \
                 give sealfs a directory of its own",
                dir.display()
            ),
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    tracing::warn!(dir = %dir.display(), was = format!("{mode:04o}"), "tightened directory permissions to 0700: only root may enter it");
    Ok(())
}

/// Sets the process umask to `077`, so everything created from now on (files, sockets at bind
/// time, directories) is private unless its mode is set explicitly. Returns the old umask.
pub fn restrict_umask() -> u32 {
    // SAFETY: umask only swaps the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) as u32 }
}

/// Makes sure this process never writes a core dump: not dumpable (which also keeps other
/// users' debuggers and /proc readers out) and a core size limit of 0, which covers a
/// `suid_dumpable = 2` node and core-pattern handlers that honour the limit.
pub fn disable_core_dumps() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) changes a process flag and reads no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `none` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_and_tightens_what_others_could_enter() {
        let temp = tempfile::tempdir().unwrap();
        let fresh = temp.path().join("a/b");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(mode_of(&fresh), 0o700);
        assert_eq!(
            mode_of(&temp.path().join("a")),
            0o700,
            "created parents too"
        );

        let open = temp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&open).unwrap();
        assert_eq!(mode_of(&open), 0o700);

        let shared = temp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let error = ensure_private_dir(&shared).unwrap_err();
        assert!(error.to_string().contains("shared directory"), "{error}");
        assert_eq!(mode_of(&shared), 0o1777, "left as it was");
    }
}
