//! Key derivation and the AEAD constructions for chunks and the index.
//!
//! One random 32-byte layer key per layer. Everything else is derived from it with
//! HKDF-SHA-256, salted with the layer's random 16-byte id:
//!
//! ```text
//! prk        = HKDF-Extract(salt = "sealfs/v1" || layer_id, ikm = layer_key)
//! chunk_key  = HKDF-Expand(prk, "sealfs/v1 chunk key", 32)
//! index_key  = HKDF-Expand(prk, "sealfs/v1 index key", 32)
//! commitment = HKDF-Expand(prk, "sealfs/v1 key commitment", 32)
//! ```
//!
//! Chunk `i` is sealed with AES-256-GCM under `chunk_key`, nonce `0u32 || u64be(i)` (a chunk
//! number is used once per layer, so nonces never repeat under one key), and an AAD that binds the
//! layer id, the chunk number, its offset and lengths, its compression and whether it is last.
//! The index is sealed once under `index_key` with the all-zero nonce and the footer as AAD.
//! AES-GCM is not key-committing, so the footer carries `commitment`: a wrong key is reported
//! as such instead of as damage. `ring` provides AES-GCM because it decrypts ~3x faster than the
//! `aes-gcm` crate on this hardware (see `perf -- format`), which is what keeps decode close to
//! plain zstd speed.

use hkdf::Hkdf;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{FormatError, Result};

/// Length of every symmetric key in the format.
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM tag (full length, never truncated).
pub const TAG_LEN: usize = 16;
/// Length of a layer id.
pub const LAYER_ID_LEN: usize = 16;
/// Length of the key commitment.
pub const COMMITMENT_LEN: usize = 32;

const NONCE_LEN: usize = 12;
const CHUNK_AAD_LABEL: &[u8] = b"sealfs/v1 chunk";
const INDEX_AAD_LABEL: &[u8] = b"sealfs/v1 index";

/// Fills `buf` from the operating system's random number generator.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|_| FormatError::Random)
}

/// The per-layer data key. Fresh and random for every sealed layer; zeroized on drop and never
/// printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct LayerKey([u8; KEY_LEN]);

impl LayerKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut key = [0u8; KEY_LEN];
        random_bytes(&mut key)?;
        Ok(LayerKey(key))
    }

    /// A key from its raw bytes (after unwrapping).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        LayerKey(bytes)
    }

    /// The raw bytes, for wrapping only.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerKey(<redacted>)")
    }
}

/// A layer's random id: salts the key derivation and is bound into every chunk's AAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerId(pub [u8; LAYER_ID_LEN]);

impl LayerId {
    /// A fresh random id.
    pub fn generate() -> Result<Self> {
        let mut id = [0u8; LAYER_ID_LEN];
        random_bytes(&mut id)?;
        Ok(LayerId(id))
    }
}

/// How a chunk's plaintext was encoded before sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    /// Stored as is (used when zstd would not make it smaller).
    Stored = 0,
    /// One zstd frame.
    Zstd = 1,
}

impl Compression {
    /// Parses the on-disk byte.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Compression::Stored),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Everything a chunk's AAD binds it to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkBinding {
    /// The chunk number.
    pub index: u32,
    /// The chunk's offset in the blob.
    pub offset: u64,
    /// Sealed length (payload plus tag).
    pub sealed_len: u32,
    /// Plaintext length after decompression.
    pub plain_len: u32,
    /// How the payload is encoded.
    pub compression: Compression,
    /// Whether this is the layer's last chunk.
    pub last: bool,
}

impl ChunkBinding {
    const AAD_LEN: usize = CHUNK_AAD_LABEL.len() + LAYER_ID_LEN + 4 + 8 + 4 + 4 + 1 + 1;

    fn aad(&self, layer_id: &LayerId) -> [u8; Self::AAD_LEN] {
        let mut aad = [0u8; Self::AAD_LEN];
        let mut at = 0;
        for part in [
            CHUNK_AAD_LABEL,
            &layer_id.0,
            &self.index.to_le_bytes(),
            &self.offset.to_le_bytes(),
            &self.sealed_len.to_le_bytes(),
            &self.plain_len.to_le_bytes(),
            &[self.compression as u8, u8::from(self.last)],
        ] {
            aad[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        aad
    }

    fn nonce(&self) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&u64::from(self.index).to_be_bytes());
        Nonce::assume_unique_for_key(nonce)
    }
}

/// The keys derived from one layer key and layer id.
pub struct LayerKeys {
    layer_id: LayerId,
    chunk: LessSafeKey,
    index: LessSafeKey,
    commitment: [u8; COMMITMENT_LEN],
}

