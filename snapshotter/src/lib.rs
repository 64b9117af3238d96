//! The node side of sealfs. A read goes one way: FUSE (`fuse`) → the filesystem core (`fs`) →
//! the layer's fetcher (`fetcher`: memory cache, then disk cache, then the source, each chunk
//! once) → the source (`source`: a local blob now, the registry next). Sealed bytes come back
//! up through `fsformat`, which verifies and decrypts them, into the caches and the reply.
//! Each module knows only the one below it.
//!
//! Modules, in dependency order: [`hardening`] (private directories, no core dumps),
//! [`image_ref`] and [`oci_layout`] (image access), [`source`],
//! [`cache`], [`fetcher`], `prefetch` (the background fetch), [`fs`], [`fuse`] and [`mount`]
//! (mounting one layer or a whole image), [`registry`] with [`credentials`] and [`hosts`], and
//! [`snapshot`] (containerd's snapshot model on overlayfs, state in redb), [`filters`]
//! (containerd's filter syntax for Walk), [`keys`] (the node's
//! keys), [`remote`] (sealed layers named by containerd's labels, mounted), [`service`]
//! (containerd's snapshots API over the store and the remote layers), [`metrics`], [`config`]
//! and [`daemon`] (`containerd-sealfs-grpc`).

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod config;
pub mod credentials;
pub mod cri_proxy;
pub mod daemon;
pub mod fetcher;
pub mod filters;
pub mod fs;
pub mod fuse;
pub mod hardening;
pub mod hosts;
pub mod image_ref;
pub mod keys;
pub mod metrics;
pub mod mount;
pub mod mount_table;
pub mod oci_layout;
pub mod registry;
pub mod remote;
pub mod service;
pub mod snapshot;
pub mod source;

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
