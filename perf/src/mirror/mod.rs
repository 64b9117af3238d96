//! `perf mirror`: a fleet of nodes starting the same sealed image at once, each from the origin
//! registry, then each through a pull-through mirror (distribution's proxy mode), as fleets
//! scale image distribution. Every node is its own network namespace with its own sealfs daemon
//! and containerd; the origin sits behind the emulated link (`wan` by default) that everyone,
//! the mirror too, crosses to reach it; the mirror is on the nodes' LAN. The table prints the
//! bytes the origin sent (until the last node was ready, and until every node held the whole
//! image), the mirror's bytes and the nodes' start times, for both runs side by side.

mod fleet;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sealfs_e2e::containerd::Containerd;
use sealfs_e2e::sealfs::SealfsDaemon;

use crate::command::{require_tools, run, sibling_binary};
use crate::startup::images::{self, ImageKind, Scale};
use crate::startup::link::{self, LinkProfile};
use crate::startup::trial::{ctr_run, image_bytes, run_until_ready, wait_until_whole, Mode};
use fleet::{Fleet, Machine};

/// Options of the mirror benchmark.
#[derive(clap::Args)]
pub struct MirrorArgs {
    /// Nodes that start the image at once.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// The origin's link: between the origin registry and everyone else (the mirror too).
    #[arg(long, default_value = "wan", value_parser = ["lan", "dc", "wan"])]
    profile: String,
    /// The image every node starts.
    #[arg(long, value_enum, default_value = "python")]
    image: ImageKind,
    /// Where the image is built and kept between runs, and results written.
    #[arg(long, default_value = "/var/tmp/sealfs-perf")]
    work: PathBuf,
    /// Smoke test: 3 nodes, the small `bigdata` image, the `lan` link; checks the harness.
    #[arg(long)]
    quick: bool,
}

/// What every node of a run uses.
struct Setup {
    sealctl: PathBuf,
    daemon: PathBuf,
    keys: PathBuf,
    /// `HOST:PORT/NAME:TAG` the nodes start: the origin, through its link.
    reference: String,
}

/// One node of one run.
#[derive(Clone, Debug, serde::Serialize)]
struct NodeResult {
    pull_s: f64,
    /// From the start of the pull to the container's `ready`.
    ready_s: f64,
    /// From the start of the pull until the node held every chunk of the image.
    whole_s: f64,
}

/// Where a run's nodes send their requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Through {
    /// Straight to the origin.
    Origin,
    /// To the mirror; a range read of a blob it still fetches waits for it (the default,
    /// `mirror_fill_wait_secs = 10`).
    Mirror,
    /// To the mirror; such a read goes to the origin at once (`mirror_fill_wait_secs = 0`).
    MirrorNoWait,
}

impl Through {
    fn name(self) -> &'static str {
        match self {
            Through::Origin => "origin",
            Through::Mirror => "mirror",
            Through::MirrorNoWait => "mirror, no wait",
        }
    }

    /// The nodes' `[registry]` settings besides the hosts directory.
    fn daemon_config(self) -> &'static str {
        match self {
            Through::MirrorNoWait => "mirror_fill_wait_secs = 0\n",
            Through::Origin | Through::Mirror => "",
        }
    }
}

/// One run of the whole fleet.
#[derive(Clone, Debug, serde::Serialize)]
struct FleetRun {
    /// Where the nodes' requests go first.
    through: &'static str,
    nodes: Vec<NodeResult>,
    /// Bytes the origin delivered over its link until the last node was ready.
    origin_bytes_to_ready: u64,
    /// Bytes the origin delivered over its link until every node held the whole image.
    origin_bytes: u64,
    /// Bytes the origin sent into its link, with TCP/IP headers and what the link had taken
    /// from streams whose receiver hung up before it was delivered.
    origin_bytes_sent: u64,
    /// Bytes the mirror sent (to the nodes) in the run.
    mirror_bytes: u64,
}

