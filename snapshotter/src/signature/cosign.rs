//! cosign's key-based signatures of container images, as `cosign sign --key` stores them: a
//! "simple signing" payload naming the manifest digest, signed with the key, kept in the
//! image's repository as a signature image tagged `sha256-HEX.sig` whose layers are payloads
//! and whose layer annotations carry the signatures.
//!
//! Keys and signatures go through the `sigstore` crate (cosign's key formats, including its
//! scrypt + secretbox encrypted private keys; ECDSA P-256, P-384, Ed25519 and RSA keys). The
//! payload and the signature image are small documented JSON structures, written here: the
//! crate's `cosign` feature reaches registries with a client of its own, which would not
//! honour the node's mirrors and credentials (see docs/signatures.md). No I/O here.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, Signature, SigningScheme};

/// Media type of a signature image's layers: one payload each.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature of the layer's payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest payload read (cosign's are about 250 bytes); bounds what an untrusted signature
/// image can make a node fetch and parse.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 10;
/// Signatures looked at per image, at most.
pub const MAX_SIGNATURES: usize = 64;

/// Why a key or a signature could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The public key does not parse.
    #[error("not a public key cosign can verify with (PEM: ECDSA P-256/P-384, Ed25519 or RSA)")]
    Public(#[source] sigstore::errors::SigstoreError),
    /// The private key does not parse or the password does not open it.
    #[error("cannot open the signing key (wrong password, or not a cosign private key)")]
    Private(#[source] sigstore::errors::SigstoreError),
    /// Signing failed.
    #[error("signing failed")]
    Sign(#[source] sigstore::errors::SigstoreError),
}

/// The tag of the signature image of the manifest `digest` (`sha256:HEX` -> `sha256-HEX.sig`).
pub fn signature_tag(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    (!algorithm.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("{algorithm}-{hex}.sig"))
}

#[derive(Debug, Serialize, Deserialize)]
struct SimpleSigning {
    critical: Critical,
    optional: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The payload cosign signs for the manifest `digest` of repository `docker_reference`
/// (`HOST/REPO`).
pub fn payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&SimpleSigning {
        critical: Critical {
            identity: Identity {
                docker_reference: docker_reference.to_string(),
            },
            image: Image {
                docker_manifest_digest: digest.to_string(),
            },
            kind: SIGNATURE_TYPE.to_string(),
        },
        optional: None,
    })
    .expect("the payload serializes")
}

/// A public key a signature policy trusts, named by where it came from.
pub struct TrustedKey {
    /// Where it came from (a file), as errors and logs name it.
    pub name: String,
    key: CosignVerificationKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("name", &self.name)
            .finish()
    }
}

impl TrustedKey {
    /// A key from its PEM text (`cosign generate-key-pair`'s `cosign.pub`).
    pub fn from_pem(name: impl Into<String>, pem: &[u8]) -> Result<Self, KeyError> {
        Ok(TrustedKey {
            name: name.into(),
            key: CosignVerificationKey::try_from_pem(pem).map_err(KeyError::Public)?,
        })
    }

    fn verifies(&self, signature_base64: &str, payload: &[u8]) -> bool {
        self.key
            .verify_signature(
                Signature::Base64Encoded(signature_base64.as_bytes()),
                payload,
            )
            .is_ok()
    }
}

/// A key to sign with: a cosign private key (`cosign.key`, ECDSA P-256), opened with its
/// password.
pub struct SigningKey {
    signer: SigStoreSigner,
}

impl SigningKey {
    /// Opens cosign's encrypted private key PEM with `password` (empty for none).
    pub fn from_encrypted_pem(pem: &[u8], password: &[u8]) -> Result<Self, KeyError> {
        let pair =
            sigstore::crypto::signing_key::SigStoreKeyPair::from_encrypted_pem(pem, password)
                .map_err(KeyError::Private)?;
        let signer = pair
            .to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)
            .map_err(KeyError::Private)?;
        Ok(SigningKey { signer })
    }

    /// The base64 signature of `payload`, as the signature image's annotation carries it.
    pub fn sign(&self, payload: &[u8]) -> Result<String, KeyError> {
        let signature = self.signer.sign(payload).map_err(KeyError::Sign)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature))
    }
}

/// One signature of an image: a payload and its base64 signature.
#[derive(Clone, Debug)]
pub struct FoundSignature {
    /// The payload, as fetched (its digest checked against the signature image).
    pub payload: Vec<u8>,
    /// The signature, base64.
    pub signature: String,
}

