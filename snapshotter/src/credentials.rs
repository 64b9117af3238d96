//! Registry credentials from docker's `config.json`, as docker and containerd's tooling read
//! them: `auths` entries (base64 `user:password`, or `username`/`password`), and credential
//! helpers (`credHelpers` per registry, `credsStore` for all) run as
//! `docker-credential-NAME get` with the registry on standard input. Secrets are handed to the
//! registry client and never logged.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use oci_client::secrets::RegistryAuth;

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The config file could not be read or parsed.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} for {registry}: {reason}")]
    Helper {
        /// The helper's name.
        helper: String,
        /// The registry asked for.
        registry: String,
        /// Why.
        reason: String,
    },
}

#[derive(Default, serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Shows which fields are set, never their values: a debug print or log line must not carry a
/// password or token.
impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |field: &Option<String>| {
            if field.is_some() {
                "<redacted>"
            } else {
                "<unset>"
            }
        };
        f.debug_struct("AuthEntry")
            .field("auth", &set(&self.auth))
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("identitytoken", &set(&self.identitytoken))
            .finish()
    }
}

/// A parsed `config.json`. Its `Debug` redacts secrets (see `AuthEntry`).
#[derive(Debug, Default, serde::Deserialize)]
pub struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(skip)]
    path: PathBuf,
}

/// Where docker keeps its config: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// Docker's config from `path`, or from the default location; empty when there is none.
pub fn load_config(path: Option<&Path>) -> Result<DockerConfig, CredentialsError> {
    match path.map(Path::to_path_buf).or_else(default_path) {
        Some(path) => DockerConfig::load(&path),
        None => Ok(DockerConfig::default()),
    }
}

/// containerd's conventional hosts directory, if this machine has one.
pub fn default_hosts_dir() -> Option<PathBuf> {
    Some(PathBuf::from("/etc/containerd/certs.d")).filter(|dir| dir.is_dir())
}

/// `auths` keys come as `host`, `host:port`, `https://host/v1/`...: compare hosts only.
fn normalize(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

impl DockerConfig {
    /// Reads `path`; a missing file is an empty config (anonymous access).
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let fail = |reason: String| CredentialsError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig::default())
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let mut config: DockerConfig =
            serde_json::from_str(&text).map_err(|e| fail(format!("not a docker config: {e}")))?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// The credentials for `registry` (`host[:port]`), anonymous if none are configured.
    pub fn auth_for(&self, registry: &str) -> Result<RegistryAuth, CredentialsError> {
        if let Some(helper) = self
            .cred_helpers
            .get(registry)
            .or(self.creds_store.as_ref())
        {
            if let Some(auth) = run_helper(helper, registry)? {
                return Ok(auth);
            }
        }
        let Some(entry) = self
            .auths
            .iter()
            .find(|(key, _)| normalize(key) == registry)
            .map(|(_, e)| e)
        else {
            return Ok(RegistryAuth::Anonymous);
        };
        if let Some(token) = &entry.identitytoken {
            return Ok(RegistryAuth::Bearer(token.clone()));
        }
        if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
        }
        let fail = |reason: &str| CredentialsError::Config {
            path: self.path.clone(),
            reason: format!("auths entry for {registry}: {reason}"),
        };
        let encoded = entry
            .auth
            .as_deref()
            .ok_or_else(|| fail("has neither auth nor username/password"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| fail("auth is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| fail("auth is not UTF-8"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| fail("auth is not user:password"))?;
        Ok(RegistryAuth::Basic(user.to_string(), password.to_string()))
    }
}

/// Runs `docker-credential-NAME get`; `None` when the helper has no credentials for `registry`.
fn run_helper(helper: &str, registry: &str) -> Result<Option<RegistryAuth>, CredentialsError> {
    let fail = |reason: String| CredentialsError::Helper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        reason,
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(registry.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // The helper protocol's answer when it holds nothing for this registry.
        if message.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("exited with {}: {message}", out.status)));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let answer: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|_| fail("answered something that is not {Username, Secret}".into()))?;
    // `<token>` as user name means the secret is an identity token.
    if answer.username == "<token>" {
        return Ok(Some(RegistryAuth::Bearer(answer.secret)));
    }
    Ok(Some(RegistryAuth::Basic(answer.username, answer.secret)))
}

