//! Registry access over the OCI distribution API: resolve an image reference to its manifest
//! and config, and read byte ranges of blobs (HTTP range requests) as a
//! [`ChunkSource`](crate::source::ChunkSource).
//!
//! Built on `oci-client` (manifests, bearer-token and basic auth with a token cache, range
//! GETs). What it adds: plain HTTP for loopback registries without a flag (as docker does),
//! bounded retries with exponential backoff for server errors, throttling and connection
//! failures, a deadline on every request, and refusing to read past the requested range when a
//! registry ignores `Range` and answers 200 with the whole blob.
//!
//! Callers are synchronous threads (FUSE and fetch workers); each request runs on the shared
//! tokio runtime through its `Handle`, never from a runtime thread.
//!
//! Here: the client, its options and errors, resolving references. `route`: how a request
//! reaches an endpoint (retries, deadlines, mirrors, credentials; reads without credentials
//! that learn when an endpoint wants a token). `mirror_fill`: pull-through mirrors that do not
//! hold a blob yet (one read asks, the others wait for it or go to the next endpoint). `blob`:
//! range reads of one blob. `push`: what `sealctl` pushes.

use std::time::Duration;

use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use tokio::runtime::Handle;

use crate::hosts::{self, Capability, Endpoint};
use crate::oci_layout::{host_platform, platform_manifest, ResolvedImage};

mod bare;
mod blob;
mod mirror_fill;
mod push;
mod route;

pub use blob::RegistryBlob;
pub use mirror_fill::MirrorStats;
use route::{client_config, RequestKind, Route, NODE_CREDENTIALS, NO_CREDENTIALS};

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
    #[error("registry {registry}: {what} (with {credentials})")]
    Request {
        /// The registry host.
        registry: String,
        /// What was asked.
        what: String,
        /// Which credentials were sent: where they came from, never what they are.
        credentials: &'static str,
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

impl RegistryError {
    /// Whether the registry answered that the manifest, tag or repository does not exist (as
    /// opposed to failing): an unsigned image has no signature manifest.
    pub fn is_not_found(&self) -> bool {
        use oci_client::errors::OciErrorCode;
        match self {
            RegistryError::Request { source, .. } => match source {
                OciDistributionError::ImageManifestNotFoundError(_) => true,
                OciDistributionError::ServerError { code, .. } => *code == 404,
                OciDistributionError::RegistryError { envelope, .. } => {
                    envelope.errors.iter().any(|error| {
                        matches!(
                            error.code,
                            OciErrorCode::ManifestUnknown
                                | OciErrorCode::NameUnknown
                                | OciErrorCode::NotFound
                        )
                    })
                }
                _ => false,
            },
            _ => false,
        }
    }
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
    /// containerd-style hosts directory (`DIR/REGISTRY/hosts.toml`) for mirrors.
    pub hosts_dir: Option<std::path::PathBuf>,
    /// Credentials pulls brought (CRI's imagePullSecrets, through sealfs's CRI image proxy);
    /// for a host they have, they come before the node's own, and are read at each request,
    /// so a newer pull's credentials apply to layers already mounted.
    pub pull_credentials: Option<std::sync::Arc<crate::credentials::PullCredentials>>,
    /// How long a range read waits for a pull-through mirror that is still fetching the blob
    /// (it answered with the whole blob) before it reads from the next endpoint.
    pub mirror_fill_wait: Duration,
    /// What pull-through mirrors did to range reads: shared by every client made from these
    /// options.
    pub mirror_stats: std::sync::Arc<MirrorStats>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            request_timeout: Duration::from_secs(30),
            retries: 4,
            backoff: Duration::from_millis(200),
            insecure: Vec::new(),
            hosts_dir: None,
            pull_credentials: None,
            mirror_fill_wait: Duration::from_secs(10),
            mirror_stats: std::sync::Arc::default(),
        }
    }
}

/// A registry client: its endpoints (mirrors first, then the registry itself), each with its
/// own connection pool, credentials and token cache.
#[derive(Clone)]
pub struct Registry {
    name: String,
    routes: std::sync::Arc<Vec<Route>>,
    runtime: Handle,
    options: RegistryOptions,
}

