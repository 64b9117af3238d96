//! Registry hosts in containerd's `hosts.toml` layout: `DIR/REGISTRY/hosts.toml` lists mirrors
//! to try before the registry itself, each with its protocol, CA and capabilities.
//!
//! ```toml
//! server = "https://registry.example.com"       # the origin; default https://REGISTRY
//!
//! [host."http://mirror.local:5000"]
//!   capabilities = ["pull", "resolve"]         # default: pull, resolve, push
//!   ca = "/etc/containerd/certs.d/mirror.crt"  # extra CA for this host
//!   skip_verify = false
//! ```
//!
//! Hosts are tried in file order, then the origin. As docker does, a loopback registry
//! (`localhost`, `127.0.0.0/8`, `::1`) defaults to plain HTTP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What an endpoint may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Fetch blobs and manifests by digest.
    Pull,
    /// Resolve tags to manifests.
    Resolve,
    /// Push blobs and manifests.
    Push,
}

/// One place to send requests for a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` used in URLs.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Extra CA certificate (PEM) to trust for this host.
    pub ca: Option<PathBuf>,
    /// Accept any certificate (testing only).
    pub skip_verify: bool,
    /// What it may be used for.
    pub capabilities: Vec<Capability>,
    /// Whether this is a mirror rather than the registry itself.
    pub mirror: bool,
}

impl Endpoint {
    /// Whether it may be used for `capability`.
    pub fn can(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }
}

/// A `hosts.toml` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct HostsError {
    path: PathBuf,
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    ca: Option<PathBuf>,
    #[serde(default)]
    skip_verify: bool,
    #[serde(default)]
    host: BTreeMap<String, HostEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<PathBuf>,
    #[serde(default)]
    skip_verify: bool,
    #[serde(default)]
    override_path: bool,
    #[serde(default)]
    header: BTreeMap<String, toml::Value>,
}

/// Whether `registry` (`host[:port]`) is on the loopback interface.
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

fn parse_url(url: &str, fail: &dyn Fn(String) -> HostsError) -> Result<(String, bool), HostsError> {
    let (plain, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (false, rest)
    } else {
        (is_loopback(url), url)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(fail(format!("{url:?} is not SCHEME://HOST[:PORT]")));
    }
    Ok((host.to_string(), plain))
}

fn capabilities(
    list: &Option<Vec<String>>,
    fail: &dyn Fn(String) -> HostsError,
) -> Result<Vec<Capability>, HostsError> {
    match list {
        None => Ok(vec![
            Capability::Pull,
            Capability::Resolve,
            Capability::Push,
        ]),
        Some(list) => list
            .iter()
            .map(|c| match c.as_str() {
                "pull" => Ok(Capability::Pull),
                "resolve" => Ok(Capability::Resolve),
                "push" => Ok(Capability::Push),
                other => Err(fail(format!(
                    "unknown capability {other:?} (pull, resolve, push)"
                ))),
            })
            .collect(),
    }
}

/// The endpoints for `registry`: the mirrors of `hosts_dir/REGISTRY/hosts.toml` in file
/// order, then the origin. Without a hosts file, just the origin.
pub fn endpoints(hosts_dir: Option<&Path>, registry: &str) -> Result<Vec<Endpoint>, HostsError> {
    let origin = |plain_http: bool,
                  host: String,
                  ca: Option<PathBuf>,
                  skip_verify: bool,
                  caps: Vec<Capability>| Endpoint {
        host,
        plain_http,
        ca,
        skip_verify,
        capabilities: caps,
        mirror: false,
    };
    let all = vec![Capability::Pull, Capability::Resolve, Capability::Push];
    let Some(path) = hosts_dir
        .map(|dir| dir.join(registry).join("hosts.toml"))
        .filter(|p| p.exists())
    else {
        return Ok(vec![origin(
            is_loopback(registry),
            registry.to_string(),
            None,
            false,
            all,
        )]);
    };
    let fail = |reason: String| HostsError {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    let file: HostsFile = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    // serde's map loses the file's order; the order of `[host."..."]` headers is the order of
    // preference, so read it from the text.
    let mut order: Vec<&String> = file.host.keys().collect();
    order.sort_by_key(|key| {
        text.find(&format!("[host.\"{key}\"]"))
            .unwrap_or(usize::MAX)
    });
    let mut out = Vec::new();
    for url in order {
        let entry = &file.host[url];
        if entry.override_path || !entry.header.is_empty() {
            return Err(fail(format!(
                "host {url}: override_path and header are not supported"
            )));
        }
        let (host, plain_http) = parse_url(url, &fail)?;
        out.push(Endpoint {
            host,
            plain_http,
            ca: entry.ca.clone(),
            skip_verify: entry.skip_verify,
            capabilities: capabilities(&entry.capabilities, &fail)?,
            mirror: true,
        });
    }
    let (host, plain_http) = match &file.server {
        Some(server) => parse_url(server, &fail)?,
        None => (registry.to_string(), is_loopback(registry)),
    };
    let caps = capabilities(&file.capabilities, &fail)?;
    out.push(origin(
        plain_http,
        host,
        file.ca.clone(),
        file.skip_verify,
        caps,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_file_order_then_the_origin() {
        let dir = tempfile::tempdir().unwrap();
        let registry = "registry.example.com";
        std::fs::create_dir_all(dir.path().join(registry)).unwrap();
        std::fs::write(
            dir.path().join(registry).join("hosts.toml"),
            r#"server = "https://registry.example.com"

[host."http://zz-first.local:5000"]
  capabilities = ["pull", "resolve"]

[host."https://aa-second.local"]
  ca = "/etc/ca.pem"
"#,
        )
        .unwrap();
        let got = endpoints(Some(dir.path()), registry).unwrap();
        let hosts: Vec<(&str, bool, bool)> = got
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            hosts,
            vec![
                ("zz-first.local:5000", true, true),
                ("aa-second.local", false, true),
                ("registry.example.com", false, false)
            ]
        );
        assert!(!got[0].can(Capability::Push) && got[1].can(Capability::Push));
        assert_eq!(got[1].ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        // No file: the origin alone; loopback is plain HTTP.
        assert!(endpoints(Some(dir.path()), "127.0.0.1:5000").unwrap()[0].plain_http);
        assert!(!endpoints(None, "other.example.com").unwrap()[0].plain_http);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r.example")).unwrap();
        std::fs::write(
            dir.path().join("r.example/hosts.toml"),
            "[host.\"http://m\"]\n  capabilities = [\"fly\"]\n",
        )
        .unwrap();
        let err = endpoints(Some(dir.path()), "r.example")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hosts.toml") && err.contains("fly"), "{err}");
    }
}
