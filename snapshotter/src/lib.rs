//! The node side of sealfs. A read goes one way: FUSE (`fuse`) → the filesystem core (`fs`) →
//! the layer's fetcher (`fetcher`: memory cache, then disk cache, then the source, each chunk
//! once) → the source (`source`: a local blob now, the registry next). Sealed bytes come back
//! up through `fsformat`, which verifies and decrypts them, into the caches and the reply.
//! Each module knows only the one below it.
//!
//! Modules, in dependency order: [`image_ref`] and [`oci_layout`] (image access), [`source`],
//! [`cache`], [`fetcher`], `prefetch` (the background fetch), [`fs`], [`fuse`] and [`mount`]
//! (mounting one layer or a whole image), [`registry`] with [`credentials`] and [`hosts`], and
//! [`snapshot`] (containerd's snapshot model on overlayfs, state in redb). Coming: `config`,
//! `grpc`, `daemon`.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod credentials;
pub mod fetcher;
pub mod fs;
pub mod fuse;
pub mod hosts;
pub mod image_ref;
pub mod mount;
pub mod oci_layout;
mod prefetch;
pub mod registry;
pub mod snapshot;
pub mod source;
