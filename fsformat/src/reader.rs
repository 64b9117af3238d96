//! Reading a sealed blob from any random-access source.
//!
//! The API makes the caller choose verification (as stargz's VerifyTOC/SkipVerify does):
//! [`UnverifiedTail::read`] fetches footer and index without trusting them,
//! [`UnverifiedTail::open`] checks them against the digest the layer descriptor pins and
//! against the key's commitment, decrypts and decodes the index, and only then hands out a
//! [`SealedLayer`]. Every chunk is authenticated before a single byte of it is released.

use std::io;
use std::os::unix::fs::FileExt;

use crate::crypto::{ChunkBinding, Compression, LayerId, LayerKey, LayerKeys};
use crate::digest::digest_of;
use crate::error::{FormatError, Result};
use crate::layout::{Entry, EntryKind, Footer, Index, FOOTER_AAD_LEN, FOOTER_LEN};

/// Anything that can read bytes at an offset: a local file, memory, a registry blob.
pub trait BlobSource {
    /// Fills `buf` with the bytes at `offset`; an error if fewer are available.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The `len` bytes at `offset` in a buffer of their own. A source that receives its bytes
    /// in a buffer anyway (a network read) hands that over instead of copying it.
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(offset, &mut buf)?;
        Ok(buf)
    }
}

impl BlobSource for std::fs::File {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl BlobSource for [u8] {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the blob",
            )),
        }
    }
}

impl BlobSource for Vec<u8> {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

/// The last `tail_size` bytes of a blob of `blob_size`, if `tail_size` is within `limit` and
/// can be a tail at all.
fn read_tail_bytes<S: BlobSource + ?Sized>(
    source: &S,
    blob_size: u64,
    tail_size: u64,
    limit: u64,
) -> Result<Vec<u8>> {
    if tail_size > limit {
        return Err(FormatError::IndexTooLarge {
            size: tail_size,
            limit,
        });
    }
    if tail_size > blob_size || tail_size < FOOTER_LEN as u64 {
        return Err(FormatError::BadFooter(format!(
            "tail size {tail_size} is out of range"
        )));
    }
    source
        .read_vec(blob_size - tail_size, tail_size as usize)
        .map_err(|e| FormatError::io("reading the index", e))
}

/// Footer and sealed index as read from a blob, not yet trusted.
#[derive(Clone, Debug)]
pub struct UnverifiedTail {
    footer: Footer,
    footer_bytes: [u8; FOOTER_LEN],
    sealed_index: Vec<u8>,
    digest: String,
}

impl UnverifiedTail {
    /// Parses the tail from `tail`, the last bytes of a blob of `blob_size` bytes. `tail` must
    /// hold at least the sealed index and the footer (`tail_size` from the descriptor).
    pub fn parse(blob_size: u64, tail: &[u8]) -> Result<Self> {
        if tail.len() < FOOTER_LEN || tail.len() as u64 > blob_size {
            return Err(FormatError::BadFooter("blob shorter than a footer".into()));
        }
        let footer_bytes: [u8; FOOTER_LEN] = tail[tail.len() - FOOTER_LEN..].try_into().unwrap();
        let footer = Footer::decode(&footer_bytes, blob_size)?;
        let needed = footer.tail_len();
        if (tail.len() as u64) < needed {
            return Err(FormatError::BadFooter(format!(
                "the tail given has {} bytes but the index needs {needed}",
                tail.len()
            )));
        }
        let tail = &tail[tail.len() - needed as usize..];
        Ok(UnverifiedTail {
            digest: digest_of(tail),
            sealed_index: tail[..tail.len() - FOOTER_LEN].to_vec(),
            footer,
            footer_bytes,
        })
    }