/// An image manifest resolved in a registry, without its config (what a snapshotter needs).
#[derive(Clone, Debug)]
pub struct RemoteManifest {
    /// The reference, pinned to the manifest digest.
    pub reference: Reference,
    /// The manifest's descriptor.
    pub descriptor: Descriptor,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The manifest exactly as the registry sent it (its digest is the image's).
    pub raw_manifest: Vec<u8>,
}

impl RemoteManifest {
    /// The manifest `bytes` of `reference`'s repository, already checked to hash to `digest`
    /// (read from containerd's content store rather than the registry); `None` if they are not
    /// an image manifest (an index is resolved through the registry).
    pub fn from_pinned_bytes(reference: &Reference, digest: &str, bytes: Vec<u8>) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if value.get("manifests").is_some() {
            return None;
        }
        let manifest = ImageManifest::from_reader(&bytes[..]).ok()?;
        let descriptor =
            crate::oci_layout::descriptor(MediaType::ImageManifest, digest, bytes.len() as u64)
                .ok()?;
        Some(RemoteManifest {
            reference: Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                digest.to_string(),
            ),
            descriptor,
            manifest,
            raw_manifest: bytes,
        })
    }
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

/// The runtime a tool's registry requests run on (the daemon has its own): two workers, as
/// requests are I/O and their bytes are verified and decrypted on the caller's threads.
pub fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sealfs-registry")
        .enable_all()
        .build()
}

impl Registry {
    /// A client for `registry` with the credentials of docker's `config.json` at
    /// `docker_config` (`None`: `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`),
    /// as the daemon and every tool read them; see [`Registry::connect`].
    pub fn connect_with_docker_config(
        runtime: Handle,
        registry: &str,
        options: RegistryOptions,
        docker_config: Option<&std::path::Path>,
    ) -> Result<Self, RegistryError> {
        let credentials = crate::credentials::load_config(docker_config).map_err(|error| {
            RegistryError::Invalid {
                registry: registry.to_string(),
                what: error.to_string(),
            }
        })?;
        Self::connect(runtime, registry, options, &|host| {
            credentials.auth_for(host)
        })
    }