/// Registry credentials that came with image pulls: what the kubelet gave containerd's CRI
/// for a pull (an imagePullSecret), taken by sealfs's CRI image service proxy
/// ([`crate::cri_proxy`]), which containerd never passes to a snapshotter. In memory only
/// (zeroized when replaced or dropped), the newest for each registry host: a later pull with
/// new credentials (a rotated secret, a refreshed token) replaces the old ones.
#[derive(Default)]
pub struct PullCredentials {
    by_host: std::sync::Mutex<HashMap<String, (u64, PullAuth)>>,
    /// Numbers the remembered credentials, so an undo replaces only its own.
    generation: std::sync::atomic::AtomicU64,
}

/// Credentials remembered for a pull still running: [`PullCredentials::undo`] puts the ones
/// before back if that pull fails (a wrong secret must not displace a working one).
#[must_use = "undo the credentials if the pull fails"]
pub struct Remembered {
    host: String,
    generation: u64,
    previous: Option<(u64, PullAuth)>,
}

/// One host's pull credentials, zeroized on drop.
enum PullAuth {
    Basic(zeroize::Zeroizing<String>, zeroize::Zeroizing<String>),
    Bearer(zeroize::Zeroizing<String>),
}

impl PullCredentials {
    /// Remembers `auth` for `host` (a registry host as references name it, `HOST[:PORT]`),
    /// replacing what was there; anonymous credentials are not remembered (`None`).
    pub fn remember(&self, host: &str, auth: RegistryAuth) -> Option<Remembered> {
        let auth = match auth {
            RegistryAuth::Basic(user, password) => PullAuth::Basic(user.into(), password.into()),
            RegistryAuth::Bearer(token) => PullAuth::Bearer(token.into()),
            RegistryAuth::Anonymous => return None,
        };
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let host = normalize(host).to_string();
        let mut hosts = self.by_host.lock().expect("pull credentials lock");
        let previous = hosts.insert(host.clone(), (generation, auth));
        Some(Remembered {
            host,
            generation,
            previous,
        })
    }

    /// Puts back what `remembered` replaced, unless a later pull has replaced it since.
    pub fn undo(&self, remembered: Remembered) {
        let mut hosts = self.by_host.lock().expect("pull credentials lock");
        if hosts.get(&remembered.host).map(|(g, _)| *g) != Some(remembered.generation) {
            return;
        }
        match remembered.previous {
            Some(previous) => hosts.insert(remembered.host, previous),
            None => hosts.remove(&remembered.host),
        };
    }

    /// The newest credentials a pull brought for `host`.
    pub fn get(&self, host: &str) -> Option<RegistryAuth> {
        self.get_numbered(host).map(|(_, auth)| auth)
    }

    /// Like [`get`](Self::get), with a number that changes whenever they are replaced (a
    /// client caching tokens made from them must start afresh then).
    pub fn get_numbered(&self, host: &str) -> Option<(u64, RegistryAuth)> {
        let hosts = self.by_host.lock().expect("pull credentials lock");
        hosts.get(normalize(host)).map(|(generation, auth)| {
            (
                *generation,
                match auth {
                    PullAuth::Basic(user, password) => {
                        RegistryAuth::Basic(user.to_string(), password.to_string())
                    }
                    PullAuth::Bearer(token) => RegistryAuth::Bearer(token.to_string()),
                },
            )
        })
    }
}

