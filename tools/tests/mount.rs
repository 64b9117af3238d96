//! `mount.sealfs` end to end: real FUSE and overlay mounts of images built with umoci.
//! Needs root, /dev/fuse, umoci, busybox and setfattr (a failure in CI, a skip elsewhere).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MOUNT: &str = env!("CARGO_BIN_EXE_mount-sealfs");

fn mount_sealfs(args: &[&str]) -> std::process::Output {
    Command::new(MOUNT).args(args).output().unwrap()
}

/// Mount entries of this test's layers (other tests may have their own mounted meanwhile).
fn our_mounts(digests: &[String]) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| digests.iter().any(|d| line.contains(d.as_str())))
        .map(str::to_string)
        .collect()
}

fn layer_digests(work: &Path) -> Vec<String> {
    manifest_of(work, "sealed", "v1")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Waits (bounded) for a condition that depends on another process exiting.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a mount command ran: it succeeded, the top layer's new file reads back, and
/// unmounting ends the mount.
fn check_top_layer_mount(out: &std::process::Output, mnt: &Path, top: &str) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(mnt.join("var/cache/app/new")).unwrap(),
        "layer 2\n"
    );
    run(Command::new("umount").arg(mnt));
    eventually("the layer mount going away", || {
        our_mounts(&[top.to_string()]).is_empty()
    });
}

fn sealed_image() -> Option<(tempfile::TempDir, PathBuf, Vec<String>)> {
    if !Path::new("/dev/fuse").exists() && std::env::var_os("CI").is_none() {
        eprintln!("skipping: no /dev/fuse");
        return None;
    }
    let (temp, work) = setup()?;
    keygen(&work, "alice");
    keygen(&work, "mallory");
    sealctl_ok(
        &work,
        &[
            "seal",
            "-r",
            "alice.pub",
            "--chunk-size",
            "64K",
            "oci:img:v1",
            "oci:sealed:v1",
        ],
    );
    let digests = layer_digests(&work);
    Some((temp, work, digests))
}

#[test]
fn whole_image_mount_equals_umoci_unpack_and_umount_ends_it() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = Command::new(MOUNT)
        .current_dir(&work)
        .args([
            "oci:sealed:v1",
            "mnt",
            "-o",
            "key=alice.priv,prefetch=on",
            "-o",
            "threads=2,merge=256,bandwidth=50",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        our_mounts(&digests).len(),
        1,
        "one FUSE session serves every layer"
    );

    let want = unpack(&work, "img:v1", "bundle-plain");
    let got = sealfs_e2e::snapshot_tree(&mnt);
    sealfs_e2e::assert_same_tree(&want, &got);

    unmount_and_wait(&mnt, &digests);
}

#[test]
fn one_layer_mounts_with_overlay_markers_and_through_mount_t() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let top = &digests[1];
    let mnt = work.join("top");
    fs::create_dir(&mnt).unwrap();
    let source = format!("oci:{}:v1@{top}", work.join("sealed").display());
    let out = mount_sealfs(&[
        &source,
        mnt.to_str().unwrap(),
        "-o",
        &format!("key={}", work.join("alice.priv").display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whiteout = fs::symlink_metadata(mnt.join("etc/removed")).unwrap();
    assert!(
        whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
        "whiteout as 0/0 char device"
    );
    // umoci marks the replaced directory either opaque or with a whiteout per removed file.
    let opaque = xattr::get(mnt.join("var/cache/app"), "trusted.overlay.opaque").unwrap();
    let old = fs::symlink_metadata(mnt.join("var/cache/app/old"));
    let old_whited_out = old.is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0);
    assert!(
        opaque.as_deref() == Some(&b"y"[..]) || old_whited_out,
        "var/cache/app/old is still visible"
    );
    assert_eq!(
        fs::read_to_string(mnt.join("var/cache/app/new")).unwrap(),
        "layer 2\n"
    );
    run(Command::new("umount").arg(&mnt));
    eventually("the layer mount going away", || {
        our_mounts(std::slice::from_ref(top)).is_empty()
    });

    // The key may come as k-of-n shares instead of a key file.
    sealctl_ok(
        &work,
        &[
            "key",
            "split",
            "--threshold",
            "2",
            "--shares",
            "3",
            "alice.priv",
            "alice-shares",
        ],
    );
    fs::remove_file(work.join("alice-shares/share-2-of-3.txt")).unwrap();
    let shares = format!("shares={}", work.join("alice-shares").display());
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &shares]);
    check_top_layer_mount(&out, &mnt, top);

    // `mount -t sealfs` finds the helper in /sbin. Install it for the test if nothing is there.
    let helper = Path::new("/sbin/mount.sealfs");
    let installed_here = !helper.exists() && std::os::unix::fs::symlink(MOUNT, helper).is_ok();
    if helper.exists() {
        let out = Command::new("mount")
            .args(["-t", "sealfs", &source])
            .arg(&mnt)
            .args(["-o", &format!("key={}", work.join("alice.priv").display())])
            .output()
            .unwrap();
        if installed_here {
            fs::remove_file(helper).unwrap();
        }
        check_top_layer_mount(&out, &mnt, top);
    }
}

