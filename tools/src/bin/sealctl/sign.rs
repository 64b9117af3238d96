//! `sealctl sign` and `sealctl verify`: cosign's key-based image signatures, made and checked
//! as a node's signature policy checks them (`snapshotter::signature`), stored in the image's
//! repository as `cosign sign --key` stores them, so `cosign verify --key` accepts them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use oci_client::Reference;
use snapshotter::registry::Registry;
use snapshotter::signature::cosign::{self, SigningKey};
use snapshotter::signature::{self, load_key};

use crate::transport::Transport;

/// Opens cosign's private key `path` with the password from `password_file` (its first
/// line) or from `COSIGN_PASSWORD`, as cosign reads it.
pub fn signing_key(path: &Path, password_file: Option<&Path>) -> Result<SigningKey> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read(path)
            .with_context(|| format!("reading the signing key {}", path.display()))?,
    );
    let password = match password_file {
        Some(file) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading the password file {}", file.display()))?,
            );
            zeroize::Zeroizing::new(text.lines().next().unwrap_or_default().as_bytes().to_vec())
        }
        None => match std::env::var("COSIGN_PASSWORD") {
            Ok(password) => zeroize::Zeroizing::new(password.into_bytes()),
            Err(_) => bail!(
                "the signing key {} is encrypted: give its password in COSIGN_PASSWORD (as cosign \
                 reads it; empty for a key made without one) or with --password-file FILE",
                path.display()
            ),
        },
    };
    SigningKey::from_encrypted_pem(&pem, &password)
        .with_context(|| format!("opening the signing key {}", path.display()))
}

/// `sealctl sign`: signs the manifest `image` names (a tag is resolved to its digest first).
pub fn sign(transport: &Transport, key: &SigningKey, image: &str) -> Result<()> {
    let (registry, reference) = transport.remote(image)?;
    let resolved = registry
        .resolve_manifest(&reference)
        .with_context(|| format!("resolving {image}"))?;
    let digest = resolved.descriptor.digest().to_string();
    sign_digest(&registry, &resolved.reference, &digest, key)?;
    eprintln!(
        "signed {}@{digest}",
        signature::repository_of(&resolved.reference)
    );
    Ok(())
}

/// Adds a signature of the manifest `digest` by `key` to the signature image of `image`'s
/// repository (`sha256-HEX.sig`), keeping the signatures already there.
pub fn sign_digest(
    registry: &Registry,
    image: &Reference,
    digest: &str,
    key: &SigningKey,
) -> Result<()> {
    let payload = cosign::payload(&signature::repository_of(image), digest);
    let signed = key.sign(&payload)?;
    let tag = cosign::signature_tag(digest)
        .with_context(|| format!("{digest} is not a manifest digest"))?;
    let target = Reference::with_tag(
        image.registry().to_string(),
        image.repository().to_string(),
        tag,
    );
    // Earlier signatures (other keys, other runs) stay: a policy may trust any of them.
    let mut layers = match registry.resolve_manifest(&target) {
        Ok(existing) => existing
            .manifest
            .layers()
            .iter()
            .map(|layer| serde_json::to_value(layer).expect("a descriptor serializes"))
            .collect(),
        Err(error) if error.is_not_found() => Vec::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("reading the signatures of {digest}"))
        }
    };
    let payload_digest = fsformat::digest::digest_of(&payload);
    registry.push_small_blob(&target, &payload, &payload_digest)?;
    layers.push(serde_json::json!({
        "mediaType": cosign::PAYLOAD_MEDIA_TYPE,
        "size": payload.len(),
        "digest": payload_digest,
        "annotations": { cosign::SIGNATURE_ANNOTATION: signed },
    }));
    // cosign's config for a signature image: the payloads as its layers' diff ids.
    let diff_ids: Vec<&serde_json::Value> = layers.iter().map(|layer| &layer["digest"]).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{ "created": "0001-01-01T00:00:00Z" }],
        "os": "",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "config": {},
    }))?;
    let config_digest = fsformat::digest::digest_of(&config);
    registry.push_small_blob(&target, &config, &config_digest)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": layers,
    }))?;
    registry.push_manifest(
        &target,
        &manifest,
        "application/vnd.oci.image.manifest.v1+json",
    )?;
    Ok(())
}

/// `sealctl verify`: checks `image` as a node whose policy trusts `keys` would.
pub fn verify(transport: &Transport, keys: &[std::path::PathBuf], image: &str) -> Result<()> {
    let trusted = keys
        .iter()
        .map(|path| load_key(path).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let (registry, reference) = transport.remote(image)?;
    let resolved = registry
        .resolve_manifest(&reference)
        .with_context(|| format!("resolving {image}"))?;
    let digest = resolved.descriptor.digest().to_string();
    let repository = signature::repository_of(&resolved.reference);
    match signature::verify_image(&registry, &resolved.reference, &digest, &trusted) {
        Ok(key) => {
            println!("verified {repository}@{digest}: signed by {key}");
            Ok(())
        }
        Err(error) => bail!(
            "{repository}@{digest} does not verify: {}",
            snapshotter::error_chain(&error)
        ),
    }
}
