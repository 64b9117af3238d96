//! How a request reaches a registry: its endpoints (mirrors first, then the registry
//! itself), each with its own client, credentials and what a probe found about its
//! authentication; a deadline per attempt, bounded retries with backoff, and falling back
//! from a failing mirror to the next endpoint.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::bare::BareClient;
use super::mirror_fill::{MirrorBlobs, RangeIgnored};
use super::{Registry, RegistryError, RegistryOptions};
use crate::hosts::{Capability, Endpoint};

pub(super) struct Route {
    pub(super) endpoint: Endpoint,
    pub(super) client: Client,
    /// The endpoint's CA (PEM), to make a client for pull credentials like `client`.
    pub(super) ca_pem: Option<Vec<u8>>,
    /// A client for the newest pull credentials and their number: oci-client keeps the first
    /// credentials and the tokens made from them, so new credentials get a client of their own.
    pub(super) pulled: std::sync::Mutex<Option<(u64, Client)>>,
    /// The node's credentials for this endpoint, and where they came from.
    pub(super) auth: RegistryAuth,
    pub(super) auth_source: &'static str,
    /// While set and in the future, this mirror is skipped: it could not be reached lately.
    pub(super) down_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether a read without credentials was challenged here: such reads then go through
    /// the authenticating client (which fetches and caches a token) from the start.
    pub(super) guarded: std::sync::atomic::AtomicBool,
    /// A client that is never given credentials, for range reads without credentials until
    /// the endpoint challenges one. oci-client probes `GET /v2/` before every request of a
    /// client that holds credentials (anonymous ones too) but got no token from them, which is
    /// every request to a registry that asks for none: a second round trip per range read. A
    /// client that holds none sends the request alone.
    pub(super) open_client: Client,
    /// The same for whole documents (manifests, configs), which oci-client cannot read without
    /// storing credentials (see `bare.rs`).
    pub(super) bare: BareClient,
    /// What this mirror does with range reads of the blobs read lately.
    pub(super) blobs: MirrorBlobs,
}

/// What a request does with the client's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind<'a> {
    /// Hands credentials to the client (pushes): oci-client stores them.
    Authenticating,
    /// A range read of the blob with this digest, which only uses what the client holds: on an
    /// open endpoint it may use a client that holds nothing, and skip the probe. A mirror may
    /// answer it with [`RangeIgnored`].
    BlobRead { digest: &'a str },
    /// A whole manifest or small blob: without credentials, on an endpoint that never
    /// challenged one, it goes out bare on [`Attempt::bare`].
    Document,
}

/// One try of a request on one endpoint.
pub(super) struct Attempt {
    /// The client to send it with.
    pub(super) client: Client,
    /// The credentials the request may hand `client`.
    pub(super) auth: RegistryAuth,
    /// What the request names, as the endpoint knows it.
    pub(super) target: Reference,
    /// Set when a [`RequestKind::Document`] read goes out bare: send it on this client.
    pub(super) bare: Option<BareClient>,
}

/// How a client for `endpoint` talks: plain HTTP or TLS (with its CA, maybe no verification),
/// timeouts from `options`.
pub(super) fn client_config(
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
pub(super) const NO_CREDENTIALS: &str =
    "no credentials: the node has none for this registry (docker config.json) and no pull brought any";
pub(super) const NODE_CREDENTIALS: &str = "the node's credentials (docker config.json)";
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

    /// A read (of a range or a whole document). Without credentials it goes out bare first,
    /// on a client that holds nothing, as containerd's resolver sends it: an open registry
    /// answers it at once (oci-client's own client would first probe `GET /v2/`, a round trip
    /// per request on a cold token cache). A challenge marks the endpoint guarded, and the
    /// read, and later ones, go through the authenticating client of `attempt`, which is given
    /// the credentials (anonymous ones too) so that it fetches and caches a token.
    async fn read<T, F, Fut>(
        &self,
        kind: RequestKind<'_>,
        attempt: Attempt,
        request: &F,
    ) -> Result<T, OciDistributionError>
    where
        F: Fn(Attempt) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        use std::sync::atomic::Ordering;
        if matches!(attempt.auth, RegistryAuth::Anonymous) && !self.guarded.load(Ordering::Relaxed)
        {
            let bare = Attempt {
                client: self.open_client.clone(),
                auth: RegistryAuth::Anonymous,
                target: attempt.target.clone(),
                bare: (kind == RequestKind::Document).then(|| self.bare.clone()),
            };
            match request(bare).await {
                Err(error) if wants_credentials(&error) => {
                    self.guarded.store(true, Ordering::Relaxed);
                }
                answer => return answer,
            }
        }
        attempt
            .client
            .store_auth_if_needed(attempt.target.resolve_registry(), &attempt.auth)
            .await;
        request(attempt).await
    }

    fn mark_down(&self) {
        *self.down_until.lock().expect("route lock") =
            Some(std::time::Instant::now() + MIRROR_BACKOFF);
    }
}