#[test]
fn a_failed_mount_says_why_and_leaves_nothing_mounted() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mallory = fs::read_to_string(work.join("mallory.pub")).unwrap();
    let mallory_id = mallory
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let key = format!("key={}", work.join("mallory.priv").display());
    let out = mount_sealfs(&[
        &format!("oci:{}:v1", work.join("sealed").display()),
        mnt.to_str().unwrap(),
        "-o",
        &key,
    ]);
    assert_eq!(out.status.code(), Some(32));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&digests[0])
            && err.contains(&mallory_id)
            && err.contains("no key opens this layer"),
        "{err}"
    );
    assert!(our_mounts(&digests).is_empty());
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0);

    let out = mount_sealfs(&[
        "oci:nowhere:v1",
        mnt.to_str().unwrap(),
        "-o",
        "key=x,bogus=1",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown option \"bogus\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mount_sealfs(&[
        &format!("oci:{}:v1", work.join("sealed").display()),
        mnt.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key given"));
}

#[test]
fn whole_image_mount_equals_containerds_own_unpacking() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "containerd missing in CI");
        eprintln!("skipping: containerd not installed");
        return;
    }
    // containerd imports the plain image from an OCI archive and unpacks it with overlayfs.
    let containerd = sealfs_e2e::containerd::Containerd::start();
    let archive = work.join("img.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(work.join("img"))
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    containerd.ctr_ok(&[
        "images",
        "import",
        "--base-name",
        "sealfs.test/img",
        archive.to_str().unwrap(),
    ]);
    let config = snapshotter::oci_layout::OciLayout::open(work.join("img"))
        .unwrap()
        .resolve(Some("v1"))
        .unwrap()
        .config;
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let top = sealfs_e2e::containerd::chain_ids(&diff_ids).pop().unwrap();
    let theirs = work.join("containerd-view");
    fs::create_dir(&theirs).unwrap();
    // One call: the view itself is unreferenced once ctr exits (garbage collection may take
    // it), but its mount only names the image's committed snapshots, which the image keeps.
    let target = theirs.to_str().unwrap();
    let view = [
        "snapshots",
        "--snapshotter",
        "overlayfs",
        "view",
        "--target",
        target,
        "sealfs-compare",
        &top,
    ];
    let mounts = containerd.ctr_ok(&view);
    run(Command::new("sh").arg("-c").arg(mounts.trim()));

    let ours = work.join("sealfs-view");
    fs::create_dir(&ours).unwrap();
    let source = format!("oci:{}:v1", work.join("sealed").display());
    let key = format!("key={}", work.join("alice.priv").display());
    let out = mount_sealfs(&[&source, ours.to_str().unwrap(), "-o", &key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (want, got) = (
        sealfs_e2e::snapshot_tree(&theirs),
        sealfs_e2e::snapshot_tree(&ours),
    );
    run(Command::new("umount").arg(&ours));
    run(Command::new("umount").arg(&theirs));
    eventually("the layer mounts going away", || {
        our_mounts(&digests).is_empty()
    });
    // containerd's applier gives a directory that a layer tar leaves implicit (here `var`,
    // parent of the replaced `var/cache/app`) the time of unpacking as its mtime, a side
    // effect of extracting into it; that differs from run to run. Directory mtimes are compared
    // exactly against umoci's unpacking in the test above; here they are left out.
    let without_dir_mtimes = |tree: std::collections::BTreeMap<String, String>| -> std::collections::BTreeMap<String, String> {
        tree.into_iter()
            .map(|(path, desc)| {
                let desc = if desc.starts_with("mode=40") { desc.split(" mtime=").next().unwrap().to_string() } else { desc };
                (path, desc)
            })
            .collect()
    };
    sealfs_e2e::assert_same_tree(&without_dir_mtimes(want), &without_dir_mtimes(got));
}

#[test]
fn mounts_lazily_from_a_registry() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let registry = sealfs_e2e::registry::DockerRegistry::start();
    let reference = registry.push(&work.join("sealed"), "v1", "sealed/busybox");
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let key = format!("key={}", work.join("alice.priv").display());
    let out = mount_sealfs(&[
        &format!("docker://{reference}"),
        mnt.to_str().unwrap(),
        "-o",
        &key,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = unpack(&work, "img:v1", "bundle-plain");
    sealfs_e2e::assert_same_tree(&want, &sealfs_e2e::snapshot_tree(&mnt));
    unmount_and_wait(&mnt, &digests);

    let missing = format!("docker://{}/no/such:v1", registry.host);
    let out = mount_sealfs(&[&missing, mnt.to_str().unwrap(), "-o", &key]);
    assert_fails_naming(&out, &registry.host, "manifest unknown");
}

#[test]
fn registry_credentials_come_from_docker_config() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let registry = sealfs_e2e::registry::DockerRegistry::start_with_password("alice", "s3cret");
    let reference = registry.push_as(
        &work.join("sealed"),
        "v1",
        "private/busybox",
        Some("alice:s3cret"),
    );
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let key = format!("key={}", work.join("alice.priv").display());
    let source = format!("docker://{reference}");

    // No credentials, then wrong ones: refused, naming the registry.
    let anonymous = format!("auth={}", work.join("none.json").display());
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &key, "-o", &anonymous]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&registry.host),
        "{err}"
    );
    let wrong = format!(
        "auth={}",
        docker_config(&work, "wrong.json", &registry.host, "alice:guess").display()
    );
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &key, "-o", &wrong]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&registry.host)
            && err.to_lowercase().contains("auth"),
        "{err}"
    );
    assert!(our_mounts(&digests).is_empty());

    // The right password from the config: mounted, and lazy reads authenticate too.
    let right = format!(
        "auth={}",
        docker_config(&work, "right.json", &registry.host, "alice:s3cret").display()
    );
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &key, "-o", &right]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(mnt.join("var/cache/app/new")).unwrap(),
        "layer 2\n"
    );
    assert!(fs::read(mnt.join("bin/busybox")).unwrap().len() > 100_000);
    unmount_and_wait(&mnt, &digests);
}

