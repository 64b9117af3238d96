//! Many layers in one tree, so one FUSE session (one `/dev/fuse` connection, one set of
//! request threads) serves every layer of the node: the root is a directory with one entry
//! per mounted layer, named by its slot number, and a layer's inode `i` is `slot << 32 | i`.
//! Slots are never reused while the connection lives, so an inode the kernel still holds
//! after a layer left can never reach another layer; it answers ENOENT. The node places each
//! layer at its snapshot's id ([`LayerTable::insert_at`]), so a daemon that resumes the
//! connection after a restart puts every layer back where the kernel's inodes point; inode
//! numbers inside a layer come from its index and are the same in every daemon.
//!
//! A table made with [`LayerTable::single`] holds one layer at slot 0 and *is* that layer
//! (its root is the session's root, inodes unchanged): a layer mounted on its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::UNIX_EPOCH;

use super::{Attr, DirEntry, FsError, Ino, LayerFs, NodeType, ROOT};

/// A layer's place in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

impl Slot {
    /// The name of the layer's directory under the table's root.
    pub fn dir_name(self) -> String {
        self.0.to_string()
    }

    fn of(ino: Ino) -> Slot {
        Slot((ino.0 >> 32) as u32)
    }

    /// The table inode of the layer's inode `local`.
    fn global(self, local: Ino) -> Ino {
        Ino(u64::from(self.0) << 32 | (local.0 & u64::from(u32::MAX)))
    }

    fn local(ino: Ino) -> Ino {
        Ino(ino.0 & u64::from(u32::MAX))
    }
}

/// A slot that is the root's or another layer's.
#[derive(Debug, thiserror::Error)]
#[error("layer slot {} is taken", .0 .0)]
pub struct SlotTaken(pub Slot);

/// The layers of one FUSE session.
pub struct LayerTable {
    layers: RwLock<BTreeMap<Slot, Arc<LayerFs>>>,
    next_slot: AtomicU32,
    /// One layer at slot 0, which is the root.
    single: bool,
}

impl Default for LayerTable {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerTable {
    /// An empty table whose root lists its layers.
    pub fn new() -> Self {
        LayerTable {
            layers: RwLock::new(BTreeMap::new()),
            // Slot 0 is the root's: a layer there would shadow it.
            next_slot: AtomicU32::new(1),
            single: false,
        }
    }

    /// A table that is `fs` (see the module docs).
    pub fn single(fs: Arc<LayerFs>) -> Self {
        LayerTable {
            layers: RwLock::new(BTreeMap::from([(Slot(0), fs)])),
            next_slot: AtomicU32::new(u32::MAX),
            single: true,
        }
    }

    /// Adds a layer; its directory is [`Slot::dir_name`] under the root.
    pub fn insert(&self, fs: Arc<LayerFs>) -> Slot {
        assert!(!self.single, "a single-layer table takes no other layer");
        let slot = Slot(self.next_slot.fetch_add(1, Ordering::Relaxed));
        assert!(slot.0 != u32::MAX, "layer slots exhausted");
        self.layers.write().expect("table lock").insert(slot, fs);
        slot
    }

    /// Adds a layer at a slot the caller chose: a number that stays the layer's for as long
    /// as the kernel may hold its inodes, across daemon restarts (the node uses its
    /// snapshot's id, which the store never reuses). Refuses slot 0 (the root) and a taken
    /// one.
    pub fn insert_at(&self, slot: Slot, fs: Arc<LayerFs>) -> Result<(), SlotTaken> {
        assert!(!self.single, "a single-layer table takes no other layer");
        let mut layers = self.layers.write().expect("table lock");
        if slot.0 == 0 || slot.0 == u32::MAX || layers.contains_key(&slot) {
            return Err(SlotTaken(slot));
        }
        layers.insert(slot, fs);
        // Slots chosen by number and slots handed out by `insert` never meet.
        self.next_slot
            .fetch_max(slot.0.saturating_add(1), Ordering::Relaxed);
        Ok(())
    }

    /// Removes a layer; its inodes answer ENOENT from now on.
    pub fn remove(&self, slot: Slot) -> Option<Arc<LayerFs>> {
        self.layers.write().expect("table lock").remove(&slot)
    }