/// Why an image's signatures do not satisfy a policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// There is no signature image.
    #[error("it has no signature (no {tag} in its repository)")]
    Unsigned {
        /// The signature image's tag that was looked for.
        tag: String,
    },
    /// No signature verifies with any trusted key.
    #[error("none of its {count} signature(s) verifies with a trusted key ({keys}): signed by another key, or the signature or its payload was changed")]
    NoTrustedSignature {
        /// Signatures found.
        count: usize,
        /// The trusted keys, by name.
        keys: String,
    },
    /// A trusted key signed, but another manifest digest.
    #[error("its signature by {key} is for manifest {signed}, not this one")]
    OtherDigest {
        /// The key that signed.
        key: String,
        /// The digest its payload names.
        signed: String,
    },
    /// A trusted key signed a payload that is not a cosign image signature.
    #[error(
        "its signature by {key} is over a payload that is not a cosign image signature: {why}"
    )]
    BadPayload {
        /// The key that signed.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The trusted key whose signature, among `found`, says the manifest `digest` is signed.
/// Signatures are checked before their payloads are parsed.
pub fn check<'k>(
    found: &[FoundSignature],
    keys: &'k [std::sync::Arc<TrustedKey>],
    digest: &str,
) -> Result<&'k TrustedKey, Refusal> {
    let mut refusal = Refusal::NoTrustedSignature {
        count: found.len(),
        keys: keys
            .iter()
            .map(|key| key.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    for signature in found.iter().take(MAX_SIGNATURES) {
        let Some(key) = keys
            .iter()
            .find(|key| key.verifies(&signature.signature, &signature.payload))
        else {
            continue;
        };
        match serde_json::from_slice::<SimpleSigning>(&signature.payload) {
            Ok(payload) if payload.critical.kind != SIGNATURE_TYPE => {
                refusal = Refusal::BadPayload {
                    key: key.name.clone(),
                    why: format!("type {:?}", payload.critical.kind),
                }
            }
            Ok(payload) if payload.critical.image.docker_manifest_digest == digest => {
                return Ok(key)
            }
            Ok(payload) => {
                refusal = Refusal::OtherDigest {
                    key: key.name.clone(),
                    signed: payload.critical.image.docker_manifest_digest,
                }
            }
            Err(error) => {
                refusal = Refusal::BadPayload {
                    key: key.name.clone(),
                    why: error.to_string(),
                }
            }
        }
    }
    Err(refusal)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A fresh ECDSA P-256 key pair: cosign's encrypted private key PEM and the public PEM.
    fn key_pair(password: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
            .create_signer()
            .unwrap();
        let pair = signer.to_sigstore_keypair().unwrap();
        (
            pair.private_key_to_encrypted_pem(password)
                .unwrap()
                .as_bytes()
                .to_vec(),
            pair.public_key_to_pem().unwrap().into_bytes(),
        )
    }

    #[test]
    fn a_signature_verifies_for_its_digest_by_its_key_and_nothing_else() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let (private, public) = key_pair(b"pw");
        let (_, other_public) = key_pair(b"");
        let signer = SigningKey::from_encrypted_pem(&private, b"pw").unwrap();
        assert!(SigningKey::from_encrypted_pem(&private, b"wrong").is_err());
        let trusted = vec![Arc::new(TrustedKey::from_pem("team.pub", &public).unwrap())];
        let stranger = vec![Arc::new(
            TrustedKey::from_pem("other.pub", &other_public).unwrap(),
        )];
        let payload = payload("reg.local/app", &digest);
        let signed = FoundSignature {
            signature: signer.sign(&payload).unwrap(),
            payload: payload.clone(),
        };

        assert_eq!(
            check(std::slice::from_ref(&signed), &trusted, &digest)
                .unwrap()
                .name,
            "team.pub"
        );
        assert!(matches!(
            check(std::slice::from_ref(&signed), &stranger, &digest),
            Err(Refusal::NoTrustedSignature { count: 1, .. })
        ));
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(matches!(
            check(std::slice::from_ref(&signed), &trusted, &other),
            Err(Refusal::OtherDigest { signed, .. }) if signed == digest
        ));
        // The payload changed after signing (another digest put in): nothing verifies.
        let tampered = FoundSignature {
            payload: String::from_utf8(payload)
                .unwrap()
                .replace(&digest, &other)
                .into_bytes(),
            ..signed.clone()
        };
        assert!(matches!(
            check(&[tampered], &trusted, &other),
            Err(Refusal::NoTrustedSignature { .. })
        ));
        // A signed payload that is not an image signature.
        let odd = br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"y"},"type":"something else"},"optional":null}"#;
        let odd = FoundSignature {
            signature: signer.sign(odd).unwrap(),
            payload: odd.to_vec(),
        };
        assert!(matches!(
            check(&[odd], &trusted, &digest),
            Err(Refusal::BadPayload { .. })
        ));
        assert_eq!(
            signature_tag(&digest).unwrap(),
            format!("sha256-{}.sig", "a".repeat(64))
        );
        assert_eq!(signature_tag("sha256:../x"), None);
    }
}
