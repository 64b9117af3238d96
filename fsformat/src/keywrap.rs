//! Envelope encryption: the layer key wrapped for each recipient.
//!
//! One extension point, as in age: a [`Recipient`] turns a layer key into stanzas, an
//! [`Identity`] turns a stanza back into the key, answering `None` for stanzas that are not its
//! own. Stanzas travel in the layer descriptor's annotations, so recipients can be added or
//! removed by rewriting the manifest alone.
//!
//! X25519 stanza (90 bytes, base64 in the annotation):
//!
//! ```text
//! version (1) || type 0x01 (1) || key_id (8) || ephemeral_public (32) || wrapped (32 + 16)
//! shared   = X25519(ephemeral_secret, recipient_public)      (all-zero output is rejected)
//! wrap_key = HKDF-SHA-256(ikm = shared, salt = ephemeral_public || recipient_public,
//!                         info = "sealfs/v1 x25519 wrap")
//! wrapped  = AES-256-GCM(wrap_key, nonce = 0^12, aad = "sealfs/v1 x25519" || key_id, layer_key)
//! key_id   = SHA-256("sealfs/v1 key id" || recipient_public)[0..8]
//! ```
//!
//! Keyprovider stanza (ocicrypt's keyprovider protocol: a KMS or an attestation agent wraps the
//! key; sealfs only carries what it answered):
//!
//! ```text
//! version (1) || type 0x02 (1) || key_id (8) || name_len (1) || name || provider_wrapped
//! key_id = SHA-256("sealfs/v1 keyprovider" || name)[0..8]
//! ```
//!
//! `name` is the provider's name in `OCICRYPT_KEYPROVIDER_CONFIG` (1 to 64 of `[A-Za-z0-9._-]`);
//! `provider_wrapped` (1 to [`MAX_PROVIDER_WRAPPED`] bytes) is the keyprovider's `annotation`,
//! opaque to sealfs. The provider unwraps it back into the 32-byte layer key (its `optsdata`).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::{random_bytes, LayerKey, KEY_LEN, TAG_LEN};
use crate::error::{FormatError, Result};

const PUBLIC_PREFIX: &str = "sealfs-x25519-pub:";
const PRIVATE_PREFIX: &str = "SEALFS-X25519-PRIV:";
const STANZA_VERSION: u8 = 1;
const STANZA_X25519: u8 = 1;
const STANZA_KEYPROVIDER: u8 = 2;
const STANZA_LEN: usize = 2 + 8 + 32 + KEY_LEN + TAG_LEN;
/// Longest keyprovider answer a stanza carries: a KMS ciphertext or a JWE is a few hundred
/// bytes; containerd refuses a label (where a stanza travels) over 4 KiB anyway.
pub const MAX_PROVIDER_WRAPPED: usize = 2800;
const MAX_PROVIDER_NAME: usize = 64;

/// The short id of a public key: 8 bytes, shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = FormatError;
    fn from_str(text: &str) -> Result<Self> {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b).ok());
        bytes.map(KeyId).ok_or_else(|| FormatError::BadKeyMaterial {
            what: "key id",
            reason: format!("{text:?} is not 16 hex digits"),
        })
    }
}

/// An X25519 public key: whom a layer key is wrapped for.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(x25519_dalek::PublicKey);

impl PublicKey {
    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        let digest = Sha256::new()
            .chain_update(b"sealfs/v1 key id")
            .chain_update(self.0.as_bytes())
            .finalize();
        KeyId(digest[..8].try_into().expect("8 of 32 bytes"))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PUBLIC_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.0.as_bytes())
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl FromStr for PublicKey {
    type Err = FormatError;
    /// Parses the text form; `#` comment lines and blank lines are ignored, so a key file
    /// can be parsed as a whole.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: &str| FormatError::BadKeyMaterial {
            what: "public key",
            reason: reason.into(),
        };
        let line = key_line(text).ok_or_else(|| bad("no key line found"))?;
        if line.starts_with(PRIVATE_PREFIX) {
            return Err(bad(
                "this is a private key; pass the public key (sealctl keygen writes both)",
            ));
        }
        let encoded = line
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| bad("expected a line starting with sealfs-x25519-pub:"))?;
        let bytes: [u8; 32] = URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("not 32 bytes of base64url"))?;
        Ok(PublicKey(x25519_dalek::PublicKey::from(bytes)))
    }
}

