//! Running containers survive restarts of the snapshotter daemon: SIGTERM, `kill -9`, an
//! upgrade of its binary, restarts while the background fetch runs and while a read waits on
//! a stalled registry. Real containerd, runc, registry and FUSE; the container checks what it
//! reads against checksums of the plain image's files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::node::{Node, DAEMON};
use common::*;
use sealfs_e2e::containerd::Containerd;
use sealfs_e2e::sealfs::SealfsDaemon;

/// Files the looping container checks on every pass (two of the six 4 MiB blobs, so the
/// rest is left to the background fetch).
const CHECKED: &[&str] = &[
    "bin/busybox",
    "etc/greeting",
    "etc/motd",
    "data/big.bin",
    "data/blobs/blob-0",
    "data/blobs/blob-1",
];

/// Checks every file of /out/expected in a loop, counting passes in /out/passes and writing
/// what failed to /out/failures.
const CHECK_LOOP: &str = "cd / && n=0; while :; do \
     if busybox sha256sum -c /out/expected > /out/last 2>&1; then \
       n=$((n+1)); echo $n > /out/passes.new; busybox mv /out/passes.new /out/passes; \
     else busybox cat /out/last >> /out/failures; fi; \
     done";

/// A container started with `ctr run -d`, killed and removed on drop (before the node's
/// containerd goes: declare it after the node).
struct Detached<'a> {
    containerd: &'a Containerd,
    id: String,
}

impl Detached<'_> {
    /// Runs `args` in it (`ctr task exec`); its standard output.
    fn exec(&self, exec_id: &str, args: &[&str]) -> String {
        let mut all = vec!["task", "exec", "--exec-id", exec_id, &self.id];
        all.extend_from_slice(args);
        self.containerd.ctr_ok(&all)
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        let _ = self
            .containerd
            .ctr(&["task", "kill", "-s", "KILL", &self.id]);
        let _ = self.containerd.ctr(&["task", "rm", "-f", &self.id]);
        let _ = self.containerd.ctr(&["container", "rm", &self.id]);
    }
}

fn run_detached<'a>(
    containerd: &'a Containerd,
    image: &str,
    id: &str,
    out: &Path,
    args: &[&str],
) -> Detached<'a> {
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    // runc's state outlives a test's containerd: a name of this process's own cannot meet a
    // container an aborted earlier run left.
    let id = format!("{id}-{}", std::process::id());
    let mut all = vec![
        "run",
        "-d",
        "--snapshotter",
        "sealfs",
        "--mount",
        &mount,
        image,
        &id,
    ];
    all.extend_from_slice(args);
    containerd.ctr_ok(&all);
    Detached { containerd, id }
}

/// A container of `image` that only sleeps, for `ctr task exec` to read its files.
fn run_sleeper<'a>(containerd: &'a Containerd, image: &str, out: &Path) -> Detached<'a> {
    run_detached(
        containerd,
        image,
        "sleeper",
        out,
        &["/bin/busybox", "sleep", "3600"],
    )
}

/// Waits up to `timeout` for `check`, looking every 20 ms; fails the test with `what` and
/// `context()` if it never holds.
fn wait_until(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The plain image's checksums of [`CHECKED`], as `sha256sum -c` reads them.
fn expected_checksums(work: &Path) -> String {
    let out = run(Command::new("sha256sum")
        .current_dir(work.join("bundle/rootfs"))
        .args(CHECKED));
    String::from_utf8(out.stdout).unwrap()
}

/// Empties the kernel's page, dentry and inode caches, so the next reads of the layers reach
/// the daemon (the container would otherwise read its files from memory).
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
}

/// The looping container's progress.
struct Loop {
    out: PathBuf,
}

