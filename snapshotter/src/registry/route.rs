//! How a request reaches a registry: its endpoints (mirrors first, then the registry
//! itself), each with its own client, credentials and what a probe found about its
//! authentication; a deadline per attempt, bounded retries with backoff, and falling back
//! from a failing mirror to the next endpoint.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

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
    /// What a probe found about this endpoint's authentication, for requests with no
    /// credentials.
    pub(super) access: std::sync::Mutex<Access>,
    /// A client that is never given credentials, for blob reads from an endpoint found
    /// [`Access::Open`]. oci-client probes `GET /v2/` before every request of a client that
    /// holds credentials (anonymous ones too) but got no token from them, which is every
    /// request to a registry that asks for none: a second round trip per range read. A client
    /// that holds none sends the request alone.
    pub(super) open_client: Client,
    /// What this mirror does with range reads of the blobs read lately.
    pub(super) blobs: MirrorBlobs,
}

/// What a mirror is known to do with range reads of one blob.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BlobState {
    /// One read is asking it (since then). Other reads of the blob go to the next endpoint
    /// meanwhile: a mirror still fetching the blob streams a whole copy from upstream for every
    /// request, so it gets one per node at a time, not one per read in flight.
    Asking {
        since: std::time::Instant,
        backoff: Duration,
    },
    /// It answered with the whole blob: left alone for this blob until then.
    Filling {
        ask_again_at: std::time::Instant,
        backoff: Duration,
    },
    /// It served a range: every read of the blob goes to it.
    Serving,
}

/// How many blobs a mirror's [`BlobState`]s are kept for: more than a node reads at once.
const MIRROR_BLOBS: usize = 1024;
/// How long a mirror that answered a range read of a blob with the whole blob is first left
/// alone for that blob, doubling while it goes on doing so, up to [`MIRROR_FILL_BACKOFF_MAX`].
/// Each ask costs the origin a little (the mirror opens a second stream of the blob from
/// upstream for it, cut when the node hangs up); waiting reads wait this long between asks.
const MIRROR_FILL_BACKOFF: Duration = Duration::from_secs(1);
const MIRROR_FILL_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// A read asking a mirror for longer than this is taken as lost: the next read asks.
const MIRROR_ASKING_STALE: Duration = Duration::from_secs(30);

/// A mirror answered a range read with the whole blob. A pull-through cache does that while
/// it does not hold the blob yet: distribution's proxy mode (`docker-registry` with `proxy:`)
/// then fetches the whole blob from upstream once into its storage, and streams a second copy
/// from upstream to the client. Reading through that stream to the range would carry the
/// blob up to the range over the node's link (a layer's tail is at its end: all of it), and
/// the origin would send it once more for every such read. So the read goes to the next
/// endpoint instead, and the mirror is asked for the blob again after a backoff, by when it
/// has it and answers with the range.
#[derive(Debug)]
pub(super) struct RangeIgnored;

impl std::fmt::Display for RangeIgnored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the mirror answered a range read with the whole blob (it is still fetching it)",
        )
    }
}

impl std::error::Error for RangeIgnored {}

impl RangeIgnored {
    /// The error a request returns for it.
    pub(super) fn error() -> OciDistributionError {
        OciDistributionError::IoError(std::io::Error::other(RangeIgnored))
    }

    fn is(error: &OciDistributionError) -> bool {
        matches!(error, OciDistributionError::IoError(io)
            if io.get_ref().is_some_and(|inner| inner.is::<RangeIgnored>()))
    }
}

/// What an endpoint asks of a client with no credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Not probed yet (or it refused an unauthenticated read since).
    Unknown,
    /// No authentication: `GET /v2/` answered without a challenge.
    Open,
    /// It challenges; the client's token cache holds what it handed out.
    Guarded,
}

