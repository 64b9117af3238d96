//! The filesystem core of one sealed layer, as a plain Rust API (no kernel needed to test it).
//!
//! Inode numbers are entry numbers plus one (FUSE's root is 1), stable for the mount; a hard
//! link answers with its target's inode, so links share an inode and a link count. The tree
//! is presented the way overlayfs expects a lower layer: an OCI whiteout is a character device
//! 0/0, an opaque directory carries `trusted.overlay.opaque=y` (and `user.overlay.opaque=y`
//! for userxattr mounts). Everything is read-only and immutable, which is what lets the FUSE
//! adapter keep kernel caches forever.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fsformat::layout::{Entry, EntryKind};
use fsformat::reader::SealedLayer;

use crate::fetcher::{FetchError, LayerFetcher};

pub mod table;

/// An inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ino(pub u64);

/// The root directory's inode.
pub const ROOT: Ino = Ino(1);

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device (also an overlayfs whiteout, 0/0).
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
}

/// A node's attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode.
    pub ino: Ino,
    /// Kind.
    pub kind: NodeType,
    /// Size in bytes (files: content; symlinks: target length).
    pub size: u64,
    /// Permission bits with setuid/setgid/sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (`makedev(major, minor)`).
    pub rdev: u32,
    /// Modification (and change, and access) time.
    pub mtime: SystemTime,
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode.
    pub ino: Ino,
    /// Kind.
    pub kind: NodeType,
    /// Name.
    pub name: Vec<u8>,
}

/// Why an operation failed; the FUSE adapter maps these to errno values.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such entry")]
    NotFound,
    /// The inode is not a directory.
    #[error("not a directory")]
    NotDir,
    /// The inode is a directory.
    #[error("is a directory")]
    IsDir,
    /// The inode is not a symlink.
    #[error("not a symlink")]
    NotSymlink,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoAttr,
    /// A chunk could not be served.
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// Extended attributes as name/value pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

const OPAQUE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];

/// The files of a layer in the order of their first read, while recording a startup profile
/// (`sealctl optimize`). Entry numbers only, in memory: the paths are resolved on request.
#[derive(Default)]
struct ReadRecorder {
    order: Mutex<(Vec<u32>, HashSet<u32>)>,
}

/// One mounted sealed layer.
pub struct LayerFs {
    fetcher: LayerFetcher,
    recorder: Option<ReadRecorder>,
    /// Link count per entry number (targets count their hard links).
    nlinks: Vec<u32>,
    /// Metadata that replaces an implicit directory's defaults (taken from lower layers).
    inherited: HashMap<u32, Entry>,
}

impl LayerFs {
    /// Serves `fetcher`'s layer.
    pub fn new(fetcher: LayerFetcher) -> Self {
        let entries = &fetcher.layer().index().entries;
        let mut nlinks = vec![1u32; entries.len()];
        for (number, entry) in entries.iter().enumerate() {
            match entry.kind {
                EntryKind::HardLink { target } => nlinks[target as usize] += 1,
                EntryKind::Dir { .. } => {
                    nlinks[number] += 1;
                    if number != 0 {
                        nlinks[entry.parent as usize] += 1;
                    }
                }
                _ => {}
            }
        }
        LayerFs {
            fetcher,
            recorder: None,
            nlinks,
            inherited: HashMap::new(),
        }
    }

    /// Gives directories the tar left implicit the metadata of the same directory in the
    /// layers below (`lowers`, topmost first), as extracting the layers in order would.
    pub fn inherit_implicit_dirs(&mut self, lowers: &[&SealedLayer]) {
        let layer = self.fetcher.layer().clone();
        for (number, entry) in layer.index().entries.iter().enumerate() {
            if !matches!(entry.kind, EntryKind::Dir { implicit: true, .. }) {
                continue;
            }
            let path = layer.path_of(number as u32);
            for lower in lowers {
                let found = lower.lookup(&path).and_then(|n| lower.entry(n));
                if let Some(found) = found.filter(|e| {
                    matches!(
                        e.kind,
                        EntryKind::Dir {
                            implicit: false,
                            ..
                        }
                    )
                }) {
                    let mut adopted = found.clone();
                    adopted.kind = entry.kind.clone();
                    self.inherited.insert(number as u32, adopted);
                    break;
                }
            }
        }
    }

