//! `sealctl optimize`: record what a sealed image reads at start-up by running it, and seal it
//! again with that order as each layer's startup profile.
//!
//! The layers are mounted here with the snapshotter's own FUSE filesystem, recording per
//! layer the order of first reads, and stacked with overlayfs (a scratch upper dir, so the
//! container may write). containerd runs the container on that root (`ctr run --rootfs`).
//! The recording never leaves this process: the new image carries it inside each layer's
//! encrypted index.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fsformat::writer::SealOptions;
use sealfs_tools::keyfiles::AnyRecipient;
use snapshotter::cache::MemoryCache;
use snapshotter::fetcher::{FetchConfig, FetchPool};
use snapshotter::mount::{self, MountOptions, MountedLayer, OpenedLayer};
use snapshotter::mount_table;
use snapshotter::oci_layout::OciLayout;

use crate::image::{finish_sealed, is_sealed, layer_label, parallel, seal_one};
use crate::transport::{source_tag, Transport};

/// What `sealctl optimize` was asked, besides SRC and DST.
#[derive(clap::Args)]
pub struct OptimizeOptions {
    /// A recipient of SRC that opens it: a private key file or provider:NAME (repeat to try
    /// several).
    #[arg(
        long = "key",
        short = 'k',
        value_name = "PRIV|provider:NAME",
        required = true
    )]
    pub keys: Vec<String>,
    /// A recipient of DST (repeatable): a public key file or provider:NAME[:ARGS] [default:
    /// the first --key's public key, or its provider].
    #[arg(long = "recipient", short = 'r', value_name = "PUB|provider:NAME")]
    pub recipients: Vec<String>,
    /// Stop recording after this long (the container is killed), e.g. 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// containerd's socket.
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,
    /// containerd namespace for the recording container.
    #[arg(long, short = 'n', default_value = "sealfs-optimize")]
    pub namespace: String,
    /// Command to run instead of the image's entrypoint and cmd, as a JSON array (as
    /// stargz's optimize takes it): '["python3", "-c", "import json"]'.
    #[arg(long, value_name = "JSON", value_parser = parse_args)]
    pub args: Option<JsonArgs>,
}

/// Parses `30s`, `2m`, `500ms` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .map(|n| Duration::from_secs_f64(n * scale))
        .ok_or_else(|| format!("{text:?} is not a duration (examples: 30s, 2m, 500ms)"))
}

/// A command line given as a JSON array (`--args`).
#[derive(Clone, Debug)]
pub struct JsonArgs(pub Vec<String>);

/// Parses `--args`: a JSON array of strings.
pub fn parse_args(text: &str) -> Result<JsonArgs, String> {
    match serde_json::from_str::<Vec<String>>(text) {
        Ok(args) if !args.is_empty() => Ok(JsonArgs(args)),
        _ => Err(format!(
            "{text:?} is not a non-empty JSON array of strings (example: '[\"python3\", \"-c\", \"import json\"]')"
        )),
    }
}

/// The process an image's config says to run.
struct Process {
    args: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
}

