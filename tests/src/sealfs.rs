//! A `containerd-sealfs-grpc` process for tests and benchmarks: its own root, socket, config,
//! log and metrics port; stopped on drop.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `containerd-sealfs-grpc` process with its own root, socket and metrics port.
pub struct SealfsDaemon {
    config: PathBuf,
    /// Its root directory.
    pub root: PathBuf,
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// `127.0.0.1:PORT` of its metrics.
    pub metrics: String,
    log: PathBuf,
    /// Where its config says containerd's socket is (a link made by
    /// [`SealfsDaemon::link_containerd`]: containerd starts after it).
    containerd_link: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    /// The lines of its log, across restarts.
    watch: Option<crate::log_watch::LogWatch>,
}

impl SealfsDaemon {
    /// Starts `binary` with its root, socket, config and log in `dir`, keys from `keys`,
    /// metrics on a free port, and `extra` appended to its config.
    pub fn start(binary: impl AsRef<Path>, dir: &Path, keys: &Path, extra: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let daemon = SealfsDaemon {
            config: dir.join("sealfs.toml"),
            root: dir.join("sealfs-root"),
            // A directory of its own: the daemon makes the socket's directory private.
            socket: dir.join("run/sealfs.sock"),
            metrics: format!("127.0.0.1:{port}"),
            log: dir.join("sealfs.log"),
            containerd_link: dir.join("containerd-link.sock"),
            binary: binary.as_ref().to_path_buf(),
            child: None,
            watch: None,
        };
        fs::write(
            &daemon.config,
            format!(
                "root = \"{}\"\nsocket = \"{}\"\nkeys_dir = \"{}\"\nmetrics_address = \"{}\"\n\
                 log_level = \"info\"\n{extra}\n{}",
                daemon.root.display(),
                daemon.socket.display(),
                keys.display(),
                daemon.metrics,
                // A config with a [cri] table of its own says where containerd is itself.
                if extra.contains("[cri]") {
                    String::new()
                } else {
                    format!(
                        "[cri]\ncontainerd_socket = \"{}\"\n",
                        daemon.containerd_link.display()
                    )
                },
            ),
        )
        .unwrap();
        let mut daemon = daemon;
        daemon.resume();
        daemon
    }

    /// Points the daemon at `containerd` (it reads manifests a pull put into containerd's
    /// content store from there; until then it reads them from the registry).
    pub fn link_containerd(&self, containerd: &crate::containerd::Containerd) {
        let _ = fs::remove_file(&self.containerd_link);
        std::os::unix::fs::symlink(&containerd.socket, &self.containerd_link)
            .expect("linking containerd's socket");
    }

    /// Starts the process (again); waits until it serves its socket (it logs so once the
    /// socket is bound).
    pub fn resume(&mut self) {
        let mut child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting containerd-sealfs-grpc");
        let watch = crate::log_watch::LogWatch::start(
            child.stderr.take().expect("piped stderr"),
            &self.log,
        );
        self.child = Some(child);
        assert!(
            watch.wait_for("serving containerd snapshots", 0, Duration::from_secs(20)),
            "the daemon did not start: {}",
            self.log()
        );
        self.watch = Some(watch);
    }

    /// Runs `containerd-sealfs-grpc release` (the daemon must be stopped); its output.
    pub fn release(&self) -> std::process::Output {
        Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .arg("release")
            .output()
            .expect("running containerd-sealfs-grpc release")
    }

    /// Runs the daemon from `binary` from its next start on (an upgrade).
    pub fn set_binary(&mut self, binary: impl AsRef<Path>) {
        self.binary = binary.as_ref().to_path_buf();
    }