    /// Layers in the table.
    pub fn len(&self) -> usize {
        self.layers.read().expect("table lock").len()
    }

    /// Whether the table has no layer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `ino` is the listing root (changes as layers come and go: never cached).
    pub fn is_listing_root(&self, ino: Ino) -> bool {
        !self.single && ino == ROOT
    }

    fn layer(&self, ino: Ino) -> Result<(Slot, Arc<LayerFs>), FsError> {
        let slot = Slot::of(ino);
        let layers = self.layers.read().expect("table lock");
        let fs = layers.get(&slot).ok_or(FsError::NotFound)?;
        Ok((slot, fs.clone()))
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT,
            kind: NodeType::Dir,
            size: 0,
            // Plaintext lies below: only root may enter (the kernel checks, as the session
            // mounts with default_permissions).
            perm: 0o700,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            mtime: UNIX_EPOCH,
        }
    }

    fn globalised(slot: Slot, mut attr: Attr) -> Attr {
        attr.ino = slot.global(attr.ino);
        attr
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        if self.is_listing_root(ino) {
            return Ok(self.root_attr());
        }
        let (slot, fs) = self.layer(ino)?;
        Ok(Self::globalised(slot, fs.getattr(Slot::local(ino))?))
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, FsError> {
        if self.is_listing_root(parent) {
            let slot = std::str::from_utf8(name)
                .ok()
                .filter(|text| !text.starts_with('0') && !text.starts_with('+'))
                .and_then(|text| text.parse::<u32>().ok())
                .ok_or(FsError::NotFound)?;
            return self.getattr(Slot(slot).global(ROOT));
        }
        let (slot, fs) = self.layer(parent)?;
        Ok(Self::globalised(
            slot,
            fs.lookup(Slot::local(parent), name)?,
        ))
    }

    /// Up to `max` entries of directory `ino` from position `offset`.
    pub fn readdir(&self, ino: Ino, offset: usize, max: usize) -> Result<Vec<DirEntry>, FsError> {
        if self.is_listing_root(ino) {
            let dots = [b".".to_vec(), b"..".to_vec()].map(|name| DirEntry {
                ino: ROOT,
                kind: NodeType::Dir,
                name,
            });
            let layers = self.layers.read().expect("table lock");
            let children = layers.keys().map(|slot| DirEntry {
                ino: slot.global(ROOT),
                kind: NodeType::Dir,
                name: slot.dir_name().into_bytes(),
            });
            return Ok(dots
                .into_iter()
                .chain(children)
                .skip(offset)
                .take(max)
                .collect());
        }
        let (slot, fs) = self.layer(ino)?;
        let mut entries = fs.readdir(Slot::local(ino), offset, max)?;
        for entry in &mut entries {
            entry.ino = slot.global(entry.ino);
        }
        Ok(entries)
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let (_, fs) = self.layer(ino)?;
        fs.readlink(Slot::local(ino))
    }

    /// Up to `size` bytes of file `ino` from `offset`.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if self.is_listing_root(ino) {
            return Err(FsError::IsDir);
        }
        let (_, fs) = self.layer(ino)?;
        fs.read(Slot::local(ino), offset, size)
    }

    /// One extended attribute.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>, FsError> {
        if self.is_listing_root(ino) {
            return Err(FsError::NoAttr);
        }
        let (_, fs) = self.layer(ino)?;
        fs.getxattr(Slot::local(ino), name)
    }

    /// The names of the extended attributes, NUL-separated.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        if self.is_listing_root(ino) {
            return Ok(Vec::new());
        }
        let (_, fs) = self.layer(ino)?;
        fs.listxattr(Slot::local(ino))
    }

    /// Bytes and inodes of the layer `ino` is in, or of all layers for the listing root.
    pub fn usage(&self, ino: Ino) -> (u64, u64) {
        if self.is_listing_root(ino) {
            let layers = self.layers.read().expect("table lock");
            return layers.values().map(|fs| fs.usage()).fold((0, 0), |a, b| {
                (a.0.saturating_add(b.0), a.1.saturating_add(b.1))
            });
        }
        self.layer(ino).map(|(_, fs)| fs.usage()).unwrap_or((0, 0))
    }
}
