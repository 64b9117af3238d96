//! The layer filesystem through real FUSE mounts (root and /dev/fuse needed; in CI a missing
//! prerequisite fails, elsewhere the tests say why and return).
//!
//! Faults the local blob cannot produce (errors, stalls) come from `FaultySource`, which wraps
//! the real blob and injects them; the bytes always come from the real sealed blob.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fsformat::reader::UnverifiedTail;
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;
use sealfs_e2e::{assert_same_tree, noise, snapshot_tree};
use snapshotter::cache::{DiskCache, MemoryCache};
use snapshotter::fetcher::{FetchConfig, FetchPool, LayerFetcher, PoolConfig};
use snapshotter::fs::{FsError, LayerFs};
use snapshotter::mount::{MountOptions, MountedLayer};
use snapshotter::source::faulty::{Faults, FaultySource};
use snapshotter::source::LocalBlob;

const CHUNK: u64 = 64 * 1024;

fn prerequisites() -> bool {
    let root = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let fuse = Path::new("/dev/fuse").exists();
    let tools = ["tar", "setfattr", "mknod", "mkfifo"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && fuse && tools {
        return true;
    }
    let why = format!("root: {root}, /dev/fuse: {fuse}, tar/setfattr/mknod/mkfifo: {tools}");
    assert!(
        std::env::var_os("CI").is_none(),
        "prerequisites missing in CI: {why}"
    );
    eprintln!("skipping: {why}");
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sealed layer on disk with its key.
struct Sealed {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    blob: PathBuf,
    key: LayerKey,
    tail_digest: String,
}

impl Sealed {
    /// Builds `root` with `build`, tars it with GNU tar (xattrs, numeric owners), seals it.
    fn new(build: impl FnOnce(&Path)) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let root = dir.join("root");
        fs::create_dir(&root).unwrap();
        build(&root);
        run(Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-C"])
            .arg(&root)
            .args(["-cf"])
            .arg(dir.join("layer.tar"))
            .arg("."));
        let key = LayerKey::generate().unwrap();
        let blob = dir.join("layer.sealed");
        let summary = seal_layer(
            fs::File::open(dir.join("layer.tar")).unwrap(),
            fs::File::create(&blob).unwrap(),
            &key,
            &SealOptions::with_chunk_size(CHUNK).unwrap(),
        )
        .unwrap();
        Sealed {
            _dir: temp,
            dir,
            blob,
            key,
            tail_digest: summary.tail_digest,
        }
    }

    /// GNU tar's extraction of the same layer.
    fn extracted(&self) -> PathBuf {
        let out = self.dir.join("extracted");
        fs::create_dir_all(&out).unwrap();
        run(Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--same-permissions",
                "-xpf",
            ])
            .arg(self.dir.join("layer.tar"))
            .arg("-C")
            .arg(&out));
        out
    }

    /// Mounts the layer through a fault-injecting wrapper of the real blob.
    fn mount(
        &self,
        config: FetchConfig,
        cache: Option<&Path>,
    ) -> (MountedLayer, Arc<Faults>, tempfile::TempDir) {
        self.mount_with_faults(config, cache, |_| {})
    }

    /// The layer's verified index, read from the blob.
    fn opened(&self) -> Arc<fsformat::reader::SealedLayer> {
        let size = fs::metadata(&self.blob).unwrap().len();
        let file = fs::File::open(&self.blob).unwrap();
        Arc::new(
            UnverifiedTail::read(&file, size)
                .unwrap()
                .open(&self.key, &self.tail_digest)
                .unwrap(),
        )
    }

    /// The layer's filesystem core, for tests that drive it without a kernel.
    fn filesystem(&self) -> LayerFs {
        let fetcher = LayerFetcher::start(
            &FetchPool::start(PoolConfig::default()),
            "sha256:test".into(),
            1,
            self.opened(),
            Arc::new(LocalBlob::open(&self.blob).unwrap()),
            Arc::new(MemoryCache::new(1 << 20)),
            None,
            FetchConfig {
                background: false,
                ..FetchConfig::default()
            },
        );
        LayerFs::new(fetcher)
    }

    /// Like `mount`, with `faults` set before the first read (the background fetch starts at
    /// once).
    fn mount_with_faults(
        &self,
        config: FetchConfig,
        cache: Option<&Path>,
        faults_from_start: impl FnOnce(&Faults),
    ) -> (MountedLayer, Arc<Faults>, tempfile::TempDir) {
        let layer = self.opened();
        let (source, faults) = FaultySource::new(LocalBlob::open(&self.blob).unwrap());
        faults_from_start(&faults);
        let disk = cache.map(|dir| DiskCache::open(dir, 1 << 30).unwrap());
        let memory = Arc::new(MemoryCache::new(64 << 20));
        let fetcher = LayerFetcher::start(
            &FetchPool::start(PoolConfig::default()),
            "sha256:test".into(),
            1,
            layer,
            Arc::new(source),
            memory,
            disk,
            config,
        );
        let mountpoint = tempfile::tempdir().unwrap();
        let mounted = MountedLayer::mount(
            LayerFs::new(fetcher),
            mountpoint.path(),
            &MountOptions::default(),
            "test",
        )
        .unwrap();
        (mounted, faults, mountpoint)
    }
}