/// Unmounts `mnt` and waits until the layer mounts of `digests` are gone.
fn unmount_and_wait(mnt: &Path, digests: &[String]) {
    run(Command::new("umount").arg(mnt));
    eventually("the layer mounts going away", || {
        our_mounts(digests).is_empty()
    });
}

/// The command failed, and its message names `host` and says `what`.
fn assert_fails_naming(out: &std::process::Output, host: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(host) && err.contains(what),
        "{err}"
    );
}

/// Writes a docker config.json in `dir` with `user:password` for `host`; returns its path.
fn docker_config(dir: &Path, name: &str, host: &str, credentials: &str) -> PathBuf {
    use base64::Engine;
    let path = dir.join(name);
    let auth = base64::engine::general_purpose::STANDARD.encode(credentials);
    fs::write(
        &path,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    path
}

#[test]
fn mirrors_from_hosts_toml_are_used_and_a_dead_one_falls_back() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let origin = sealfs_e2e::registry::DockerRegistry::start();
    let mirror = sealfs_e2e::registry::DockerRegistry::start();
    // The image is only on the mirror; the origin is asked for it by name.
    mirror.push(&work.join("sealed"), "v1", "team/app");
    let hosts = work.join("certs.d");
    let write_hosts = |mirrors: &[&str]| {
        let dir = hosts.join(&origin.host);
        fs::create_dir_all(&dir).unwrap();
        let mut text = format!("server = \"http://{}\"\n", origin.host);
        for m in mirrors {
            text += &format!("\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
        }
        fs::write(dir.join("hosts.toml"), text).unwrap();
    };
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let source = format!("docker://{}/team/app:v1", origin.host);
    let options = format!(
        "key={},hosts={}",
        work.join("alice.priv").display(),
        hosts.display()
    );

    // A dead mirror first (nothing listens on port 1), then the live one: served by the mirror.
    write_hosts(&["127.0.0.1:1", &mirror.host]);
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &options]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = unpack(&work, "img:v1", "bundle-plain");
    sealfs_e2e::assert_same_tree(&want, &sealfs_e2e::snapshot_tree(&mnt));
    unmount_and_wait(&mnt, &digests);

    // Only the dead mirror: the origin answers, and it does not have the image.
    write_hosts(&["127.0.0.1:1"]);
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &options]);
    assert_fails_naming(&out, &origin.host, "manifest unknown");
}

