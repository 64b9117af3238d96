//! How a snapshot is stored: one JSON record per snapshot name in the `snapshots` table.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::ReadableTable;

use super::types::{internal, Kind, RemoteSource, SnapshotError};

/// A snapshot's record (the key is its name).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Record {
    pub(super) id: u64,
    pub(super) kind: Kind,
    pub(super) parent: Option<String>,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) created_ns: u128,
    pub(super) updated_ns: u128,
    /// Set for a remote snapshot: committed, its `fs` directory a mount point the service
    /// fills from this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) remote: Option<RemoteSource>,
}

/// Reads `key`'s record from an open table.
pub(super) fn read_record(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Record, SnapshotError> {
    let bytes = table
        .get(key)
        .map_err(internal)?
        .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
    serde_json::from_slice(bytes.value()).map_err(internal)
}

pub(super) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
