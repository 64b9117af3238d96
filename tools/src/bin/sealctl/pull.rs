//! `sealctl pull`: a lazy pull through containerd's API, as containerd's own unpacker does it
//! for a remote snapshotter. The manifest and config go into containerd's content store, each
//! layer is prepared on the snapshotter with the labels that let it mount the layer remotely
//! (`AlreadyExists`: nothing to download), and the image record is created. A layer the
//! snapshotter does not take remotely (not sealed) is downloaded, applied with containerd's
//! diff service and committed, so plain images pull too.
//!
//! Garbage collection: the manifest references its config, the config references the top
//! layer snapshot (`containerd.io/gc.ref.snapshot.<snapshotter>`), and everything is written
//! under a lease until the image record holds it.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{AddResourceRequest, Resource};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteRequest as DeleteLeaseRequest, Image, InfoRequest,
    UpdateImageRequest, UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as ApiDescriptor;
use oci_spec::image::Descriptor;
use snapshotter::oci_layout::chain_ids;
use tonic::{Code, Request};

use crate::transport::Transport;

/// Where and how to pull.
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace.
    pub namespace: String,
    /// The snapshotter to prepare layers on.
    pub snapshotter: String,
}

/// Prepare labels, as containerd's CRI plugin spells them (the snapshotter reads these or
/// stargz's).
const TARGET: &str = "containerd.io/snapshot.ref";
const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// containerd limits a label (key plus value) to 4096 bytes.
const LABEL_LIMIT: usize = 4096;
/// Size of one content-store write message.
const WRITE_PIECE: usize = 1 << 20;

/// A containerd connection that blocks on each call (the registry client blocks too).
struct Containerd {
    runtime: tokio::runtime::Runtime,
    client: containerd_client::Client,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    fn connect(options: &PullOptions) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime
            .block_on(containerd_client::Client::from_path(&options.address))
            .with_context(|| {
                format!(
                    "cannot connect to containerd at {} (is it running? --address)",
                    options.address.display()
                )
            })?;
        Ok(Containerd {
            runtime,
            client,
            namespace: options.namespace.clone(),
            lease: None,
        })
    }

    /// `message` with the namespace and lease headers.
    fn request<T>(&self, message: T) -> Result<Request<T>> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert("containerd-namespace", self.namespace.parse()?);
        if let Some(lease) = &self.lease {
            metadata.insert("containerd-lease", lease.parse()?);
        }
        Ok(request)
    }

    fn block<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Starts a lease that keeps what this pull writes until the image record holds it.
    fn start_lease(&mut self) -> Result<()> {
        let id = format!(
            "sealctl-pull-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        let request = self.request(containerd_client::services::v1::CreateRequest {
            id: id.clone(),
            labels: HashMap::new(),
        })?;
        self.block(self.client.leases().create(request))
            .context("creating a containerd lease")?;
        self.lease = Some(id);
        Ok(())
    }

    fn end_lease(&mut self) {
        if let Some(id) = self.lease.take() {
            if let Ok(request) = self.request(DeleteLeaseRequest { id, sync: false }) {
                let _ = self.block(self.client.leases().delete(request));
            }
        }
    }

    /// Whether the content store has `digest`.
    fn has_content(&self, digest: &str) -> Result<bool> {
        let request = self.request(InfoRequest {
            digest: digest.to_string(),
        })?;
        match self.block(self.client.content().info(request)) {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(status).context(format!("content info {digest}")),
        }
    }

    /// Writes a blob (streamed from `reader`) into the content store with `labels`; if it is
    /// there already, sets the labels on it.
    fn write_content(
        &self,
        digest: &str,
        size: u64,
        mut reader: impl Read + Send + 'static,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.has_content(digest)? {
            // Content already there (say, left by a pull that failed) is held by this pull's
            // lease as well: otherwise the garbage collector may take it before the image
            // record refers to it.
            if let Some(lease) = &self.lease {
                let request = self.request(AddResourceRequest {
                    id: lease.clone(),
                    resource: Some(Resource {
                        id: digest.to_string(),
                        r#type: "content".to_string(),
                    }),
                })?;
                self.block(self.client.leases().add_resource(request))
                    .with_context(|| format!("holding content {digest} in the pull's lease"))?;
            }
            if labels.is_empty() {
                return Ok(());
            }
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            let request = self.request(UpdateContentRequest {
                info: Some(containerd_client::services::v1::Info {
                    digest: digest.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            })?;
            self.block(self.client.content().update(request))
                .with_context(|| format!("labelling content {digest}"))?;
            return Ok(());
        }
        let reference = format!("sealctl-pull-{digest}");
        let total = size as i64;
        let mut messages = Vec::new();
        let mut offset = 0i64;
        // Reads lazily: a layer is not held in memory whole.
        let pieces = std::iter::from_fn(move || {
            let mut piece = vec![0u8; WRITE_PIECE];
            let mut filled = 0;
            while filled < piece.len() {
                match reader.read(&mut piece[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(_) => return None,
                }
            }
            piece.truncate(filled);
            (filled > 0).then_some(piece)
        });
        messages.push(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.clone(),
            ..Default::default()
        });
        let writes = pieces.map({
            let reference = reference.clone();
            move |data| {
                let message = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: reference.clone(),
                    total,
                    offset,
                    data,
                    ..Default::default()
                };
                offset += message.data.len() as i64;
                message
            }
        });
        let commit = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference,
            total,
            offset: total,
            expected: digest.to_string(),
            labels,
            ..Default::default()
        };
        let stream = tokio_stream::iter(messages.into_iter().chain(writes).chain([commit]));
        let request = self.request(stream)?;
        let written = self.block(async {
            let mut responses = self.client.content().write(request).await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        });
        match written {
            Ok(()) => Ok(()),
            // Written meanwhile by another pull.
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(status).context(format!("writing {digest} to containerd")),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.end_lease();
    }
}

