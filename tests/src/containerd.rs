//! A real containerd for tests: its own config, root, state and socket in a temporary
//! directory, started on demand and stopped (with its mounts cleaned) on drop.
//!
//! Whichever `containerd` and `ctr` come first on PATH run: Debian 12's 1.6, or 2.x unpacked
//! by `scripts/install-deps.sh` (`scripts/test.sh` puts it first on PATH for a second run of
//! the end-to-end tests). The config is written in the version that containerd reads: version
//! 2 for 1.x, version 3 (with the transfer service's unpack configuration) for 2.x.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A running containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    /// The gRPC socket (containerd's API and, on it too, CRI's).
    pub socket: PathBuf,
    /// The namespace `ctr` works in: `sealfs-test`, or CRI's `k8s.io` for a CRI node.
    pub namespace: &'static str,
}

impl Containerd {
    /// Starts containerd with a private root; waits (bounded) until it answers.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts containerd with sealfs as its `sealfs` snapshotter, served on `socket`, configured
    /// with the snippet the project ships for that containerd version
    /// (`snapshotter/packaging/containerd-snippet.toml` for 1.x, `containerd2-snippet.toml`
    /// for 2.x, which also lets the transfer service unpack for sealfs), so the end-to-end
    /// tests prove what operators install.
    pub fn start_with_sealfs(socket: &Path) -> Self {
        Self::start_with(&sealfs_snippet(socket))
    }

    /// Like [`Self::start_with_sealfs`], with containerd's garbage collector not run by itself:
    /// for tests that make snapshots with no image, container or lease holding them (`ctr
    /// snapshots prepare`), which any collection removes. containerd collects once shortly
    /// after it starts, late on a busy machine; collections a test asks for (`rm --sync`)
    /// still run.
    pub fn start_with_sealfs_without_gc(socket: &Path) -> Self {
        Self::start_with(&format!(
            "{}[plugins.\"io.containerd.gc.v1.scheduler\"]\n  startup_delay = \"24h\"\n  \
             mutation_threshold = 1000000\n",
            sealfs_snippet(socket)
        ))
    }

    /// Like [`Self::start_with_sealfs`], with containerd's CRI plugin set up as a Kubernetes
    /// node with sealfs needs it (`docs/kubernetes.md`): sealfs as the CRI snapshotter,
    /// `sandbox_image` (a local image), registry hosts from `hosts_dir` (containerd's
    /// `hosts.toml` layout), and `restrict_oom_score_adj` (root here may not lower OOM scores).
    /// In the config version of the containerd that runs. On 2.x, `pull` picks how CRI pulls.
    pub fn start_with_sealfs_cri(
        socket: &Path,
        sandbox_image: &str,
        hosts_dir: &Path,
        pull: CriPull,
    ) -> Self {
        let hosts = hosts_dir.display();
        let (cri, images) = if major_version() >= 2 {
            // CRI's own snapshot annotations make 2.x fall back to its local pull; without
            // them it pulls through the transfer service, whose unpacker passes the layer
            // annotations because the proxy plugin exports enable_remote_snapshot_annotations.
            let annotations = match pull {
                CriPull::TransferService => "",
                CriPull::Local => "  disable_snapshot_annotations = false\n",
            };
            (
                String::new(),
                format!(
                    "[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"sealfs\"\n{annotations}  \
                     [plugins.\"io.containerd.cri.v1.images\".pinned_images]\n    \
                     sandbox = \"{sandbox_image}\"\n  \
                     [plugins.\"io.containerd.cri.v1.images\".registry]\n    config_path = \"{hosts}\"\n\
                     [plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true\n"
                ),
            )
        } else {
            (
                format!(
                    "  sandbox_image = \"{sandbox_image}\"\n  restrict_oom_score_adj = true\n  \
                     [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"sealfs\"\n    \
                     disable_snapshot_annotations = false\n  \
                     [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{hosts}\"\n"
                ),
                String::new(),
            )
        };
        let mut node = Self::start_configured(&cri, &(sealfs_snippet(socket) + &images));
        node.namespace = "k8s.io";
        node
    }