fn lazy() -> FetchConfig {
    FetchConfig {
        background: false,
        timeout: Duration::from_secs(5),
        ..FetchConfig::default()
    }
}

fn rich_tree(root: &Path) {
    for dir in ["bin", "etc/conf.d", "dev", "run", "usr/share/doc", "empty"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("bin/big"), noise(3, 5 * CHUNK as usize + 777)).unwrap();
    fs::write(root.join("etc/motd"), "hello from a sealed layer\n").unwrap();
    fs::write(root.join("etc/empty-file"), "").unwrap();
    for i in 0..150 {
        fs::write(
            root.join(format!("usr/share/doc/f{i:03}")),
            format!("doc {i}\n").repeat(i % 9 + 1),
        )
        .unwrap();
    }
    fs::write(
        root.join("usr/share/text"),
        "compressible text ".repeat(40_000),
    )
    .unwrap();
    std::os::unix::fs::symlink("../etc/motd", root.join("bin/motd-link")).unwrap();
    fs::hard_link(root.join("bin/big"), root.join("bin/big-hardlink")).unwrap();
    run(Command::new("mknod")
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]));
    run(Command::new("mknod")
        .arg(root.join("dev/sda"))
        .args(["b", "8", "0"]));
    run(Command::new("mkfifo").arg(root.join("run/fifo")));
    run(Command::new("setfattr")
        .args(["-n", "user.origin", "-v", "sealfs"])
        .arg(root.join("etc/motd")));
    run(Command::new("setfattr")
        .args([
            "-n",
            "security.capability",
            "-v",
            "0x0100000200200000000000000000000000000000",
        ])
        .arg(root.join("bin/big")));
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("bin/big"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::chown(root.join("etc/motd"), Some(1234), Some(5678)).unwrap();
}