    /// A client for `registry`: its endpoints come from `options.hosts_dir` (containerd's
    /// hosts.toml layout), each host's credentials from `auth_for`; requests run on `runtime`.
    pub fn connect<E: std::fmt::Display>(
        runtime: Handle,
        registry: &str,
        options: RegistryOptions,
        auth_for: &dyn Fn(&str) -> Result<RegistryAuth, E>,
    ) -> Result<Self, RegistryError> {
        // rustls needs a process-wide crypto provider; ring builds fast and is what the format
        // uses. Installing twice is harmless (the first one stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config_error = |what: String| RegistryError::Invalid {
            registry: registry.to_string(),
            what,
        };
        let endpoints = hosts::endpoints(options.hosts_dir.as_deref(), registry)
            .map_err(|e| config_error(e.to_string()))?;
        let mut routes = Vec::new();
        for mut endpoint in endpoints {
            endpoint.plain_http |= options.insecure.contains(&endpoint.host);
            let ca_pem = match &endpoint.ca {
                Some(ca) => Some(
                    std::fs::read(ca)
                        .map_err(|e| config_error(format!("CA {}: {e}", ca.display())))?,
                ),
                None => None,
            };
            let auth = auth_for(&endpoint.host)
                .map_err(|e| config_error(format!("credentials for {}: {e}", endpoint.host)))?;
            let auth_source = match auth {
                RegistryAuth::Anonymous => NO_CREDENTIALS,
                _ => NODE_CREDENTIALS,
            };
            routes.push(Route {
                client: Client::new(client_config(&endpoint, &options, ca_pem.as_deref())),
                open_client: Client::new(client_config(&endpoint, &options, ca_pem.as_deref())),
                bare: bare::BareClient::new(&endpoint, &options, ca_pem.as_deref())
                    .map_err(config_error)?,
                guarded: std::sync::atomic::AtomicBool::new(false),
                ca_pem,
                pulled: std::sync::Mutex::new(None),
                auth,
                auth_source,
                endpoint,
                down_until: std::sync::Mutex::new(None),
                blobs: mirror_fill::MirrorBlobs::new(),
            });
        }
        Ok(Registry {
            name: registry.to_string(),
            routes: std::sync::Arc::new(routes),
            runtime,
            options,
        })
    }

    /// The endpoints in the order they are tried.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.routes.iter().map(|r| &r.endpoint)
    }

    /// The registry host of `reference` on the last endpoint that can do `capability`: the
    /// one with no endpoint to fall back to.
    fn last_host(&self, reference: &Reference, capability: Capability) -> Option<String> {
        self.routes
            .iter()
            .rfind(|r| r.endpoint.can(capability))
            .map(|r| {
                route::retarget(reference, &r.endpoint)
                    .resolve_registry()
                    .to_string()
            })
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

    /// Resolves a reference to its manifest (for this platform) and config.
    pub fn resolve(&self, reference: &Reference) -> Result<RemoteImage, RegistryError> {
        let resolved = self.resolve_manifest(reference)?;
        let config = self.read_all(
            &resolved.reference,
            resolved.manifest.config().digest().as_ref(),
            resolved.manifest.config().size(),
        )?;
        Ok(RemoteImage {
            reference: resolved.reference,
            image: ResolvedImage {
                descriptor: resolved.descriptor,
                manifest: resolved.manifest,
                config,
            },
            raw_manifest: resolved.raw_manifest,
        })
    }

    /// Resolves a reference to its manifest for this platform, without the config: one
    /// round trip less for a caller that does not read it.
    pub fn resolve_manifest(&self, reference: &Reference) -> Result<RemoteManifest, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        let invalid = |what: String| RegistryError::Invalid {
            registry: registry.clone(),
            what,
        };
        let mut reference = reference.clone();
        for _ in 0..3 {
            // A tag needs an endpoint that may resolve; a digest only one that may pull.
            let capability = if reference.digest().is_some() {
                Capability::Pull
            } else {
                Capability::Resolve
            };
            let (bytes, digest) = self.call(
                capability,
                RequestKind::Document,
                &reference,
                &format!("manifest of {reference}"),
                |attempt| async move {
                    match attempt.bare {
                        Some(bare) => bare.manifest(&attempt.target, &MANIFEST_TYPES).await,
                        None => attempt
                            .client
                            .pull_manifest_raw(&attempt.target, &attempt.auth, &MANIFEST_TYPES)
                            .await
                            .map(|(bytes, digest)| (bytes.to_vec(), digest)),
                    }
                },
            )?;
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
                let child = platform_manifest(&index).ok_or_else(|| {
                    let (os, arch) = host_platform();
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
            let descriptor = crate::oci_layout::descriptor(
                MediaType::ImageManifest,
                &digest,
                bytes.len() as u64,
            )
            .map_err(|e| invalid(e.to_string()))?;
            return Ok(RemoteManifest {
                reference: pinned,
                descriptor,
                manifest,
                raw_manifest: bytes,
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
        self.read_small(reference, digest, size, 8 << 20)
    }

    /// Reads a blob of at most `limit` bytes whole (a config, a signature payload) and checks
    /// its digest; a larger one is refused before it is read.
    pub fn read_small(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let registry = reference.resolve_registry().to_string();
        if size > limit {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("blob {digest} has {size} bytes, more than the {limit} expected"),
            });
        }
        let bytes = self.call(
            Capability::Pull,
            RequestKind::Document,
            reference,
            &format!("blob {digest}"),
            |attempt| async move {
                match attempt.bare {
                    Some(bare) => bare.blob(&attempt.target, digest, size).await,
                    None => blob::read_whole(attempt, digest, size).await,
                }
            },
        )?;
        let actual = fsformat::digest::digest_of(&bytes);
        if actual != digest {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("blob {digest} hashes to {actual}"),
            });
        }
        Ok(bytes)
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
}

/// Range size of whole-blob downloads: large enough for throughput, small enough that a retry
/// repeats little.
const DOWNLOAD_PIECE: u64 = 16 << 20;

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_registries_are_recognized() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(crate::hosts::is_loopback(host), "{host}");
        }
        for host in [
            "registry.example.com",
            "10.0.0.1:5000",
            "localhost.example.com:80",
        ] {
            assert!(!crate::hosts::is_loopback(host), "{host}");
        }
    }
}
