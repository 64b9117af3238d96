//! What containerd's `Prepare` labels say about a sealed layer (CRI's and stargz's spellings),
//! the labels a remote snapshot keeps, and what is stored to mount it again.

use std::collections::{BTreeMap, HashMap};

use oci_spec::image::Descriptor;

/// The label naming the committed snapshot a layer's `Prepare` is for (its chain id).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The label a remote snapshot carries: the digest of the sealed layer mounted there.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/sealfs.remote-layer";
/// A sealed layer's descriptor annotation, copied into the `Prepare` labels by containerd's
/// unpacker (it copies every `containerd.io/snapshot/` annotation): its presence says the
/// layer is sealed without asking the registry.
pub const SEALED_MARKER_LABEL: &str = fsformat::oci::ANNOTATION_INDEX_DIGEST;

/// Image reference, layer digest and manifest digest, as CRI spells them.
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// ... and as stargz-snapshotter's `ctr-remote image rpull` spells them.
const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// What a layer's `Prepare` labels say about a sealed layer to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRequest {
    /// The image reference (`HOST/REPO[:TAG][@DIGEST]`).
    pub image: String,
    /// The layer's blob digest.
    pub layer: String,
    /// The manifest digest, when the client sent it (CRI does).
    pub manifest: Option<String>,
    /// The index digest from the layer annotations of the manifest containerd pulled and
    /// verified: the manifest this node fetches must agree (a tag may have moved, or a
    /// registry may lie).
    pub index_digest: String,
}

impl LayerRequest {
    /// Reads the request from `Prepare` labels; `None` when they do not ask for a sealed
    /// layer (no target, no image or layer, or not sealed): containerd then unpacks the layer
    /// itself, as with any snapshotter.
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        let get = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
        get(TARGET_LABEL)?;
        let index_digest = get(SEALED_MARKER_LABEL)?;
        let image = get(CRI_IMAGE_REF).or_else(|| get(STARGZ_REFERENCE))?;
        let layer = get(CRI_LAYER_DIGEST).or_else(|| get(STARGZ_DIGEST))?;
        Some(LayerRequest {
            image,
            layer,
            manifest: get(CRI_MANIFEST_DIGEST),
            index_digest,
        })
    }
}

/// The image a layer's Prepare labels name, sealed layer or not: its reference and, when the
/// client sent it, its manifest digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageNamed {
    /// The image reference (`HOST/REPO[:TAG][@DIGEST]`).
    pub image: String,
    /// The manifest digest (CRI and `sealctl pull` send it).
    pub manifest: Option<String>,
}

impl ImageNamed {
    /// Reads it from the labels of a layer's Prepare (one with a target); `None` when they
    /// name no image (a plain `ctr image pull` sends no labels).
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Self> {
        let get = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
        get(TARGET_LABEL)?;
        Some(ImageNamed {
            image: get(CRI_IMAGE_REF).or_else(|| get(STARGZ_REFERENCE))?,
            manifest: get(CRI_MANIFEST_DIGEST),
        })
    }

    /// The reference to resolve: pinned to the manifest digest when the client named it.
    pub fn pinned(&self) -> String {
        match &self.manifest {
            // Pin to what the client resolved; drop a digest the reference already carried.
            Some(manifest) => format!(
                "{}@{manifest}",
                self.image.split('@').next().unwrap_or_default()
            ),
            None => self.image.clone(),
        }
    }
}

/// Where a remote snapshot's content comes from: enough to mount it again.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayerSource {
    /// The image, pinned to its manifest digest.
    pub reference: String,
    /// The layer's descriptor from that manifest (media type, size, sealed annotations).
    pub descriptor: Descriptor,
    /// The containerd namespace whose Prepare mounted it (empty: none was given); a remount
    /// is held to the key access rules for it.
    #[serde(default)]
    pub namespace: String,
    /// What unwrapped its key (a key id or `provider:NAME`); empty until it is mounted.
    #[serde(default)]
    pub opened_by: String,
}

impl RemoteLayerSource {
    /// The layer digest.
    pub fn digest(&self) -> String {
        self.descriptor.digest().to_string()
    }

    /// The layer's diff id in its sealed image's config: derived from the tail digest the
    /// manifest pins (and the mount verifies), see [`fsformat::oci::sealed_diff_id`].
    pub fn sealed_diff_id(&self) -> String {
        let index_digest = self
            .descriptor
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SEALED_MARKER_LABEL))
            .map(String::as_str)
            .unwrap_or_default();
        fsformat::oci::sealed_diff_id(index_digest)
    }
}

/// Labels of a remote snapshot: the `Prepare` labels containerd asks to keep (non-empty ones,
/// as containerd drops empty values on commit) and the remote marker.
pub fn snapshot_labels(labels: &HashMap<String, String>, layer: &str) -> BTreeMap<String, String> {
    let mut kept: BTreeMap<String, String> = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.insert(REMOTE_LABEL.to_string(), layer.to_string());
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layer_requests_come_from_cri_or_stargz_labels_of_sealed_layers() {
        let cri = labels(&[
            (TARGET_LABEL, "sha256:chain"),
            (SEALED_MARKER_LABEL, "sha256:index"),
            (CRI_IMAGE_REF, "reg.local/app:1"),
            (CRI_LAYER_DIGEST, "sha256:layer"),
            (CRI_MANIFEST_DIGEST, "sha256:manifest"),
        ]);
        assert_eq!(
            LayerRequest::from_labels(&cri),
            Some(LayerRequest {
                image: "reg.local/app:1".into(),
                layer: "sha256:layer".into(),
                manifest: Some("sha256:manifest".into()),
                index_digest: "sha256:index".into(),
            })
        );
        let stargz = labels(&[
            (TARGET_LABEL, "sha256:chain"),
            (SEALED_MARKER_LABEL, "sha256:index"),
            (STARGZ_REFERENCE, "reg.local/app:1"),
            (STARGZ_DIGEST, "sha256:layer"),
            ("containerd.io/snapshot/remote/urls", ""),
        ]);
        let request = LayerRequest::from_labels(&stargz).unwrap();
        assert_eq!(
            (request.layer.as_str(), request.manifest),
            ("sha256:layer", None)
        );

        // Not a request: no target (a container's snapshot), not sealed (a plain layer, whose
        // descriptor has no sealfs annotation), or no image to find it in.
        for missing in [
            TARGET_LABEL,
            SEALED_MARKER_LABEL,
            CRI_IMAGE_REF,
            CRI_LAYER_DIGEST,
        ] {
            let mut partial = cri.clone();
            partial.remove(missing);
            assert_eq!(
                LayerRequest::from_labels(&partial),
                None,
                "without {missing}"
            );
        }
        let mut empty = cri.clone();
        empty.insert(SEALED_MARKER_LABEL.into(), String::new());
        assert_eq!(LayerRequest::from_labels(&empty), None);
    }

    #[test]
    fn remote_snapshot_labels_keep_what_containerd_keeps_and_mark_the_layer() {
        let kept = snapshot_labels(
            &labels(&[
                (TARGET_LABEL, "sha256:chain"),
                ("containerd.io/snapshot/remote/urls", ""),
            ]),
            "sha256:layer",
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[TARGET_LABEL], "sha256:chain");
        assert_eq!(kept[REMOTE_LABEL], "sha256:layer");
    }
}