#[test]
fn mounted_tree_equals_gnu_tar_extraction() {
    if !prerequisites() {
        return;
    }
    let sealed = Sealed::new(rich_tree);
    let want = snapshot_tree(&sealed.extracted());
    let (mounted, _faults, _mp) = sealed.mount(FetchConfig::default(), None);
    let got = snapshot_tree(&mounted.mountpoint);
    assert!(want.len() > 150, "the tree has {} entries", want.len());
    assert_same_tree(&want, &got);
    // Read-only: writes fail with EROFS.
    let err = fs::write(mounted.mountpoint.join("etc/motd"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::create_dir(mounted.mountpoint.join("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[test]
fn whiteouts_and_opaque_dirs_look_like_overlayfs_expects() {
    if !prerequisites() {
        return;
    }
    // A layer tar with OCI whiteout markers, made with the tar crate (GNU tar would not mark).
    let temp = tempfile::tempdir().unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    for (path, size) in [
        ("etc/.wh.passwd", 0u64),
        ("var/cache/.wh..wh..opq", 0),
        ("var/cache/new", 3),
    ] {
        let mut header = sealfs_e2e::regular_header(size);
        builder
            .append_data(&mut header, path, &b"new"[..size as usize])
            .unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let key = LayerKey::generate().unwrap();
    let blob = temp.path().join("blob");
    let summary = seal_layer(
        &tar[..],
        fs::File::create(&blob).unwrap(),
        &key,
        &SealOptions::default(),
    )
    .unwrap();
    let sealed = Sealed {
        dir: temp.path().to_path_buf(),
        _dir: temp,
        blob,
        key,
        tail_digest: summary.tail_digest,
    };
    let (mounted, _faults, _mp) = sealed.mount(lazy(), None);
    let whiteout = fs::symlink_metadata(mounted.mountpoint.join("etc/passwd")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(std::os::unix::fs::MetadataExt::rdev(&whiteout), 0);
    assert!(!mounted.mountpoint.join("etc/.wh.passwd").exists());
    let cache = mounted.mountpoint.join("var/cache");
    assert_eq!(
        xattr::get(&cache, "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        xattr::get(&cache, "user.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!cache.join(".wh..wh..opq").exists());
    assert_eq!(fs::read(cache.join("new")).unwrap(), b"new");
}

#[test]
fn reading_one_small_file_fetches_one_chunk() {
    if !prerequisites() {
        return;
    }
    let sealed = Sealed::new(|root| {
        fs::write(root.join("large.bin"), noise(9, 64 * CHUNK as usize)).unwrap();
        fs::write(root.join("small.txt"), "just this\n").unwrap();
    });
    let (mounted, faults, _mp) = sealed.mount(lazy(), None);
    // Listing, stat and open read nothing.
    let names: Vec<_> = fs::read_dir(&mounted.mountpoint).unwrap().collect();
    assert_eq!(names.len(), 2);
    let file = fs::File::open(mounted.mountpoint.join("large.bin")).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 64 * CHUNK);
    assert_eq!(
        faults.reads.load(Ordering::SeqCst),
        0,
        "open or stat fetched data"
    );
    assert_eq!(
        fs::read_to_string(mounted.mountpoint.join("small.txt")).unwrap(),
        "just this\n"
    );
    let (reads, bytes) = (
        faults.reads.load(Ordering::SeqCst),
        faults.bytes.load(Ordering::SeqCst),
    );
    let blob = fs::metadata(&sealed.blob).unwrap().len();
    assert_eq!(reads, 1, "one small file, one chunk");
    assert!(bytes * 50 < blob, "read {bytes} of {blob} bytes");
    assert_eq!(
        mounted
            .fs
            .fetcher()
            .stats()
            .urgent_chunks
            .load(Ordering::SeqCst),
        1
    );
}

#[test]
fn a_miss_in_a_walk_through_the_layer_brings_the_next_packs_in_the_same_range_read() {
    if !prerequisites() {
        return;
    }
    // Eight 40 KiB files: each fills a pack (64 KiB here) of its own, one chunk per file.
    let sealed = Sealed::new(|root| {
        for n in 0..8 {
            fs::write(root.join(format!("f{n}")), noise(n, 40 << 10)).unwrap();
        }
    });
    let layer = sealed.opened();
    let mut by_chunk: Vec<(u32, String)> = (0..8)
        .map(|n| {
            let name = format!("f{n}");
            let entry = layer
                .data_entry(layer.lookup(name.as_bytes()).unwrap())
                .unwrap();
            let fsformat::layout::EntryKind::File { extents, .. } = &entry.kind else {
                panic!("{name} is not a file");
            };
            assert_eq!(extents.len(), 1, "{name} is in one chunk");
            (extents[0].chunk, name)
        })
        .collect();
    by_chunk.sort();
    let chunks: Vec<u32> = by_chunk.iter().map(|(c, _)| *c).collect();
    assert_eq!(chunks, (0..8).collect::<Vec<u32>>(), "one pack per file");
    let read = |mounted: &MountedLayer, chunk: usize| {
        let (_, name) = &by_chunk[chunk];
        assert_eq!(
            fs::read(mounted.mountpoint.join(name)).unwrap(),
            noise(name[1..].parse().unwrap(), 40 << 10)
        );
    };

    // 100 KiB of readahead (the next two 40 KiB packs), once reads walk the layer in order.
    let (mounted, faults, _mp) = sealed.mount(
        FetchConfig {
            readahead_bytes: 100 << 10,
            ..lazy()
        },
        None,
    );
    let stats = mounted.fs.fetcher().stats().clone();
    // The first read has no chunk before it: nothing says the next one is read next.
    read(&mounted, 0);
    assert_eq!(faults.reads.load(Ordering::SeqCst), 1);
    assert_eq!(stats.readahead_chunks.load(Ordering::SeqCst), 0);
    // A miss right after a present chunk: the two after it come in the same range read.
    read(&mounted, 1);
    assert_eq!(faults.reads.load(Ordering::SeqCst), 2);
    read(&mounted, 2);
    read(&mounted, 3);
    assert_eq!(
        faults.reads.load(Ordering::SeqCst),
        2,
        "read ahead with chunk 1"
    );
    // Counted once the reads of chunks 2 and 3 have returned: each chunk is counted before
    // its waiters wake, and the read of chunk 1 may return before the rest of its run is.
    assert_eq!(
        stats.urgent_chunks.load(Ordering::SeqCst),
        2,
        "the chunks reads waited for"
    );
    assert_eq!(
        stats.readahead_chunks.load(Ordering::SeqCst),
        2,
        "the two after chunk 1"
    );
    // A read that jumps (chunk 4 is not present) fetches its chunk alone.
    read(&mounted, 5);
    assert_eq!(faults.reads.load(Ordering::SeqCst), 3, "past the readahead");
    assert_eq!(stats.readahead_chunks.load(Ordering::SeqCst), 2);
    drop(mounted);

    // Off: one range read per chunk.
    let (mounted, faults, _mp) = sealed.mount(
        FetchConfig {
            readahead_bytes: 0,
            ..lazy()
        },
        None,
    );
    read(&mounted, 0);
    read(&mounted, 1);
    read(&mounted, 2);
    assert_eq!(faults.reads.load(Ordering::SeqCst), 3);
}

#[test]
fn source_faults_fail_reads_with_eio_and_recover() {
    if !prerequisites() {
        return;
    }
    let sealed = Sealed::new(|root| {
        fs::write(root.join("a.bin"), noise(1, 2 * CHUNK as usize)).unwrap();
        fs::write(root.join("b.bin"), noise(2, 2 * CHUNK as usize)).unwrap();
    });
    let config = FetchConfig {
        timeout: Duration::from_millis(400),
        ..lazy()
    };
    let (mounted, faults, _mp) = sealed.mount(config, None);
    let layer = mounted.fs.fetcher().layer().clone();
    let a_chunk = match &layer.entry(layer.lookup(b"a.bin").unwrap()).unwrap().kind {
        fsformat::layout::EntryKind::File { extents, .. } => extents[0].chunk,
        other => panic!("{other:?}"),
    };
    let (a_offset, _) = layer.chunk_range(a_chunk).unwrap();
    faults.fail_offsets.lock().unwrap().insert(a_offset);
    let err = fs::read(mounted.mountpoint.join("a.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(mounted.mountpoint.join("b.bin")).unwrap(),
        noise(2, 2 * CHUNK as usize)
    );

    // A stalled source: EIO after the timeout, not a hang; later reads work again.
    faults.fail_offsets.lock().unwrap().clear();
    *faults.stall.lock().unwrap() = Duration::from_secs(2);
    faults.stalled.store(true, Ordering::SeqCst);
    let mut buf = [0u8; 16];
    let file = fs::File::open(mounted.mountpoint.join("a.bin")).unwrap();
    let err = std::os::unix::fs::FileExt::read_at(&file, &mut buf, CHUNK + 5).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mounted.fs.fetcher().stats().timeouts.load(Ordering::SeqCst) >= 1);
    faults.stalled.store(false, Ordering::SeqCst);
    assert!(
        mounted.fs.fetcher().wait_idle(Duration::from_secs(60)),
        "the stalled fetch finishes"
    );
    assert_eq!(
        fs::read(mounted.mountpoint.join("a.bin")).unwrap(),
        noise(1, 2 * CHUNK as usize)
    );
}

#[test]
fn a_tampered_chunk_gives_eio_never_wrong_bytes() {
    if !prerequisites() {
        return;
    }
    let sealed = Sealed::new(|root| {
        fs::write(root.join("victim"), noise(5, CHUNK as usize)).unwrap();
        fs::write(root.join("bystander"), noise(6, CHUNK as usize)).unwrap();
    });
    let size = fs::metadata(&sealed.blob).unwrap().len();
    let layer = UnverifiedTail::read(&fs::File::open(&sealed.blob).unwrap(), size)
        .unwrap()
        .open(&sealed.key, &sealed.tail_digest)
        .unwrap();
    let victim = match &layer.entry(layer.lookup(b"victim").unwrap()).unwrap().kind {
        fsformat::layout::EntryKind::File { extents, .. } => extents[0].chunk,
        other => panic!("{other:?}"),
    };
    let (offset, _) = layer.chunk_range(victim).unwrap();
    let mut bytes = fs::read(&sealed.blob).unwrap();
    bytes[offset as usize + 100] ^= 0x20;
    fs::write(&sealed.blob, bytes).unwrap();
    let (mounted, _faults, _mp) = sealed.mount(lazy(), None);
    let err = fs::read(mounted.mountpoint.join("victim")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(mounted.mountpoint.join("bystander")).unwrap(),
        noise(6, CHUNK as usize)
    );
    // Failures are not cached (a transiently bad fetch may succeed later); the kernel may ask
    // twice (readahead, then the read).
    assert!(
        mounted
            .fs
            .fetcher()
            .stats()
            .verification_failures
            .load(Ordering::SeqCst)
            >= 1
    );
}

#[test]
fn sixteen_concurrent_readers_get_the_right_bytes_and_each_chunk_is_fetched_once() {
    if !prerequisites() {
        return;
    }
    let size = 24 * CHUNK as usize + 99;
    let sealed = Sealed::new(|root| fs::write(root.join("shared.bin"), noise(11, size)).unwrap());
    let (mounted, _faults, _mp) = sealed.mount(lazy(), None);
    let want = Arc::new(noise(11, size));
    let path = mounted.mountpoint.join("shared.bin");
    let readers: Vec<_> = (0..16)
        .map(|n| {
            let (path, want) = (path.clone(), want.clone());
            std::thread::spawn(move || {
                // Each reader starts somewhere else and wraps around, in 100 KiB reads.
                const STEP: usize = 100 * 1024;
                let file = fs::File::open(&path).unwrap();
                let start = n * size / 16;
                for k in 0..size.div_ceil(STEP) + 1 {
                    let pos = (start + k * STEP) % size;
                    let mut buf = vec![0u8; STEP];
                    let got =
                        std::os::unix::fs::FileExt::read_at(&file, &mut buf, pos as u64).unwrap();
                    assert_eq!(got, STEP.min(size - pos), "short read at {pos}");
                    assert!(buf[..got] == want[pos..pos + got], "wrong bytes at {pos}");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().unwrap();
    }
    let stats = mounted.fs.fetcher().stats();
    let chunks = mounted.fs.fetcher().layer().index().chunks.len() as u64;
    // Each chunk once: for a read, or read ahead with another's.
    assert_eq!(
        stats.urgent_chunks.load(Ordering::SeqCst) + stats.readahead_chunks.load(Ordering::SeqCst),
        chunks,
        "every chunk fetched exactly once"
    );
}

#[test]
fn reads_during_the_background_fetch_never_fetch_a_chunk_twice() {
    if !prerequisites() {
        return;
    }
    let size = 40 * CHUNK as usize;
    let sealed = Sealed::new(|root| fs::write(root.join("data.bin"), noise(21, size)).unwrap());
    let config = FetchConfig {
        background: true,
        merge_bytes: 4 * CHUNK,
        ..lazy()
    };
    // A slow source (injected latency a local file cannot have), so reads overlap the
    // background fetch's queued ranges.
    let (mounted, faults, _mp) = sealed.mount_with_faults(config, None, |faults| {
        *faults.stall.lock().unwrap() = Duration::from_millis(20);
        faults.stalled.store(true, Ordering::SeqCst);
    });
    let want = Arc::new(noise(21, size));
    let path = mounted.mountpoint.join("data.bin");
    let readers: Vec<_> = (0..4)
        .map(|n| {
            let (path, want) = (path.clone(), want.clone());
            std::thread::spawn(move || {
                let file = fs::File::open(&path).unwrap();
                // From the end backwards: the background fetch goes forwards, so they meet.
                for k in (0..10).rev() {
                    let pos = (k * 4 + n) * CHUNK as usize + 17;
                    let mut buf = vec![0u8; 1000];
                    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, pos as u64).unwrap();
                    assert!(buf == want[pos..pos + 1000], "wrong bytes at {pos}");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().unwrap();
    }
    let fetcher = mounted.fs.fetcher();
    assert!(
        fetcher.wait_until_fetched(Duration::from_secs(60)),
        "background fetch stuck at {:?}",
        fetcher.progress()
    );
    let sealed_bytes: u64 = fetcher
        .layer()
        .index()
        .chunks
        .iter()
        .map(|c| u64::from(c.sealed_len))
        .sum();
    let stats = fetcher.stats();
    assert!(
        stats.urgent_chunks.load(Ordering::SeqCst) > 0,
        "no read went to the source"
    );
    assert_eq!(
        faults.bytes.load(Ordering::SeqCst),
        sealed_bytes,
        "every chunk fetched once: {} urgent, {} background",
        stats.urgent_chunks.load(Ordering::SeqCst),
        stats.background_chunks.load(Ordering::SeqCst)
    );
}

#[test]
fn background_fetch_completes_and_the_disk_cache_holds_only_ciphertext() {
    if !prerequisites() {
        return;
    }
    let secret = b"PLAINTEXT-MARKER-".repeat(5000);
    let sealed = Sealed::new(|root| {
        fs::write(root.join("secret.txt"), &secret).unwrap();
        fs::write(root.join("other.bin"), noise(8, 10 * CHUNK as usize)).unwrap();
    });
    let cache = tempfile::tempdir().unwrap();
    let config = FetchConfig {
        background: true,
        merge_bytes: 4 * CHUNK,
        ..lazy()
    };
    {
        let (mounted, faults, _mp) = sealed.mount(config.clone(), Some(cache.path()));
        let fetcher = mounted.fs.fetcher();
        assert!(
            fetcher.wait_until_fetched(Duration::from_secs(60)),
            "background fetch stuck at {:?}",
            fetcher.progress()
        );
        // Merged: fewer range reads than chunks.
        assert!(faults.reads.load(Ordering::SeqCst) < u64::from(fetcher.progress().chunks_total));
        assert_eq!(
            fs::read(mounted.mountpoint.join("secret.txt")).unwrap(),
            secret
        );
    }
    for entry in fs::read_dir(cache.path()).unwrap() {
        let bytes = fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"),
            "plaintext on disk"
        );
    }
    // A corrupt cache entry is detected, dropped and fetched again.
    let victim = fs::read_dir(cache.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = fs::read(&victim).unwrap();
    bytes[10] ^= 1;
    fs::write(&victim, bytes).unwrap();
    let (mounted, faults, _mp) = sealed.mount(lazy(), Some(cache.path()));
    assert_eq!(
        fs::read(mounted.mountpoint.join("secret.txt")).unwrap(),
        secret
    );
    assert_eq!(
        fs::read(mounted.mountpoint.join("other.bin")).unwrap(),
        noise(8, 10 * CHUNK as usize)
    );
    let stats = mounted.fs.fetcher().stats();
    assert_eq!(stats.verification_failures.load(Ordering::SeqCst), 1);
    assert_eq!(
        faults.reads.load(Ordering::SeqCst),
        1,
        "only the corrupt chunk is fetched again"
    );
}

/// The fs core without a kernel: a listing resumed at every offset a kernel could ask for
/// gives each entry of a large directory exactly once, in order (the listing starts at the
/// resumed child instead of walking past every earlier one).
#[test]
fn readdir_pages_through_a_large_directory_from_any_offset() {
    if !prerequisites() {
        return;
    }
    let files = 3000;
    let sealed = Sealed::new(|root| {
        fs::create_dir(root.join("big")).unwrap();
        for n in 0..files {
            fs::write(root.join("big").join(format!("f{n:05}")), b"x").unwrap();
        }
    });
    let layer = sealed.filesystem();
    let big = layer.lookup(snapshotter::fs::ROOT, b"big").unwrap().ino;
    let whole = layer.readdir(big, 0, usize::MAX).unwrap();
    assert_eq!(whole.len(), files + 2, ". and .. first");
    assert_eq!(
        (&whole[0].name[..], &whole[1].name[..]),
        (&b"."[..], &b".."[..])
    );
    let expected: Vec<Vec<u8>> = (0..files)
        .map(|n| format!("f{n:05}").into_bytes())
        .collect();
    let names: Vec<Vec<u8>> = whole[2..].iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, expected);
    for page in [1, 2, 3, 97, 1000] {
        let mut paged = Vec::new();
        loop {
            let next = layer.readdir(big, paged.len(), page).unwrap();
            if next.is_empty() {
                break;
            }
            assert!(next.len() <= page);
            paged.extend(next.into_iter().map(|e| e.name));
        }
        let whole_names: Vec<Vec<u8>> = whole.iter().map(|e| e.name.clone()).collect();
        assert_eq!(paged, whole_names, "pages of {page}");
    }
    assert!(layer.readdir(big, files + 2, 10).unwrap().is_empty());
    assert!(layer.readdir(big, files + 50, 10).unwrap().is_empty());
}

/// The fs core without a kernel: names resolve (or fail with the errno class FUSE answers),
/// symlinks and xattrs read back, and reads at every offset around chunk edges, of every
/// length, give the file's bytes, short at the end of the file and empty past it.
#[test]
fn the_fs_core_resolves_names_and_reads_across_chunk_edges() {
    if !prerequisites() {
        return;
    }
    let sealed = Sealed::new(rich_tree);
    let layer = sealed.filesystem();
    let root = snapshotter::fs::ROOT;
    let bin = layer.lookup(root, b"bin").unwrap();
    let big = layer.lookup(bin.ino, b"big").unwrap();
    let want = noise(3, 5 * CHUNK as usize + 777);
    assert_eq!(big.size, want.len() as u64);
    assert_eq!(big.nlink, 2, "hard-linked");
    assert_eq!(layer.lookup(bin.ino, b"big-hardlink").unwrap().ino, big.ino);
    for edge in [CHUNK, 2 * CHUNK, 5 * CHUNK] {
        for offset in [edge - 1, edge, edge + 1, edge - 4096] {
            for size in [1u32, 4096, CHUNK as u32, 3 * CHUNK as u32] {
                let got = layer.read(big.ino, offset, size).unwrap();
                let end = (offset as usize + size as usize).min(want.len());
                assert_eq!(
                    got,
                    want[offset as usize..end],
                    "read of {size} at {offset}"
                );
            }
        }
    }
    assert!(layer
        .read(big.ino, want.len() as u64, 10)
        .unwrap()
        .is_empty());
    assert!(layer
        .read(big.ino, want.len() as u64 + 5, 10)
        .unwrap()
        .is_empty());

    let link = layer.lookup(bin.ino, b"motd-link").unwrap();
    assert_eq!(layer.readlink(link.ino).unwrap(), b"../etc/motd");
    let etc = layer.lookup(root, b"etc").unwrap();
    let motd = layer.lookup(etc.ino, b"motd").unwrap();
    assert_eq!(layer.getxattr(motd.ino, b"user.origin").unwrap(), b"sealfs");
    assert!(matches!(
        layer.getxattr(motd.ino, b"user.none"),
        Err(FsError::NoAttr)
    ));
    assert!(matches!(
        layer.lookup(root, b"missing"),
        Err(FsError::NotFound)
    ));
    assert!(matches!(layer.lookup(motd.ino, b"x"), Err(FsError::NotDir)));
    assert!(matches!(layer.readlink(motd.ino), Err(FsError::NotSymlink)));
    assert!(matches!(layer.read(etc.ino, 0, 10), Err(FsError::IsDir)));
    assert!(matches!(
        layer.getattr(snapshotter::fs::Ino(u64::MAX)),
        Err(FsError::NotFound)
    ));
}

/// The cache tiers of a layer, real ones on a real sealed layer: a chunk put in the stack is
/// served from memory; a fresh memory tier misses and the disk tier (ciphertext on disk,
/// authenticated) answers and fills it; a disk entry damaged on disk is refused, dropped, and
/// then a miss.
#[test]
fn cache_tiers_serve_memory_then_authenticated_disk_and_drop_a_damaged_entry() {
    if !prerequisites() {
        return;
    }
    use snapshotter::cache::{
        open_chunk, CacheError, ChunkCache, Fetched, Hit, LayerMemory, SealedDisk, Tiered,
    };
    let sealed = Sealed::new(rich_tree);
    let layer = sealed.opened();
    let blob = fs::read(&sealed.blob).unwrap();
    let (start, len) = layer.chunk_range(0).unwrap();
    let chunk_bytes = &blob[start as usize..start as usize + len as usize];
    let plain = Arc::new(open_chunk(&layer, 0, &mut chunk_bytes.to_vec()).unwrap());
    let disk_dir = tempfile::tempdir().unwrap();
    let tiers = |memory: &Arc<MemoryCache>| Tiered {
        upper: LayerMemory::new(memory.clone(), 7),
        lower: Some(SealedDisk::new(
            DiskCache::open(disk_dir.path(), 1 << 30).unwrap(),
            layer.clone(),
        )),
    };

    let memory = Arc::new(MemoryCache::new(64 << 20));
    let cache = tiers(&memory);
    assert!(cache.get(0).unwrap().is_none());
    cache.put(
        0,
        Fetched {
            sealed: Some(chunk_bytes),
            plain: &plain,
        },
    );
    assert!(cache.contains(0));
    let (got, hit) = cache.get(0).unwrap().unwrap();
    assert_eq!((got, hit), (plain.clone(), Hit::Upper));
    // What the disk holds is the sealed chunk, not its plaintext.
    let on_disk = fs::read(disk_dir.path().join("0")).unwrap();
    assert_eq!(on_disk, chunk_bytes);

    let fresh = Arc::new(MemoryCache::new(64 << 20));
    let cache = tiers(&fresh);
    let (got, hit) = cache.get(0).unwrap().unwrap();
    assert_eq!((got, hit), (plain.clone(), Hit::Lower));
    assert!(cache.upper.contains(0), "a disk hit fills memory");

    let mut damaged = on_disk.clone();
    damaged[len as usize / 2] ^= 1;
    fs::write(disk_dir.path().join("0"), &damaged).unwrap();
    let cache = tiers(&Arc::new(MemoryCache::new(64 << 20)));
    assert!(matches!(
        cache.get(0),
        Err(CacheError::Corrupt { chunk: 0, .. })
    ));
    assert!(!cache.contains(0), "the damaged entry is dropped");
    assert!(cache.get(0).unwrap().is_none());
}

/// A hostile descriptor or footer cannot make a node allocate or decompress an index beyond
/// its limit: the tail is refused before it is fetched, a decompressed index over the limit
/// before it is decompressed, each with an error that names the limit.
#[test]
fn index_size_limits_refuse_oversized_tails_before_fetching_them() {
    if !prerequisites() {
        return;
    }
    use fsformat::oci::{SealedLayerAnnotations, MEDIA_TYPE_SEALED_LAYER};
    use snapshotter::mount::{read_tail, MountError, DEFAULT_MAX_INDEX_BYTES};
    let sealed = Sealed::new(|root| {
        for n in 0..2000 {
            fs::write(root.join(format!("file-{n:05}")), b"x").unwrap();
        }
    });
    let size = fs::metadata(&sealed.blob).unwrap().len();
    let tail = UnverifiedTail::read(&fs::File::open(&sealed.blob).unwrap(), size).unwrap();
    let tail_size = tail.footer().tail_len();
    let plain_len = u64::from(tail.footer().index_plain_len);
    assert!(plain_len > tail_size, "the index compresses");
    let descriptor_with = |index_size: u64| {
        let facts = SealedLayerAnnotations {
            index_digest: sealed.tail_digest.clone(),
            index_size,
            stanzas: Vec::new(),
        };
        let mut descriptor = snapshotter::oci_layout::descriptor(
            oci_spec::image::MediaType::Other(MEDIA_TYPE_SEALED_LAYER.into()),
            &format!("sha256:{}", "0".repeat(64)),
            size,
        )
        .unwrap();
        descriptor.set_annotations(Some(facts.pairs().into_iter().collect()));
        (descriptor, facts)
    };
    // Counts the bytes a read asks for: the refused tail must cost none.
    let (source, faults) = FaultySource::new(LocalBlob::open(&sealed.blob).unwrap());

    let (descriptor, facts) = descriptor_with(DEFAULT_MAX_INDEX_BYTES + 1);
    let error = read_tail(&descriptor, &facts, &source, DEFAULT_MAX_INDEX_BYTES).unwrap_err();
    assert!(matches!(error, MountError::IndexTooLarge { .. }), "{error}");
    assert!(error.to_string().contains("fetch.max_index_mib"), "{error}");
    assert_eq!(faults.reads.load(Ordering::Relaxed), 0, "nothing fetched");

    // The tail fits, the decompressed index it announces does not.
    let (descriptor, facts) = descriptor_with(tail_size);
    let error = read_tail(&descriptor, &facts, &source, tail_size).unwrap_err();
    assert!(
        matches!(error, MountError::IndexTooLarge { size, .. } if size == plain_len),
        "{error}"
    );
    // Within the limits the same tail reads (and was hashed before it was parsed).
    read_tail(&descriptor, &facts, &source, DEFAULT_MAX_INDEX_BYTES).unwrap();
    let (descriptor, facts) = descriptor_with(tail_size + 1);
    let error = read_tail(&descriptor, &facts, &source, DEFAULT_MAX_INDEX_BYTES).unwrap_err();
    let chain = snapshotter::error_chain(&error);
    assert!(chain.contains("index digest mismatch"), "{chain}");
}
