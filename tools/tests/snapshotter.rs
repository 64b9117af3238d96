//! The snapshotter end to end: a real containerd with `containerd-sealfs-grpc` as its proxy
//! snapshotter, a real registry, real images built with umoci, real containers run with runc.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::node::Node;
use common::*;

/// Prints every path with its type, mode and owner (and size and link count unless it is a
/// directory: those depend on the file system), then every regular file's checksum: what a
/// container sees of its root file system (`-xdev`: not /proc etc.).
const TREE_SCRIPT: &str =
    "cd / && busybox find . -xdev -type d | busybox sort | while read -r f; do \
     busybox stat -c '%n %f %u %g' \"$f\"; done; \
     busybox find . -xdev ! -type d | busybox sort | while read -r f; do \
     busybox stat -c '%n %f %u %g %s %h' \"$f\"; done; \
     busybox find . -xdev -type f | busybox sort | while read -r f; do busybox md5sum \"$f\"; done";

use std::os::unix::fs::PermissionsExt;

#[test]
fn lazy_pull_runs_containers_that_see_the_plain_files_and_gc_frees_everything() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    // No background fetch: what the registry serves is what the containers read.
    let node = Node::start(&work, "[fetch]\nbackground = false\n");
    let Sealed {
        reference: sealed,
        size: sealed_size,
        layers,
        ..
    } = push_sealed(&work, &node.registry, "alice", "app");
    let plain = node.registry.push(&work.join("img"), "v1", "app");

    let served_before = node.registry.blob_bytes_served();
    let manifests_before = node.registry.gets(|uri| uri.contains("/manifests/"));
    let probes_before = node.registry.gets(|uri| uri == "/v2/");
    let gets_before = node.registry.gets(|_| true);
    let out = node.pull(&sealed);
    assert!(
        out.status.success(),
        "sealctl pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.matches("mounted remotely").count(),
        layers,
        "every layer is remote: {stdout}"
    );
    // sealctl fetched the manifest; the daemon read the copy sealctl put into containerd's
    // content store (checked against the digest the Prepare labels name), not the registry's.
    assert_eq!(
        node.registry.gets(|uri| uri.contains("/manifests/")) - manifests_before,
        1,
        "manifest GETs of one lazy pull"
    );
    // A lazy pull's round trips to an open registry: the manifest, the config, and the
    // layers' tails (read at once), with no auth probe before any of them.
    assert_eq!(
        node.registry.gets(|uri| uri == "/v2/") - probes_before,
        0,
        "auth probes of one lazy pull"
    );
    assert_eq!(
        node.registry.gets(|_| true) - gets_before,
        2 + layers,
        "GETs of one lazy pull of {layers} layers"
    );
    assert_eq!(node.daemon.fuse_mounts().len(), layers);

    assert_eq!(node.run(&sealed, "greet", &[]), format!("{GREETING}\n"));
    let served = node.registry.blob_bytes_served() - served_before;
    assert!(
        served > 0 && served * 5 < sealed_size,
        "the registry served {served} of {sealed_size} sealed bytes"
    );

    // Ten containers at once.
    let started: Vec<_> = (0..10)
        .map(|i| {
            let id = format!("many-{i}");
            let mut command = node.ctr_run();
            command.args(["--rm", &sealed, &id]);
            command.spawn_output()
        })
        .collect();
    for (i, child) in started.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout) == format!("{GREETING}\n"),
            "container {i}: {}{}\n--- daemon log ---\n{}\n--- containerd log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node.daemon.log(),
            node.containerd.log()
        );
    }

    // What a container sees equals what containerd's own unpacking of the plain image shows.
    let seen = node.run(&sealed, "tree-sealed", &["/bin/sh", "-c", TREE_SCRIPT]);
    node.containerd
        .ctr_ok(&["image", "pull", "--plain-http", &plain]);
    let out = node.containerd.ctr_ok(&[
        "run",
        "--rm",
        &plain,
        "tree-plain",
        "/bin/sh",
        "-c",
        TREE_SCRIPT,
    ]);
    assert!(seen.contains("./data/blobs/blob-5"), "{seen}");
    let differing: Vec<_> = diff_lines(&seen, &out);
    assert!(
        differing.is_empty(),
        "the sealed image's tree differs from the plain one: {differing:#?}"
    );

    assert_eq!(node.daemon.metric("sealfs_layers_mounted"), layers as u64);
    assert!(node.daemon.metric("sealfs_fetched_bytes_total") >= sealed_size / 2);
    assert_eq!(node.daemon.metric("sealfs_verification_failures_total"), 0);

    // Removing the image and collecting garbage unmounts the layers and deletes their caches.
    node.containerd
        .ctr_ok(&["image", "rm", "--sync", &sealed, &plain]);
    let left = node
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "sealfs", "ls"]);
    assert_eq!(left.lines().count(), 1, "snapshots left: {left}");
    assert!(node.daemon.fuse_mounts().is_empty());
    let dirs: Vec<_> = fs::read_dir(node.daemon.root.join("snapshots"))
        .unwrap()
        .collect();
    assert!(dirs.is_empty(), "snapshot directories left: {dirs:?}");
    assert_eq!(node.daemon.metric("sealfs_layers_mounted"), 0);
}

