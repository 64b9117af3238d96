//! A real containerd for tests: its own config, root, state and socket in a temporary
//! directory, started on demand and stopped (with its mounts cleaned) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running containerd.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    /// The gRPC socket.
    pub socket: PathBuf,
}

impl Containerd {
    /// Starts containerd with a private root; waits (bounded) until it answers.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts containerd with a proxy snapshotter plugin `name` served on `socket`.
    pub fn start_with_snapshotter(name: &str, socket: &Path) -> Self {
        Self::start_with(&format!(
            "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            socket.display()
        ))
    }

    /// Starts containerd with `extra` appended to its config (TOML, version 2).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n{extra}",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .expect("writing the containerd config");
        let log = std::fs::File::create(dir.path().join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd (is it installed?)");
        let containerd = Containerd { dir, child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    /// Runs `ctr` against this containerd, in namespace `sealfs-test`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "sealfs-test"])
            .args(args)
            .output()
            .expect("running ctr")
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
