//! The snapshot store: containerd's snapshot model on overlayfs, with its state in an
//! embedded, crash-safe database (`redb`).
//!
//! Vocabulary, as in containerd's `snapshots.Snapshotter`: a snapshot has a *key* (its name
//! while active) and, once committed, a *name*; it has a *parent* (a committed snapshot) or
//! none. `prepare` makes an *active* snapshot (writable: an overlay upper dir on its parents),
//! `view` a read-only one, `commit` turns an active snapshot into a committed one under a new
//! name, `remove` deletes a snapshot that has no children. Every snapshot owns a directory
//! `ROOT/snapshots/ID/` with `fs` (its content or upper dir) and `work` (overlay's work dir);
//! numeric ids keep mount options short.
//!
//! Every change is one database transaction, committed durably before the call returns; a
//! directory is created before its record and removed after it, so a crash leaves at most an
//! orphaned directory, which `cleanup` removes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Snapshot name -> JSON record.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "next_id" -> next directory id.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

mod types;

mod record;

use record::{now_ns, read_record, Record};
use types::internal;
pub use types::{Ancestor, Info, Kind, Mount, RemoteSource, SnapshotError, Usage};

/// Creates directory `path` (its parent exists) with exactly `mode`, whatever the umask; an
/// existing one is left as it is.
fn create_dir_with_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(path) {
        Ok(()) => std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// The snapshot store under one root directory.
pub struct SnapshotStore {
    root: PathBuf,
    db: Database,
    /// Held shared by a Prepare or View from making its directory until its record commits,
    /// and exclusively by cleanup, which would otherwise take that directory for an orphan.
    /// (Remote snapshots span a mount between reserve and record; the service serializes
    /// those with cleanup itself.)
    unrecorded: std::sync::RwLock<()>,
}

impl SnapshotStore {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        // Only root may enter: below are the mount points of decrypted layers.
        crate::hardening::ensure_private_dir(root).map_err(internal)?;
        crate::hardening::ensure_private_dir(&root.join("snapshots")).map_err(internal)?;
        let db = Database::create(root.join("metadata.redb")).map_err(internal)?;
        let txn = db.begin_write().map_err(internal)?;
        txn.open_table(SNAPSHOTS).map_err(internal)?;
        txn.open_table(META).map_err(internal)?;
        txn.commit().map_err(internal)?;
        Ok(SnapshotStore {
            root: root.to_path_buf(),
            db,
            unrecorded: std::sync::RwLock::new(()),
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn get(&self, name: &str) -> Result<Record, SnapshotError> {
        let txn = self.db.begin_read().map_err(internal)?;
        let table = txn.open_table(SNAPSHOTS).map_err(internal)?;
        read_record(&table, name)
    }

    fn info(name: &str, record: &Record) -> Info {
        Info {
            name: name.to_string(),
            parent: record.parent.clone(),
            kind: record.kind,
            labels: record.labels.clone(),
            created_ns: record.created_ns,
            updated_ns: record.updated_ns,
        }
    }

    /// The content directory of snapshot directory `id`: its files, its overlay upper dir,
    /// or the mount point of a remote snapshot.
    pub fn content_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// `parent` and its ancestors, nearest first.
    pub fn ancestors(&self, parent: Option<&str>) -> Result<Vec<Ancestor>, SnapshotError> {
        let mut chain = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(name) = next {
            let record = self.get(&name)?;
            next = record.parent;
            chain.push(Ancestor {
                name,
                id: record.id,
                remote: record.remote,
            });
        }
        Ok(chain)
    }

    /// The content directories of `parent` and its ancestors, nearest first.
    fn lower_dirs(&self, parent: Option<&str>) -> Result<Vec<PathBuf>, SnapshotError> {
        Ok(self
            .ancestors(parent)?
            .iter()
            .map(|a| self.content_dir(a.id))
            .collect())
    }

    /// Every record, by name.
    fn records(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let txn = self.db.begin_read().map_err(internal)?;
        let table = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (name, bytes) = entry.map_err(internal)?;
            let record: Record = serde_json::from_slice(bytes.value()).map_err(internal)?;
            out.push((name.value().to_string(), record));
        }
        Ok(out)
    }

    /// Every remote snapshot (to mount again after a restart).
    pub fn remote_snapshots(&self) -> Result<Vec<Ancestor>, SnapshotError> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|(_, record)| record.remote.is_some())
            .map(|(name, record)| Ancestor {
                name,
                id: record.id,
                remote: record.remote,
            })
            .collect())
    }

    /// Takes the next directory id and creates its `fs` and `work` directories.
    fn allocate_dir(&self, txn: &redb::WriteTransaction) -> Result<u64, SnapshotError> {
        let mut meta = txn.open_table(META).map_err(internal)?;
        let id = meta
            .get("next_id")
            .map_err(internal)?
            .map(|v| v.value())
            .unwrap_or(1);
        meta.insert("next_id", id + 1).map_err(internal)?;
        let dir = self.dir(id);
        crate::hardening::ensure_private_dir(&dir).map_err(internal)?;
        // `fs` becomes a container's root directory: 0755 as containerd's overlayfs makes it,
        // whatever the umask (set explicitly: a umask of 0 would make it world-writable).
        create_dir_with_mode(&dir.join("fs"), 0o755).map_err(internal)?;
        create_dir_with_mode(&dir.join("work"), 0o700).map_err(internal)?;
        Ok(id)
    }

    /// Allocates the directory of a remote snapshot, for the caller to mount its content at
    /// [`content_dir`](Self::content_dir) before [`commit_remote`](Self::commit_remote) records
    /// it. Until then [`cleanup`](Self::cleanup) treats it as an orphan.
    pub fn reserve_dir(&self) -> Result<u64, SnapshotError> {
        let txn = self.db.begin_write().map_err(internal)?;
        let id = self.allocate_dir(&txn)?;
        txn.commit().map_err(internal)?;
        Ok(id)
    }

    /// Records the committed remote snapshot `name` on `parent`, whose content the caller
    /// mounted in reserved directory `id`.
    pub fn commit_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        id: u64,
        remote: RemoteSource,
    ) -> Result<(), SnapshotError> {
        self.check_parent(parent)?;
        let now = now_ns();
        let record = Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_string),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: Some(remote),
        };
        let txn = self.db.begin_write().map_err(internal)?;
        Self::insert_new(&txn, name, &record)?;
        txn.commit().map_err(internal)
    }

    fn check_parent(&self, parent: Option<&str>) -> Result<(), SnapshotError> {
        if let Some(parent) = parent {
            let record = self.get(parent)?;
            if record.kind != Kind::Committed {
                return Err(SnapshotError::FailedPrecondition {
                    name: parent.to_string(),
                    reason: "a parent must be a committed snapshot".into(),
                });
            }
        }
        Ok(())
    }

    /// Inserts a record under a name that must be free.
    fn insert_new(
        txn: &redb::WriteTransaction,
        key: &str,
        record: &Record,
    ) -> Result<(), SnapshotError> {
        let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
        if table.get(key).map_err(internal)?.is_some() {
            return Err(SnapshotError::AlreadyExists(key.to_string()));
        }
        table
            .insert(
                key,
                serde_json::to_vec(record).map_err(internal)?.as_slice(),
            )
            .map_err(internal)?;
        Ok(())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.check_parent(parent)?;
        let unrecorded = self.unrecorded.read().expect("unrecorded lock");
        let txn = self.db.begin_write().map_err(internal)?;
        // The directory exists before the record that names it (see the module docs); if
        // the key is taken, the transaction is dropped and cleanup removes the directory.
        let id = self.allocate_dir(&txn)?;
        let now = now_ns();
        let record = Record {
            id,
            kind,
            parent: parent.map(str::to_string),
            labels,
            created_ns: now,
            updated_ns: now,
            remote: None,
        };
        Self::insert_new(&txn, key, &record)?;
        txn.commit().map_err(internal)?;
        drop(unrecorded);
        self.mounts(key)
    }

    /// Creates an active (writable) snapshot `key` on `parent`; returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of `parent`; returns its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let record = self.get(key)?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition {
                name: key.into(),
                reason: "a committed snapshot has no mounts".into(),
            });
        }
        let lowers = self.lower_dirs(record.parent.as_deref())?;
        let own = self.dir(record.id);
        let path = |p: &Path| p.display().to_string();
        let bind = |source: &Path, ro: bool| Mount {
            kind: "bind".into(),
            source: path(source),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        Ok(vec![match (record.kind, lowers.as_slice()) {
            (Kind::Active, []) => bind(&own.join("fs"), false),
            (Kind::View, []) => bind(&own.join("fs"), true),
            (Kind::View, [single]) => bind(single, true),
            (Kind::View, many) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!(
                    "lowerdir={}",
                    many.iter().map(|p| path(p)).collect::<Vec<_>>().join(":")
                )],
            },
            (Kind::Active, many) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", path(&own.join("work"))),
                    format!("upperdir={}", path(&own.join("fs"))),
                    format!(
                        "lowerdir={}",
                        many.iter().map(|p| path(p)).collect::<Vec<_>>().join(":")
                    ),
                ],
            },
            (Kind::Committed, _) => unreachable!("checked above"),
        }])
    }

    /// Commits active snapshot `key` as `name` with `labels` (replacing the active snapshot's);
    /// the key is gone afterwards.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let mut record = read_record(&table, key)?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition {
                    name: key.into(),
                    reason: "only an active snapshot can be committed".into(),
                });
            }
            if table.get(name).map_err(internal)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            // As containerd's own storage: a committed snapshot is created at its commit, and
            // takes the commit's labels, not the active snapshot's.
            record.kind = Kind::Committed;
            record.labels = labels;
            record.created_ns = now_ns();
            record.updated_ns = record.created_ns;
            table.remove(key).map_err(internal)?;
            table
                .insert(
                    name,
                    serde_json::to_vec(&record).map_err(internal)?.as_slice(),
                )
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)
    }

    /// Removes a snapshot that no other snapshot has as parent, and its directory.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        self.remove_releasing(key, |_| {})
    }

    /// Like [`remove`](Self::remove), calling `release` with the removed snapshot after its
    /// record is gone and before its directory is deleted (to unmount a remote snapshot).
    pub fn remove_releasing(
        &self,
        key: &str,
        release: impl FnOnce(&Ancestor),
    ) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write().map_err(internal)?;
        let removed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let record = read_record(&table, key)?;
            for entry in table.iter().map_err(internal)? {
                let (name, bytes) = entry.map_err(internal)?;
                let other: Record = serde_json::from_slice(bytes.value()).map_err(internal)?;
                if other.parent.as_deref() == Some(key) {
                    return Err(SnapshotError::FailedPrecondition {
                        name: key.into(),
                        reason: format!("cannot remove snapshot with child {}", name.value()),
                    });
                }
            }
            table.remove(key).map_err(internal)?;
            Ancestor {
                name: key.to_string(),
                id: record.id,
                remote: record.remote,
            }
        };
        txn.commit().map_err(internal)?;
        release(&removed);
        // After the record: a crash in between leaves an orphan for cleanup, never a record
        // without its directory.
        self.delete_dir(removed.id)
    }

    /// Deletes a snapshot directory; a mount left on its content directory (a remote
    /// snapshot's, after a crash) is detached first, so the deletion never walks into it.
    fn delete_dir(&self, id: u64) -> Result<(), SnapshotError> {
        let content = self.content_dir(id);
        if crate::mount_table::is_mounted(&content) {
            crate::mount_table::unmount(&content).map_err(internal)?;
        }
        // A remove and a cleanup can both reach a directory whose record just went: the
        // second finds nothing to do.
        match std::fs::remove_dir_all(self.dir(id)) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(internal),
        }
    }

    /// Facts of one snapshot.
    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(Self::info(key, &self.get(key)?))
    }

    /// Replaces a snapshot's labels (the only mutable field).
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Info, SnapshotError> {
        let txn = self.db.begin_write().map_err(internal)?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let mut record = read_record(&table, key)?;
            record.labels = labels;
            record.updated_ns = now_ns();
            table
                .insert(
                    key,
                    serde_json::to_vec(&record).map_err(internal)?.as_slice(),
                )
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        Ok(Self::info(key, &record))
    }

    /// Every snapshot.
    pub fn walk(&self) -> Result<Vec<Info>, SnapshotError> {
        Ok(self
            .records()?
            .iter()
            .map(|(name, record)| Self::info(name, record))
            .collect())
    }

    /// Disk usage of a snapshot's own directory (its upper dir or content).
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.get(key)?;
        let mut usage = Usage::default();
        let mut stack = vec![self.dir(record.id).join("fs")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).map_err(internal)? {
                let entry = entry.map_err(internal)?;
                let meta = entry.path().symlink_metadata().map_err(internal)?;
                usage.inodes += 1;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    usage.size += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                }
            }
        }
        Ok(usage)
    }

    /// Removes snapshot directories that no record names (left by a crash or a failed remove).
    pub fn cleanup(&self) -> Result<Vec<u64>, SnapshotError> {
        let _no_create_in_flight = self.unrecorded.write().expect("unrecorded lock");
        let known: std::collections::HashSet<u64> = self
            .records()?
            .iter()
            .map(|(_, record)| record.id)
            .collect();
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(self.root.join("snapshots")).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                if !known.contains(&id) {
                    self.delete_dir(id)?;
                    removed.push(id);
                }
            }
        }
        Ok(removed)
    }
}