#[test]
fn ctr_remote_rpull_works_and_the_daemon_survives_restarts() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let mut node = Node::start(&work, "");
    let Sealed {
        reference: sealed,
        layers,
        ..
    } = push_sealed(&work, &node.registry, "alice", "app");
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(&node.containerd.socket)
        .args([
            "--namespace",
            "sealfs-test",
            "image",
            "rpull",
            "--plain-http",
        ])
        .args(["--snapshotter", "sealfs", &sealed])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr-remote rpull: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.daemon.log()
    );
    assert_eq!(
        node.daemon.fuse_mounts().len(),
        layers,
        "{}",
        node.daemon.log()
    );

    // kill -9 and SIGTERM alike leave the layers mounted, their session with the keeper, and
    // the next daemon serves them again (running containers across restarts: restart.rs).
    node.daemon.signal("KILL");
    assert_eq!(node.daemon.fuse_mounts().len(), layers);
    node.daemon.restart(&node.containerd);
    assert_eq!(
        node.run(&sealed, "after-kill", &[]),
        format!("{GREETING}\n")
    );
    node.daemon.signal("TERM");
    assert_eq!(node.daemon.fuse_mounts().len(), layers);
    assert!(node.daemon.fuse_session_mounted());
    assert!(
        !node.daemon.log().contains("Unmount failed"),
        "{}",
        node.daemon.log()
    );
    // Only `release` unmounts them, and lets the keeper go.
    let released = node.daemon.release();
    assert!(
        released.status.success(),
        "release: {}",
        String::from_utf8_lossy(&released.stderr)
    );
    assert!(
        String::from_utf8_lossy(&released.stdout).contains("and the kept FUSE session"),
        "{}",
        String::from_utf8_lossy(&released.stdout)
    );
    assert!(node.daemon.fuse_mounts().is_empty());
    assert!(!node.daemon.fuse_session_mounted());
    assert!(!node.daemon.root.join("session-keeper.sock").exists());
    node.daemon.restart(&node.containerd);
    assert_eq!(
        node.run(&sealed, "after-release", &[]),
        format!("{GREETING}\n")
    );
    assert_eq!(node.daemon.fuse_mounts().len(), layers);
    // While a daemon serves, release refuses and unmounts nothing.
    let refused = node.daemon.release();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(node.daemon.fuse_mounts().len(), layers);
}

