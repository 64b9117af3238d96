//! containerd's content store, read for manifests containerd already fetched: a pull (CRI,
//! `sealctl pull`, `ctr-remote`) writes the image's manifest there before it prepares the
//! layers, and names its digest in the Prepare labels (`cri.manifest-digest`). Reading it from
//! the local socket instead of the registry takes the registry's round trips for it (an auth
//! probe and the manifest) off the first Prepare of a pull. What is read is trusted only after
//! it hashes to the digest the labels name; anything else falls back to the registry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::ReadContentRequest;
use tokio::runtime::Handle;
use tonic::Request;

/// Largest manifest read (the registry path refuses larger ones as well).
const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How long a read may take: a local socket answers in milliseconds; a hung containerd must
/// not hold a Prepare up for longer than the registry would take.
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// A containerd whose content store is read.
#[derive(Clone, Debug)]
pub struct ContentStore {
    socket: PathBuf,
    runtime: Handle,
}

impl ContentStore {
    /// The content store of the containerd serving `socket`; requests run on `runtime`.
    pub fn new(socket: &Path, runtime: Handle) -> Self {
        ContentStore {
            socket: socket.to_path_buf(),
            runtime,
        }
    }

    /// The blob `digest` (`sha256:HEX`) from namespace `namespace`, if containerd has it,
    /// whole and hashing to `digest`; `None` otherwise (with the reason logged at debug).
    pub fn read_verified(&self, namespace: &str, digest: &str) -> Option<Vec<u8>> {
        if namespace.is_empty() || !self.socket.exists() {
            return None;
        }
        let read = async {
            let client = containerd_client::Client::from_path(&self.socket)
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let mut content: ContentClient<_> = client.content();
            let mut request = Request::new(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            });
            request.metadata_mut().insert(
                "containerd-namespace",
                namespace
                    .parse()
                    .map_err(|_| "namespace is not a header value")?,
            );
            let mut stream = content
                .read(request)
                .await
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(part) = stream
                .message()
                .await
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
            {
                if bytes.len() + part.data.len() > MAX_MANIFEST_BYTES {
                    return Err(format!("larger than {MAX_MANIFEST_BYTES} bytes"));
                }
                bytes.extend_from_slice(&part.data);
            }
            Ok::<_, String>(bytes)
        };
        let outcome = self
            .runtime
            .block_on(async { tokio::time::timeout(READ_DEADLINE, read).await });
        let bytes = match outcome {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(reason)) => {
                tracing::debug!(digest, namespace, %reason, "manifest not read from containerd's content store; asking the registry");
                return None;
            }
            Err(_) => {
                tracing::debug!(
                    digest,
                    namespace,
                    "containerd's content store did not answer in time; asking the registry"
                );
                return None;
            }
        };
        if fsformat::digest::digest_of(&bytes) != digest {
            tracing::warn!(digest, namespace, "containerd's copy of the manifest does not hash to its digest; asking the registry");
            return None;
        }
        Some(bytes)
    }
}
