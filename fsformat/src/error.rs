//! The one error type of the format crate.
//!
//! Classes stay distinct so a caller can tell damage from a wrong key from hostile input:
//! a tail whose digest does not match the pinned one (`TailDigestMismatch`), a key that does not
//! commit to this layer (`WrongKey`), an index or chunk that fails authentication (`IndexAuth`,
//! `ChunkAuth`), and input that is malformed before any crypto is involved (`BadFooter`,
//! `BadIndex`, `BadTar`). Crypto failures carry no detail beyond where they happened: no oracle.

use std::io;

/// Everything that can go wrong while sealing, opening or reading a sealed layer.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O error from the source or sink, with what was being done.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The input tar is malformed or hostile; `entry` names the tar entry (or "archive").
    #[error("bad tar entry {entry:?}: {reason}")]
    BadTar {
        /// The entry's path as found in the tar, or a description of where in the stream.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The footer is not a sealfs v1 footer (wrong magic, version, or inconsistent lengths).
    #[error("bad footer: {0}")]
    BadFooter(String),
    /// The index region's SHA-256 differs from the digest pinned by the layer descriptor:
    /// the footer or index was damaged or replaced.
    #[error("index digest mismatch: expected {expected}, found {actual}")]
    TailDigestMismatch {
        /// The digest the descriptor pins.
        expected: String,
        /// The digest of the bytes read.
        actual: String,
    },
    /// The tail, or the index it decompresses to, is larger than the reader accepts; refused
    /// before it was read or decompressed.
    #[error("the index is {size} bytes, above the reader's limit of {limit} bytes")]
    IndexTooLarge {
        /// The size the descriptor or the footer gives.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The layer key does not match the footer's key commitment: a wrong key, not damage.
    #[error("the key does not open this layer (key commitment mismatch)")]
    WrongKey,
    /// The index failed authentication although the key commits to the layer.
    #[error("the index failed authentication")]
    IndexAuth,
    /// The decrypted index does not decode; the writer produced something this reader rejects.
    #[error("malformed index: {0}")]
    BadIndex(String),
    /// A chunk failed authentication: tampered, truncated, moved or swapped.
    #[error("chunk {chunk} failed authentication")]
    ChunkAuth {
        /// The chunk number.
        chunk: u32,
    },
    /// A chunk authenticated but its content is inconsistent with the index (size, compression).
    #[error("chunk {chunk} is malformed: {reason}")]
    BadChunk {
        /// The chunk number.
        chunk: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// No identity could unwrap the layer key.
    #[error("no key opens this layer: tried key ids [{tried}] against recipients [{recipients}]")]
    NoMatchingKey {
        /// Key ids (or `provider:NAME`) of the identities that were tried, comma-separated.
        tried: String,
        /// Key ids the layer was sealed for, comma-separated.
        recipients: String,
    },
    /// A key, stanza or share could not be parsed.
    #[error("{what}: {reason}")]
    BadKeyMaterial {
        /// Which kind of thing (public key, private key, stanza, share).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A keyprovider (ocicrypt's protocol: a KMS, an attestation agent) did not unwrap a key.
    #[error("keyprovider {provider}: {reason}")]
    KeyProvider {
        /// The provider's name.
        provider: String,
        /// What went wrong or what it said (never key material).
        reason: String,
    },
    /// A key share failed its check, or the shares do not combine.
    #[error("{0}")]
    Shares(String),
    /// A request the format cannot satisfy (bad chunk size, out-of-range read).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operating system's random number generator failed.
    #[error("random number generator failed")]
    Random,
}

impl FormatError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        FormatError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn bad_tar(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        // A hostile tar's path can be megabytes long: keep its start, enough to find it.
        const SHOWN: usize = 200;
        let mut entry = entry.into();
        if entry.len() > SHOWN {
            let cut = (0..=SHOWN)
                .rev()
                .find(|&i| entry.is_char_boundary(i))
                .unwrap_or(0);
            let total = entry.len();
            entry.truncate(cut);
            entry.push_str(&format!("... ({total} bytes)"));
        }
        FormatError::BadTar {
            entry,
            reason: reason.into(),
        }
    }
}

/// Result alias for the format crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
