//! `mount.sealfs`: mount a sealed image or one of its layers read-only, lazily.
//!
//! Usage as a mount helper: `mount.sealfs SOURCE MOUNTPOINT [-o OPTIONS] [-f]`, so that
//! `mount -t sealfs SOURCE DIR -o key=...` works once this binary is installed as
//! `/sbin/mount.sealfs`. It opens and verifies every layer's index first, then forks: the
//! child serves the mount, the parent exits 0 once the mount is up, or non-zero with the
//! child's error (nothing stays mounted). `umount DIR` ends the child cleanly.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use oci_spec::image::Descriptor;
use sealfs_tools::image_ref::ImageRef;
use snapshotter::cache::MemoryCache;
use snapshotter::credentials;
use snapshotter::fetcher::FetchConfig;
use snapshotter::fetcher::FetchPool;
use snapshotter::keys::Identities;
use snapshotter::mount::{self, MountOptions, MountRestrictions, MountedLayer, OpenedLayer};
use snapshotter::mount_table;
use snapshotter::oci_layout::OciLayout;
use snapshotter::registry::{self, Registry, RegistryOptions};

/// Mount a sealed image (all layers, merged read-only with overlayfs as a container sees them)
/// or one sealed layer, fetching and decrypting chunks only when they are read.
#[derive(Parser)]
#[command(name = "mount.sealfs", version, max_term_width = 100, after_help = OPTIONS_HELP)]
struct Cli {
    /// oci:DIR[:TAG] or docker://HOST/REPO[:TAG] for a whole image; append @sha256:DIGEST
    /// for one layer.
    source: String,
    /// Where to mount it (an existing directory).
    mountpoint: PathBuf,
    /// Comma-separated mount options (see below); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (logs go to standard error).
    #[arg(short = 'f')]
    foreground: bool,
    /// Accepted for mount(8) compatibility: do not write /etc/mtab (never written anyway).
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    /// Accepted for mount(8) compatibility: sloppy options, verbose.
    #[arg(short = 's', hide = true)]
    sloppy: bool,
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// Accepted for mount(8) compatibility: the type (sealfs).
    #[arg(short = 't', hide = true)]
    fs_type: Option<String>,
}

const OPTIONS_HELP: &str = "\
Options (-o):
  key=FILE         private key that is a recipient of the image (repeat for several)
  shares=DIR       combine the key shares in DIR into the private key
  cache=DIR        keep fetched chunks (ciphertext only) under DIR [default: memory only]
  prefetch=on|off  fetch the whole image in the background after mounting [on]
  threads=N        chunk fetch threads, all layers [8]
  merge=KIB        largest merged range read of the background fetch [4096]
  bandwidth=MIB    cap the background fetch at MIB MiB/s, all layers [no cap]
  timeout=SECS     a read waits at most this long for its chunk, then fails with EIO [30]
  memory=MIB       plaintext chunk cache in memory, all layers [256]
  auth=FILE        docker config.json with registry credentials (auths, credHelpers,
                   credsStore) [$DOCKER_CONFIG/config.json, else ~/.docker/config.json]
  hosts=DIR        registry mirrors in containerd's layout, DIR/REGISTRY/hosts.toml
                   [/etc/containerd/certs.d if it exists]
  log=FILE         where the background process logs [/var/log/sealfs/mount.log]
  debug            log every fetch
  noexec           nothing on the mount can be executed (exec: the default)
The mount is always read-only, nosuid and nodev: an inspected image's setuid files gain no
privileges and its device nodes cannot be opened (suid and dev are refused).
Accepted and ignored: rw (mount(8) passes it by default), ro, defaults, nosuid, nodev,
noatime, relatime, auto, noauto, user, nouser, _netdev, nofail, x-*.

Examples:
  mount.sealfs oci:/srv/images/app:1.0 /mnt/app -o key=/etc/sealfs/keys/node.key
  mount.sealfs docker://registry.example.com/app:1.0 /mnt/app -o key=node.key
  mount -t sealfs oci:/srv/images/app:1.0 /mnt/app -o key=/etc/sealfs/keys/node.key,cache=/var/cache/sealfs
  umount /mnt/app";

struct Options {
    keys: Vec<PathBuf>,
    shares: Option<PathBuf>,
    mount: MountOptions,
    memory_bytes: u64,
    log: PathBuf,
    debug: bool,
    docker_config: Option<PathBuf>,
    hosts_dir: Option<PathBuf>,
}

