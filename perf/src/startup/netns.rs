//! The registry's own network namespace, reached from the host over a veth pair: the veth's
//! counters say how many bytes the registry sent, whoever asked.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// Namespace and interface names (fixed, so a leftover from an interrupted run is found and
/// replaced).
pub const NAMESPACE: &str = "sealfs-perf";
const HOST_SIDE: &str = "sfperf0";
const NS_SIDE: &str = "sfperf1";
const HOST_ADDRESS: &str = "10.231.0.1";
/// The registry's address inside the namespace.
pub const REGISTRY_ADDRESS: &str = "10.231.0.2";

/// Runs `ip ARGS`; an error with what it printed.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespace with the veth pair; removed on drop.
pub struct RegistryNamespace;

impl RegistryNamespace {
    /// Creates it (replacing a leftover one).
    pub fn create() -> Result<Self> {
        remove();
        ip(&["netns", "add", NAMESPACE])?;
        let namespace = RegistryNamespace;
        ip(&[
            "link", "add", HOST_SIDE, "type", "veth", "peer", "name", NS_SIDE,
        ])?;
        ip(&["link", "set", NS_SIDE, "netns", NAMESPACE])?;
        ip(&[
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/30"),
            "dev",
            HOST_SIDE,
        ])?;
        ip(&["link", "set", HOST_SIDE, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", NAMESPACE, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&[
            "addr",
            "add",
            &format!("{REGISTRY_ADDRESS}/30"),
            "dev",
            NS_SIDE,
        ])?;
        in_ns(&["link", "set", NS_SIDE, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// Bytes the namespace has sent to the host so far.
    pub fn bytes_from_registry(&self) -> Result<u64> {
        let path = format!("/sys/class/net/{HOST_SIDE}/statistics/rx_bytes");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()?)
    }

    /// Starts `docker-registry` in the namespace on port 5000 with storage in `dir`; waits
    /// until it answers.
    pub fn start_registry(&self, dir: &Path) -> Result<Registry> {
        start_registry_in(NAMESPACE, &format!("{REGISTRY_ADDRESS}:5000"), dir, "")
    }
}

/// Starts `docker-registry` in network namespace `namespace`, listening on `address`, with
/// storage in `dir` and `extra` appended to its config (a `proxy:` section makes it a
/// pull-through mirror); waits until it answers.
pub(crate) fn start_registry_in(
    namespace: &str,
    address: &str,
    dir: &Path,
    extra: &str,
) -> Result<Registry> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {address}\nlog:\n  level: warn\n{extra}",
            dir.join("data").display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("registry.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", namespace, "docker-registry", "serve"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting docker-registry in a network namespace")?;
    let registry = Registry { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(address).is_err() {
        ensure!(
            Instant::now() < deadline,
            "the registry at {address} did not start (log: {})",
            dir.join("registry.log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(registry)
}

/// The registry process.
pub struct Registry {
    child: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes the namespace (and with it the veth pair), if there is one.
pub fn remove() {
    let _ = Command::new("ip")
        .args(["netns", "del", NAMESPACE])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["link", "del", HOST_SIDE])
        .stderr(Stdio::null())
        .status();
}

impl Drop for RegistryNamespace {
    fn drop(&mut self) {
        remove();
    }
}
