//! The daemon's configuration file (TOML; every option in docs/configuration.md). Units are
//! part of the option names (`_mib`, `_secs`), so a value never needs a unit parser. Unknown
//! options are errors: a misspelt option silently ignored is a setting silently not applied.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::fetcher::{FetchConfig, PoolConfig};
use crate::mount::MountOptions;
use crate::node_session::SessionKeeping;
use crate::registry::RegistryOptions;
use crate::remote::RemoteConfig;

/// Where the daemon looks for its configuration when not told.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sealfs/config.toml";

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Snapshots, their caches and the state database.
    pub root: PathBuf,
    /// The gRPC socket containerd connects to.
    pub socket: PathBuf,
    /// The node's private keys and key shares (`shares/`).
    pub keys_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter); `SEALFS_LOG`
    /// overrides it.
    pub log_level: String,
    /// `HOST:PORT` serving Prometheus metrics at `/metrics`; empty: no metrics server.
    pub metrics_address: String,
    /// Caches.
    pub cache: CacheConfig,
    /// Fetching.
    pub fetch: FetchSection,
    /// Registries.
    pub registry: RegistrySection,
    /// The CRI image service proxy (imagePullSecrets).
    pub cri: CriSection,
    /// Which images must be signed, by whom (cosign).
    pub signatures: SignaturesSection,
    /// Keyproviders (ocicrypt's protocol: a KMS, an attestation agent) that unwrap layer keys.
    pub keyproviders: KeyProvidersSection,
    /// Which workloads (containerd namespace, image scope) each key may open layers for.
    pub key_access: Vec<KeyAccessEntry>,
}

/// `[keyproviders]`: unwrapping layer keys through ocicrypt's keyprovider protocol when no
/// private key in `keys_dir` fits (see docs/kubernetes.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeyProvidersSection {
    /// ocicrypt's keyprovider configuration (JSON, `{"key-providers": {...}}`); empty:
    /// `$OCICRYPT_KEYPROVIDER_CONFIG` if set, else no providers.
    pub config: PathBuf,
    /// Deadline of one provider call, its retries included (seconds).
    pub timeout_secs: u64,
    /// Further attempts when a gRPC provider cannot be reached.
    pub retries: u32,
}

impl Default for KeyProvidersSection {
    fn default() -> Self {
        let limits = crate::keyprovider::CallLimits::default();
        KeyProvidersSection {
            config: PathBuf::new(),
            timeout_secs: limits.timeout.as_secs(),
            retries: limits.retries,
        }
    }
}

/// `[[key_access]]`: a key that opens layers only for some workloads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyAccessEntry {
    /// A private key's id (16 hex digits) or `provider:NAME`.
    pub key: String,
    /// containerd namespaces (`"*"`: any).
    pub namespaces: Vec<String>,
    /// Image scopes (`HOST`, `HOST/NAMESPACE`, `HOST/REPO`); empty: any image.
    #[serde(default)]
    pub images: Vec<String>,
}

/// `[signatures]`: the images whose sealed layers may be opened only if a trusted key signed
/// their manifest (see docs/signatures.md).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SignaturesSection {
    /// For images no rule's scope matches.
    pub default: SignatureRequirement,
    /// Public key files (cosign's `cosign.pub`) for `default = "require"`.
    pub keys: Vec<PathBuf>,
    /// Hold layers that are not sealed to the policy too, when their Prepare names the image
    /// (CRI, `ctr-remote`, `sealctl pull`); a Prepare without labels cannot be checked.
    pub unsealed: bool,
    /// Requirements by repository scope, the most specific first.
    pub rule: Vec<SignatureRule>,
}

/// Whether a signature is required.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SignatureRequirement {
    /// No check.
    #[default]
    Off,
    /// A signature by one of the keys.
    Require,
}

/// `[[signatures.rule]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SignatureRule {
    /// `HOST`, `HOST/NAMESPACE` or `HOST/REPO` (whole path components).
    pub scope: String,
    /// `require` or `off`.
    pub policy: SignatureRequirement,
    /// Public key files, at least one for `require`.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
}