/// What a mirror does with range reads of the blobs read lately (see [`RangeIgnored`]);
/// bounded, the least recently read forgotten first. Reads waiting for the mirror to hold a
/// blob wait on `changed`.
pub(super) struct MirrorBlobs {
    states: std::sync::Mutex<lru::LruCache<String, BlobState>>,
    changed: std::sync::Condvar,
}

/// Whether a read goes to the mirror now, or when to look again.
enum Turn {
    Now,
    NotBefore(std::time::Instant),
}

impl MirrorBlobs {
    pub(super) fn new() -> Self {
        MirrorBlobs {
            states: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MIRROR_BLOBS).expect("not zero"),
            )),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Whether a read of `digest` goes to this mirror at `now`. When what the mirror does with
    /// the blob is not known, the read that gets [`Turn::Now`] is the one asking.
    fn turn(
        states: &mut lru::LruCache<String, BlobState>,
        digest: &str,
        now: std::time::Instant,
    ) -> Turn {
        let backoff = match states.get(digest).copied() {
            Some(BlobState::Serving) => return Turn::Now,
            Some(BlobState::Asking { since, .. }) if now < since + MIRROR_ASKING_STALE => {
                return Turn::NotBefore(since + MIRROR_ASKING_STALE)
            }
            Some(BlobState::Filling { ask_again_at, .. }) if now < ask_again_at => {
                return Turn::NotBefore(ask_again_at)
            }
            Some(BlobState::Asking { backoff, .. } | BlobState::Filling { backoff, .. }) => backoff,
            None => Duration::ZERO,
        };
        states.put(
            digest.to_string(),
            BlobState::Asking {
                since: now,
                backoff,
            },
        );
        Turn::Now
    }

    #[cfg(test)]
    fn may_read(&self, digest: &str, now: std::time::Instant) -> bool {
        let mut states = self.states.lock().expect("mirror blobs lock");
        matches!(Self::turn(&mut states, digest, now), Turn::Now)
    }

    /// Whether a read of `digest` goes to this mirror: at once if the mirror serves it or is
    /// to be asked (this read asks); while the mirror is fetching it, or another read is
    /// asking, waits until that changes, or until `deadline`: then the read goes elsewhere.
    fn wait_to_read(&self, digest: &str, deadline: std::time::Instant) -> bool {
        let mut states = self.states.lock().expect("mirror blobs lock");
        loop {
            let now = std::time::Instant::now();
            match Self::turn(&mut states, digest, now) {
                Turn::Now => return true,
                Turn::NotBefore(_) if now >= deadline => return false,
                Turn::NotBefore(at) => {
                    let until = at.min(deadline);
                    states = self
                        .changed
                        .wait_timeout(states, until.saturating_duration_since(now))
                        .expect("mirror blobs lock")
                        .0;
                }
            }
        }
    }

    fn set(&self, digest: &str, state: Option<BlobState>) {
        let mut states = self.states.lock().expect("mirror blobs lock");
        match state {
            Some(state) => {
                states.put(digest.to_string(), state);
            }
            None => {
                states.pop(digest);
            }
        }
        self.changed.notify_all();
    }

    /// The mirror answered a range read of `digest` with the whole blob: leave it alone for
    /// that blob for a while, twice as long as last time.
    fn note_filling(&self, digest: &str, now: std::time::Instant) {
        let last = self
            .states
            .lock()
            .expect("mirror blobs lock")
            .peek(digest)
            .copied();
        let backoff = match last {
            Some(BlobState::Asking { backoff, .. } | BlobState::Filling { backoff, .. })
                if !backoff.is_zero() =>
            {
                (backoff * 2).min(MIRROR_FILL_BACKOFF_MAX)
            }
            _ => MIRROR_FILL_BACKOFF,
        };
        let ask_again_at = now + backoff;
        self.set(
            digest,
            Some(BlobState::Filling {
                ask_again_at,
                backoff,
            }),
        );
    }

    /// The mirror served a range of `digest`.
    fn note_served(&self, digest: &str) {
        self.set(digest, Some(BlobState::Serving));
    }

    /// A read of `digest` failed otherwise: what the mirror does with the blob is not known.
    fn forget(&self, digest: &str) {
        self.set(digest, None);
    }
}