    /// The process id of the session keeper the daemon started, if one runs: the process
    /// whose command line is `... keep-sessions --socket ROOT/session-keeper.sock`.
    pub fn keeper_pid(&self) -> Option<u32> {
        let socket = self.root.join("session-keeper.sock");
        fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.iter().any(|a| *a == b"keep-sessions")
                && args
                    .iter()
                    .any(|a| *a == socket.as_os_str().as_encoded_bytes()))
            .then_some(pid)
        })
    }

    /// How many of process `pid`'s descriptors are `/dev/fuse` connections.
    pub fn fuse_descriptors_of(pid: u32) -> usize {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.flatten()
                    .filter(|fd| {
                        fs::read_link(fd.path())
                            .is_ok_and(|target| target == Path::new("/dev/fuse"))
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Requests the kernel has sent the node's FUSE session and not had answered yet (the
    /// FUSE control filesystem's `waiting`); `None` if the session is not mounted.
    pub fn fuse_requests_waiting(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(self.root.join("layers")).ok()?.dev();
        let connection = format!("/sys/fs/fuse/connections/{}", libc_minor(dev));
        if !Path::new(&connection).exists() {
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"])
                .status();
        }
        fs::read_to_string(format!("{connection}/waiting"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` and waits for the process to end (a minute at most: one that does not
    /// end is a hang, reported with where its threads wait).
    pub fn signal(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("running kill");
            assert!(status.success(), "kill -{signal} failed");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    let stacks = Command::new("sh")
                        .arg("-c")
                        .arg(format!(
                            "for t in /proc/{}/task/*; do cat $t/comm $t/stack; done",
                            child.id()
                        ))
                        .output()
                        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                        .unwrap_or_default();
                    let _ = child.kill();
                    panic!(
                        "the daemon did not end after SIG{signal}:\n{stacks}\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if signal == "TERM" {
                assert!(status.success(), "exit after SIGTERM: {status:?}");
            }
        }
    }

    /// Restarts the daemon and waits until containerd has reconnected to it (containerd
    /// redials a proxy plugin with a backoff of up to 3 s).
    /// Nothing but containerd connects to the socket, so the daemon's first "client
    /// connected" line is containerd's redial. containerd 1.x redials on its own (with its
    /// backoff); 2.x's gRPC leaves a broken connection idle until a call needs it, so one
    /// call is made first to set the redial off (it may fail while the backoff runs).
    pub fn restart(&mut self, containerd: &crate::containerd::Containerd) {
        self.resume();
        let _ = containerd.ctr(&["snapshots", "--snapshotter", "sealfs", "ls"]);
        let watch = self.watch.as_ref().expect("resumed");
        assert!(
            watch.wait_for("snapshots client connected", 0, Duration::from_secs(30)),
            "containerd did not reconnect: {}",
            self.log()
        );
        // containerd may need another redial before a call gets through (its first one can
        // still be in backoff, or its handshake time out on a loaded machine): the restart is
        // done when a call through containerd works.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let listed = containerd.ctr(&["snapshots", "--snapshotter", "sealfs", "ls"]);
            if listed.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "containerd reconnected but cannot list: {}\n{}",
                String::from_utf8_lossy(&listed.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the running process logs a line containing `text`; false if it ended or
    /// `timeout` passed first.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> bool {
        self.watch
            .as_ref()
            .is_some_and(|watch| watch.wait_for(text, 0, timeout))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Mount points of the FUSE mounts under the daemon's root.
    pub fn fuse_mount_points(&self) -> Vec<PathBuf> {
        self.fuse_mounts()
            .iter()
            .filter_map(|line| line.split(' ').nth(4))
            .map(PathBuf::from)
            .collect()
    }

    /// The layer mounts of the daemon: FUSE mounts of its snapshots (each layer's directory of
    /// the node's one FUSE session, bind-mounted at the snapshot's `fs`).
    pub fn fuse_mounts(&self) -> Vec<String> {
        let snapshots = self.root.join("snapshots").display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains(" - fuse")
                    && l.split(' ')
                        .nth(4)
                        .is_some_and(|point| point.starts_with(&snapshots))
            })
            .map(str::to_string)
            .collect()
    }

    /// The node's FUSE session mount, if mounted.
    pub fn fuse_session_mounted(&self) -> bool {
        let session = self.root.join("layers").display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(" - fuse") && l.split(' ').nth(4) == Some(session.as_str()))
    }

    /// The Prometheus text at /metrics.
    pub fn metrics(&self) -> String {
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    /// The sum of every series of the metric family `name` (`name{labels} value` lines).
    pub fn metric_sum(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The value of the series `name` (with its labels, if any), a count.
    pub fn metric(&self, name: &str) -> u64 {
        self.metric_as(name)
    }

    /// The value of the series `name`, a measure (a histogram's `_sum`, say).
    pub fn metric_f64(&self, name: &str) -> f64 {
        self.metric_as(name)
    }

    fn metric_as<T: std::str::FromStr>(&self, name: &str) -> T {
        let text = self.metrics();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim();
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} is {value}, not a number"))
    }
}

impl Drop for SealfsDaemon {
    /// Stops the daemon and unmounts what it leaves for a restart (`release`), so no mount or
    /// session keeper outlives the test.
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let _ = self.release();
    }
}

/// The minor number of a device number (glibc's `gnu_dev_minor`).
fn libc_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)
}