#[test]
fn plain_images_run_unchanged_and_a_missing_key_fails_clearly() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let node = Node::start(&work, "");
    // A plain image through the sealfs snapshotter: containerd downloads and unpacks it.
    let plain = node.pull_plain(&work, "plain");
    assert_eq!(node.run(&plain, "plain", &[]), format!("{GREETING}\n"));
    assert!(node.daemon.fuse_mounts().is_empty());
    node.containerd.ctr_ok(&["image", "rm", "--sync", &plain]);

    // Sealed for bob only: the node (alice) cannot open it.
    let sealed = push_sealed(&work, &node.registry, "bob", "bobs").reference;
    let out = node.pull(&sealed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pull should fail");
    let (alice_id, bob_id) = (key_id(&work, "alice"), key_id(&work, "bob"));
    assert!(
        stderr.contains("no key opens this layer")
            && stderr.contains(&alice_id)
            && stderr.contains(&bob_id)
            && stderr.contains("layer sha256:"),
        "{stderr}"
    );
    assert!(node.daemon.fuse_mounts().is_empty());
    let left = node
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "sealfs", "ls"]);
    assert_eq!(left.lines().count(), 1, "snapshots left: {left}");
}

/// Lines only one side has, marked `-` (left) or `+` (right).
fn diff_lines(left: &str, right: &str) -> Vec<String> {
    let (l, r): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) =
        (left.lines().collect(), right.lines().collect());
    l.difference(&r)
        .map(|line| format!("-{line}"))
        .chain(r.difference(&l).map(|line| format!("+{line}")))
        .collect()
}

trait SpawnOutput {
    fn spawn_output(&mut self) -> Child;
}

impl SpawnOutput for Command {
    fn spawn_output(&mut self) -> Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Runs the mount command `ctr snapshots mounts` prints for `key` at `target`.
fn mount_snapshot(node: &Node, target: &Path, key: &str) {
    fs::create_dir_all(target).unwrap();
    let command = node.containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        "sealfs",
        "mounts",
        target.to_str().unwrap(),
        key,
    ]);
    run(Command::new("sh").args(["-c", command.trim()]));
}

#[test]
fn every_snapshot_verb_works_through_containerd() {
    if !node_prerequisites() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let work = temp.path();
    keygen(work, "alice");
    // The snapshots below are made by hand, held by no image, container or lease: containerd's
    // own collection would remove them.
    let node = Node::start_without_gc(work, "");
    let snapshots = |args: &[&str]| {
        let mut all = vec!["snapshots", "--snapshotter", "sealfs"];
        all.extend_from_slice(args);
        node.containerd.ctr_ok(&all)
    };
    let mnt = work.join("mnt");

    // An active snapshot without a parent is a bind mount of its directory.
    snapshots(&["prepare", "base", ""]);
    mount_snapshot(&node, &mnt, "base");
    fs::write(mnt.join("first"), "in base\n").unwrap();
    run(Command::new("umount").arg(&mnt));
    snapshots(&["commit", "base-c", "base"]);

    // A child is an overlay on its parent: the parent's file, its own, a deletion (whiteout).
    snapshots(&["prepare", "child", "base-c"]);
    mount_snapshot(&node, &mnt, "child");
    assert_eq!(fs::read_to_string(mnt.join("first")).unwrap(), "in base\n");
    fs::write(mnt.join("second"), "in child\n").unwrap();
    fs::remove_file(mnt.join("first")).unwrap();
    run(Command::new("umount").arg(&mnt));
    snapshots(&["commit", "child-c", "child"]);

    // A view shows the committed chain read-only.
    snapshots(&["view", "look", "child-c"]);
    mount_snapshot(&node, &mnt, "look");
    assert!(!mnt.join("first").exists());
    assert_eq!(
        fs::read_to_string(mnt.join("second")).unwrap(),
        "in child\n"
    );
    assert!(
        fs::write(mnt.join("third"), "x").is_err(),
        "a view is read-only"
    );
    run(Command::new("umount").arg(&mnt));

    snapshots(&["label", "base-c", "team=storage"]);
    let info = snapshots(&["info", "base-c"]);
    assert!(info.contains("\"team\": \"storage\""), "{info}");
    let usage = snapshots(&["usage", "base-c"]);
    assert!(usage.contains("base-c"), "{usage}");
    let tree = snapshots(&["tree"]);
    assert!(
        tree.contains("base-c") && tree.contains("child-c"),
        "{tree}"
    );

    // A parent cannot go before its children.
    let out = node
        .containerd
        .ctr(&["snapshots", "--snapshotter", "sealfs", "rm", "base-c"]);
    assert!(!out.status.success(), "removing a parent must fail");
    for key in ["look", "child-c", "base-c"] {
        snapshots(&["rm", key]);
    }
    assert_eq!(snapshots(&["ls"]).lines().count(), 1);
}

