//! `perf fuse`: reads through a sealfs mount against the same tree extracted on local disk,
//! cold (page cache dropped, nothing fetched: a fresh mount) and warm (right after), and what
//! mounting a layer of 100k files costs in time and memory. Needs root and /dev/fuse.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fsformat::reader::UnverifiedTail;
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;
use snapshotter::cache::MemoryCache;
use snapshotter::fetcher::{FetchConfig, FetchPool, LayerFetcher, PoolConfig};
use snapshotter::fs::LayerFs;
use snapshotter::mount::{MountOptions, MountedLayer};
use snapshotter::source::LocalBlob;

/// Options of the FUSE benchmark.
#[derive(clap::Args)]
pub struct FuseArgs {
    /// Directory whose files make up the test layer.
    #[arg(long, default_value = "/usr")]
    from: PathBuf,
    /// How many MiB of file data to put in the layer.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Random 4 KiB reads per run.
    #[arg(long, default_value_t = 20_000)]
    random_reads: usize,
    /// Files in the many-small-files layer used for the mount cost.
    #[arg(long, default_value_t = 100_000)]
    small_files: usize,
    /// Where to put the layer, its extraction and the sealed blob (a disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
}

struct Sealed {
    blob: PathBuf,
    key: LayerKey,
    tail_digest: String,
}

fn seal(tar: &[u8], blob: &Path) -> Result<Sealed> {
    let key = LayerKey::generate()?;
    let summary = seal_layer(tar, fs::File::create(blob)?, &key, &SealOptions::default())?;
    Ok(Sealed {
        blob: blob.to_path_buf(),
        key,
        tail_digest: summary.tail_digest,
    })
}

fn mount(sealed: &Sealed, at: &Path) -> Result<MountedLayer> {
    let size = fs::metadata(&sealed.blob)?.len();
    let layer = Arc::new(
        UnverifiedTail::read(&fs::File::open(&sealed.blob)?, size)?
            .open(&sealed.key, &sealed.tail_digest)?,
    );
    let fetcher = LayerFetcher::start(
        &FetchPool::start(PoolConfig::default()),
        "bench".into(),
        1,
        layer,
        Arc::new(LocalBlob::open(&sealed.blob)?),
        Arc::new(MemoryCache::new(512 << 20)),
        None,
        FetchConfig {
            background: false,
            ..FetchConfig::default()
        },
    );
    Ok(MountedLayer::mount(
        LayerFs::new(fetcher),
        at,
        &MountOptions::default(),
        "bench",
    )?)
}

fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (needs root)")
}

fn files_under(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(root.join(&rel)) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(meta) = entry.metadata() else { continue };
            let rel = rel.join(entry.file_name());
            if meta.is_dir() {
                stack.push(rel);
            } else if meta.is_file() {
                out.push((rel, meta.len()));
            }
        }
    }
    out
}

/// Reads every file whole, in order; returns bytes read and the time.
fn sequential(root: &Path, files: &[(PathBuf, u64)]) -> Result<(u64, Duration)> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0u64;
    for (rel, _) in files {
        let mut file = fs::File::open(root.join(rel))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, start.elapsed()))
}

/// `count` 4 KiB reads at seeded random offsets of files chosen by size.
fn random(root: &Path, files: &[(PathBuf, u64)], count: usize) -> Result<Duration> {
    use std::os::unix::fs::FileExt;
    let big: Vec<&(PathBuf, u64)> = files.iter().filter(|(_, size)| *size >= 4096).collect();
    ensure!(!big.is_empty(), "no file of 4 KiB or more to read randomly");
    let handles: Vec<fs::File> = big
        .iter()
        .map(|(rel, _)| fs::File::open(root.join(rel)))
        .collect::<Result<_, _>>()?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    for _ in 0..count {
        let which = (next() % big.len() as u64) as usize;
        let offset = next() % (big[which].1 - 4096 + 1);
        handles[which].read_exact_at(&mut buf, offset)?;
    }
    Ok(start.elapsed())
}

fn rss_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