/// An X25519 private key: a node's or a person's identity. Zeroized on drop; its text form is
/// only produced into a zeroizing string.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        random_bytes(&mut bytes[..])?;
        Ok(PrivateKey(x25519_dalek::StaticSecret::from(*bytes)))
    }

    /// A key from its raw 32 bytes (after combining shares).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(x25519_dalek::StaticSecret::from(bytes))
    }

    /// A private key from its 32 raw bytes in a slice; `None` if it is not 32 bytes. The one
    /// fixed-size copy it makes is zeroized.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut scalar = Zeroizing::new([0u8; 32]);
        if bytes.len() != scalar.len() {
            return None;
        }
        scalar.copy_from_slice(bytes);
        Some(PrivateKey(x25519_dalek::StaticSecret::from(*scalar)))
    }

    /// The raw bytes, for splitting into shares only.
    pub fn expose_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0))
    }

    /// The key file text: a comment with the public key and id, then the secret line.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let public = self.public();
        Zeroizing::new(format!(
            "# sealfs private key; key id {}\n# public key: {public}\n{PRIVATE_PREFIX}{}\n",
            public.key_id(),
            URL_SAFE_NO_PAD.encode(self.0.as_bytes()),
        ))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, id {})", self.public().key_id())
    }
}

impl FromStr for PrivateKey {
    type Err = FormatError;
    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: &str| FormatError::BadKeyMaterial {
            what: "private key",
            reason: reason.into(),
        };
        let line = key_line(text).ok_or_else(|| bad("no key line found"))?;
        if line.starts_with(PUBLIC_PREFIX) {
            return Err(bad("this is a public key; a private key is needed here"));
        }
        let encoded = line
            .strip_prefix(PRIVATE_PREFIX)
            .ok_or_else(|| bad("expected a line starting with SEALFS-X25519-PRIV:"))?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|_| bad("not base64url"))?,
        );
        PrivateKey::from_slice(&bytes).ok_or_else(|| bad("not 32 bytes"))
    }
}

fn key_line(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
}

/// A wrapped layer key addressed to one key id.
#[derive(Clone, PartialEq, Eq)]
pub struct Stanza {
    /// Stanza type (1 = X25519).
    pub kind: u8,
    /// Whom it is for.
    pub key_id: KeyId,
    /// Type-specific body.
    pub body: Vec<u8>,
}

impl fmt::Debug for Stanza {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stanza(type {}, key {})", self.kind, self.key_id)
    }
}

impl Stanza {
    /// The annotation value: base64 of the stanza bytes.
    pub fn encode(&self) -> String {
        let mut bytes = vec![STANZA_VERSION, self.kind];
        bytes.extend_from_slice(&self.key_id.0);
        bytes.extend_from_slice(&self.body);
        STANDARD.encode(bytes)
    }

    /// A stanza holding what keyprovider `name` answered when asked to wrap a layer key.
    pub fn for_provider(name: &str, provider_wrapped: &[u8]) -> Result<Self> {
        check_provider_name(name)?;
        if provider_wrapped.is_empty() || provider_wrapped.len() > MAX_PROVIDER_WRAPPED {
            return Err(FormatError::BadKeyMaterial {
                what: "wrapped key",
                reason: format!(
                    "keyprovider {name} answered {} bytes; a stanza holds 1 to {MAX_PROVIDER_WRAPPED}",
                    provider_wrapped.len()
                ),
            });
        }
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(provider_wrapped);
        Ok(Stanza {
            kind: STANZA_KEYPROVIDER,
            key_id: provider_key_id(name),
            body,
        })
    }

    /// For a keyprovider stanza, the provider's name and what it answered when wrapping.
    pub fn provider(&self) -> Option<(&str, &[u8])> {
        if self.kind != STANZA_KEYPROVIDER {
            return None;
        }
        let (&len, rest) = self.body.split_first()?;
        let name = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
        Some((name, &rest[usize::from(len)..]))
    }

    /// Whom the stanza is for, as an operator names it: a key id, or `provider:NAME`.
    pub fn recipient_label(&self) -> String {
        match self.provider() {
            Some((name, _)) => format!("provider:{name}"),
            None => self.key_id.to_string(),
        }
    }

    /// Parses an annotation value.
    pub fn decode(text: &str) -> Result<Self> {
        let bad = |reason: &str| FormatError::BadKeyMaterial {
            what: "wrapped key",
            reason: reason.into(),
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| bad("not base64"))?;
        if bytes.len() < 10 || bytes[0] != STANZA_VERSION {
            return Err(bad("unknown version or too short"));
        }
        if bytes[1] == STANZA_X25519 && bytes.len() != STANZA_LEN {
            return Err(bad("X25519 stanza has the wrong length"));
        }
        let stanza = Stanza {
            kind: bytes[1],
            key_id: KeyId(bytes[2..10].try_into().unwrap()),
            body: bytes[10..].to_vec(),
        };
        if stanza.kind == STANZA_KEYPROVIDER {
            let (name, wrapped) = stanza
                .provider()
                .ok_or_else(|| bad("keyprovider stanza is truncated"))?;
            check_provider_name(name)?;
            if wrapped.is_empty() || wrapped.len() > MAX_PROVIDER_WRAPPED {
                return Err(bad("keyprovider stanza holds no or too much wrapped key"));
            }
            if stanza.key_id != provider_key_id(name) {
                return Err(bad(
                    "keyprovider stanza's key id does not match its provider",
                ));
            }
        }
        Ok(stanza)
    }
}

