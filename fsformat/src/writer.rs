//! Sealing: an OCI layer tar (plain, gzip or zstd) becomes one sealed blob, streamed.
//!
//! File data is cut into chunks of `chunk_size` plaintext bytes. A file is never split at an
//! arbitrary point: a file's whole chunks are stored as they come, and the rest of it (a small
//! file, or the tail of a large one) goes into a *pack* chunk shared with other small pieces, so
//! that one small file costs one round trip and never two. Packs are smaller than chunks (256
//! KiB by default), so a read of one small file brings fewer of its neighbours; a piece larger
//! than a pack is a chunk of its own. Identical whole chunks, and identical
//! small pieces, are stored once (SHA-256 of the plaintext, kept in memory only).
//!
//! A *prefetch list* (a startup profile: paths in the order a container first reads them)
//! changes two things. Small pieces of listed files go into packs of their own, so the files
//! a start-up reads share a few chunks instead of being spread over every pack of the layer;
//! and the index's prefetch order names the chunks of the listed files, in list order. Paths
//! the layer does not have (another layer's files) are ignored.
//!
//! Memory does not grow with the layer's size: one chunk buffer, two pack buffers and one
//! compressed buffer, plus the index, which grows with the number of entries only.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path};

use crate::compress::{Compressed, OrderedCompressor};
use crate::crypto::{ChunkBinding, LayerId, LayerKey, LayerKeys, TAG_LEN};
use crate::digest::{digest_of, HashingReader, HashingWriter};
use crate::error::{FormatError, Result};
use crate::layout::{
    ChunkInfo, Entry, EntryKind, Extent, Footer, Index, Timestamp, DEFAULT_CHUNK_SIZE_LOG2,
    FOOTER_AAD_LEN, MAX_CHUNK_SIZE_LOG2, MAX_INDEX_LEN, MAX_NAME_LEN, MAX_XATTRS_PER_ENTRY,
    MIN_CHUNK_SIZE_LOG2,
};

