//! The fleet's network: one bridge in the host's namespace and a network namespace per
//! machine (the origin registry, the mirror, each node), each on the bridge by a veth pair.
//! The host-side end of each pair counts what its machine sent, whoever it sent it to.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

use crate::startup::netns::{ip, start_registry_in, Registry};

/// Names and addresses are fixed, so a leftover of an interrupted run is found and replaced.
const BRIDGE: &str = "sfmbr0";
const PREFIX: &str = "sfm";
const SUBNET: &str = "10.232.0";
/// The host's address on the bridge: the origin's emulated link listens there.
pub const HOST_ADDRESS: &str = "10.232.0.1";
/// Machine numbers (the last byte of their address).
pub const ORIGIN: u8 = 2;
pub const MIRROR: u8 = 3;
const FIRST_NODE: u8 = 10;
/// At most this many nodes (addresses .10 to .209).
pub const MAX_NODES: usize = 200;

/// A machine of the fleet: its namespace and address.
#[derive(Clone, Debug)]
pub struct Machine {
    number: u8,
}

impl Machine {
    /// Node `index` (from 0).
    pub fn node(index: usize) -> Self {
        assert!(index < MAX_NODES, "at most {MAX_NODES} nodes");
        Machine {
            number: FIRST_NODE + index as u8,
        }
    }

    /// The origin registry's machine.
    pub fn origin() -> Self {
        Machine { number: ORIGIN }
    }

    /// The mirror's machine.
    pub fn mirror() -> Self {
        Machine { number: MIRROR }
    }

    /// Its network namespace.
    pub fn namespace(&self) -> String {
        format!("{PREFIX}-{}", self.number)
    }

    /// Its address on the bridge.
    pub fn address(&self) -> String {
        format!("{SUBNET}.{}", self.number)
    }

    fn host_side(&self) -> String {
        format!("{PREFIX}{}h", self.number)
    }

    /// Bytes this machine has sent so far.
    pub fn bytes_sent(&self) -> Result<u64> {
        let path = format!("/sys/class/net/{}/statistics/rx_bytes", self.host_side());
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .parse()?)
    }

    /// Moves the calling thread into this machine's network namespace: processes it starts
    /// from now on run there (their mounts stay in the host's mount namespace, so a node's
    /// containerd sees its snapshotter's FUSE mounts; `ip netns exec` would give each its own).
    pub fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.namespace());
        let namespace = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) with an open namespace file and CLONE_NEWNET changes the network
        // namespace of the calling thread only; no memory is involved.
        let done = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            done == 0,
            "entering {path}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Starts `docker-registry` in this machine's namespace on port 5000, with storage in
    /// `dir` and `extra` appended to its config; waits until it answers.
    pub fn start_registry(&self, dir: &Path, extra: &str) -> Result<Registry> {
        start_registry_in(
            &self.namespace(),
            &format!("{}:5000", self.address()),
            dir,
            extra,
        )
    }
}

/// The bridge and every machine's namespace; removed on drop.
pub struct Fleet {
    machines: Vec<Machine>,
}

impl Fleet {
    /// Creates the bridge, the origin's and the mirror's namespaces and `nodes` nodes'.
    pub fn create(nodes: usize) -> Result<Self> {
        ensure!(nodes <= MAX_NODES, "at most {MAX_NODES} nodes");
        remove();
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        let mut fleet = Fleet {
            machines: Vec::new(),
        };
        ip(&["addr", "add", &format!("{HOST_ADDRESS}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let machines = [Machine::origin(), Machine::mirror()]
            .into_iter()
            .chain((0..nodes).map(Machine::node));
        for machine in machines {
            fleet.add(machine)?;
        }
        Ok(fleet)
    }

    fn add(&mut self, machine: Machine) -> Result<()> {
        let namespace = machine.namespace();
        let host_side = machine.host_side();
        let inside = format!("{PREFIX}{}n", machine.number);
        ip(&["netns", "add", &namespace])?;
        self.machines.push(machine.clone());
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &inside,
        ])?;
        ip(&["link", "set", &inside, "netns", &namespace])?;
        ip(&["link", "set", &host_side, "master", BRIDGE])?;
        ip(&["link", "set", &host_side, "up"])?;
        let in_namespace = |args: &[&str]| {
            let mut all = vec!["netns", "exec", namespace.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_namespace(&[
            "addr",
            "add",
            &format!("{}/24", machine.address()),
            "dev",
            &inside,
        ])?;
        in_namespace(&["link", "set", &inside, "up"])?;
        in_namespace(&["link", "set", "lo", "up"])
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        remove();
    }
}

/// Deletes the bridge and every fleet namespace (with their veth pairs), if there are any.
pub fn remove() {
    let quiet = |args: &[&str]| {
        let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
    };
    if let Ok(namespaces) = std::fs::read_dir("/run/netns") {
        for entry in namespaces.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{PREFIX}-")) {
                quiet(&["netns", "del", &name]);
            }
        }
    }
    quiet(&["link", "del", BRIDGE]);
}
