//! The snapshot model's nouns, as containerd's `snapshots` package names them, and the store's
//! error.

use std::collections::BTreeMap;

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

/// Where a remote snapshot's content comes from: text the store keeps for its owner (the
/// service) without reading it.
pub type RemoteSource = String;

/// A snapshot in a parent chain: its directory id, and its remote source if it is remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ancestor {
    /// Name.
    pub name: String,
    /// Directory id (`ROOT/snapshots/ID`).
    pub id: u64,
    /// Remote source of a remote snapshot.
    pub remote: Option<RemoteSource>,
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

pub(super) fn internal(error: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(error.to_string())
}