    /// Takes the tail fetched for a descriptor that pins its digest and size (`tail` is exactly
    /// the blob's last `sealfs.index.size` bytes): hashes it first, and parses nothing of a
    /// tail that is not the pinned one. The sealed index stays in `tail`'s buffer (no copy).
    pub fn from_pinned(blob_size: u64, mut tail: Vec<u8>, expected_digest: &str) -> Result<Self> {
        let digest = digest_of(&tail);
        if digest != expected_digest {
            return Err(FormatError::TailDigestMismatch {
                expected: expected_digest.to_string(),
                actual: digest,
            });
        }
        if tail.len() < FOOTER_LEN || tail.len() as u64 > blob_size {
            return Err(FormatError::BadFooter("blob shorter than a footer".into()));
        }
        let footer_bytes: [u8; FOOTER_LEN] = tail[tail.len() - FOOTER_LEN..].try_into().unwrap();
        let footer = Footer::decode(&footer_bytes, blob_size)?;
        if footer.tail_len() != tail.len() as u64 {
            return Err(FormatError::BadFooter(format!(
                "the pinned tail has {} bytes but the footer says {}",
                tail.len(),
                footer.tail_len()
            )));
        }
        tail.truncate(tail.len() - FOOTER_LEN);
        Ok(UnverifiedTail {
            footer,
            footer_bytes,
            sealed_index: tail,
            digest,
        })
    }

    /// The tail's bytes as they are in the blob (sealed index, then footer): what
    /// [`Self::from_pinned`] takes back, for keeping a verified tail beside a disk cache.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.sealed_index.len() + FOOTER_LEN);
        bytes.extend_from_slice(&self.sealed_index);
        bytes.extend_from_slice(&self.footer_bytes);
        bytes
    }

    /// Reads footer then index from `source` (two reads). Use [`Self::read_sized`] when the
    /// tail size is known from the descriptor: one read.
    pub fn read<S: BlobSource + ?Sized>(source: &S, blob_size: u64) -> Result<Self> {
        let mut footer = [0u8; FOOTER_LEN];
        let at = blob_size
            .checked_sub(FOOTER_LEN as u64)
            .ok_or_else(|| FormatError::BadFooter("blob shorter than a footer".into()))?;
        source
            .read_exact_at(at, &mut footer)
            .map_err(|e| FormatError::io("reading the footer", e))?;
        let tail_len = Footer::decode(&footer, blob_size)?.tail_len();
        Self::read_sized(source, blob_size, tail_len)
    }

    /// Reads the last `tail_size` bytes in one read and parses them.
    pub fn read_sized<S: BlobSource + ?Sized>(
        source: &S,
        blob_size: u64,
        tail_size: u64,
    ) -> Result<Self> {
        // The footer's own bound: a sealed index of at most 4 GiB (a u32), plus the footer.
        let tail = read_tail_bytes(source, blob_size, tail_size, u64::from(u32::MAX) + 96)?;
        Self::parse(blob_size, &tail)
    }

    /// Reads the tail a layer descriptor pins (`tail_size` = `sealfs.index.size`,
    /// `expected_digest` = `sealfs.index.digest`) in one read, hashes it before parsing any of
    /// it, and refuses a tail or an index decompressing to more than `max_index_bytes`
    /// (before reading or decompressing it: memory spent on unauthenticated bytes).
    pub fn read_pinned<S: BlobSource + ?Sized>(
        source: &S,
        blob_size: u64,
        tail_size: u64,
        expected_digest: &str,
        max_index_bytes: u64,
    ) -> Result<Self> {
        let tail = read_tail_bytes(source, blob_size, tail_size, max_index_bytes)?;
        let tail = Self::from_pinned(blob_size, tail, expected_digest)?;
        let plain_len = u64::from(tail.footer.index_plain_len);
        if plain_len > max_index_bytes {
            return Err(FormatError::IndexTooLarge {
                size: plain_len,
                limit: max_index_bytes,
            });
        }
        Ok(tail)
    }

    /// Bytes it holds (what it costs to keep).
    pub fn byte_len(&self) -> usize {
        self.sealed_index.len() + FOOTER_LEN
    }

    /// The footer (unauthenticated until [`Self::open`]).
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// `sha256:` digest of sealed index plus footer.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Checks the tail against the digest the descriptor pins, checks the key's commitment,
    /// then decrypts and decodes the index.
    pub fn open(self, key: &LayerKey, expected_digest: &str) -> Result<SealedLayer> {
        if self.digest != expected_digest {
            return Err(FormatError::TailDigestMismatch {
                expected: expected_digest.to_string(),
                actual: self.digest,
            });
        }
        self.open_unpinned(key)
    }