fn parse_options(raw: &[String]) -> Result<Options> {
    let mut options = Options {
        keys: Vec::new(),
        shares: None,
        mount: MountOptions {
            fetch: FetchConfig::default(),
            // An image mounted for inspection is untrusted: its setuid files and device nodes
            // must not hand every local user root or raw devices.
            restrictions: MountRestrictions::inspection(false),
            ..MountOptions::default()
        },
        memory_bytes: 256 << 20,
        log: PathBuf::from("/var/log/sealfs/mount.log"),
        debug: false,
        docker_config: None,
        hosts_dir: None,
    };
    for option in raw
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (option, None),
        };
        let need = || value.with_context(|| format!("option {name} needs a value ({name}=...)"));
        let number = |what: &str| -> Result<u64> {
            need()?
                .parse::<u64>()
                .with_context(|| format!("option {what} takes a whole number"))
        };
        match name {
            "key" => options.keys.push(PathBuf::from(need()?)),
            "shares" => options.shares = Some(PathBuf::from(need()?)),
            "cache" => options.mount.cache_dir = Some(PathBuf::from(need()?)),
            "prefetch" => {
                options.mount.fetch.background = match need()? {
                    "on" => true,
                    "off" => false,
                    other => bail!("prefetch={other}: use prefetch=on or prefetch=off"),
                }
            }
            "threads" => options.mount.pool.threads = number("threads")?.clamp(1, 256) as usize,
            "merge" => options.mount.fetch.merge_bytes = number("merge")?.max(1) << 10,
            "bandwidth" => {
                options.mount.pool.background_bytes_per_sec =
                    Some(number("bandwidth")?.max(1) << 20)
            }
            "timeout" => {
                options.mount.fetch.timeout =
                    std::time::Duration::from_secs(number("timeout")?.max(1))
            }
            "memory" => options.memory_bytes = number("memory")? << 20,
            "log" => options.log = PathBuf::from(need()?),
            "auth" => options.docker_config = Some(PathBuf::from(need()?)),
            "hosts" => options.hosts_dir = Some(PathBuf::from(need()?)),
            "debug" => options.debug = true,
            "noexec" => options.mount.restrictions.noexec = true,
            "exec" => options.mount.restrictions.noexec = false,
            // mount(8) passes rw unless told otherwise; the mount is read-only regardless, and
            // always nosuid,nodev (suid and dev are refused as unknown options).
            "rw" | "ro" | "defaults" | "nosuid" | "nodev" | "noatime" | "relatime" | "auto"
            | "noauto" | "user" | "nouser" | "_netdev" | "nofail" => {}
            other if other.starts_with("x-") => {}
            other => bail!("unknown option {other:?} (see mount.sealfs --help)"),
        }
    }
    if options.keys.is_empty() && options.shares.is_none() {
        bail!("no key given: pass -o key=PRIVATE_KEY_FILE (or shares=DIR)");
    }
    Ok(options)
}

/// Where the image is, and which layer (all if `None`).
struct Source {
    image: ImageRef,
    layer: Option<String>,
}

/// Splits `oci:DIR[:TAG][@sha256:LAYER]` or `docker://HOST/REPO[:TAG][@sha256:MANIFEST][@sha256:LAYER]`.
/// For a registry, a trailing digest selects a layer only after a tag or a manifest digest, so
/// `docker://host/repo@sha256:...` still names a whole image by its manifest digest.
fn parse_source(text: &str) -> Result<Source> {
    let (image, layer) = match text.rsplit_once('@') {
        Some((image, digest)) if digest.starts_with("sha256:") => {
            let names_layer = match image.strip_prefix("docker://") {
                Some(reference) => {
                    let last = reference.rsplit('/').next().unwrap_or_default();
                    reference.contains('@') || last.contains(':')
                }
                None => true,
            };
            if names_layer {
                (image, Some(digest.to_string()))
            } else {
                (text, None)
            }
        }
        _ => (text, None),
    };
    Ok(Source {
        image: image.parse()?,
        layer,
    })
}

