//! `perf layers`: what a mounted layer costs the node. Pulls sealed images of 1, 10, 40, 100
//! and 300 layers, each into a fresh daemon and containerd, and prints the daemon's threads,
//! open fds and resident memory beside the 1-layer figure: right after the pull (every layer
//! mounted, nothing read) and after every file of every layer has been read once (every chunk
//! fetched and decrypted, the memory cache full up to its cap). The pull's own time is the
//! many-layer pull figure.
//!
//! `--baseline-daemon` measures another `containerd-sealfs-grpc` (an older build) in the same
//! run, so a change shows as a ratio, not as two numbers from two days.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use oci_spec::image::MediaType;
use sealfs_e2e::containerd::Containerd;
use sealfs_e2e::registry::DockerRegistry;
use sealfs_e2e::sealfs::SealfsDaemon;
use snapshotter::oci_layout::{descriptor, OciLayout};

use crate::command::{require_tools, run, sibling_binary};
use crate::startup::images::busybox_base;

/// Options of the layer-scale benchmark.
#[derive(clap::Args)]
pub struct LayersArgs {
    /// Layer counts to measure (repeatable; default 1, 10, 40, 100, 300). The first is the
    /// baseline the ratios are against.
    #[arg(long = "layers")]
    counts: Vec<usize>,
    /// Size of the one file each layer above the base adds (KiB).
    #[arg(long, default_value_t = 256)]
    layer_kib: usize,
    /// Decrypted-chunk memory cache of the measured daemons (MiB). Smaller than the images,
    /// so the figure after reading shows the cap holding.
    #[arg(long, default_value_t = 64)]
    memory_cache_mib: u64,
    /// Another containerd-sealfs-grpc binary (an older build) measured beside this build's.
    #[arg(long)]
    baseline_daemon: Option<PathBuf>,
    /// Where the image is built and kept between runs, and results written.
    #[arg(long, default_value = "/var/tmp/sealfs-perf")]
    work: PathBuf,
    /// Smoke test: 1 and 10 layers of 64 KiB; checks the harness, not the scale.
    #[arg(long)]
    quick: bool,
}

/// What `/proc` says about a process.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct ProcessFigures {
    threads: u64,
    fds: u64,
    rss_kib: u64,
}

impl ProcessFigures {
    fn of(pid: u32) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading the status of process {pid}"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(ProcessFigures {
            threads: field("Threads:")?,
            fds: fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
            rss_kib: field("VmRSS:")?,
        })
    }
}

/// One daemon with one image of `layers` layers pulled.
#[derive(Debug, serde::Serialize)]
struct Step {
    daemon: String,
    layers: usize,
    idle: ProcessFigures,
    pull_s: f64,
    mounted: ProcessFigures,
    read: ProcessFigures,
    /// Bytes the memory cache held when `read` was taken.
    memory_cache_bytes: u64,
}

/// The plain layout with tags `n1`, `n10`, ...: `n<K>` is busybox plus `K - 1` layers of one
/// file each. Written directly (one tar per layer; umoci's repack would rescan the growing
/// tree for every layer) and kept in `work`.
fn build_layout(work: &Path, counts: &[usize], layer_kib: usize) -> Result<PathBuf> {
    let largest = *counts.iter().max().context("no layer counts")?;
    let layout = work
        .join("images")
        .join(format!("layers-{largest}x{layer_kib}k"));
    if counts.iter().all(|n| tag_exists(&layout, *n)) {
        return Ok(layout);
    }
    eprintln!("writing a {largest}-layer image to {}", layout.display());
    let _ = fs::remove_dir_all(&layout);
    let oci = OciLayout::open_or_create(&layout)?;
    let base = tempfile::tempdir()?;
    busybox_base(base.path())?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in 1..=largest {
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        if layer == 1 {
            builder.append_dir_all(".", base.path())?;
        } else {
            let data = sealfs_e2e::noise(layer as u64, layer_kib << 10);
            let mut header = sealfs_e2e::regular_header(data.len() as u64);
            builder.append_data(&mut header, format!("layers/l{layer:04}/data"), &data[..])?;
        }
        let tar = builder.into_inner()?;
        let (digest, size) = oci.put_blob(&tar)?;
        diff_ids.push(digest.clone());
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
        if counts.contains(&layer) {
            let config = serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            });
            let (config_digest, config_size) = oci.put_blob(&serde_json::to_vec(&config)?)?;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config_size,
                },
                "layers": layers,
            });
            let manifest = serde_json::to_vec(&manifest)?;
            let (digest, size) = oci.put_blob(&manifest)?;
            oci.set_tag(
                &descriptor(MediaType::ImageManifest, &digest, size)?,
                Some(&format!("n{layer}")),
            )?;
        }
    }
    Ok(layout)
}

