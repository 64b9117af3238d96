//! Chunk caches: plaintext in memory, ciphertext on disk.
//!
//! - [`MemoryCache`]: a bounded LRU of decrypted chunks, by bytes, shared by all layers of a
//!   process. Plaintext never leaves memory.
//! - [`DiskCache`]: sealed chunks as fetched, one file per chunk, bounded by bytes. It holds
//!   ciphertext only, so the node's disk never sees file data or names in the clear; a read
//!   from it is authenticated like a read from the registry, and a corrupt entry is detected by
//!   its tag, dropped and fetched again. Entries are read back through a private copy-on-write
//!   mapping (`memmap2`), so decrypting in place writes nothing to the file.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Which chunk: a layer (a number the caller assigns per mounted layer) and a chunk number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// The layer.
    pub layer: u64,
    /// The chunk number.
    pub chunk: u32,
}

/// Bounded LRU of plaintext chunks, by total bytes.
pub struct MemoryCache {
    inner: Mutex<MemoryInner>,
    limit_bytes: u64,
}

struct MemoryInner {
    lru: lru::LruCache<ChunkKey, Arc<Vec<u8>>>,
    bytes: u64,
}

impl MemoryCache {
    /// A cache holding at most `limit_bytes` of plaintext.
    pub fn new(limit_bytes: u64) -> Self {
        MemoryCache {
            inner: Mutex::new(MemoryInner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
            limit_bytes,
        }
    }

    /// The chunk, if cached (and marks it recently used).
    pub fn get(&self, key: ChunkKey) -> Option<Arc<Vec<u8>>> {
        self.inner
            .lock()
            .expect("cache lock")
            .lru
            .get(&key)
            .cloned()
    }

    /// Whether the chunk is cached, without marking it used.
    pub fn contains(&self, key: ChunkKey) -> bool {
        self.inner.lock().expect("cache lock").lru.contains(&key)
    }

    /// Caches a chunk, evicting the least recently used ones beyond the limit.
    pub fn put(&self, key: ChunkKey, plain: Arc<Vec<u8>>) {
        let mut inner = self.inner.lock().expect("cache lock");
        let len = plain.len() as u64;
        if len > self.limit_bytes {
            return;
        }
        if let Some(old) = inner.lru.put(key, plain) {
            inner.bytes -= old.len() as u64;
        }
        inner.bytes += len;
        while inner.bytes > self.limit_bytes {
            match inner.lru.pop_lru() {
                Some((_, evicted)) => inner.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }

    /// Drops every chunk of `layer` (on unmount).
    pub fn forget_layer(&self, layer: u64) {
        let mut inner = self.inner.lock().expect("cache lock");
        let keys: Vec<ChunkKey> = inner
            .lru
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.layer == layer)
            .collect();
        for key in keys {
            if let Some(v) = inner.lru.pop(&key) {
                inner.bytes -= v.len() as u64;
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().expect("cache lock").bytes
    }
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryCache({} of {} bytes)",
            self.bytes(),
            self.limit_bytes
        )
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cache_evicts_by_bytes() {
        let cache = MemoryCache::new(100);
        let key = |chunk| ChunkKey { layer: 1, chunk };
        cache.put(key(1), Arc::new(vec![0; 60]));
        cache.put(key(2), Arc::new(vec![0; 30]));
        assert!(cache.get(key(1)).is_some());
        cache.put(key(3), Arc::new(vec![0; 30]));
        // 1 was used more recently than 2, so 2 goes.
        assert!(cache.get(key(2)).is_none());
        assert!(cache.get(key(1)).is_some() && cache.get(key(3)).is_some());
        assert_eq!(cache.bytes(), 90);
        cache.forget_layer(1);
        assert_eq!(cache.bytes(), 0);
    }

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
