//! The sealfs sealed layer format.
//!
//! A layer tar becomes one *sealed blob*: file data cut into chunks, each compressed with zstd
//! and sealed with AES-256-GCM, followed by an encrypted index (the whole file tree, the chunk
//! table and a prefetch order) and a fixed footer that locates it. The blob's tail digest and the
//! layer key, wrapped for each recipient, travel in the OCI layer descriptor's annotations.
//! `docs/format.md` is the normative description.
//!
//! This crate does no I/O policy: no network, no caching, no threads. Its modules:
//! - [`layout`]: footer and index bytes, strict decoders;
//! - [`crypto`]: key derivation and the chunk/index AEAD;
//! - [`writer`]: tar (plain, gzip, zstd) to sealed blob, streamed;
//! - [`reader`]: parse, verify and open a blob from any [`reader::BlobSource`];
//! - [`unseal`]: sealed blob back to tar;
//! - [`keywrap`]: X25519 recipients and identities;
//! - [`shares`]: k-of-n splitting of private keys;
//! - [`oci`]: media type and annotation names;
//! - [`digest`]: OCI digests computed on the way through readers and writers.
//!
//! Opening a layer goes one way, and the API makes verification explicit:
//! ```no_run
//! # fn demo(blob: &std::fs::File, size: u64, key: &fsformat::PrivateKey,
//! #         annotations: &std::collections::HashMap<String, String>) -> fsformat::Result<()> {
//! use fsformat::{oci::SealedLayerAnnotations, keywrap::unwrap_layer_key, reader::*};
//! let facts = SealedLayerAnnotations::read_from(annotations)?;
//! let layer_key = unwrap_layer_key(&[key], &facts.stanzas)?;
//! let tail = UnverifiedTail::read_sized(blob, size, facts.index_size)?;
//! let layer = tail.open(&layer_key, &facts.index_digest)?;
//! let mut decoder = ChunkDecoder::new()?;
//! let mut buf = [0u8; 4096];
//! let file = layer.lookup(b"etc/os-release").expect("present");
//! layer.read_file(blob, file, 0, &mut buf, &mut decoder)?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod compress;
pub mod crypto;
pub mod digest;
pub mod error;
pub mod keywrap;
pub mod layout;
pub mod oci;
pub mod reader;
pub mod shares;
pub mod unseal;
pub mod writer;

pub use crypto::LayerKey;
pub use error::{FormatError, Result};
pub use keywrap::{Identity, KeyId, PrivateKey, PublicKey, Recipient, Stanza};
