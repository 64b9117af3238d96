//! Layer keys wrapped and unwrapped by a keyprovider: ocicrypt's protocol, which KMS plugins
//! and Confidential Containers' attestation agent speak. The configuration is ocicrypt's own
//! (`OCICRYPT_KEYPROVIDER_CONFIG`, JSON: `{"key-providers": {NAME: {"cmd": {"path", "args"}} |
//! {"grpc": "HOST:PORT" | "unix:///PATH"}}}`), so one file serves sealfs and the ocicrypt
//! tools of a node.
//!
//! A provider is a [`Recipient`] (`sealctl seal --recipient provider:NAME[:ARGS]`) and an
//! [`Identity`] (the daemon, when no local key fits): what it answers to `keywrap` travels in
//! a keyprovider stanza ([`fsformat::keywrap`]); `keyunwrap` gives the layer key back. Every
//! call is bounded: one deadline for the whole call with its retries, answers of at most
//! [`MAX_ANSWER`] bytes. Keys are held in zeroizing buffers and never logged or written.

mod call;
mod grpc;
mod protocol;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fsformat::keywrap::check_provider_name;
use fsformat::{FormatError, Identity, LayerKey, Recipient, Stanza};
use serde::Deserialize;

use crate::latency::LatencyHistogram;

/// The environment variable ocicrypt reads its keyprovider configuration from.
pub const CONFIG_ENV: &str = "OCICRYPT_KEYPROVIDER_CONFIG";

/// Largest answer read from a provider: a wrapped key and its JSON framing are a few KiB.
pub const MAX_ANSWER: usize = 64 << 10;

/// How a provider is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// A program given the request on stdin, answering on stdout.
    Command {
        /// The program.
        path: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
    /// A gRPC `keyprovider.KeyProviderService`: `HOST:PORT` or `unix:///PATH`.
    Grpc(String),
}

/// Deadline and retries of provider calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// The whole call, retries included.
    pub timeout: Duration,
    /// Further attempts after a provider could not be reached (never after it answered).
    pub retries: u32,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            timeout: Duration::from_secs(10),
            retries: 2,
        }
    }
}

/// Counts of a provider's calls, for metrics.
#[derive(Debug, Default)]
pub struct ProviderStats {
    /// Keys it unwrapped.
    pub unwrapped: std::sync::atomic::AtomicU64,
    /// Calls that failed: unreachable, too slow, refused, or an answer that is not a key.
    pub failed: std::sync::atomic::AtomicU64,
    /// How long its unwrap calls took, failed ones included (a KMS slowing down shows here
    /// before its calls start to fail).
    pub unwrap_latency: LatencyHistogram,
}

/// One configured keyprovider.
#[derive(Debug)]
pub struct Provider {
    name: String,
    invocation: Invocation,
    limits: CallLimits,
    /// Its calls so far.
    pub stats: ProviderStats,
}

