//! Why a remote layer could not be prepared.

use std::time::Duration;

use crate::keys::KeyError;
use crate::mount::MountError;
use crate::registry::RegistryError;

use super::TARGET_LABEL;

/// Why a remote layer could not be mounted. Messages name the layer and image; never a key.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The layer is sealed for keys this workload may not use (`[[key_access]]`).
    #[error("layer {layer} of {image}: it is sealed for {keys}, which the node's [[key_access]] rules do not allow for {workload}")]
    KeyNotAuthorised {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The keys (key ids or `provider:NAME`) that would open it.
        keys: String,
        /// The containerd namespace and image repository that asked.
        workload: String,
    },
    /// The image reference does not parse, or the registry failed.
    #[error("layer {layer} of {image}")]
    Registry {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// What failed.
        #[source]
        source: Box<RegistryError>,
    },
    /// The registry's manifest describes the layer differently from the one containerd pulled.
    #[error("layer {layer}: the manifest of {image} in the registry pins index {found}, but the one containerd pulled pins {expected}; was the tag moved during the pull?")]
    ManifestMismatch {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The index digest in containerd's labels.
        expected: String,
        /// The index digest in the registry's manifest.
        found: String,
    },
    /// The image was sealed in an older image format, whose diff ids nothing can check.
    #[error("layer {layer} of {image}: the image was sealed in sealfs image format {found}, which this node no longer accepts (its config lists the plain layers' diff ids, which nothing on the node can check); seal the original image again with the current sealctl (format {current})", current = fsformat::oci::SEALED_IMAGE_VERSION)]
    LegacyFormat {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The format version the manifest names.
        found: String,
    },
    /// The snapshot containerd asked for (a chain id from the image config) is not the one the
    /// sealed content authenticates: the config claims diff ids its layers do not have.
    #[error("layer {layer} of {image}: containerd asked for snapshot {target}, but the sealed layer on that parent is snapshot {expected} (chain id of its sealed diff id {diff_id}); the image config claims diff ids its sealed layers do not have, so the layer is refused")]
    ChainIdMismatch {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The chain id containerd computed (the Prepare's target).
        target: String,
        /// The chain id of the sealed content on the given parent.
        expected: String,
        /// The sealed layer's diff id.
        diff_id: String,
    },
    /// The parent snapshot's chain id is unknown, so the layer's cannot be checked.
    #[error("layer {layer} of {image}: the parent snapshot {parent} has no chain id (no {TARGET_LABEL} label and not named by one), so the sealed layer's identity cannot be checked")]
    UnknownParent {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// The parent snapshot.
        parent: String,
    },
    /// The manifest does not list the layer.
    #[error("layer {layer} is not in the manifest of {image}")]
    NotInManifest {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
    },
    /// The image fails the signature policy: nothing of it was unwrapped or mounted.
    #[error("image {image} ({digest}) is refused by the signature policy (scope {scope})")]
    Signature {
        /// The image as asked for.
        image: String,
        /// Its manifest digest.
        digest: String,
        /// The policy scope that requires a signature.
        scope: String,
        /// Why.
        #[source]
        source: Box<crate::signature::SignatureError>,
    },
    /// The node's keys could not be read.
    #[error("loading the node's keys")]
    Keys(#[from] KeyError),
    /// The layer could not be opened (key, index) or mounted.
    #[error("layer {layer} of {image}")]
    Mount {
        /// The image.
        image: String,
        /// The layer.
        layer: String,
        /// What failed.
        #[source]
        source: Box<MountError>,
    },
    /// Another Prepare of the same layer did not finish in time.
    #[error("snapshot {target}: another Prepare of this layer has been running for {waited:?}; try again")]
    Busy {
        /// The target snapshot.
        target: String,
        /// How long this one waited.
        waited: Duration,
    },
    /// A stored source does not parse (a damaged database).
    #[error("remote snapshot record: {0}")]
    Record(String),
}
