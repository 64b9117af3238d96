//! A node for end-to-end tests: a real containerd with `containerd-sealfs-grpc` as its proxy
//! snapshotter, a real registry, and the node's key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use sealfs_e2e::containerd::Containerd;
use sealfs_e2e::registry::DockerRegistry;
use sealfs_e2e::sealfs::SealfsDaemon;

use super::SEALCTL;

/// The daemon binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_containerd-sealfs-grpc");

/// containerd with sealfs as its `sealfs` snapshotter, a registry, and the node's key.
pub struct Node {
    // Dropped first: containerd, then the daemon (unmounts), then the registry.
    pub containerd: Containerd,
    pub daemon: SealfsDaemon,
    pub registry: DockerRegistry,
}

impl Node {
    pub fn start(work: &Path, extra_config: &str) -> Self {
        Self::start_from(Path::new(DAEMON), work, extra_config)
    }

    /// A node whose containerd does not collect garbage by itself (see
    /// [`Containerd::start_with_sealfs_without_gc`]), for snapshots made by hand.
    pub fn start_without_gc(work: &Path, extra_config: &str) -> Self {
        Self::start_with(
            Path::new(DAEMON),
            work,
            extra_config,
            Containerd::start_with_sealfs_without_gc,
        )
    }

    fn keys_and_registry(work: &Path) -> (std::path::PathBuf, DockerRegistry) {
        let keys = work.join("node-keys");
        fs::create_dir_all(&keys).unwrap();
        fs::copy(work.join("alice.priv"), keys.join("alice.key")).unwrap();
        fs::set_permissions(keys.join("alice.key"), fs::Permissions::from_mode(0o600)).unwrap();
        (keys, DockerRegistry::start())
    }

    /// [`Node::start`] with the daemon run from `binary`.
    pub fn start_from(binary: &Path, work: &Path, extra_config: &str) -> Self {
        Self::start_with(binary, work, extra_config, Containerd::start_with_sealfs)
    }

    /// [`Node::start`] with a config that names the registry (`HOST:PORT`, known only once
    /// it runs).
    pub fn start_naming_registry(work: &Path, extra_config: impl FnOnce(&str) -> String) -> Self {
        let (keys, registry) = Self::keys_and_registry(work);
        let daemon = SealfsDaemon::start(DAEMON, work, &keys, &extra_config(&registry.host));
        let containerd = Containerd::start_with_sealfs(&daemon.socket);
        daemon.link_containerd(&containerd);
        Node {
            containerd,
            daemon,
            registry,
        }
    }

    fn start_with(
        binary: &Path,
        work: &Path,
        extra_config: &str,
        containerd: fn(&Path) -> Containerd,
    ) -> Self {
        let (keys, registry) = Self::keys_and_registry(work);
        let daemon = SealfsDaemon::start(binary, work, &keys, extra_config);
        let containerd = containerd(&daemon.socket);
        daemon.link_containerd(&containerd);
        Node {
            containerd,
            daemon,
            registry,
        }
    }

    pub fn pull(&self, reference: &str) -> std::process::Output {
        self.pull_in("sealfs-test", reference)
    }

    /// `sealctl pull` into containerd namespace `namespace`.
    pub fn pull_in(&self, namespace: &str, reference: &str) -> std::process::Output {
        Command::new(SEALCTL)
            .arg("pull")
            .arg("--address")
            .arg(&self.containerd.socket)
            .args(["--namespace", namespace, reference])
            .output()
            .unwrap()
    }

    /// Pulls `reference` lazily and fails the test if the pull fails.
    pub fn pull_ok(&self, reference: &str) {
        let pulled = self.pull(reference);
        assert!(
            pulled.status.success(),
            "sealctl pull {reference}: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
    }

    /// Pushes the plain `img:v1` as `NAME:v1` and pulls it into the sealfs snapshotter with
    /// plain `ctr` (containerd downloads and unpacks it); its reference.
    pub fn pull_plain(&self, work: &Path, name: &str) -> String {
        let plain = self.registry.push(&work.join("img"), "v1", name);
        self.containerd.ctr_ok(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "sealfs",
            &plain,
        ]);
        plain
    }

    /// `ctr run --snapshotter sealfs` against this node's containerd, to add arguments to.
    pub fn ctr_run(&self) -> Command {
        let mut command = self.containerd.ctr_command();
        command.args(["run", "--snapshotter", "sealfs"]);
        command
    }

    /// Runs a container of `reference` on the sealfs snapshotter; its standard output.
    pub fn run(&self, reference: &str, id: &str, args: &[&str]) -> String {
        let mut all = vec!["run", "--snapshotter", "sealfs", "--rm", reference, id];
        all.extend_from_slice(args);
        let out = self.containerd.ctr(&all);
        assert!(
            out.status.success(),
            "ctr run {id}: {}{}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
