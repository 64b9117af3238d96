//! The byte layout of a sealed blob: the footer and the index, with their canonical encoders and
//! strict decoders. No crypto and no I/O here; `docs/format.md` is the normative description.
//!
//! ```text
//! blob   = chunk_0 || chunk_1 || ... || chunk_{n-1} || sealed_index || footer
//! footer = 96 bytes, little endian, see `Footer`
//! ```
//!
//! The decoders are written for hostile input: every count is checked against the bytes that
//! remain before anything is allocated, every reference points backwards or into a table whose
//! size is known, and only canonical encodings are accepted.

use std::collections::{HashMap, HashSet};

use crate::crypto::{Compression, COMMITMENT_LEN, LAYER_ID_LEN, TAG_LEN};
use crate::error::{FormatError, Result};

/// Length of the footer at the end of every sealed blob.
pub const FOOTER_LEN: usize = 96;
/// First 8 bytes of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"sealfs\0\x01";
/// Last 8 bytes of the footer.
pub const FOOTER_END_MAGIC: [u8; 8] = *b"sealfs\0\xff";
/// The only format version this crate reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Smallest allowed chunk size: 64 KiB.
pub const MIN_CHUNK_SIZE_LOG2: u8 = 16;
/// Largest allowed chunk size: 16 MiB.
pub const MAX_CHUNK_SIZE_LOG2: u8 = 24;
/// Default chunk size: 1 MiB, the size of one large FUSE read.
pub const DEFAULT_CHUNK_SIZE_LOG2: u8 = 20;
/// Upper bound on the decompressed index a reader accepts (1 GiB): bounds memory on hostile
/// input while leaving room for millions of entries.
pub const MAX_INDEX_LEN: u32 = 1 << 30;
/// Bytes of the footer covered by the index AAD: everything before the key commitment.
pub const FOOTER_AAD_LEN: usize = 56;

const INDEX_MAGIC: [u8; 4] = *b"SFIX";

/// The fixed-size trailer that locates the index.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `sealfs\0\x01` |
/// | 8 | 2 | version (1) |
/// | 10 | 1 | log2 of the chunk size (16..=24) |
/// | 11 | 1 | reserved, 0 |
/// | 12 | 4 | chunk count |
/// | 16 | 8 | total plaintext bytes of all chunks |
/// | 24 | 8 | offset of the sealed index (= sum of sealed chunk lengths) |
/// | 32 | 4 | sealed index length (compressed index + 16-byte tag) |
/// | 36 | 4 | decompressed index length |
/// | 40 | 16 | layer id |
/// | 56 | 32 | key commitment |
/// | 88 | 8 | end magic `sealfs\0\xff` |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// log2 of the chunk size.
    pub chunk_size_log2: u8,
    /// Number of stored chunks.
    pub chunk_count: u32,
    /// Sum of the chunks' plaintext lengths.
    pub data_bytes: u64,
    /// Where the sealed index starts.
    pub index_offset: u64,
    /// Sealed index length, including its tag.
    pub index_sealed_len: u32,
    /// Decompressed index length.
    pub index_plain_len: u32,
    /// The layer id.
    pub layer_id: [u8; LAYER_ID_LEN],
    /// The key commitment.
    pub key_commitment: [u8; COMMITMENT_LEN],
}

impl Footer {
    /// Encodes the footer.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        out[0..8].copy_from_slice(&FOOTER_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10] = self.chunk_size_log2;
        out[11] = 0;
        out[12..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        out[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.index_offset.to_le_bytes());
        out[32..36].copy_from_slice(&self.index_sealed_len.to_le_bytes());
        out[36..40].copy_from_slice(&self.index_plain_len.to_le_bytes());
        out[40..56].copy_from_slice(&self.layer_id);
        out[56..88].copy_from_slice(&self.key_commitment);
        out[88..96].copy_from_slice(&FOOTER_END_MAGIC);
        out
    }

