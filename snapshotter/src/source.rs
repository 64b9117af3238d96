//! Where sealed bytes come from: the one interface between the fetcher and storage.
//!
//! A [`ChunkSource`] reads a byte range of one sealed blob. Today: a local blob file (OCI
//! layout). The registry source (HTTP range requests) implements the same trait.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a range could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The storage failed; worth retrying.
    #[error("reading {what} at {offset}+{len}")]
    Io {
        /// The blob.
        what: String,
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Reads ranges of one sealed blob. Implementations must be safe to call from many threads.
pub trait ChunkSource: Send + Sync + 'static {
    /// Reads exactly `len` bytes at `offset`.
    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError>;
}

/// Any chunk source is a blob the format's reader can read (its tail, whole files), so one tail
/// reader (`fsformat`'s) serves every source. A source error travels inside the `io::Error`,
/// intact ([`std::io::Error::into_inner`]).
impl fsformat::reader::BlobSource for dyn ChunkSource {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.read_vec(offset, buf.len())?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_range(offset, len).map_err(io::Error::other)
    }
}

/// A sealed blob in a local file.
#[derive(Debug)]
pub struct LocalBlob {
    file: File,
    path: PathBuf,
}

impl LocalBlob {
    /// Opens the blob at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(LocalBlob {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }
}

impl ChunkSource for LocalBlob {
    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| SourceError::Io {
                what: self.path.display().to_string(),
                offset,
                len,
                source,
            })?;
        Ok(buf)
    }
}

/// Fault injection for tests: wraps a real source and fails, stalls or counts reads. Used only
/// to produce faults the real storage cannot produce on demand (a stalled registry, a flaky
/// disk); the data still comes from the real source.
#[cfg(any(test, feature = "testutil"))]
pub mod faulty {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// What the wrapper does to reads.
    #[derive(Default)]
    pub struct Faults {
        /// Reads overlapping these byte offsets fail.
        pub fail_offsets: Mutex<HashSet<u64>>,
        /// While set, every read stalls for `stall` before answering.
        pub stalled: AtomicBool,
        /// How long a stalled read waits.
        pub stall: Mutex<Duration>,
        /// Reads served.
        pub reads: AtomicU64,
        /// Bytes served.
        pub bytes: AtomicU64,
    }

    /// A source with injectable faults.
    pub struct FaultySource<S> {
        inner: S,
        faults: Arc<Faults>,
    }

    impl<S: ChunkSource> FaultySource<S> {
        /// Wraps `inner`; the returned handle controls the faults.
        pub fn new(inner: S) -> (Self, Arc<Faults>) {
            let faults = Arc::new(Faults::default());
            (
                FaultySource {
                    inner,
                    faults: faults.clone(),
                },
                faults,
            )
        }
    }

    impl<S: ChunkSource> ChunkSource for FaultySource<S> {
        fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
            if self.faults.stalled.load(Ordering::SeqCst) {
                std::thread::sleep(*self.faults.stall.lock().unwrap());
            }
            let end = offset + len as u64;
            if self
                .faults
                .fail_offsets
                .lock()
                .unwrap()
                .iter()
                .any(|&o| o >= offset && o < end)
            {
                return Err(SourceError::Io {
                    what: "faulty source".into(),
                    offset,
                    len,
                    source: io::Error::other("injected fault"),
                });
            }
            self.faults.reads.fetch_add(1, Ordering::SeqCst);
            self.faults.bytes.fetch_add(len as u64, Ordering::SeqCst);
            self.inner.read_range(offset, len)
        }
    }
}
