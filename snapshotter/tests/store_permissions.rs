//! Modes of the snapshot store's directories, whatever the process umask (containerd's suite
//! case RootPermission, and the trust boundary: only root may enter the store). A test binary
//! of its own, because the umask is process-wide.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use snapshotter::snapshot::SnapshotStore;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn store_directories_are_private_and_a_snapshot_root_is_0755_under_any_umask() {
    for umask in [0o000, 0o022, 0o077] {
        // SAFETY: umask swaps the process-wide mask; this binary runs only this test.
        let old = unsafe { libc::umask(umask) };
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        // An existing root that others could enter is tightened, not trusted.
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let store = SnapshotStore::open(&root).unwrap();
        store.prepare("active", None, BTreeMap::new()).unwrap();
        let mounts = store.mounts("active").unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };

        assert_eq!(mode(&root), 0o700, "root under umask {umask:03o}");
        assert_eq!(mode(&root.join("snapshots")), 0o700, "umask {umask:03o}");
        let fs_dir = Path::new(&mounts[0].source);
        assert!(fs_dir.ends_with("fs"), "{fs_dir:?}");
        assert_eq!(
            mode(fs_dir),
            0o755,
            "a container's root dir, umask {umask:03o}"
        );
        assert_eq!(mode(fs_dir.parent().unwrap()), 0o700, "umask {umask:03o}");
    }
}