#[test]
fn token_authentication_through_a_real_registry() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let issuer = sealfs_e2e::token_issuer::TokenIssuer::start(&work, "alice", "s3cret");
    let registry = sealfs_e2e::registry::DockerRegistry::start_with_tokens(&issuer);
    let reference = registry.push_as(
        &work.join("sealed"),
        "v1",
        "tokens/busybox",
        Some("alice:s3cret"),
    );
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let key = format!("key={}", work.join("alice.priv").display());
    let source = format!("docker://{reference}");

    let out = mount_sealfs(&[
        &source,
        mnt.to_str().unwrap(),
        "-o",
        &key,
        "-o",
        &format!(
            "auth={}",
            docker_config(&work, "wrong.json", &registry.host, "alice:guess").display()
        ),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&registry.host),
        "{err}"
    );
    assert!(our_mounts(&digests).is_empty());

    let out = mount_sealfs(&[
        &source,
        mnt.to_str().unwrap(),
        "-o",
        &key,
        "-o",
        &format!(
            "auth={}",
            docker_config(&work, "right.json", &registry.host, "alice:s3cret").display()
        ),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = unpack(&work, "img:v1", "bundle-plain");
    sealfs_e2e::assert_same_tree(&want, &sealfs_e2e::snapshot_tree(&mnt));
    unmount_and_wait(&mnt, &digests);
}

#[test]
fn an_https_registry_is_trusted_through_the_ca_in_hosts_toml() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let (registry, ca) = sealfs_e2e::registry::DockerRegistry::start_with_tls();
    registry.push(&work.join("sealed"), "v1", "tls/busybox");
    let hosts = work.join("certs.d");
    fs::create_dir_all(hosts.join(&registry.host)).unwrap();
    let write_hosts = |ca_line: &str| {
        let text = format!("server = \"https://{}\"\n{ca_line}", registry.host);
        fs::write(hosts.join(&registry.host).join("hosts.toml"), text).unwrap();
    };
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let source = format!("docker://{}/tls/busybox:v1", registry.host);
    let options = format!(
        "key={},hosts={}",
        work.join("alice.priv").display(),
        hosts.display()
    );

    // HTTPS without trusting the test CA: refused (not retried), naming the registry and
    // saying it is the certificate.
    write_hosts("");
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &options]);
    assert_fails_naming(&out, &registry.host, "certificate");

    // With the CA from hosts.toml: mounted over HTTPS.
    write_hosts(&format!("ca = \"{}\"\n", ca.display()));
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &options]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(mnt.join("var/cache/app/new")).unwrap(),
        "layer 2\n"
    );
    unmount_and_wait(&mnt, &digests);
}