    /// Records the order in which files are first read, from now on.
    pub fn record_reads(&mut self) {
        self.recorder = Some(ReadRecorder::default());
    }

    /// Paths (relative to the layer root) of the files read since [`Self::record_reads`], in
    /// the order of their first read.
    pub fn recorded_reads(&self) -> Vec<Vec<u8>> {
        let Some(recorder) = &self.recorder else {
            return Vec::new();
        };
        let order = recorder.order.lock().expect("recorder lock");
        order.0.iter().map(|&n| self.layer().path_of(n)).collect()
    }

    /// The layer's fetcher (progress, statistics).
    pub fn fetcher(&self) -> &LayerFetcher {
        &self.fetcher
    }

    fn layer(&self) -> &SealedLayer {
        self.fetcher.layer()
    }

    /// Entry number behind an inode.
    fn number(&self, ino: Ino) -> Result<u32, FsError> {
        let number = ino.0.checked_sub(1).ok_or(FsError::NotFound)?;
        if number >= self.layer().index().entries.len() as u64 {
            return Err(FsError::NotFound);
        }
        Ok(number as u32)
    }

    /// The entry whose metadata an entry number shows (hard links show their target).
    fn shown(&self, number: u32) -> (u32, &Entry) {
        let layer = self.layer();
        let entry = layer.entry(number).expect("entry numbers are checked");
        match entry.kind {
            EntryKind::HardLink { target } => {
                (target, layer.entry(target).expect("validated target"))
            }
            _ => (number, self.inherited.get(&number).unwrap_or(entry)),
        }
    }

