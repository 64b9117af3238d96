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
/// Annotation: the diff id (uncompressed tar digest) of the layer that was sealed.
pub const ANNOTATION_SOURCE_DIFF_ID: &str = "containerd.io/snapshot/sealfs.source.diff-id";
/// Manifest annotation marking a sealed image, with the format version.
pub const ANNOTATION_SEALED_IMAGE: &str = "org.sealfs.sealed";

/// What a sealed layer's descriptor says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedLayerAnnotations {
    /// Digest of the tail.
    pub index_digest: String,
    /// Length of the tail.
    pub index_size: u64,
    /// Wrapped layer keys.
    pub stanzas: Vec<Stanza>,
    /// The original layer's diff id.
    pub source_diff_id: Option<String>,
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
        if let Some(diff_id) = &self.source_diff_id {
            pairs.push((ANNOTATION_SOURCE_DIFF_ID.to_string(), diff_id.clone()));
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
        let mut source_diff_id = None;
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
            } else if key == ANNOTATION_SOURCE_DIFF_ID {
                source_diff_id = Some(value.clone());
            }
        }
        Ok(SealedLayerAnnotations {
            index_digest: index_digest
                .ok_or_else(|| bad(format!("{ANNOTATION_INDEX_DIGEST} is missing")))?,
            index_size: index_size
                .ok_or_else(|| bad(format!("{ANNOTATION_INDEX_SIZE} is missing")))?,
            stanzas,
            source_diff_id,
        })
    }
}

/// Whether a descriptor annotation belongs to sealfs (and is rewritten with the layer's facts).
pub fn is_sealfs_annotation(key: &str) -> bool {
    key.starts_with("containerd.io/snapshot/sealfs.")
}
