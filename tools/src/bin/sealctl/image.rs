//! Image operations: seal, unseal, inspect, rewrap.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fsformat::digest::HashingWriter;
use fsformat::oci::{
    is_sealfs_annotation, sealed_diff_id, SealedLayerAnnotations, ANNOTATION_SEALED_IMAGE,
    MEDIA_TYPE_SEALED_LAYER, SEALED_IMAGE_VERSION,
};
use fsformat::reader::{BlobSource, SealedLayer};
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::{KeyId, LayerKey, Stanza};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use oci_spec::image::{Descriptor, ImageManifest, MediaType};
use sealfs_tools::keyfiles::AnyRecipient;
use snapshotter::keys::Identities;
use snapshotter::oci_layout::{descriptor, OciLayout};

use crate::transport::{source_tag, Transport};

/// Parses sizes like `1M`, `64K`, `1048576`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.trim().to_ascii_uppercase() {
        t if t.ends_with("MIB") || t.ends_with('M') => (
            t.trim_end_matches("IB").trim_end_matches('M').to_string(),
            1 << 20,
        ),
        t if t.ends_with("KIB") || t.ends_with('K') => (
            t.trim_end_matches("IB").trim_end_matches('K').to_string(),
            1 << 10,
        ),
        t => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{text:?} is not a size (examples: 1M, 256K, 65536)"))
}

pub(crate) fn is_sealed(layer: &Descriptor) -> bool {
    layer.media_type().to_string() == MEDIA_TYPE_SEALED_LAYER
}

fn is_tar_layer(layer: &Descriptor) -> bool {
    let media_type = layer.media_type().to_string();
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

pub(crate) fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// How messages name layer `number` (from 0) of `layers`: `layer 2/3 (1a2b3c4d5e6f)`.
pub(crate) fn layer_label(number: usize, layers: &[Descriptor]) -> String {
    format!(
        "layer {}/{} ({})",
        number + 1,
        layers.len(),
        short(layers[number].digest().as_ref())
    )
}

/// The config's diff ids, one per layer of `layers`, or an error naming `source`.
pub(crate) fn layer_diff_ids(
    config: &[u8],
    layers: &[Descriptor],
    source: &str,
) -> Result<Vec<String>> {
    let ids = diff_ids(config)?;
    ensure!(
        ids.len() == layers.len(),
        "{source}: the config lists {} diff ids for {} layers; the image is inconsistent",
        ids.len(),
        layers.len()
    );
    Ok(ids)
}

pub(crate) fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    let value: serde_json::Value =
        serde_json::from_slice(config).context("image config is not JSON")?;
    value["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| anyhow!("image config has no rootfs.diff_ids"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("a diff id is not a string"))
        })
        .collect()
}