    fn attr_of(&self, number: u32) -> Attr {
        let (number, entry) = self.shown(number);
        let (kind, size, rdev) = match &entry.kind {
            EntryKind::File { size, .. } => (NodeType::File, *size, 0),
            EntryKind::Dir { .. } => (NodeType::Dir, 0, 0),
            EntryKind::Symlink { target } => (NodeType::Symlink, target.len() as u64, 0),
            EntryKind::CharDevice { major, minor } => {
                (NodeType::CharDevice, 0, makedev(*major, *minor))
            }
            EntryKind::BlockDevice { major, minor } => {
                (NodeType::BlockDevice, 0, makedev(*major, *minor))
            }
            EntryKind::Fifo => (NodeType::Fifo, 0, 0),
            EntryKind::Whiteout => (NodeType::CharDevice, 0, 0),
            EntryKind::HardLink { .. } => unreachable!("shown() resolves hard links"),
        };
        let mtime = if entry.mtime.secs >= 0 {
            UNIX_EPOCH + Duration::new(entry.mtime.secs as u64, entry.mtime.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(entry.mtime.secs.unsigned_abs())
                + Duration::from_nanos(u64::from(entry.mtime.nanos))
        };
        Attr {
            ino: Ino(u64::from(number) + 1),
            kind,
            size,
            perm: (entry.mode & 0o7777) as u16,
            nlink: self.nlinks[number as usize],
            uid: entry.uid,
            gid: entry.gid,
            rdev,
            mtime,
        }
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        Ok(self.attr_of(self.number(ino)?))
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, FsError> {
        let dir = self.directory(parent)?;
        let child = self
            .layer()
            .lookup_child(dir, name)
            .ok_or(FsError::NotFound)?;
        Ok(self.attr_of(child))
    }

    fn directory(&self, ino: Ino) -> Result<u32, FsError> {
        let number = self.number(ino)?;
        match self.layer().entry(number).map(|e| &e.kind) {
            Some(EntryKind::Dir { .. }) => Ok(number),
            _ => Err(FsError::NotDir),
        }
    }

    /// Up to `max` entries of a directory starting at position `offset`: `.` and `..` first,
    /// then the children by name. Positions are stable for the mount, so a listing resumes
    /// where the kernel's buffer filled up, without rebuilding what came before.
    pub fn readdir(&self, ino: Ino, offset: usize, max: usize) -> Result<Vec<DirEntry>, FsError> {
        let number = self.directory(ino)?;
        let layer = self.layer();
        let parent = layer.entry(number).expect("checked").parent;
        let dots = [
            DirEntry {
                ino,
                kind: NodeType::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: Ino(u64::from(parent) + 1),
                kind: NodeType::Dir,
                name: b"..".to_vec(),
            },
        ];
        // Position p is dots[p] for p < 2, else child p - 2: a resumed listing starts at its
        // child directly, so listing a directory of n entries costs O(n) in all, not O(n^2).
        let children = layer.children(number);
        let first_child = offset.saturating_sub(dots.len()).min(children.len());
        let dots = dots.into_iter().skip(offset).take(max);
        let room = max.saturating_sub(dots.len());
        let children = children[first_child..].iter().take(room).map(|&child| {
            let attr = self.attr_of(child);
            let name = layer.entry(child).expect("child exists").name.clone();
            DirEntry {
                ino: attr.ino,
                kind: attr.kind,
                name,
            }
        });
        Ok(dots.chain(children).collect())
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        match &self.shown(self.number(ino)?).1.kind {
            EntryKind::Symlink { target } => Ok(target.clone()),
            _ => Err(FsError::NotSymlink),
        }
    }

    /// Up to `size` bytes of a file at `offset`, fetching only the chunks the range touches.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let (number, entry) = self.shown(self.number(ino)?);
        if let Some(recorder) = &self.recorder {
            let mut order = recorder.order.lock().expect("recorder lock");
            if order.1.insert(number) {
                order.0.push(number);
            }
        }
        let EntryKind::File {
            size: file_size,
            extents,
        } = &entry.kind
        else {
            return Err(if matches!(entry.kind, EntryKind::Dir { .. }) {
                FsError::IsDir
            } else {
                FsError::NotFound
            });
        };
        if offset >= *file_size {
            return Ok(Vec::new());
        }
        let want = (u64::from(size)).min(file_size - offset) as usize;
        let mut out = Vec::with_capacity(want);
        let mut extent_start = 0u64;
        for extent in extents {
            let extent_end = extent_start + u64::from(extent.len);
            let pos = offset + out.len() as u64;
            if pos < extent_end {
                let within = (pos - extent_start) as usize;
                let take = (extent.len as usize - within).min(want - out.len());
                let plain = self.fetcher.chunk(extent.chunk)?;
                let from = extent.offset as usize + within;
                out.extend_from_slice(&plain[from..from + take]);
                if out.len() == want {
                    break;
                }
            }
            extent_start = extent_end;
        }
        Ok(out)
    }

    fn xattrs(&self, ino: Ino) -> Result<Xattrs, FsError> {
        let (_, entry) = self.shown(self.number(ino)?);
        let mut xattrs = entry.xattrs.clone();
        if matches!(entry.kind, EntryKind::Dir { opaque: true, .. }) {
            for name in OPAQUE_XATTRS {
                xattrs.retain(|(n, _)| n != name);
                xattrs.push((name.to_vec(), b"y".to_vec()));
            }
        }
        Ok(xattrs)
    }

    /// One extended attribute.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.xattrs(ino)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoAttr)
    }

    /// Extended attribute names, each NUL-terminated (the listxattr(2) format).
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        for (name, _) in self.xattrs(ino)? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    /// Total plaintext bytes and inode count, for statfs.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.layer().index();
        (self.layer().footer().data_bytes, index.entries.len() as u64)
    }
}

/// Linux's `makedev` for the 32-bit `rdev` FUSE carries.
fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}
