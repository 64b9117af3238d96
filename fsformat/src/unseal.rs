//! Unsealing: a sealed layer becomes an OCI layer tar again, with the same file tree.
//!
//! Entries are written in index order (parents first), whiteouts as `.wh.NAME` files, opaque
//! directories as a `.wh..wh..opq` file inside them, hard links as tar links, xattrs and
//! sub-second mtimes as PAX records. The tar is not byte-identical to the original; its file
//! tree is.

use std::io::{self, Read, Write};

use crate::error::{FormatError, Result};
use crate::layout::{Entry, EntryKind, Extent};
use crate::reader::{BlobSource, ChunkDecoder, SealedLayer};

/// Writes the layer as an uncompressed tar to `output`, reading chunks from `source`.
pub fn unseal_layer<S: BlobSource + ?Sized, W: Write>(
    layer: &SealedLayer,
    source: &S,
    output: W,
) -> Result<W> {
    let mut builder = tar::Builder::new(output);
    builder.follow_symlinks(false);
    let mut chunks = RecentChunks {
        layer,
        source,
        decoder: ChunkDecoder::new()?,
        recent: Vec::new(),
    };
    let tar_err = |path: &[u8], e: io::Error| {
        FormatError::io(
            format!("writing tar entry {}", String::from_utf8_lossy(path)),
            e,
        )
    };
    for (number, entry) in layer.index().entries.iter().enumerate() {
        let number = number as u32;
        // The root keeps its own metadata as `./`, as container image tars have it.
        let path = if number == 0 {
            b"./".to_vec()
        } else {
            layer.path_of(number)
        };
        if number == 0 && matches!(entry.kind, EntryKind::Dir { opaque: true, .. }) {
            return Err(FormatError::InvalidArgument(
                "the layer root cannot be opaque in a tar".into(),
            ));
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode);
        header.set_uid(u64::from(entry.uid));
        header.set_gid(u64::from(entry.gid));
        header.set_mtime(entry.mtime.secs.max(0) as u64);
        header.set_size(0);
        write_pax(&mut builder, entry).map_err(|e| tar_err(&path, e))?;
        match &entry.kind {
            EntryKind::File { size, extents } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
                let mut reader = ExtentReader {
                    chunks: &mut chunks,
                    extents,
                    at: 0,
                    pos: 0,
                    error: None,
                };
                let result = builder.append_data(&mut header, as_path(&path), &mut reader);
                if let Some(error) = reader.error.take() {
                    return Err(error);
                }
                result.map_err(|e| tar_err(&path, e))?;
            }
            EntryKind::Dir { opaque, implicit } => {
                // A directory the original tar left implicit stays implicit: listing it would
                // override the lower layer's directory with default metadata.
                if !*implicit {
                    header.set_entry_type(tar::EntryType::Directory);
                    builder
                        .append_data(&mut header, as_path(&path), io::empty())
                        .map_err(|e| tar_err(&path, e))?;
                }
                if *opaque {
                    let mut marker = path.clone();
                    marker.extend_from_slice(b"/.wh..wh..opq");
                    empty_file(&mut builder, &marker, entry).map_err(|e| tar_err(&marker, e))?;
                }
            }
            EntryKind::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                builder
                    .append_link(&mut header, as_path(&path), as_path(target))
                    .map_err(|e| tar_err(&path, e))?;
            }
            EntryKind::HardLink { target } => {
                header.set_entry_type(tar::EntryType::Link);
                let target = layer.path_of(*target);
                builder
                    .append_link(&mut header, as_path(&path), as_path(&target))
                    .map_err(|e| tar_err(&path, e))?;
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                let kind = if matches!(entry.kind, EntryKind::CharDevice { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                header.set_entry_type(kind);
                header
                    .set_device_major(*major)
                    .and_then(|()| header.set_device_minor(*minor))
                    .map_err(|e| tar_err(&path, e))?;
                builder
                    .append_data(&mut header, as_path(&path), io::empty())
                    .map_err(|e| tar_err(&path, e))?;
            }
            EntryKind::Fifo => {
                header.set_entry_type(tar::EntryType::Fifo);
                builder
                    .append_data(&mut header, as_path(&path), io::empty())
                    .map_err(|e| tar_err(&path, e))?;
            }
            EntryKind::Whiteout => {
                let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
                    Some(at) => (&path[..=at], &path[at + 1..]),
                    None => (&path[..0], &path[..]),
                };
                let marker = [dir, b".wh.", name].concat();
                empty_file(&mut builder, &marker, entry).map_err(|e| tar_err(&marker, e))?;
            }
        }
    }
    builder
        .into_inner()
        .map_err(|e| FormatError::io("finishing the tar", e))
}

