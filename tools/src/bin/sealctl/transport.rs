//! Where images come from and go to: `oci:DIR[:TAG]` layouts, and `docker://HOST/REPO[:TAG]`
//! registries. A registry image is pulled into a temporary staging layout (every blob digest
//! checked) before it is read, and a registry destination is written to a staging layout and
//! pushed when the command finishes, skipping blobs the registry already has, so every command
//! works on layouts in between. `inspect` reads only the index regions of a registry image.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_client::Reference;
use oci_spec::image::{Descriptor, MediaType};
use sealfs_tools::image_ref::ImageRef;
use snapshotter::credentials;
use snapshotter::oci_layout::{descriptor, OciLayout, ResolvedImage};
use snapshotter::registry::{self, Registry, RegistryOptions};
use snapshotter::source::{ChunkSource, LocalBlob};

/// Registry settings from the command line.
pub struct Transport {
    insecure: bool,
    docker_config: Option<PathBuf>,
    hosts_dir: Option<PathBuf>,
    runtime: OnceCell<tokio::runtime::Runtime>,
    registries: std::cell::RefCell<HashMap<String, Registry>>,
}

/// Opens a layer's bytes where they are (a layout file or the registry).
pub type LayerSource<'a> = Box<dyn Fn(&Descriptor) -> Result<Arc<dyn ChunkSource>> + 'a>;

/// The tag staged images get inside their temporary layout.
const STAGED: &str = "staged";

fn transfer_bar(bars: &MultiProgress, len: u64, label: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .expect("static template")
    .progress_chars("=> ");
    bars.add(
        ProgressBar::new(len)
            .with_style(style)
            .with_prefix(label.to_string()),
    )
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

impl Transport {
    /// `insecure`: plain HTTP to every registry (loopback registries always use it).
    pub fn new(insecure: bool, docker_config: Option<PathBuf>, hosts_dir: Option<PathBuf>) -> Self {
        Transport {
            insecure,
            docker_config,
            hosts_dir,
            runtime: OnceCell::new(),
            registries: Default::default(),
        }
    }

    /// The client for `host`, with its credentials from docker's config.
    fn registry(&self, host: &str) -> Result<Registry> {
        if let Some(registry) = self.registries.borrow().get(host) {
            return Ok(registry.clone());
        }
        let runtime = match self.runtime.get() {
            Some(runtime) => runtime,
            None => {
                let runtime = registry::client_runtime()?;
                self.runtime.get_or_init(|| runtime)
            }
        };
        let options = RegistryOptions {
            insecure: if self.insecure {
                vec![host.to_string()]
            } else {
                Vec::new()
            },
            hosts_dir: self
                .hosts_dir
                .clone()
                .or_else(credentials::default_hosts_dir),
            ..RegistryOptions::default()
        };
        let registry = Registry::connect_with_docker_config(
            runtime.handle().clone(),
            host,
            options,
            self.docker_config.as_deref(),
        )?;
        self.registries
            .borrow_mut()
            .insert(host.to_string(), registry.clone());
        Ok(registry)
    }

    /// The client for a registry image (`[docker://]HOST/REPO[:TAG][@DIGEST]`) and its parsed
    /// reference.
    pub fn remote(&self, reference: &str) -> Result<(Registry, Reference)> {
        let reference = reference.strip_prefix("docker://").unwrap_or(reference);
        let parsed = Registry::parse(reference)?;
        let registry = self.registry(parsed.resolve_registry())?;
        Ok((registry, parsed))
    }

    /// Resolves a registry image (`[docker://]HOST/REPO[:TAG][@DIGEST]`): its manifest and
    /// config, and the client that reached it.
    pub fn resolve_remote(
        &self,
        reference: &str,
    ) -> Result<(Registry, snapshotter::registry::RemoteImage)> {
        let reference = reference.strip_prefix("docker://").unwrap_or(reference);
        let (registry, parsed) = self.remote(reference)?;
        let image = registry
            .resolve(&parsed)
            .with_context(|| format!("resolving {reference}"))?;
        Ok((registry, image))
    }

    /// Opens a source image, pulling a registry image into a staging layout.
    pub fn open_source(&self, text: &str) -> Result<SourceImage> {
        match text.parse::<ImageRef>()? {
            ImageRef::Layout { dir, tag } => {
                let layout = OciLayout::open(&dir)?;
                let image = layout
                    .resolve(tag.as_deref())
                    .with_context(|| format!("resolving {text}"))?;
                Ok(SourceImage {
                    layout,
                    image,
                    _staging: None,
                })
            }
            ImageRef::Registry { reference } => {
                let (registry, parsed) = self.remote(&reference)?;
                let remote = registry
                    .resolve(&parsed)
                    .with_context(|| format!("resolving {text}"))?;
                let staging = tempfile::Builder::new()
                    .prefix("sealctl-pull-")
                    .tempdir_in(std::env::temp_dir())?;
                let layout = OciLayout::open_or_create(staging.path().join("image"))?;
                let bars = MultiProgress::new();
                let manifest = &remote.image.manifest;
                for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
                    let digest = blob.digest().to_string();
                    let bar = transfer_bar(&bars, blob.size(), &short(&digest));
                    let mut writer = layout.blob_writer()?;
                    registry.download(
                        &remote.reference,
                        &digest,
                        blob.size(),
                        &mut writer,
                        &|n| bar.inc(n),
                    )?;
                    writer.commit()?;
                    bar.finish_with_message("pulled");
                }
                let (digest, size) = layout.put_blob(&remote.raw_manifest)?;
                layout.set_tag(
                    &descriptor(MediaType::ImageManifest, &digest, size)?,
                    Some(STAGED),
                )?;
                let image = layout.resolve(Some(STAGED))?;
                Ok(SourceImage {
                    layout,
                    image,
                    _staging: Some(staging),
                })
            }
        }
    }

    /// Resolves an image for inspection without pulling its layers: returns the image and a
    /// way to read each layer's bytes where it is.
    pub fn open_for_inspection(&self, text: &str) -> Result<(ResolvedImage, LayerSource<'_>)> {
        match text.parse::<ImageRef>()? {
            ImageRef::Layout { .. } => {
                let source = self.open_source(text)?;
                let image = source.image.clone();
                let layout = source.layout.clone();
                Ok((
                    image,
                    Box::new(move |layer: &Descriptor| -> Result<Arc<dyn ChunkSource>> {
                        Ok(Arc::new(LocalBlob::open(
                            &layout.blob_path(layer.digest().as_ref())?,
                        )?))
                    }),
                ))
            }
            ImageRef::Registry { reference } => {
                let (registry, parsed) = self.remote(&reference)?;
                let remote = registry
                    .resolve(&parsed)
                    .with_context(|| format!("resolving {text}"))?;
                let image = remote.image.clone();
                Ok((
                    image,
                    Box::new(move |layer: &Descriptor| -> Result<Arc<dyn ChunkSource>> {
                        Ok(Arc::new(registry.layer(&remote, layer)))
                    }),
                ))
            }
        }
    }

    /// Opens a destination: a layout (created if missing), or a staging layout pushed to the
    /// registry by [`Destination::finish`].
    pub fn open_destination(&self, text: &str, source_tag: Option<String>) -> Result<Destination> {
        match text.parse::<ImageRef>()? {
            ImageRef::Layout { dir, tag } => {
                let created = !dir.join("oci-layout").exists();
                let layout = OciLayout::open_or_create(&dir)
                    .with_context(|| format!("opening destination {text}"))?;
                Ok(Destination {
                    layout,
                    tag: tag.or(source_tag),
                    created,
                    finished: false,
                    remote: None,
                    _staging: None,
                })
            }
            ImageRef::Registry { reference } => {
                let (registry, parsed) = self.remote(&reference)?;
                let staging = tempfile::Builder::new()
                    .prefix("sealctl-push-")
                    .tempdir_in(std::env::temp_dir())?;
                let layout = OciLayout::open_or_create(staging.path().join("image"))?;
                Ok(Destination {
                    layout,
                    tag: Some(STAGED.to_string()),
                    created: false,
                    finished: false,
                    remote: Some((registry, parsed)),
                    _staging: Some(staging),
                })
            }
        }
    }
}