/// Writes a manifest whose layers (and optionally config) are replaced, and tags it.
pub(crate) fn write_manifest(
    destination: &OciLayout,
    source: &ImageManifest,
    layers: Vec<Descriptor>,
    config: Option<Descriptor>,
    sealed: bool,
    tag: Option<&str>,
) -> Result<Descriptor> {
    let mut manifest = source.clone();
    manifest.set_layers(layers);
    manifest.set_media_type(Some(MediaType::ImageManifest));
    if let Some(config) = config {
        manifest.set_config(config);
    } else if manifest.config().media_type().to_string()
        == "application/vnd.docker.container.image.v1+json"
    {
        let mut config = manifest.config().clone();
        config.set_media_type(MediaType::ImageConfig);
        manifest.set_config(config);
    }
    let mut annotations = manifest.annotations().clone().unwrap_or_default();
    annotations.remove(ANNOTATION_SEALED_IMAGE);
    if sealed {
        annotations.insert(
            ANNOTATION_SEALED_IMAGE.to_string(),
            SEALED_IMAGE_VERSION.to_string(),
        );
    }
    manifest.set_annotations(if annotations.is_empty() {
        None
    } else {
        Some(annotations)
    });
    let bytes = serde_json::to_vec(&manifest)?;
    let (digest, size) = destination.put_blob(&bytes)?;
    let descriptor = descriptor(MediaType::ImageManifest, &digest, size)?;
    destination.set_tag(&descriptor, tag)?;
    Ok(descriptor)
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .expect("static template")
    .progress_chars("=> ")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Compression threads for each of `layers` layers sealed at once by [`parallel`]: the cores
/// shared out, so one big layer gets them all and many layers do not multiply threads (and
/// the chunks each keeps in flight) by the core count.
pub(crate) fn compression_threads(layers: usize) -> usize {
    (cores() / layers.clamp(1, cores())).max(1)
}

/// Runs `work` on every item with as many threads as there are cores; results in item order.
pub(crate) fn parallel<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(usize, &T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let threads = cores().min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(at) else { break };
                let result = work(at, item);
                let failed = result.is_err();
                results.lock().expect("no panics while holding the lock")[at] = Some(result);
                if failed {
                    // Stop handing out work; the first error is reported.
                    next.store(items.len(), Ordering::Relaxed);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("threads joined")
        .into_iter()
        .flatten()
        .collect::<Result<Vec<R>>>()
}

/// How `sealctl seal` lays a layer out: chunk size, largest pack (default: 256 KiB or the
/// chunk size if smaller), zstd level.
pub fn seal_options(
    chunk_size: u64,
    pack_size: Option<u64>,
    zstd_level: i32,
) -> Result<SealOptions> {
    let mut options = SealOptions::with_chunk_size(chunk_size)?;
    if let Some(pack_size) = pack_size {
        options.set_pack_size(pack_size)?;
    }
    options.zstd_level = zstd_level;
    Ok(options)
}

pub fn seal(
    transport: &Transport,
    recipient_specs: &[String],
    mut options: SealOptions,
    prefetch_list: Option<&std::path::Path>,
    source: &str,
    destination: &str,
    sign: Option<&snapshotter::signature::cosign::SigningKey>,
) -> Result<()> {
    let recipients = sealfs_tools::keyfiles::load_recipients(recipient_specs)?;
    if let Some(list) = prefetch_list {
        let text = std::fs::read(list)
            .with_context(|| format!("reading the prefetch list {}", list.display()))?;
        let paths = text
            .split(|&b| b == b'\n')
            .map(|line| line.trim_ascii())
            .filter(|line| !line.is_empty() && !line.starts_with(b"#"));
        options
            .set_prefetch_paths(paths)
            .with_context(|| format!("prefetch list {}", list.display()))?;
    }
    let source_image = transport.open_source(source)?;
    let (src, image) = (&source_image.layout, &source_image.image);
    let destination_layout = transport.open_destination(destination, source_tag(source))?;
    let dst = &destination_layout.layout;
    let layers = image.manifest.layers();
    options.threads = compression_threads(layers.len());
    let diff_ids = layer_diff_ids(&image.config, layers, source)?;
    let bars = MultiProgress::new();
    let sealed = parallel(layers, |number, layer| {
        let digest = layer.digest().to_string();
        let which = layer_label(number, layers);
        if is_sealed(layer) {
            bail!("{which} is already sealed; unseal the image first or seal the original");
        }
        if !is_tar_layer(layer) {
            bail!(
                "{which} has media type {} which is not a layer tar",
                layer.media_type()
            );
        }
        let bar = bars.add(
            ProgressBar::new(layer.size())
                .with_style(bar_style())
                .with_prefix(short(&digest).to_string()),
        );
        let input = bar.wrap_read(src.read_blob_verified(&digest)?);
        let (sealed, summary) = seal_one(dst, layer, input, &options, &recipients, &which)?;
        ensure!(
            summary.input_diff_id == diff_ids[number],
            "{which}: its uncompressed content hashes to {} but the image config says {}; the source image is corrupt",
            summary.input_diff_id,
            diff_ids[number]
        );
        let blob_size = summary.blob_size;
        bar.finish_with_message(format!(
            "sealed: {} chunks ({} to prefetch), {:.2}x",
            summary.chunk_count,
            summary.prefetch_chunks,
            summary.file_bytes as f64 / blob_size.max(1) as f64
        ));
        Ok(sealed)
    })?;
    let manifest = finish_sealed(&source_image, destination_layout, sealed)?;
    eprintln!(
        "sealed {} layer(s) of {source} for {} recipient(s) into {destination} (manifest {})",
        image.manifest.layers().len(),
        recipients.len(),
        manifest.digest()
    );
    if let Some(key) = sign {
        let (registry, reference) = transport.remote(destination)?;
        let digest = manifest.digest().to_string();
        crate::sign::sign_digest(&registry, &reference, &digest, key)
            .with_context(|| format!("signing {destination}@{digest}"))?;
        eprintln!("signed {destination}@{digest}");
    }
    Ok(())
}

/// Completes a sealed copy of `source`: its config (each sealed layer's diff id replaced by
/// its [`sealed_diff_id`], so containerd's snapshot identities follow what the node
/// authenticates), a manifest listing `sealed` layers (tagged), then the push or the layout's
/// completion.
pub(crate) fn finish_sealed(
    source: &crate::transport::SourceImage,
    destination: crate::transport::Destination,
    sealed: Vec<Descriptor>,
) -> Result<Descriptor> {
    let (dst, tag) = (&destination.layout, &destination.tag);
    let manifest = &source.image.manifest;
    let mut diff_ids = layer_diff_ids(&source.image.config, &sealed, "the source image")?;
    for (diff_id, layer) in diff_ids.iter_mut().zip(&sealed) {
        if is_sealed(layer) {
            let annotations = layer.annotations().clone().unwrap_or_default();
            let facts = SealedLayerAnnotations::read_from(&annotations)?;
            *diff_id = sealed_diff_id(&facts.index_digest);
        }
    }
    let config = config_with_diff_ids(&source.image.config, &diff_ids)?;
    let (config_digest, config_size) = dst.put_blob(&config)?;
    let config = descriptor(MediaType::ImageConfig, &config_digest, config_size)?;
    let written = write_manifest(dst, manifest, sealed, Some(config), true, tag.as_deref())?;
    destination.finish(&written)?;
    Ok(written)
}

/// Refuses an image sealed in an older image format: rewriting only its manifest would keep
/// the config's unchecked plain diff ids, which nodes refuse.
fn ensure_current_format(manifest: &ImageManifest, source: &str) -> Result<()> {
    let version = manifest
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SEALED_IMAGE));
    match version {
        Some(version) if version != SEALED_IMAGE_VERSION => bail!(
            "{source} was sealed in sealfs image format {version}, which nodes no longer accept \
             (its config lists the plain layers' diff ids); seal the original image again with \
             this sealctl (format {SEALED_IMAGE_VERSION})"
        ),
        _ => Ok(()),
    }
}