fn identities(options: &Options) -> Result<Identities> {
    let mut keys = sealfs_tools::keyfiles::load_privates(&options.keys)?;
    if let Some(dir) = &options.shares {
        keys.push(sealfs_tools::keyfiles::combine_share_dir(dir)?);
    }
    Ok(Identities::from(keys))
}

/// The layers chosen from a manifest, bottom first.
fn chosen_layers<'a>(
    layers: &'a [Descriptor],
    layer: &Option<String>,
    source: &str,
) -> Result<Vec<&'a Descriptor>> {
    match layer {
        Some(digest) => {
            let found: Vec<_> = layers
                .iter()
                .filter(|l| l.digest().to_string() == *digest)
                .collect();
            if found.is_empty() {
                bail!("{digest} is not a layer of {source}");
            }
            Ok(found)
        }
        None => Ok(layers.iter().collect()),
    }
}

/// Opens and verifies every layer to mount, bottom first. A registry source also returns the
/// runtime its requests run on, which must live as long as the mount.
fn open_layers(
    text: &str,
    identities: &Identities,
    options: &Options,
) -> Result<(Vec<OpenedLayer>, Option<tokio::runtime::Runtime>)> {
    let source = parse_source(text)?;
    match &source.image {
        ImageRef::Layout { dir, tag } => {
            let layout = OciLayout::open(dir)?;
            let image = layout
                .resolve(tag.as_deref())
                .with_context(|| format!("resolving {text}"))?;
            let opened = chosen_layers(image.manifest.layers(), &source.layer, text)?
                .into_iter()
                .map(|descriptor| {
                    mount::open_layer(&layout, descriptor, identities).map_err(anyhow::Error::from)
                })
                .collect::<Result<_>>()?;
            Ok((opened, None))
        }
        ImageRef::Registry { reference } => {
            let runtime = registry::client_runtime().context("starting the registry client")?;
            let parsed = Registry::parse(reference)?;
            let host = parsed.resolve_registry().to_string();
            let settings = RegistryOptions {
                hosts_dir: options
                    .hosts_dir
                    .clone()
                    .or_else(credentials::default_hosts_dir),
                ..RegistryOptions::default()
            };
            let registry = Registry::connect_with_docker_config(
                runtime.handle().clone(),
                &host,
                settings,
                options.docker_config.as_deref(),
            )?;
            let image = registry
                .resolve(&parsed)
                .with_context(|| format!("resolving {text}"))?;
            let opened = chosen_layers(image.image.manifest.layers(), &source.layer, text)?
                .into_iter()
                .map(|descriptor| {
                    let blob = Arc::new(registry.layer(&image, descriptor));
                    mount::open_sealed_layer(
                        descriptor,
                        blob,
                        identities,
                        mount::DEFAULT_MAX_INDEX_BYTES,
                    )
                    .map_err(anyhow::Error::from)
                })
                .collect::<Result<_>>()?;
            Ok((opened, Some(runtime)))
        }
    }
}