/// Files larger than this are rejected as absurd (1 TiB): no real layer has one, and a hostile
/// header claiming exabytes is refused before anything is read.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Extent chunk numbers that mark "the pack chunk still being filled" until it is flushed: one
/// per pack (ordinary, prefetch-listed). Real chunk numbers stay below both.
const PENDING_PACK: [u32; 2] = [u32::MAX, u32::MAX - 1];
/// The pack of files the prefetch list names.
const PRIORITY: usize = 1;
/// Default largest pack: 128 KiB. A start-up reads small files scattered over many packs, and
/// each read of one small file fetches its whole pack: with 1 MiB packs (the chunk size) about
/// a megabyte of neighbours; on the python benchmark 128 KiB packs read 2.7 MB less before the
/// container is ready than 256 KiB ones, and 64 KiB packs cost more round trips than they
/// save bytes (`docs/benchmarks.md`).
pub const DEFAULT_PACK_SIZE_LOG2: u8 = 17;
const OCI_WHITEOUT_PREFIX: &[u8] = b".wh.";
const OCI_OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// How to seal.
#[derive(Clone, Debug)]
pub struct SealOptions {
    /// log2 of the chunk size (16..=24).
    pub chunk_size_log2: u8,
    /// log2 of the largest pack chunk (16..=chunk_size_log2). A piece (a small file, the
    /// rest of a large one) larger than a pack becomes a chunk of its own. Smaller packs mean
    /// that a read of one small file fetches fewer of its neighbours.
    pub pack_size_log2: u8,
    /// zstd level for chunks and the index.
    pub zstd_level: i32,
    /// Paths (relative to the layer root, no leading `/`) a container reads first, in order:
    /// their data is packed together and their chunks become the index's prefetch order.
    pub prefetch: Vec<Vec<u8>>,
    /// Threads compressing chunks (at least 1; the output is the same for any number). The
    /// default is every core.
    pub threads: usize,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions {
            chunk_size_log2: DEFAULT_CHUNK_SIZE_LOG2,
            pack_size_log2: DEFAULT_PACK_SIZE_LOG2,
            zstd_level: 3,
            prefetch: Vec::new(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl SealOptions {
    /// Options with a chunk size in bytes, which must be a power of two from 64 KiB to 16 MiB.
    pub fn with_chunk_size(chunk_size: u64) -> Result<Self> {
        let log2 = chunk_size.trailing_zeros();
        if !chunk_size.is_power_of_two()
            || !(u32::from(MIN_CHUNK_SIZE_LOG2)..=u32::from(MAX_CHUNK_SIZE_LOG2)).contains(&log2)
        {
            return Err(FormatError::InvalidArgument(format!(
                "chunk size {chunk_size} must be a power of two from 64 KiB to 16 MiB"
            )));
        }
        Ok(SealOptions {
            chunk_size_log2: log2 as u8,
            pack_size_log2: DEFAULT_PACK_SIZE_LOG2.min(log2 as u8),
            ..SealOptions::default()
        })
    }

    /// Sets the largest pack in bytes: a power of two from 64 KiB to the chunk size.
    pub fn set_pack_size(&mut self, pack_size: u64) -> Result<()> {
        let log2 = pack_size.trailing_zeros();
        if !pack_size.is_power_of_two()
            || !(u32::from(MIN_CHUNK_SIZE_LOG2)..=u32::from(self.chunk_size_log2)).contains(&log2)
        {
            return Err(FormatError::InvalidArgument(format!(
                "pack size {pack_size} must be a power of two from 64 KiB to the chunk size ({})",
                1u64 << self.chunk_size_log2
            )));
        }
        self.pack_size_log2 = log2 as u8;
        Ok(())
    }

    /// Sets the prefetch list from paths as a user writes them (`/usr/bin/python3`,
    /// `etc/passwd`); duplicates after the first are dropped. Fails on a path that leaves the
    /// root.
    pub fn set_prefetch_paths<'a>(
        &mut self,
        paths: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        self.prefetch.clear();
        for raw in paths {
            let trimmed = raw.strip_prefix(b"/").unwrap_or(raw);
            let path = normalize_path(trimmed).ok_or_else(|| {
                FormatError::InvalidArgument(format!(
                    "prefetch path {:?} leaves the layer root",
                    String::from_utf8_lossy(raw)
                ))
            })?;
            if seen.insert(path.clone()) {
                self.prefetch.push(path);
            }
        }
        Ok(())
    }
}

/// What sealing produced.
#[derive(Clone, Debug)]
pub struct SealSummary {
    /// `sha256:` digest of the sealed blob.
    pub blob_digest: String,
    /// Size of the sealed blob.
    pub blob_size: u64,
    /// `sha256:` digest of the tail (sealed index plus footer), pinned by the descriptor.
    pub tail_digest: String,
    /// Length of the tail.
    pub tail_size: u64,
    /// `sha256:` digest of the uncompressed input tar (its OCI diff id).
    pub input_diff_id: String,
    /// Bytes of the uncompressed input tar.
    pub input_tar_size: u64,
    /// Chunks stored.
    pub chunk_count: u32,
    /// Plaintext bytes stored in chunks (after deduplication).
    pub data_bytes: u64,
    /// File bytes in the layer (before deduplication).
    pub file_bytes: u64,
    /// Entries in the index, root included.
    pub entry_count: usize,
    /// Chunks in the index's prefetch order.
    pub prefetch_chunks: usize,
    /// Sealed bytes of those chunks.
    pub prefetch_bytes: u64,
}

/// Compression of a layer tar, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarCompression {
    /// Uncompressed tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Detects the compression of `input` from its magic bytes and returns a reader of the
/// uncompressed tar.
pub fn decompressed_tar<'a, R: Read + 'a>(
    input: R,
) -> Result<(TarCompression, Box<dyn Read + 'a>)> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    let head = input
        .fill_buf()
        .map_err(|e| FormatError::io("reading the layer", e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok((
            TarCompression::Gzip,
            Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        ))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = zstd::stream::read::Decoder::with_buffer(input)
            .map_err(|e| FormatError::io("starting zstd decompression", e))?;
        Ok((TarCompression::Zstd, Box::new(decoder)))
    } else {
        Ok((TarCompression::None, Box::new(input)))
    }
}

/// Seals the layer tar read from `input` (plain, gzip or zstd) into `output` under `key`.
pub fn seal_layer<R: Read, W: Write>(
    input: R,
    output: W,
    key: &LayerKey,
    options: &SealOptions,
) -> Result<SealSummary> {
    if !(MIN_CHUNK_SIZE_LOG2..=MAX_CHUNK_SIZE_LOG2).contains(&options.chunk_size_log2) {
        return Err(FormatError::InvalidArgument(
            "chunk size out of range".into(),
        ));
    }
    if !(MIN_CHUNK_SIZE_LOG2..=options.chunk_size_log2).contains(&options.pack_size_log2) {
        return Err(FormatError::InvalidArgument(
            "pack size must be from 64 KiB to the chunk size".into(),
        ));
    }
    let (_, tar_stream) = decompressed_tar(input)?;
    let mut hashed_input = HashingReader::new(tar_stream);
    let mut sealer = Sealer::new(HashingWriter::new(output), key, options)?;
    {
        let mut archive = tar::Archive::new(&mut hashed_input);
        let entries = archive
            .entries()
            .map_err(|e| FormatError::bad_tar("archive", e.to_string()))?;
        let mut last_path = String::from("(start of archive)");
        for entry in entries {
            let entry = entry.map_err(|e| {
                FormatError::bad_tar(
                    format!("after {last_path}"),
                    format!("unreadable header: {e}"),
                )
            })?;
            last_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            sealer.add_entry(entry, &last_path)?;
        }
    }
    // The diff id covers the whole uncompressed stream, end-of-archive padding included.
    io::copy(&mut hashed_input, &mut io::sink())
        .map_err(|e| FormatError::bad_tar("end of archive", e.to_string()))?;
    let (input_diff_id, input_tar_size) = hashed_input.finish();
    let mut summary = sealer.finish()?;
    summary.input_diff_id = input_diff_id;
    summary.input_tar_size = input_tar_size;
    Ok(summary)
}

/// A pack chunk being filled.
#[derive(Default)]
struct Pack {
    data: Vec<u8>,
    /// Entries with an extent in this pack, and the pieces it holds.
    entries: Vec<u32>,
    pieces: Vec<[u8; 32]>,
}

struct Sealer<W: Write> {
    out: HashingWriter<W>,
    keys: LayerKeys,
    chunk_size: usize,
    pack_size: usize,
    compressor: OrderedCompressor,
    zstd_level: i32,
    index: Index,
    /// Full path (no leading slash) -> entry number.
    paths: HashMap<Vec<u8>, u32>,
    /// BLAKE3 of a whole chunk's plaintext -> chunk number.
    chunk_dedup: HashMap<[u8; 32], u32>,
    /// BLAKE3 of a packed piece -> where it is.
    piece_dedup: HashMap<[u8; 32], Extent>,
    /// The ordinary pack and the pack of prefetch-listed files.
    packs: [Pack; 2],
    /// The prefetch list, in order, and the same paths for lookups.
    prefetch: Vec<Vec<u8>>,
    listed: HashSet<Vec<u8>>,
    buffer: Vec<u8>,
    /// Chunks numbered so far; those from `index.chunks.len()` on are being compressed or wait
    /// to be written. The newest always waits: whether it is the last is only known when the
    /// next arrives or the layer ends, and its AAD carries the last-chunk flag.
    emitted: u32,
    file_bytes: u64,
}

impl<W: Write> Sealer<W> {
    fn new(out: HashingWriter<W>, key: &LayerKey, options: &SealOptions) -> Result<Self> {
        let keys = LayerKeys::derive(key, LayerId::generate()?);
        let compressor = OrderedCompressor::new(options.threads, options.zstd_level)?;
        let chunk_size = 1usize << options.chunk_size_log2;
        let root = Entry {
            parent: 0,
            name: Vec::new(),
            kind: EntryKind::Dir {
                opaque: false,
                implicit: true,
            },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: Vec::new(),
        };
        let mut paths = HashMap::new();
        paths.insert(Vec::new(), 0);
        Ok(Sealer {
            out,
            keys,
            chunk_size,
            pack_size: 1usize << options.pack_size_log2,
            compressor,
            zstd_level: options.zstd_level,
            index: Index {
                chunks: Vec::new(),
                entries: vec![root],
                prefetch: Vec::new(),
            },
            paths,
            chunk_dedup: HashMap::new(),
            piece_dedup: HashMap::new(),
            packs: [Pack::default(), Pack::default()],
            prefetch: options.prefetch.clone(),
            listed: options.prefetch.iter().cloned().collect(),
            buffer: vec![0; chunk_size],
            emitted: 0,
            file_bytes: 0,
        })
    }

    fn add_entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>, shown: &str) -> Result<()> {
        use tar::EntryType;
        let header = entry.header().clone();
        let kind = header.entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let raw_path = entry.path_bytes().into_owned();
        let path = normalize_path(&raw_path).ok_or_else(|| {
            FormatError::bad_tar(shown, "path escapes the layer root (absolute or `..`)")
        })?;
        if let Some(long) = path.split(|&b| b == b'/').find(|c| c.len() > MAX_NAME_LEN) {
            return Err(FormatError::bad_tar(
                shown,
                format!(
                    "a path component of {} bytes exceeds the {MAX_NAME_LEN}-byte limit",
                    long.len()
                ),
            ));
        }
        let meta = Metadata::read(&mut entry, shown)?;
        let (dir_path, name) = split_path(&path);

        // OCI whiteouts: `.wh..wh..opq` marks its directory opaque, `.wh.NAME` deletes NAME.
        if name == OCI_OPAQUE_MARKER {
            let dir = self.ensure_dir(dir_path, shown)?;
            if let EntryKind::Dir { opaque, .. } = &mut self.index.entries[dir as usize].kind {
                *opaque = true;
            }
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            // Other aufs metadata (`.wh..wh.plnk`, ...) means nothing to OCI consumers.
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(OCI_WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(FormatError::bad_tar(
                    shown,
                    "a whiteout must name an entry (`.wh.NAME`)",
                ));
            }
            let mut target = dir_path.to_vec();
            if !target.is_empty() {
                target.push(b'/');
            }
            target.extend_from_slice(hidden);
            return self
                .insert(&target, EntryKind::Whiteout, meta, shown)
                .map(|_| ());
        }

        let kind = match kind {
            EntryType::Regular | EntryType::Continuous => {
                let size = header
                    .entry_size()
                    .map_err(|e| FormatError::bad_tar(shown, format!("bad size field: {e}")))?;
                if size > MAX_FILE_SIZE {
                    return Err(FormatError::bad_tar(
                        shown,
                        format!("size {size} exceeds the 1 TiB limit"),
                    ));
                }
                self.file_bytes += size;
                // Placeholder; extents are filled once the entry number is known.
                EntryKind::File {
                    size,
                    extents: Vec::new(),
                }
            }
            EntryType::Directory => EntryKind::Dir {
                opaque: false,
                implicit: false,
            },
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| FormatError::bad_tar(shown, "symlink without a target"))?;
                EntryKind::Symlink {
                    target: target.into_owned(),
                }
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| FormatError::bad_tar(shown, "hard link without a target"))?;
                if target.starts_with(b"/") {
                    return Err(FormatError::bad_tar(shown, "hard link target is absolute"));
                }
                let target = normalize_path(&target).ok_or_else(|| {
                    FormatError::bad_tar(shown, "hard link target escapes the root")
                })?;
                let number = *self.paths.get(&target).ok_or_else(|| {
                    FormatError::bad_tar(
                        shown,
                        "hard link target is not an earlier entry of this layer",
                    )
                })?;
                let number = match self.index.entries[number as usize].kind {
                    EntryKind::HardLink { target } => target,
                    EntryKind::Dir { .. } | EntryKind::Whiteout => {
                        return Err(FormatError::bad_tar(
                            shown,
                            "hard link to a directory or whiteout",
                        ))
                    }
                    _ => number,
                };
                EntryKind::HardLink { target: number }
            }
            EntryType::Char | EntryType::Block => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                if kind == EntryType::Char {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            }
            EntryType::Fifo => EntryKind::Fifo,
            EntryType::GNUSparse => {
                return Err(FormatError::bad_tar(
                    shown,
                    "sparse files are not supported",
                ))
            }
            other => {
                return Err(FormatError::bad_tar(
                    shown,
                    format!("unsupported entry type {other:?}"),
                ))
            }
        };
        if path.is_empty() && !matches!(kind, EntryKind::Dir { .. }) {
            return Err(FormatError::bad_tar(
                shown,
                "the layer root must be a directory",
            ));
        }
        let is_file = matches!(kind, EntryKind::File { .. });
        let number = self.insert(&path, kind, meta, shown)?;
        if is_file {
            let pack = if self.listed.contains(&path) {
                PRIORITY
            } else {
                0
            };
            let extents = self.store_file_data(&mut entry, number, pack, shown)?;
            if let EntryKind::File { extents: slot, .. } =
                &mut self.index.entries[number as usize].kind
            {
                *slot = extents;
            }
        }
        Ok(())
    }

    /// Adds or replaces the entry at `path`; a later entry for the same path wins, as when a
    /// tar is extracted. Returns its number.
    fn insert(&mut self, path: &[u8], kind: EntryKind, meta: Metadata, shown: &str) -> Result<u32> {
        let (dir_path, name) = split_path(path);
        let build = |parent| Entry {
            parent,
            name: name.to_vec(),
            kind,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
            xattrs: meta.xattrs,
        };
        if let Some(&existing) = self.paths.get(path) {
            let old = &self.index.entries[existing as usize];
            let replacement = build(old.parent);
            match (&old.kind, &replacement.kind) {
                // A directory listed again keeps its children; it takes the new metadata.
                (EntryKind::Dir { opaque, .. }, EntryKind::Dir { implicit, .. }) => {
                    let implicit = *implicit;
                    let opaque = *opaque;
                    let slot = &mut self.index.entries[existing as usize];
                    *slot = Entry {
                        kind: EntryKind::Dir { opaque, implicit },
                        ..replacement
                    };
                    return Ok(existing);
                }
                (EntryKind::Dir { .. }, _) => {
                    return Err(FormatError::bad_tar(
                        shown,
                        "replaces a directory with a non-directory",
                    ))
                }
                _ => {
                    if self
                        .index
                        .entries
                        .iter()
                        .any(|e| e.kind == (EntryKind::HardLink { target: existing }))
                    {
                        return Err(FormatError::bad_tar(shown, "replaces a hard link target"));
                    }
                    // The old entry's data stays in the blob, unreferenced; the slot is reused
                    // so entry numbers stay dense and parents stay before children.
                    for pack in &mut self.packs {
                        pack.entries.retain(|&e| e != existing);
                    }
                    self.index.entries[existing as usize] = replacement;
                    return Ok(existing);
                }
            }
        }
        let parent = self.ensure_dir(dir_path, shown)?;
        let number = u32::try_from(self.index.entries.len())
            .map_err(|_| FormatError::bad_tar(shown, "too many entries"))?;
        self.index.entries.push(build(parent));
        self.paths.insert(path.to_vec(), number);
        Ok(number)
    }

    /// The entry number of directory `path`, creating it and its parents (mode 0755, owned by
    /// root) if the tar did not list them.
    fn ensure_dir(&mut self, path: &[u8], shown: &str) -> Result<u32> {
        if let Some(&number) = self.paths.get(path) {
            return match self.index.entries[number as usize].kind {
                EntryKind::Dir { .. } => Ok(number),
                _ => Err(FormatError::bad_tar(
                    shown,
                    "a parent path is not a directory",
                )),
            };
        }
        let meta = Metadata {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: Vec::new(),
        };
        let implicit = EntryKind::Dir {
            opaque: false,
            implicit: true,
        };
        self.insert(path, implicit, meta, shown)
    }

    /// Stores a file's data; its small pieces go into `pack`.
    fn store_file_data(
        &mut self,
        data: &mut impl Read,
        entry: u32,
        pack: usize,
        shown: &str,
    ) -> Result<Vec<Extent>> {
        let EntryKind::File { size, .. } = self.index.entries[entry as usize].kind else {
            unreachable!("store_file_data is called for regular files only");
        };
        let mut extents = Vec::new();
        let mut remaining = size;
        while remaining > 0 {
            let len = remaining.min(self.chunk_size as u64) as usize;
            let mut buffer = std::mem::take(&mut self.buffer);
            let read = data.read_exact(&mut buffer[..len]).map_err(|e| {
                FormatError::bad_tar(
                    shown,
                    format!("truncated: {} of {size} bytes missing ({e})", remaining),
                )
            });
            let stored = read.and_then(|()| {
                if len == self.chunk_size || len > self.pack_size {
                    self.store_whole_chunk(&buffer[..len])
                } else {
                    self.store_piece(&buffer[..len], entry, pack)
                }
            });
            self.buffer = buffer;
            extents.push(stored?);
            remaining -= len as u64;
        }
        Ok(extents)
    }

    fn store_whole_chunk(&mut self, plain: &[u8]) -> Result<Extent> {
        let digest: [u8; 32] = blake3::hash(plain).into();
        let chunk = match self.chunk_dedup.get(&digest) {
            Some(&chunk) => chunk,
            None => {
                let chunk = self.emit_chunk(plain)?;
                self.chunk_dedup.insert(digest, chunk);
                chunk
            }
        };
        Ok(Extent {
            chunk,
            offset: 0,
            len: plain.len() as u32,
        })
    }

    fn store_piece(&mut self, plain: &[u8], entry: u32, pack: usize) -> Result<Extent> {
        let digest: [u8; 32] = blake3::hash(plain).into();
        if let Some(&extent) = self.piece_dedup.get(&digest) {
            if let Some(holder) = PENDING_PACK.iter().position(|&p| p == extent.chunk) {
                self.packs[holder].entries.push(entry);
            }
            return Ok(extent);
        }
        if self.packs[pack].data.len() + plain.len() > self.pack_size {
            self.flush_pack(pack)?;
        }
        let filling = &mut self.packs[pack];
        let extent = Extent {
            chunk: PENDING_PACK[pack],
            offset: filling.data.len() as u32,
            len: plain.len() as u32,
        };
        filling.data.extend_from_slice(plain);
        filling.entries.push(entry);
        filling.pieces.push(digest);
        self.piece_dedup.insert(digest, extent);
        Ok(extent)
    }

    fn flush_pack(&mut self, pack: usize) -> Result<()> {
        if self.packs[pack].data.is_empty() {
            return Ok(());
        }
        let mut data = std::mem::take(&mut self.packs[pack].data);
        let chunk = self.emit_chunk(&data)?;
        data.clear();
        let filled = &mut self.packs[pack];
        filled.data = data;
        for entry in filled.entries.drain(..) {
            if let EntryKind::File { extents, .. } = &mut self.index.entries[entry as usize].kind {
                for extent in extents.iter_mut().filter(|e| e.chunk == PENDING_PACK[pack]) {
                    extent.chunk = chunk;
                }
            }
        }
        for digest in filled.pieces.drain(..) {
            if let Some(extent) = self.piece_dedup.get_mut(&digest) {
                extent.chunk = chunk;
            }
        }
        Ok(())
    }

    /// The index's prefetch order: the chunks of the listed files that this layer has, in list
    /// order, each once.
    fn prefetch_order(&self) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for path in &self.prefetch {
            let Some(&number) = self.paths.get(path) else {
                continue;
            };
            let number = match self.index.entries[number as usize].kind {
                EntryKind::HardLink { target } => target,
                _ => number,
            };
            if let EntryKind::File { extents, .. } = &self.index.entries[number as usize].kind {
                for extent in extents {
                    if seen.insert(extent.chunk) {
                        order.push(extent.chunk);
                    }
                }
            }
        }
        order
    }

    /// Queues a chunk for compression; returns its number. Writes the chunks before it that
    /// are ready, and waits for the oldest when too many are outstanding.
    fn emit_chunk(&mut self, plain: &[u8]) -> Result<u32> {
        let number = self.emitted;
        if number >= PENDING_PACK[PRIORITY] {
            return Err(FormatError::InvalidArgument(
                "layer has more than 2^32-1 chunks".into(),
            ));
        }
        while !self.compressor.has_room() {
            self.write_next(false)?;
        }
        self.compressor.submit(number, plain.to_vec())?;
        self.emitted += 1;
        Ok(number)
    }

    /// Seals and writes the oldest chunk not yet written; `last` says whether it is the
    /// layer's last one.
    fn write_next(&mut self, last: bool) -> Result<()> {
        let index = self.index.chunks.len() as u32;
        let Compressed {
            mut payload,
            plain_len,
            compression,
        } = self.compressor.take(index)?;
        let sealed_len = (payload.len() + TAG_LEN) as u32;
        let binding = ChunkBinding {
            index,
            offset: self.out.written(),
            sealed_len,
            plain_len,
            compression,
            last,
        };
        self.keys.seal_chunk(&binding, &mut payload);
        self.out
            .write_all(&payload)
            .map_err(|e| FormatError::io("writing a chunk", e))?;
        self.index.chunks.push(ChunkInfo {
            sealed_len,
            plain_len,
            compression,
        });
        Ok(())
    }

    fn finish(mut self) -> Result<SealSummary> {
        self.flush_pack(PRIORITY)?;
        self.flush_pack(0)?;
        while (self.index.chunks.len() as u32) < self.emitted {
            let last = self.index.chunks.len() as u32 + 1 == self.emitted;
            self.write_next(last)?;
        }
        self.index.prefetch = self.prefetch_order();
        let plain_index = self.index.encode()?;
        // Seal only what every reader will accept and read back as this very index: the
        // writer's own checks and the reader's strict decoder cannot drift apart unnoticed.
        let chunk_count = u32::try_from(self.index.chunks.len())
            .map_err(|_| FormatError::InvalidArgument("too many chunks".into()))?;
        let read_back =
            Index::decode(&plain_index, chunk_count, self.chunk_size as u32).map_err(|e| {
                FormatError::InvalidArgument(format!(
                    "the index this layer produced would not be readable: {e}"
                ))
            })?;
        if read_back != self.index {
            return Err(FormatError::InvalidArgument(
                "the index this layer produced does not read back as written".into(),
            ));
        }
        drop(read_back);
        let index_plain_len = u32::try_from(plain_index.len())
            .ok()
            .filter(|&len| len <= MAX_INDEX_LEN)
            .ok_or_else(|| FormatError::InvalidArgument("index exceeds the 1 GiB limit".into()))?;
        let mut sealed_index = zstd::bulk::compress(&plain_index, self.zstd_level)
            .map_err(|e| FormatError::io("compressing the index", e))?;
        let index_offset = self.out.written();
        let mut footer = Footer {
            chunk_size_log2: self.chunk_size.trailing_zeros() as u8,
            chunk_count: self.index.chunks.len() as u32,
            data_bytes: self
                .index
                .chunks
                .iter()
                .map(|c| u64::from(c.plain_len))
                .sum(),
            index_offset,
            index_sealed_len: (sealed_index.len() + TAG_LEN) as u32,
            index_plain_len,
            layer_id: self.keys.layer_id().0,
            key_commitment: *self.keys.commitment(),
        };
        let encoded = footer.encode();
        self.keys
            .seal_index(&encoded[..FOOTER_AAD_LEN], &mut sealed_index);
        footer.index_sealed_len = sealed_index.len() as u32;
        let encoded = footer.encode();

        let tail_digest = digest_of(&[&sealed_index[..], &encoded[..]].concat());
        self.out
            .write_all(&sealed_index)
            .and_then(|()| self.out.write_all(&encoded))
            .and_then(|()| self.out.flush())
            .map_err(|e| FormatError::io("writing the index", e))?;
        let (_, blob_digest, blob_size) = self.out.finish();
        Ok(SealSummary {
            blob_digest,
            blob_size,
            tail_digest,
            tail_size: footer.tail_len(),
            input_diff_id: String::new(),
            input_tar_size: 0,
            chunk_count: footer.chunk_count,
            data_bytes: footer.data_bytes,
            file_bytes: self.file_bytes,
            entry_count: self.index.entries.len(),
            prefetch_chunks: self.index.prefetch.len(),
            prefetch_bytes: self
                .index
                .prefetch
                .iter()
                .map(|&c| u64::from(self.index.chunks[c as usize].sealed_len))
                .sum(),
        })
    }
}