/// The key id of keyprovider `name`'s stanzas.
pub fn provider_key_id(name: &str) -> KeyId {
    let digest = Sha256::new()
        .chain_update(b"sealfs/v1 keyprovider")
        .chain_update(name.as_bytes())
        .finalize();
    KeyId(digest[..8].try_into().expect("8 of 32 bytes"))
}

/// A keyprovider name as ocicrypt's configuration names one, short and printable (it shows in
/// errors and annotations).
pub fn check_provider_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PROVIDER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FormatError::BadKeyMaterial {
            what: "keyprovider name",
            reason: format!(
                "{:?} is not 1 to {MAX_PROVIDER_NAME} of A-Z a-z 0-9 . _ -",
                name.chars().take(80).collect::<String>()
            ),
        })
    }
}

/// Something a layer key can be wrapped for.
pub trait Recipient {
    /// Wraps `key` for this recipient.
    fn wrap(&self, key: &LayerKey) -> Result<Vec<Stanza>>;
    /// Whom its stanzas are for, as [`Stanza::recipient_label`] shows them.
    fn label(&self) -> String;
}

/// Something that can unwrap layer keys.
pub trait Identity {
    /// A short label for error messages (a key id, never secret material).
    fn label(&self) -> String;
    /// `None` if the stanza is not addressed to this identity; otherwise the key or the reason
    /// it could not be unwrapped.
    fn unwrap(&self, stanza: &Stanza) -> Option<Result<LayerKey>>;
}

fn wrap_cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> LessSafeKey {
    let salt = [&ephemeral[..], &recipient[..]].concat();
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(b"sealfs/v1 x25519 wrap", &mut key[..])
        .expect("32-byte HKDF output is within limits");
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key[..]).expect("32-byte key"))
}

fn wrap_aad(key_id: KeyId) -> Vec<u8> {
    [&b"sealfs/v1 x25519"[..], &key_id.0[..]].concat()
}

impl Recipient for PublicKey {
    fn label(&self) -> String {
        self.key_id().to_string()
    }

    fn wrap(&self, key: &LayerKey) -> Result<Vec<Stanza>> {
        let ephemeral = PrivateKey::generate()?;
        let ephemeral_public = ephemeral.public();
        let shared = ephemeral.0.diffie_hellman(&self.0);
        if !shared.was_contributory() {
            return Err(FormatError::BadKeyMaterial {
                what: "public key",
                reason: format!(
                    "{} is a low-order point; it cannot receive keys",
                    self.key_id()
                ),
            });
        }
        let cipher = wrap_cipher(
            shared.as_bytes(),
            ephemeral_public.as_bytes(),
            self.as_bytes(),
        );
        let mut wrapped = key.expose_bytes().to_vec();
        cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(wrap_aad(self.key_id())),
                &mut wrapped,
            )
            .expect("32 bytes are within AES-GCM's limits");
        let mut body = ephemeral_public.as_bytes().to_vec();
        body.extend_from_slice(&wrapped);
        Ok(vec![Stanza {
            kind: STANZA_X25519,
            key_id: self.key_id(),
            body,
        }])
    }
}

impl Identity for PrivateKey {
    fn label(&self) -> String {
        self.public().key_id().to_string()
    }

    fn unwrap(&self, stanza: &Stanza) -> Option<Result<LayerKey>> {
        let public = self.public();
        if stanza.kind != STANZA_X25519 || stanza.key_id != public.key_id() {
            return None;
        }
        let bad = || FormatError::BadKeyMaterial {
            what: "wrapped key",
            reason: format!(
                "the stanza for key {} does not decrypt (damaged annotation)",
                stanza.key_id
            ),
        };
        let ephemeral: [u8; 32] = match stanza.body.get(..32).and_then(|b| b.try_into().ok()) {
            Some(e) => e,
            None => return Some(Err(bad())),
        };
        let shared = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Some(Err(bad()));
        }
        let cipher = wrap_cipher(shared.as_bytes(), &ephemeral, public.as_bytes());
        let mut wrapped = Zeroizing::new(stanza.body[32..].to_vec());
        let opened = cipher.open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(wrap_aad(stanza.key_id)),
            &mut wrapped,
        );
        Some(match opened {
            Ok(plain) if plain.len() == KEY_LEN => Ok(LayerKey::from_bytes(
                plain.try_into().expect("length checked"),
            )),
            _ => Err(bad()),
        })
    }
}

