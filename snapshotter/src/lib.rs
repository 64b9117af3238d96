//! The node side of sealfs.
//!
//! Today: [`oci_layout`], reading and writing OCI image layout directories, shared by the tools
//! and (later) the daemon. Coming, in dependency order: `config`, `registry`, `fetcher`,
//! `cache`, `prefetch`, `fs`, `fuse`, `snapshot`, `grpc`, `daemon`.

#![deny(missing_docs)]

pub mod image_ref;
pub mod oci_layout;
