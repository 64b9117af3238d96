//! The gRPC edge: containerd's snapshots service over a [`Node`], tonic only here. Each call
//! runs on tokio's blocking pool (the store and the mounts block); the node's errors become
//! gRPC statuses here, and nowhere else.

// `tonic::Status` is the error type of the gRPC trait these methods serve; boxing it here would
// only be undone at the trait boundary.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use containerd_snapshots::api::types::Mount as ApiMount;
use containerd_snapshots::{Info as ApiInfo, Kind as ApiKind, Snapshotter, Usage as ApiUsage};
use tonic::Status;

use crate::node::{Node, NodeError};
use crate::remote::RemoteError;
use crate::snapshot::{Info, Kind, Mount, SnapshotError};

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Status {
        let message = error.to_string();
        match error {
            NodeError::Snapshot(error) => error.into(),
            NodeError::Remote(error) => remote_status(&error, message),
            NodeError::RemoteLayerReady { .. } => Status::already_exists(message),
            NodeError::InvalidArgument(_) => Status::invalid_argument(message),
        }
    }
}

impl From<SnapshotError> for Status {
    fn from(error: SnapshotError) -> Status {
        let message = error.to_string();
        match error {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::FailedPrecondition { .. } => Status::failed_precondition(message),
            SnapshotError::Internal(_) => Status::internal(message),
        }
    }
}

/// A remote layer's failure: `unavailable` where trying again may help (registry, a busy
/// layer), `internal` for a damaged record, else `failed_precondition` (no key, a refused
/// image).
fn remote_status(error: &RemoteError, message: String) -> Status {
    match error {
        RemoteError::Registry { .. } | RemoteError::Busy { .. } => Status::unavailable(message),
        RemoteError::Record(_) => Status::internal(message),
        _ => Status::failed_precondition(message),
    }
}

fn parent_arg(parent: &str) -> Option<String> {
    (!parent.is_empty()).then(|| parent.to_string())
}

fn api_mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            options: m.options,
            ..Default::default()
        })
        .collect()
}

fn api_info(info: Info) -> ApiInfo {
    let time = |ns: u128| UNIX_EPOCH + Duration::from_nanos(ns as u64);
    ApiInfo {
        kind: match info.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        },
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        labels: info.labels.into_iter().collect(),
        created_at: time(info.created_ns),
        updated_at: time(info.updated_ns),
    }
}

/// The gRPC face of a [`Node`].
#[derive(Clone)]
pub struct Service {
    node: Arc<Node>,
}

impl Service {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Service { node }
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("snapshot operation panicked: {e}")))?
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;
    type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<ApiInfo, Status>>>;

    async fn stat(&self, key: String) -> Result<ApiInfo, Status> {
        self.blocking(move |node| node.stat(&key).map(api_info))
            .await
    }

    async fn update(
        &self,
        info: ApiInfo,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<ApiInfo, Status> {
        self.blocking(move |node| {
            node.update(&info.name, info.labels, &fieldpaths.unwrap_or_default())
                .map(api_info)
        })
        .await
    }

    async fn usage(&self, key: String) -> Result<ApiUsage, Status> {
        self.blocking(move |node| {
            node.usage(&key).map(|u| ApiUsage {
                inodes: u.inodes as i64,
                size: u.size as i64,
            })
        })
        .await
    }

    async fn mounts(&self, key: String) -> Result<Vec<ApiMount>, Status> {
        self.blocking(move |node| node.mounts(&key).map(api_mounts))
            .await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<ApiMount>, Status> {
        self.blocking(move |node| {
            node.prepare(&key, parent_arg(&parent).as_deref(), labels)
                .map(api_mounts)
        })
        .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<ApiMount>, Status> {
        self.blocking(move |node| {
            node.view(&key, parent_arg(&parent).as_deref(), labels)
                .map(api_mounts)
        })
        .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.blocking(move |node| node.commit(&name, &key, labels))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        self.blocking(move |node| node.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.blocking(|node| node.cleanup()).await
    }

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Status> {
        let infos = self.blocking(move |node| node.list(&filters)).await?;
        Ok(futures_util::stream::iter(
            infos
                .into_iter()
                .map(|i| Ok(api_info(i)))
                .collect::<Vec<_>>(),
        ))
    }
}