    /// Decodes and checks a footer taken from the end of a blob of `blob_len` bytes.
    pub fn decode(bytes: &[u8], blob_len: u64) -> Result<Self> {
        let bad = |why: &str| FormatError::BadFooter(why.to_string());
        let bytes: &[u8; FOOTER_LEN] = bytes
            .try_into()
            .map_err(|_| bad("footer must be exactly 96 bytes"))?;
        if bytes[0..8] != FOOTER_MAGIC || bytes[88..96] != FOOTER_END_MAGIC {
            return Err(bad("not a sealfs layer (magic mismatch)"));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::BadFooter(format!(
                "format version {version} is not supported (this reader knows version {FORMAT_VERSION})"
            )));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let footer = Footer {
            chunk_size_log2: bytes[10],
            chunk_count: u32_at(12),
            data_bytes: u64_at(16),
            index_offset: u64_at(24),
            index_sealed_len: u32_at(32),
            index_plain_len: u32_at(36),
            layer_id: bytes[40..56].try_into().unwrap(),
            key_commitment: bytes[56..88].try_into().unwrap(),
        };
        if !(MIN_CHUNK_SIZE_LOG2..=MAX_CHUNK_SIZE_LOG2).contains(&footer.chunk_size_log2) {
            return Err(bad("chunk size out of range"));
        }
        if bytes[11] != 0 {
            return Err(bad("reserved byte is not zero"));
        }
        if (footer.index_sealed_len as usize) < TAG_LEN {
            return Err(bad("sealed index shorter than its tag"));
        }
        if footer.index_plain_len > MAX_INDEX_LEN {
            return Err(bad("index larger than the 1 GiB limit"));
        }
        let expected_end = footer
            .index_offset
            .checked_add(u64::from(footer.index_sealed_len))
            .and_then(|end| end.checked_add(FOOTER_LEN as u64));
        if expected_end != Some(blob_len) {
            return Err(bad(
                "index does not end where the footer starts (truncated blob?)",
            ));
        }
        let max_data = u64::from(footer.chunk_count) << footer.chunk_size_log2;
        if footer.data_bytes > max_data {
            return Err(bad("data size exceeds chunk count times chunk size"));
        }
        Ok(footer)
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        1 << self.chunk_size_log2
    }

    /// Length of the blob's tail: sealed index plus footer.
    pub fn tail_len(&self) -> u64 {
        u64::from(self.index_sealed_len) + FOOTER_LEN as u64
    }
}

/// One stored chunk, as listed in the index. Offsets are not stored: chunks are contiguous from
/// offset 0 in chunk-number order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Sealed length (payload plus tag).
    pub sealed_len: u32,
    /// Plaintext length.
    pub plain_len: u32,
    /// Payload encoding.
    pub compression: Compression,
}

/// A piece of a regular file: `len` bytes at `offset` in the plaintext of chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Chunk number.
    pub chunk: u32,
    /// Offset within the chunk's plaintext.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// A timestamp with nanoseconds, as tar's PAX headers carry it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the epoch (may be negative).
    pub secs: i64,
    /// Nanoseconds, below one billion.
    pub nanos: u32,
}

/// What an entry is, with the data only that kind has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File {
        /// Size in bytes; equals the sum of the extents' lengths.
        size: u64,
        /// Where the bytes are, in file order.
        extents: Vec<Extent>,
    },
    /// A directory.
    Dir {
        /// OCI opaque directory (`.wh..wh..opq`): hides lower layers' content.
        opaque: bool,
        /// The tar did not list this directory, only paths below it. Its metadata is a default
        /// (0755, root, mtime 0); a consumer stacking layers should take a lower layer's
        /// directory of the same path instead, as extracting the tar would have.
        implicit: bool,
    },
    /// A symbolic link.
    Symlink {
        /// The link target, as bytes.
        target: Vec<u8>,
    },
    /// A hard link to an earlier entry (never a directory or another hard link).
    HardLink {
        /// Entry number of the target.
        target: u32,
    },
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// An OCI whiteout (`.wh.NAME` in the tar): NAME is deleted from lower layers.
    Whiteout,
}

impl EntryKind {
    fn tag(&self) -> u8 {
        match self {
            EntryKind::File { .. } => 0,
            EntryKind::Dir { .. } => 1,
            EntryKind::Symlink { .. } => 2,
            EntryKind::HardLink { .. } => 3,
            EntryKind::CharDevice { .. } => 4,
            EntryKind::BlockDevice { .. } => 5,
            EntryKind::Fifo => 6,
            EntryKind::Whiteout => 7,
        }
    }
}

