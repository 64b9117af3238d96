//! `perf startup`: how soon a container from a sealed image does useful work, HelloBench
//! style (pull + create + run until a ready line), side by side with a full pull on
//! overlayfs, over an emulated link to a registry in its own network namespace.
//!
//! Every trial is cold: fresh containerd and snapshotter roots, page cache dropped. The floor
//! of an image is what no lazy puller can beat: the bytes its start-up reads over the link
//! rate, plus its warm run time.

mod chart;
pub mod images;
pub(crate) mod link;
pub(crate) mod netns;
pub(crate) mod trial;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use images::{ImageKind, Scale};
use link::LinkProfile;
use trial::{Bench, Floor, Mode, Transfer, Trial};

use crate::command::{require_tools, run, sibling_binary, which};

/// Options of the start-up benchmark.
#[derive(clap::Args)]
pub struct StartupArgs {
    /// Link between the node and the registry: lan (unshaped), dc (1 Gbit/s, 1 ms RTT) or wan
    /// (100 Mbit/s, 20 ms RTT).
    #[arg(long, default_value = "wan", value_parser = ["lan", "dc", "wan"])]
    profile: String,
    /// Images to run (repeatable; default all).
    #[arg(long = "image", value_enum)]
    images: Vec<ImageKind>,
    /// Modes to compare (repeatable; default all).
    #[arg(long = "mode", value_enum)]
    modes: Vec<Mode>,
    /// Trials per image and mode; the table shows the median and the range.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Where images are built and kept between runs, and results written.
    #[arg(long, default_value = "/var/tmp/sealfs-perf")]
    work: PathBuf,
    /// Smoke test: a small bigdata image, one trial, lan; checks the harness, not the speed.
    #[arg(long)]
    quick: bool,
    /// An argument for `sealctl seal` of the sealed images (repeatable), to compare layout
    /// settings: `--seal-arg=--chunk-size=262144`.
    #[arg(long = "seal-arg", allow_hyphen_values = true)]
    seal_args: Vec<String>,
}

/// One HTTP/1.1 request on `stream`; returns the response body length (headers skipped).
fn http_get(stream: &mut TcpStream, host: &str, path: &str, extra: &str) -> Result<u64> {
    // One request, one segment: no Nagle delay on the probe's own writes.
    stream.set_nodelay(true)?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(
            stream.read(&mut byte)? == 1,
            "connection closed in the headers"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("no content-length")?
        .trim()
        .parse()?;
    std::io::copy(&mut (&*stream).take(length), &mut std::io::sink())?;
    Ok(length)
}

/// Measures the link as clients see it: round trips and the throughput of one blob.
fn probe_link(address: &str, repository: &str, digest: &str, size: u64) -> Result<String> {
    let mut stream = TcpStream::connect(address)?;
    let started = Instant::now();
    http_get(&mut stream, address, "/v2/", "")?;
    let first = started.elapsed();
    let started = Instant::now();
    http_get(&mut stream, address, "/v2/", "")?;
    let rtt = started.elapsed();
    let want = size.min(50 << 20);
    let mut stream = TcpStream::connect(address)?;
    let started = Instant::now();
    let got = http_get(
        &mut stream,
        address,
        &format!("/v2/{repository}/blobs/{digest}"),
        &format!("Range: bytes=0-{}\r\n", want - 1),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "link: first request on a new connection {:.1} ms, round trip {:.1} ms, \
         {:.1} MB blob at {:.1} Mbit/s",
        first.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3,
        got as f64 / 1e6,
        got as f64 * 8.0 / seconds / 1e6
    ))
}