/// What a request does with the client's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestKind<'a> {
    /// Hands credentials to the client (manifests, pushes): oci-client stores them.
    Authenticating,
    /// A range read of the blob with this digest, which only uses what the client holds: on an
    /// open endpoint it may use a client that holds nothing, and skip the probe. A mirror may
    /// answer it with [`RangeIgnored`].
    BlobRead { digest: &'a str },
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
        F: Fn(Client, RegistryAuth, Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let capable: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.endpoint.can(capability))
            .collect();
        let blob = match kind {
            RequestKind::BlobRead { digest } => Some(digest),
            RequestKind::Authenticating => None,
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
                    if let Some(digest) = blob {
                        route.blobs.note_filling(digest, std::time::Instant::now());
                    }
                    // The same mirror again, once it may hold the blob or the wait is over.
                    tracing::debug!(registry = %self.name, endpoint = %route.endpoint.host, what, "the mirror does not hold the blob yet");
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
            let anonymous_read = matches!(kind, RequestKind::BlobRead { .. })
                && matches!(auth, RegistryAuth::Anonymous);
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
    fn a_mirror_fetching_a_blob_is_asked_by_one_read_at_a_time_and_backed_off() {
        let blobs = MirrorBlobs::new();
        let start = std::time::Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        // Not known: the first read asks, the others go elsewhere until it has an answer.
        assert!(blobs.may_read("a", at(0.0)));
        assert!(!blobs.may_read("a", at(0.1)));
        assert!(
            blobs.may_read("b", at(0.1)),
            "another blob is asked on its own"
        );
        // A whole-blob answer: left alone for 1 s, then one read asks again.
        blobs.note_filling("a", at(0.2));
        assert!(!blobs.may_read("a", at(1.1)));
        assert!(blobs.may_read("a", at(1.3)));
        assert!(!blobs.may_read("a", at(1.4)));
        // Again a whole blob: twice as long.
        blobs.note_filling("a", at(1.5));
        assert!(!blobs.may_read("a", at(3.4)));
        assert!(blobs.may_read("a", at(3.6)));
        // A range: every read goes to the mirror from then on.
        blobs.note_served("a");
        assert!(blobs.may_read("a", at(3.7)));
        assert!(blobs.may_read("a", at(3.7)));
        // An asking read that never came back is replaced after 30 s.
        assert!(!blobs.may_read("b", at(20.0)));
        assert!(blobs.may_read("b", at(30.2)));
        // Another failure: not known again, so the next read asks.
        blobs.forget("b");
        assert!(blobs.may_read("b", at(30.3)));
    }

    #[test]
    fn a_read_waits_for_the_asking_read_and_not_longer_than_told() {
        let blobs = std::sync::Arc::new(MirrorBlobs::new());
        let after = |wait: Duration| std::time::Instant::now() + wait;
        assert!(
            blobs.wait_to_read("a", after(Duration::ZERO)),
            "the first read asks"
        );
        assert!(
            !blobs.wait_to_read("a", after(Duration::ZERO)),
            "no wait: another endpoint"
        );
        let waiting = {
            let blobs = blobs.clone();
            std::thread::spawn(move || blobs.wait_to_read("a", after(Duration::from_secs(60))))
        };
        // The asking read's answer wakes the waiting one (the event; not its 60 s).
        blobs.note_served("a");
        assert!(waiting.join().unwrap());
        // A mirror that keeps answering with the whole blob: a read gives up after its wait.
        assert!(blobs.wait_to_read("b", after(Duration::ZERO)));
        blobs.note_filling("b", after(Duration::from_secs(600)));
        assert!(!blobs.wait_to_read("b", after(Duration::from_millis(20))));
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