/// Why the keyprovider configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    /// The file could not be read.
    #[error("cannot read keyprovider config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not ocicrypt's keyprovider JSON.
    #[error("keyprovider config {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A recipient names a provider the configuration does not have.
    #[error("no keyprovider {name} in {where_}; configured: [{configured}]")]
    Unknown {
        /// The name asked for.
        name: String,
        /// Where the configuration came from.
        where_: String,
        /// The names it has.
        configured: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "key-providers", default)]
    key_providers: BTreeMap<String, ProviderEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEntry {
    cmd: Option<CommandEntry>,
    grpc: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandEntry {
    path: PathBuf,
    #[serde(default)]
    args: Vec<String>,
}

/// How a provider is named where keys are (`provider:NAME`): in recipients, errors, key access
/// rules and what opened a layer.
pub const LABEL_PREFIX: &str = "provider:";

/// The providers of one configuration file, by name.
#[derive(Clone, Debug, Default)]
pub struct KeyProviders {
    providers: BTreeMap<String, Arc<Provider>>,
    source: String,
}

impl KeyProviders {
    /// Reads ocicrypt's keyprovider configuration from `path`.
    pub fn load(path: &Path, limits: CallLimits) -> Result<Self, ProviderConfigError> {
        let text = std::fs::read(path).map_err(|source| ProviderConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ProviderConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file: ConfigFile = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let mut providers = BTreeMap::new();
        for (name, entry) in file.key_providers {
            check_provider_name(&name).map_err(|e| invalid(e.to_string()))?;
            let invocation = match (entry.cmd, entry.grpc) {
                (Some(cmd), None) => {
                    if !cmd.path.is_absolute() {
                        return Err(invalid(format!(
                            "{name}: cmd path {} is not absolute",
                            cmd.path.display()
                        )));
                    }
                    Invocation::Command {
                        path: cmd.path,
                        args: cmd.args,
                    }
                }
                (None, Some(address)) if !address.is_empty() => Invocation::Grpc(address),
                _ => {
                    return Err(invalid(format!(
                        "{name}: give exactly one of \"cmd\" and \"grpc\""
                    )))
                }
            };
            providers.insert(
                name.clone(),
                Arc::new(Provider {
                    name,
                    invocation,
                    limits,
                    stats: ProviderStats::default(),
                }),
            );
        }
        Ok(KeyProviders {
            providers,
            source: path.display().to_string(),
        })
    }

    /// The configuration `OCICRYPT_KEYPROVIDER_CONFIG` names, as ocicrypt finds it; none when
    /// it is unset.
    pub fn from_env(limits: CallLimits) -> Result<Self, ProviderConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) if !path.is_empty() => Self::load(Path::new(&path), limits),
            _ => Ok(KeyProviders {
                providers: BTreeMap::new(),
                source: format!("${CONFIG_ENV} (unset)"),
            }),
        }
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Provider>, ProviderConfigError> {
        self.providers
            .get(name)
            .cloned()
            .ok_or_else(|| ProviderConfigError::Unknown {
                name: name.to_string(),
                where_: self.source.clone(),
                configured: self.names().join(", "),
            })
    }

    /// The configured names.
    pub fn names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// Every configured provider.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values()
    }

    /// A recipient from `NAME[:ARGS]` (what follows `provider:`, as ocicrypt parses it).
    pub fn recipient(&self, spec: &str) -> Result<ProviderRecipient, ProviderConfigError> {
        let (name, args) = match spec.split_once(':') {
            Some((name, args)) => (name, Some(args.to_string())),
            None => (spec, None),
        };
        Ok(ProviderRecipient {
            provider: self.get(name)?,
            args,
        })
    }
}