/// The hosts directory (containerd's `hosts.toml` layout) that sends a node's requests for the
/// origin through the mirror, or straight to the origin.
fn write_hosts(dir: &Path, registry: &str, mirror: Option<&str>) -> Result<PathBuf> {
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(hosts.join(registry))?;
    let mut toml = format!("server = \"http://{registry}\"\n");
    if let Some(mirror) = mirror {
        toml +=
            &format!("\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    }
    std::fs::write(hosts.join(registry).join("hosts.toml"), toml)?;
    Ok(hosts)
}

/// What the origin delivered over its link (to the mirror and the nodes together) at the
/// start of a run, and the most it had when a node became ready.
struct OriginBytes<'a> {
    link: &'a link::Link,
    before: u64,
    at_last_ready: std::sync::Mutex<u64>,
}

impl OriginBytes<'_> {
    fn note_ready(&self) {
        let sent = self.link.delivered_down() - self.before;
        let mut at_last_ready = self.at_last_ready.lock().expect("lock");
        *at_last_ready = (*at_last_ready).max(sent);
    }
}

/// Starts node `index`'s daemon and containerd in its namespace, waits for every other node,
/// then pulls and runs the image until `ready`, and waits until the node holds all of it.
fn run_node(
    index: usize,
    setup: &Setup,
    dir: &Path,
    hosts: &Path,
    through: Through,
    start_together: &Barrier,
    origin_bytes: &OriginBytes<'_>,
) -> Result<NodeResult> {
    let machine = Machine::node(index);
    let scratch = dir.join(format!("node{index}"));
    // The test harness's daemons panic when they cannot start; every node must reach the
    // barrier all the same, or the others would wait forever.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<(SealfsDaemon, Containerd)> {
            machine.enter()?;
            std::fs::create_dir_all(&scratch)?;
            let config = format!(
                "[registry]\nhosts_dir = \"{}\"\n{}",
                hosts.display(),
                through.daemon_config()
            );
            let daemon = SealfsDaemon::start(&setup.daemon, &scratch, &setup.keys, &config);
            let containerd = Containerd::start_with_sealfs(&daemon.socket);
            daemon.link_containerd(&containerd);
            Ok((daemon, containerd))
        },
    ));
    start_together.wait();
    let (daemon, containerd) = match started {
        Ok(started) => started.with_context(|| format!("starting node {index}"))?,
        Err(_) => bail!("node {index}'s daemon or containerd did not start"),
    };
    let started = Instant::now();
    run(Command::new(&setup.sealctl)
        .arg("pull")
        .arg("--hosts-dir")
        .arg(hosts)
        .arg("--address")
        .arg(&containerd.socket)
        .args(["--namespace", "sealfs-test", &setup.reference]))
    .with_context(|| format!("node {index}: sealctl pull"))?;
    let pull_s = started.elapsed().as_secs_f64();
    // runc's state is node-wide (/run/containerd/runc/NAMESPACE): one id per node.
    let id = format!("fleet-{index}");
    run_until_ready(
        ctr_run(&containerd, Mode::Sealfs, &setup.reference, &id),
        &setup.reference,
    )
    .with_context(|| format!("node {index}: running the container"))?;
    let ready_s = started.elapsed().as_secs_f64();
    origin_bytes.note_ready();
    wait_until_whole(&daemon, &format!("node {index}"), Duration::from_secs(3600))?;
    let whole_s = started.elapsed().as_secs_f64();
    eprintln!("  node {index}: pull {pull_s:.2} s, ready {ready_s:.2} s, whole {whole_s:.1} s");
    drop(containerd);
    drop(daemon);
    Ok(NodeResult {
        pull_s,
        ready_s,
        whole_s,
    })
}

