//! The snapshot store against real overlayfs and bind mounts, following the core cases of
//! containerd's snapshotter test suite (core/snapshots/testsuite). Needs root.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use snapshotter::snapshot::{Kind, Mount, SnapshotError, SnapshotStore};

fn root() -> bool {
    let root = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the snapshot tests need root in CI"
        );
        eprintln!("skipping: not root");
    }
    root
}

/// Mounts what the store says at `target` (as containerd would), runs `f`, unmounts.
fn with_mounted(mounts: &[Mount], target: &Path, f: impl FnOnce(&Path)) {
    fs::create_dir_all(target).unwrap();
    let mount = &mounts[0];
    let status = Command::new("mount")
        .args(["-t", &mount.kind, "-o", &mount.options.join(",")])
        .arg(&mount.source)
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mount {mount:?}");
    f(target);
    assert!(Command::new("umount")
        .arg(target)
        .status()
        .unwrap()
        .success());
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn prepare_commit_view_and_remove_like_containerd() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&dir.path().join("state")).unwrap();
    let target = dir.path().join("mnt");

    // A base layer: active, no parent, a writable bind mount.
    let mounts = store.prepare("extract-1", None, labels(&[])).unwrap();
    assert_eq!(mounts[0].kind, "bind");
    with_mounted(&mounts, &target, |m| {
        fs::write(m.join("base.txt"), "base").unwrap();
        fs::create_dir(m.join("etc")).unwrap();
        fs::write(m.join("etc/gone"), "deleted in layer 2").unwrap();
    });
    assert!(store.usage("extract-1").unwrap().size > 0);
    store
        .commit(
            "layer-1",
            "extract-1",
            labels(&[("containerd.io/snapshot.ref", "layer-1")]),
        )
        .unwrap();
    assert!(matches!(
        store.stat("extract-1"),
        Err(SnapshotError::NotFound(_))
    ));
    let info = store.stat("layer-1").unwrap();
    assert_eq!((info.kind, info.parent.as_deref()), (Kind::Committed, None));
    assert_eq!(info.labels["containerd.io/snapshot.ref"], "layer-1");

    // A second layer on it: overlay with an upper dir; deleting makes a whiteout there.
    let mounts = store
        .prepare("extract-2", Some("layer-1"), labels(&[]))
        .unwrap();
    assert_eq!(mounts[0].kind, "overlay");
    with_mounted(&mounts, &target, |m| {
        assert_eq!(fs::read_to_string(m.join("base.txt")).unwrap(), "base");
        fs::write(m.join("second.txt"), "second").unwrap();
        fs::remove_file(m.join("etc/gone")).unwrap();
    });
    store.commit("layer-2", "extract-2", labels(&[])).unwrap();

    // A read-only view of the top sees the merged tree.
    let mounts = store.view("view-1", Some("layer-2"), labels(&[])).unwrap();
    with_mounted(&mounts, &target, |m| {
        assert_eq!(fs::read_to_string(m.join("base.txt")).unwrap(), "base");
        assert_eq!(fs::read_to_string(m.join("second.txt")).unwrap(), "second");
        assert!(!m.join("etc/gone").exists());
        assert!(
            fs::write(m.join("new"), "x").is_err(),
            "a view is read-only"
        );
    });
    // An active snapshot on the top layer: the container's rootfs.
    let mounts = store
        .prepare("container-1", Some("layer-2"), labels(&[]))
        .unwrap();
    with_mounted(&mounts, &target, |m| {
        fs::write(m.join("runtime.log"), "written").unwrap()
    });
    assert_eq!(store.mounts("container-1").unwrap(), mounts);

    let mut names: Vec<String> = store.walk().unwrap().into_iter().map(|i| i.name).collect();
    names.sort();
    assert_eq!(names, ["container-1", "layer-1", "layer-2", "view-1"]);

    // A parent cannot go before its children.
    assert!(matches!(
        store.remove("layer-1"),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    for key in ["container-1", "view-1", "layer-2", "layer-1"] {
        store.remove(key).unwrap();
    }
    assert!(store.walk().unwrap().is_empty());
    assert_eq!(
        fs::read_dir(dir.path().join("state/snapshots"))
            .unwrap()
            .count(),
        0,
        "directories removed"
    );
}

#[test]
fn error_classes_labels_persistence_and_cleanup() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let store = SnapshotStore::open(&state).unwrap();
        store.prepare("a", None, labels(&[])).unwrap();
        assert!(matches!(
            store.prepare("a", None, labels(&[])),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(
            matches!(
                store.prepare("b", Some("a"), labels(&[])),
                Err(SnapshotError::FailedPrecondition { .. })
            ),
            "active parent"
        );
        assert!(matches!(
            store.prepare("b", Some("missing"), labels(&[])),
            Err(SnapshotError::NotFound(_))
        ));
        store.commit("base", "a", labels(&[])).unwrap();
        store.prepare("c", Some("base"), labels(&[])).unwrap();
        assert!(matches!(
            store.commit("base", "c", labels(&[])),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(
            matches!(
                store.commit("x", "base", labels(&[])),
                Err(SnapshotError::FailedPrecondition { .. })
            ),
            "not active"
        );
        assert!(matches!(
            store.mounts("base"),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        let updated = store
            .update_labels("base", labels(&[("team", "ops")]))
            .unwrap();
        assert_eq!(updated.labels["team"], "ops");
    }
    // Reopened (as after a daemon restart): everything is still there.
    fs::create_dir_all(state.join("snapshots/999/fs")).unwrap(); // an orphan, as a crash leaves
    let store = SnapshotStore::open(&state).unwrap();
    assert_eq!(store.stat("base").unwrap().labels["team"], "ops");
    assert_eq!(store.stat("c").unwrap().parent.as_deref(), Some("base"));
    assert_eq!(store.cleanup().unwrap(), vec![999]);
    assert!(store.mounts("c").is_ok());
}

#[test]
fn cleanup_never_takes_the_directory_of_a_prepare_in_flight() {
    // containerd runs garbage collection (and so Cleanup) while other containers' snapshots
    // are being prepared; a directory made but not yet recorded is not an orphan.
    let temp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(temp.path()).unwrap();
    std::thread::scope(|scope| {
        let cleaner = scope.spawn(|| {
            for _ in 0..200 {
                store.cleanup().unwrap();
            }
        });
        for n in 0..200 {
            let mounts = store
                .prepare(&format!("active-{n}"), None, BTreeMap::new())
                .unwrap();
            // An active snapshot without a parent is a bind mount of its own directory.
            let source = Path::new(&mounts[0].source);
            assert!(source.is_dir(), "{} was taken", source.display());
        }
        cleaner.join().unwrap();
    });
    assert!(store.cleanup().unwrap().is_empty());
}