impl Registry {
    /// Runs a request on every endpoint that can do `capability`, in order, until one
    /// succeeds. On each endpoint: a deadline per attempt and bounded retries with backoff for
    /// retryable failures. Any failure of a mirror (down, missing the image, refusing us) falls
    /// back to the next endpoint; the last endpoint's error is returned.
    pub(super) fn call<T, F, Fut>(
        &self,
        capability: Capability,
        kind: RequestKind<'_>,
        reference: &Reference,
        what: &str,
        request: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Attempt) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let capable: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.endpoint.can(capability))
            .collect();
        let blob = match kind {
            RequestKind::BlobRead { digest } => Some(digest),
            RequestKind::Authenticating | RequestKind::Document => None,
        };
        // A mirror that could not be reached lately is skipped (a circuit breaker), so a dead
        // mirror costs one timeout per 30 s instead of one per request. The last endpoint is
        // always tried.
        let routes: Vec<&Route> = capable
            .iter()
            .enumerate()
            .filter(|(number, route)| number + 1 == capable.len() || !route.is_down())
            .map(|(_, route)| *route)
            .collect();
        // How long a blob read waits for pull-through mirrors that are still fetching the blob.
        let wait_for_mirrors_until = std::time::Instant::now() + self.options.mirror_fill_wait;
        let mut last = None;
        let mut number = 0;
        while let Some(route) = routes.get(number) {
            let fallback = number + 1 < routes.len();
            // So is a mirror still fetching the blob read (or being asked whether it is, see
            // `RangeIgnored`) once the read has waited `mirror_fill_wait` for it.
            if fallback
                && blob
                    .is_some_and(|digest| !route.blobs.wait_to_read(digest, wait_for_mirrors_until))
            {
                self.options
                    .mirror_stats
                    .reads_passed_on
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                number += 1;
                continue;
            }
            let target = retarget(reference, &route.endpoint);
            // Only the last endpoint gets the full retry budget: a mirror that fails falls back
            // quickly instead of delaying every request by a whole backoff sequence.
            let retries = if number + 1 == routes.len() {
                self.options.retries
            } else {
                self.options.retries.min(1)
            };
            match self.call_endpoint(route, kind, &target, what, retries, &request) {
                Ok(value) => {
                    if let (true, Some(digest)) = (fallback, blob) {
                        route.blobs.note_served(digest);
                    }
                    return Ok(value);
                }
                Err(RegistryError::Request { source, .. })
                    if fallback && RangeIgnored::is(&source) =>
                {
                    self.options
                        .mirror_stats
                        .whole_blob_answers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let first = blob.is_some_and(|digest| {
                        route.blobs.note_filling(digest, std::time::Instant::now())
                    });
                    if first {
                        tracing::info!(registry = %self.name, endpoint = %route.endpoint.host, what, wait = ?self.options.mirror_fill_wait,
                            "the mirror does not hold this blob yet (a pull-through cache fetching it): reads of it wait for it, then go to the next host");
                    }
                    // The same mirror again, once it may hold the blob or the wait is over.
                    continue;
                }
                Err(error) => {
                    if let (true, Some(digest)) = (fallback, blob) {
                        route.blobs.forget(digest);
                    }
                    if fallback {
                        if unreachable(&error) {
                            route.mark_down();
                        }
                        tracing::warn!(registry = %self.name, endpoint = %route.endpoint.host, what, %error, "endpoint failed; trying the next one");
                    }
                    last = Some(error);
                }
            }
            number += 1;
        }
        Err(last.unwrap_or_else(|| RegistryError::Invalid {
            registry: self.name.clone(),
            what: format!("no endpoint may be used to {capability:?} ({what})"),
        }))
    }

    fn call_endpoint<T, F, Fut>(
        &self,
        route: &Route,
        kind: RequestKind<'_>,
        target: &Reference,
        what: &str,
        retries: u32,
        request: &F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Attempt) -> Fut,
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
            let this_try = Attempt {
                client,
                auth,
                target: target.clone(),
                bare: None,
            };
            let outcome = self.runtime.block_on(async {
                tokio::time::timeout(self.options.request_timeout, async {
                    if kind == RequestKind::Authenticating {
                        request(this_try).await
                    } else {
                        route.read(kind, this_try, request).await
                    }
                })
                .await
            });
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
}

/// `reference` as `endpoint` (a mirror) has it: its host, the same repository (under the
/// endpoint's namespace, if it has one), tag and digest.
pub(super) fn retarget(reference: &Reference, endpoint: &Endpoint) -> Reference {
    let host = endpoint.host.as_str();
    if reference.resolve_registry() == host && endpoint.namespace.is_none() {
        return reference.clone();
    }
    let repository = match &endpoint.namespace {
        Some(namespace) => format!("{namespace}/{}", reference.repository()),
        None => reference.repository().to_string(),
    };
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

/// Whether a request failed because the endpoint wants credentials (or a token) for it.
fn wants_credentials(error: &OciDistributionError) -> bool {
    use oci_client::errors::OciErrorCode;
    match error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        _ => false,
    }
}

fn retryable(error: &OciDistributionError) -> bool {
    match error {
        error if RangeIgnored::is(error) => false,
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
pub(super) fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mirror = |host: &str, namespace: Option<&str>| Endpoint {
            host: host.to_string(),
            plain_http: false,
            ca: None,
            skip_verify: false,
            capabilities: vec![Capability::Pull],
            mirror: true,
            namespace: namespace.map(str::to_string),
        };
        let tagged = Registry::parse("registry.example.com/team/app:1.0").unwrap();
        assert_eq!(
            retarget(&tagged, &mirror("mirror:5000", None)).to_string(),
            "mirror:5000/team/app:1.0"
        );
        let pinned = Registry::parse("registry.example.com/app@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        assert!(retarget(&pinned, &mirror("m", None))
            .to_string()
            .starts_with("m/app@sha256:"));
        // A Harbor proxy cache project: the repository under the project.
        assert_eq!(
            retarget(&tagged, &mirror("harbor.example.com", Some("hub-proxy"))).to_string(),
            "harbor.example.com/hub-proxy/team/app:1.0"
        );
    }
}
