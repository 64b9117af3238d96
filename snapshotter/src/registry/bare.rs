//! Whole documents read without credentials: manifests and small blobs (configs, signature
//! payloads), each one plain GET on a client that never holds credentials.
//!
//! Why not oci-client for these: its manifest read first stores the credentials it is given
//! (anonymous ones too), and a client holding credentials but no token probes `GET /v2/`
//! before each request: on a registry that issues no tokens, every manifest costs a round trip
//! more. containerd's resolver sends the GET alone and authenticates only once challenged; so
//! does this. A challenge (401, 403) marks the endpoint guarded (see `route.rs`), and from then
//! on its reads go through oci-client with credentials and tokens. Byte ranges of layers stay
//! with oci-client (its client that holds nothing never probes).
//!
//! Manifests and configs of a pull share this client's connection, so a pull opens one
//! connection, not one per client.

use oci_client::errors::{OciDistributionError, OciEnvelope};
use oci_client::Reference;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH};
use reqwest::StatusCode;

use crate::hosts::Endpoint;

use super::RegistryOptions;

/// The largest manifest read: the distribution spec asks registries to take manifests of at
/// least 4 MiB, and containerd refuses larger ones too.
const MANIFEST_LIMIT: u64 = 4 << 20;

/// Header registries put the manifest digest in.
const CONTENT_DIGEST: &str = "docker-content-digest";

/// A client for bare GETs of one endpoint.
#[derive(Clone)]
pub(super) struct BareClient {
    http: reqwest::Client,
    scheme: &'static str,
}

impl BareClient {
    /// A client for `endpoint` that trusts what oci-client's clients for it trust (its CA, or
    /// nothing when verification is off) and keeps the same timeouts.
    pub(super) fn new(
        endpoint: &Endpoint,
        options: &RegistryOptions,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .danger_accept_invalid_certs(endpoint.skip_verify)
            .connect_timeout(
                options
                    .request_timeout
                    .min(std::time::Duration::from_secs(10)),
            )
            .read_timeout(options.request_timeout)
            .user_agent(concat!("sealfs/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certificate = reqwest::Certificate::from_pem(pem)
                .map_err(|e| format!("CA of {}: {e}", endpoint.host))?;
            builder = builder.tls_certs_merge([certificate]);
        }
        Ok(BareClient {
            http: builder
                .build()
                .map_err(|e| format!("HTTP client for {}: {e}", endpoint.host))?,
            scheme: if endpoint.plain_http { "http" } else { "https" },
        })
    }

    /// The manifest (or index) `target` names, and its digest. A pinned target's bytes must
    /// hash to its digest; a tag's digest is the bytes' hash, which a `Docker-Content-Digest`
    /// answer header must agree with.
    pub(super) async fn manifest(
        &self,
        target: &Reference,
        accepted: &[&str],
    ) -> Result<(Vec<u8>, String), OciDistributionError> {
        let name = target
            .digest()
            .or(target.tag())
            .unwrap_or("latest")
            .to_string();
        let url = self.url(target, "manifests", &name);
        let (body, headers) = self
            .get(&url, Some(&accepted.join(", ")), MANIFEST_LIMIT)
            .await?;
        let digest = fsformat::digest::digest_of(&body);
        let claimed = target.digest().map(str::to_string).or_else(|| {
            headers
                .get(CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.starts_with("sha256:"))
                .map(str::to_string)
        });
        if let Some(claimed) = claimed.filter(|claimed| *claimed != digest) {
            return Err(OciDistributionError::SpecViolationError(format!(
                "{url}: the manifest is said to be {claimed} but hashes to {digest}"
            )));
        }
        Ok((body, digest))
    }

    /// Blob `digest` of `target`'s repository, whole, if it has at most `limit` bytes (the
    /// caller checks its digest).
    pub(super) async fn blob(
        &self,
        target: &Reference,
        digest: &str,
        limit: u64,
    ) -> Result<Vec<u8>, OciDistributionError> {
        let url = self.url(target, "blobs", digest);
        Ok(self.get(&url, None, limit).await?.0)
    }

    fn url(&self, target: &Reference, kind: &str, name: &str) -> String {
        let namespace = target
            .namespace()
            .map(|ns| format!("?ns={ns}"))
            .unwrap_or_default();
        format!(
            "{}://{}/v2/{}/{kind}/{name}{namespace}",
            self.scheme,
            target.resolve_registry(),
            target.repository()
        )
    }

    /// GETs `url`, reading at most `limit` bytes of the answer: a longer answer is refused
    /// before (by its length) or while it is read.
    async fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        limit: u64,
    ) -> Result<(Vec<u8>, HeaderMap), OciDistributionError> {
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        let mut response = request.send().await?;
        let status = response.status();
        let too_long = || {
            OciDistributionError::SpecViolationError(format!(
                "{url}: the answer has more than the {limit} bytes expected"
            ))
        };
        // An error's body is only read for its message: a few KiB are plenty.
        let keep = if status == StatusCode::OK {
            limit
        } else {
            64 << 10
        };
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if status == StatusCode::OK && announced.is_some_and(|len| len > limit) {
            return Err(too_long());
        }
        let mut body = Vec::with_capacity(announced.unwrap_or(0).min(keep) as usize);
        while let Some(piece) = response.chunk().await? {
            if (body.len() + piece.len()) as u64 > keep {
                if status == StatusCode::OK {
                    return Err(too_long());
                }
                break;
            }
            body.extend_from_slice(&piece);
        }
        if status != StatusCode::OK {
            return Err(refusal(status, &body, url));
        }
        Ok((body, response.headers().clone()))
    }
}

/// The error a registry's answer other than 200 means, as oci-client reports it (so failures
/// are classified alike: retried, a want of credentials, not found).
fn refusal(status: StatusCode, body: &[u8], url: &str) -> OciDistributionError {
    let url = url.to_string();
    if status == StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError { url };
    }
    if status.is_client_error() {
        if let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(body) {
            return OciDistributionError::RegistryError { envelope, url };
        }
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url,
        message: String::from_utf8_lossy(body).into_owned(),
    }
}
