//! Key files: loading public keys, private keys and key shares, for `sealctl` and
//! `mount.sealfs`. Secret material is read into zeroizing buffers and never echoed in errors.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use fsformat::shares::{self, KeyShare};
use fsformat::{PrivateKey, PublicKey};

pub fn load_public(path: &Path) -> Result<PublicKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    text.parse()
        .with_context(|| format!("{} is not a sealfs public key", path.display()))
}

pub fn load_private(path: &Path) -> Result<PrivateKey> {
    let meta = fs::metadata(path)
        .with_context(|| format!("cannot read private key {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "sealctl: warning: private key {} is readable by others; chmod 600 it",
            path.display()
        );
    }
    let text = zeroize::Zeroizing::new(
        fs::read_to_string(path)
            .with_context(|| format!("cannot read private key {}", path.display()))?,
    );
    text.parse()
        .with_context(|| format!("{} is not a sealfs private key", path.display()))
}

pub fn load_privates(paths: &[impl AsRef<Path>]) -> Result<Vec<PrivateKey>> {
    paths.iter().map(|p| load_private(p.as_ref())).collect()
}

pub fn read_share(path: &Path) -> Result<KeyShare> {
    let text = zeroize::Zeroizing::new(
        fs::read_to_string(path)
            .with_context(|| format!("cannot read share {}", path.display()))?,
    );
    KeyShare::from_text(&text)
        .with_context(|| format!("{} is not a sealfs key share", path.display()))
}

/// Combines every share file (`*.txt`, or any file starting with a share line) in `dir`.
pub fn combine_share_dir(dir: &Path) -> Result<PrivateKey> {
    let mut shares = Vec::new();
    let entries = fs::read_dir(dir)
        .with_context(|| format!("cannot read share directory {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            shares.push(read_share(&path)?);
        }
    }
    if shares.is_empty() {
        bail!("{} holds no key shares", dir.display());
    }
    shares::combine(&shares).with_context(|| format!("combining the shares in {}", dir.display()))
}