#[test]
fn a_termination_signal_unmounts_cleanly() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let source = format!("oci:{}:v1", work.join("sealed").display());
    let key = format!("key={}", work.join("alice.priv").display());
    let out = mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        our_mounts(&digests).len(),
        1,
        "the layers' one FUSE session"
    );
    // The background process serving this mount point.
    let pid = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("mount-sealfs") && cmdline.contains(mnt.to_str().unwrap())
        })
        .expect("the mount process");
    run(Command::new("kill").args(["-TERM", &pid.to_string()]));
    eventually("the mount process unmounting and exiting", || {
        our_mounts(&digests).is_empty() && !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(
        fs::read_dir(&mnt).unwrap().count(),
        0,
        "the overlay is gone too"
    );
}

/// AT_SECURE (auxv type 23) of a process running `program` from the mount as user 65534:
/// 1 when the kernel applied its setuid bit or file capabilities at exec, 0 when it did not.
fn at_secure_as_nobody(program: &Path, work: &Path) -> u64 {
    let out = work.join("auxv");
    let script = format!(
        "{} cat /proc/self/auxv > {}",
        program.display(),
        out.display()
    );
    fs::write(&out, b"").unwrap();
    fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let ran = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/bin/sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let auxv = fs::read(&out).unwrap();
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |at: usize| u64::from_ne_bytes(pair[at..at + 8].try_into().unwrap());
            (word(0), word(8))
        })
        .find(|&(kind, _)| kind == 23)
        .map(|(_, value)| value)
        .expect("AT_SECURE in auxv")
}

/// An image mounted for inspection is untrusted: its setuid-root busybox (with file
/// capabilities too) gains nothing when another user runs it, its device nodes do not open,
/// and `noexec` keeps everything from running.
#[test]
fn inspection_mounts_are_nosuid_nodev_and_honour_noexec() {
    let Some((_temp, work, digests)) = sealed_image() else {
        return;
    };
    // Others must reach the mount point for the setuid check.
    fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mnt = work.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let source = format!("oci:{}:v1", work.join("sealed").display());
    let mount_with = |extra: &str| {
        let options = format!("key={}{extra}", work.join("alice.priv").display());
        mount_sealfs(&[&source, mnt.to_str().unwrap(), "-o", &options])
    };
    let mounted = mount_with("");
    assert!(
        mounted.status.success(),
        "{}",
        String::from_utf8_lossy(&mounted.stderr)
    );

    let busybox = mnt.join("bin/busybox");
    assert_eq!(
        fs::metadata(&busybox).unwrap().mode() & 0o7777,
        0o4755,
        "still shown setuid"
    );
    assert_eq!(
        at_secure_as_nobody(&busybox, &work),
        0,
        "setuid and file caps ignored"
    );
    for device in ["dev/null", "dev/loop9"] {
        let error = fs::File::open(mnt.join(device)).unwrap_err();
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{device}: {error}"
        );
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.split(' ').nth(4) == Some(mnt.to_str().unwrap())
                || digests.iter().any(|d| l.contains(d.as_str()))
        })
        .collect();
    assert_eq!(
        ours.len(),
        2,
        "the overlay and the layers' session: {ours:#?}"
    );
    for line in &ours {
        let options = line.split(' ').nth(5).unwrap();
        assert!(
            options.contains("nosuid") && options.contains("nodev"),
            "{line}"
        );
        assert!(!options.contains("noexec"), "{line}");
    }
    unmount_and_wait(&mnt, &digests);

    let noexec = mount_with(",noexec");
    assert!(
        noexec.status.success(),
        "{}",
        String::from_utf8_lossy(&noexec.stderr)
    );
    let error = Command::new(&busybox).arg("true").output().unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{error}"
    );
    unmount_and_wait(&mnt, &digests);

    let refused = mount_with(",suid");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown option \"suid\""));
}
