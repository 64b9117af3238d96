//! One cold trial of one mode: fresh daemons with empty roots, page cache dropped; pull, then
//! create and run the container until it prints `ready`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
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
    /// The ocicrypt-encrypted image, decrypted into podman's storage with `skopeo copy
    /// --decryption-key`, then `podman run` (podman 4.3 has no `--decryption-key` itself).
    Ocicrypt,
    /// The sealed image: `sealctl pull` (lazy) and `ctr run --snapshotter sealfs`.
    Sealfs,
    /// The sealed image with a startup profile recorded by `sealctl optimize`, as `sealfs`.
    #[value(name = "sealfs+profile")]
    #[serde(rename = "sealfs+profile")]
    SealfsProfile,
    /// `sealfs` on a node whose signature policy requires a cosign signature of the image
    /// (signed by `sealctl sign`): what the check costs a pull.
    #[value(name = "sealfs+signed")]
    #[serde(rename = "sealfs+signed")]
    SealfsSigned,
}

impl Mode {
    /// Its name in tables and charts.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Overlayfs => "overlayfs",
            Mode::Ocicrypt => "ocicrypt",
            Mode::Sealfs => "sealfs",
            Mode::SealfsProfile => "sealfs+profile",
            Mode::SealfsSigned => "sealfs+signed",
        }
    }

    /// Whether the mode runs the sealfs snapshotter.
    pub fn is_sealfs(self) -> bool {
        matches!(
            self,
            Mode::Sealfs | Mode::SealfsProfile | Mode::SealfsSigned
        )
    }

    /// The tag of the image this mode runs.
    pub fn tag(self) -> &'static str {
        match self {
            Mode::Overlayfs => "plain",
            Mode::Ocicrypt => "encrypted",
            // The same image as `sealfs`: only the node's policy differs.
            Mode::Sealfs | Mode::SealfsSigned => "sealed",
            Mode::SealfsProfile => "profiled",
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
    /// The ocicrypt private key (PEM) the encrypted images were made for.
    pub ocicrypt_key: PathBuf,
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

/// `ctr run` of `reference` as container `id`.
pub(crate) fn ctr_run(containerd: &Containerd, mode: Mode, reference: &str, id: &str) -> Command {
    let mut command = Command::new("ctr");
    command.arg("--address").arg(&containerd.socket).args([
        "--namespace",
        "sealfs-test",
        "run",
        "--rm",
    ]);
    if mode.is_sealfs() {
        command.args(["--snapshotter", "sealfs"]);
    }
    command.args([reference, id]);
    command
}

/// Podman on its own storage under `scratch`, as root without systemd.
fn podman(scratch: &Path) -> Command {
    let mut command = Command::new("podman");
    command
        .arg("--root")
        .arg(scratch.join("podman-root"))
        .arg("--runroot")
        .arg(scratch.join("podman-run"))
        .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
    command
}

/// `podman run` of `reference`. Podman's default rlimits exceed what this machine's sandbox
/// lets runc set, so the container gets the caller's open-file limits and a modest nproc.
fn podman_run(scratch: &Path, reference: &str) -> Command {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let mut command = podman(scratch);
    command
        .args(["run", "--rm", "--pull", "never", "--network", "none"])
        .arg(format!(
            "--ulimit=nofile={}:{}",
            limit.rlim_cur, limit.rlim_max
        ))
        .args(["--ulimit=nproc=4096:4096", reference]);
    command
}

/// Runs `command` (a container) and returns when it prints `ready`, and the seconds that took;
/// waits for it to exit before returning.
pub(crate) fn run_until_ready(mut command: Command, reference: &str) -> Result<f64> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {reference}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        if line?.trim() == READY {
            ready = Some(started.elapsed().as_secs_f64());
        }
    }
    crate::command::succeeded(child.wait_with_output()?, &format!("running {reference}"))?;
    ready.with_context(|| format!("{reference} exited without printing {READY:?}"))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// What a trial leaves running, so a caller can measure more before it stops.