/// One run of `nodes` nodes, through a fresh mirror or straight to the origin.
fn run_fleet(
    setup: &Setup,
    origin_link: &link::Link,
    work: &Path,
    nodes: usize,
    through: Through,
) -> Result<FleetRun> {
    let with_mirror = through != Through::Origin;
    eprintln!(
        "{nodes} nodes start {} through the {}",
        setup.reference,
        through.name()
    );
    let dir = work.join(format!(
        "through-{}",
        through.name().replace([',', ' '], "")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mirror = Machine::mirror();
    let mirror_address = format!("{}:5000", mirror.address());
    let _mirror_registry = if with_mirror {
        Some(mirror.start_registry(
            &dir.join("mirror"),
            &format!("proxy:\n  remoteurl: http://{}:5000\n", fleet::HOST_ADDRESS),
        )?)
    } else {
        None
    };
    let registry = setup
        .reference
        .split('/')
        .next()
        .context("a reference without a registry")?;
    let hosts = write_hosts(&dir, registry, with_mirror.then_some(&*mirror_address))?;
    let origin = Machine::origin();
    let origin_bytes = OriginBytes {
        link: origin_link,
        before: origin_link.delivered_down(),
        at_last_ready: std::sync::Mutex::new(0),
    };
    let origin_sent_before = origin.bytes_sent()?;
    let mirror_before = mirror.bytes_sent()?;
    let start_together = Barrier::new(nodes);
    let results: Vec<Result<NodeResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..nodes)
            .map(|index| {
                let (hosts, dir) = (&hosts, &dir);
                let (start_together, origin_bytes) = (&start_together, &origin_bytes);
                scope.spawn(move || {
                    run_node(
                        index,
                        setup,
                        dir,
                        hosts,
                        through,
                        start_together,
                        origin_bytes,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a node thread panicked")))
            })
            .collect()
    });
    let nodes: Vec<NodeResult> = results.into_iter().collect::<Result<_>>()?;
    let origin_bytes_to_ready = *origin_bytes.at_last_ready.lock().expect("lock");
    Ok(FleetRun {
        through: through.name(),
        nodes,
        origin_bytes_to_ready,
        origin_bytes: origin_link.delivered_down() - origin_bytes.before,
        origin_bytes_sent: origin.bytes_sent()? - origin_sent_before,
        mirror_bytes: mirror.bytes_sent()? - mirror_before,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn max(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(f64::NAN, f64::max)
}

/// The side-by-side table: the run through the origin is the baseline.
fn table(runs: &[FleetRun], image: &str, image_bytes: u64, profile: &LinkProfile) -> String {
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let mut out = format!(
        "{} nodes start `{image}` ({:.1} MB sealed) at once; the origin is behind the `{}` link. \
         Origin MB: what it delivered over the link; sent: what it put into the link, TCP/IP \
         headers and bytes of streams cut short included\n\n\
         | through | pull s, median | ready s, median [slowest] | whole image on every node s | \
         origin MB to the last ready | origin MB in all | x the image | origin MB sent | mirror MB sent |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        runs.first().map_or(0, |run| run.nodes.len()),
        mb(image_bytes),
        profile.name,
    );
    for run in runs {
        let ready: Vec<f64> = run.nodes.iter().map(|node| node.ready_s).collect();
        out += &format!(
            "| {} | {:.2} | {:.2} [{:.2}] | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |\n",
            run.through,
            median(&run.nodes.iter().map(|node| node.pull_s).collect::<Vec<_>>()),
            median(&ready),
            max(ready.iter().copied()),
            max(run.nodes.iter().map(|node| node.whole_s)),
            mb(run.origin_bytes_to_ready),
            mb(run.origin_bytes),
            run.origin_bytes as f64 / image_bytes as f64,
            mb(run.origin_bytes_sent),
            mb(run.mirror_bytes),
        );
    }
    if let Some((origin, mirrors)) = runs.split_first() {
        out += "\n";
        for mirror in mirrors {
            out += &format!(
                "Through the {}: the origin sent {:.2}x the image against {:.2}x without a \
                 mirror ({:.2}x less); the median node was ready in {:.2} s against {:.2} s.\n",
                mirror.through,
                mirror.origin_bytes as f64 / image_bytes as f64,
                origin.origin_bytes as f64 / image_bytes as f64,
                origin.origin_bytes as f64 / mirror.origin_bytes.max(1) as f64,
                median(&mirror.nodes.iter().map(|n| n.ready_s).collect::<Vec<_>>()),
                median(&origin.nodes.iter().map(|n| n.ready_s).collect::<Vec<_>>()),
            );
        }
    }
    out
}

/// Runs the benchmark.
pub fn run_mirror(args: &MirrorArgs) -> Result<()> {
    let (nodes, image, scale, profile_name) = if args.quick {
        (3, ImageKind::Bigdata, Scale::Quick, "lan")
    } else {
        (args.nodes, args.image, Scale::Full, args.profile.as_str())
    };
    ensure!(
        (1..=fleet::MAX_NODES).contains(&nodes),
        "--nodes must be 1 to {}",
        fleet::MAX_NODES
    );
    let profile = *link::PROFILES
        .iter()
        .find(|p| p.name == profile_name)
        .expect("clap checked the profile");
    let mut tools = crate::startup::CONTAINER_TOOLS.to_vec();
    if image == ImageKind::Python {
        tools.push("debootstrap");
    }
    require_tools(&tools)?;
    let sealctl = sibling_binary("sealctl")?;
    let daemon = sibling_binary("containerd-sealfs-grpc")?;
    std::fs::create_dir_all(&args.work)?;
    let work = args.work.canonicalize()?;
    let fleet_dir = work.join("fleet");
    let interrupted_dir = fleet_dir.clone();
    ctrlc::set_handler(move || {
        eprintln!("interrupted: cleaning up");
        fleet::remove();
        sealfs_e2e::unmount_under(&interrupted_dir);
        sealfs_e2e::unmount_under(&std::env::temp_dir().join("."));
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let _ = std::fs::remove_dir_all(&fleet_dir);
    std::fs::create_dir_all(&fleet_dir)?;

    let (layout, _) = images::build(image, scale, &work)?;
    let _fleet = Fleet::create(nodes)?;
    let origin = Machine::origin();
    let _origin_registry = origin.start_registry(&fleet_dir.join("origin"), "")?;
    let keys = fleet_dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    run(Command::new(&sealctl)
        .args(["keygen", "--private"])
        .arg(keys.join("node.key"))
        .arg("--public")
        .arg(fleet_dir.join("node.pub")))?;
    let direct = format!("{}:5000/{}:sealed", origin.address(), image.name());
    eprintln!("sealing {} into the origin", image.name());
    run(Command::new(&sealctl)
        .args(["--insecure", "seal", "--recipient"])
        .arg(fleet_dir.join("node.pub"))
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{direct}")))?;
    let image_bytes = image_bytes(&direct)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listen = format!("{}:5000", fleet::HOST_ADDRESS);
    let origin_link = runtime.block_on(link::start_on(
        profile,
        listen.parse()?,
        format!("{}:5000", origin.address()).parse()?,
    ))?;
    let setup = Setup {
        sealctl,
        daemon,
        keys,
        reference: format!("{listen}/{}:sealed", image.name()),
    };
    let runs = [Through::Origin, Through::Mirror, Through::MirrorNoWait]
        .into_iter()
        .map(|through| run_fleet(&setup, &origin_link, &fleet_dir, nodes, through))
        .collect::<Result<Vec<_>>>()?;
    let report = table(&runs, image.name(), image_bytes, &profile);
    println!("\n{report}");
    let stem = work.join(format!("mirror-{}", profile.name));
    std::fs::write(stem.with_extension("md"), &report)?;
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "profile": profile.name,
            "image": image.name(),
            "image_bytes": image_bytes,
            "quick": args.quick,
            "runs": runs,
        }))?,
    )?;
    eprintln!("wrote {0}.md and {0}.json", stem.display());
    Ok(())
}
