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
//!
//! [host."https://harbor.example.com/v2/hub-proxy"]
//!   override_path = true                       # repositories under hub-proxy/ on this host
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
    /// The repository namespace the registry's repositories are found under on this host:
    /// `override_path` with a `/v2/NAMESPACE` URL (Harbor's proxy cache projects), so
    /// `library/app` is asked for as `NAMESPACE/library/app`.
    pub namespace: Option<String>,
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

/// A host URL: its `host[:port]`, whether it is plain HTTP, and with `override_path` the
/// repository namespace its `/v2/NAMESPACE` path names.
struct HostUrl {
    host: String,
    plain_http: bool,
    namespace: Option<String>,
}

fn parse_url(
    url: &str,
    override_path: bool,
    fail: &dyn Fn(String) -> HostsError,
) -> Result<HostUrl, HostsError> {
    let (plain, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (false, rest)
    } else {
        (is_loopback(url), url)
    };
    let rest = rest.trim_end_matches('/');
    let (host, path) = match rest.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (rest, None),
    };
    if host.is_empty() {
        return Err(fail(format!("{url:?} is not SCHEME://HOST[:PORT]")));
    }
    let namespace = match (path, override_path) {
        (None, _) | (Some("v2"), true) => None,
        (Some(path), true) => match path.strip_prefix("v2/") {
            Some(namespace)
                if !namespace.is_empty()
                    && namespace.split('/').all(|part| {
                        !part.is_empty()
                            && part.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                            })
                    }) =>
            {
                Some(namespace.to_string())
            }
            _ => {
                return Err(fail(format!(
                    "{url:?}: with override_path, the path must be /v2/NAMESPACE (a repository \
                     namespace on that registry, as a Harbor proxy cache project); other API \
                     roots are not supported"
                )))
            }
        },
        (Some(_), false) => {
            return Err(fail(format!(
                "{url:?} is not SCHEME://HOST[:PORT]; a path needs override_path = true and \
                 the form /v2/NAMESPACE"
            )))
        }
    };
    Ok(HostUrl {
        host: host.to_string(),
        plain_http: plain,
        namespace,
    })
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
        namespace: None,
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
        if !entry.header.is_empty() {
            return Err(fail(format!(
                "host {url}: header is not supported (give the host what it needs in its own \
                 configuration)"
            )));
        }
        let parsed = parse_url(url, entry.override_path, &fail)?;
        out.push(Endpoint {
            host: parsed.host,
            plain_http: parsed.plain_http,
            ca: entry.ca.clone(),
            skip_verify: entry.skip_verify,
            capabilities: capabilities(&entry.capabilities, &fail)?,
            mirror: true,
            namespace: parsed.namespace,
        });
    }
    let (host, plain_http) = match &file.server {
        Some(server) => {
            let parsed = parse_url(server, false, &fail)?;
            (parsed.host, parsed.plain_http)
        }
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
    fn override_path_names_a_repository_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let write = |text: &str| {
            std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
            std::fs::write(dir.path().join("docker.io/hosts.toml"), text).unwrap();
            endpoints(Some(dir.path()), "docker.io")
        };
        let got =
            write("[host.\"https://harbor.example.com/v2/hub-proxy\"]\n  override_path = true\n")
                .unwrap();
        assert_eq!(got[0].host, "harbor.example.com");
        assert_eq!(got[0].namespace.as_deref(), Some("hub-proxy"));
        assert_eq!(got[1].namespace, None);
        for refused in [
            // A path without override_path, another API root, an empty namespace.
            "[host.\"https://m.example.com/v2/p\"]\n",
            "[host.\"https://m.example.com/api/v3\"]\n  override_path = true\n",
            "[host.\"https://m.example.com/v2//x\"]\n  override_path = true\n",
        ] {
            let err = write(refused).unwrap_err().to_string();
            assert!(err.contains("/v2/NAMESPACE"), "{refused}: {err}");
        }
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
