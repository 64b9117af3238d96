//! A CRI image service that stands between the kubelet and containerd
//! (`kubelet --image-service-endpoint unix:///run/sealfs/cri-images.sock`), so sealed images
//! in private registries work with ordinary imagePullSecrets: every call is forwarded to
//! containerd's CRI unchanged, and the credentials of each PullImage are remembered (in
//! memory, newest per registry) for sealfs's own range reads of that registry, which
//! containerd never hands a snapshotter. As stargz's and SOCI's CRI keychains do.
//!
//! The only module that speaks CRI (k8s-cri, on its own tonic). Depends on `credentials` and
//! `registry` (to name a reference's registry host).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use tonic_cri::transport::Channel;
use tonic_cri::{Request, Response, Status};

use crate::credentials::{self, PullCredentials};
use crate::registry::Registry;

/// Why the proxy could not serve.
#[derive(Debug, thiserror::Error)]
pub enum CriProxyError {
    /// Its socket could not be set up.
    #[error("CRI image proxy socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving the CRI image proxy")]
    Serve(#[from] tonic_cri::transport::Error),
}

/// The image service: containerd's, with pull credentials taken on the way.
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    credentials: Arc<PullCredentials>,
}

impl ImageProxy {
    /// A proxy to the CRI socket `upstream` (containerd's) that remembers pull credentials in
    /// `credentials`. The connection is made on first use (and again after containerd
    /// restarts).
    pub fn new(upstream: &Path, credentials: Arc<PullCredentials>) -> Self {
        let socket = upstream.to_path_buf();
        // The URI is a placeholder: every connection dials the unix socket.
        let channel = tonic_cri::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        ImageProxy {
            upstream: ImageServiceClient::new(channel),
            credentials,
        }
    }

    /// Remembers the credentials of a pull for the image's registry.
    fn remember(&self, request: &cri::PullImageRequest) -> Option<credentials::Remembered> {
        let (Some(image), Some(auth)) = (&request.image, &request.auth) else {
            return None;
        };
        // An unparsable reference: containerd will say what is wrong with it.
        let reference = Registry::parse(&image.image).ok()?;
        let pulled = credentials::from_cri_auth(
            &auth.username,
            &auth.password,
            &auth.auth,
            &auth.identity_token,
            &auth.registry_token,
        )?;
        let host = reference.resolve_registry().to_string();
        tracing::info!(registry = %host, image = %image.image, "credentials of a CRI pull remembered");
        self.credentials.remember(&host, pulled)
    }
}

#[tonic_cri::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        self.upstream
            .clone()
            .list_images(request.into_inner())
            .await
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        self.upstream
            .clone()
            .image_status(request.into_inner())
            .await
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        // Before forwarding: containerd prepares the layers during the pull, and sealfs reads
        // the registry for them then. A pull that fails (a wrong secret) gives the
        // credentials it displaced back.
        let remembered = self.remember(&request);
        let pulled = self.upstream.clone().pull_image(request).await;
        if let (Err(_), Some(remembered)) = (&pulled, remembered) {
            self.credentials.undo(remembered);
        }
        pulled
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        self.upstream
            .clone()
            .remove_image(request.into_inner())
            .await
    }

    async fn image_fs_info(
        &self,
        request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        self.upstream
            .clone()
            .image_fs_info(request.into_inner())
            .await
    }
}

/// Serves `proxy` on the unix socket `socket` (replacing a stale one; 0600, in a directory
/// only root may enter) until `shutdown` resolves.
pub async fn serve(
    socket: &Path,
    proxy: ImageProxy,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CriProxyError> {
    let fail = |source| CriProxyError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::hardening::ensure_private_dir(dir).map_err(fail)?;
    }
    if socket.exists() {
        std::fs::remove_file(socket).map_err(fail)?;
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(fail)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    tonic_cri::transport::Server::builder()
        .add_service(ImageServiceServer::new(proxy))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