/// Names the hosts, never the credentials.
impl std::fmt::Debug for PullCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts = self.by_host.lock().expect("pull credentials lock");
        f.debug_struct("PullCredentials")
            .field("hosts", &hosts.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The credentials of a CRI `AuthConfig` (the kubelet's, from an imagePullSecret): a registry
/// or identity token, a user and password, or `auth` (base64 `user:password`); `None` when
/// it carries none.
pub fn from_cri_auth(
    username: &str,
    password: &str,
    auth: &str,
    identity_token: &str,
    registry_token: &str,
) -> Option<RegistryAuth> {
    if !registry_token.is_empty() {
        return Some(RegistryAuth::Bearer(registry_token.to_string()));
    }
    if !identity_token.is_empty() {
        return Some(RegistryAuth::Bearer(identity_token.to_string()));
    }
    if !username.is_empty() {
        return Some(RegistryAuth::Basic(
            username.to_string(),
            password.to_string(),
        ));
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()?,
    );
    let text = std::str::from_utf8(&decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(RegistryAuth::Basic(user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(auth: RegistryAuth) -> (String, String) {
        match auth {
            RegistryAuth::Basic(user, password) => (user, password),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    #[test]
    fn auths_entries_in_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths": {{"https://reg.example.com/v1/": {{"auth": "{encoded}"}}, "127.0.0.1:5000": {{"username": "bob", "password": "pw"}}}}}}"#),
        )
        .unwrap();
        let config = DockerConfig::load(&path).unwrap();
        assert_eq!(
            basic(config.auth_for("reg.example.com").unwrap()),
            ("alice".into(), "s3cret".into())
        );
        assert_eq!(
            basic(config.auth_for("127.0.0.1:5000").unwrap()),
            ("bob".into(), "pw".into())
        );
        assert!(matches!(
            config.auth_for("other.example.com").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            DockerConfig::load(&dir.path().join("missing.json"))
                .unwrap()
                .auth_for("x")
                .unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::write(&path, "not json").unwrap();
        assert!(DockerConfig::load(&path)
            .unwrap_err()
            .to_string()
            .contains("not a docker config"));
    }

    #[test]
    fn credential_helpers_speak_the_docker_protocol() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A real helper program: reads the registry on stdin, answers as docker's helpers do.
        let helper = dir.path().join("docker-credential-sealfstest");
        let script = r#"#!/bin/sh
read host
case "$host" in
  reg.example.com) echo '{"Username":"carol","Secret":"pw"}' ;;
  tok.example.com) echo '{"Username":"<token>","Secret":"refresh"}' ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"#;
        std::fs::write(&helper, script).unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("config.json");
        let config =
            r#"{"credsStore": "sealfstest", "credHelpers": {"tok.example.com": "sealfstest"}}"#;
        std::fs::write(&path, config).unwrap();
        let config = DockerConfig::load(&path).unwrap();
        // Helpers are found on PATH; no other test in this binary runs programs.
        let old_path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.path().to_path_buf()];
        paths.extend(std::env::split_paths(&old_path));
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        let carol = config.auth_for("reg.example.com");
        let token = config.auth_for("tok.example.com");
        let none = config.auth_for("other.example.com");
        std::env::set_var("PATH", old_path);
        assert_eq!(basic(carol.unwrap()), ("carol".into(), "pw".into()));
        assert!(matches!(token.unwrap(), RegistryAuth::Bearer(t) if t == "refresh"));
        assert!(matches!(none.unwrap(), RegistryAuth::Anonymous));
    }

    #[test]
    fn debug_output_names_fields_but_never_shows_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {"reg.example.com": {"auth": "YWxpY2U6c2VjcmV0MQ==", "username": "alice", "password": "secret2", "identitytoken": "secret3"}}}"#,
        )
        .unwrap();
        let config = DockerConfig::load(&path).unwrap();
        let shown = format!("{config:?} {config:#?}");
        for secret in ["YWxpY2U6c2VjcmV0MQ==", "secret2", "secret3"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn pull_credentials_keep_the_newest_per_host_and_never_print() {
        let store = PullCredentials::default();
        assert!(store.get("reg.example.com").is_none());
        let first = store.remember(
            "reg.example.com",
            RegistryAuth::Basic("u".into(), "old".into()),
        );
        let second = store
            .remember(
                "https://reg.example.com/v2/",
                RegistryAuth::Basic("u".into(), "new".into()),
            )
            .unwrap();
        assert!(store
            .remember("other.example.com", RegistryAuth::Anonymous)
            .is_none());
        assert_eq!(
            basic(store.get("reg.example.com").unwrap()),
            ("u".into(), "new".into())
        );
        assert!(store.get("other.example.com").is_none());
        // A failed pull puts back the credentials it displaced...
        store.undo(second);
        assert_eq!(
            basic(store.get("reg.example.com").unwrap()),
            ("u".into(), "old".into())
        );
        // ...but not over newer ones, and the first pull's undo leaves nothing.
        let third = store
            .remember("reg.example.com", RegistryAuth::Bearer("t".into()))
            .unwrap();
        store.undo(first.unwrap());
        assert!(matches!(
            store.get("reg.example.com"),
            Some(RegistryAuth::Bearer(_))
        ));
        store.undo(third);
        assert_eq!(
            basic(store.get("reg.example.com").unwrap()),
            ("u".into(), "old".into())
        );
        let shown = format!("{store:?}");
        assert!(
            shown.contains("reg.example.com") && !shown.contains("new"),
            "{shown}"
        );

        let b64 = base64::engine::general_purpose::STANDARD.encode("carol:pw");
        assert_eq!(
            basic(from_cri_auth("", "", &b64, "", "").unwrap()),
            ("carol".into(), "pw".into())
        );
        assert!(
            matches!(from_cri_auth("u", "p", "", "", "tok"), Some(RegistryAuth::Bearer(t)) if t == "tok")
        );
        assert_eq!(
            basic(from_cri_auth("u", "p", "", "", "").unwrap()),
            ("u".into(), "p".into())
        );
        assert!(from_cri_auth("", "", "", "", "").is_none());
    }
}
