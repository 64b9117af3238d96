//! Helpers shared by the tools' integration tests: real images built with umoci from a
//! busybox-static rootfs, keys, and running the binaries.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod node;

use sealfs_e2e::noise;
use sealfs_e2e::registry::DockerRegistry;

pub const SEALCTL: &str = env!("CARGO_BIN_EXE_sealctl");

pub fn prerequisites() -> bool {
    have_tools(&["umoci", "busybox", "setfattr", "mknod", "mkfifo"])
}

/// Whether we are root and `tools` are on PATH; in CI a missing one fails the test, elsewhere
/// the test is skipped with a note.
pub fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    let root = nix_is_root();
    if missing.is_empty() && root {
        return true;
    }
    let why = format!("missing tools {missing:?}, root: {root}");
    if std::env::var_os("CI").is_some() {
        panic!("prerequisites missing in CI: {why}");
    }
    eprintln!("skipping: {why}");
    false
}

pub fn nix_is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sealctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(SEALCTL)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

pub fn sealctl_ok(dir: &Path, args: &[&str]) -> String {
    let out = sealctl(dir, args);
    assert!(
        out.status.success(),
        "sealctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn sealctl_err(dir: &Path, args: &[&str]) -> String {
    let out = sealctl(dir, args);
    assert!(!out.status.success(), "sealctl {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

pub fn umoci(dir: &Path, args: &[&str]) {
    run(Command::new("umoci").current_dir(dir).args(args));
}

/// Builds `img:v1`: a busybox rootfs with every file type, then a second layer deleting files.
pub fn build_image(work: &Path) {
    umoci(work, &["init", "--layout", "img"]);
    umoci(work, &["new", "--image", "img:v1"]);
    umoci(work, &["unpack", "--image", "img:v1", "bundle"]);
    let root = work.join("bundle/rootfs");
    for dir in [
        "bin",
        "etc/conf.d",
        "dev",
        "run",
        "data/many",
        "var/cache/app",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    fs::hard_link(root.join("bin/busybox"), root.join("bin/busybox-hardlink")).unwrap();
    fs::write(root.join("etc/motd"), "sealed with sealfs\n").unwrap();
    fs::write(root.join("etc/removed"), "gone in layer 2\n").unwrap();
    fs::write(root.join("var/cache/app/old"), "hidden by an opaque dir\n").unwrap();
    fs::write(root.join("data/big.bin"), noise(7, 5 << 20)).unwrap();
    for i in 0..300 {
        fs::write(
            root.join(format!("data/many/f{i:03}")),
            format!("small file {i}\n").repeat(i % 7 + 1),
        )
        .unwrap();
    }
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(root.join("etc/motd"), Some(1000), Some(1001)).unwrap();
    run(Command::new("mknod")
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]));
    run(Command::new("mknod")
        .arg(root.join("dev/loop9"))
        .args(["b", "7", "9"]));
    run(Command::new("mkfifo").arg(root.join("run/fifo")));
    run(Command::new("setfattr")
        .args(["-n", "user.comment", "-v", "hello xattr"])
        .arg(root.join("etc/motd")));
    run(Command::new("setfattr")
        .args([
            "-n",
            "security.capability",
            "-v",
            "0x0100000200200000000000000000000000000000",
        ])
        .arg(root.join("bin/sh").parent().unwrap().join("busybox")));
    umoci(
        work,
        &["repack", "--refresh-bundle", "--image", "img:v1", "bundle"],
    );
    // Layer 2: a deleted file (whiteout) and a replaced directory.
    fs::remove_file(root.join("etc/removed")).unwrap();
    fs::remove_dir_all(root.join("var/cache/app")).unwrap();
    fs::create_dir_all(root.join("var/cache/app")).unwrap();
    fs::write(root.join("var/cache/app/new"), "layer 2\n").unwrap();
    umoci(work, &["repack", "--image", "img:v1", "bundle"]);
    umoci(
        work,
        &["config", "--image", "img:v1", "--config.cmd", "/bin/sh"],
    );
}

pub fn unpack(work: &Path, image: &str, bundle: &str) -> BTreeMap<String, String> {
    umoci(work, &["unpack", "--image", image, bundle]);
    sealfs_e2e::snapshot_tree(&work.join(bundle).join("rootfs"))
}

/// Writes `manifest` (its config replaced by `config`, written too) as image `tag` of the
/// layout at `dir`, whose layer blobs are already there.
#[allow(dead_code)] // not every test binary writes images by hand
pub fn tag_image(
    dir: &Path,
    mut manifest: serde_json::Value,
    config: &serde_json::Value,
    tag: &str,
) {
    use snapshotter::oci_layout::{descriptor, OciLayout};
    let layout = OciLayout::open_or_create(dir).unwrap();
    let (digest, size) = layout
        .put_blob(&serde_json::to_vec(config).unwrap())
        .unwrap();
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = layout
        .put_blob(&serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    let desc = descriptor(oci_spec::image::MediaType::ImageManifest, &digest, size).unwrap();
    layout.set_tag(&desc, Some(tag)).unwrap();
}

pub fn manifest_of(work: &Path, layout: &str, tag: &str) -> serde_json::Value {
    let layout = snapshotter::oci_layout::OciLayout::open(work.join(layout)).unwrap();
    let image = layout.resolve(Some(tag)).unwrap();
    serde_json::to_value(&image.manifest).unwrap()
}

pub fn keygen(work: &Path, name: &str) -> String {
    sealctl_ok(
        work,
        &[
            "keygen",
            "--private",
            &format!("{name}.priv"),
            "--public",
            &format!("{name}.pub"),
        ],
    );
    key_id(work, name)
}

/// The key id of `NAME.pub` in `work` (its comment line ends with it).
pub fn key_id(work: &Path, name: &str) -> String {
    let text = fs::read_to_string(work.join(format!("{name}.pub"))).unwrap();
    text.lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
}

pub fn setup() -> Option<(tempfile::TempDir, PathBuf)> {
    if !prerequisites() {
        return None;
    }
    let temp = tempfile::tempdir().unwrap();
    let work = temp.path().to_path_buf();
    build_image(&work);
    Some((temp, work))
}

/// What the app image's command prints.
pub const GREETING: &str = "hello from a sealed image";

/// Root, the image tools, containerd, runc, ctr-remote and a registry.
pub fn node_prerequisites() -> bool {
    prerequisites() && have_tools(&["containerd", "ctr", "runc", "ctr-remote", "docker-registry"])
}

/// `img:v1` of [`build_image`] plus a third layer: 24 MiB of data files and a greeting the
/// image's command prints. Returns the work directory with keys `alice` (the node) and `bob`.
pub fn app_image() -> Option<(tempfile::TempDir, PathBuf)> {
    if !node_prerequisites() {
        return None;
    }
    let (temp, work) = setup()?;
    let root = work.join("bundle/rootfs");
    fs::create_dir_all(root.join("data/blobs")).unwrap();
    for i in 0..6 {
        fs::write(
            root.join(format!("data/blobs/blob-{i}")),
            noise(100 + i, 4 << 20),
        )
        .unwrap();
    }
    fs::write(root.join("etc/greeting"), format!("{GREETING}\n")).unwrap();
    umoci(&work, &["repack", "--image", "img:v1", "bundle"]);
    umoci(
        &work,
        &[
            "config",
            "--image",
            "img:v1",
            "--config.cmd",
            "/bin/busybox",
            "--config.cmd",
            "cat",
            "--config.cmd",
            "/etc/greeting",
        ],
    );
    keygen(&work, "alice");
    keygen(&work, "bob");
    Some((temp, work))
}

/// A sealed image in the registry.
pub struct Sealed {
    pub reference: String,
    /// Sum of the sealed layers' sizes.
    pub size: u64,
    pub layers: usize,
    /// The sealed layers' blob digests.
    pub digests: Vec<String>,
}

/// Seals `img:v1` for `recipient` and pushes it as `NAME:sealed`.
pub fn push_sealed(work: &Path, registry: &DockerRegistry, recipient: &str, name: &str) -> Sealed {
    let reference = format!("{}/{name}:sealed", registry.host);
    sealctl_ok(
        work,
        &[
            "seal",
            "--recipient",
            &format!("{recipient}.pub"),
            "oci:img:v1",
            &format!("docker://{reference}"),
        ],
    );
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}")))
    .stdout;
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    Sealed {
        size: layers.iter().map(|l| l["size"].as_u64().unwrap()).sum(),
        layers: layers.len(),
        digests: layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect(),
        reference,
    }
}
