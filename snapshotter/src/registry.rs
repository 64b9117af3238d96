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

use crate::hosts::{self, Capability, Endpoint};
use crate::oci_layout::{host_platform, platform_manifest, ResolvedImage};
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

struct Route {
    endpoint: Endpoint,
    client: Client,
    /// The endpoint's CA (PEM), to make a client for pull credentials like `client`.
    ca_pem: Option<Vec<u8>>,
    /// A client for the newest pull credentials and their number: oci-client keeps the first
    /// credentials and the tokens made from them, so new credentials get a client of their own.
    pulled: std::sync::Mutex<Option<(u64, Client)>>,
    /// The node's credentials for this endpoint, and where they came from.
    auth: RegistryAuth,
    auth_source: &'static str,
    /// While set and in the future, this mirror is skipped: it could not be reached lately.
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// What a probe found about this endpoint's authentication, for requests with no
    /// credentials.
    access: std::sync::Mutex<Access>,
    /// A client that is never given credentials, for blob reads from an endpoint found
    /// [`Access::Open`]. oci-client probes `GET /v2/` before every request of a client that
    /// holds credentials (anonymous ones too) but got no token from them, which is every
    /// request to a registry that asks for none: a second round trip per range read. A client
    /// that holds none sends the request alone.
    open_client: Client,
}

/// What an endpoint asks of a client with no credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Not probed yet (or it refused an unauthenticated read since).
    Unknown,
    /// No authentication: `GET /v2/` answered without a challenge.
    Open,
    /// It challenges; the client's token cache holds what it handed out.
    Guarded,
}

/// What a request does with the client's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    /// Hands credentials to the client (manifests, pushes): oci-client stores them.
    Authenticating,
    /// A blob read, which only uses what the client holds: on an open endpoint it may use a
    /// client that holds nothing, and skip the probe.
    BlobRead,
}

/// How a client for `endpoint` talks: plain HTTP or TLS (with its CA, maybe no verification),
/// timeouts from `options`.
fn client_config(
    endpoint: &Endpoint,
    options: &RegistryOptions,
    ca_pem: Option<&[u8]>,
) -> ClientConfig {
    let mut config = ClientConfig {
        protocol: if endpoint.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: endpoint.skip_verify,
        connect_timeout: Some(options.request_timeout.min(Duration::from_secs(10))),
        read_timeout: Some(options.request_timeout),
        ..ClientConfig::default()
    };
    if let Some(pem) = ca_pem {
        config
            .extra_root_certificates
            .push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.to_vec(),
            });
    }
    config
}

/// Where the credentials of a request came from, as errors name it.
const NO_CREDENTIALS: &str =
    "no credentials: the node has none for this registry (docker config.json) and no pull brought any";
const NODE_CREDENTIALS: &str = "the node's credentials (docker config.json)";
const PULL_CREDENTIALS: &str = "the credentials of the latest CRI pull (imagePullSecret)";

/// How long a mirror that could not be reached is skipped before it is tried again.
const MIRROR_BACKOFF: Duration = Duration::from_secs(30);

impl Route {
    fn is_down(&self) -> bool {
        let until = *self.down_until.lock().expect("route lock");
        until.is_some_and(|until| std::time::Instant::now() < until)
    }

    /// The client for pull credentials number `number`: the same while they stand (its
    /// connections and tokens are reused), a fresh one when they were replaced.
    fn client_for(&self, number: u64, options: &RegistryOptions) -> Client {
        let mut pulled = self.pulled.lock().expect("route lock");
        match &*pulled {
            Some((current, client)) if *current == number => client.clone(),
            _ => {
                let config = client_config(&self.endpoint, options, self.ca_pem.as_deref());
                let client = Client::new(config);
                *pulled = Some((number, client.clone()));
                client
            }
        }
    }