impl Loop {
    fn passes(&self) -> u64 {
        fs::read_to_string(self.out.join("passes"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    fn failures(&self) -> String {
        fs::read_to_string(self.out.join("failures")).unwrap_or_default()
    }

    /// Waits for two whole passes from now (the first may have begun before now), and fails
    /// if any pass failed so far.
    fn two_more_passes(&self, node: &Node, when: &str) {
        let from = self.passes();
        wait_until(
            &format!("the container checked its files twice {when}"),
            Duration::from_secs(120),
            || {
                format!(
                    "failures: {}\n--- daemon log ---\n{}",
                    self.failures(),
                    node.daemon.log()
                )
            },
            || self.passes() >= from + 2 || !self.failures().is_empty(),
        );
        assert_eq!(self.failures(), "", "wrong or unreadable bytes {when}");
    }
}

/// Seals the app image for the node's key, pushes and pulls it lazily; its reference, its
/// layer count, and a directory for the container to write to (`/out`).
fn pull_app(node: &Node, work: &Path) -> (String, usize, PathBuf) {
    let Sealed {
        reference, layers, ..
    } = push_sealed(work, &node.registry, "alice", "app");
    node.pull_ok(&reference);
    let out = work.join("out");
    fs::create_dir_all(&out).unwrap();
    (reference, layers, out)
}

/// Kills the session keeper `keeper` and waits until the daemon has started another that holds
/// the session; returns the new keeper.
fn kill_and_replace_keeper(node: &Node, keeper: u32) -> u32 {
    run(Command::new("kill").args(["-KILL", &keeper.to_string()]));
    wait_until(
        "another keeper holds the session",
        Duration::from_secs(60),
        || node.daemon.log(),
        || {
            // Holding it: the new keeper has the connection's descriptor.
            node.daemon
                .keeper_pid()
                .is_some_and(|pid| pid != keeper && SealfsDaemon::fuse_descriptors_of(pid) == 1)
                && node.daemon.metric("sealfs_fuse_session_kept") == 1
        },
    );
    node.daemon.keeper_pid().expect("a keeper runs")
}

/// The container reads its greeting (`exec_id` names the `ctr task exec`).
fn assert_greets(container: &Detached, exec_id: &str) {
    assert_eq!(
        container.exec(exec_id, &["/bin/busybox", "cat", "/etc/greeting"]),
        format!("{GREETING}\n"),
        "the greeting read by {exec_id}"
    );
}

/// One session on the node: a keeper holding one `/dev/fuse` descriptor, and one mount per
/// layer (`layers`), nothing doubled or left over. Returns the keeper.
fn assert_one_kept_session(node: &Node, layers: usize) -> u32 {
    let keeper = node.daemon.keeper_pid().expect("a session keeper runs");
    assert_eq!(SealfsDaemon::fuse_descriptors_of(keeper), 1);
    assert_eq!(node.daemon.fuse_mounts().len(), layers);
    keeper
}

/// `(chunks present in a cache, chunks)` summed over the mounted layers.
fn background_progress(daemon: &SealfsDaemon) -> (u64, u64) {
    (
        daemon.metric_sum("sealfs_layer_chunks_present"),
        daemon.metric_sum("sealfs_layer_chunks"),
    )
}

#[test]
fn running_containers_keep_reading_across_stops_kills_upgrades_and_background_fetches() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    // The daemon starts from a binary that the upgrade below deletes, as a package upgrade
    // replaces it; the background fetch is slow enough to be running during the restarts.
    let old_binary = work.join("old/containerd-sealfs-grpc");
    fs::create_dir_all(old_binary.parent().unwrap()).unwrap();
    fs::copy(DAEMON, &old_binary).unwrap();
    let mut node = Node::start_from(
        &old_binary,
        &work,
        "[fetch]\nbackground_mib_per_sec = 1\nbackground_after_mount_ms = 0\n",
    );
    let (reference, layers, out) = pull_app(&node, &work);
    fs::write(out.join("expected"), expected_checksums(&work)).unwrap();
    let checks = Loop { out: out.clone() };
    let container = run_detached(
        &node.containerd,
        &reference,
        "reader",
        &out,
        &["/bin/sh", "-c", CHECK_LOOP],
    );
    checks.two_more_passes(&node, "before any restart");
    let keeper = node
        .daemon
        .keeper_pid()
        .expect("the daemon started a session keeper");

    for (signal, when) in [
        ("TERM", "after SIGTERM and a start"),
        ("KILL", "after kill -9 and a start"),
    ] {
        node.daemon.signal(signal);
        // Whatever the container reads next, the daemon must serve: nothing is cached.
        drop_caches();
        node.daemon.restart(&node.containerd);
        checks.two_more_passes(&node, when);
        assert_greets(&container, &format!("greet-{signal}"));
    }

    // Three restarts in a row while the background fetch has work left.
    let (present, total) = background_progress(&node.daemon);
    assert!(
        present < total,
        "the background fetch already ended: {present}/{total}"
    );
    for (i, signal) in ["TERM", "KILL", "TERM"].into_iter().enumerate() {
        node.daemon.signal(signal);
        drop_caches();
        if i < 2 {
            node.daemon.resume();
        } else {
            node.daemon.restart(&node.containerd);
        }
    }
    checks.two_more_passes(&node, "after three restarts during the background fetch");
    assert_greets(&container, "greet-after-three");
    // The background fetch goes on where it was, to the end.
    wait_until(
        "the background fetch ends",
        Duration::from_secs(120),
        || format!("{:?}", background_progress(&node.daemon)),
        || {
            let (present, total) = background_progress(&node.daemon);
            present == total
        },
    );

    // The keeper killed: the daemon starts another and hands it the session, so the restart
    // below still finds it.
    assert_eq!(node.daemon.metric("sealfs_fuse_session_kept"), 1);
    let keeper = kill_and_replace_keeper(&node, keeper);

    // Again, now that the keeper is this daemon's own child: the dead one is reaped when it
    // is replaced, not left a zombie while the daemon runs.
    kill_and_replace_keeper(&node, keeper);
    let state = fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap_or_default();
    assert!(
        !state.contains(") Z "),
        "the replaced keeper {keeper} is a zombie of the daemon: {state}"
    );
    let keeper = node.daemon.keeper_pid().unwrap();

    // An upgrade: the running binary is replaced on disk (deleted here), the new one started.
    // The keeper is killed again just before the stop: the stopping daemon itself must see
    // that and hand the session to another keeper, or the containers lose their files.
    run(Command::new("kill").args(["-KILL", &keeper.to_string()]));
    node.daemon.signal("TERM");
    fs::remove_file(&old_binary).unwrap();
    node.daemon.set_binary(DAEMON);
    drop_caches();
    node.daemon.restart(&node.containerd);
    checks.two_more_passes(&node, "after an upgrade of the binary");
    assert_greets(&container, "greet-upgraded");

    // A keeper started by the stopping daemon, holding the one session; no mount left over
    // or doubled.
    assert_one_kept_session(&node, layers);
    assert!(node.daemon.fuse_session_mounted());
    assert!(
        !node.daemon.log().contains("detached a dead FUSE session"),
        "{}",
        node.daemon.log()
    );
    // Stops with fetches running ended quietly: no thread panicked in any daemon.
    assert!(
        !node.daemon.log().contains("panicked"),
        "{}",
        node.daemon.log()
    );
    // A new container on the same image after all of it.
    assert_eq!(node.run(&reference, "fresh", &[]), format!("{GREETING}\n"));
    drop(container);
}

#[test]
fn a_read_waiting_on_a_stalled_registry_completes_after_a_restart_and_twenty_restarts_leak_nothing()
{
    let Some((_temp, work)) = app_image() else {
        return;
    };
    // No background fetch: the read below is the first of its chunks.
    let mut node = Node::start(&work, "[fetch]\nbackground = false\n");
    let (reference, layers, out) = pull_app(&node, &work);
    let container = run_sleeper(&node.containerd, &reference, &out);
    let reader = stalled_read(&node, &container);
    // Restarted while the request hangs; the registry answers once the new daemon serves.
    node.daemon.signal("TERM");
    assert!(
        !node.daemon.log().contains("panicked"),
        "a clean stop with a fetch in flight: {}",
        node.daemon.log()
    );
    node.daemon.restart(&node.containerd);
    node.registry.thaw();
    assert_stalled_read_completes(&node, reader, &work);

    // Twenty restarts, killed and stopped in turn: still one session, one descriptor, the
    // same mounts.
    let keeper = node.daemon.keeper_pid().expect("a session keeper runs");
    for i in 0..20 {
        node.daemon.signal(if i % 2 == 0 { "KILL" } else { "TERM" });
        if i < 19 {
            node.daemon.resume();
        } else {
            node.daemon.restart(&node.containerd);
        }
    }
    assert_eq!(assert_one_kept_session(&node, layers), keeper);
    let sessions = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| {
            line.contains(" - fuse.sealfs ") && line.contains(&*node.daemon.root.to_string_lossy())
        })
        .count();
    assert_eq!(
        sessions,
        layers + 1,
        "the session and one bind mount per layer"
    );
    drop_caches();
    assert_greets(&container, "greet");

    // The node's key removed: a restart cannot open the layers again, and says so.
    fs::remove_file(work.join("node-keys/alice.key")).unwrap();
    node.daemon.signal("TERM");
    node.daemon.restart(&node.containerd);
    assert!(
        node.daemon
            .log()
            .contains("layers of the resumed FUSE session could not be opened again"),
        "{}",
        node.daemon.log()
    );
    // (The counter is the new daemon's own.)
    assert_eq!(
        node.daemon.metric("sealfs_remote_mount_failures_total"),
        layers as u64
    );
    drop(container);
}

/// The file [`stalled_read`] reads, never read before it.
const STALLED_FILE: &str = "data/blobs/blob-3";

/// Reads every page of busybox in `container` (so the programs below need nothing more from
/// the registry), hangs the registry, and starts a read of a file never read before; returns
/// once that read waits in the daemon for its chunk.
fn stalled_read(node: &Node, container: &Detached) -> std::process::Child {
    container.exec("warm", &["/bin/busybox", "sha256sum", "/bin/busybox"]);
    node.registry.freeze();
    let mut reader = node.containerd.ctr_command();
    reader.args(["task", "exec", "--exec-id", "stalled", &container.id]);
    reader.args(["/bin/busybox", "sha256sum", &format!("/{STALLED_FILE}")]);
    let reader = reader
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the read waits in the daemon for its chunk",
        Duration::from_secs(60),
        || node.daemon.log(),
        || node.daemon.metric("sealfs_reads_waiting") > 0,
    );
    reader
}