fn as_path(bytes: &[u8]) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(bytes))
}

fn empty_file<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &[u8],
    like: &Entry,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(u64::from(like.uid));
    header.set_gid(u64::from(like.gid));
    header.set_mtime(like.mtime.secs.max(0) as u64);
    header.set_size(0);
    builder.append_data(&mut header, as_path(path), io::empty())
}

/// PAX records for what a GNU header cannot hold: xattrs and the exact mtime.
fn write_pax<W: Write>(builder: &mut tar::Builder<W>, entry: &Entry) -> io::Result<()> {
    if matches!(entry.kind, EntryKind::Whiteout) {
        return Ok(());
    }
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    if entry.mtime.nanos != 0 || entry.mtime.secs < 0 {
        let (secs, nanos) = (entry.mtime.secs, entry.mtime.nanos);
        let text = if secs < 0 && nanos > 0 {
            format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nanos)
        } else {
            format!("{secs}.{nanos:09}")
        };
        records.push(("mtime".into(), text.into_bytes()));
    }
    for (name, value) in &entry.xattrs {
        let name = std::str::from_utf8(name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "xattr name is not UTF-8; PAX cannot carry it",
            )
        })?;
        records.push((format!("SCHILY.xattr.{name}"), value.clone()));
    }
    if records.is_empty() {
        return Ok(());
    }
    builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// The last few decrypted chunks: pack chunks are shared by consecutive small files.
struct RecentChunks<'a, S: ?Sized> {
    layer: &'a SealedLayer,
    source: &'a S,
    decoder: ChunkDecoder,
    recent: Vec<(u32, Vec<u8>)>,
}

impl<S: BlobSource + ?Sized> RecentChunks<'_, S> {
    const KEEP: usize = 4;

    fn get(&mut self, chunk: u32) -> Result<&[u8]> {
        if let Some(at) = self.recent.iter().position(|(c, _)| *c == chunk) {
            let hit = self.recent.remove(at);
            self.recent.push(hit);
        } else {
            let plain = self
                .layer
                .read_chunk(self.source, chunk, &mut self.decoder)?;
            if self.recent.len() == Self::KEEP {
                self.recent.remove(0);
            }
            self.recent.push((chunk, plain));
        }
        Ok(&self.recent.last().expect("just pushed").1)
    }
}

/// Reads a file's bytes through its extents; a format error is kept aside so the caller can
/// report it instead of the tar crate's generic I/O error.
struct ExtentReader<'a, 'b, S: ?Sized> {
    chunks: &'a mut RecentChunks<'b, S>,
    extents: &'a [Extent],
    at: usize,
    pos: u32,
    error: Option<FormatError>,
}

impl<S: BlobSource + ?Sized> Read for ExtentReader<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(extent) = self.extents.get(self.at).copied() else {
            return Ok(0);
        };
        let plain = match self.chunks.get(extent.chunk) {
            Ok(plain) => plain,
            Err(e) => {
                let message = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(message));
            }
        };
        let from = (extent.offset + self.pos) as usize;
        let take = buf.len().min((extent.len - self.pos) as usize);
        buf[..take].copy_from_slice(&plain[from..from + take]);
        self.pos += take as u32;
        if self.pos == extent.len {
            self.at += 1;
            self.pos = 0;
        }
        Ok(take)
    }
}