/// Unwraps the layer key with the first identity that has a stanza, or says which key ids were
/// tried against which recipients.
pub fn unwrap_layer_key(identities: &[&dyn Identity], stanzas: &[Stanza]) -> Result<LayerKey> {
    unwrap_layer_key_by(identities, stanzas).map(|(key, _)| key)
}

/// Like [`unwrap_layer_key`], also naming the identity that opened it (its [`Identity::label`]).
pub fn unwrap_layer_key_by(
    identities: &[&dyn Identity],
    stanzas: &[Stanza],
) -> Result<(LayerKey, String)> {
    let mut last_error = None;
    for identity in identities {
        for stanza in stanzas {
            match identity.unwrap(stanza) {
                Some(Ok(key)) => return Ok((key, identity.label())),
                Some(Err(e)) => last_error = Some(e),
                None => {}
            }
        }
    }
    if let Some(error) = last_error {
        return Err(error);
    }
    let join = |ids: Vec<String>| ids.join(", ");
    Err(FormatError::NoMatchingKey {
        tried: join(identities.iter().map(|i| i.label()).collect()),
        recipients: join(stanzas.iter().map(Stanza::recipient_label).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_key_text() {
        let alice = PrivateKey::generate().unwrap();
        let bob = PrivateKey::generate().unwrap();
        let key = LayerKey::from_bytes([42; 32]);
        let stanzas = alice.public().wrap(&key).unwrap();
        let decoded: Vec<Stanza> = stanzas
            .iter()
            .map(|s| Stanza::decode(&s.encode()).unwrap())
            .collect();
        assert_eq!(decoded, stanzas);
        let got = unwrap_layer_key(&[&bob, &alice], &decoded).unwrap();
        assert_eq!(got.expose_bytes(), key.expose_bytes());

        let err = unwrap_layer_key(&[&bob], &decoded).unwrap_err().to_string();
        assert!(err.contains(&bob.public().key_id().to_string()), "{err}");
        assert!(err.contains(&alice.public().key_id().to_string()), "{err}");

        let mut damaged = decoded[0].clone();
        damaged.body[40] ^= 1;
        assert!(matches!(
            unwrap_layer_key(&[&alice], &[damaged]),
            Err(FormatError::BadKeyMaterial { .. })
        ));

        let text = alice.to_file_text();
        let parsed: PrivateKey = text.parse().unwrap();
        assert_eq!(parsed.public(), alice.public());
        let public: PublicKey = alice.public().to_string().parse().unwrap();
        assert_eq!(public, alice.public());
        assert!(text.parse::<PublicKey>().is_err());
        assert!(!format!("{alice:?}").contains(&text[text.find("PRIV:").unwrap() + 5..]));
    }

    #[test]
    fn keyprovider_stanzas_carry_the_provider_and_its_answer() {
        let stanza = Stanza::for_provider("kms-1", b"opaque answer").unwrap();
        let decoded = Stanza::decode(&stanza.encode()).unwrap();
        assert_eq!(decoded, stanza);
        assert_eq!(decoded.provider(), Some(("kms-1", &b"opaque answer"[..])));
        assert_eq!(decoded.key_id, provider_key_id("kms-1"));
        assert_eq!(decoded.recipient_label(), "provider:kms-1");

        // An X25519 identity has nothing to say about it, and the error names the provider.
        let alice = PrivateKey::generate().unwrap();
        let err = unwrap_layer_key(&[&alice], &[decoded])
            .unwrap_err()
            .to_string();
        assert!(err.contains("provider:kms-1"), "{err}");

        for name in ["", "a/b", "x y", &"n".repeat(65)] {
            assert!(Stanza::for_provider(name, b"x").is_err(), "{name:?}");
        }
        assert!(Stanza::for_provider("kms", b"").is_err());
        assert!(Stanza::for_provider("kms", &vec![7; MAX_PROVIDER_WRAPPED + 1]).is_err());

        // Damaged encodings: a name longer than the body, a key id of another provider.
        let mut truncated = stanza.clone();
        truncated.body[0] = 200;
        assert!(Stanza::decode(&truncated.encode()).is_err());
        let mut other = stanza.clone();
        other.key_id = provider_key_id("kms-2");
        assert!(Stanza::decode(&other.encode()).is_err());
    }
}