/// The line of `sealctl inspect --key` output for each file of a layer's profile, per layer.
fn profiles_of(work: &Path, image: &str) -> Vec<Vec<String>> {
    let text = sealctl_ok(work, &["inspect", "--key", "alice.priv", image]);
    let mut layers = Vec::new();
    let mut in_profile = false;
    for line in text.lines() {
        if line.starts_with("  profile") {
            layers.push(Vec::new());
            in_profile = !line.ends_with("none");
        } else if in_profile && line.starts_with("    /") {
            layers.last_mut().unwrap().push(line.trim().to_string());
        } else {
            in_profile = false;
        }
    }
    layers
}

const PROFILED_SCRIPT: &str = "cat /data/blobs/blob-4 /data/big.bin /data/blobs/blob-1 \
                               /etc/greeting > /dev/null && echo profiled";

#[test]
fn optimize_records_the_startup_and_the_profile_spares_every_on_demand_fetch() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    // No background fetch, and Prepare waits for the profile: every fetch is counted as
    // either the profile's or a read's.
    let node = Node::start(
        &work,
        "[fetch]\nbackground = false\nprofile_wait_ms = 60000\n",
    );
    let Sealed {
        reference: sealed, ..
    } = push_sealed(&work, &node.registry, "alice", "app");
    let profiled = format!("{}/app:profiled", node.registry.host);
    let args = serde_json::to_string(&["/bin/busybox", "sh", "-c", PROFILED_SCRIPT]).unwrap();
    let out = Command::new(SEALCTL)
        .current_dir(&work)
        .args([
            "optimize",
            "--key",
            "alice.priv",
            "--recipient",
            "alice.pub",
        ])
        .arg("--address")
        .arg(&node.containerd.socket)
        .args(["--args", &args, "--timeout", "60s"])
        .arg(format!("docker://{sealed}"))
        .arg(format!("docker://{profiled}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sealctl optimize: {stderr}");
    assert!(stderr.contains("profiled\n"), "the container ran: {stderr}");
    assert!(stderr.contains("the container exited"), "{stderr}");

    // Per layer, the files read, in the order they were read (whole-chunk files keep the
    // read order; the small greeting's pack comes last).
    let profiles = profiles_of(&work, &format!("docker://{profiled}"));
    // Two layers: busybox and data, then the deletions and the app's files.
    assert_eq!(profiles.len(), 2, "{profiles:?}");
    assert_eq!(profiles[0], ["/bin/busybox", "/data/big.bin"]);
    assert_eq!(
        profiles[1],
        ["/data/blobs/blob-4", "/data/blobs/blob-1", "/etc/greeting"]
    );
    // The recording is not kept anywhere in plain text.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("blob-4"));

    node.pull_ok(&profiled);
    let urgent = || {
        node.daemon
            .metric(r#"sealfs_chunks_total{source="registry_urgent"}"#)
    };
    let from_profile = node
        .daemon
        .metric(r#"sealfs_chunks_total{source="registry_profile"}"#);
    assert!(
        from_profile >= 4 + 5 + 4,
        "the profile fetched {from_profile} chunks"
    );
    assert_eq!(
        node.run(
            &profiled,
            "profiled",
            &["/bin/busybox", "sh", "-c", PROFILED_SCRIPT]
        ),
        "profiled\n"
    );
    assert_eq!(urgent(), 0, "the profiled start-up fetched on demand");

    // The same start-up without the profile fetches those chunks on demand: the count above
    // can tell. On a second node, whose counters count only this start-up.
    let baseline_dir = work.join("baseline");
    fs::create_dir(&baseline_dir).unwrap();
    fs::copy(work.join("alice.priv"), baseline_dir.join("alice.priv")).unwrap();
    let baseline = Node::start(&baseline_dir, "[fetch]\nbackground = false\n");
    let Sealed {
        reference: unprofiled,
        ..
    } = push_sealed(&work, &baseline.registry, "alice", "app");
    baseline.pull_ok(&unprofiled);
    assert_eq!(
        baseline.run(
            &unprofiled,
            "unprofiled",
            &["/bin/busybox", "sh", "-c", PROFILED_SCRIPT]
        ),
        "profiled\n"
    );
    // On demand: for a read, or read ahead with one.
    let on_demand = baseline
        .daemon
        .metric(r#"sealfs_chunks_total{source="registry_urgent"}"#)
        + baseline
            .daemon
            .metric(r#"sealfs_chunks_total{source="registry_readahead"}"#);
    assert!(on_demand >= 4 + 5 + 4, "{on_demand} chunks on demand");
}

#[test]
fn a_prefetch_list_naming_files_an_upper_layer_deleted_still_runs() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let node = Node::start(
        &work,
        "[fetch]\nbackground = false\nprofile_wait_ms = 60000\n",
    );
    // Layer 2 of the image deletes /etc/removed; the list names it anyway.
    fs::write(
        work.join("startup.list"),
        "# read at start\n/bin/busybox\n/etc/removed\n/etc/motd\n\ndata/many/f007\n\
         /not/in/the/image\n",
    )
    .unwrap();
    let reference = format!("{}/app:listed", node.registry.host);
    sealctl_ok(
        &work,
        &[
            "seal",
            "--recipient",
            "alice.pub",
            "--prefetch-list",
            "startup.list",
            "oci:img:v1",
            &format!("docker://{reference}"),
        ],
    );
    let profiles = profiles_of(&work, &format!("docker://{reference}"));
    assert_eq!(profiles.len(), 2, "{profiles:?}");
    for file in ["/etc/removed", "/etc/motd", "/data/many/f007"] {
        assert!(
            profiles[0].iter().any(|f| f == file),
            "{file}: {profiles:?}"
        );
    }
    // The upper layer has the whiteout of /etc/removed and no listed file.
    assert!(profiles[1].is_empty(), "{profiles:?}");

    node.pull_ok(&reference);
    assert_eq!(
        node.run(
            &reference,
            "listed",
            &[
                "/bin/sh",
                "-c",
                "test ! -e /etc/removed && cat /etc/motd /data/many/f007"
            ]
        ),
        "sealed with sealfs\nsmall file 7\n"
    );
    assert_eq!(
        node.daemon
            .metric(r#"sealfs_chunks_total{source="registry_urgent"}"#),
        0
    );

    let error = sealctl_err(
        &work,
        &[
            "seal",
            "--recipient",
            "alice.pub",
            "--prefetch-list",
            "no-such-list",
            "oci:img:v1",
            "oci:never:v1",
        ],
    );
    assert!(
        error.contains("reading the prefetch list no-such-list"),
        "{error}"
    );
}

/// The image in layout `name` (tag v1): its manifest and config as JSON.
fn image_json(work: &Path, name: &str) -> (serde_json::Value, serde_json::Value) {
    let layout = snapshotter::oci_layout::OciLayout::open(work.join(name)).unwrap();
    let image = layout.resolve(Some("v1")).unwrap();
    (
        serde_json::to_value(&image.manifest).unwrap(),
        serde_json::from_slice(&image.config).unwrap(),
    )
}

/// Chain-id poisoning: an image's config copies a plain image's diff ids while its sealed
/// layers carry other content (anyone can seal for a node pool: its public key is public).
/// Without the check, a later pull of the plain image finds "its" snapshots and runs on the
/// attacker's layers.
#[test]
fn a_sealed_image_claiming_another_images_diff_ids_takes_over_nothing() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    let node = Node::start(&work, "[fetch]\nbackground = false\n");
    // The hostile image: img:v1's lower layers and a top layer of its own with another
    // greeting (img:v1's top layer writes the greeting), sealed for the node like any image...
    let (plain_manifest, plain_config) = image_json(&work, "img");
    let evil = snapshotter::oci_layout::OciLayout::open_or_create(work.join("evil")).unwrap();
    let img = snapshotter::oci_layout::OciLayout::open(work.join("img")).unwrap();
    let layers = plain_manifest["layers"].as_array().unwrap().clone();
    let top = layers.len() - 1;
    for layer in &layers[..top] {
        evil.import_blob(&img, layer["digest"].as_str().unwrap())
            .unwrap();
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(0);
    dir.set_cksum();
    tar.append_data(&mut dir, "etc/", &[][..]).unwrap();
    let takeover = b"attacker's layer\n";
    let mut file = sealfs_e2e::regular_header(takeover.len() as u64);
    tar.append_data(&mut file, "etc/greeting", &takeover[..])
        .unwrap();
    let (evil_layer, evil_size) = evil.put_blob(&tar.into_inner().unwrap()).unwrap();
    let mut manifest = plain_manifest.clone();
    manifest["layers"][top] = serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": evil_layer, "size": evil_size,
    });
    let mut config = plain_config.clone();
    config["rootfs"]["diff_ids"][top] = evil_layer.clone().into();
    tag_image(&work.join("evil"), manifest, &config, "v1");
    sealctl_ok(
        &work,
        &[
            "seal",
            "--recipient",
            "alice.pub",
            "oci:evil:v1",
            "oci:evil-sealed:v1",
        ],
    );
    // ...whose config then claims the plain image's diff ids.
    let (sealed_manifest, mut sealed_config) = image_json(&work, "evil-sealed");
    sealed_config["rootfs"]["diff_ids"] = plain_config["rootfs"]["diff_ids"].clone();
    tag_image(
        &work.join("evil-sealed"),
        sealed_manifest.clone(),
        &sealed_config,
        "v1",
    );
    let hostile = node
        .registry
        .push(&work.join("evil-sealed"), "v1", "hostile");

    let out = node.pull(&hostile);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the hostile pull must fail");
    let first = sealed_manifest["layers"][0]["digest"].as_str().unwrap();
    assert!(
        stderr.contains(&format!("layer {first}"))
            && stderr.contains("claims diff ids its sealed layers do not have"),
        "{stderr}"
    );
    assert!(node.daemon.fuse_mounts().is_empty(), "nothing mounted");

    // An image sealed before image format v2 (plain diff ids in its config, each recorded in a
    // layer annotation, manifest marked v1) is refused with what to do about it (while the
    // plain image's snapshots are not there: containerd would then use those and ask nothing).
    sealctl_ok(
        &work,
        &[
            "seal",
            "--recipient",
            "alice.pub",
            "oci:img:v1",
            "oci:legacy:v1",
        ],
    );
    let (mut manifest, mut config) = image_json(&work, "legacy");
    let plain_ids = plain_config["rootfs"]["diff_ids"].as_array().unwrap();
    for (layer, diff_id) in manifest["layers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(plain_ids)
    {
        layer["annotations"]["containerd.io/snapshot/sealfs.source.diff-id"] = diff_id.clone();
    }
    manifest["annotations"]["org.sealfs.sealed"] = "v1".into();
    config["rootfs"]["diff_ids"] = plain_config["rootfs"]["diff_ids"].clone();
    tag_image(&work.join("legacy"), manifest, &config, "v1");
    let legacy = node.registry.push(&work.join("legacy"), "v1", "legacy");
    let out = node.pull(&legacy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("sealed in sealfs image format v1")
            && stderr.contains("seal the original image again"),
        "{stderr}"
    );
    let err = sealctl_err(
        &work,
        &[
            "rewrap",
            "--key",
            "alice.priv",
            "--add-recipient",
            "bob.pub",
            "oci:legacy:v1",
            "oci:legacy2:v1",
        ],
    );
    assert!(err.contains("seal the original image again"), "{err}");

    // The plain image, pulled after it into the same namespace and snapshotter, and an
    // honest sealed image of the same content, each run on their own layers.
    let plain = node.pull_plain(&work, "plain");
    assert_eq!(
        node.run(&plain, "plain-after", &[]),
        format!("{GREETING}\n")
    );
    let honest = push_sealed(&work, &node.registry, "alice", "honest").reference;
    node.pull_ok(&honest);
    assert_eq!(
        node.run(&honest, "honest-after", &[]),
        format!("{GREETING}\n")
    );
    assert_eq!(
        node.daemon.fuse_mounts().len(),
        layers.len(),
        "only the honest layers are mounted"
    );
}

/// Runs `sh -c script` as user and group 65534 with no supplementary groups.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

/// Nobody but root reads plaintext: while a sealed layer is mounted and a container runs from
/// it, an unprivileged user can list or read nothing under the daemon's root, whatever the
/// umask it was started with; and the daemon cannot dump core.
#[test]
fn other_users_cannot_reach_decrypted_layers_and_the_daemon_cannot_dump_core() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    // A root directory others may enter, as /var/lib is, so that only the daemon's own
    // directories stand between a user and the plaintext; and a permissive umask, as under a
    // default init: the daemon must not rely on the umask it is given.
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: umask swaps a process-wide mask; no other test in this binary checks the
    // modes of what it creates.
    let old = unsafe { libc::umask(0o022) };
    let node = Node::start(&work, "");
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let sealed = push_sealed(&work, &node.registry, "alice", "private").reference;
    node.pull_ok(&sealed);
    // runc keeps container state per namespace across containerd instances: an id of its own.
    let reader = format!("reader-{}", std::process::id());
    let mut running = node
        .ctr_run()
        .arg("--rm")
        .args([
            &sealed,
            &reader,
            "/bin/sh",
            "-c",
            "cat /etc/greeting; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(work.join("reader.err")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(running.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line,
        format!("{GREETING}\n"),
        "the container runs: {}\n--- daemon log ---\n{}",
        fs::read_to_string(work.join("reader.err")).unwrap_or_default(),
        node.daemon.log()
    );

    let root = &node.daemon.root;
    let mounts = node.daemon.fuse_mount_points();
    assert!(!mounts.is_empty());
    use std::os::unix::fs::MetadataExt;
    for dir in [root.clone(), root.join("snapshots")] {
        assert_eq!(
            fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "{}",
            dir.display()
        );
    }
    let socket_dir = node.daemon.socket.parent().unwrap();
    assert_eq!(fs::metadata(socket_dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(&node.daemon.socket).unwrap().mode() & 0o777,
        0o600
    );
    let greeting = mounts
        .iter()
        .map(|m| m.join("etc/greeting"))
        .find(|p| p.exists())
        .expect("a layer with the greeting");
    for script in [
        format!("ls {}", root.display()),
        format!("ls {}", root.join("snapshots").display()),
        format!("cat {}", greeting.display()),
        format!("ls {}", mounts[0].display()),
        format!("ls {}", socket_dir.display()),
    ] {
        let out = as_nobody(&script);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody could run `{script}`: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Root still reads it: the boundary is the directories, not the mounts.
    assert_eq!(
        fs::read_to_string(&greeting).unwrap(),
        format!("{GREETING}\n")
    );

    let pid = node.daemon.pid().expect("the daemon runs");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    // Stop the task through containerd; `ctr run --rm` then removes the container and exits.
    node.containerd
        .ctr_ok(&["task", "kill", "-s", "KILL", &reader]);
    assert!(!running.wait().unwrap().success(), "killed");
}

/// containerd 2.x: plain `ctr image pull --snapshotter sealfs` goes through the transfer
/// service, which (with the proxy plugin's `enable_remote_snapshot_annotations` export and an
/// unpack configuration for sealfs) passes the layer annotations to Prepare: the pull is lazy
/// without sealctl or ctr-remote. containerd 1.x's plain pull sends no labels, so there it
/// cannot be lazy; the test says so and returns.
#[test]
fn plain_ctr_pull_is_lazy_through_containerd_2s_transfer_service() {
    let Some((_temp, work)) = app_image() else {
        return;
    };
    if sealfs_e2e::containerd::major_version() < 2 {
        eprintln!("containerd 1.x: a plain ctr pull sends no Prepare labels and cannot be lazy");
        return;
    }
    let node = Node::start(&work, "[fetch]\nbackground = false\n");
    let sealed = push_sealed(&work, &node.registry, "alice", "transfer");
    let served_before = node.registry.blob_bytes_served();
    node.containerd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "sealfs",
        &sealed.reference,
    ]);
    assert_eq!(
        node.daemon.fuse_mounts().len(),
        sealed.layers,
        "every layer mounted remotely\n{}",
        node.containerd.log()
    );
    assert_eq!(
        node.run(&sealed.reference, "transfer", &[]),
        format!("{GREETING}\n")
    );
    let served = node.registry.blob_bytes_served() - served_before;
    assert!(
        served * 5 < sealed.size,
        "the registry served {served} of {} sealed bytes",
        sealed.size
    );
    // containerd's content store holds the manifest and config, no layer blob.
    let content = node.containerd.ctr_ok(&["content", "ls"]);
    let stored: Vec<&str> = content
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(stored.len(), 2, "manifest and config: {content}");
    for digest in &sealed.digests {
        assert!(
            !stored.contains(&digest.as_str()),
            "layer {digest} was downloaded: {content}"
        );
    }
}

/// `scripts/configure-containerd.sh` (what `install.sh --configure-containerd` runs) writes a
/// config the containerd on PATH loads, in its config version, with sealfs's proxy plugin (and
/// on 2.x the annotations export and the transfer service's unpack configuration); a second
/// run leaves it alone.
#[test]
fn the_install_scripts_containerd_config_loads_in_the_installed_containerds_version() {
    if !node_prerequisites() {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("config.toml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/configure-containerd.sh");
    let configure = || run(Command::new("bash").arg(&script).arg(&config));
    let first = String::from_utf8(configure().stdout).unwrap();
    assert!(first.contains("added [proxy_plugins.sealfs]"), "{first}");
    let written = fs::read_to_string(&config).unwrap();
    let two = sealfs_e2e::containerd::major_version() >= 2;
    assert!(
        written.starts_with(if two { "version = 3" } else { "version = 2" }),
        "{written}"
    );
    let again = String::from_utf8(configure().stdout).unwrap();
    assert!(again.contains("already has"), "{again}");
    assert_eq!(fs::read_to_string(&config).unwrap(), written);

    let dump = run(Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"]));
    let dump = String::from_utf8(dump.stdout).unwrap();
    assert!(dump.contains("[proxy_plugins.sealfs]"), "{dump}");
    assert!(dump.contains("/run/sealfs/sealfs.sock"), "{dump}");
    if two {
        assert!(
            dump.contains("enable_remote_snapshot_annotations = 'true'"),
            "{dump}"
        );
        let unpack = dump
            .split("unpack_config]]")
            .skip(1)
            .map(|entry| entry.lines().take(3).collect::<Vec<_>>().join("\n"))
            .collect::<Vec<_>>();
        assert!(
            unpack.iter().any(|e| e.contains("snapshotter = 'sealfs'")),
            "{unpack:?}"
        );
    }
}