fn tag_exists(layout: &Path, layers: usize) -> bool {
    OciLayout::open(layout).is_ok_and(|oci| oci.resolve(Some(&format!("n{layers}"))).is_ok())
}

/// Reads every regular file under `dir` to its end; the bytes read.
fn read_tree(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += read_tree(&entry.path())?;
        } else if kind.is_file() {
            let mut file = fs::File::open(entry.path())?;
            total += std::io::copy(&mut file, &mut std::io::sink())
                .with_context(|| format!("reading {}", entry.path().display()))?;
        }
    }
    Ok(total)
}

struct Bench {
    sealctl: PathBuf,
    keys: PathBuf,
    registry: DockerRegistry,
    daemon_config: String,
}

impl Bench {
    /// Pulls the image of `layers` layers into a fresh `daemon` and measures it.
    fn step(&self, daemon_name: &str, daemon: &Path, layers: usize) -> Result<Step> {
        let scratch = tempfile::tempdir()?;
        let sealfs = SealfsDaemon::start(daemon, scratch.path(), &self.keys, &self.daemon_config);
        let containerd = Containerd::start_with_sealfs(&sealfs.socket);
        sealfs.link_containerd(&containerd);
        let pid = sealfs.pid().context("the daemon is not running")?;
        let idle = ProcessFigures::of(pid)?;
        let reference = format!("{}/layers:n{layers}", self.registry.host);
        let started = Instant::now();
        let pulled = run(Command::new(&self.sealctl)
            .arg("pull")
            .arg("--address")
            .arg(&containerd.socket)
            .args(["--namespace", "sealfs-test", &reference]))?;
        let pull_s = started.elapsed().as_secs_f64();
        ensure!(
            pulled.matches("mounted remotely").count() == layers,
            "not every layer of {reference} was mounted remotely:\n{pulled}"
        );
        let mounted = ProcessFigures::of(pid)?;
        let mut read_bytes = 0;
        for snapshot in fs::read_dir(sealfs.root.join("snapshots"))? {
            let fs_dir = snapshot?.path().join("fs");
            if fs_dir.is_dir() {
                read_bytes += read_tree(&fs_dir)?;
            }
        }
        ensure!(read_bytes > 0, "nothing was read from the mounted layers");
        let read = ProcessFigures::of(pid)?;
        let memory_cache_bytes = sealfs.metric("sealfs_memory_cache_bytes");
        eprintln!(
            "{daemon_name} {layers} layers: pull {pull_s:.2} s; mounted {} threads, {} fds, \
             {:.1} MiB; after reading {:.1} MB: {:.1} MiB",
            mounted.threads,
            mounted.fds,
            mounted.rss_kib as f64 / 1024.0,
            read_bytes as f64 / 1e6,
            read.rss_kib as f64 / 1024.0
        );
        drop(containerd);
        drop(sealfs);
        Ok(Step {
            daemon: daemon_name.to_string(),
            layers,
            idle,
            pull_s,
            mounted,
            read,
            memory_cache_bytes,
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The Markdown table: per daemon and layer count, figures and ratios to the first count.
fn table(steps: &[Step], memory_cache_mib: u64) -> String {
    let mut out = format!(
        "Daemon cost of mounted layers (memory cache capped at {memory_cache_mib} MiB; ratios \
         against the first row of the same daemon)\n\n\
         | daemon | layers | pull s | threads | fds | RSS MiB | after reading all: threads | RSS MiB | of it memory cache MiB | x first: threads | x first: RSS mounted |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for step in steps {
        let first = steps
            .iter()
            .find(|s| s.daemon == step.daemon)
            .expect("the step itself");
        out += &format!(
            "| {} | {} | {:.2} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
            step.daemon,
            step.layers,
            step.pull_s,
            step.mounted.threads,
            step.mounted.fds,
            mib(step.mounted.rss_kib),
            step.read.threads,
            mib(step.read.rss_kib),
            step.memory_cache_bytes as f64 / (1 << 20) as f64,
            step.mounted.threads as f64 / first.mounted.threads as f64,
            step.mounted.rss_kib as f64 / first.mounted.rss_kib as f64,
        );
    }
    let mut daemons: Vec<&str> = steps.iter().map(|s| s.daemon.as_str()).collect();
    daemons.dedup();
    for daemon in daemons {
        let of: Vec<&Step> = steps.iter().filter(|s| s.daemon == daemon).collect();
        let (first, last) = (of[0], of[of.len() - 1]);
        if last.layers > first.layers {
            let per_layer = |a: u64, b: u64| {
                (b as f64 - a as f64) * 1024.0 / (last.layers - first.layers) as f64
            };
            let cache_kib = |s: &Step| s.memory_cache_bytes / 1024;
            out += &format!(
                "\n`{daemon}`, per mounted layer from {} to {} layers: {:.0} bytes of RSS \
                 mounted, {:.0} bytes after reading all (memory cache excluded), {:.2} threads, \
                 {:.2} fds; idle before the pull: {} threads, {:.1} MiB.",
                first.layers,
                last.layers,
                per_layer(first.mounted.rss_kib, last.mounted.rss_kib),
                per_layer(
                    first.read.rss_kib - cache_kib(first).min(first.read.rss_kib),
                    last.read.rss_kib - cache_kib(last).min(last.read.rss_kib)
                ),
                (last.mounted.threads as f64 - first.mounted.threads as f64)
                    / (last.layers - first.layers) as f64,
                (last.mounted.fds as f64 - first.mounted.fds as f64)
                    / (last.layers - first.layers) as f64,
                first.idle.threads,
                mib(first.idle.rss_kib),
            );
        }
    }
    out + "\n"
}

/// Runs the benchmark.
pub fn run_layers(args: &LayersArgs) -> Result<()> {
    let (counts, layer_kib) = match (args.quick, args.counts.is_empty()) {
        (true, _) => (vec![1, 10], 64),
        (false, true) => (vec![1, 10, 40, 100, 300], args.layer_kib),
        (false, false) => (args.counts.clone(), args.layer_kib),
    };
    ensure!(
        counts.iter().all(|&n| n >= 1),
        "a layer count is at least 1"
    );
    require_tools(&["containerd", "ctr", "runc", "docker-registry", "busybox"])?;
    let sealctl = sibling_binary("sealctl")?;
    let mut daemons = vec![(
        "this build".to_string(),
        sibling_binary("containerd-sealfs-grpc")?,
    )];
    if let Some(baseline) = &args.baseline_daemon {
        ensure!(
            baseline.is_file(),
            "--baseline-daemon {} is not a file",
            baseline.display()
        );
        daemons.push(("baseline".to_string(), baseline.clone()));
    }
    fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;
    let layout = build_layout(&work, &counts, layer_kib)?;

    let keys = work.join("layers-keys");
    let _ = fs::remove_dir_all(&keys);
    fs::create_dir_all(&keys)?;
    let public = work.join("layers-node.pub");
    run(Command::new(&sealctl)
        .args(["keygen", "--private"])
        .arg(keys.join("node.key"))
        .arg("--public")
        .arg(&public)
        .arg("--force"))?;
    let registry = DockerRegistry::start();
    for layers in &counts {
        eprintln!("sealing the {layers}-layer image into the registry");
        run(Command::new(&sealctl)
            .args(["--insecure", "seal", "--recipient"])
            .arg(&public)
            .arg(format!("oci:{}:n{layers}", layout.display()))
            .arg(format!("docker://{}/layers:n{layers}", registry.host)))?;
    }
    let bench = Bench {
        sealctl,
        keys,
        registry,
        // No background fetch: what is resident is what mounting and reading cost, not how
        // far a prefetch got when the figure was taken.
        daemon_config: format!(
            "[fetch]\nbackground = false\n[cache]\nmemory_mib = {}\n",
            args.memory_cache_mib
        ),
    };
    let mut steps = Vec::new();
    for (name, daemon) in &daemons {
        for &layers in &counts {
            steps.push(
                bench
                    .step(name, daemon, layers)
                    .with_context(|| format!("{name} with {layers} layers"))?,
            );
        }
    }
    let report = table(&steps, args.memory_cache_mib);
    println!("\n{report}");
    let stem = work.join("layers");
    fs::write(stem.with_extension("md"), &report)?;
    fs::write(
        stem.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "layer_kib": layer_kib,
            "memory_cache_mib": args.memory_cache_mib,
            "steps": steps,
        }))?,
    )?;
    eprintln!("wrote {0}.md and {0}.json", stem.display());
    Ok(())
}
