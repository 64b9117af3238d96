//! Threshold splitting of a private key: k-of-n Shamir shares over GF(256) (crate `blahaj`).
//!
//! Every share carries, besides its own point, a SHA-256 commitment to every share of the split
//! and the id of the key that was split. At combine time a share whose bytes do not match its
//! commitment, or whose commitment list disagrees with the others', is named as bad instead of
//! silently producing a wrong key; the combined key is checked against the key id last.
//!
//! ```text
//! share = "sealfs-share1:" base64url(
//!     version 1 (1) || threshold (1) || total (1) || key_id (8) || point_len (1) || point
//!     || total × commitment (32) )
//! commitment_i = SHA-256("sealfs/v1 share" || key_id || point_i)
//! ```

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{FormatError, Result};
use crate::keywrap::{KeyId, PrivateKey};

const SHARE_PREFIX: &str = "sealfs-share1:";

/// One share of a split private key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyShare {
    threshold: u8,
    total: u8,
    key_id: KeyId,
    point: Zeroizing<Vec<u8>>,
    commitments: Vec<[u8; 32]>,
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyShare(#{} of {}, key {})",
            self.number(),
            self.total,
            self.key_id
        )
    }
}

fn commitment(key_id: KeyId, point: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"sealfs/v1 share")
        .chain_update(key_id.0)
        .chain_update(point)
        .finalize()
        .into()
}

impl KeyShare {
    /// The share's number, 1..=total (its x coordinate).
    pub fn number(&self) -> u8 {
        self.point.first().copied().unwrap_or(0)
    }

    /// How many shares are needed.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// The id of the key that was split.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Whether this share matches its own commitment.
    fn is_self_consistent(&self) -> bool {
        let n = self.number();
        n >= 1
            && usize::from(n) <= self.commitments.len()
            && self.commitments[usize::from(n) - 1] == commitment(self.key_id, &self.point)
    }

    /// The text form, one line. Contains secret material.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut bytes = Zeroizing::new(vec![1, self.threshold, self.total]);
        bytes.extend_from_slice(&self.key_id.0);
        bytes.push(self.point.len() as u8);
        bytes.extend_from_slice(&self.point);
        for c in &self.commitments {
            bytes.extend_from_slice(c);
        }
        let encoded = Zeroizing::new(URL_SAFE_NO_PAD.encode(&bytes[..]));
        Zeroizing::new(format!("{SHARE_PREFIX}{}\n", encoded.as_str()))
    }

    /// Parses the text form (comment lines starting with `#` are ignored).
    pub fn from_text(text: &str) -> Result<Self> {
        let bad = |reason: &str| FormatError::BadKeyMaterial {
            what: "key share",
            reason: reason.into(),
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| bad("empty"))?;
        let encoded = line
            .strip_prefix(SHARE_PREFIX)
            .ok_or_else(|| bad("expected a line starting with sealfs-share1:"))?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(encoded)
                .map_err(|_| bad("not base64url"))?,
        );
        if bytes.len() < 12 || bytes[0] != 1 {
            return Err(bad("unknown version or truncated"));
        }
        let (threshold, total) = (bytes[1], bytes[2]);
        let key_id = KeyId(bytes[3..11].try_into().unwrap());
        let point_len = usize::from(bytes[11]);
        let rest = &bytes[12..];
        if threshold < 2 || threshold > total || rest.len() != point_len + 32 * usize::from(total) {
            return Err(bad("inconsistent lengths (truncated or damaged share)"));
        }
        Ok(KeyShare {
            threshold,
            total,
            key_id,
            point: Zeroizing::new(rest[..point_len].to_vec()),
            commitments: rest[point_len..]
                .chunks(32)
                .map(|c| c.try_into().unwrap())
                .collect(),
        })
    }
}

/// Splits `key` into `total` shares of which any `threshold` recover it.
pub fn split(key: &PrivateKey, threshold: u8, total: u8) -> Result<Vec<KeyShare>> {
    if threshold < 2 || threshold > total {
        return Err(FormatError::InvalidArgument(format!(
            "threshold {threshold} must be at least 2 and at most the number of shares ({total})"
        )));
    }
    let secret = key.expose_bytes();
    let key_id = key.public().key_id();
    let points: Vec<Zeroizing<Vec<u8>>> = blahaj::Sharks(threshold)
        .dealer(&secret[..])
        .take(usize::from(total))
        .map(|share| Zeroizing::new(Vec::from(&share)))
        .collect();
    let commitments: Vec<[u8; 32]> = points.iter().map(|p| commitment(key_id, p)).collect();
    Ok(points
        .into_iter()
        .map(|point| KeyShare {
            threshold,
            total,
            key_id,
            point,
            commitments: commitments.clone(),
        })
        .collect())
}