/// `[cri]`: the CRI image service proxy that takes the credentials of the kubelet's pulls
/// (imagePullSecrets) for sealfs's own registry reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CriSection {
    /// Where the proxy serves CRI's image service (the kubelet's `--image-service-endpoint`);
    /// empty: no proxy.
    pub image_proxy_socket: PathBuf,
    /// containerd's socket: where the proxy forwards CRI, and where the daemon reads the
    /// manifests of images being pulled from containerd's content store (empty: it does not).
    pub containerd_socket: PathBuf,
}

impl Default for CriSection {
    fn default() -> Self {
        CriSection {
            image_proxy_socket: PathBuf::new(),
            containerd_socket: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

/// `[cache]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Decrypted chunks kept in memory, shared by all layers (MiB).
    pub memory_mib: u64,
    /// Sealed chunks kept on disk per layer (MiB).
    pub disk_per_layer_mib: u64,
}

/// `[fetch]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSection {
    /// Fetch every layer in full in the background after mounting it.
    pub background: bool,
    /// Fetch threads of the node, shared by every layer.
    pub threads: usize,
    /// FUSE request threads of the node, shared by every layer.
    pub fuse_threads: usize,
    /// Whether a restarted daemon has the kernel resend the requests the stopped one had read
    /// (`FUSE_NOTIFY_RESEND`, where the kernel has it); off, they fail (`ECONNABORTED`), and
    /// the kernel itself repeats only page-cache reads.
    pub fuse_resend: bool,
    /// Background range requests in flight at once, node-wide.
    pub background_streams: usize,
    /// Plaintext read ahead with a chunk missed right after a present one, in the same range
    /// read (KiB); 0: off.
    pub readahead_kib: u64,
    /// How long the background fetch waits after a layer is mounted, for the container that
    /// mounted it to start reading (milliseconds).
    pub background_after_mount_ms: u64,
    /// Largest merged range request of the background and profile fetches (KiB).
    pub merge_kib: u64,
    /// Bandwidth cap of the node's background fetch (MiB/s); 0: none.
    pub background_mib_per_sec: u64,
    /// How long a read waits for its chunk before failing with EIO (seconds).
    pub read_timeout_secs: u64,
    /// Fetch a layer's startup profile first, right after it is mounted.
    pub profile: bool,
    /// Range requests in flight while a profile is fetched.
    pub profile_streams: usize,
    /// How long Prepare waits for a mounted layer's profile (milliseconds); 0: not at all.
    pub profile_wait_ms: u64,
    /// Largest index a layer may have, compressed (its tail) or decompressed (MiB): a layer
    /// over it is refused before its index is fetched or decompressed.
    pub max_index_mib: u64,
}

/// `[registry]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// containerd-style hosts directory (`DIR/HOST/hosts.toml`): mirrors, CAs.
    pub hosts_dir: PathBuf,
    /// docker `config.json` with credentials; empty: `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: PathBuf,
    /// Registries (`HOST:PORT`) reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Deadline of one registry request (seconds).
    pub request_timeout_secs: u64,
    /// Retries of a failed request, with exponential backoff.
    pub retries: u32,
    /// How long a range read waits for a pull-through mirror still fetching the blob before
    /// it reads from the next endpoint (seconds; 0: at once).
    pub mirror_fill_wait_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/sealfs"),
            socket: PathBuf::from("/run/sealfs/sealfs.sock"),
            keys_dir: PathBuf::from("/etc/sealfs/keys"),
            log_level: "info".into(),
            metrics_address: "127.0.0.1:9369".into(),
            cache: CacheConfig::default(),
            fetch: FetchSection::default(),
            registry: RegistrySection::default(),
            cri: CriSection::default(),
            signatures: SignaturesSection::default(),
            keyproviders: KeyProvidersSection::default(),
            key_access: Vec::new(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_mib: 512,
            disk_per_layer_mib: MountOptions::default().disk_cache_bytes >> 20,
        }
    }
}