fn process_of(config: &[u8], args: Option<&[String]>) -> Result<Process> {
    let config: serde_json::Value =
        serde_json::from_slice(config).context("image config is not JSON")?;
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let settings = &config["config"];
    let args = match args {
        Some(args) => args.to_vec(),
        None => {
            let mut args = strings(&settings["Entrypoint"]);
            args.extend(strings(&settings["Cmd"]));
            args
        }
    };
    ensure!(
        !args.is_empty(),
        "the image has no entrypoint or cmd; say what to run with --args"
    );
    Ok(Process {
        args,
        env: strings(&settings["Env"]),
        cwd: settings["WorkingDir"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(str::to_string),
    })
}

/// The image's layers mounted with recording on, stacked at `root`; dropping it unmounts
/// everything and removes the scratch directory.
struct Recording {
    layers: Vec<MountedLayer>,
    root: PathBuf,
    scratch: tempfile::TempDir,
}

impl Recording {
    fn mount(opened: &[OpenedLayer]) -> Result<Self> {
        // Short paths: overlayfs takes every lower dir in one page of mount options.
        let scratch = tempfile::Builder::new()
            .prefix("sealctl-opt.")
            .tempdir_in("/tmp")
            .context("creating a scratch directory")?;
        let options = MountOptions {
            fetch: FetchConfig {
                // Reads fetch what they need, nothing else: the recording is the point.
                background: false,
                profile: false,
                readahead_bytes: 0,
                ..FetchConfig::default()
            },
            ..MountOptions::default()
        };
        let memory = Arc::new(MemoryCache::new(256 << 20));
        let pool = FetchPool::start(options.pool.clone());
        let mut filesystems = mount::image_filesystems(opened, &pool, &memory, &options)?;
        for fs in &mut filesystems {
            fs.record_reads();
        }
        let (layers, lowers) =
            mount::mount_each(filesystems, scratch.path(), &options, "optimize")?;
        let recording = Recording {
            layers,
            root: scratch.path().join("r"),
            scratch,
        };
        let (upper, work) = (
            recording.scratch.path().join("u"),
            recording.scratch.path().join("w"),
        );
        for dir in [&upper, &work, &recording.root] {
            std::fs::create_dir(dir)?;
        }
        mount_table::mount_overlay_writable(&lowers, &upper, &work, &recording.root)?;
        Ok(recording)
    }

    /// Per layer, the paths first read, in order.
    fn profiles(&self) -> Vec<Vec<Vec<u8>>> {
        self.layers.iter().map(|l| l.fs.recorded_reads()).collect()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if mount_table::is_mounted(&self.root) {
            if let Err(error) = mount_table::unmount(&self.root) {
                eprintln!(
                    "sealctl: warning: unmounting {}: {error}",
                    self.root.display()
                );
            }
        }
        self.layers.clear();
    }
}

/// Runs `process` on `root` through containerd until it exits or `timeout`; says how it
/// ended.
fn run_container(options: &OptimizeOptions, root: &Path, process: &Process) -> Result<String> {
    let id = format!("sealctl-optimize-{}", std::process::id());
    let ctr = |args: &[&str]| {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&options.address)
            .args(["--namespace", &options.namespace])
            .args(args);
        command
    };
    let mut command = ctr(&["run", "--rm", "--rootfs"]);
    for variable in &process.env {
        command.arg("--env").arg(variable);
    }
    if let Some(cwd) = &process.cwd {
        command.arg("--cwd").arg(cwd);
    }
    command.arg(root).arg(&id).args(&process.args);
    // The container's output goes to our standard error: standard output stays ours.
    let stdout = {
        use std::os::fd::AsFd;
        Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?)
    };
    let mut child = command
        .stdout(stdout)
        .stdin(Stdio::null())
        .spawn()
        .context("running ctr (is containerd installed?)")?;
    let deadline = Instant::now() + options.timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(if status.success() {
                "the container exited".to_string()
            } else {
                format!("the container exited with {status} (its reads are recorded all the same)")
            });
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = ctr(&["task", "kill", "--signal", "SIGKILL", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let killed_by = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() >= killed_by {
            let _ = child.kill();
            bail!(
                "container {id} did not stop after SIGKILL; check `ctr -n {} task ls`",
                options.namespace
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!(
        "recording stopped after {:?} (the container was killed)",
        options.timeout
    ))
}

/// Records the start-up of `source` and writes the profiled copy to `destination`.
pub fn optimize(
    transport: &Transport,
    options: &OptimizeOptions,
    source: &str,
    destination: &str,
) -> Result<()> {
    let identities = sealfs_tools::keyfiles::load_identities(&options.keys)?;
    let recipients: Vec<AnyRecipient> = if options.recipients.is_empty() {
        let first = &options.keys[0];
        if first.starts_with("provider:") {
            eprintln!("no --recipient: sealing for {first}, the first --key");
            sealfs_tools::keyfiles::load_recipients(std::slice::from_ref(first))?
        } else {
            eprintln!("no --recipient: sealing for the public key of the first --key");
            vec![Box::new(identities.keys[0].public())]
        }
    } else {
        sealfs_tools::keyfiles::load_recipients(&options.recipients)?
    };
    let source_image = transport.open_source(source)?;
    let (src, image) = (&source_image.layout, &source_image.image);
    let layers = image.manifest.layers();
    let mut opened = Vec::new();
    for (number, layer) in layers.iter().enumerate() {
        let which = layer_label(number, layers);
        ensure!(
            is_sealed(layer),
            "{which} is not sealed: optimize records sealed images; seal it first (sealctl seal)"
        );
        opened.push(
            mount::open_layer(src, layer, &identities)
                .with_context(|| format!("{which}: cannot open the layer"))?,
        );
    }
    let process = process_of(&image.config, options.args.as_ref().map(|a| a.0.as_slice()))?;

    eprintln!(
        "recording the start-up of {source}: {:?} (at most {:?})",
        process.args, options.timeout
    );
    let recording = Recording::mount(&opened)?;
    let ended = run_container(options, &recording.root, &process)?;
    let profiles = recording.profiles();
    drop(recording);
    eprintln!("{ended}");
    let total: usize = profiles.iter().map(Vec::len).sum();
    ensure!(
        total > 0,
        "the container read no file of the image ({ended}); nothing to profile: check \
         containerd's --address and --args"
    );

    let destination_layout = transport.open_destination(destination, source_tag(source))?;
    let dst = &destination_layout.layout;
    let items: Vec<usize> = (0..layers.len()).collect();
    let sealed = parallel(&items, |_, &number| {
        let layer = &layers[number];
        let which = layer_label(number, layers);
        // The same chunk size as before: the profile changes packing, not chunking.
        let chunk_size = 1u64 << opened[number].layer.footer().chunk_size_log2;
        let mut seal_options = SealOptions::with_chunk_size(chunk_size)?;
        seal_options.threads = super::image::compression_threads(layers.len());
        seal_options.set_prefetch_paths(profiles[number].iter().map(Vec::as_slice))?;
        let (sealed, summary) = reseal(
            src,
            dst,
            &opened[number],
            layer,
            &seal_options,
            &recipients,
            &which,
        )?;
        eprintln!(
            "{which}: {} files read at start-up; {} chunks ({:.1} MB) to prefetch",
            profiles[number].len(),
            summary.prefetch_chunks,
            summary.prefetch_bytes as f64 / 1e6
        );
        Ok(sealed)
    })?;
    let manifest = finish_sealed(&source_image, destination_layout, sealed)?;
    eprintln!(
        "wrote {destination} with a startup profile of {total} files for {} recipient(s) (manifest {})",
        recipients.len(),
        manifest.digest()
    );
    Ok(())
}

/// Seals a sealed layer again: its tar streams from the unsealing thread into the sealer
/// through a pipe, so the plaintext is never on disk.
fn reseal(
    src: &OciLayout,
    dst: &OciLayout,
    opened: &OpenedLayer,
    layer: &oci_spec::image::Descriptor,
    options: &SealOptions,
    recipients: &[AnyRecipient],
    which: &str,
) -> Result<(oci_spec::image::Descriptor, fsformat::writer::SealSummary)> {
    let blob = src.open_blob(layer.digest().as_ref())?;
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    std::thread::scope(|scope| {
        let unsealing = scope.spawn(move || -> Result<()> {
            let out = fsformat::unseal::unseal_layer(&opened.layer, &blob, BufWriter::new(writer))
                .with_context(|| format!("unsealing {which}"))?;
            out.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|mut w| w.flush())
                .context("writing the pipe")?;
            Ok(())
        });
        let sealed = seal_one(dst, layer, reader, options, recipients, which);
        let unsealed = unsealing
            .join()
            .expect("the unsealing thread does not panic");
        // An unsealing failure can end the tar early at an entry boundary: it wins.
        unsealed?;
        sealed
    })
}
