//! Image signatures checked before a sealed layer's key is unwrapped: encryption says who can
//! read an image, a signature who made it. A node's public key is public by design, so
//! anyone can seal an image the node would open; a signature policy decides which images may
//! be opened at all.
//!
//! The policy ([`SignaturePolicy`]) maps image repositories to a requirement, the most
//! specific scope first (containers-policy.json's convention): `HOST`, `HOST/NAMESPACE` or
//! `HOST/REPO`; an image no scope matches gets the default. A requirement is `off` or
//! `require` with the public keys one of which must have signed the manifest digest being
//! pulled. [`verify_image`] fetches the image's cosign signature image through the node's
//! registry client (mirrors, credentials, deadlines as every other request) and checks it
//! ([`cosign`]). The format is cosign's key-based signature; `sealctl sign` makes the same.

pub mod cosign;

use std::sync::Arc;

use oci_client::Reference;

pub use crate::image_scope::repository_of;
use crate::image_scope::scope_matches;
use crate::registry::{Registry, RegistryError};
use cosign::{FoundSignature, Refusal, TrustedKey};

/// What the policy asks of an image.
#[derive(Clone, Debug, Default)]
pub enum Requirement {
    /// No check.
    #[default]
    Off,
    /// A signature by one of these keys over the manifest digest.
    Require(Vec<Arc<TrustedKey>>),
}

/// Requirements by repository scope, most specific first, and a default.
#[derive(Clone, Debug, Default)]
pub struct SignaturePolicy {
    rules: Vec<(String, Requirement)>,
    default: Requirement,
    /// Whether layers that are not sealed are held to it too (when their Prepare names the
    /// image).
    pub unsealed: bool,
}

impl SignaturePolicy {
    /// A policy of `rules` (scope, requirement) and `default` for images none matches.
    pub fn new(mut rules: Vec<(String, Requirement)>, default: Requirement) -> Self {
        for (scope, _) in &mut rules {
            *scope = scope.trim_end_matches('/').to_string();
        }
        // Most specific (longest) scope first; a scope matches whole path components only.
        rules.sort_by_key(|(scope, _)| std::cmp::Reverse(scope.len()));
        SignaturePolicy {
            rules,
            default,
            unsealed: false,
        }
    }

    /// Whether any image needs a signature.
    pub fn is_off(&self) -> bool {
        matches!(self.default, Requirement::Off)
            && self
                .rules
                .iter()
                .all(|(_, requirement)| matches!(requirement, Requirement::Off))
    }

    /// The requirement for the repository `HOST/REPO`, and the scope that set it (`default`
    /// when none matches).
    pub fn for_repository(&self, repository: &str) -> (&str, &Requirement) {
        self.rules
            .iter()
            .find(|(scope, _)| scope_matches(scope, repository))
            .map(|(scope, requirement)| (scope.as_str(), requirement))
            .unwrap_or(("default", &self.default))
    }
}

/// Why an image was not verified.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The signatures do not satisfy the policy.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The signature image could not be fetched (registry down, refusing, malformed); the
    /// image is refused, as one without a signature would be.
    #[error("its signature could not be fetched")]
    Registry(#[source] Box<RegistryError>),
}

/// The signatures of the manifest `digest` in the repository of `image`: the payloads and
/// signatures of its cosign signature image (at most [`cosign::MAX_SIGNATURES`], each payload
/// at most [`cosign::MAX_PAYLOAD_BYTES`] and checked against its digest).
pub fn fetch_signatures(
    registry: &Registry,
    image: &Reference,
    digest: &str,
) -> Result<Vec<FoundSignature>, SignatureError> {
    let Some(tag) = cosign::signature_tag(digest) else {
        return Err(Refusal::Unsigned {
            tag: format!("(no tag for digest {digest})"),
        }
        .into());
    };
    let signatures = Reference::with_tag(
        image.registry().to_string(),
        image.repository().to_string(),
        tag.clone(),
    );
    let manifest = match registry.resolve_manifest(&signatures) {
        Ok(manifest) => manifest,
        Err(error) if error.is_not_found() => return Err(Refusal::Unsigned { tag }.into()),
        Err(error) => return Err(SignatureError::Registry(Box::new(error))),
    };
    let mut found = Vec::new();
    for layer in manifest
        .manifest
        .layers()
        .iter()
        .filter(|layer| layer.media_type().to_string() == cosign::PAYLOAD_MEDIA_TYPE)
        .take(cosign::MAX_SIGNATURES)
    {
        let Some(signature) = layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get(cosign::SIGNATURE_ANNOTATION))
        else {
            continue;
        };
        let payload = registry
            .read_small(
                &manifest.reference,
                layer.digest().as_ref(),
                layer.size(),
                cosign::MAX_PAYLOAD_BYTES,
            )
            .map_err(|error| SignatureError::Registry(Box::new(error)))?;
        found.push(FoundSignature {
            payload,
            signature: signature.clone(),
        });
    }
    Ok(found)
}

/// Checks that one of `keys` signed the manifest `digest` of `image`; the key that did.
pub fn verify_image(
    registry: &Registry,
    image: &Reference,
    digest: &str,
    keys: &[Arc<TrustedKey>],
) -> Result<String, SignatureError> {
    let found = fetch_signatures(registry, image, digest)?;
    Ok(cosign::check(&found, keys, digest)?.name.clone())
}

/// Reads a public key file for a policy.
pub fn load_key(path: &std::path::Path) -> Result<Arc<TrustedKey>, String> {
    let pem = std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    TrustedKey::from_pem(path.display().to_string(), &pem)
        .map(Arc::new)
        .map_err(|error| format!("{}: {}", path.display(), crate::error_chain(&error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_scope_wins_on_whole_path_components() {
        let policy = SignaturePolicy::new(
            vec![
                ("reg.io".into(), Requirement::Require(Vec::new())),
                ("reg.io/team/".into(), Requirement::Off),
                ("reg.io/team/app".into(), Requirement::Require(Vec::new())),
            ],
            Requirement::Off,
        );
        let scope = |repository| policy.for_repository(repository).0.to_string();
        assert_eq!(scope("reg.io/team/app"), "reg.io/team/app");
        assert_eq!(scope("reg.io/team/other"), "reg.io/team");
        assert_eq!(scope("reg.io/teamwork/x"), "reg.io");
        assert_eq!(scope("reg.io/x"), "reg.io");
        assert_eq!(scope("reg.iox/y"), "default");
        assert_eq!(scope("other.io/y"), "default");
        assert!(!policy.is_off());
        assert!(SignaturePolicy::default().is_off());
    }
}
