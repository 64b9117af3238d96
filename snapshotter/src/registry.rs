//! Registry access over the OCI distribution API: resolve an image reference to its manifest
//! and config, and read byte ranges of blobs (HTTP range requests) as a [`ChunkSource`].
//!
//! Built on `oci-client` (manifests, bearer-token and basic auth with a token cache, range
//! GETs). What it adds: plain HTTP for loopback registries without a flag (as docker does),
//! bounded retries with exponential backoff for server errors, throttling and connection
//! failures, a deadline on every request, and refusing to read past the requested range when a
//! registry ignores `Range` and answers 200 with the whole blob.
//!
//! Callers are synchronous threads (FUSE and fetch workers); each request runs on the shared
//! tokio runtime through its `Handle`, never from a runtime thread.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use tokio::runtime::Handle;

use crate::oci_layout::{host_platform, ResolvedImage};
use crate::source::{ChunkSource, SourceError};

/// Manifest media types we ask for.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why the registry could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}")]
    Reference {
        /// The text.
        reference: String,
        /// Why.
        #[source]
        source: oci_client::ParseError,
    },
    /// The registry answered with an error, or could not be reached (after retries).
    #[error("registry {registry}: {what}")]
    Request {
        /// The registry host.
        registry: String,
        /// What was asked.
        what: String,
        /// The error.
        #[source]
        source: OciDistributionError,
    },
    /// A request did not finish within its deadline (after retries).
    #[error("registry {registry}: {what} did not complete within {after:?}")]
    Timeout {
        /// The registry host.
        registry: String,
        /// What was asked.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The registry sent something that is not what the API promises.
    #[error("registry {registry}: {what}")]
    Invalid {
        /// The registry host.
        registry: String,
        /// What is wrong.
        what: String,
    },
}

/// How to talk to registries (defaults documented in docs/configuration.md).
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Deadline of one request (connect, headers and body).
    pub request_timeout: Duration,
    /// Retries after a retryable failure.
    pub retries: u32,
    /// First backoff; doubles per retry, at most 5 s.
    pub backoff: Duration,
    /// Registries reached over plain HTTP besides loopback ones (`host:port`).
    pub insecure: Vec<String>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            request_timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(200),
            insecure: Vec::new(),
        }
    }
}

/// Whether `registry` (`host[:port]`) is on the loopback interface, where plain HTTP is used
/// without asking, as docker does.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A registry client: one connection pool and token cache for every image and blob.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    runtime: Handle,
    auth: RegistryAuth,
    options: RegistryOptions,
}

/// An image resolved in a registry.
#[derive(Clone, Debug)]
pub struct RemoteImage {
    /// The reference, pinned to the manifest digest.
    pub reference: Reference,
    /// Manifest and config.
    pub image: ResolvedImage,
    /// The manifest exactly as the registry sent it (its digest is the image's).
    pub raw_manifest: Vec<u8>,
}