/// Waits (at most a minute) for the read [`stalled_read`] started to end, and checks that it
/// succeeded with the bytes of [`STALLED_FILE`] in the plain image.
fn assert_stalled_read_completes(node: &Node, mut reader: std::process::Child, work: &Path) {
    wait_until(
        "the stalled read completes",
        Duration::from_secs(60),
        || node.daemon.log(),
        || reader.try_wait().unwrap().is_some(),
    );
    let read = reader.wait_with_output().unwrap();
    assert!(
        read.status.success(),
        "the stalled read failed: {}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&read.stderr),
        node.daemon.log()
    );
    let want = run(Command::new("sha256sum")
        .current_dir(work.join("bundle/rootfs"))
        .arg(STALLED_FILE))
    .stdout;
    // The checksum alone: sha256sum names the file differently inside the container.
    let checksum = |output: &[u8]| {
        let text = String::from_utf8_lossy(output);
        text.split(' ').next().unwrap_or_default().to_string()
    };
    assert_eq!(
        checksum(&read.stdout),
        checksum(&want),
        "the stalled read's bytes"
    );
}

/// Kernels before 6.9 cannot resend the requests a stopped daemon had read: there the session
/// threads read clones of the connection, and the kernel fails the requests a dead daemon's
/// clones held. This kernel (6.18) can, so `fuse_resend = false` makes the daemon serve as it
/// does on those kernels; the path is otherwise the same. A read through the page cache still
/// does not fail: the request the kernel failed was its readahead, and it reads the page again
/// with a new request, which waits for the next daemon.
#[test]
fn without_resend_a_read_in_flight_at_a_kill_is_read_again_and_answered_by_the_next_daemon() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let mut node = Node::start(&work, "[fetch]\nbackground = false\nfuse_resend = false\n");
    let (reference, layers, out) = pull_app(&node, &work);
    // (The session is mounted with the first layer.)
    assert!(
        node.daemon.log().contains("serving=Cloned"),
        "{}",
        node.daemon.log()
    );
    let container = run_sleeper(&node.containerd, &reference, &out);
    let reader = stalled_read(&node, &container);

    // Killed while it holds the read; the next daemon takes the session over, serving the same
    // way, and answers the read the kernel asked again once the registry does.
    node.daemon.signal("KILL");
    node.daemon.restart(&node.containerd);
    node.registry.thaw();
    assert!(
        node.daemon.log().contains("resuming the FUSE session")
            && !node.daemon.log().contains("serving=Shared"),
        "{}",
        node.daemon.log()
    );
    assert_stalled_read_completes(&node, reader, &work);
    drop_caches();
    assert_greets(&container, "greet");
    // One session, the same mounts, one descriptor in the keeper.
    assert_one_kept_session(&node, layers);
    drop(container);
}
