//! What a layer's fetcher is told (its tunables) and what it answers (a chunk or an error).

use std::sync::Arc;
use std::time::Duration;

use crate::source::SourceError;

/// Why a chunk could not be served.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    /// The source failed.
    #[error("layer {layer}: fetching chunk {chunk} failed")]
    Source {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// What the source said (shared by every chunk of the failed range read).
        #[source]
        source: Arc<SourceError>,
    },
    /// The chunk failed authentication (tampered, truncated or swapped); never served.
    #[error("layer {layer}: chunk {chunk} failed verification: {reason}")]
    Verification {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// What failed.
        reason: String,
    },
    /// The fetch did not complete within the timeout.
    #[error("layer {layer}: chunk {chunk} did not arrive within {after:?}")]
    Timeout {
        /// The layer's name.
        layer: String,
        /// The chunk.
        chunk: u32,
        /// The timeout.
        after: Duration,
    },
    /// The layer is being unmounted, or the node is shutting down.
    #[error("layer {layer} is shutting down")]
    Cancelled {
        /// The layer's name.
        layer: String,
    },
}

/// A chunk's plaintext, or why there is none.
pub type ChunkResult = Result<Arc<Vec<u8>>, FetchError>;

/// Tunables of one layer's fetcher (defaults documented in docs/configuration.md). Threads,
/// background streams and the bandwidth cap are the node's: see [`super::PoolConfig`].
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// How long a read waits for its chunk before failing with EIO.
    pub timeout: Duration,
    /// Fetch the whole layer in the background after mounting.
    pub background: bool,
    /// Largest merged range read of the background and profile fetches.
    pub merge_bytes: u64,
    /// Fetch the layer's startup profile (its prefetch order) right after mounting.
    pub profile: bool,
    /// Range reads of this layer's profile in flight at once.
    pub profile_streams: usize,
    /// When a read misses right after the chunk before it (reads walk the layer in order),
    /// the chunks after it are fetched in the same range read, up to this many plaintext
    /// bytes: the next pack of small files is then likely read next. 0: off. A chunk bigger
    /// than this is never read ahead; the default is one default pack.
    pub readahead_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout: Duration::from_secs(30),
            background: true,
            merge_bytes: 4 << 20,
            profile: true,
            profile_streams: 4,
            readahead_bytes: 128 << 10,
        }
    }
}
