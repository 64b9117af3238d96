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

/// A recipient of sealed layers: a public key, or a keyprovider.
pub type AnyRecipient = Box<dyn fsformat::Recipient + Send + Sync>;

const PROVIDER_PREFIX: &str = "provider:";

/// The keyproviders of `$OCICRYPT_KEYPROVIDER_CONFIG`, read into `configured` the first time a
/// spec names one.
fn providers(
    configured: &mut Option<snapshotter::keyprovider::KeyProviders>,
) -> Result<&snapshotter::keyprovider::KeyProviders> {
    if configured.is_none() {
        *configured = Some(read_providers()?);
    }
    Ok(configured.as_ref().expect("read above"))
}

fn read_providers() -> Result<snapshotter::keyprovider::KeyProviders> {
    use snapshotter::keyprovider::{CallLimits, KeyProviders, CONFIG_ENV};
    if std::env::var_os(CONFIG_ENV).is_none_or(|v| v.is_empty()) {
        bail!(
            "provider: recipients and keys are configured as ocicrypt configures them: set {CONFIG_ENV} to a keyprovider config file ({{\"key-providers\": {{\"NAME\": {{\"cmd\": {{\"path\": ...}}}} | {{\"grpc\": \"HOST:PORT\"}}}}}})"
        );
    }
    Ok(KeyProviders::from_env(CallLimits::default())?)
}

/// Recipients from `--recipient` values: public key files, or `provider:NAME[:ARGS]` (a
/// keyprovider of `$OCICRYPT_KEYPROVIDER_CONFIG`, wrapping as ocicrypt's `provider:` does).
pub fn load_recipients(specs: &[String]) -> Result<Vec<AnyRecipient>> {
    let mut configured = None;
    specs
        .iter()
        .map(|spec| match spec.strip_prefix(PROVIDER_PREFIX) {
            Some(provider) => {
                Ok(Box::new(providers(&mut configured)?.recipient(provider)?) as AnyRecipient)
            }
            None => Ok(Box::new(load_public(Path::new(spec))?) as AnyRecipient),
        })
        .collect()
}

/// What to unwrap layer keys with, from `--key` values: private key files, or `provider:NAME`
/// (a keyprovider of `$OCICRYPT_KEYPROVIDER_CONFIG`).
pub fn load_identities(specs: &[String]) -> Result<snapshotter::keys::Identities> {
    let mut identities = snapshotter::keys::Identities::default();
    let mut configured = None;
    for spec in specs {
        match spec.strip_prefix(PROVIDER_PREFIX) {
            Some(name) => identities
                .providers
                .push(providers(&mut configured)?.get(name)?),
            None => identities.keys.push(load_private(Path::new(spec))?),
        }
    }
    Ok(identities)
}
