//! Pushing to a registry (what `sealctl` does with sealed images): blobs and manifests.
//!
//! Only `sealctl` pushes, yet this lives with the client the daemon uses: a push goes through
//! the same endpoint routing (mirrors never take pushes, `hosts.toml` capabilities), credentials,
//! deadlines and retries, which stay private to `registry`.

use std::path::Path;

use futures_util::StreamExt;

use oci_client::errors::OciDistributionError;
use oci_client::Reference;

use super::route::{Attempt, RequestKind};
use super::{Registry, RegistryError};
use crate::hosts::Capability;

impl Registry {
    /// Whether the repository of `reference` already has the blob.
    pub fn has_blob(&self, reference: &Reference, digest: &str) -> Result<bool, RegistryError> {
        self.call(
            Capability::Push,
            RequestKind::Authenticating,
            reference,
            &format!("checking blob {digest}"),
            |Attempt {
                 client,
                 auth,
                 target,
                 ..
             }| async move {
                client
                    .store_auth_if_needed(target.resolve_registry(), &auth)
                    .await;
                client.blob_exists(&target, digest).await
            },
        )
    }

    /// Pushes the blob in file `path` (streamed, never whole in memory) to the repository of
    /// `reference`; `progress` is told how many bytes went out.
    pub fn push_blob(
        &self,
        reference: &Reference,
        path: &Path,
        digest: &str,
        progress: std::sync::Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Result<(), RegistryError> {
        let size = std::fs::metadata(path).map(|m| m.len()).ok();
        self.call(
            Capability::Push,
            RequestKind::Authenticating,
            reference,
            &format!("pushing blob {digest}"),
            |Attempt {
                 client,
                 auth,
                 target,
                 ..
             }| {
                let progress = progress.clone();
                async move {
                    client
                        .auth(&target, &auth, oci_client::RegistryOperation::Push)
                        .await?;
                    let file = std::fs::File::open(path)?;
                    let stream = futures_util::stream::unfold(file, |mut file| async move {
                        use std::io::Read;
                        let mut buf = vec![0u8; 4 << 20];
                        match file.read(&mut buf) {
                            Ok(0) => None,
                            Ok(n) => {
                                buf.truncate(n);
                                Some((Ok(bytes::Bytes::from(buf)), file))
                            }
                            Err(e) => Some((Err(OciDistributionError::IoError(e)), file)),
                        }
                    });
                    let counted = stream.inspect(move |chunk| {
                        if let Ok(chunk) = chunk {
                            progress(chunk.len() as u64);
                        }
                    });
                    client
                        .push_blob_stream(&target, counted, digest, size)
                        .await
                        .map(|_| ())
                }
            },
        )
    }

    /// Pushes a small blob held in memory (a signature's payload or config), unless the
    /// repository has it.
    pub fn push_small_blob(
        &self,
        reference: &Reference,
        bytes: &[u8],
        digest: &str,
    ) -> Result<(), RegistryError> {
        if self.has_blob(reference, digest)? {
            return Ok(());
        }
        self.call(
            Capability::Push,
            RequestKind::Authenticating,
            reference,
            &format!("pushing blob {digest}"),
            |Attempt {
                 client,
                 auth,
                 target,
                 ..
             }| async move {
                client
                    .auth(&target, &auth, oci_client::RegistryOperation::Push)
                    .await?;
                client
                    .push_blob(&target, bytes.to_vec(), digest)
                    .await
                    .map(|_| ())
            },
        )
    }

    /// Pushes a manifest under `reference` (its tag); returns the manifest URL.
    pub fn push_manifest(
        &self,
        reference: &Reference,
        manifest: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let content_type = reqwest_header(media_type);
        self.call(
            Capability::Push,
            RequestKind::Authenticating,
            reference,
            &format!("pushing the manifest of {reference}"),
            |Attempt {
                 client,
                 auth,
                 target,
                 ..
             }| {
                let content_type = content_type.clone();
                async move {
                    client
                        .auth(&target, &auth, oci_client::RegistryOperation::Push)
                        .await?;
                    client
                        .push_manifest_raw(&target, manifest.to_vec(), content_type)
                        .await
                }
            },
        )
    }
}

fn reqwest_header(media_type: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(media_type).unwrap_or_else(|_| {
        http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json")
    })
}