/// One node of the layer's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Entry number of the parent directory (the root is its own parent).
    pub parent: u32,
    /// The name within the parent (empty for the root).
    pub name: Vec<u8>,
    /// Kind and kind-specific data.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (12 bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes in tar order (names are unique).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The decrypted index of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    /// The chunk table, in blob order.
    pub chunks: Vec<ChunkInfo>,
    /// The tree; entry 0 is the root directory, parents come before children.
    pub entries: Vec<Entry>,
    /// Chunk numbers to fetch first, in order (a startup profile); may be empty.
    pub prefetch: Vec<u32>,
}

/// Bytes an entry occupies at the very least, used to bound counts before allocating.
const MIN_ENTRY_LEN: usize = 4 + 2 + 1 + 4 + 4 + 4 + 8 + 4 + 2;
const CHUNK_RECORD_LEN: usize = 9;
const EXTENT_LEN: usize = 12;
/// Longest name component and longest xattr name (Linux's `NAME_MAX` and `XATTR_NAME_MAX`):
/// no filesystem a layer is extracted to holds longer ones, so nothing longer is sealed or read.
pub const MAX_NAME_LEN: usize = 255;
/// Most extended attributes one entry may carry. Linux caps an inode's xattr names at 64 KiB in
/// all; 1024 leaves room for any real image while bounding the work per entry.
pub const MAX_XATTRS_PER_ENTRY: usize = 1024;

impl Index {
    /// The full path of entry `number`, relative to the root (no leading slash).
    pub fn path_of(&self, mut number: u32) -> Vec<u8> {
        let mut parts = Vec::new();
        while number != 0 {
            let entry = &self.entries[number as usize];
            parts.push(entry.name.as_slice());
            number = entry.parent;
        }
        parts.reverse();
        parts.join(&b'/')
    }

