//! The node's keys: the private keys (and key shares) the snapshotter unwraps layer keys with.
//!
//! A keys directory holds private key files (`SEALFS-X25519-PRIV:...`, any file name) and,
//! optionally, a `shares/` subdirectory of k-of-n shares of one more key. It is read again for
//! every sealed layer, so keys provisioned while the daemon runs are used without a restart.
//! Secret text is held in zeroizing buffers and never appears in errors.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsformat::shares::{self, KeyShare};
use fsformat::{Identity, PrivateKey};

use crate::keyprovider::Provider;

/// What layer keys can be unwrapped with: private keys first (no call leaves the machine),
/// then keyproviders, each asked only for a stanza that names it.
#[derive(Clone, Default)]
pub struct Identities {
    /// Private keys.
    pub keys: Vec<PrivateKey>,
    /// Keyproviders (a KMS, an attestation agent).
    pub providers: Vec<Arc<Provider>>,
}

impl Identities {
    /// All of them, in the order they are tried.
    pub fn as_dyn(&self) -> Vec<&dyn Identity> {
        let keys = self.keys.iter().map(|k| k as &dyn Identity);
        keys.chain(self.providers.iter().map(|p| &**p as &dyn Identity))
            .collect()
    }

    /// Whether there is nothing to unwrap with.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.providers.is_empty()
    }
}

impl From<Vec<PrivateKey>> for Identities {
    fn from(keys: Vec<PrivateKey>) -> Self {
        Identities {
            keys,
            providers: Vec::new(),
        }
    }
}

/// Why the node's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file in the keys directory is neither a private key nor readable as one.
    #[error("{path} is not a sealfs private key")]
    NotAKey {
        /// The path.
        path: PathBuf,
        /// Why (never the key text).
        #[source]
        source: fsformat::FormatError,
    },
    /// A private key file is readable by others than its owner.
    #[error("{path} is readable by group or others; chmod 600 it")]
    Permissions {
        /// The path.
        path: PathBuf,
    },
    /// The shares do not combine into a key.
    #[error("combining the key shares in {dir}")]
    Shares {
        /// The shares directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: fsformat::FormatError,
    },
}

fn read_secret(path: &Path) -> Result<zeroize::Zeroizing<String>, KeyError> {
    let read_error = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_error)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
        });
    }
    Ok(zeroize::Zeroizing::new(
        fs::read_to_string(path).map_err(read_error)?,
    ))
}

/// Sorted regular files of `dir` (hidden files skipped: editors and provisioning tools leave
/// temporary files there).
fn files_in(dir: &Path) -> Result<Vec<PathBuf>, KeyError> {
    let read_error = |source| KeyError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file() && !hidden {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every private key in `dir` and the key its `shares/` subdirectory combines to. A
/// missing directory holds no keys (the node can still run unsealed images).
pub fn load_key_dir(dir: &Path) -> Result<Vec<PrivateKey>, KeyError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut keys = Vec::new();
    for path in files_in(dir)? {
        let text = read_secret(&path)?;
        keys.push(
            text.parse()
                .map_err(|source| KeyError::NotAKey { path, source })?,
        );
    }
    let shares_dir = dir.join("shares");
    if shares_dir.is_dir() {
        let shares: Vec<KeyShare> = files_in(&shares_dir)?
            .iter()
            .map(|path| {
                KeyShare::from_text(&read_secret(path)?).map_err(|source| KeyError::NotAKey {
                    path: path.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        if !shares.is_empty() {
            keys.push(shares::combine(&shares).map_err(|source| KeyError::Shares {
                dir: shares_dir,
                source,
            })?);
        }
    }
    Ok(keys)
}
