//! A layer's chunk cache: tiers that hold a chunk closer than the registry does, each behind
//! one small trait ([`ChunkCache`]) and stacked by [`Tiered`].
//!
//! - memory ([`LayerMemory`], [`MemoryCache`]): plaintext, a bounded LRU shared by every layer of the node;
//! - disk ([`SealedDisk`], [`DiskCache`]): ciphertext, per layer, authenticated on every hit.
//!
//! A read tries memory, then disk (a disk hit fills memory), then the fetcher goes to the
//! source and stores what it fetched in both. A disk entry that fails authentication is a miss
//! (and an error the caller counts and logs), never plaintext.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;

use fsformat::reader::{ChunkDecoder, SealedLayer};
use fsformat::FormatError;

mod disk;
mod memory;

pub use disk::{DiskCache, SealedDisk};
pub use memory::{ChunkKey, LayerMemory, MemoryCache};

/// A chunk to keep: its authenticated plaintext and, when it came from the source, its sealed
/// bytes as fetched (the only thing a ciphertext tier keeps).
#[derive(Clone, Copy)]
pub struct Fetched<'a> {
    /// The sealed chunk, if it came from the source.
    pub sealed: Option<&'a [u8]>,
    /// Its plaintext.
    pub plain: &'a Arc<Vec<u8>>,
}

/// One tier of one layer's chunk cache, chunks named by number. Implementations are shared by
/// every thread that reads the layer.
pub trait ChunkCache: Send + Sync {
    /// The chunk's authenticated plaintext, if the tier holds it.
    fn get(&self, chunk: u32) -> Result<Option<Arc<Vec<u8>>>, CacheError>;
    /// Whether the tier holds the chunk: no I/O, and no effect on what it evicts next.
    fn contains(&self, chunk: u32) -> bool;
    /// Keeps a fetched chunk (a tier that cannot says why in the log: a cache is best effort).
    fn put(&self, chunk: u32, fetched: Fetched<'_>);
}

/// A tier that is not there (a layer without a disk cache).
impl<C: ChunkCache> ChunkCache for Option<C> {
    fn get(&self, chunk: u32) -> Result<Option<Arc<Vec<u8>>>, CacheError> {
        match self {
            Some(cache) => cache.get(chunk),
            None => Ok(None),
        }
    }

    fn contains(&self, chunk: u32) -> bool {
        self.as_ref().is_some_and(|cache| cache.contains(chunk))
    }

    fn put(&self, chunk: u32, fetched: Fetched<'_>) {
        if let Some(cache) = self {
            cache.put(chunk, fetched);
        }
    }
}

/// Why a cached chunk was not served.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The entry failed authentication (damaged on disk); it was dropped.
    #[error("cached chunk {chunk} in {} failed verification; dropped", dir.display())]
    Corrupt {
        /// The chunk.
        chunk: u32,
        /// The cache directory.
        dir: PathBuf,
        /// What failed (opaque: no oracle detail).
        #[source]
        source: FormatError,
    },
}

/// Which tier of a [`Tiered`] cache answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// The faster tier.
    Upper,
    /// The slower tier (the chunk is now in the faster one too).
    Lower,
}

/// A chunk's plaintext, shared by the caches and the readers that got it.
pub type Plain = Arc<Vec<u8>>;

/// Two tiers, the faster one first.
pub struct Tiered<U, L> {
    /// Asked first; filled from the lower tier's hits.
    pub upper: U,
    /// Asked when the upper tier misses.
    pub lower: L,
}

impl<U: ChunkCache, L: ChunkCache> Tiered<U, L> {
    /// The chunk from the first tier that holds it, and which one that was. An error of the
    /// lower tier (a corrupt entry, now dropped) is returned for the caller to count; the
    /// chunk is then a miss.
    pub fn get(&self, chunk: u32) -> Result<Option<(Plain, Hit)>, CacheError> {
        if let Some(plain) = self.upper.get(chunk)? {
            return Ok(Some((plain, Hit::Upper)));
        }
        let Some(plain) = self.lower.get(chunk)? else {
            return Ok(None);
        };
        self.upper.put(
            chunk,
            Fetched {
                sealed: None,
                plain: &plain,
            },
        );
        Ok(Some((plain, Hit::Lower)))
    }

    /// Whether either tier holds the chunk.
    pub fn contains(&self, chunk: u32) -> bool {
        self.upper.contains(chunk) || self.lower.contains(chunk)
    }

    /// Keeps a fetched chunk in both tiers, the lower one first: a reader that misses the
    /// upper tier then finds it below rather than fetching it again.
    pub fn put(&self, chunk: u32, fetched: Fetched<'_>) {
        self.lower.put(chunk, fetched);
        self.upper.put(chunk, fetched);
    }
}

thread_local! {
    /// A decompression context per thread (they are costly to make, and not shared).
    static DECODER: RefCell<Option<ChunkDecoder>> = const { RefCell::new(None) };
}

/// Authenticates, decrypts and decompresses chunk `chunk` of `layer` from its sealed bytes
/// (decrypted in place), with this thread's decoder.
pub fn open_chunk(
    layer: &SealedLayer,
    chunk: u32,
    sealed: &mut [u8],
) -> Result<Vec<u8>, FormatError> {
    DECODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(ChunkDecoder::new()?);
        }
        let decoder = slot.as_mut().expect("just set");
        layer.open_chunk(chunk, sealed, decoder)
    })
}
