//! `containerd-sealfs-grpc`: serves the snapshots API on a unix socket for containerd's
//! `[proxy_plugins.sealfs]`, and metrics over HTTP, until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::MemoryCache;
use crate::config::Config;
use crate::grpc::Service;
use crate::node::Node;
use crate::remote::RemoteLayers;
use crate::snapshot::{SnapshotError, SnapshotStore};

/// Puts every remote layer back into a resumed session, then lets it answer requests. A layer
/// that cannot be opened again (its key removed, its cache and the registry both gone) is
/// reported: containers running on it get errors for its files until it can be.
fn resume(node: &Node) -> std::io::Result<()> {
    match node.restore() {
        Ok(0) => {}
        Ok(failed) => tracing::error!(
            failed,
            "layers of the resumed FUSE session could not be opened again (see the warnings above); \
             containers running on them fail to read their files until they can be, which is \
             tried again after 5 s, then at most every minute"
        ),
        Err(error) => {
            tracing::error!(%error, "reading remote snapshots to put back in the resumed session")
        }
    }
    node.remote().session().start_resumed()
}

/// How soon a remote layer that could not be mounted is tried again, and the longest wait
/// between tries (doubling in between): a keyprovider back after an outage is used within a
/// minute, and one that stays down is asked at most once a minute per layer.
const REMOUNT_FIRST_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
const REMOUNT_LAST_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// How often the daemon checks that its session keeper still holds the node's FUSE session
/// (one request on a unix socket); a keeper that died is replaced within this.
const KEEPER_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory, the socket or the runtime could not be set up.
    #[error("{what}")]
    Setup {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot database could not be opened.
    #[error("opening the snapshot store in {root}")]
    Store {
        /// The root.
        root: PathBuf,
        /// Why.
        #[source]
        source: SnapshotError,
    },
    /// Another daemon serves the socket.
    #[error("{0} is in use by a running snapshotter; stop it first")]
    SocketInUse(PathBuf),
    /// The signature policy cannot be used (a key file unreadable, `require` without keys).
    #[error("{0}")]
    SignaturePolicy(String),
    /// The keyprovider configuration cannot be read or is not ocicrypt's.
    #[error("{0}")]
    KeyProviders(String),
    /// A `[[key_access]]` rule cannot be meant.
    #[error("{0}")]
    KeyAccess(String),
    /// The metrics address does not parse.
    #[error("metrics_address {0:?} is not HOST:PORT")]
    MetricsAddress(String),
    /// Serving gRPC failed.
    #[error("serving gRPC")]
    Grpc(#[from] tonic::transport::Error),
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Setup { what, source }
}

/// Binds the socket, replacing one a dead daemon left; refuses one a live daemon answers on.
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::hardening::ensure_private_dir(dir)
            .map_err(setup(format!("making {} private", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(setup(format!("removing stale {}", path.display())))?;
    }
    // containerd runs as root; nobody else may drive the snapshotter. The umask (077, set at
    // start) makes bind create the socket 0600, so it is never open to others, not even for
    // the moment before a chmod; the chmod states the intent whatever the umask was.
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(setup(format!("listening on {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(setup(format!("restricting {}", path.display())))?;
    Ok(listener)
}

/// SIGTERM and SIGINT, caught from the start of the daemon: one that arrives while it starts
/// up (restoring layers, say) is answered with a clean shutdown once it serves, rather than
/// by the default action, which would end it in the middle of its work.
struct Termination {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Termination {
    /// Installs the handlers (inside the runtime).
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Termination {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves when either signal has arrived.
    async fn received(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

/// Runs the daemon with `config` until a termination signal. Its layers stay mounted when
/// their FUSE session is with the session keeper (the next start resumes serving them);
/// otherwise they are unmounted on the way out.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before anything is created or decrypted: files, sockets and directories private by
    // default, and no core dump that would write plaintext to disk.
    let old_umask = crate::hardening::restrict_umask();
    if old_umask != 0o077 {
        tracing::debug!(old = format!("{old_umask:03o}"), "umask set to 077");
    }
    crate::hardening::disable_core_dumps().map_err(setup("disabling core dumps"))?;
    crate::hardening::ensure_private_dir(&config.root)
        .map_err(setup(format!("making {} private", config.root.display())))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sealfs-grpc")
        .enable_all()
        .build()
        .map_err(setup("starting the async runtime"))?;
    let termination = {
        let _inside = runtime.enter();
        Termination::install().map_err(setup("handling SIGTERM and SIGINT"))?
    };
    let store = SnapshotStore::open(&config.root).map_err(|source| DaemonError::Store {
        root: config.root.clone(),
        source,
    })?;
    let memory = Arc::new(MemoryCache::new(config.cache.memory_mib << 20));
    // Credentials of CRI pulls (imagePullSecrets), filled by the CRI image proxy if it runs.
    let pull_credentials = Arc::new(crate::credentials::PullCredentials::default());
    let mut remote_config = config.remote();
    remote_config.signatures = Arc::new(
        config
            .signature_policy()
            .map_err(DaemonError::SignaturePolicy)?,
    );
    remote_config.providers = config.keyproviders().map_err(DaemonError::KeyProviders)?;
    remote_config.key_access = Arc::new(config.key_access().map_err(DaemonError::KeyAccess)?);
    remote_config.registry.pull_credentials = Some(pull_credentials.clone());
    if !config.cri.containerd_socket.as_os_str().is_empty() {
        remote_config.content_store = Some(crate::content_store::ContentStore::new(
            &config.cri.containerd_socket,
            runtime.handle().clone(),
        ));
    }
    let remote = RemoteLayers::new(remote_config, runtime.handle().clone(), memory);
    let node = Arc::new(Node::new(store, remote));
    let metrics_address = match config.metrics_address.as_str() {
        "" => None,
        text => Some(
            text.parse::<std::net::SocketAddr>()
                .map_err(|_| DaemonError::MetricsAddress(text.to_string()))?,
        ),
    };

    let served = runtime.block_on(async {
        let listener = bind_socket(&config.socket)?;
        let restoring = node.clone();
        if node.remote().session().resume() {
            // Every layer goes back into the session's table before it answers a request:
            // containers' reads wait for the table rather than fail on a missing layer.
            tokio::task::spawn_blocking(move || resume(&restoring))
                .await
                .map_err(|error| setup("resuming the kept FUSE session")(std::io::Error::other(error)))?
                .map_err(setup("resuming the kept FUSE session"))?;
        } else {
            // Remount in the background: the socket answers at once, and a snapshot used
            // before its layer is back mounts it on demand.
            tokio::task::spawn_blocking(move || {
                if let Err(error) = restoring.restore() {
                    tracing::error!(%error, "reading remote snapshots to remount");
                }
            });
        }
        // Layers that could not be opened at start (a keyprovider down, a key not delivered
        // yet) are tried again until they open, so containers running on them read again
        // without anything else happening on the node.
        let remounting = node.clone();
        tokio::spawn(async move {
            let mut wait = REMOUNT_FIRST_RETRY;
            loop {
                tokio::time::sleep(wait).await;
                let node = remounting.clone();
                match tokio::task::spawn_blocking(move || node.remount_missing()).await {
                    Ok(Ok((mounted, 0))) => {
                        if mounted > 0 {
                            tracing::info!(mounted, "every remote layer is mounted again");
                        }
                    }
                    Ok(Ok((_, missing))) => {
                        wait = (wait * 2).min(REMOUNT_LAST_RETRY);
                        tracing::info!(missing, retry_in = ?wait, "remote layers still cannot be mounted");
                        continue;
                    }
                    Ok(Err(error)) => tracing::error!(%error, "reading remote snapshots to remount"),
                    Err(_) => {}
                }
                wait = REMOUNT_FIRST_RETRY;
            }
        });
        let watched = node.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(KEEPER_CHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                let node = watched.clone();
                let _ = tokio::task::spawn_blocking(move || node.remote().session().ensure_kept())
                    .await;
            }
        });
        if !config.cri.image_proxy_socket.as_os_str().is_empty() {
            let socket = config.cri.image_proxy_socket.clone();
            let proxy =
                crate::cri_proxy::ImageProxy::new(&config.cri.containerd_socket, pull_credentials);
            tracing::info!(socket = %socket.display(), containerd = %config.cri.containerd_socket.display(), "serving the CRI image proxy");
            tokio::spawn(async move {
                if let Err(error) =
                    crate::cri_proxy::serve(&socket, proxy, std::future::pending()).await
                {
                    tracing::error!(error = %crate::error_chain(&error), "CRI image proxy failed");
                }
            });
        }
        if let Some(address) = metrics_address {
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(error) = crate::metrics::serve(address, node).await {
                    tracing::error!(%address, %error, "metrics server failed");
                }
            });
            tracing::info!(%address, "metrics at http://{address}/metrics");
        }
        tracing::info!(socket = %config.socket.display(), root = %config.root.display(), "serving containerd snapshots");
        // Each connection is logged: containerd keeps one and redials it after a restart of
        // this daemon, so the line says when containerd can use the snapshotter again.
        let incoming = futures_util::StreamExt::inspect(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            |accepted| {
                if accepted.is_ok() {
                    tracing::info!("snapshots client connected");
                }
            },
        );
        tonic::transport::Server::builder()
            .add_service(containerd_snapshots::server(Arc::new(Service::new(
                node.clone(),
            ))))
            .serve_with_incoming_shutdown(incoming, termination.received())
            .await?;
        Ok::<(), DaemonError>(())
    });
    let _ = std::fs::remove_file(&config.socket);
    if !config.cri.image_proxy_socket.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&config.cri.image_proxy_socket);
    }
    // Checked (and a keeper that died replaced) now, not trusted from the last check: a
    // session nobody keeps would die with this process.
    if node.remote().session().ensure_kept() {
        node.leave_mounted();
        tracing::info!(
            "layers stay mounted and their FUSE session kept for the next start; \
             `containerd-sealfs-grpc release` unmounts them (breaking the containers on them)"
        );
        // The process ends now and the next daemon takes over: nothing here needs an orderly
        // end. Shutting the runtime down under fetches still running (the background fetch,
        // a read waiting on a slow registry) would make their timers panic, and waiting for
        // them could take a request's whole deadline; the kernel ends their threads at exit.
        std::mem::forget(node);
        std::mem::forget(runtime);
        return served;
    }
    // Unmount on the blocking side: FUSE sessions join their threads.
    node.unmount_all();
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

/// What [`release`] let go of.
#[derive(Debug, Default)]
pub struct Released {
    /// Sealed-layer mounts detached.
    pub mounts: usize,
    /// Whether a kept FUSE session was ended.
    pub session: bool,
    /// Whether layer keys kept for keyprovider layers were let go.
    pub keys: bool,
}

/// The deliberate shutdown a daemon restart does not do: unmounts every sealed layer a
/// stopped daemon left mounted, ends their FUSE session, drops the layer keys kept for
/// keyprovider layers and lets the session keeper exit.
/// Containers still running on those layers fail every later read of them. Refuses while a
/// daemon serves `config`'s socket (stop it first).
pub fn release(config: &Config) -> Result<Released, DaemonError> {
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(DaemonError::SocketInUse(config.socket.clone()));
    }
    let connection = crate::mount_table::fuse_connection(&config.session_dir());
    let mut released = Released::default();
    for point in crate::mount_table::mounts_under(&config.root, "fuse.sealfs") {
        released.mounts += crate::mount_table::detach_all(&point);
    }
    // Detached mounts still serve the overlays standing on them; aborting the connection ends
    // them, so nothing waits on a session nobody will serve.
    if let Some(id) = connection {
        crate::mount_table::abort_fuse_connection(id);
    }
    let keeper = crate::session_keeper::Keeper::in_root(&config.root);
    // The keys first: a keeper left holding nothing after a release exits. They are wiped
    // before the keeper closes them, as a running daemon wipes the files it replaces.
    if let Ok(Some(file)) = keeper.take(crate::kept_keys::KEPT_KEYS) {
        crate::kept_keys::wipe(&file);
    }
    released.keys = keeper.release(crate::kept_keys::KEPT_KEYS).unwrap_or(false);
    released.session = keeper
        .release(crate::session_keeper::NODE_SESSION)
        .unwrap_or(false);
    Ok(released)
}