impl LayerKeys {
    /// Derives the chunk key, index key and key commitment.
    pub fn derive(key: &LayerKey, layer_id: LayerId) -> Self {
        let mut salt = Vec::with_capacity(9 + LAYER_ID_LEN);
        salt.extend_from_slice(b"sealfs/v1");
        salt.extend_from_slice(&layer_id.0);
        let hk = Hkdf::<Sha256>::new(Some(&salt), key.expose_bytes());
        let expand = |info: &[u8]| {
            let mut out = [0u8; KEY_LEN];
            // SAFETY-free invariant: 32 bytes is far below HKDF-SHA-256's 255*32 output limit.
            hk.expand(info, &mut out)
                .expect("32-byte HKDF output is within limits");
            out
        };
        let mut chunk_key = expand(b"sealfs/v1 chunk key");
        let mut index_key = expand(b"sealfs/v1 index key");
        let commitment = expand(b"sealfs/v1 key commitment");
        let aead = |bytes: &[u8; KEY_LEN]| {
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key is 32 bytes"))
        };
        let keys = LayerKeys {
            layer_id,
            chunk: aead(&chunk_key),
            index: aead(&index_key),
            commitment,
        };
        chunk_key.zeroize();
        index_key.zeroize();
        keys
    }

    /// The layer id the keys were derived for.
    pub fn layer_id(&self) -> LayerId {
        self.layer_id
    }

    /// The key commitment stored in the footer.
    pub fn commitment(&self) -> &[u8; COMMITMENT_LEN] {
        &self.commitment
    }

    /// Whether `stored` (from a footer) commits to these keys, in constant time.
    pub fn matches_commitment(&self, stored: &[u8; COMMITMENT_LEN]) -> bool {
        self.commitment.ct_eq(stored).into()
    }

    /// Seals a chunk payload in place, appending the tag.
    pub fn seal_chunk(&self, binding: &ChunkBinding, payload: &mut Vec<u8>) {
        let aad = binding.aad(&self.layer_id);
        self.chunk
            .seal_in_place_append_tag(binding.nonce(), Aad::from(&aad[..]), payload)
            .expect("a chunk is far below AES-GCM's length limit");
    }

    /// Authenticates and decrypts a sealed chunk in place; returns the payload.
    pub fn open_chunk<'a>(&self, binding: &ChunkBinding, sealed: &'a mut [u8]) -> Result<&'a [u8]> {
        let aad = binding.aad(&self.layer_id);
        self.chunk
            .open_in_place(binding.nonce(), Aad::from(&aad[..]), sealed)
            .map(|plain| &*plain)
            .map_err(|_| FormatError::ChunkAuth {
                chunk: binding.index,
            })
    }

    /// Seals the (compressed) index in place; `footer_prefix` is the footer without the
    /// commitment, bound as AAD.
    pub fn seal_index(&self, footer_prefix: &[u8], payload: &mut Vec<u8>) {
        let aad = index_aad(footer_prefix);
        self.index
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                Aad::from(&aad[..]),
                payload,
            )
            .expect("the index is far below AES-GCM's length limit");
    }

    /// Authenticates and decrypts the sealed index in place.
    pub fn open_index<'a>(&self, footer_prefix: &[u8], sealed: &'a mut [u8]) -> Result<&'a [u8]> {
        let aad = index_aad(footer_prefix);
        self.index
            .open_in_place(
                Nonce::assume_unique_for_key([0u8; NONCE_LEN]),
                Aad::from(&aad[..]),
                sealed,
            )
            .map(|plain| &*plain)
            .map_err(|_| FormatError::IndexAuth)
    }
}

fn index_aad(footer_prefix: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(INDEX_AAD_LABEL.len() + footer_prefix.len());
    aad.extend_from_slice(INDEX_AAD_LABEL);
    aad.extend_from_slice(footer_prefix);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(index: u32) -> ChunkBinding {
        ChunkBinding {
            index,
            offset: 0,
            sealed_len: 21,
            plain_len: 5,
            compression: Compression::Stored,
            last: false,
        }
    }

    #[test]
    fn chunk_round_trip_and_binding() {
        let keys = LayerKeys::derive(&LayerKey::generate().unwrap(), LayerId([7; 16]));
        let mut sealed = b"hello".to_vec();
        keys.seal_chunk(&binding(3), &mut sealed);
        assert_eq!(sealed.len(), 5 + TAG_LEN);
        let plain = keys
            .open_chunk(&binding(3), &mut sealed.clone())
            .unwrap()
            .to_vec();
        assert_eq!(plain, b"hello");
        // Any change of the binding fails: number, offset, last flag.
        for other in [
            binding(4),
            ChunkBinding {
                offset: 1,
                ..binding(3)
            },
            ChunkBinding {
                last: true,
                ..binding(3)
            },
        ] {
            assert!(matches!(
                keys.open_chunk(&other, &mut sealed.clone()),
                Err(FormatError::ChunkAuth { .. })
            ));
        }
        // Another layer id with the same key fails too.
        let key2 = LayerKeys::derive(&LayerKey::from_bytes([0; 32]), LayerId([7; 16]));
        assert!(key2.open_chunk(&binding(3), &mut sealed.clone()).is_err());
    }

    #[test]
    fn commitment_tells_keys_apart() {
        let id = LayerId([1; 16]);
        let a = LayerKeys::derive(&LayerKey::from_bytes([1; 32]), id);
        let b = LayerKeys::derive(&LayerKey::from_bytes([2; 32]), id);
        assert!(a.matches_commitment(a.commitment()));
        assert!(!a.matches_commitment(b.commitment()));
        assert_eq!(
            format!("{:?}", LayerKey::from_bytes([9; 32])),
            "LayerKey(<redacted>)"
        );
    }
}
