//! The FUSE adapter: the only module that speaks `fuser`. It turns kernel requests into calls
//! on a [`LayerTable`] (one layer, or every layer of the node as directories of one session)
//! and its errors into errno values, nothing more; [`session`] mounts it and ends it.
//!
//! A fixed number of session threads serve requests for every layer of the session, so a read
//! waiting for a slow chunk does not hold up other requests and threads do not grow with
//! layers. Layers are immutable: attributes and entries are cached by the kernel for a
//! long time, open and opendir are declined (the kernel then skips them and keeps file and
//! directory caches across opens), directory listings carry attributes (READDIRPLUS), and
//! reads and readahead go up to 1 MiB. FUSE passthrough is not used:
//! it would need the decrypted file on the node's disk.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::fetcher::FetchError;
use crate::fs::table::LayerTable;
use crate::fs::{Attr, FsError, Ino, NodeType};

pub mod session;

/// The kernel may cache attributes and entries this long: a layer never changes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Entries prepared per readdir request: more than a kernel buffer of entries ever holds.
const READDIR_BATCH: usize = 512;
/// Largest read and readahead: one default chunk.
pub(crate) const MAX_READ: u32 = 1 << 20;

/// Maps an error to the errno the caller sees. Chunk failures of any kind are EIO: the read
/// fails, it never returns wrong bytes.
fn errno(error: &FsError) -> Errno {
    match error {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotSymlink => Errno::EINVAL,
        FsError::NoAttr => Errno::NO_XATTR,
        FsError::Fetch(
            FetchError::Cancelled { .. }
            | FetchError::Source { .. }
            | FetchError::Timeout { .. }
            | FetchError::Verification { .. },
        ) => Errno::EIO,
    }
}

fn file_type(kind: NodeType) -> FileType {
    match kind {
        NodeType::File => FileType::RegularFile,
        NodeType::Dir => FileType::Directory,
        NodeType::Symlink => FileType::Symlink,
        NodeType::CharDevice => FileType::CharDevice,
        NodeType::BlockDevice => FileType::BlockDevice,
        NodeType::Fifo => FileType::NamedPipe,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: MAX_READ,
        flags: 0,
    }
}

/// A [`LayerTable`] as a `fuser` filesystem.
pub struct FuseAdapter {
    fs: Arc<LayerTable>,
}

impl FuseAdapter {
    /// Adapts `fs`.
    pub fn new(fs: Arc<LayerTable>) -> Self {
        FuseAdapter { fs }
    }

    /// How long the kernel may cache `attr`: a layer never changes, the listing root does.
    fn ttl(&self, attr: &Attr) -> Duration {
        if self.fs.is_listing_root(attr.ino) {
            Duration::ZERO
        } else {
            TTL
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        // One at a time: the kernel may lack some, and a refused set would enable none.
        for wanted in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if let Err(missing) = config.add_capabilities(wanted) {
                tracing::debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(Ino(parent.0), name.as_bytes()) {
            Ok(attr) => reply.entry(&self.ttl(&attr), &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(Ino(ino.0)) {
            Ok(attr) => reply.attr(&self.ttl(&attr), &file_attr(&attr)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(Ino(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS tells the kernel (FUSE_NO_OPEN_SUPPORT) to stop sending open and release for
        // this mount and to keep the page cache of files across opens: two round trips fewer
        // per file. Writes never get here: the mount is read-only (EROFS from the VFS).
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(Ino(ino.0), offset, size) {
            Ok(data) => reply.data(&data),
            // The fetcher logged the cause once, per range read; the reader sees EIO.
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // As for open: no opendir/releasedir round trips, directory contents cached.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(Ino(ino.0), offset as usize, READDIR_BATCH) {
            Ok(entries) => {
                for (at, entry) in (offset..).zip(&entries) {
                    let name = OsStr::from_bytes(&entry.name);
                    if reply.add(INodeNo(entry.ino.0), at + 1, file_type(entry.kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // Entries come with their attributes, so listing a directory needs no LOOKUP per entry.
        match self.fs.readdir(Ino(ino.0), offset as usize, READDIR_BATCH) {
            Ok(entries) => {
                for (at, entry) in (offset..).zip(&entries) {
                    let Ok(attr) = self.fs.getattr(entry.ino) else {
                        continue;
                    };
                    let name = OsStr::from_bytes(&entry.name);
                    if reply.add(
                        INodeNo(entry.ino.0),
                        at + 1,
                        name,
                        &self.ttl(&attr),
                        &file_attr(&attr),
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close(2) flushes; a read-only layer has nothing to write back.
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // What a file on a filesystem without ioctls answers (`isatty`, FS_IOC_GETFLAGS).
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let (bytes, inodes) = self.fs.usage(Ino(ino.0));
        reply.statfs(bytes.div_ceil(4096), 0, 0, inodes, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(Ino(ino.0), name.as_bytes()) {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() <= size as usize => reply.data(&value),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(Ino(ino.0)) {
            Ok(list) if size == 0 => reply.size(list.len() as u32),
            Ok(list) if list.len() <= size as usize => reply.data(&list),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(&e)),
        }
    }
}