impl Provider {
    /// A provider reached by `invocation` (configurations are usually read with
    /// [`KeyProviders::load`]).
    pub fn new(name: &str, invocation: Invocation, limits: CallLimits) -> fsformat::Result<Self> {
        check_provider_name(name)?;
        Ok(Provider {
            name: name.to_string(),
            invocation,
            limits,
            stats: ProviderStats::default(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn failed(&self, reason: impl std::fmt::Display) -> FormatError {
        FormatError::KeyProvider {
            provider: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Asks the provider to wrap `key`; `args` are the recipient's parameters.
    pub fn wrap_bytes(&self, args: Option<&str>, key: &[u8]) -> fsformat::Result<Vec<u8>> {
        let request = protocol::wrap_request(&self.name, args, key);
        let answer =
            call::call(self, call::Operation::Wrap, &request).map_err(|e| self.failed(e))?;
        let mut output: protocol::Output = serde_json::from_slice(&answer).map_err(|e| {
            self.failed(format!(
                "its keywrap answer is not the protocol's JSON: {e}"
            ))
        })?;
        output
            .keywrapresults
            .annotation
            .take()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| self.failed("its keywrap answer holds no annotation"))
    }

    /// Asks the provider to unwrap what it answered to `keywrap`.
    pub fn unwrap_bytes(&self, wrapped: &[u8]) -> fsformat::Result<zeroize::Zeroizing<Vec<u8>>> {
        let request = protocol::unwrap_request(&self.name, wrapped);
        let answer =
            call::call(self, call::Operation::Unwrap, &request).map_err(|e| self.failed(e))?;
        let mut output: protocol::Output = serde_json::from_slice(&answer).map_err(|_| {
            // serde's message could quote the answer, which holds the key: not repeated.
            self.failed("its keyunwrap answer is not the protocol's JSON")
        })?;
        output
            .keyunwrapresults
            .optsdata
            .take()
            .map(zeroize::Zeroizing::new)
            .ok_or_else(|| self.failed("its keyunwrap answer holds no key"))
    }
}

impl Identity for Provider {
    fn label(&self) -> String {
        format!("{LABEL_PREFIX}{}", self.name)
    }

    fn unwrap(&self, stanza: &Stanza) -> Option<fsformat::Result<LayerKey>> {
        let (name, wrapped) = stanza.provider()?;
        if name != self.name {
            return None;
        }
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        let unwrapped = self.unwrap_bytes(wrapped).and_then(|key| {
            let bytes: [u8; 32] = key.as_slice().try_into().map_err(|_| {
                self.failed(format!(
                    "it unwrapped {} bytes, not a 32-byte sealfs layer key (was this stanza wrapped by another provider of that name?)",
                    key.len()
                ))
            })?;
            Ok(LayerKey::from_bytes(bytes))
        });
        let counter = match &unwrapped {
            Ok(_) => &self.stats.unwrapped,
            Err(_) => &self.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.stats.unwrap_latency.observe(started.elapsed());
        Some(unwrapped)
    }
}

/// A layer key recipient through a keyprovider: `provider:NAME[:ARGS]`.
#[derive(Clone, Debug)]
pub struct ProviderRecipient {
    provider: Arc<Provider>,
    args: Option<String>,
}

impl ProviderRecipient {
    /// The provider.
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }
}

impl Recipient for ProviderRecipient {
    fn label(&self) -> String {
        self.provider.label()
    }

    fn wrap(&self, key: &LayerKey) -> fsformat::Result<Vec<Stanza>> {
        let wrapped = self
            .provider
            .wrap_bytes(self.args.as_deref(), key.expose_bytes())?;
        Ok(vec![Stanza::for_provider(&self.provider.name, &wrapped)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn reads_ocicrypt_configuration() {
        let file = write(
            r#"{"key-providers": {
                "kms": {"cmd": {"path": "/usr/bin/kms", "args": ["-x"]}},
                "attestation-agent": {"grpc": "127.0.0.1:50000"}}}"#,
        );
        let providers = KeyProviders::load(file.path(), CallLimits::default()).unwrap();
        assert_eq!(providers.names(), ["attestation-agent", "kms"]);
        assert_eq!(
            providers.get("kms").unwrap().invocation,
            Invocation::Command {
                path: "/usr/bin/kms".into(),
                args: vec!["-x".into()]
            }
        );
        let recipient = providers.recipient("attestation-agent:some args").unwrap();
        assert_eq!(recipient.args.as_deref(), Some("some args"));
        let err = providers.recipient("vault").unwrap_err().to_string();
        assert!(
            err.contains("no keyprovider vault") && err.contains("kms"),
            "{err}"
        );

        for bad in [
            r#"{"key-providers": {"kms": {}}}"#,
            r#"{"key-providers": {"kms": {"cmd": {"path": "kms"}}}}"#,
            r#"{"key-providers": {"k m s": {"grpc": "x:1"}}}"#,
            r#"{"key-providers": {"kms": {"grpc": "x:1", "cmd": {"path": "/k"}}}}"#,
            r#"{"keyproviders": {}}"#,
        ] {
            let file = write(bad);
            assert!(
                KeyProviders::load(file.path(), CallLimits::default()).is_err(),
                "{bad}"
            );
        }
    }
}
