//! `containerd-sealfs-grpc`: the sealfs remote snapshotter for containerd. The service lives
//! in `snapshotter::daemon`; this is its command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use snapshotter::config::{Config, DEFAULT_CONFIG_PATH};

/// The sealfs remote snapshotter: serves containerd's snapshots API on a unix socket, mounts
/// sealed image layers lazily with FUSE (fetching, verifying and decrypting chunks on
/// demand), and runs every other image as an ordinary overlayfs snapshotter.
///
/// containerd loads it with:
///
///   [proxy_plugins.sealfs]
///     type = "snapshot"
///     address = "/run/sealfs/sealfs.sock"
///
/// Node keys go in keys_dir (default /etc/sealfs/keys, files mode 0600). Every option is
/// described in docs/configuration.md.
///
/// Restarts keep running containers: the node's FUSE session is held by a small session
/// keeper process (started by the daemon, logging to ROOT/session-keeper.log), so on SIGTERM,
/// SIGINT, a crash or kill -9 the sealed layers stay mounted, their reads wait, and the next
/// start (the same binary or a new version) resumes serving them. To unmount them for good
/// (uninstall), stop the daemon and run `containerd-sealfs-grpc release`.
#[derive(Parser, Debug)]
#[command(name = "containerd-sealfs-grpc", version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (TOML). Without it, /etc/sealfs/config.toml if present, else the
    /// defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); overrides the
    /// config's log_level. SEALFS_LOG overrides both.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Check the configuration, print it in full (defaults filled in) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Unmount every sealed layer a stopped daemon left mounted and end their FUSE session
    /// (uninstall, or before removing the root). Containers still running on those layers
    /// fail every later read of them: stop them first. Refuses while the daemon runs.
    Release,
    /// Run the session keeper on SOCKET (started by the daemon itself; see
    /// snapshotter::session_keeper).
    #[command(hide = true)]
    KeepSessions {
        /// The socket to answer on.
        #[arg(long, value_name = "SOCKET")]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::KeepSessions { socket }) = &cli.command {
        // Before any configuration: the keeper holds descriptors and needs nothing else.
        return match snapshotter::session_keeper::serve(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("containerd-sealfs-grpc keep-sessions: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!(
                "containerd-sealfs-grpc: {}",
                snapshotter::error_chain(&error)
            );
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        // Files the configuration names (signature keys, the keyprovider config) are read
        // now, and key access rules checked, as the daemon would at start.
        let checked = config
            .signature_policy()
            .map(drop)
            .and_then(|()| config.keyproviders().map(drop))
            .and_then(|()| config.key_access().map(drop));
        if let Err(error) = checked {
            eprintln!("containerd-sealfs-grpc: {error}");
            return ExitCode::from(2);
        }
        println!(
            "# {}\n{config:#?}",
            cli.config
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("defaults ({DEFAULT_CONFIG_PATH} if present)"))
        );
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Release) = cli.command {
        return match snapshotter::daemon::release(&config) {
            Ok(released) => {
                println!(
                    "released {} sealed-layer mount(s){}{}",
                    released.mounts,
                    if released.session {
                        " and the kept FUSE session"
                    } else {
                        "; no FUSE session was kept"
                    },
                    if released.keys {
                        "; dropped the layer keys kept for keyprovider layers"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!(
                    "containerd-sealfs-grpc release: {}",
                    snapshotter::error_chain(&error)
                );
                ExitCode::FAILURE
            }
        };
    }
    let level = cli.log_level.as_deref().unwrap_or(&config.log_level);
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALFS_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level));
    let filter = match filter {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("containerd-sealfs-grpc: log level {level:?}: {error}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match snapshotter::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{}", snapshotter::error_chain(&error));
            eprintln!(
                "containerd-sealfs-grpc: {}",
                snapshotter::error_chain(&error)
            );
            ExitCode::FAILURE
        }
    }
}