    /// Encodes the index canonically. Fails, instead of truncating, when a length does not
    /// fit its field or a name or xattr list exceeds the format's limits: every length is
    /// written through a checked conversion.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 64);
        out.extend_from_slice(&INDEX_MAGIC);
        put_u16(&mut out, FORMAT_VERSION);
        put_u16(&mut out, 0);
        put_u32(&mut out, len_u32(self.chunks.len(), "chunk table")?);
        for chunk in &self.chunks {
            put_u32(&mut out, chunk.sealed_len);
            put_u32(&mut out, chunk.plain_len);
            out.push(chunk.compression as u8);
        }
        put_u32(&mut out, len_u32(self.entries.len(), "entry table")?);
        for (number, entry) in self.entries.iter().enumerate() {
            let too_long = |what: &str| {
                FormatError::InvalidArgument(format!(
                    "entry {number}: {what} (limit {MAX_NAME_LEN} bytes)"
                ))
            };
            if entry.name.len() > MAX_NAME_LEN {
                return Err(too_long("name is too long"));
            }
            if entry.xattrs.len() > MAX_XATTRS_PER_ENTRY {
                return Err(FormatError::InvalidArgument(format!(
                    "entry {number}: {} extended attributes (limit {MAX_XATTRS_PER_ENTRY})",
                    entry.xattrs.len()
                )));
            }
            put_u32(&mut out, entry.parent);
            put_u16(&mut out, len_u16(entry.name.len(), "name")?);
            out.extend_from_slice(&entry.name);
            out.push(entry.kind.tag());
            put_u32(&mut out, entry.mode);
            put_u32(&mut out, entry.uid);
            put_u32(&mut out, entry.gid);
            out.extend_from_slice(&entry.mtime.secs.to_le_bytes());
            put_u32(&mut out, entry.mtime.nanos);
            match &entry.kind {
                EntryKind::File { size, extents } => {
                    out.extend_from_slice(&size.to_le_bytes());
                    put_u32(&mut out, len_u32(extents.len(), "extent list")?);
                    for extent in extents {
                        put_u32(&mut out, extent.chunk);
                        put_u32(&mut out, extent.offset);
                        put_u32(&mut out, extent.len);
                    }
                }
                EntryKind::Dir { opaque, implicit } => {
                    out.push(u8::from(*opaque) | (u8::from(*implicit) << 1))
                }
                EntryKind::Symlink { target } => {
                    put_u32(&mut out, len_u32(target.len(), "symlink target")?);
                    out.extend_from_slice(target);
                }
                EntryKind::HardLink { target } => put_u32(&mut out, *target),
                EntryKind::CharDevice { major, minor }
                | EntryKind::BlockDevice { major, minor } => {
                    put_u32(&mut out, *major);
                    put_u32(&mut out, *minor);
                }
                EntryKind::Fifo | EntryKind::Whiteout => {}
            }
            put_u16(&mut out, len_u16(entry.xattrs.len(), "xattr list")?);
            for (name, value) in &entry.xattrs {
                if name.len() > MAX_NAME_LEN {
                    return Err(too_long("xattr name is too long"));
                }
                put_u16(&mut out, len_u16(name.len(), "xattr name")?);
                out.extend_from_slice(name);
                put_u32(&mut out, len_u32(value.len(), "xattr value")?);
                out.extend_from_slice(value);
            }
        }
        put_u32(&mut out, len_u32(self.prefetch.len(), "prefetch list")?);
        for chunk in &self.prefetch {
            put_u32(&mut out, *chunk);
        }
        Ok(out)
    }

    /// Decodes and validates an index whose footer says `chunk_count` chunks of at most
    /// `chunk_size` plaintext bytes.
    pub fn decode(bytes: &[u8], chunk_count: u32, chunk_size: u32) -> Result<Self> {
        let mut r = Cursor {
            bytes,
            at: 0,
            name_at: 0,
        };
        if r.take(4)? != INDEX_MAGIC {
            return Err(bad_index("magic mismatch"));
        }
        if r.u16()? != FORMAT_VERSION || r.u16()? != 0 {
            return Err(bad_index(
                "unsupported index version or nonzero reserved field",
            ));
        }
        let count = r.count(CHUNK_RECORD_LEN)?;
        if count != chunk_count as usize {
            return Err(bad_index("chunk count differs from the footer"));
        }
        let mut chunks = Vec::with_capacity(count);
        for number in 0..count {
            let sealed_len = r.u32()?;
            let plain_len = r.u32()?;
            let compression = Compression::from_byte(r.u8()?)
                .ok_or_else(|| bad_index(format!("chunk {number}: unknown compression")))?;
            if plain_len == 0 || plain_len > chunk_size {
                return Err(bad_index(format!(
                    "chunk {number}: plaintext length out of range"
                )));
            }
            let payload_len = sealed_len.checked_sub(TAG_LEN as u32);
            let consistent = match (compression, payload_len) {
                (_, None) | (_, Some(0)) => false,
                (Compression::Stored, Some(len)) => len == plain_len,
                // A zstd frame that is not smaller would have been stored instead.
                (Compression::Zstd, Some(len)) => len < plain_len,
            };
            if !consistent {
                return Err(bad_index(format!(
                    "chunk {number}: sealed length inconsistent"
                )));
            }
            chunks.push(ChunkInfo {
                sealed_len,
                plain_len,
                compression,
            });
        }
        let count = r.count(MIN_ENTRY_LEN)?;
        if count == 0 {
            return Err(bad_index("no root entry"));
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(count);
        let mut siblings: HashMap<(u32, &[u8]), ()> = HashMap::with_capacity(count);
        for number in 0..count as u32 {
            let entry = decode_entry(&mut r, number, &chunks, &entries)?;
            if number > 0
                && siblings
                    .insert(
                        (
                            entry.parent,
                            &bytes[r.name_at..r.name_at + entry.name.len()],
                        ),
                        (),
                    )
                    .is_some()
            {
                return Err(bad_index(format!(
                    "entry {number}: duplicate name in directory"
                )));
            }
            entries.push(entry);
        }
        let count = r.count(4)?;
        let mut prefetch = Vec::with_capacity(count);
        for _ in 0..count {
            let chunk = r.u32()?;
            if chunk >= chunk_count {
                return Err(bad_index("prefetch list names a chunk that does not exist"));
            }
            prefetch.push(chunk);
        }
        if r.at != bytes.len() {
            return Err(bad_index("trailing bytes after the index"));
        }
        Ok(Index {
            chunks,
            entries,
            prefetch,
        })
    }

    /// Offsets of every chunk in the blob, derived from the sealed lengths.
    pub fn chunk_offsets(&self) -> Vec<u64> {
        let mut offsets = Vec::with_capacity(self.chunks.len());
        let mut at = 0u64;
        for chunk in &self.chunks {
            offsets.push(at);
            at += u64::from(chunk.sealed_len);
        }
        offsets
    }

    /// Sum of the sealed chunk lengths: where the index must start.
    pub fn sealed_data_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.sealed_len)).sum()
    }
}

