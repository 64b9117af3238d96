//! The benchmark's images, built locally into OCI layouts with umoci and kept between runs
//! (`WORK/images/NAME`): building `python` with debootstrap takes minutes.
//!
//! Each image's command does its start-up work and prints `ready`; the harness times until
//! that line.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sealfs_e2e::noise;

use crate::command::{run, which};

/// The line every workload prints when it is ready.
pub const READY: &str = "ready";

/// A benchmark image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageKind {
    /// Debian bookworm minbase with python3; imports a handful of stdlib modules.
    Python,
    /// A small base and ~1 GiB of files, of which the workload reads ~5%.
    Bigdata,
    /// ~50k small files, of which the workload reads a few hundred.
    Manyfiles,
}

impl ImageKind {
    /// Its name (layout directory and repository).
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Python => "python",
            ImageKind::Bigdata => "bigdata",
            ImageKind::Manyfiles => "manyfiles",
        }
    }
}

/// How big the generated images are: `Full` as the issue describes, `Quick` a small version
/// for the smoke test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Full size.
    Full,
    /// Small, for `--quick`.
    Quick,
}

/// Writes a busybox base (sh, cat, echo) into `root`.
pub fn busybox_base(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("etc"))?;
    let busybox = which("busybox").context("busybox is not installed")?;
    fs::copy(&busybox, root.join("bin/busybox"))?;
    for applet in ["sh", "cat", "echo"] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(())
}

/// The Debian mirror this machine's apt uses.
fn debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list".into()].into_iter().chain(
        fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    ) {
        let path: PathBuf = path;
        let name = path.to_string_lossy();
        if name.ends_with(".list") || name.ends_with(".sources") {
            texts.push(fs::read_to_string(&path).unwrap_or_default());
        }
    }
    for text in texts {
        for line in text.lines().map(str::trim) {
            let url = line
                .strip_prefix("URIs:")
                .map(|u| u.split_whitespace().next().unwrap_or_default().to_string())
                .or_else(|| {
                    line.strip_prefix("deb ").and_then(|rest| {
                        rest.split_whitespace()
                            .find(|w| w.starts_with("http"))
                            .map(str::to_string)
                    })
                });
            if let Some(url) = url {
                if url.ends_with("/debian") {
                    return Ok(url);
                }
            }
        }
    }
    bail!("no Debian mirror found in /etc/apt/sources.list*")
}

/// The plain image's layout, building it if it is not there yet. Returns the layout directory
/// (tag `latest`) and the command that prints `ready`.
pub fn build(kind: ImageKind, scale: Scale, work: &Path) -> Result<(PathBuf, Vec<String>)> {
    let suffix = if scale == Scale::Quick { "-quick" } else { "" };
    let layout = work.join("images").join(format!("{}{suffix}", kind.name()));
    let command = workload(kind, scale);
    if layout.join("index.json").exists() {
        return Ok((layout, command));
    }
    eprintln!("building image {} in {}", kind.name(), layout.display());
    let staging = work
        .join("images")
        .join(format!(".build-{}{suffix}", kind.name()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    let oci = staging.join("layout");
    let tag = format!("{}:latest", oci.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&oci))?;
    run(Command::new("umoci").args(["new", "--image", &tag]))?;
    let bundle = staging.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &tag])
        .arg(&bundle))?;
    let root = bundle.join("rootfs");
    // The base layer, then the data layer: two layers, as in a typical image.
    if kind == ImageKind::Python {
        let rootfs = staging.join("debootstrap");
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include=python3", "bookworm"])
            .arg(&rootfs)
            .arg(debian_mirror()?))?;
        run(Command::new("sh").arg("-c").arg(format!(
            "cp -a {}/. {}/",
            rootfs.display(),
            root.display()
        )))?;
    } else {
        busybox_base(&root)?;
    }
    run(Command::new("umoci")
        .args(["repack", "--refresh-bundle", "--image", &tag])
        .arg(&bundle))?;
    match kind {
        ImageKind::Python => {
            // An application directory, as images add on a base.
            fs::create_dir_all(root.join("app"))?;
            fs::write(
                root.join("app/main.py"),
                "import json, csv, decimal, email.parser, http.client, sqlite3, asyncio\n\
                 print('ready', flush=True)\n",
            )?;
        }
        ImageKind::Bigdata => {
            let files = if scale == Scale::Quick { 16 } else { 256 };
            fs::create_dir_all(root.join("data"))?;
            for i in 0..files {
                fs::write(
                    root.join(format!("data/f{i:03}")),
                    noise(i as u64 + 1, 4 << 20),
                )?;
            }
        }
        ImageKind::Manyfiles => {
            let (dirs, per_dir) = if scale == Scale::Quick {
                (10, 100)
            } else {
                (100, 500)
            };
            for d in 0..dirs {
                let dir = root.join(format!("data/d{d:02}"));
                fs::create_dir_all(&dir)?;
                for f in 0..per_dir {
                    let seed = (d * per_dir + f) as u64;
                    let mut file = fs::File::create(dir.join(format!("f{f:03}")))?;
                    // Half text, half noise: small files that compress somewhat.
                    let len = 512 + (seed as usize * 37) % 3584;
                    file.write_all(format!("file {d}/{f}\n").repeat(len / 32).as_bytes())?;
                    file.write_all(&noise(seed, len / 2))?;
                }
            }
        }
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &tag])
        .arg(&bundle))?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &tag]);
    for arg in &command {
        config.arg("--config.cmd").arg(arg);
    }
    run(&mut config)?;
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&oci))?;
    fs::rename(&oci, &layout)?;
    let _ = fs::remove_dir_all(&staging);
    Ok((layout, command))
}

/// The image's command: start-up work, then `ready`.
fn workload(kind: ImageKind, scale: Scale) -> Vec<String> {
    let sh = |script: String| vec!["/bin/sh".to_string(), "-c".to_string(), script];
    match kind {
        ImageKind::Python => vec!["/usr/bin/python3".into(), "/app/main.py".into()],
        ImageKind::Bigdata => {
            // ~5% of the data: 13 of 256 files (1 of 16 for quick).
            let files = if scale == Scale::Quick { 1 } else { 13 };
            let paths: Vec<String> = (0..files)
                .map(|i| format!("/data/f{:03}", i * 19))
                .collect();
            sh(format!(
                "cat {} > /dev/null && echo {READY}",
                paths.join(" ")
            ))
        }
        ImageKind::Manyfiles => {
            // 300 files spread over the directories (30 for quick).
            let (dirs, count) = if scale == Scale::Quick {
                (10, 30)
            } else {
                (100, 300)
            };
            let paths: Vec<String> = (0..count)
                .map(|i| format!("/data/d{:02}/f{:03}", i % dirs, (i * 7) % 100))
                .collect();
            sh(format!(
                "cat {} > /dev/null && echo {READY}",
                paths.join(" ")
            ))
        }
    }
}