/// The metadata every entry carries, read from the tar header and its PAX records.
struct Metadata {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Metadata {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<Self> {
        let header = entry.header();
        let field = |name: &str, value: io::Result<u64>| {
            value.map_err(|e| FormatError::bad_tar(shown, format!("bad {name} field: {e}")))
        };
        let mode = field("mode", header.mode().map(u64::from))? as u32 & 0o7777;
        let mut uid = field("uid", header.uid())?;
        let mut gid = field("gid", header.gid())?;
        let mut mtime = Timestamp {
            secs: field("mtime", header.mtime())? as i64,
            nanos: 0,
        };
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| FormatError::bad_tar(shown, format!("bad PAX header: {e}")))?
        {
            for record in pax {
                let record = record
                    .map_err(|e| FormatError::bad_tar(shown, format!("bad PAX record: {e}")))?;
                let key = record.key_bytes();
                let value = record.value_bytes();
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| FormatError::bad_tar(shown, "bad numeric PAX record"))
                };
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.is_empty() || name.contains(&0) {
                        return Err(FormatError::bad_tar(shown, "bad xattr name"));
                    }
                    if name.len() > MAX_NAME_LEN {
                        return Err(FormatError::bad_tar(
                            shown,
                            format!(
                                "xattr name of {} bytes exceeds the {MAX_NAME_LEN}-byte limit",
                                name.len()
                            ),
                        ));
                    }
                    xattrs.retain(|(n, _)| n != name);
                    // Checked as they arrive, so the scan above stays bounded too.
                    if xattrs.len() >= MAX_XATTRS_PER_ENTRY {
                        return Err(FormatError::bad_tar(
                            shown,
                            format!("more than {MAX_XATTRS_PER_ENTRY} extended attributes"),
                        ));
                    }
                    xattrs.push((name.to_vec(), value.to_vec()));
                } else if key == b"uid" {
                    uid = number()?;
                } else if key == b"gid" {
                    gid = number()?;
                } else if key == b"mtime" {
                    mtime = parse_pax_time(value)
                        .ok_or_else(|| FormatError::bad_tar(shown, "bad PAX mtime"))?;
                }
            }
        }
        let uid = u32::try_from(uid).map_err(|_| FormatError::bad_tar(shown, "uid above 2^32"))?;
        let gid = u32::try_from(gid).map_err(|_| FormatError::bad_tar(shown, "gid above 2^32"))?;
        Ok(Metadata {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }
}

