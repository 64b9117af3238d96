//! The memory tier: a bounded LRU of decrypted chunks, by bytes, shared by every layer of a
//! process ([`MemoryCache`]), seen by each layer through its own [`LayerMemory`]. Plaintext
//! never leaves memory.

use std::sync::{Arc, Mutex};

use super::{ChunkCache, Fetched};

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

/// One layer's view of the node's memory cache: the memory tier of its chunk cache.
pub struct LayerMemory {
    cache: Arc<MemoryCache>,
    layer: u64,
}

impl LayerMemory {
    /// The chunks of layer `layer` (a number the caller assigns per mounted layer) in `cache`.
    pub fn new(cache: Arc<MemoryCache>, layer: u64) -> Self {
        LayerMemory { cache, layer }
    }

    fn key(&self, chunk: u32) -> ChunkKey {
        ChunkKey {
            layer: self.layer,
            chunk,
        }
    }

    /// Drops every chunk of the layer (it is being unmounted).
    pub fn forget(&self) {
        self.cache.forget_layer(self.layer);
    }
}

impl ChunkCache for LayerMemory {
    fn get(&self, chunk: u32) -> Result<Option<Arc<Vec<u8>>>, super::CacheError> {
        Ok(self.cache.get(self.key(chunk)))
    }

    fn contains(&self, chunk: u32) -> bool {
        self.cache.contains(self.key(chunk))
    }

    fn put(&self, chunk: u32, fetched: Fetched<'_>) {
        self.cache.put(self.key(chunk), fetched.plain.clone());
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
}