/// `config` (an image config's JSON) with its `rootfs.diff_ids` replaced.
fn config_with_diff_ids(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>> {
    let mut config: serde_json::Value =
        serde_json::from_slice(config).context("image config is not JSON")?;
    config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    Ok(serde_json::to_vec(&config)?)
}

/// Seals the layer tar read from `input` into `dst` under a fresh key wrapped for
/// `recipients`. The descriptor keeps `source_layer`'s other annotations; the plain layer's
/// diff id is not recorded (it would let anyone confirm a guess of the content).
pub(crate) fn seal_one(
    dst: &OciLayout,
    source_layer: &Descriptor,
    input: impl io::Read,
    options: &SealOptions,
    recipients: &[AnyRecipient],
    which: &str,
) -> Result<(Descriptor, fsformat::writer::SealSummary)> {
    let mut output = dst.blob_writer()?;
    let layer_key = LayerKey::generate()?;
    let summary = seal_layer(input, &mut output, &layer_key, options)
        .with_context(|| format!("sealing {which}"))?;
    let (blob_digest, blob_size) = output.commit()?;
    let mut stanzas = Vec::new();
    for recipient in recipients {
        stanzas.extend(
            recipient
                .wrap(&layer_key)
                .with_context(|| format!("{which}: wrapping its key"))?,
        );
    }
    let facts = SealedLayerAnnotations {
        index_digest: summary.tail_digest.clone(),
        index_size: summary.tail_size,
        stanzas,
    };
    let mut annotations = source_layer.annotations().clone().unwrap_or_default();
    annotations.retain(|k, _| !is_sealfs_annotation(k));
    annotations.extend(facts.pairs());
    let mut sealed = descriptor(
        MediaType::Other(MEDIA_TYPE_SEALED_LAYER.into()),
        &blob_digest,
        blob_size,
    )?;
    sealed.set_annotations(Some(annotations));
    Ok((sealed, summary))
}

/// The startup profile: its chunks, and the files with data in them in the order the
/// prefetch fetches them (files of one packed chunk in pack order).
fn print_profile(layer: &SealedLayer) {
    let index = layer.index();
    if index.prefetch.is_empty() {
        println!("  profile      none");
        return;
    }
    let bytes: u64 = index
        .prefetch
        .iter()
        .map(|&c| u64::from(index.chunks[c as usize].sealed_len))
        .sum();
    println!(
        "  profile      {} chunks, {} to prefetch:",
        index.prefetch.len(),
        human(bytes)
    );
    let mut by_chunk: HashMap<u32, Vec<u32>> = HashMap::new();
    for (number, entry) in index.entries.iter().enumerate() {
        if let fsformat::layout::EntryKind::File { extents, .. } = &entry.kind {
            for extent in extents {
                let files = by_chunk.entry(extent.chunk).or_default();
                if files.last() != Some(&(number as u32)) {
                    files.push(number as u32);
                }
            }
        }
    }
    let mut shown = std::collections::HashSet::new();
    for chunk in &index.prefetch {
        for &file in by_chunk.get(chunk).into_iter().flatten() {
            if shown.insert(file) {
                println!("    /{}", String::from_utf8_lossy(&layer.path_of(file)));
            }
        }
    }
}

/// Unwraps a sealed layer's key with the given identities.
fn layer_key_for(
    layer: &Descriptor,
    identities: &Identities,
    which: &str,
) -> Result<(SealedLayerAnnotations, LayerKey)> {
    snapshotter::mount::unwrap_layer(layer, identities)
        .with_context(|| format!("{which}: cannot unwrap the layer key"))
}

/// Opens a sealed layer from a layout with the given identities, verifying the pinned index.
fn open_layer(
    layout: &OciLayout,
    layer: &Descriptor,
    identities: &Identities,
    which: &str,
) -> Result<Arc<SealedLayer>> {
    let opened = snapshotter::mount::open_layer(layout, layer, identities)
        .with_context(|| format!("{which}: cannot open the layer"))?;
    Ok(opened.layer)
}

/// A sealed blob read through a progress bar: unsealing reads each chunk once, in order.
struct ProgressSource<'a> {
    blob: &'a std::fs::File,
    bar: &'a ProgressBar,
}