/// Mounted state of the child; dropping it unmounts everything.
struct Served {
    layers: Vec<MountedLayer>,
    overlay: Option<PathBuf>,
    scratch: Option<PathBuf>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(target) = self.overlay.take() {
            if mount_table::is_mounted(&target) {
                let _ = mount_table::unmount(&target);
            }
        }
        self.layers.clear();
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn serve(opened: Vec<OpenedLayer>, mountpoint: &Path, options: &Options) -> Result<Served> {
    let memory = Arc::new(MemoryCache::new(options.memory_bytes));
    let pool = FetchPool::start(options.mount.pool.clone());
    let mut fss = mount::image_filesystems(&opened, &pool, &memory, &options.mount)?;
    if fss.len() == 1 {
        let fs = fss.pop().expect("one layer");
        let layer = MountedLayer::mount(fs, mountpoint, &options.mount, &opened[0].digest)?;
        return Ok(Served {
            layers: vec![layer],
            overlay: None,
            scratch: None,
        });
    }
    // Each layer gets a private mount point; overlayfs stacks them at the target.
    let scratch = PathBuf::from(format!("/run/sealfs/mount.sealfs/{}", std::process::id()));
    let mut served = Served {
        layers: Vec::new(),
        overlay: None,
        scratch: Some(scratch.clone()),
    };
    // Named by the top layer, as a lone layer's mount is.
    let top = &opened.last().expect("an image has layers").digest;
    let (layers, lowers) = mount::mount_each(fss, &scratch, &options.mount, top)?;
    served.layers = layers;
    mount_table::mount_overlay(&lowers, mountpoint, options.mount.restrictions)?;
    served.overlay = Some(mountpoint.to_path_buf());
    Ok(served)
}

fn init_logging(options: &Options, foreground: bool) -> Result<()> {
    let level = if options.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    if foreground {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        return Ok(());
    }
    if let Some(dir) = options.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&options.log)
        .with_context(|| format!("opening log file {}", options.log.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(())
}

/// Opens every layer and mounts them; what a failed mount reports.
fn prepare(
    cli: &Cli,
    options: &Options,
    mountpoint: &Path,
) -> Result<(Served, Option<tokio::runtime::Runtime>)> {
    let identities = identities(options)?;
    let (opened, runtime) = open_layers(&cli.source, &identities, options)?;
    drop(identities);
    let served = serve(opened, mountpoint, options)?;
    tracing::info!(source = %cli.source, mountpoint = %mountpoint.display(), layers = served.layers.len(), "mounted");
    Ok((served, runtime))
}

fn run(cli: &Cli) -> Result<()> {
    // Before any key is read: a core dump would write plaintext and keys to disk.
    snapshotter::hardening::disable_core_dumps().context("disabling core dumps")?;
    let options = parse_options(&cli.options)?;
    parse_source(&cli.source)?;
    if !cli.mountpoint.is_dir() {
        bail!(
            "mount point {} is not a directory",
            cli.mountpoint.display()
        );
    }
    let mountpoint = cli.mountpoint.canonicalize()?;

    // Before any thread exists, so every thread inherits the mask: a termination signal is
    // then read by wait_and_unmount, which unmounts, instead of killing the process.
    sealfs_tools::signals::block_termination_signals().context("blocking termination signals")?;
    if cli.foreground {
        init_logging(&options, true)?;
        let (served, _runtime) = prepare(cli, &options, &mountpoint)?;
        return wait_and_unmount(served, &mountpoint);
    }

    // Fork before anything starts a thread (FUSE sessions, fetch workers, the registry
    // client's runtime): the child does all the work and reports success or its error through
    // a pipe, so the caller still gets a precise exit status and message.
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (nothing above starts a thread).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(read_end);
            let mut status = std::fs::File::from(write_end);
            // SAFETY: plain syscall; detaches from the caller's session and terminal.
            unsafe { libc::setsid() };
            let prepared =
                init_logging(&options, false).and_then(|()| prepare(cli, &options, &mountpoint));
            match prepared {
                Ok((served, _runtime)) => {
                    let _ = status.write_all(b"ok");
                    drop(status);
                    detach_stdio();
                    if let Err(error) = wait_and_unmount(served, &mountpoint) {
                        tracing::error!(%error, "serving the mount failed");
                        std::process::exit(1);
                    }
                    std::process::exit(0);
                }
                Err(error) => {
                    tracing::error!(error = format!("{error:#}"), "mount failed");
                    let _ = status.write_all(format!("{error:#}").as_bytes());
                    std::process::exit(1);
                }
            }
        }
        _child => {
            drop(write_end);
            let mut message = String::new();
            std::fs::File::from(read_end)
                .read_to_string(&mut message)
                .context("waiting for the mount")?;
            match message.as_str() {
                "ok" => Ok(()),
                "" => bail!("the mount process died before mounting"),
                error => bail!("{error}"),
            }
        }
    }
}

/// Waits until the user unmounts the mount point, or a termination signal arrives; then
/// unmounts whatever is still mounted (dropping `served`).
fn wait_and_unmount(mut served: Served, mountpoint: &Path) -> Result<()> {
    match sealfs_tools::signals::wait_until_unmounted(mountpoint)
        .context("watching the mount table")?
    {
        sealfs_tools::signals::WaitOutcome::Unmounted => {
            served.overlay = None;
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
        }
        sealfs_tools::signals::WaitOutcome::Signalled(signal) => {
            tracing::info!(mountpoint = %mountpoint.display(), signal, "signal received; unmounting");
        }
    }
    drop(served);
    Ok(())
}

/// Points standard input, output and error at /dev/null: the caller's terminal is gone.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mount.sealfs: {error:#}");
            ExitCode::from(32) // mount(8)'s "mount failure"
        }
    }
}