    /// Starts containerd with `extra` appended to its config (TOML, in the config version of
    /// the containerd that runs: see [`major_version`]).
    pub fn start_with(extra: &str) -> Self {
        Self::start_configured("", extra)
    }

    /// Starts containerd with `cri` (keys and subtables of the CRI plugin's table, config
    /// version 2) and `extra` (whole tables) in its config.
    fn start_configured(cri: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        let version = if major_version() >= 2 { 3 } else { 2 };
        // containerd 2.x serves NRI on one fixed socket (/var/run/nri/nri.sock) by default:
        // two test containerds started at once would fight over it, and the loser's CRI
        // plugin stops it. Each gets its own.
        let nri = if version == 3 {
            format!(
                "[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = \"{}\"\n",
                dir.path().join("nri.sock").display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "version = {version}\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n{cri}{extra}\n{nri}",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .expect("writing the containerd config");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting containerd (is it installed?)");
        let log = crate::log_watch::LogWatch::start(
            child.stderr.take().expect("piped stderr"),
            &dir.path().join("containerd.log"),
        );
        let containerd = Containerd {
            dir,
            child,
            socket,
            namespace: "sealfs-test",
        };
        // containerd's last line of start-up (1.x and 2.x alike); its API serves from then on.
        assert!(
            log.wait_for("containerd successfully booted", 0, Duration::from_secs(30)),
            "containerd did not start: {}",
            containerd.log()
        );
        let version = containerd.ctr(&["version"]);
        assert!(
            version.status.success(),
            "containerd booted but does not answer: {}{}",
            String::from_utf8_lossy(&version.stderr),
            containerd.log()
        );
        containerd
    }

    /// `ctr` against this containerd, in its namespace, to add arguments to.
    pub fn ctr_command(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", self.namespace]);
        command
    }

    /// Runs `ctr` against this containerd, in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command().args(args).output().expect("running ctr")
    }

    /// Runs `ctr` and fails the test with its output if it fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The private directory (root, state, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshot mounts under the private root would pin the temporary directory.
        crate::unmount_under(self.dir.path());
    }
}

/// How containerd 2.x's CRI plugin pulls (1.x has only its own pull, with CRI's annotations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriPull {
    /// Through the transfer service (2.x's default).
    TransferService,
    /// CRI's local pull, which `disable_snapshot_annotations = false` selects on 2.x.
    Local,
}

/// The containerd config snippet the project ships for the containerd on PATH, with sealfs's
/// socket at `socket`.
fn sealfs_snippet(socket: &Path) -> String {
    const SNIPPET_V2: &str = include_str!("../../snapshotter/packaging/containerd-snippet.toml");
    const SNIPPET_V3: &str = include_str!("../../snapshotter/packaging/containerd2-snippet.toml");
    let snippet = if major_version() >= 2 {
        SNIPPET_V3
    } else {
        SNIPPET_V2
    };
    snippet.replace(
        "\"/run/sealfs/sealfs.sock\"",
        &format!("\"{}\"", socket.display()),
    )
}

/// The major version of the `containerd` on PATH (1 for Debian 12's 1.6, 2 for 2.x), read
/// once from `containerd --version` (`containerd github.com/containerd/containerd[/v2] X.Y.Z...`).
pub fn major_version() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new("containerd")
            .arg("--version")
            .output()
            .expect("running containerd --version (is it installed?)");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.trim_start_matches('v').split('.').next()?.parse().ok())
            .unwrap_or_else(|| panic!("cannot read containerd's version from {text:?}"))
    })
}

/// OCI chain ids from diff ids: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::new();
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(previous) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{previous} {diff}")))
            ),
        };
        out.push(next);
    }
    out
}