impl BlobSource for ProgressSource<'_> {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        BlobSource::read_exact_at(self.blob, offset, buf)?;
        self.bar.inc(buf.len() as u64);
        Ok(())
    }
}

pub fn unseal(
    transport: &Transport,
    key_specs: &[String],
    source: &str,
    destination: &str,
) -> Result<()> {
    let identities = sealfs_tools::keyfiles::load_identities(key_specs)?;
    let source_image = transport.open_source(source)?;
    let (src, image) = (&source_image.layout, &source_image.image);
    let destination_layout = transport.open_destination(destination, source_tag(source))?;
    let (dst, tag) = (&destination_layout.layout, &destination_layout.tag);
    let mut diff_ids = diff_ids(&image.config)?;
    let layers = image.manifest.layers();
    let bars = MultiProgress::new();
    let results = parallel(layers, |number, layer| {
        let digest = layer.digest().to_string();
        let which = layer_label(number, layers);
        if !is_sealed(layer) {
            dst.import_blob(src, &digest)?;
            return Ok((layer.clone(), None));
        }
        let opened = open_layer(src, layer, &identities, &which)?;
        let blob = src.open_blob(&digest)?;
        let bar = bars.add(
            ProgressBar::new(layer.size())
                .with_style(bar_style())
                .with_prefix(short(&digest).to_string()),
        );
        let gzip = flate2::write::GzEncoder::new(dst.blob_writer()?, flate2::Compression::fast());
        let source = ProgressSource {
            blob: &blob,
            bar: &bar,
        };
        let tar = fsformat::unseal::unseal_layer(&opened, &source, HashingWriter::new(gzip))
            .with_context(|| format!("unsealing {which}"))?;
        let (gzip, diff_id, _) = tar.finish();
        let (blob_digest, blob_size) = gzip.finish().context("finishing gzip")?.commit()?;
        let mut plain = descriptor(MediaType::ImageLayerGzip, &blob_digest, blob_size)?;
        let mut annotations = layer.annotations().clone().unwrap_or_default();
        annotations.retain(|k, _| !is_sealfs_annotation(k));
        plain.set_annotations(if annotations.is_empty() {
            None
        } else {
            Some(annotations)
        });
        bar.finish_with_message("unsealed");
        Ok((plain, Some(diff_id)))
    })?;
    let mut plain_layers = Vec::new();
    for (number, (layer, diff_id)) in results.into_iter().enumerate() {
        if let Some(diff_id) = diff_id {
            diff_ids[number] = diff_id;
        }
        plain_layers.push(layer);
    }
    // The new tars are not the originals (and a sealed image's config lists sealed diff ids),
    // so the config gets the diff ids of the tars written here.
    let config_bytes = config_with_diff_ids(&image.config, &diff_ids)?;
    let (config_digest, config_size) = dst.put_blob(&config_bytes)?;
    let config_descriptor = descriptor(MediaType::ImageConfig, &config_digest, config_size)?;
    let manifest = write_manifest(
        dst,
        &image.manifest,
        plain_layers,
        Some(config_descriptor),
        false,
        tag.as_deref(),
    )?;
    destination_layout.finish(&manifest)?;
    eprintln!(
        "unsealed {source} into {destination} (manifest {})",
        manifest.digest()
    );
    Ok(())
}

