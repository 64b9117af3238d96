//! The node side of sealfs. A read goes one way, each module knowing only those below it:
//!
//! ```text
//!  kernel ── /dev/fuse ──> fuse (FuseAdapter, one session, fixed threads; fuse::session)
//!                            │  inode = slot << 32 | ino
//!                            v
//!                          fs::table::LayerTable ──> fs::LayerFs (one sealed layer's tree)
//!                                                      │ chunk numbers
//!                                                      v
//!                          fetcher::LayerFetcher::chunk
//!                            1. cache::Tiered: LayerMemory (plaintext, the node-wide LRU),
//!                               then SealedDisk (ciphertext, authenticated on every hit)
//!                            2. claim in the layer's in-flight table, queue an urgent job
//!                               on fetcher::FetchPool (node-wide workers; profile and
//!                               background feeds after urgent work, behind a gate)
//!                                                      │ range reads
//!                                                      v
//!                          source::ChunkSource: source::LocalBlob | registry blob
//! ```
//!
//! Sealed bytes come back up through `fsformat`, which verifies and decrypts them, into the
//! caches and the reply. Threads belong to the node, not to layers: one FUSE session
//! (`[fetch] fuse_threads`) and one fetch pool (`[fetch] threads`) serve every mounted layer.
//!
//! Around the read path: [`hardening`] (private directories, no core dumps),
//! [`oci_layout`] (image access), [`mount_table`] (overlay, bind and lazy
//! unmounts), [`mount`] (open a sealed layer: unwrap its key, verify its tail, build its fs;
//! mount an image), [`registry`] with [`credentials`] and [`hosts`], [`snapshot`]
//! (containerd's snapshot model on overlayfs, state in redb), [`filters`] (containerd's filter
//! syntax for Walk), [`keys`] (the node's keys) with [`keyprovider`] (layer keys a KMS or an
//! attestation agent wraps, ocicrypt's protocol) and [`key_access`] (which containerd namespace
//! and image each key may open layers for, by [`image_scope`]), [`remote`] (sealed layers named by
//! containerd's labels, mounted as directories of the node's session; their tails fetched
//! ahead by [`tails_ahead`]), [`node_session`] (that one FUSE session, whose descriptor
//! [`session_keeper`] holds so that a restarted daemon resumes it and running containers keep
//! reading), [`signature`] (cosign signatures a policy requires before a sealed layer's key
//! is unwrapped), [`node`] (containerd's snapshots model over the store and the
//! remote layers, with domain errors), [`grpc`] (the snapshots service: tonic only there),
//! [`metrics`],
//! [`cri_proxy`], [`config`] and [`daemon`] (`containerd-sealfs-grpc`).

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod config;
pub mod content_store;
pub mod credentials;
pub mod cri_proxy;
pub mod daemon;
pub mod fetcher;
pub mod filters;
pub mod fs;
pub mod fuse;
pub mod grpc;
pub mod hardening;
pub mod hosts;
pub mod image_scope;
pub mod kept_keys;
pub mod key_access;
pub mod keyprovider;
pub mod keys;
pub mod latency;
pub mod metrics;
pub mod mount;
pub mod mount_table;
pub mod node;
pub mod node_session;
pub mod oci_layout;
pub mod registry;
pub mod remote;
pub mod session_keeper;
pub mod signature;
pub mod snapshot;
pub mod source;
pub mod tails_ahead;

/// An error and its causes in one line (`outer: cause: root cause`): containerd and
/// terminals show a single message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}