    /// The client for a blob read with no credentials: the probe-free one when the endpoint is
    /// known to ask for none. Probes the endpoint once (one `GET /v2/`, which also caches any
    /// anonymous token in `client`) to find out.
    async fn client_for_anonymous_read(&self, client: &Client, target: &Reference) -> Client {
        let known = *self.access.lock().expect("route lock");
        let access = match known {
            Access::Unknown => {
                match client
                    .auth(
                        target,
                        &RegistryAuth::Anonymous,
                        oci_client::RegistryOperation::Pull,
                    )
                    .await
                {
                    Ok(None) => Access::Open,
                    Ok(Some(_)) => Access::Guarded,
                    // Not known yet: the request itself will say what is wrong.
                    Err(_) => Access::Unknown,
                }
            }
            known => known,
        };
        *self.access.lock().expect("route lock") = access;
        match access {
            Access::Open => self.open_client.clone(),
            Access::Unknown | Access::Guarded => client.clone(),
        }
    }

    /// A probe-free read failed: probe again before the next one, in case the endpoint now
    /// wants authentication.
    fn forget_access(&self) {
        *self.access.lock().expect("route lock") = Access::Unknown;
    }

    fn mark_down(&self) {
        *self.down_until.lock().expect("route lock") =
            Some(std::time::Instant::now() + MIRROR_BACKOFF);
    }
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
                access: std::sync::Mutex::new(Access::Unknown),
                ca_pem,
                pulled: std::sync::Mutex::new(None),
                auth,
                auth_source,
                endpoint,
                down_until: std::sync::Mutex::new(None),
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

    /// Parses `HOST/REPO[:TAG][@DIGEST]`.
    pub fn parse(reference: &str) -> Result<Reference, RegistryError> {
        reference
            .parse::<Reference>()
            .map_err(|source| RegistryError::Reference {
                reference: reference.to_string(),
                source,
            })
    }

    /// Runs a request on every endpoint that can do `capability`, in order, until one
    /// succeeds. On each endpoint: a deadline per attempt and bounded retries with backoff for
    /// retryable failures. Any failure of a mirror (down, missing the image, refusing us) falls
    /// back to the next endpoint; the last endpoint's error is returned.
    fn call<T, F, Fut>(
        &self,
        capability: Capability,
        kind: RequestKind,
        reference: &Reference,
        what: &str,
        request: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Client, RegistryAuth, Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let capable: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.endpoint.can(capability))
            .collect();
        // A mirror that could not be reached lately is skipped (a circuit breaker), so a dead
        // mirror costs one timeout per 30 s instead of one per request; the last endpoint is
        // always tried.
        let routes: Vec<&Route> = capable
            .iter()
            .enumerate()
            .filter(|(number, route)| number + 1 == capable.len() || !route.is_down())
            .map(|(_, route)| *route)
            .collect();
        let mut last = None;
        for (number, route) in routes.iter().enumerate() {
            let target = retarget(reference, &route.endpoint.host);
            // Only the last endpoint gets the full retry budget: a mirror that fails falls back
            // quickly instead of delaying every request by a whole backoff sequence.
            let retries = if number + 1 == routes.len() {
                self.options.retries
            } else {
                self.options.retries.min(1)
            };
            match self.call_endpoint(route, kind, &target, what, retries, &request) {
                Ok(value) => return Ok(value),
                Err(error) => {
                    if number + 1 < routes.len() {
                        if unreachable(&error) {
                            route.mark_down();
                        }
                        tracing::warn!(registry = %self.name, endpoint = %route.endpoint.host, what, %error, "endpoint failed; trying the next one");
                    }
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Invalid {
            registry: self.name.clone(),
            what: format!("no endpoint may be used to {capability:?} ({what})"),
        }))
    }

