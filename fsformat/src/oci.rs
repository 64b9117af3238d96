//! How a sealed layer appears in an OCI manifest: its media type and the annotations on its
//! descriptor. Names start with `containerd.io/snapshot/` because containerd copies such
//! annotations into the snapshotter's Prepare labels, so the snapshotter learns everything it
//! needs about a layer without fetching the manifest again. Each value stays well below
//! containerd's 4096-byte label limit.

use crate::error::{FormatError, Result};
use crate::keywrap::{KeyId, Stanza};

/// Media type of a sealed layer blob. It starts with `application/vnd.oci.image.layer.` as
/// ocicrypt's `...tar+gzip+encrypted` does, because containerd treats only such media types as
/// layers: its unpacker sends a remote snapshotter the layer's labels (and so can skip the
/// download) only for them.
pub const MEDIA_TYPE_SEALED_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+sealfs";
/// Annotation: `sha256:` digest of the blob's tail (sealed index plus footer).
pub const ANNOTATION_INDEX_DIGEST: &str = "containerd.io/snapshot/sealfs.index.digest";
/// Annotation: length in bytes of the tail, so one range request fetches it.
pub const ANNOTATION_INDEX_SIZE: &str = "containerd.io/snapshot/sealfs.index.size";
/// Annotation prefix: one wrapped layer key per recipient, suffixed with the key id.
pub const ANNOTATION_KEY_PREFIX: &str = "containerd.io/snapshot/sealfs.key.";
/// Annotation that images sealed by sealfs before image format v2 carried: the plain layer's
/// diff id. Readers ignore it; its presence tells such an image apart (see [`SEALED_IMAGE_VERSION`]).
pub const ANNOTATION_LEGACY_SOURCE_DIFF_ID: &str = "containerd.io/snapshot/sealfs.source.diff-id";
/// Manifest annotation marking a sealed image, with the image format version.
pub const ANNOTATION_SEALED_IMAGE: &str = "org.sealfs.sealed";
/// The image format version this crate writes in [`ANNOTATION_SEALED_IMAGE`]. Version 2 made
/// each sealed layer's diff id [`sealed_diff_id`]; version 1 images kept the plain layers' diff
/// ids, which nothing on the node could check, and must be sealed again.
pub const SEALED_IMAGE_VERSION: &str = "v2";

/// The diff id a sealed image's config lists for a sealed layer: a domain-separated hash of the
/// layer's tail digest (the manifest pins the tail, the tail pins every chunk and, through its
/// key commitment, the key). containerd derives snapshot identities (chain ids) from diff ids,
/// so a sealed layer's snapshot identity is a function of what is authenticated: no image can
/// claim another image's diff ids for content of its own.
///
/// ```text
/// sealed_diff_id = "sha256:" || hex(SHA-256("sealfs/v2 diff id" || index_digest))
/// ```
/// where `index_digest` is the `sealfs.index.digest` annotation's text (`sha256:<hex>`).
pub fn sealed_diff_id(index_digest: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"sealfs/v2 diff id");
    hash.update(index_digest.as_bytes());
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// What a sealed layer's descriptor says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedLayerAnnotations {
    /// Digest of the tail.
    pub index_digest: String,
    /// Length of the tail.
    pub index_size: u64,
    /// Wrapped layer keys.
    pub stanzas: Vec<Stanza>,
}

impl SealedLayerAnnotations {
    /// The annotations as key/value pairs, to add to a descriptor after removing the old ones
    /// (see [`is_sealfs_annotation`]).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let mut pairs = vec![
            (
                ANNOTATION_INDEX_DIGEST.to_string(),
                self.index_digest.clone(),
            ),
            (
                ANNOTATION_INDEX_SIZE.to_string(),
                self.index_size.to_string(),
            ),
        ];
        for stanza in &self.stanzas {
            pairs.push((
                format!("{ANNOTATION_KEY_PREFIX}{}", stanza.key_id),
                stanza.encode(),
            ));
        }
        pairs
    }

    /// Reads the annotations of a sealed layer descriptor.
    pub fn read_from<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Self> {
        let bad = |reason: String| FormatError::BadKeyMaterial {
            what: "layer annotations",
            reason,
        };
        let mut index_digest = None;
        let mut index_size = None;
        let mut stanzas = Vec::new();
        for (key, value) in map {
            if key == ANNOTATION_INDEX_DIGEST {
                let ok = value
                    .strip_prefix("sha256:")
                    .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                if !ok {
                    return Err(bad(format!(
                        "{ANNOTATION_INDEX_DIGEST} is not a sha256 digest"
                    )));
                }
                index_digest = Some(value.clone());
            } else if key == ANNOTATION_INDEX_SIZE {
                index_size = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| bad(format!("{ANNOTATION_INDEX_SIZE} is not a number")))?,
                );
            } else if let Some(id) = key.strip_prefix(ANNOTATION_KEY_PREFIX) {
                let stanza = Stanza::decode(value)?;
                let id: KeyId = id.parse()?;
                if stanza.key_id != id {
                    return Err(bad(format!(
                        "wrapped key annotation {key} holds a key for {}",
                        stanza.key_id
                    )));
                }
                stanzas.push(stanza);
            }
        }
        Ok(SealedLayerAnnotations {
            index_digest: index_digest
                .ok_or_else(|| bad(format!("{ANNOTATION_INDEX_DIGEST} is missing")))?,
            index_size: index_size
                .ok_or_else(|| bad(format!("{ANNOTATION_INDEX_SIZE} is missing")))?,
            stanzas,
        })
    }
}

/// Whether a descriptor annotation belongs to sealfs (and is rewritten with the layer's facts).
pub fn is_sealfs_annotation(key: &str) -> bool {
    key.starts_with("containerd.io/snapshot/sealfs.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_diff_ids_are_domain_separated_digests_of_the_tail_digest() {
        let tail = format!("sha256:{}", "ab".repeat(32));
        let id = sealed_diff_id(&tail);
        assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
        assert_ne!(id, tail, "not the tail digest itself");
        assert_ne!(id, sealed_diff_id(&format!("sha256:{}", "ac".repeat(32))));
        // A fixed vector (computed independently with Python's hashlib), so a second
        // implementation can check its derivation against docs/format.md.
        assert_eq!(
            id,
            "sha256:5c23bd831b9be107115b74059635c35a3370e305cfee535f2ac78a98b873d727"
        );
    }
}