fn api_descriptor(descriptor: &Descriptor) -> ApiDescriptor {
    ApiDescriptor {
        media_type: descriptor.media_type().to_string(),
        digest: descriptor.digest().to_string(),
        size: descriptor.size() as i64,
        annotations: HashMap::new(),
    }
}

/// `cri.image-layers`: this layer's digest and the following ones', as many as fit a label.
fn image_layers_label(layers: &[Descriptor], from: usize) -> String {
    let mut value = String::new();
    for layer in &layers[from..] {
        let digest = layer.digest().to_string();
        if IMAGE_LAYERS.len() + value.len() + digest.len() + 1 > LABEL_LIMIT {
            break;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(&digest);
    }
    value
}

/// What happened to one layer.
enum LayerOutcome {
    Present,
    Remote,
    Unpacked,
}

/// Pulls `reference` lazily into containerd.
pub fn pull(transport: &Transport, reference: &str, options: &PullOptions) -> Result<()> {
    let (registry, image) = transport.resolve_remote(reference)?;
    let name = snapshotter::registry::Registry::parse(
        reference.strip_prefix("docker://").unwrap_or(reference),
    )?
    .whole();
    let manifest = &image.image.manifest;
    let manifest_digest = image.image.descriptor.digest().to_string();
    let config: serde_json::Value = serde_json::from_slice(&image.image.config)
        .with_context(|| format!("the config of {name} is not JSON"))?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let layers = manifest.layers();
    if diff_ids.len() != layers.len() {
        bail!(
            "{name}: the config lists {} diff ids for {} layers",
            diff_ids.len(),
            layers.len()
        );
    }
    let chains = chain_ids(&diff_ids);

    let mut containerd = Containerd::connect(options)?;
    containerd.start_lease()?;

    // The manifest first, as containerd's own pulls store it before unpacking: the
    // snapshotter reads it from the content store (checked against the digest the Prepare
    // labels name) instead of fetching it from the registry once more.
    let config_digest = manifest.config().digest().to_string();
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        config_digest.clone(),
    )]);
    for (index, layer) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{index}"),
            layer.digest().to_string(),
        );
    }
    containerd.write_content(
        &manifest_digest,
        image.raw_manifest.len() as u64,
        std::io::Cursor::new(image.raw_manifest.clone()),
        manifest_labels,
    )?;

    // Layer snapshots, bottom up: each one's parent is the one below.
    let mut outcomes = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        let parent = index
            .checked_sub(1)
            .map(|i| chains[i].clone())
            .unwrap_or_default();
        let outcome = prepare_layer(
            &containerd,
            options,
            &registry,
            &image,
            &name,
            &manifest_digest,
            index,
            &chains[index],
            &parent,
        )
        .with_context(|| format!("layer {} of {name}", layer.digest()))?;
        let what = match outcome {
            LayerOutcome::Present => "already present",
            LayerOutcome::Remote => "mounted remotely (sealed, fetched lazily)",
            LayerOutcome::Unpacked => "downloaded and unpacked (not sealed)",
        };
        println!("{}: {what}", layer.digest());
        outcomes.push(outcome);
    }

    // Config (holding the layer snapshots), then the image record.
    let top = chains.last().cloned().unwrap_or_default();
    let mut config_labels = HashMap::new();
    if !top.is_empty() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", options.snapshotter),
            top,
        );
    }
    containerd.write_content(
        &config_digest,
        image.image.config.len() as u64,
        std::io::Cursor::new(image.image.config.clone()),
        config_labels,
    )?;
    let record = Image {
        name: name.clone(),
        target: Some(api_descriptor(&image.image.descriptor)),
        ..Default::default()
    };
    let request = containerd.request(CreateImageRequest {
        image: Some(record.clone()),
    })?;
    match containerd.block(containerd.client.images().create(request)) {
        Ok(_) => {}
        Err(status) if status.code() == Code::AlreadyExists => {
            let request = containerd.request(UpdateImageRequest {
                image: Some(record),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".into()],
                }),
            })?;
            containerd
                .block(containerd.client.images().update(request))
                .with_context(|| format!("updating the image record {name}"))?;
        }
        Err(status) => return Err(status).context(format!("creating the image record {name}")),
    }
    containerd.end_lease();
    let remote = outcomes
        .iter()
        .filter(|o| matches!(o, LayerOutcome::Remote))
        .count();
    println!(
        "pulled {name} ({manifest_digest}): {remote} of {} layer(s) remote on snapshotter {}",
        layers.len(),
        options.snapshotter
    );
    Ok(())
}