pub fn inspect(transport: &Transport, key_specs: &[String], source: &str) -> Result<()> {
    let identities = sealfs_tools::keyfiles::load_identities(key_specs)?;
    // Only the index regions are read: a registry image is not pulled.
    let (image, layer_source) = transport.open_for_inspection(source)?;
    let sealed_image = image
        .manifest
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SEALED_IMAGE))
        .cloned();
    println!("image     {source}");
    println!(
        "manifest  {} ({})",
        image.descriptor.digest(),
        match sealed_image.as_deref() {
            Some(SEALED_IMAGE_VERSION) => format!("sealed, sealfs image format {SEALED_IMAGE_VERSION}"),
            Some(old) => format!(
                "sealed, sealfs image format {old}: nodes refuse it; seal the original again with this sealctl"
            ),
            None => "not sealed".to_string(),
        }
    );
    println!("config    {}", image.manifest.config().digest());
    let layers = image.manifest.layers();
    for (number, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        let which = format!("layer {}/{}", number + 1, layers.len());
        println!();
        println!("{which}  {digest}");
        println!("  media type   {}", layer.media_type());
        println!("  blob size    {}", human(layer.size()));
        if !is_sealed(layer) {
            continue;
        }
        let annotations = layer.annotations().clone().unwrap_or_default();
        let facts = SealedLayerAnnotations::read_from(&annotations)
            .with_context(|| format!("{which}: bad sealfs annotations"))?;
        // The tail is pinned by the manifest, so its footer is trustworthy without a key; it
        // is fetched once and, with a key, opened from the same bytes.
        let blob = layer_source(layer)?;
        let tail = snapshotter::mount::read_tail(
            layer,
            &facts,
            &*blob,
            snapshotter::mount::DEFAULT_MAX_INDEX_BYTES,
        )
        .with_context(|| format!("{which}: reading the index"))?;
        let footer = tail.footer().clone();
        println!(
            "  index        {} ({} verified against the manifest)",
            human(footer.tail_len()),
            short(&facts.index_digest)
        );
        println!(
            "  chunks       {} of up to {}",
            footer.chunk_count,
            human(u64::from(footer.chunk_size()))
        );
        println!(
            "  data         {} stored in {} ({:.2}x)",
            human(footer.data_bytes),
            human(layer.size()),
            footer.data_bytes as f64 / layer.size().max(1) as f64
        );
        let recipients: Vec<String> = facts.stanzas.iter().map(Stanza::recipient_label).collect();
        println!("  recipients   {}", recipients.join(", "));
        if identities.is_empty() {
            continue;
        }
        let (_, key) = layer_key_for(layer, &identities, &which)?;
        let opened = tail
            .open(&key, &facts.index_digest)
            .with_context(|| format!("{which}: opening the index"))?;
        let files = opened
            .index()
            .entries
            .iter()
            .filter(|e| matches!(e.kind, fsformat::layout::EntryKind::File { .. }))
            .count();
        println!(
            "  entries      {} ({files} regular files)",
            opened.index().entries.len()
        );
        print_profile(&opened);
        for (number, entry) in opened.index().entries.iter().enumerate().skip(1) {
            println!("    {}", describe_entry(&opened, number as u32, entry));
        }
    }
    Ok(())
}