    fn call_endpoint<T, F, Fut>(
        &self,
        route: &Route,
        kind: RequestKind,
        target: &Reference,
        what: &str,
        retries: u32,
        request: &F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Client, RegistryAuth, Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let host = route.endpoint.host.as_str();
        let mut backoff = self.options.backoff;
        let mut attempt = 0;
        loop {
            // Read at every attempt: a pull may have brought newer credentials meanwhile.
            let (client, auth, credentials) = match self
                .options
                .pull_credentials
                .as_ref()
                .and_then(|pulled| pulled.get_numbered(host))
            {
                Some((number, auth)) => (
                    route.client_for(number, &self.options),
                    auth,
                    PULL_CREDENTIALS,
                ),
                None => (route.client.clone(), route.auth.clone(), route.auth_source),
            };
            let anonymous_read =
                kind == RequestKind::BlobRead && matches!(auth, RegistryAuth::Anonymous);
            let outcome = self.runtime.block_on(async {
                tokio::time::timeout(self.options.request_timeout, async {
                    let client = if anonymous_read {
                        route.client_for_anonymous_read(&client, target).await
                    } else {
                        client
                    };
                    request(client, auth, target.clone()).await
                })
                .await
            });
            if anonymous_read && !matches!(outcome, Ok(Ok(_))) {
                route.forget_access();
            }
            let error = match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(source)) if !retryable(&source) || attempt == retries => {
                    return Err(RegistryError::Request {
                        registry: host.to_string(),
                        what: what.to_string(),
                        credentials,
                        source,
                    })
                }
                Ok(Err(source)) => source.to_string(),
                Err(_) if attempt == retries => {
                    return Err(RegistryError::Timeout {
                        registry: host.to_string(),
                        what: what.to_string(),
                        after: self.options.request_timeout,
                    })
                }
                Err(_) => "timed out".to_string(),
            };
            tracing::debug!(registry = host, what, attempt, %error, ?backoff, "registry request failed; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
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
                RequestKind::Authenticating,
                &reference,
                &format!("manifest of {reference}"),
                |client, auth, target| async move {
                    client
                        .pull_manifest_raw(&target, &auth, &MANIFEST_TYPES)
                        .await
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
        self.call(
            Capability::Push,
            RequestKind::Authenticating,
            reference,
            &format!("checking blob {digest}"),
            |client, auth, target| async move {
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
            |client, auth, target| {
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
            |client, auth, target| {
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

/// `reference` with its registry replaced by `host` (a mirror): same repository, tag, digest.
fn retarget(reference: &Reference, host: &str) -> Reference {
    if reference.resolve_registry() == host {
        return reference.clone();
    }
    let repository = reference.repository().to_string();
    match (reference.digest(), reference.tag()) {
        (Some(digest), _) => {
            Reference::with_digest(host.to_string(), repository, digest.to_string())
        }
        (None, tag) => Reference::with_tag(
            host.to_string(),
            repository,
            tag.unwrap_or("latest").to_string(),
        ),
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

/// Whether an endpoint could not be reached at all (as opposed to answering with an error such
/// as "manifest unknown", which says nothing about the next request).
fn unreachable(error: &RegistryError) -> bool {
    match error {
        RegistryError::Timeout { .. } => true,
        RegistryError::Request {
            source: OciDistributionError::RequestError(e),
            ..
        } => e.is_connect() || e.is_timeout(),
        _ => false,
    }
}

fn retryable(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::RequestError(e) if is_certificate_error(e) => false,
        OciDistributionError::RequestError(e) => {
            e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Whether a request failed because the server's certificate was not accepted: asking again
/// cannot help, so it is not retried.
fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            );
        }
        // An io::Error's source() skips the error it wraps (often another io::Error around
        // the TLS error), so step into the wrapped error instead.
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    false
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
        let descriptor = &descriptor;
        self.registry.call(
            Capability::Pull,
            RequestKind::BlobRead,
            &self.reference,
            &what,
            |client, auth, target| async move {
                // A client made for new pull credentials may not hold them yet (anonymous
                // reads are the probe's business: see `client_for_anonymous_read`).
                if !matches!(auth, RegistryAuth::Anonymous) {
                    client
                        .store_auth_if_needed(target.resolve_registry(), &auth)
                        .await;
                }
                let response = client
                    .pull_blob_stream_partial(&target, descriptor, offset, Some(len as u64))
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
            },
        )
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

    #[test]
    fn certificate_errors_are_found_inside_nested_io_errors() {
        use std::io::{Error, ErrorKind};
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested = Error::other(Error::new(ErrorKind::InvalidData, tls));
        assert!(is_certificate_error(&nested));
        assert!(!is_certificate_error(&Error::other(Error::new(
            ErrorKind::ConnectionRefused,
            "refused"
        ))));
    }

    #[test]
    fn references_retarget_to_mirrors() {
        let tagged = Registry::parse("registry.example.com/team/app:1.0").unwrap();
        assert_eq!(
            retarget(&tagged, "mirror:5000").to_string(),
            "mirror:5000/team/app:1.0"
        );
        let pinned = Registry::parse("registry.example.com/app@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        assert!(retarget(&pinned, "m")
            .to_string()
            .starts_with("m/app@sha256:"));
    }
}