fn decode_entry(
    r: &mut Cursor<'_>,
    number: u32,
    chunks: &[ChunkInfo],
    earlier: &[Entry],
) -> Result<Entry> {
    let fail = |why: &str| bad_index(format!("entry {number}: {why}"));
    let parent = r.u32()?;
    let name_len = usize::from(r.u16()?);
    r.name_at = r.at;
    let name = r.take(name_len)?.to_vec();
    if number == 0 {
        if parent != 0 || !name.is_empty() {
            return Err(fail("the root must be entry 0 with an empty name"));
        }
    } else {
        if parent >= number {
            return Err(fail("parent must come before the entry"));
        }
        if !matches!(earlier[parent as usize].kind, EntryKind::Dir { .. }) {
            return Err(fail("parent is not a directory"));
        }
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(fail("invalid name"));
        }
    }
    let tag = r.u8()?;
    let mode = r.u32()?;
    if mode & !0o7777 != 0 {
        return Err(fail("mode has bits outside 0o7777"));
    }
    let uid = r.u32()?;
    let gid = r.u32()?;
    let secs = i64::from_le_bytes(r.take(8)?.try_into().unwrap());
    let nanos = r.u32()?;
    if nanos >= 1_000_000_000 {
        return Err(fail("nanoseconds out of range"));
    }
    let kind = match tag {
        0 => {
            let size = r.u64()?;
            let count = r.count(EXTENT_LEN)?;
            let mut extents = Vec::with_capacity(count);
            let mut total = 0u64;
            for _ in 0..count {
                let extent = Extent {
                    chunk: r.u32()?,
                    offset: r.u32()?,
                    len: r.u32()?,
                };
                let chunk = chunks
                    .get(extent.chunk as usize)
                    .ok_or_else(|| fail("extent names a chunk that does not exist"))?;
                let end = u64::from(extent.offset) + u64::from(extent.len);
                if extent.len == 0 || end > u64::from(chunk.plain_len) {
                    return Err(fail("extent outside its chunk"));
                }
                total += u64::from(extent.len);
                extents.push(extent);
            }
            if total != size {
                return Err(fail("extents do not add up to the file size"));
            }
            EntryKind::File { size, extents }
        }
        1 => match r.u8()? {
            flags @ 0..=3 => EntryKind::Dir {
                opaque: flags & 1 != 0,
                implicit: flags & 2 != 0,
            },
            _ => return Err(fail("unknown directory flags")),
        },
        2 => {
            let len = r.count(1)?;
            let target = r.take(len)?.to_vec();
            if target.is_empty() || target.contains(&0) {
                return Err(fail("invalid symlink target"));
            }
            EntryKind::Symlink { target }
        }
        3 => {
            let target = r.u32()?;
            if target >= number {
                return Err(fail("hard link target must come before the link"));
            }
            if matches!(
                earlier[target as usize].kind,
                EntryKind::Dir { .. } | EntryKind::HardLink { .. } | EntryKind::Whiteout
            ) {
                return Err(fail("hard link to a directory, hard link or whiteout"));
            }
            EntryKind::HardLink { target }
        }
        4 | 5 => {
            let (major, minor) = (r.u32()?, r.u32()?);
            if tag == 4 {
                EntryKind::CharDevice { major, minor }
            } else {
                EntryKind::BlockDevice { major, minor }
            }
        }
        6 => EntryKind::Fifo,
        7 => EntryKind::Whiteout,
        _ => return Err(fail("unknown entry kind")),
    };
    if number == 0 && !matches!(kind, EntryKind::Dir { .. }) {
        return Err(fail("the root must be a directory"));
    }
    let count = usize::from(r.u16()?);
    if count > MAX_XATTRS_PER_ENTRY {
        return Err(fail("too many extended attributes"));
    }
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count.min(r.remaining() / 6));
    // A set, not a scan of the earlier names: the check stays linear in the entry's size.
    let mut names: HashSet<&[u8]> = HashSet::with_capacity(xattrs.capacity());
    for _ in 0..count {
        let name_len = usize::from(r.u16()?);
        let name = r.take(name_len)?;
        let value_len = r.count(1)?;
        let value = r.take(value_len)?.to_vec();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains(&0) || !names.insert(name)
        {
            return Err(fail("invalid or duplicate xattr name"));
        }
        xattrs.push((name.to_vec(), value));
    }
    Ok(Entry {
        parent,
        name,
        kind,
        mode,
        uid,
        gid,
        mtime: Timestamp { secs, nanos },
        xattrs,
    })
}