fn describe_entry(layer: &SealedLayer, number: u32, entry: &fsformat::layout::Entry) -> String {
    use fsformat::layout::EntryKind;
    let path = String::from_utf8_lossy(&layer.path_of(number)).into_owned();
    let (kind, size, extra) = match &entry.kind {
        EntryKind::File { size, .. } => ('-', *size, String::new()),
        EntryKind::Dir { opaque, implicit } => {
            let flags = match (opaque, implicit) {
                (true, true) => " (opaque, implicit)",
                (true, false) => " (opaque)",
                (false, true) => " (implicit)",
                (false, false) => "",
            };
            ('d', 0, flags.to_string())
        }
        EntryKind::Symlink { target } => {
            ('l', 0, format!(" -> {}", String::from_utf8_lossy(target)))
        }
        EntryKind::HardLink { target } => (
            'h',
            0,
            format!(" => {}", String::from_utf8_lossy(&layer.path_of(*target))),
        ),
        EntryKind::CharDevice { major, minor } => ('c', 0, format!(" ({major},{minor})")),
        EntryKind::BlockDevice { major, minor } => ('b', 0, format!(" ({major},{minor})")),
        EntryKind::Fifo => ('p', 0, String::new()),
        EntryKind::Whiteout => ('w', 0, " (whiteout)".into()),
    };
    format!(
        "{kind}{:04o} {:>6}:{:<6} {size:>10} {path}{extra}",
        entry.mode, entry.uid, entry.gid
    )
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn rewrap(
    transport: &Transport,
    key_specs: &[String],
    add_specs: &[String],
    remove: &[String],
    source: &str,
    destination: &str,
) -> Result<()> {
    let identities = sealfs_tools::keyfiles::load_identities(key_specs)?;
    let added = sealfs_tools::keyfiles::load_recipients(add_specs)?;
    let added_labels: Vec<String> = added.iter().map(|recipient| recipient.label()).collect();
    // Recipients are compared as `sealctl inspect` shows them: key ids, provider:NAME.
    let removed: Vec<String> = remove
        .iter()
        .map(|id| {
            if id.starts_with("provider:") {
                return Ok(id.clone());
            }
            id.parse::<KeyId>()
                .map(|id| id.to_string())
                .with_context(|| format!("--remove-recipient {id}"))
        })
        .collect::<Result<_>>()?;
    ensure!(
        !added.is_empty() || !removed.is_empty(),
        "nothing to do: pass --add-recipient and/or --remove-recipient"
    );
    let source_image = transport.open_source(source)?;
    let (src, image) = (&source_image.layout, &source_image.image);
    ensure_current_format(&image.manifest, source)?;
    let destination_layout = transport.open_destination(destination, source_tag(source))?;
    let (dst, tag) = (&destination_layout.layout, &destination_layout.tag);
    let layers = image.manifest.layers();
    let mut rewrapped = Vec::new();
    for (number, layer) in layers.iter().enumerate() {
        let which = layer_label(number, layers);
        dst.import_blob(src, layer.digest().as_ref())?;
        if !is_sealed(layer) {
            rewrapped.push(layer.clone());
            continue;
        }
        let (mut facts, layer_key) = layer_key_for(layer, &identities, &which)?;
        // Prove the unwrapped key really opens this layer before handing it to anyone.
        open_layer(src, layer, &identities, &which)?;
        let present: Vec<String> = facts.stanzas.iter().map(Stanza::recipient_label).collect();
        if let Some(missing) = removed.iter().find(|id| !present.contains(id)) {
            bail!(
                "{which}: {missing} is not a recipient (recipients: {})",
                list(&present)
            );
        }
        facts
            .stanzas
            .retain(|s| !removed.contains(&s.recipient_label()));
        for (recipient, label) in added.iter().zip(&added_labels) {
            if !facts.stanzas.iter().any(|s| &s.recipient_label() == label) {
                facts.stanzas.extend(
                    recipient
                        .wrap(&layer_key)
                        .with_context(|| format!("{which}: wrapping its key for {label}"))?,
                );
            }
        }
        ensure!(
            !facts.stanzas.is_empty(),
            "{which}: removing {} would leave no recipient",
            list(&removed)
        );
        let mut annotations: HashMap<String, String> =
            layer.annotations().clone().unwrap_or_default();
        annotations.retain(|k, _| !is_sealfs_annotation(k));
        annotations.extend(facts.pairs());
        let mut descriptor = layer.clone();
        descriptor.set_annotations(Some(annotations));
        rewrapped.push(descriptor);
    }
    dst.import_blob(src, image.manifest.config().digest().as_ref())?;
    let manifest = write_manifest(dst, &image.manifest, rewrapped, None, true, tag.as_deref())?;
    destination_layout.finish(&manifest)?;
    eprintln!(
        "rewrapped {source} into {destination}: added [{}], removed [{}] (manifest {}; blobs unchanged)",
        list(&added_labels),
        list(&removed),
        manifest.digest()
    );
    Ok(())
}

fn list(ids: &[String]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
