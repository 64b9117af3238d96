//! One cold trial of one mode: fresh daemons with empty roots, page cache dropped; pull, then
//! create and run the container until it prints `ready`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use sealfs_e2e::containerd::Containerd;
use sealfs_e2e::sealfs::SealfsDaemon;

use super::images::READY;
use super::netns::RegistryNamespace;

/// How an image gets to a running container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The plain image: `ctr image pull` (download, unpack) and `ctr run` on overlayfs.
    Overlayfs,
    /// The sealed image: `sealctl pull` (lazy) and `ctr run --snapshotter sealfs`.
    Sealfs,
}

impl Mode {
    /// The tag of the image this mode runs.
    pub fn tag(self) -> &'static str {
        match self {
            Mode::Overlayfs => "plain",
            Mode::Sealfs => "sealed",
        }
    }
}

/// What one trial measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Trial {
    /// Image name.
    pub image: String,
    /// Mode.
    pub mode: Mode,
    /// Seconds to pull.
    pub pull_s: f64,
    /// Seconds from `ctr run` to the `ready` line.
    pub run_s: f64,
    /// Pull plus run.
    pub total_s: f64,
    /// Bytes the registry sent until `ready`.
    pub bytes_to_ready: u64,
    /// Peak resident memory of the snapshotter daemon (KiB), for modes that run one.
    pub snapshotter_peak_rss_kib: Option<u64>,
}

/// Binaries and settings every trial uses.
pub struct Bench {
    /// `sealctl`.
    pub sealctl: PathBuf,
    /// `containerd-sealfs-grpc`.
    pub daemon: PathBuf,
    /// A directory with the node's private key.
    pub keys: PathBuf,
    /// The registry namespace (byte counters).
    pub namespace: RegistryNamespace,
    /// `HOST:PORT` clients pull from (the emulated link).
    pub registry: String,
}

fn drop_page_cache() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

fn check(out: std::process::Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `ctr run` and returns when the container prints `ready`, and the seconds that took;
/// waits for it to exit before returning.
fn run_until_ready(containerd: &Containerd, mode: Mode, reference: &str, id: &str) -> Result<f64> {
    let mut command = Command::new("ctr");
    command.arg("--address").arg(&containerd.socket).args([
        "--namespace",
        "sealfs-test",
        "run",
        "--rm",
    ]);
    if mode == Mode::Sealfs {
        command.args(["--snapshotter", "sealfs"]);
    }
    let started = Instant::now();
    let mut child = command
        .args([reference, id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ctr")?;
    let stdout = child.stdout.take().expect("piped");
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        if line?.trim() == READY {
            ready = Some(started.elapsed().as_secs_f64());
        }
    }
    let out = child.wait_with_output()?;
    check(out, &format!("ctr run {reference}"))?;
    ready.with_context(|| format!("{reference} exited without printing {READY:?}"))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Bench {
    /// The image reference a mode pulls.
    pub fn reference(&self, image: &str, mode: Mode) -> String {
        format!("{}/{image}:{}", self.registry, mode.tag())
    }

    /// One cold trial. `daemon_config` is appended to the sealfs daemon's config.
    pub fn trial(
        &self,
        image: &str,
        mode: Mode,
        scratch: &Path,
        daemon_config: &str,
    ) -> Result<(Trial, Option<SealfsDaemon>, Containerd)> {
        let reference = self.reference(image, mode);
        drop_page_cache()?;
        let daemon = match mode {
            Mode::Sealfs => Some(SealfsDaemon::start(
                &self.daemon,
                scratch,
                &self.keys,
                daemon_config,
            )),
            Mode::Overlayfs => None,
        };
        let containerd = match &daemon {
            Some(daemon) => Containerd::start_with_snapshotter("sealfs", &daemon.socket),
            None => Containerd::start(),
        };
        let bytes_before = self.namespace.bytes_from_registry()?;
        let started = Instant::now();
        match mode {
            Mode::Overlayfs => check(
                containerd.ctr(&["image", "pull", "--plain-http", &reference]),
                "ctr image pull",
            )?,
            Mode::Sealfs => check(
                Command::new(&self.sealctl)
                    .arg("pull")
                    .arg("--address")
                    .arg(&containerd.socket)
                    .args(["--namespace", "sealfs-test", &reference])
                    .output()?,
                "sealctl pull",
            )?,
        }
        let pull_s = started.elapsed().as_secs_f64();
        let run_s = run_until_ready(&containerd, mode, &reference, "bench")?;
        let bytes_to_ready = self.namespace.bytes_from_registry()? - bytes_before;
        let snapshotter_peak_rss_kib = daemon.as_ref().and_then(|d| d.pid()).and_then(peak_rss_kib);
        Ok((
            Trial {
                image: image.to_string(),
                mode,
                pull_s,
                run_s,
                total_s: pull_s + run_s,
                bytes_to_ready,
                snapshotter_peak_rss_kib,
            },
            daemon,
            containerd,
        ))
    }

    /// The floor of an image: the bytes its start-up reads (sealfs without background fetch
    /// fetches only those) over the link rate, plus the warm run time of the same container.
    pub fn floor(&self, image: &str, scratch: &Path, rate_bits: Option<u64>) -> Result<Floor> {
        let (_, daemon, containerd) = self.trial(
            image,
            Mode::Sealfs,
            scratch,
            "[fetch]\nbackground = false\n",
        )?;
        let daemon = daemon.expect("sealfs mode runs the daemon");
        let read_bytes = daemon.metric("sealfs_fetched_bytes_total");
        let warm_s = run_until_ready(
            &containerd,
            Mode::Sealfs,
            &self.reference(image, Mode::Sealfs),
            "warm",
        )?;
        let transfer_s = rate_bits
            .map(|rate| read_bytes as f64 * 8.0 / rate as f64)
            .unwrap_or(0.0);
        ensure!(read_bytes > 0, "the start-up of {image} read nothing");
        Ok(Floor {
            read_bytes,
            warm_s,
            floor_s: transfer_s + warm_s,
        })
    }
}

/// The physical limit of a start-up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Floor {
    /// Bytes of chunks the start-up reads.
    pub read_bytes: u64,
    /// Run-to-ready with everything cached.
    pub warm_s: f64,
    /// `read_bytes / rate + warm_s`.
    pub floor_s: f64,
}