impl Registry {
    /// A client for `registry` hosts reached with `auth`, running requests on `runtime`.
    pub fn new(
        runtime: Handle,
        auth: RegistryAuth,
        options: RegistryOptions,
        registries: &[&str],
    ) -> Self {
        // rustls needs a process-wide crypto provider; ring builds fast and is what the format
        // uses. Installing twice is harmless (the first one stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut plain: Vec<String> = registries
            .iter()
            .filter(|r| is_loopback(r))
            .map(|r| r.to_string())
            .collect();
        plain.extend(options.insecure.iter().cloned());
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(options.request_timeout.min(Duration::from_secs(10))),
            read_timeout: Some(options.request_timeout),
            ..ClientConfig::default()
        };
        Registry {
            client: Client::new(config),
            runtime,
            auth,
            options,
        }
    }

    /// Parses `HOST/REPO[:TAG][@DIGEST]`.
    pub fn parse(reference: &str) -> Result<Reference, RegistryError> {
        reference
            .parse::<Reference>()
            .map_err(|source| RegistryError::Reference {
                reference: reference.to_string(),
                source,
            })
    }

    /// Runs one request with the deadline, retrying retryable failures with backoff.
    fn call<T, F, Fut>(&self, registry: &str, what: &str, request: F) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let mut backoff = self.options.backoff;
        let mut attempt = 0;
        loop {
            let outcome = self.runtime.block_on(async {
                tokio::time::timeout(self.options.request_timeout, request()).await
            });
            let error = match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) if !retryable(&source) || attempt == self.options.retries => {
                    return Err(RegistryError::Request {
                        registry: registry.to_string(),
                        what: what.to_string(),
                        source,
                    })
                }
                Ok(Err(source)) => source.to_string(),
                Err(_) if attempt == self.options.retries => {
                    return Err(RegistryError::Timeout {
                        registry: registry.to_string(),
                        what: what.to_string(),
                        after: self.options.request_timeout,
                    })
                }
                Err(_) => "timed out".to_string(),
            };
            tracing::debug!(registry, what, attempt, %error, ?backoff, "registry request failed; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// Resolves a reference to its manifest (for this platform) and config.
    pub fn resolve(&self, reference: &Reference) -> Result<RemoteImage, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        let invalid = |what: String| RegistryError::Invalid {
            registry: registry.clone(),
            what,
        };
        let mut reference = reference.clone();
        for _ in 0..3 {
            let (bytes, digest) =
                self.call(&registry, &format!("manifest of {reference}"), || {
                    self.client
                        .pull_manifest_raw(&reference, &self.auth, &MANIFEST_TYPES)
                })?;
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("manifest of {reference} is not JSON: {e}")))?;
            let media_type = value["mediaType"].as_str().unwrap_or_default().to_string();
            let pinned = Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                digest.clone(),
            );
            if media_type.contains("index")
                || media_type.contains("manifest.list")
                || value.get("manifests").is_some()
            {
                let index = ImageIndex::from_reader(&bytes[..])
                    .map_err(|e| invalid(format!("index {digest}: {e}")))?;
                let (os, arch) = host_platform();
                let child = index
                    .manifests()
                    .iter()
                    .find(|m| {
                        m.platform().as_ref().is_some_and(|p| {
                            p.os().to_string() == os && p.architecture().to_string() == arch
                        })
                    })
                    .ok_or_else(|| {
                        invalid(format!("image index {digest} has no {os}/{arch} manifest"))
                    })?;
                reference = Reference::with_digest(
                    pinned.registry().to_string(),
                    pinned.repository().to_string(),
                    child.digest().to_string(),
                );
                continue;
            }
            let manifest = ImageManifest::from_reader(&bytes[..])
                .map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
            let config_digest = manifest.config().digest().to_string();
            let config = self.read_all(&pinned, &config_digest, manifest.config().size())?;
            let descriptor = crate::oci_layout::descriptor(
                MediaType::ImageManifest,
                &digest,
                bytes.len() as u64,
            )
            .map_err(|e| invalid(e.to_string()))?;
            return Ok(RemoteImage {
                reference: pinned,
                image: ResolvedImage {
                    descriptor,
                    manifest,
                    config,
                },
                raw_manifest: bytes.to_vec(),
            });
        }
        Err(invalid("image indexes nested too deep".into()))
    }

    /// Reads a small blob whole and checks its digest.
    fn read_all(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        if size > 8 << 20 {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("blob {digest} is larger than 8 MiB; not a config"),
            });
        }
        let blob = self.blob(reference, digest, size);
        let bytes = blob.read(0, size as usize)?;
        let actual = fsformat::digest::digest_of(&bytes);
        if actual != digest {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("blob {digest} hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    /// Whether the repository of `reference` already has the blob.
    pub fn has_blob(&self, reference: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        self.call(&registry, &format!("checking blob {digest}"), || async {
            self.client
                .store_auth_if_needed(reference.resolve_registry(), &self.auth)
                .await;
            self.client.blob_exists(reference, digest).await
        })
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
        let registry = reference.resolve_registry().to_string();
        let size = std::fs::metadata(path).map(|m| m.len()).ok();
        self.call(&registry, &format!("pushing blob {digest}"), || async {
            self.client
                .auth(reference, &self.auth, oci_client::RegistryOperation::Push)
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
            let progress = progress.clone();
            let counted = stream.inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    progress(chunk.len() as u64);
                }
            });
            self.client
                .push_blob_stream(reference, counted, digest, size)
                .await
                .map(|_| ())
        })
    }

    /// Pushes a manifest under `reference` (its tag); returns the manifest URL.
    pub fn push_manifest(
        &self,
        reference: &Reference,
        manifest: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        let content_type = reqwest_header(media_type);
        self.call(
            &registry,
            &format!("pushing the manifest of {reference}"),
            || async {
                self.client
                    .auth(reference, &self.auth, oci_client::RegistryOperation::Push)
                    .await?;
                self.client
                    .push_manifest_raw(reference, manifest.to_vec(), content_type.clone())
                    .await
            },
        )
    }

    /// Downloads a whole blob into `out` in range requests (each retried on its own), checking
    /// its digest at the end; `progress` is told how many bytes arrived.
    pub fn download(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
        out: &mut dyn std::io::Write,
        progress: &dyn Fn(u64),
    ) -> Result<(), RegistryError> {
        let registry = reference.resolve_registry().to_string();
        let blob = self.blob(reference, digest, size);
        let mut hashing = fsformat::digest::HashingWriter::new(out);
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(DOWNLOAD_PIECE);
            let piece = blob.read(at, len as usize)?;
            std::io::Write::write_all(&mut hashing, &piece).map_err(|e| {
                RegistryError::Invalid {
                    registry: registry.clone(),
                    what: format!("writing blob {digest}: {e}"),
                }
            })?;
            progress(len);
            at += len;
        }
        let (_, actual, _) = hashing.finish();
        if actual != digest {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("blob {digest} hashes to {actual}"),
            });
        }
        Ok(())
    }

    /// A blob of `reference`'s repository as a chunk source.
    pub fn blob(&self, reference: &Reference, digest: &str, size: u64) -> RegistryBlob {
        RegistryBlob {
            registry: self.clone(),
            reference: reference.clone(),
            digest: digest.to_string(),
            size,
        }
    }

    /// A layer of a resolved image as a chunk source.
    pub fn layer(&self, image: &RemoteImage, layer: &Descriptor) -> RegistryBlob {
        self.blob(&image.reference, layer.digest().as_ref(), layer.size())
    }
}