pub struct Running {
    /// The sealfs daemon (sealfs mode).
    pub daemon: Option<SealfsDaemon>,
    /// containerd (overlayfs and sealfs modes).
    pub containerd: Option<Containerd>,
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
    ) -> Result<(Trial, Running)> {
        let reference = self.reference(image, mode);
        drop_page_cache()?;
        let daemon = mode
            .is_sealfs()
            .then(|| SealfsDaemon::start(&self.daemon, scratch, &self.keys, daemon_config));
        let containerd = match (&daemon, mode) {
            (_, Mode::Ocicrypt) => None,
            (Some(daemon), _) => {
                let containerd = Containerd::start_with_sealfs(&daemon.socket);
                daemon.link_containerd(&containerd);
                Some(containerd)
            }
            (None, _) => Some(Containerd::start()),
        };
        let bytes_before = self.namespace.bytes_from_registry()?;
        let started = Instant::now();
        let run = match &containerd {
            Some(containerd) if mode.is_sealfs() => {
                crate::command::run(
                    Command::new(&self.sealctl)
                        .arg("pull")
                        .arg("--address")
                        .arg(&containerd.socket)
                        .args(["--namespace", "sealfs-test", &reference]),
                )?;
                ctr_run(containerd, mode, &reference, "bench")
            }
            Some(containerd) => {
                crate::command::succeeded(
                    containerd.ctr(&["image", "pull", "--plain-http", &reference]),
                    "ctr image pull",
                )?;
                ctr_run(containerd, mode, &reference, "bench")
            }
            None => {
                let storage = format!(
                    "containers-storage:[overlay@{}+{}]{reference}",
                    scratch.join("podman-root").display(),
                    scratch.join("podman-run").display()
                );
                crate::command::run(
                    Command::new("skopeo")
                        .args(["copy", "--quiet", "--src-tls-verify=false"])
                        .arg("--decryption-key")
                        .arg(&self.ocicrypt_key)
                        .arg(format!("docker://{reference}"))
                        .arg(storage),
                )?;
                podman_run(scratch, &reference)
            }
        };
        let pull_s = started.elapsed().as_secs_f64();
        let run_s = run_until_ready(run, &reference)?;
        let bytes_to_ready = self.namespace.bytes_from_registry()? - bytes_before;
        let snapshotter_peak_rss_kib = daemon.as_ref().and_then(|d| d.pid()).and_then(peak_rss_kib);
        if mode == Mode::Ocicrypt {
            // Podman's storage keeps mounts under scratch (its overlay home); release them so
            // the scratch directory can go.
            let _ = podman(scratch)
                .args(["system", "reset", "--force"])
                .output();
            sealfs_e2e::unmount_under(scratch);
        }
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
            Running { daemon, containerd },
        ))
    }

    /// The floor of an image: the bytes its start-up reads (sealfs without background fetch
    /// fetches only those) over the link rate, plus the warm run time of the same container.
    pub fn floor(&self, image: &str, scratch: &Path, rate_bits: Option<u64>) -> Result<Floor> {
        let (_, running) = self.trial(
            image,
            Mode::Sealfs,
            scratch,
            "[fetch]\nbackground = false\n",
        )?;
        let daemon = running.daemon.expect("sealfs mode runs the daemon");
        let containerd = running.containerd.expect("sealfs mode runs containerd");
        let read_bytes = daemon.metric("sealfs_fetched_bytes_total");
        let reference = self.reference(image, Mode::Sealfs);
        let warm_s = run_until_ready(
            ctr_run(&containerd, Mode::Sealfs, &reference, "warm"),
            &reference,
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

    /// What the background fetch of a whole sealed image costs: start it like a trial, wait
    /// until every chunk of every layer is present, and compare what sealfs fetched (and what
    /// the link carried, TCP/IP headers included) with the sealed image's size.
    pub fn background_transfer(&self, image: &str, scratch: &Path) -> Result<Transfer> {
        let bytes_before = self.namespace.bytes_from_registry()?;
        let (_, running) = self.trial(image, Mode::Sealfs, scratch, "")?;
        let daemon = running.daemon.expect("sealfs mode runs the daemon");
        wait_until_whole(&daemon, image, std::time::Duration::from_secs(1800))?;
        let image_bytes = image_bytes(&self.reference(image, Mode::Sealfs))?;
        Ok(Transfer {
            image_bytes,
            fetched_bytes: daemon.metric("sealfs_fetched_bytes_total"),
            link_bytes: self.namespace.bytes_from_registry()? - bytes_before,
        })
    }
}

/// The bytes of an image in a registry (`HOST/NAME:TAG`, plain HTTP): its layers and config,
/// as its manifest gives them.
pub(crate) fn image_bytes(reference: &str) -> Result<u64> {
    let manifest: serde_json::Value = serde_json::from_str(&crate::command::run(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}")),
    )?)?;
    Ok(manifest["layers"]
        .as_array()
        .context("a manifest without layers")?
        .iter()
        .chain([&manifest["config"]])
        .filter_map(|d| d["size"].as_u64())
        .sum())
}

/// Waits until `daemon` holds every chunk of every layer it mounted (its background fetch is
/// done), at most `limit`; `what` names it in the error.
pub(crate) fn wait_until_whole(
    daemon: &SealfsDaemon,
    what: &str,
    limit: std::time::Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (present, total) = (
            daemon.metric_sum("sealfs_layer_chunks_present"),
            daemon.metric_sum("sealfs_layer_chunks"),
        );
        if total > 0 && present == total {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: the background fetch did not finish in {} s ({present} of {total} chunks)",
            limit.as_secs()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The cost of fetching a whole sealed image in the background.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Transfer {
    /// The sealed image's layers and config, as the manifest gives them.
    pub image_bytes: u64,
    /// Sealed bytes sealfs fetched (range bodies: chunks and tails).
    pub fetched_bytes: u64,
    /// Bytes the registry sent over the link, headers included.
    pub link_bytes: u64,
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
