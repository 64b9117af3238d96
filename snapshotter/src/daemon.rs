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

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers, the default action (exit) applies; wait forever here.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Runs the daemon with `config` until a termination signal; unmounts its layers on the way
/// out (a restart mounts them again).
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
    let store = SnapshotStore::open(&config.root).map_err(|source| DaemonError::Store {
        root: config.root.clone(),
        source,
    })?;
    let memory = Arc::new(MemoryCache::new(config.cache.memory_mib << 20));
    // Credentials of CRI pulls (imagePullSecrets), filled by the CRI image proxy if it runs.
    let pull_credentials = Arc::new(crate::credentials::PullCredentials::default());
    let mut remote_config = config.remote();
    remote_config.registry.pull_credentials = Some(pull_credentials.clone());
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
        // Remount in the background: the socket answers at once, and a snapshot used before
        // its layer is back mounts it on demand.
        let restoring = node.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = restoring.restore() {
                tracing::error!(%error, "reading remote snapshots to remount");
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
            .serve_with_incoming_shutdown(incoming, termination())
            .await?;
        Ok::<(), DaemonError>(())
    });
    let _ = std::fs::remove_file(&config.socket);
    if !config.cri.image_proxy_socket.as_os_str().is_empty() {
        let _ = std::fs::remove_file(&config.cri.image_proxy_socket);
    }
    // Unmount on the blocking side: FUSE sessions join their threads.
    node.unmount_all();
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}