impl Default for FetchSection {
    fn default() -> Self {
        let fetch = FetchConfig::default();
        let pool = PoolConfig::default();
        FetchSection {
            background: fetch.background,
            threads: pool.threads,
            fuse_threads: MountOptions::default().fuse_threads,
            fuse_resend: MountOptions::default().fuse_resend,
            background_streams: pool.background_streams,
            background_after_mount_ms: pool.after_mount.as_millis() as u64,
            readahead_kib: fetch.readahead_bytes >> 10,
            merge_kib: fetch.merge_bytes >> 10,
            background_mib_per_sec: 0,
            read_timeout_secs: fetch.timeout.as_secs(),
            profile: fetch.profile,
            profile_streams: fetch.profile_streams,
            profile_wait_ms: 0,
            max_index_mib: crate::mount::DEFAULT_MAX_INDEX_BYTES >> 20,
        }
    }
}

impl Default for RegistrySection {
    fn default() -> Self {
        let registry = RegistryOptions::default();
        RegistrySection {
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            docker_config: PathBuf::new(),
            insecure: Vec::new(),
            request_timeout_secs: registry.request_timeout.as_secs(),
            retries: registry.retries,
            mirror_fill_wait_secs: registry.mirror_fill_wait.as_secs(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (line and column included).
        message: String,
    },
}

impl Config {
    /// Loads `path`, or the default path if it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path, message })
    }

    /// Parses and checks a configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let positive = [
            ("fetch.threads", config.fetch.threads as u64),
            ("fetch.fuse_threads", config.fetch.fuse_threads as u64),
            ("fetch.merge_kib", config.fetch.merge_kib),
            ("fetch.profile_streams", config.fetch.profile_streams as u64),
            ("fetch.read_timeout_secs", config.fetch.read_timeout_secs),
            ("fetch.max_index_mib", config.fetch.max_index_mib),
            (
                "registry.request_timeout_secs",
                config.registry.request_timeout_secs,
            ),
            ("cache.memory_mib", config.cache.memory_mib),
            (
                "keyproviders.timeout_secs",
                config.keyproviders.timeout_secs,
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if !config.socket.is_absolute() || !config.root.is_absolute() {
            return Err("root and socket must be absolute paths".into());
        }
        Ok(config)
    }

    /// The signature policy, its keys read: an unreadable key or a `require` without keys is
    /// an error here, at start, rather than a refusal of every image later.
    pub fn signature_policy(&self) -> Result<crate::signature::SignaturePolicy, String> {
        use crate::signature::{load_key, Requirement, SignaturePolicy};
        let requirement = |what: &str, kind: SignatureRequirement, keys: &[PathBuf]| match kind {
            SignatureRequirement::Off => Ok(Requirement::Off),
            SignatureRequirement::Require if keys.is_empty() => Err(format!(
                "signatures: {what} requires a signature but names no keys"
            )),
            SignatureRequirement::Require => Ok(Requirement::Require(
                keys.iter()
                    .map(|path| load_key(path))
                    .collect::<Result<_, _>>()
                    .map_err(|error| format!("signatures: {what}: {error}"))?,
            )),
        };
        let section = &self.signatures;
        let mut rules = Vec::new();
        for rule in &section.rule {
            if rule.scope.is_empty() || rule.scope.contains(char::is_whitespace) {
                return Err(format!(
                    "signatures: rule scope {:?} must be HOST[/PATH]",
                    rule.scope
                ));
            }
            let what = format!("the rule for {}", rule.scope);
            rules.push((
                rule.scope.clone(),
                requirement(&what, rule.policy, &rule.keys)?,
            ));
        }
        let default = requirement("the default", section.default, &section.keys)?;
        let mut policy = SignaturePolicy::new(rules, default);
        policy.unsealed = section.unsealed;
        Ok(policy)
    }

    /// The keyproviders: the configured file (or `$OCICRYPT_KEYPROVIDER_CONFIG`) read and
    /// checked at start.
    pub fn keyproviders(&self) -> Result<crate::keyprovider::KeyProviders, String> {
        use crate::keyprovider::{CallLimits, KeyProviders};
        let section = &self.keyproviders;
        let limits = CallLimits {
            timeout: Duration::from_secs(section.timeout_secs),
            retries: section.retries,
        };
        let loaded = if section.config.as_os_str().is_empty() {
            KeyProviders::from_env(limits)
        } else {
            KeyProviders::load(&section.config, limits)
        };
        loaded.map_err(|e| format!("keyproviders: {e}"))
    }

    /// The key access rules, checked.
    pub fn key_access(&self) -> Result<crate::key_access::KeyAccess, String> {
        crate::key_access::KeyAccess::new(
            self.key_access
                .iter()
                .map(|entry| crate::key_access::AccessRule {
                    key: entry.key.clone(),
                    namespaces: entry.namespaces.clone(),
                    images: entry.images.clone(),
                })
                .collect(),
        )
    }

    /// Where the node's FUSE session is mounted, every layer a directory in it.
    pub fn session_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// What remote layers need from the configuration.
    pub fn remote(&self) -> RemoteConfig {
        let fetch = &self.fetch;
        RemoteConfig {
            keys_dir: self.keys_dir.clone(),
            docker_config: (!self.registry.docker_config.as_os_str().is_empty())
                .then(|| self.registry.docker_config.clone()),
            registry: RegistryOptions {
                request_timeout: Duration::from_secs(self.registry.request_timeout_secs),
                retries: self.registry.retries,
                insecure: self.registry.insecure.clone(),
                hosts_dir: Some(self.registry.hosts_dir.clone()),
                mirror_fill_wait: Duration::from_secs(self.registry.mirror_fill_wait_secs),
                // The daemon sets it when it runs the CRI image proxy.
                pull_credentials: None,
                ..RegistryOptions::default()
            },
            mount: MountOptions {
                fetch: FetchConfig {
                    timeout: Duration::from_secs(fetch.read_timeout_secs),
                    background: fetch.background,
                    merge_bytes: fetch.merge_kib << 10,
                    profile: fetch.profile,
                    profile_streams: fetch.profile_streams,
                    readahead_bytes: fetch.readahead_kib << 10,
                },
                pool: PoolConfig {
                    threads: fetch.threads,
                    background_streams: fetch.background_streams,
                    after_mount: Duration::from_millis(fetch.background_after_mount_ms),
                    background_bytes_per_sec: (fetch.background_mib_per_sec > 0)
                        .then_some(fetch.background_mib_per_sec << 20),
                    ..PoolConfig::default()
                },
                fuse_threads: fetch.fuse_threads,
                fuse_resend: fetch.fuse_resend,
                cache_dir: None,
                disk_cache_bytes: self.cache.disk_per_layer_mib << 20,
                max_index_bytes: fetch.max_index_mib << 20,
                restrictions: crate::mount::MountRestrictions::default(),
            },
            profile_wait: Duration::from_millis(fetch.profile_wait_ms),
            // Set by the daemon from `signature_policy()`, `keyproviders()` and `key_access()`,
            // which read files and can fail.
            signatures: Default::default(),
            providers: Default::default(),
            key_access: Default::default(),
            // Set by the daemon, which has the runtime its requests run on.
            content_store: None,
            session_dir: self.session_dir(),
            keeping: Some(SessionKeeping {
                keeper: crate::session_keeper::Keeper::in_root(&self.root),
                program: PathBuf::from("/proc/self/exe"),
                log: self.root.join(crate::session_keeper::LOG_NAME),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.socket, PathBuf::from("/run/sealfs/sealfs.sock"));
        assert_eq!(config.remote().mount.fetch.merge_bytes, 4 << 20);
    }

    #[test]
    fn the_packaged_config_file_spells_out_the_defaults() {
        let packaged = Config::parse(include_str!("../packaging/config.toml")).unwrap();
        assert_eq!(packaged, Config::default());
    }

    #[test]
    fn a_signature_policy_is_refused_at_start_if_it_cannot_be_used() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("team.pub");
        std::fs::write(
            &key,
            "-----BEGIN PUBLIC KEY-----\n\
             MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEv1U/Fj8y4g/NEsoEaKC32lYUc07p\n\
             uGteCu0FUbqqS4zHSgxkx0CV6lr2T8TtGiPj9wx9zfTrOor/QCnIdwRerA==\n\
             -----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let with = |text: String| Config::parse(&text).unwrap().signature_policy();
        let policy = with(format!(
            "[signatures]\n[[signatures.rule]]\nscope = \"reg.io/team\"\npolicy = \"require\"\n\
             keys = [\"{}\"]\n",
            key.display()
        ))
        .unwrap();
        assert!(!policy.is_off());
        assert_eq!(policy.for_repository("reg.io/team/app").0, "reg.io/team");
        let error = with("[signatures]\ndefault = \"require\"\n".into()).unwrap_err();
        assert!(error.contains("names no keys"), "{error}");
        let error = with(format!(
            "[signatures]\ndefault = \"require\"\nkeys = [\"{}\"]\n",
            dir.path().join("missing.pub").display()
        ))
        .unwrap_err();
        assert!(error.contains("missing.pub"), "{error}");
        std::fs::write(&key, "not a key").unwrap();
        let error = with(format!(
            "[signatures]\ndefault = \"require\"\nkeys = [\"{}\"]\n",
            key.display()
        ))
        .unwrap_err();
        assert!(error.contains("team.pub"), "{error}");
        assert!(Config::default().signature_policy().unwrap().is_off());
    }

    #[test]
    fn options_are_read_and_misspellings_rejected() {
        let config = Config::parse(
            "root = \"/srv/sealfs\"\n[fetch]\nthreads = 16\nbackground_mib_per_sec = 20\n\
             [registry]\ninsecure = [\"reg.local:5000\"]\n",
        )
        .unwrap();
        assert_eq!(config.root, PathBuf::from("/srv/sealfs"));
        let remote = config.remote();
        assert_eq!(remote.mount.pool.threads, 16);
        assert_eq!(remote.mount.pool.background_bytes_per_sec, Some(20 << 20));
        assert_eq!(remote.registry.insecure, vec!["reg.local:5000".to_string()]);

        let error = Config::parse("[fetch]\nthread = 4\n").unwrap_err();
        assert!(error.contains("unknown field `thread`"), "{error}");
        let error = Config::parse("[fetch]\nthreads = 0\n").unwrap_err();
        assert!(
            error.contains("fetch.threads must be at least 1"),
            "{error}"
        );
        let error = Config::parse("socket = \"relative.sock\"\n").unwrap_err();
        assert!(error.contains("absolute"), "{error}");
    }

    #[test]
    fn keyproviders_and_key_access_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let providers = dir.path().join("providers.json");
        std::fs::write(
            &providers,
            r#"{"key-providers": {"kms": {"grpc": "127.0.0.1:50000"}}}"#,
        )
        .unwrap();
        let config = Config::parse(&format!(
            "[keyproviders]\nconfig = \"{}\"\ntimeout_secs = 5\n\n\
             [[key_access]]\nkey = \"provider:kms\"\nnamespaces = [\"k8s.io\"]\n",
            providers.display()
        ))
        .unwrap();
        assert_eq!(config.keyproviders().unwrap().names(), ["kms"]);
        assert!(config.key_access().unwrap().restricts("provider:kms"));

        let missing = Config::parse("[keyproviders]\nconfig = \"/nonexistent/p.json\"\n").unwrap();
        let error = missing.keyproviders().unwrap_err();
        assert!(error.contains("/nonexistent/p.json"), "{error}");
        let bad_rule =
            Config::parse("[[key_access]]\nkey = \"kms\"\nnamespaces = [\"a\"]\n").unwrap();
        let error = bad_rule.key_access().unwrap_err();
        assert!(error.contains("provider:NAME"), "{error}");
        let error = Config::parse("[[key_access]]\nkey = \"provider:kms\"\n").unwrap_err();
        assert!(error.contains("namespaces"), "{error}");
        let error = Config::parse("[keyproviders]\ntimeout_secs = 0\n").unwrap_err();
        assert!(error.contains("keyproviders.timeout_secs"), "{error}");
    }
}