pub fn run(args: &FuseArgs) -> Result<()> {
    ensure!(
        Path::new("/dev/fuse").exists(),
        "perf fuse needs /dev/fuse and root"
    );
    let work = tempfile::tempdir_in(&args.workdir)?;
    let (tar, file_bytes, file_count) = crate::data::tar_from_dir(&args.from, args.size_mib << 20)?;
    println!(
        "layer: {file_count} files, {:.1} MiB from {}",
        file_bytes as f64 / 1048576.0,
        args.from.display()
    );
    let local = work.path().join("local");
    fs::create_dir(&local)?;
    tar::Archive::new(&tar[..])
        .unpack(&local)
        .context("extracting the layer")?;
    let sealed = seal(&tar, &work.path().join("layer.sealed"))?;
    drop(tar);
    let files = files_under(&local);
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt)?;

    let mut rows = Vec::new();
    // Local disk: cold, then warm.
    drop_caches()?;
    let (bytes, local_seq_cold) = sequential(&local, &files)?;
    let (_, local_seq_warm) = sequential(&local, &files)?;
    drop_caches()?;
    let local_rand_cold = random(&local, &files, args.random_reads)?;
    let local_rand_warm = random(&local, &files, args.random_reads)?;
    // sealfs: a fresh mount is cold (no chunk fetched, nothing in the page cache).
    let mounted = mount(&sealed, &mnt)?;
    drop_caches()?;
    let (sealfs_bytes, sealfs_seq_cold) = sequential(&mnt, &files)?;
    ensure!(
        sealfs_bytes == bytes,
        "read {sealfs_bytes} bytes through the mount, {bytes} locally"
    );
    let (_, sealfs_seq_warm) = sequential(&mnt, &files)?;
    drop(mounted);
    let mounted = mount(&sealed, &mnt)?;
    drop_caches()?;
    let sealfs_rand_cold = random(&mnt, &files, args.random_reads)?;
    let sealfs_rand_warm = random(&mnt, &files, args.random_reads)?;
    let stats = mounted.fs.fetcher().stats().clone();
    drop(mounted);

    let mbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    let iops = |d: Duration| args.random_reads as f64 / d.as_secs_f64();
    rows.push((
        "sequential, cold (MB/s)",
        mbps(local_seq_cold),
        mbps(sealfs_seq_cold),
    ));
    rows.push((
        "sequential, warm (MB/s)",
        mbps(local_seq_warm),
        mbps(sealfs_seq_warm),
    ));
    rows.push((
        "random 4 KiB, cold (reads/s)",
        iops(local_rand_cold),
        iops(sealfs_rand_cold),
    ));
    rows.push((
        "random 4 KiB, warm (reads/s)",
        iops(local_rand_warm),
        iops(sealfs_rand_warm),
    ));
    println!();
    println!("| reads | local disk | sealfs | sealfs / local |");
    println!("|---|---:|---:|---:|");
    for (name, local, sealfs) in rows {
        println!(
            "| {name} | {local:.0} | {sealfs:.0} | {:.2} |",
            sealfs / local
        );
    }
    println!(
        "\n(random run: {} chunks fetched, {} memory-cache hits)",
        stats
            .urgent_chunks
            .load(std::sync::atomic::Ordering::Relaxed),
        stats.memory_hits.load(std::sync::atomic::Ordering::Relaxed)
    );

    // Mount cost of a layer with many small files.
    let tar = crate::data::tar_of_small_files(args.small_files)?;
    let many = seal(&tar, &work.path().join("many.sealed"))?;
    drop(tar);
    let rss_before = rss_bytes();
    let start = Instant::now();
    let mounted = mount(&many, &mnt)?;
    let mount_time = start.elapsed();
    let rss_after = rss_bytes();
    let start = Instant::now();
    let listed = files_under(&mnt).len();
    let walk_time = start.elapsed();
    ensure!(
        listed == args.small_files,
        "listed {listed} of {} files",
        args.small_files
    );
    drop(mounted);
    println!();
    println!("| layer of {} files | value |", args.small_files);
    println!("|---|---:|");
    println!(
        "| sealed blob | {:.1} MiB |",
        fs::metadata(&many.blob)?.len() as f64 / 1048576.0
    );
    println!(
        "| mount (read + verify + decrypt index, start FUSE) | {:.0} ms |",
        mount_time.as_secs_f64() * 1e3
    );
    println!(
        "| memory added by the mount (RSS) | {:.1} MiB |",
        rss_after.saturating_sub(rss_before) as f64 / 1048576.0
    );
    println!(
        "| stat every entry through the mount (cold) | {:.0} ms |",
        walk_time.as_secs_f64() * 1e3
    );
    Ok(())
}