/// A source image, readable as a layout.
pub struct SourceImage {
    /// The layout holding it (a staging copy for registry images).
    pub layout: OciLayout,
    /// Manifest and config.
    pub image: ResolvedImage,
    _staging: Option<tempfile::TempDir>,
}

/// A destination being written. If this command created it and does not finish, a layout is
/// removed again so a failed run leaves nothing behind; a registry gets nothing until
/// [`Destination::finish`] pushes.
pub struct Destination {
    /// Where to write blobs and the manifest.
    pub layout: OciLayout,
    /// The tag to write the manifest under.
    pub tag: Option<String>,
    created: bool,
    finished: bool,
    remote: Option<(Registry, Reference)>,
    _staging: Option<tempfile::TempDir>,
}

impl Destination {
    /// Completes the destination: keeps a layout, or pushes the staged image (blobs the
    /// registry has are skipped, then the manifest under the reference's tag).
    pub fn finish(mut self, manifest: &Descriptor) -> Result<()> {
        if let Some((registry, reference)) = &self.remote {
            let staged = self.layout.resolve(self.tag.as_deref())?;
            let bars = MultiProgress::new();
            let mut skipped = 0;
            for blob in std::iter::once(staged.manifest.config()).chain(staged.manifest.layers()) {
                let digest = blob.digest().to_string();
                if registry.has_blob(reference, &digest)? {
                    skipped += 1;
                    continue;
                }
                let bar = transfer_bar(&bars, blob.size(), &short(&digest));
                let tick = bar.clone();
                registry.push_blob(
                    reference,
                    &self.layout.blob_path(&digest)?,
                    &digest,
                    Arc::new(move |n| tick.inc(n)),
                )?;
                bar.finish_with_message("pushed");
            }
            let bytes = self.layout.read_json_blob(manifest.digest().as_ref())?;
            registry.push_manifest(
                reference,
                &bytes,
                "application/vnd.oci.image.manifest.v1+json",
            )?;
            eprintln!("pushed {reference} ({} blob(s) already there)", skipped);
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if self.created && !self.finished {
            let _ = std::fs::remove_dir_all(self.layout.root());
        }
    }
}

/// The tag named by an `oci:` reference, kept when writing to a layout without one.
pub fn source_tag(text: &str) -> Option<String> {
    match text.parse::<ImageRef>() {
        Ok(ImageRef::Layout { tag, .. }) => tag,
        _ => None,
    }
}