/// The largest layer of a layout's image: (digest, size).
fn largest_layer(layout: &Path) -> Result<(String, u64)> {
    let layout = snapshotter::oci_layout::OciLayout::open(layout)?;
    let image = layout.resolve(Some("latest"))?;
    image
        .manifest
        .layers()
        .iter()
        .max_by_key(|l| l.size())
        .map(|l| (l.digest().to_string(), l.size()))
        .context("an image without layers")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Per image and mode, the median total (pull + run) of its trials.
fn median_totals(trials: &[Trial]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut totals: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for trial in trials {
        totals
            .entry(trial.image.clone())
            .or_default()
            .entry(trial.mode.name().to_string())
            .or_default()
            .push(trial.total_s);
    }
    totals
        .into_iter()
        .map(|(image, modes)| {
            let medians = modes
                .into_iter()
                .map(|(mode, mut values)| (mode, median(&mut values)))
                .collect();
            (image, medians)
        })
        .collect()
}

/// The password of the benchmark's cosign key (made and used by the benchmark only).
const COSIGN_PASSWORD: &str = "sealfs-perf";

/// The Markdown table: per image and mode, medians with ranges and ratios.
fn table(
    trials: &[Trial],
    floors: &BTreeMap<String, Floor>,
    transfers: &BTreeMap<String, Transfer>,
    profile: &LinkProfile,
) -> String {
    let mut out = format!(
        "Start-up on the `{}` link (pull + run to ready; median of trials, range in brackets)\n\n\
         | image | mode | pull s | run s | total s | x overlayfs | x floor | MB to ready | snapshotter peak RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        profile.name
    );
    let mut groups: BTreeMap<(String, String), Vec<&Trial>> = BTreeMap::new();
    for trial in trials {
        groups
            .entry((trial.image.clone(), trial.mode.name().to_string()))
            .or_default()
            .push(trial);
    }
    let medians = median_totals(trials);
    let total_of = |image: &str, mode: &str| medians.get(image)?.get(mode).copied();
    for ((image, mode), group) in &groups {
        let column = |f: fn(&Trial) -> f64| group.iter().map(|t| f(t)).collect::<Vec<_>>();
        let mut totals = column(|t| t.total_s);
        let total = median(&mut totals);
        let range = format!(
            "{total:.2} [{:.2}–{:.2}]",
            totals[0],
            totals[totals.len() - 1]
        );
        let vs_overlay = total_of(image, "overlayfs")
            .map(|base| format!("{:.2}", total / base))
            .unwrap_or_else(|| "–".into());
        let vs_floor = floors
            .get(image)
            .map(|f| format!("{:.2}", total / f.floor_s))
            .unwrap_or_else(|| "–".into());
        let rss = group
            .iter()
            .filter_map(|t| t.snapshotter_peak_rss_kib)
            .max()
            .map(|k| format!("{:.0}", k as f64 / 1024.0))
            .unwrap_or_else(|| "–".into());
        out += &format!(
            "| {image} | {mode} | {:.2} | {:.2} | {range} | {vs_overlay} | {vs_floor} | {:.1} | {rss} |\n",
            median(&mut column(|t| t.pull_s)),
            median(&mut column(|t| t.run_s)),
            median(&mut column(|t| t.bytes_to_ready as f64)) / 1e6,
        );
    }
    for image in floors.keys() {
        if let (Some(plain), Some(profiled)) = (
            total_of(image, Mode::Sealfs.name()),
            total_of(image, Mode::SealfsProfile.name()),
        ) {
            out += &format!(
                "\nProfile gain on `{image}`: sealfs {plain:.2} s, sealfs+profile {profiled:.2} s \
                 ({:.2}x faster).",
                plain / profiled
            );
        }
        let median_pull = |mode: Mode| {
            let mut pulls: Vec<f64> = trials
                .iter()
                .filter(|t| &t.image == image && t.mode == mode)
                .map(|t| t.pull_s)
                .collect();
            (!pulls.is_empty()).then(|| median(&mut pulls))
        };
        if let (Some(plain), Some(signed)) =
            (median_pull(Mode::Sealfs), median_pull(Mode::SealfsSigned))
        {
            out += &format!(
                "\nSignature check on `{image}`: the pull takes {plain:.2} s on a node without a \
                 signature policy, {signed:.2} s on one that requires the image's cosign \
                 signature ({:+.0} ms).",
                (signed - plain) * 1000.0
            );
        }
    }
    out += "\n";
    for (image, floor) in floors {
        out += &format!(
            "\nFloor of `{image}`: the start-up reads {:.1} MB ({} over this link) and runs warm in \
             {:.2} s: {:.2} s.",
            floor.read_bytes as f64 / 1e6,
            match profile.rate_bits {
                Some(rate) => format!("{:.2} s", floor.read_bytes as f64 * 8.0 / rate as f64),
                None => "unshaped".into(),
            },
            floor.warm_s,
            floor.floor_s
        );
    }
    for (image, transfer) in transfers {
        out += &format!(
            "\nBackground fetch of all of `{image}` ({:.1} MB sealed): sealfs fetched {:.1} MB \
             ({:.3} x the image), the link carried {:.1} MB with TCP/IP headers ({:.3} x).",
            transfer.image_bytes as f64 / 1e6,
            transfer.fetched_bytes as f64 / 1e6,
            transfer.fetched_bytes as f64 / transfer.image_bytes as f64,
            transfer.link_bytes as f64 / 1e6,
            transfer.link_bytes as f64 / transfer.image_bytes as f64,
        );
    }
    out + "\n"
}

/// Removes the namespace and detaches mounts under `work` and the trials' scratch
/// directories when the run is interrupted.
fn clean_up_on_interrupt(work: &Path) -> Result<()> {
    let work = work.to_path_buf();
    ctrlc::set_handler(move || {
        eprintln!("interrupted: cleaning up");
        netns::remove();
        sealfs_e2e::unmount_under(&work);
        sealfs_e2e::unmount_under(&std::env::temp_dir().join("."));
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

/// What every start-up benchmark runs: containerd and runc, a registry in a network namespace,
/// and the tools that build and push the images.
pub(crate) const CONTAINER_TOOLS: [&str; 8] = [
    "containerd",
    "ctr",
    "runc",
    "docker-registry",
    "umoci",
    "skopeo",
    "busybox",
    "ip",
];

/// Runs the benchmark.
pub fn run_startup(args: &StartupArgs) -> Result<()> {
    let (profile_name, scale, trials) = if args.quick {
        ("lan", Scale::Quick, 1)
    } else {
        (args.profile.as_str(), Scale::Full, args.trials.max(1))
    };
    let profile = *link::PROFILES
        .iter()
        .find(|p| p.name == profile_name)
        .expect("clap checked the profile");
    let images: Vec<ImageKind> = match (args.quick, args.images.is_empty()) {
        (true, _) => vec![ImageKind::Bigdata],
        (false, true) => vec![ImageKind::Python, ImageKind::Bigdata, ImageKind::Manyfiles],
        (false, false) => args.images.clone(),
    };
    let modes = if args.modes.is_empty() {
        vec![
            Mode::Overlayfs,
            Mode::Ocicrypt,
            Mode::Sealfs,
            Mode::SealfsProfile,
            Mode::SealfsSigned,
        ]
    } else {
        args.modes.clone()
    };
    if which("containerd-stargz-grpc").is_none() {
        eprintln!("note: no containerd-stargz-grpc on PATH: the stargz mode is left out");
    }
    let mut tools = CONTAINER_TOOLS.to_vec();
    if images.contains(&ImageKind::Python) {
        tools.push("debootstrap");
    }
    if modes.contains(&Mode::Ocicrypt) {
        tools.extend(["podman", "openssl"]);
    }
    if modes.contains(&Mode::SealfsSigned) {
        tools.push("cosign");
    }
    require_tools(&tools)?;
    let sealctl = sibling_binary("sealctl")?;
    let daemon = sibling_binary("containerd-sealfs-grpc")?;
    std::fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;
    clean_up_on_interrupt(&work)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let namespace = netns::RegistryNamespace::create()?;
    let registry_dir = work.join("registry");
    let _ = std::fs::remove_dir_all(&registry_dir);
    std::fs::create_dir_all(&registry_dir)?;
    let _registry = namespace.start_registry(&registry_dir)?;
    let direct = format!("{}:5000", netns::REGISTRY_ADDRESS);

    let keys = work.join("keys");
    let _ = std::fs::remove_dir_all(&keys);
    std::fs::create_dir_all(&keys)?;
    run(Command::new(&sealctl)
        .args(["keygen", "--private"])
        .arg(keys.join("node.key"))
        .arg("--public")
        .arg(work.join("node.pub"))
        .arg("--force"))?;
    // Not in `keys`: the sealfs daemon takes every file there for one of its keys.
    let ocicrypt_key = work.join("ocicrypt.pem");
    let ocicrypt_public = work.join("ocicrypt.pub.pem");
    if modes.contains(&Mode::Ocicrypt) {
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&ocicrypt_key)
            .arg("3072"))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&ocicrypt_key)
            .arg("-out")
            .arg(&ocicrypt_public))?;
    }

    // A cosign key pair: sealctl signs the sealed images with it, and the `sealfs+signed`
    // node's policy requires its signature.
    let signed_policy = format!(
        "[signatures]\ndefault = \"require\"\nkeys = [\"{}\"]\n",
        work.join("cosign.pub").display()
    );
    if modes.contains(&Mode::SealfsSigned) {
        for file in ["cosign.key", "cosign.pub"] {
            let _ = std::fs::remove_file(work.join(file));
        }
        run(Command::new("cosign")
            .current_dir(&work)
            .env("COSIGN_PASSWORD", COSIGN_PASSWORD)
            .arg("generate-key-pair"))?;
    }

    let mut probe = None;
    for image in &images {
        let (layout, _) = images::build(*image, scale, &work)?;
        let name = image.name();
        eprintln!("pushing {name} plain, encrypted and sealed to the registry (unshaped)");
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{direct}/{name}:plain")))?;
        if modes.contains(&Mode::Ocicrypt) {
            run(Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false"])
                .arg(format!(
                    "--encryption-key=jwe:{}",
                    ocicrypt_public.display()
                ))
                .arg(format!("oci:{}:latest", layout.display()))
                .arg(format!("docker://{direct}/{name}:{}", Mode::Ocicrypt.tag())))?;
        }
        run(Command::new(&sealctl)
            .args(["--insecure", "seal"])
            .args(&args.seal_args)
            .arg("--recipient")
            .arg(work.join("node.pub"))
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{direct}/{name}:sealed")))?;
        if modes.contains(&Mode::SealfsSigned) {
            run(Command::new(&sealctl)
                .env("COSIGN_PASSWORD", COSIGN_PASSWORD)
                .args(["--insecure", "sign", "--key"])
                .arg(work.join("cosign.key"))
                .arg(format!("docker://{direct}/{name}:{}", Mode::Sealfs.tag())))?;
        }
        if modes.contains(&Mode::SealfsProfile) {
            eprintln!("recording the start-up of {name} (sealctl optimize)");
            let containerd = sealfs_e2e::containerd::Containerd::start();
            run(Command::new(&sealctl)
                .args(["--insecure", "optimize", "--key"])
                .arg(keys.join("node.key"))
                .arg("--address")
                .arg(&containerd.socket)
                .arg(format!("docker://{direct}/{name}:{}", Mode::Sealfs.tag()))
                .arg(format!(
                    "docker://{direct}/{name}:{}",
                    Mode::SealfsProfile.tag()
                )))?;
        }
        if probe.is_none() {
            probe = Some((name, largest_layer(&layout)?));
        }
    }

    let upstream = direct.parse()?;
    let link = runtime.block_on(link::start(profile, upstream))?;
    let address = link.address.to_string();
    if let Some((name, (digest, size))) = &probe {
        println!("{}", probe_link(&address, name, digest, *size)?);
    }

    let bench = Bench {
        sealctl,
        daemon,
        keys,
        ocicrypt_key,
        namespace,
        registry: address,
    };
    let mut results = Vec::new();
    let mut floors = BTreeMap::new();
    let mut transfers = BTreeMap::new();
    for image in &images {
        let name = image.name();
        for mode in &modes {
            for number in 1..=trials {
                let scratch = tempfile::tempdir()?;
                let policy = match mode {
                    Mode::SealfsSigned => signed_policy.as_str(),
                    _ => "",
                };
                let (trial, _running) = bench
                    .trial(name, *mode, scratch.path(), policy)
                    .with_context(|| format!("{name} {} trial {number}", mode.name()))?;
                eprintln!(
                    "{name} {} {number}/{trials}: pull {:.2} s, run {:.2} s, {:.1} MB",
                    mode.name(),
                    trial.pull_s,
                    trial.run_s,
                    trial.bytes_to_ready as f64 / 1e6
                );
                results.push(trial);
            }
        }
        if modes.contains(&Mode::Sealfs) {
            let scratch = tempfile::tempdir()?;
            let floor = bench
                .floor(name, scratch.path(), profile.rate_bits)
                .with_context(|| format!("the floor of {name}"))?;
            floors.insert(name.to_string(), floor);
            let scratch = tempfile::tempdir()?;
            let transfer = bench
                .background_transfer(name, scratch.path())
                .with_context(|| format!("the background fetch of {name}"))?;
            transfers.insert(name.to_string(), transfer);
        }
    }
    drop(link);

    let report = table(&results, &floors, &transfers, &profile);
    println!("\n{report}");
    let stem = work.join(format!("startup-{}", profile.name));
    std::fs::write(stem.with_extension("md"), &report)?;
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "profile": profile.name,
            "quick": args.quick,
            "trials": results,
            "floors": floors,
            "background_transfers": transfers,
        }))?,
    )?;
    let mode_names: Vec<String> = modes.iter().map(|m| m.name().to_string()).collect();
    let medians = median_totals(&results);
    chart::draw(
        &stem.with_extension("png"),
        &format!(
            "Container start-up on the {} link: pull + run to ready",
            profile.name
        ),
        &mode_names,
        &medians,
    )?;
    eprintln!("wrote {0}.md, {0}.json and {0}.png", stem.display());
    Ok(())
}
