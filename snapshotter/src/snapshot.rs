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
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Snapshot name -> JSON record.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "next_id" -> next directory id.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// Read-only view of a committed snapshot.
    View,
    /// Writable, not yet committed.
    Active,
    /// Immutable, may be a parent.
    Committed,
}

/// A snapshot's public facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Parent's name.
    pub parent: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, Unix nanoseconds.
    pub created_ns: u128,
    /// Last update, Unix nanoseconds.
    pub updated_ns: u128,
}

/// A mount, as containerd describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    /// Source path (or `overlay`).
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Disk usage of a snapshot's own content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
}

/// Why a snapshot operation failed. The variants are containerd's error classes, which the
/// gRPC layer maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such snapshot.
    #[error("snapshot {0}: not found")]
    NotFound(String),
    /// The key or name is taken.
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    /// The operation does not apply in the snapshot's state.
    #[error("snapshot {name}: {reason}")]
    FailedPrecondition {
        /// The snapshot.
        name: String,
        /// Why.
        reason: String,
    },
    /// The database or the file system failed.
    #[error("snapshot store: {0}")]
    Internal(String),
}

fn internal(error: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(error.to_string())
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: Option<String>,
    labels: BTreeMap<String, String>,
    created_ns: u128,
    updated_ns: u128,
}

/// Reads `key`'s record from an open table.
fn read_record(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Record, SnapshotError> {
    let bytes = table
        .get(key)
        .map_err(internal)?
        .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
    serde_json::from_slice(bytes.value()).map_err(internal)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The snapshot store under one root directory.
pub struct SnapshotStore {
    root: PathBuf,
    db: Database,
}

impl SnapshotStore {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(root.join("snapshots")).map_err(internal)?;
        let db = Database::create(root.join("metadata.redb")).map_err(internal)?;
        let txn = db.begin_write().map_err(internal)?;
        txn.open_table(SNAPSHOTS).map_err(internal)?;
        txn.open_table(META).map_err(internal)?;
        txn.commit().map_err(internal)?;
        Ok(SnapshotStore {
            root: root.to_path_buf(),
            db,
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

    /// The content directories of `parent` and its ancestors, nearest first.
    fn lower_dirs(&self, parent: Option<&str>) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut dirs = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(name) = next {
            let record = self.get(&name)?;
            dirs.push(self.dir(record.id).join("fs"));
            next = record.parent;
        }
        Ok(dirs)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if let Some(parent) = parent {
            let record = self.get(parent)?;
            if record.kind != Kind::Committed {
                return Err(SnapshotError::FailedPrecondition {
                    name: parent.to_string(),
                    reason: "a parent must be a committed snapshot".into(),
                });
            }
        }
        let txn = self.db.begin_write().map_err(internal)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(internal)?;
            let id = meta
                .get("next_id")
                .map_err(internal)?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert("next_id", id + 1).map_err(internal)?;
            id
        };
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            if table.get(key).map_err(internal)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            // The directory exists before the record that names it (see the module docs).
            let dir = self.dir(id);
            std::fs::create_dir_all(dir.join("fs")).map_err(internal)?;
            std::fs::create_dir_all(dir.join("work")).map_err(internal)?;
            let now = now_ns();
            let record = Record {
                id,
                kind,
                parent: parent.map(str::to_string),
                labels,
                created_ns: now,
                updated_ns: now,
            };
            table
                .insert(
                    key,
                    serde_json::to_vec(&record).map_err(internal)?.as_slice(),
                )
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)?;
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

    /// Commits active snapshot `key` as `name`; the key is gone afterwards.
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
            record.kind = Kind::Committed;
            record.labels.extend(labels);
            record.updated_ns = now_ns();
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
        let txn = self.db.begin_write().map_err(internal)?;
        let id = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let record = read_record(&table, key)?;
            for entry in table.iter().map_err(internal)? {
                let (name, bytes) = entry.map_err(internal)?;
                let other: Record = serde_json::from_slice(bytes.value()).map_err(internal)?;
                if other.parent.as_deref() == Some(key) {
                    return Err(SnapshotError::FailedPrecondition {
                        name: key.into(),
                        reason: format!("snapshot {} depends on it", name.value()),
                    });
                }
            }
            table.remove(key).map_err(internal)?;
            record.id
        };
        txn.commit().map_err(internal)?;
        // After the record: a crash in between leaves an orphan for cleanup, never a record
        // without its directory.
        std::fs::remove_dir_all(self.dir(id)).map_err(internal)
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
        let txn = self.db.begin_read().map_err(internal)?;
        let table = txn.open_table(SNAPSHOTS).map_err(internal)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (name, bytes) = entry.map_err(internal)?;
            let record: Record = serde_json::from_slice(bytes.value()).map_err(internal)?;
            out.push(Self::info(name.value(), &record));
        }
        Ok(out)
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
        let known: std::collections::HashSet<u64> = {
            let txn = self.db.begin_read().map_err(internal)?;
            let table = txn.open_table(SNAPSHOTS).map_err(internal)?;
            let mut ids = std::collections::HashSet::new();
            for entry in table.iter().map_err(internal)? {
                let (_, bytes) = entry.map_err(internal)?;
                ids.insert(
                    serde_json::from_slice::<Record>(bytes.value())
                        .map_err(internal)?
                        .id,
                );
            }
            ids
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(self.root.join("snapshots")).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                if !known.contains(&id) {
                    std::fs::remove_dir_all(entry.path()).map_err(internal)?;
                    removed.push(id);
                }
            }
        }
        Ok(removed)
    }
}