    /// Like [`Self::open`] without the pinned digest: the index is still authenticated by the
    /// key, but nothing ties it to a signed manifest. For inspection tools only.
    pub fn open_unpinned(self, key: &LayerKey) -> Result<SealedLayer> {
        let keys = LayerKeys::derive(key, LayerId(self.footer.layer_id));
        if !keys.matches_commitment(&self.footer.key_commitment) {
            return Err(FormatError::WrongKey);
        }
        let mut sealed = self.sealed_index;
        let compressed = keys.open_index(&self.footer_bytes[..FOOTER_AAD_LEN], &mut sealed)?;
        let plain = zstd::bulk::decompress(compressed, self.footer.index_plain_len as usize)
            .map_err(|_| FormatError::BadIndex("index does not decompress".into()))?;
        if plain.len() != self.footer.index_plain_len as usize {
            return Err(FormatError::BadIndex(
                "index length differs from the footer".into(),
            ));
        }
        let index = Index::decode(&plain, self.footer.chunk_count, self.footer.chunk_size())?;
        SealedLayer::new(self.footer, index, keys)
    }
}

/// A verified, decrypted layer index with the keys to open its chunks.
pub struct SealedLayer {
    footer: Footer,
    index: Index,
    keys: LayerKeys,
    chunk_offsets: Vec<u64>,
    /// Children of every directory sorted by name, as ranges into `child_list`.
    child_start: Vec<u32>,
    child_list: Vec<u32>,
}

impl std::fmt::Debug for SealedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedLayer")
            .field("chunks", &self.index.chunks.len())
            .field("entries", &self.index.entries.len())
            .finish_non_exhaustive()
    }
}

impl SealedLayer {
    fn new(footer: Footer, index: Index, keys: LayerKeys) -> Result<Self> {
        let chunk_offsets = index.chunk_offsets();
        if index.sealed_data_len() != footer.index_offset {
            return Err(FormatError::BadIndex(
                "chunks do not end where the index starts".into(),
            ));
        }
        let data: u64 = index.chunks.iter().map(|c| u64::from(c.plain_len)).sum();
        if data != footer.data_bytes {
            return Err(FormatError::BadIndex(
                "chunk sizes differ from the footer".into(),
            ));
        }
        let mut child_list: Vec<u32> = (1..index.entries.len() as u32).collect();
        child_list.sort_by(|&a, &b| {
            let (ea, eb) = (&index.entries[a as usize], &index.entries[b as usize]);
            (ea.parent, &ea.name).cmp(&(eb.parent, &eb.name))
        });
        let mut child_start = vec![0u32; index.entries.len() + 1];
        for &child in &child_list {
            child_start[index.entries[child as usize].parent as usize + 1] += 1;
        }
        for i in 1..child_start.len() {
            child_start[i] += child_start[i - 1];
        }
        Ok(SealedLayer {
            footer,
            index,
            keys,
            chunk_offsets,
            child_start,
            child_list,
        })
    }

    /// The authenticated footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The decrypted index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// One entry.
    pub fn entry(&self, number: u32) -> Option<&Entry> {
        self.index.entries.get(number as usize)
    }

    /// The children of directory `dir`, sorted by name.
    pub fn children(&self, dir: u32) -> &[u32] {
        let (start, end) = (
            self.child_start[dir as usize],
            self.child_start[dir as usize + 1],
        );
        &self.child_list[start as usize..end as usize]
    }