/// Range size of whole-blob downloads: large enough for throughput, small enough that a retry
/// repeats little.
const DOWNLOAD_PIECE: u64 = 16 << 20;

fn reqwest_header(media_type: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(media_type).unwrap_or_else(|_| {
        http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json")
    })
}

fn retryable(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::RequestError(e) => {
            e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// One blob in a registry, read by byte ranges.
#[derive(Clone)]
pub struct RegistryBlob {
    registry: Registry,
    reference: Reference,
    digest: String,
    size: u64,
}

impl RegistryBlob {
    /// Reads exactly `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, RegistryError> {
        let registry = self.reference.resolve_registry().to_string();
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("range {offset}+{len} is outside blob {}", self.digest),
            });
        }
        let descriptor = OciDescriptor {
            digest: self.digest.clone(),
            size: self.size as i64,
            ..OciDescriptor::default()
        };
        let what = format!("blob {} bytes {offset}+{len}", self.digest);
        self.registry.call(&registry, &what, || async {
            let response = self
                .registry
                .client
                .pull_blob_stream_partial(&self.reference, &descriptor, offset, Some(len as u64))
                .await?;
            // A registry that ignores Range sends the whole blob: skip to the offset and stop
            // reading once the range is complete, instead of downloading the rest.
            let (mut stream, mut skip) = match response {
                BlobResponse::Partial(sized) => (sized.stream, 0u64),
                BlobResponse::Full(sized) => (sized.stream, offset),
            };
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                let Some(piece) = stream.next().await else {
                    break;
                };
                let piece = piece?;
                let mut piece = &piece[..];
                if skip > 0 {
                    let drop = (skip as usize).min(piece.len());
                    piece = &piece[drop..];
                    skip -= drop as u64;
                }
                let take = piece.len().min(len - out.len());
                out.extend_from_slice(&piece[..take]);
            }
            if out.len() != len {
                return Err(OciDistributionError::IoError(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the registry sent {} of {len} bytes", out.len()),
                )));
            }
            Ok(out)
        })
    }
}

impl ChunkSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        self.read(offset, len).map_err(|error| SourceError::Io {
            what: format!("{}@{}", self.reference, self.digest),
            offset,
            len,
            source: std::io::Error::other(error),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognized() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "registry.example.com",
            "10.0.0.1:5000",
            "localhost.example.com:80",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
