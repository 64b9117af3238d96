//! The disk tier: sealed chunks as fetched, one file per chunk, bounded by bytes
//! ([`DiskCache`]). It holds ciphertext only, so the node's disk never sees file data or names
//! in the clear. [`SealedDisk`] makes it a tier of a layer's chunk cache: every hit is
//! authenticated and decrypted as a chunk from the registry would be, and a corrupt entry is
//! dropped (and so fetched again). Entries are read back through a private copy-on-write
//! mapping (`memmap2`), so decrypting in place writes nothing to the file.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fsformat::reader::SealedLayer;

use super::{open_chunk, CacheError, ChunkCache, Fetched};

/// Sealed chunks of one layer on disk, bounded by bytes (oldest first out).
pub struct DiskCache {
    dir: PathBuf,
    limit_bytes: u64,
    state: Mutex<DiskState>,
}

struct DiskState {
    sizes: HashMap<u32, u64>,
    order: VecDeque<u32>,
    bytes: u64,
}

impl DiskCache {
    /// Opens (creating) the cache directory of one layer, adopting the chunks already there.
    pub fn open(dir: &Path, limit_bytes: u64) -> io::Result<Self> {
        crate::hardening::ensure_private_dir(dir)?;
        let mut state = DiskState {
            sizes: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match name.to_str().and_then(|n| n.parse::<u32>().ok()) {
                Some(chunk) => {
                    let len = entry.metadata()?.len();
                    state.sizes.insert(chunk, len);
                    state.order.push_back(chunk);
                    state.bytes += len;
                }
                // A temporary file from a crash mid-write.
                None => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            limit_bytes,
            state: Mutex::new(state),
        })
    }

    fn path(&self, chunk: u32) -> PathBuf {
        self.dir.join(chunk.to_string())
    }

    /// The sealed chunk as a private writable mapping, if cached with the expected length.
    /// A read error or wrong length counts as a miss (and drops the entry).
    pub fn get(&self, chunk: u32, sealed_len: usize) -> Option<memmap2::MmapMut> {
        if !self
            .state
            .lock()
            .expect("disk cache lock")
            .sizes
            .contains_key(&chunk)
        {
            return None;
        }
        let mapped = File::open(self.path(chunk)).and_then(|file| {
            if file.metadata()?.len() != sealed_len as u64 {
                return Err(io::Error::other("cached chunk has the wrong length"));
            }
            // SAFETY: the mapping is private (copy-on-write): writes go to anonymous memory,
            // never to the file. The file is ours (the cache directory is private to this
            // process and entries are replaced by rename, never truncated in place), so it
            // does not shrink under the mapping.
            unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        });
        match mapped {
            Ok(map) => Some(map),
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), chunk, %error, "disk cache entry unreadable; refetching");
                self.remove(chunk);
                None
            }
        }
    }

    /// Whether the cache lists the chunk with the expected length (no I/O).
    pub fn contains(&self, chunk: u32, sealed_len: u64) -> bool {
        self.state
            .lock()
            .expect("disk cache lock")
            .sizes
            .get(&chunk)
            == Some(&sealed_len)
    }

    /// Stores a sealed chunk (atomically: temp file, then rename).
    pub fn put(&self, chunk: u32, sealed: &[u8]) -> io::Result<()> {
        let len = sealed.len() as u64;
        if len > self.limit_bytes {
            return Ok(());
        }
        let mut temp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)?;
        temp.write_all(sealed)?;
        temp.persist(self.path(chunk)).map_err(|e| e.error)?;
        let mut state = self.state.lock().expect("disk cache lock");
        if let Some(old) = state.sizes.insert(chunk, len) {
            state.bytes -= old;
        } else {
            state.order.push_back(chunk);
        }
        state.bytes += len;
        while state.bytes > self.limit_bytes {
            let Some(victim) = state.order.pop_front() else {
                break;
            };
            if let Some(size) = state.sizes.remove(&victim) {
                state.bytes -= size;
                let _ = fs::remove_file(self.path(victim));
            }
        }
        Ok(())
    }

    /// Drops one entry (after it failed authentication).
    pub fn remove(&self, chunk: u32) {
        let mut state = self.state.lock().expect("disk cache lock");
        if let Some(size) = state.sizes.remove(&chunk) {
            state.bytes -= size;
            state.order.retain(|&c| c != chunk);
        }
        let _ = fs::remove_file(self.path(chunk));
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().expect("disk cache lock").bytes
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A layer's disk cache as a tier of its chunk cache: the layer's index gives each chunk's
/// length, its keys authenticate what comes back.
pub struct SealedDisk {
    cache: DiskCache,
    layer: Arc<SealedLayer>,
}

impl SealedDisk {
    /// `cache` holding chunks of `layer`.
    pub fn new(cache: DiskCache, layer: Arc<SealedLayer>) -> Self {
        SealedDisk { cache, layer }
    }

    fn sealed_len(&self, chunk: u32) -> Option<u32> {
        Some(self.layer.index().chunks.get(chunk as usize)?.sealed_len)
    }
}

impl ChunkCache for SealedDisk {
    fn get(&self, chunk: u32) -> Result<Option<Arc<Vec<u8>>>, CacheError> {
        let Some(sealed_len) = self.sealed_len(chunk) else {
            return Ok(None);
        };
        let Some(mut mapped) = self.cache.get(chunk, sealed_len as usize) else {
            return Ok(None);
        };
        match open_chunk(&self.layer, chunk, &mut mapped) {
            Ok(plain) => Ok(Some(Arc::new(plain))),
            Err(source) => {
                self.cache.remove(chunk);
                Err(CacheError::Corrupt {
                    chunk,
                    dir: self.cache.dir().to_path_buf(),
                    source,
                })
            }
        }
    }

    fn contains(&self, chunk: u32) -> bool {
        self.sealed_len(chunk)
            .is_some_and(|len| self.cache.contains(chunk, u64::from(len)))
    }

    fn put(&self, chunk: u32, fetched: Fetched<'_>) {
        let Some(sealed) = fetched.sealed else {
            return;
        };
        if let Err(error) = self.cache.put(chunk, sealed) {
            tracing::warn!(dir = %self.cache.dir().display(), chunk, %error, "could not write the disk cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_cache_round_trips_evicts_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 100).unwrap();
        cache.put(1, &[1; 60]).unwrap();
        cache.put(2, &[2; 30]).unwrap();
        let mut map = cache.get(1, 60).unwrap();
        map[0] = 9; // private mapping: the file is not changed
        assert_eq!(cache.get(1, 60).unwrap()[0], 1);
        assert!(cache.get(1, 61).is_none(), "wrong length is a miss");
        cache.put(2, &[2; 30]).unwrap();
        cache.put(3, &[3; 30]).unwrap();
        assert!(cache.get(3, 30).is_some());
        assert!(cache.bytes() <= 100);
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 100).unwrap();
        assert!(reopened.get(3, 30).is_some());
    }
}