    /// Finds the entry at `path` (relative, `/`-separated; empty is the root).
    pub fn lookup(&self, path: &[u8]) -> Option<u32> {
        let mut at = 0u32;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            at = self.lookup_child(at, name)?;
        }
        Some(at)
    }

    /// Finds `name` in directory `dir`.
    pub fn lookup_child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let children = self.children(dir);
        children
            .binary_search_by(|&c| self.index.entries[c as usize].name.as_slice().cmp(name))
            .ok()
            .map(|i| children[i])
    }

    /// The full path of an entry, relative to the root.
    pub fn path_of(&self, number: u32) -> Vec<u8> {
        self.index.path_of(number)
    }

    /// Where chunk `chunk` is in the blob: offset and sealed length.
    pub fn chunk_range(&self, chunk: u32) -> Option<(u64, u32)> {
        let info = self.index.chunks.get(chunk as usize)?;
        Some((self.chunk_offsets[chunk as usize], info.sealed_len))
    }

    /// Authenticates, decrypts and decompresses chunk `chunk` from its sealed bytes (which are
    /// overwritten). `decoder` is reused across calls to keep decompression contexts warm.
    pub fn open_chunk(
        &self,
        chunk: u32,
        sealed: &mut [u8],
        decoder: &mut ChunkDecoder,
    ) -> Result<Vec<u8>> {
        let info =
            *self.index.chunks.get(chunk as usize).ok_or_else(|| {
                FormatError::InvalidArgument(format!("chunk {chunk} does not exist"))
            })?;
        if sealed.len() != info.sealed_len as usize {
            return Err(FormatError::ChunkAuth { chunk });
        }
        let binding = ChunkBinding {
            index: chunk,
            offset: self.chunk_offsets[chunk as usize],
            sealed_len: info.sealed_len,
            plain_len: info.plain_len,
            compression: info.compression,
            last: chunk as usize + 1 == self.index.chunks.len(),
        };
        let payload = self.keys.open_chunk(&binding, sealed)?;
        match info.compression {
            Compression::Stored => Ok(payload.to_vec()),
            Compression::Zstd => {
                let mut plain = Vec::with_capacity(info.plain_len as usize);
                let bad = |reason: &str| FormatError::BadChunk {
                    chunk,
                    reason: reason.into(),
                };
                decoder
                    .0
                    .decompress_to_buffer(payload, &mut plain)
                    .map_err(|_| bad("does not decompress to its plaintext length"))?;
                if plain.len() != info.plain_len as usize {
                    return Err(bad("decompressed length differs from the index"));
                }
                Ok(plain)
            }
        }
    }

    /// Reads and opens one chunk from `source`.
    pub fn read_chunk<S: BlobSource + ?Sized>(
        &self,
        source: &S,
        chunk: u32,
        decoder: &mut ChunkDecoder,
    ) -> Result<Vec<u8>> {
        let (offset, len) = self
            .chunk_range(chunk)
            .ok_or_else(|| FormatError::InvalidArgument(format!("chunk {chunk} does not exist")))?;
        let mut sealed = vec![0u8; len as usize];
        source
            .read_exact_at(offset, &mut sealed)
            .map_err(|e| FormatError::io(format!("reading chunk {chunk}"), e))?;
        self.open_chunk(chunk, &mut sealed, decoder)
    }

    /// The regular file an entry's data lives in (hard links resolve to their target).
    pub fn data_entry(&self, number: u32) -> Option<&Entry> {
        let entry = self.entry(number)?;
        match entry.kind {
            EntryKind::HardLink { target } => self.entry(target),
            _ => Some(entry),
        }
    }

    /// Reads up to `buf.len()` bytes of file `number` at `offset`, fetching only the chunks the
    /// range touches. Returns the bytes read (0 at or past the end).
    pub fn read_file<S: BlobSource + ?Sized>(
        &self,
        source: &S,
        number: u32,
        offset: u64,
        buf: &mut [u8],
        decoder: &mut ChunkDecoder,
    ) -> Result<usize> {
        let Some(EntryKind::File { size, extents }) = self.data_entry(number).map(|e| &e.kind)
        else {
            return Err(FormatError::InvalidArgument(format!(
                "entry {number} is not a regular file"
            )));
        };
        if offset >= *size {
            return Ok(0);
        }
        let want = buf.len().min((*size - offset) as usize);
        let mut filled = 0usize;
        let mut extent_start = 0u64;
        for extent in extents {
            let extent_end = extent_start + u64::from(extent.len);
            let pos = offset + filled as u64;
            if filled < want && pos < extent_end {
                let within = (pos - extent_start) as usize;
                let take = (extent.len as usize - within).min(want - filled);
                let plain = self.read_chunk(source, extent.chunk, decoder)?;
                let from = extent.offset as usize + within;
                buf[filled..filled + take].copy_from_slice(&plain[from..from + take]);
                filled += take;
            }
            extent_start = extent_end;
            if filled == want {
                break;
            }
        }
        Ok(filled)
    }
}

/// A reusable zstd decompression context; keep one per thread.
pub struct ChunkDecoder(zstd::bulk::Decompressor<'static>);

impl ChunkDecoder {
    /// A fresh decoder.
    pub fn new() -> Result<Self> {
        zstd::bulk::Decompressor::new()
            .map(ChunkDecoder)
            .map_err(|e| FormatError::io("starting zstd", e))
    }
}