/// Prepares one layer snapshot: already there, taken remotely by the snapshotter, or
/// downloaded and applied.
#[allow(clippy::too_many_arguments)]
fn prepare_layer(
    containerd: &Containerd,
    options: &PullOptions,
    registry: &snapshotter::registry::Registry,
    image: &snapshotter::registry::RemoteImage,
    name: &str,
    manifest_digest: &str,
    index: usize,
    chain: &str,
    parent: &str,
) -> Result<LayerOutcome> {
    let layer = &image.image.manifest.layers()[index];
    let snapshots = || containerd.client.snapshots();
    let stat = containerd.request(StatSnapshotRequest {
        snapshotter: options.snapshotter.clone(),
        key: chain.to_string(),
    })?;
    match containerd.block(snapshots().stat(stat)) {
        Ok(_) => return Ok(LayerOutcome::Present),
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) => {
            return Err(status).context(format!(
                "asking snapshotter {} for {chain} (is it configured in containerd?)",
                options.snapshotter
            ))
        }
    }
    let mut labels: HashMap<String, String> = layer
        .annotations()
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(TARGET.into(), chain.into());
    labels.insert(IMAGE_REF.into(), name.into());
    labels.insert(MANIFEST_DIGEST.into(), manifest_digest.into());
    labels.insert(LAYER_DIGEST.into(), layer.digest().to_string());
    labels.insert(
        IMAGE_LAYERS.into(),
        image_layers_label(image.image.manifest.layers(), index),
    );
    let key = format!(
        "sealctl-pull/{}/extract {chain}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let prepare = containerd.request(PrepareSnapshotRequest {
        snapshotter: options.snapshotter.clone(),
        key: key.clone(),
        parent: parent.to_string(),
        labels,
    })?;
    let mounts = match containerd.block(snapshots().prepare(prepare)) {
        Err(status) if status.code() == Code::AlreadyExists => return Ok(LayerOutcome::Remote),
        Err(status) => bail!("{}", status.message()),
        Ok(response) => response.into_inner().mounts,
    };
    // Not remote: download the blob, apply it, commit. On failure, drop the active snapshot.
    let unpacked = (|| -> Result<()> {
        let blob = tempfile::tempfile()?;
        let mut writer = std::io::BufWriter::new(blob.try_clone()?);
        registry.download(
            &image.reference,
            layer.digest().as_ref(),
            layer.size(),
            &mut writer,
            &|_| {},
        )?;
        drop(writer);
        let mut reader = blob;
        std::io::Seek::rewind(&mut reader)?;
        containerd.write_content(
            layer.digest().as_ref(),
            layer.size(),
            reader,
            HashMap::new(),
        )?;
        let apply = containerd.request(ApplyRequest {
            diff: Some(api_descriptor(layer)),
            mounts,
            payloads: HashMap::new(),
        })?;
        containerd
            .block(containerd.client.diff().apply(apply))
            .context("applying the layer")?;
        let commit = containerd.request(CommitSnapshotRequest {
            snapshotter: options.snapshotter.clone(),
            name: chain.to_string(),
            key: key.clone(),
            labels: HashMap::new(),
        })?;
        match containerd.block(snapshots().commit(commit)) {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(status).context("committing the layer"),
        }
    })();
    if unpacked.is_err() {
        if let Ok(remove) = containerd.request(RemoveSnapshotRequest {
            snapshotter: options.snapshotter.clone(),
            key,
        }) {
            let _ = containerd.block(snapshots().remove(remove));
        }
    }
    unpacked.map(|()| LayerOutcome::Unpacked)
}