fn bad_index(why: impl Into<String>) -> FormatError {
    FormatError::BadIndex(why.into())
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A length for a u32 field, or an error naming the field: never a silent truncation.
fn len_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        FormatError::InvalidArgument(format!("{what} of {len} does not fit the index"))
    })
}

/// A length for a u16 field, or an error naming the field.
fn len_u16(len: usize, what: &str) -> Result<u16> {
    u16::try_from(len).map_err(|_| {
        FormatError::InvalidArgument(format!("{what} of {len} does not fit the index"))
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Where the last entry's name started, for the duplicate check without copying.
    name_at: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        if len > self.remaining() {
            return Err(bad_index("truncated"));
        }
        let out = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// Reads a u32 count of records of at least `min_record` bytes each, rejecting counts the
    /// remaining bytes cannot hold so that no allocation follows a lie.
    fn count(&mut self, min_record: usize) -> Result<usize> {
        let count = self.u32()? as usize;
        if count.saturating_mul(min_record) > self.remaining() {
            return Err(bad_index("count exceeds the remaining bytes"));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        let base = |parent, name: &[u8], kind| Entry {
            parent,
            name: name.to_vec(),
            kind,
            mode: 0o755,
            uid: 1,
            gid: 2,
            mtime: Timestamp { secs: -5, nanos: 7 },
            xattrs: vec![],
        };
        let mut file = base(
            0,
            b"f",
            EntryKind::File {
                size: 10,
                extents: vec![Extent {
                    chunk: 0,
                    offset: 5,
                    len: 10,
                }],
            },
        );
        file.xattrs.push((b"user.x".to_vec(), b"\0\x01".to_vec()));
        Index {
            chunks: vec![ChunkInfo {
                sealed_len: 36,
                plain_len: 20,
                compression: Compression::Stored,
            }],
            entries: vec![
                base(
                    0,
                    b"",
                    EntryKind::Dir {
                        opaque: false,
                        implicit: true,
                    },
                ),
                file,
                base(
                    0,
                    b"d",
                    EntryKind::Dir {
                        opaque: true,
                        implicit: false,
                    },
                ),
                base(2, b"l", EntryKind::HardLink { target: 1 }),
                base(
                    2,
                    b"s",
                    EntryKind::Symlink {
                        target: b"../f".to_vec(),
                    },
                ),
                base(2, b"w", EntryKind::Whiteout),
                base(0, b"c", EntryKind::CharDevice { major: 1, minor: 3 }),
                base(0, b"b", EntryKind::BlockDevice { major: 8, minor: 0 }),
                base(0, b"p", EntryKind::Fifo),
            ],
            prefetch: vec![0],
        }
    }

    #[test]
    fn index_round_trips() {
        let index = sample();
        let bytes = index.encode().unwrap();
        assert_eq!(Index::decode(&bytes, 1, 1 << 20).unwrap(), index);
        // Every strict prefix is rejected, and so is a trailing byte.
        for len in 0..bytes.len() {
            assert!(
                Index::decode(&bytes[..len], 1, 1 << 20).is_err(),
                "prefix {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Index::decode(&longer, 1, 1 << 20).is_err());
    }

    #[test]
    fn index_rejects_bad_references() {
        let mut index = sample();
        index.entries[3].kind = EntryKind::HardLink { target: 2 };
        assert!(
            Index::decode(&index.encode().unwrap(), 1, 1 << 20).is_err(),
            "hard link to dir"
        );
        let mut index = sample();
        index.entries[4].name = b"f".to_vec();
        index.entries[4].parent = 0;
        assert!(
            Index::decode(&index.encode().unwrap(), 1, 1 << 20).is_err(),
            "duplicate name"
        );
        let mut index = sample();
        index.entries[4].parent = 1;
        assert!(
            Index::decode(&index.encode().unwrap(), 1, 1 << 20).is_err(),
            "parent is a file"
        );
        let mut index = sample();
        index.entries[4].name = b"..".to_vec();
        assert!(
            Index::decode(&index.encode().unwrap(), 1, 1 << 20).is_err(),
            "dot-dot name"
        );
    }

    #[test]
    fn encoder_refuses_what_its_fields_cannot_hold_instead_of_truncating() {
        // A 65,539-byte name written `as u16` would leave 65,536 bytes behind to be parsed as
        // further fields (a directory coming back as a setuid block device).
        let mut index = sample();
        index.entries[1].name = vec![b'a'; 65_539];
        let error = index.encode().unwrap_err().to_string();
        assert!(error.contains("entry 1: name is too long"), "{error}");
        let mut index = sample();
        index.entries[1].name = vec![b'a'; MAX_NAME_LEN + 1];
        assert!(index.encode().is_err(), "one byte over NAME_MAX");
        index.entries[1].name = vec![b'a'; MAX_NAME_LEN];
        let bytes = index.encode().unwrap();
        assert_eq!(Index::decode(&bytes, 1, 1 << 20).unwrap(), index);

        let mut index = sample();
        index.entries[1].xattrs = vec![(vec![b'x'; MAX_NAME_LEN + 1], vec![])];
        let error = index.encode().unwrap_err().to_string();
        assert!(error.contains("xattr name is too long"), "{error}");
        let mut index = sample();
        index.entries[1].xattrs = (0..=MAX_XATTRS_PER_ENTRY)
            .map(|n| (format!("user.{n}").into_bytes(), vec![]))
            .collect();
        let error = index.encode().unwrap_err().to_string();
        assert!(error.contains("extended attributes"), "{error}");
    }

    #[test]
    fn decoder_bounds_names_and_xattr_counts_of_hostile_indexes() {
        // Hand-made bytes, as a hostile sealer would write them: the encoder refuses them.
        let mut index = sample();
        index.entries[2].xattrs = vec![(b"user.a".to_vec(), b"1".to_vec())];
        let good = index.encode().unwrap();
        let at = |bytes: &[u8], needle: &[u8]| {
            bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
        };
        // Two xattrs with one name: the count goes to 2 and the record is repeated.
        let record_at = at(&good, b"user.a") - 2;
        let record = good[record_at..record_at + 2 + 6 + 4 + 1].to_vec();
        let mut duplicate = good.clone();
        duplicate[record_at - 2..record_at].copy_from_slice(&2u16.to_le_bytes());
        duplicate.splice(record_at..record_at, record);
        let error = Index::decode(&duplicate, 1, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(error.contains("duplicate xattr name"), "{error}");
        // A count over the cap is refused before any record is read.
        let mut many = good.clone();
        many[record_at - 2..record_at].copy_from_slice(&u16::MAX.to_le_bytes());
        let error = Index::decode(&many, 1, 1 << 20).unwrap_err().to_string();
        assert!(error.contains("too many extended attributes"), "{error}");
        // A name over NAME_MAX is refused.
        let mut index = sample();
        index.entries[1].name = vec![b'n'; MAX_NAME_LEN];
        let mut long = index.encode().unwrap();
        let name_at = at(&long, &[b'n'; MAX_NAME_LEN]);
        long[name_at - 2..name_at].copy_from_slice(&((MAX_NAME_LEN + 1) as u16).to_le_bytes());
        long.insert(name_at, b'n');
        let error = Index::decode(&long, 1, 1 << 20).unwrap_err().to_string();
        assert!(error.contains("invalid name"), "{error}");
    }

    #[test]
    fn footer_round_trips_and_checks_lengths() {
        let footer = Footer {
            chunk_size_log2: 20,
            chunk_count: 3,
            data_bytes: 100,
            index_offset: 1000,
            index_sealed_len: 50,
            index_plain_len: 200,
            layer_id: [1; 16],
            key_commitment: [2; 32],
        };
        let bytes = footer.encode();
        assert_eq!(Footer::decode(&bytes, 1146).unwrap(), footer);
        assert!(Footer::decode(&bytes, 1147).is_err());
        for at in [0, 8, 10, 11, 95] {
            let mut broken = bytes;
            broken[at] ^= 0x40;
            assert!(Footer::decode(&broken, 1146).is_err(), "byte {at}");
        }
    }
}