/// Combines shares into the private key, naming any share that is corrupt or foreign.
pub fn combine(shares: &[KeyShare]) -> Result<PrivateKey> {
    let first = shares
        .first()
        .ok_or_else(|| FormatError::Shares("no shares given".into()))?;
    if let Some(other) = shares.iter().find(|s| s.key_id != first.key_id) {
        return Err(FormatError::Shares(format!(
            "share #{} belongs to key {} but share #{} to key {}: shares of different keys",
            other.number(),
            other.key_id,
            first.number(),
            first.key_id
        )));
    }
    // The commitment list most shares agree on is the split's; a share that disagrees, or does
    // not match its own entry, is bad.
    let mut votes: HashMap<&[[u8; 32]], usize> = HashMap::new();
    for share in shares {
        *votes.entry(&share.commitments).or_default() += 1;
    }
    let consensus = votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(list, _)| list)
        .unwrap_or_default();
    let mut bad = Vec::new();
    let mut good: Vec<&KeyShare> = Vec::new();
    for share in shares {
        if share.commitments != consensus || !share.is_self_consistent() {
            bad.push(format!("#{}", share.number()));
        } else if !good.iter().any(|g| g.number() == share.number()) {
            good.push(share);
        }
    }
    if !bad.is_empty() {
        return Err(FormatError::Shares(format!(
            "share {} of key {} is corrupted or not from this split; drop it and use another",
            bad.join(", "),
            first.key_id
        )));
    }
    if good.len() < usize::from(first.threshold) {
        return Err(FormatError::Shares(format!(
            "{} distinct share(s) given but key {} needs {}",
            good.len(),
            first.key_id,
            first.threshold
        )));
    }
    let points: Vec<blahaj::Share> = good
        .iter()
        .map(|s| blahaj::Share::try_from(&s.point[..]))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| FormatError::Shares(format!("unreadable share: {e}")))?;
    let secret = Zeroizing::new(
        blahaj::Sharks(first.threshold)
            .recover(&points)
            .map_err(|e| FormatError::Shares(format!("shares do not combine: {e}")))?,
    );
    let key = PrivateKey::from_slice(&secret)
        .ok_or_else(|| FormatError::Shares("shares do not hold a 32-byte key".into()))?;
    if key.public().key_id() != first.key_id {
        return Err(FormatError::Shares(format!(
            "the shares combine to a key other than {}: at least one share is wrong",
            first.key_id
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_of_n() {
        let key = PrivateKey::generate().unwrap();
        let shares = split(&key, 3, 5).unwrap();
        let parsed: Vec<KeyShare> = shares
            .iter()
            .map(|s| KeyShare::from_text(&s.to_text()).unwrap())
            .collect();
        assert_eq!(parsed, shares);
        let got = combine(&parsed[1..4]).unwrap();
        assert_eq!(got.public(), key.public());
        let got = combine(&[parsed[4].clone(), parsed[0].clone(), parsed[2].clone()]).unwrap();
        assert_eq!(got.public(), key.public());
        let err = combine(&parsed[..2]).unwrap_err().to_string();
        assert!(err.contains("needs 3"), "{err}");
        // A share listed twice does not count twice.
        assert!(combine(&[parsed[0].clone(), parsed[0].clone(), parsed[1].clone()]).is_err());
    }

    #[test]
    fn bad_share_is_named() {
        let key = PrivateKey::generate().unwrap();
        let mut shares = split(&key, 2, 3).unwrap();
        shares[1].point[5] ^= 1;
        let err = combine(&shares).unwrap_err().to_string();
        assert!(err.contains("#2") && err.contains("corrupted"), "{err}");
        // Shares of another key are told apart.
        let other = split(&PrivateKey::generate().unwrap(), 2, 3).unwrap();
        let err = combine(&[shares[0].clone(), other[1].clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("different keys"), "{err}");
    }
}