/// Parses a PAX time, `SECONDS[.FRACTION]`, possibly negative.
fn parse_pax_time(value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = int.parse().ok()?;
    if frac.is_empty() {
        return Some(Timestamp { secs, nanos: 0 });
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut nanos: u32 = digits.parse().ok()?;
    let mut secs = secs;
    if int.starts_with('-') && nanos > 0 {
        // -1.25 is 1.25 s before the epoch: -2 s plus 0.75 s.
        secs -= 1;
        nanos = 1_000_000_000 - nanos;
    }
    Some(Timestamp { secs, nanos })
}

/// Turns a tar path into a relative path with no `.`, empty or `..` components and no trailing
/// slash. `None` when the path is absolute after stripping `./` or climbs out of the root.
/// Leading `/` is stripped as containerd does; `..` anywhere is refused.
fn normalize_path(raw: &[u8]) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for component in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
            Component::Normal(part) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part.as_bytes());
            }
        }
    }
    Some(out)
}

fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => (&[], path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_traversal_refused() {
        assert_eq!(normalize_path(b"./a/b/").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"/etc//x").unwrap(), b"etc/x");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert!(normalize_path(b"a/../../etc").is_none());
        assert!(normalize_path(b"../x").is_none());
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(Timestamp {
                secs: 12,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(parse_pax_time(b"7"), Some(Timestamp { secs: 7, nanos: 0 }));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
