//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`): resolve a tag
//! to a manifest, read blobs with their digests checked, write blobs atomically, tag manifests.
//!
//! Writes never leave a half-written blob under its final name: blobs are written to a temporary
//! file in the blob directory, hashed on the way, and renamed to their digest at the end.
//! `index.json` is replaced by rename as well.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fsformat::digest::{HashingReader, HashingWriter};
use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};

/// The annotation that names a manifest's tag in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Manifests and configs larger than this are refused (8 MiB): they are JSON read into memory.
const MAX_JSON_BLOB: u64 = 8 << 20;

/// What can go wrong with a layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// File system error on a path.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The layout or one of its documents is not what the OCI spec says.
    #[error("{0}")]
    Invalid(String),
    /// A blob's content does not match its digest.
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// What the content hashes to.
        actual: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Result alias.
pub type Result<T, E = LayoutError> = std::result::Result<T, E>;

/// An image found in a layout: its manifest and config.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The manifest's descriptor as listed in `index.json` (or in a nested index).
    pub descriptor: Descriptor,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config blob's bytes.
    pub config: Vec<u8>,
}

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let marker = root.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::Invalid(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                root.display()
            )),
            _ => LayoutError::Io {
                path: marker.clone(),
                source: e,
            },
        })?;
        if !text.contains("\"imageLayoutVersion\"") {
            return Err(LayoutError::Invalid(format!(
                "{}: not an OCI layout marker",
                marker.display()
            )));
        }
        Ok(OciLayout { root })
    }

    /// Opens a layout, creating an empty one if the directory does not exist or is empty.
    pub fn open_or_create(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if root.join("oci-layout").exists() {
            return Self::open(root);
        }
        if root.exists() && fs::read_dir(&root).map_err(io_err(&root))?.next().is_some() {
            return Err(LayoutError::Invalid(format!(
                "{} exists, is not empty and is not an OCI image layout; refusing to write into it",
                root.display()
            )));
        }
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = root.join("oci-layout");
        fs::write(&marker, b"{\"imageLayoutVersion\":\"1.0.0\"}").map_err(io_err(&marker))?;
        let layout = OciLayout { root };
        layout.write_index(
            &ImageIndexBuilder::default()
                .schema_version(2u32)
                .manifests(vec![])
                .build()
                .map_err(invalid)?,
        )?;
        Ok(layout)
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives; refuses anything but a well-formed sha256 digest, so
    /// a hostile manifest cannot name a path outside the layout.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| {
                LayoutError::Invalid(format!("unsupported or malformed digest {digest:?}"))
            })?;
        Ok(self.root.join("blobs").join("sha256").join(hex))
    }

    /// Whether the layout has the blob.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Opens a blob for random access (no digest check: the caller verifies what it reads).
    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(io_err(&path))
    }

    /// Opens a blob for streaming; the reader fails at the end if the content does not match
    /// the digest, so nothing built from a corrupt blob is kept.
    pub fn read_blob_verified(&self, digest: &str) -> Result<VerifyingReader<File>> {
        Ok(VerifyingReader {
            inner: HashingReader::new(self.open_blob(digest)?),
            digest: digest.to_string(),
        })
    }

    /// Reads a small JSON blob whole and checks its digest.
    pub fn read_json_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let path = self.blob_path(digest)?;
        self.read_blob_verified(digest)?
            .take(MAX_JSON_BLOB + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| LayoutError::from_read(e, &path))?;
        if bytes.len() as u64 > MAX_JSON_BLOB {
            return Err(LayoutError::Invalid(format!(
                "blob {digest} is larger than 8 MiB; not a manifest or config"
            )));
        }
        Ok(bytes)
    }

    fn read_index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        let file = File::open(&path).map_err(io_err(&path))?;
        ImageIndex::from_reader(file)
            .map_err(|e| LayoutError::Invalid(format!("{}: {e}", path.display())))
    }

    fn write_index(&self, index: &ImageIndex) -> Result<()> {
        let path = self.root.join("index.json");
        let mut temp = tempfile::NamedTempFile::new_in(&self.root).map_err(io_err(&self.root))?;
        index.to_writer(&mut temp).map_err(invalid)?;
        temp.as_file().sync_all().map_err(io_err(&path))?;
        temp.persist(&path).map_err(|e| LayoutError::Io {
            path,
            source: e.error,
        })?;
        Ok(())
    }

    /// The tags in `index.json` with their manifest descriptors.
    pub fn tags(&self) -> Result<Vec<(Option<String>, Descriptor)>> {
        Ok(self
            .read_index()?
            .manifests()
            .iter()
            .map(|d| {
                (
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME_ANNOTATION).cloned()),
                    d.clone(),
                )
            })
            .collect())
    }

    /// Finds the image for `tag` (or the only image when no tag is given), descending into a
    /// nested image index for the host's platform.
    pub fn resolve(&self, tag: Option<&str>) -> Result<ResolvedImage> {
        let entries = self.tags()?;
        let chosen: Vec<&Descriptor> = entries
            .iter()
            .filter(|(t, _)| tag.is_none() || t.as_deref() == tag)
            .map(|(_, d)| d)
            .collect();
        let descriptor = match (chosen.as_slice(), tag) {
            ([one], _) => (*one).clone(),
            ([], Some(tag)) => {
                let known: Vec<String> = entries.iter().filter_map(|(t, _)| t.clone()).collect();
                return Err(LayoutError::Invalid(format!(
                    "no image tagged {tag:?} in {} (tags: {})",
                    self.root.display(),
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            ([], None) => {
                return Err(LayoutError::Invalid(format!(
                    "{} holds no image",
                    self.root.display()
                )))
            }
            (_, _) => {
                return Err(LayoutError::Invalid(format!(
                    "{} holds several images; name one with oci:DIR:TAG",
                    self.root.display()
                )))
            }
        };
        self.resolve_descriptor(descriptor, 0)
    }

    fn resolve_descriptor(&self, descriptor: Descriptor, depth: u8) -> Result<ResolvedImage> {
        let digest = descriptor.digest().to_string();
        let bytes = self.read_json_blob(&digest)?;
        let is_index = matches!(descriptor.media_type(), MediaType::ImageIndex)
            || descriptor.media_type().to_string()
                == "application/vnd.docker.distribution.manifest.list.v2+json";
        if is_index {
            if depth > 2 {
                return Err(LayoutError::Invalid("image indexes nested too deep".into()));
            }
            let index = ImageIndex::from_reader(&bytes[..])
                .map_err(|e| LayoutError::Invalid(format!("index {digest}: {e}")))?;
            let child = platform_manifest(&index).ok_or_else(|| {
                let (os, arch) = host_platform();
                LayoutError::Invalid(format!("image index {digest} has no {os}/{arch} manifest"))
            })?;
            return self.resolve_descriptor(child.clone(), depth + 1);
        }
        let manifest = ImageManifest::from_reader(&bytes[..])
            .map_err(|e| LayoutError::Invalid(format!("manifest {digest}: {e}")))?;
        let config = self.read_json_blob(manifest.config().digest().as_ref())?;
        Ok(ResolvedImage {
            descriptor,
            manifest,
            config,
        })
    }

    /// A writer for a new blob; [`BlobWriter::commit`] names it by its digest.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let dir = self.root.join("blobs").join("sha256");
        let file = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        Ok(BlobWriter {
            file: HashingWriter::new(file),
            layout: self.clone(),
        })
    }

    /// Stores `bytes` as a blob.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let mut writer = self.blob_writer()?;
        writer.write_all(bytes).map_err(io_err(self.root()))?;
        writer.commit()
    }

    /// Copies a blob from another layout (hard link when possible), unless it is already here.
    pub fn import_blob(&self, from: &OciLayout, digest: &str) -> Result<()> {
        let target = self.blob_path(digest)?;
        if target.is_file() {
            return Ok(());
        }
        let source = from.blob_path(digest)?;
        if fs::hard_link(&source, &target).is_ok() {
            return Ok(());
        }
        let mut writer = self.blob_writer()?;
        io::copy(&mut from.read_blob_verified(digest)?, &mut writer).map_err(io_err(&source))?;
        writer.commit().map(|_| ())
    }

    /// Lists `manifest` under `tag` in `index.json`, replacing whatever had that tag (or, with
    /// no tag, adding it untagged).
    pub fn set_tag(&self, manifest: &Descriptor, tag: Option<&str>) -> Result<()> {
        let mut index = self.read_index()?;
        let mut entry = manifest.clone();
        let mut annotations = entry.annotations().clone().unwrap_or_default();
        annotations.retain(|k, _| k != REF_NAME_ANNOTATION);
        if let Some(tag) = tag {
            annotations.insert(REF_NAME_ANNOTATION.to_string(), tag.to_string());
        }
        entry.set_annotations(if annotations.is_empty() {
            None
        } else {
            Some(annotations)
        });
        entry.set_platform(None);
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                let t = d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION))
                    .map(String::as_str);
                match tag {
                    Some(tag) => t != Some(tag),
                    None => d.digest() != manifest.digest(),
                }
            })
            .cloned()
            .collect();
        manifests.push(entry);
        index.set_manifests(manifests);
        self.write_index(&index)
    }
}

/// Builds a descriptor.
pub fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    let digest = Digest::from_str(digest).map_err(invalid)?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size)
        .build()
        .map_err(invalid)
}

fn invalid(e: impl std::fmt::Display) -> LayoutError {
    LayoutError::Invalid(e.to_string())
}

/// The manifest of an image index for the host's platform.
pub fn platform_manifest(index: &ImageIndex) -> Option<&Descriptor> {
    let (os, arch) = host_platform();
    index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
    })
}

/// The host's platform in OCI spelling.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// A new blob being written.
pub struct BlobWriter {
    file: HashingWriter<tempfile::NamedTempFile>,
    layout: OciLayout,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// Syncs the blob and names it by its digest; returns digest and size.
    pub fn commit(self) -> Result<(String, u64)> {
        let (mut file, digest, size) = self.file.finish();
        let path = self.layout.blob_path(&digest)?;
        file.flush().map_err(io_err(&path))?;
        file.as_file().sync_all().map_err(io_err(&path))?;
        file.persist(&path).map_err(|e| LayoutError::Io {
            path,
            source: e.error,
        })?;
        Ok((digest, size))
    }
}

/// The error a [`VerifyingReader`] ends with when the content does not match.
#[derive(Debug)]
struct DigestError {
    digest: String,
    actual: String,
}

impl std::fmt::Display for DigestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "blob {} is corrupt: its content hashes to {}",
            self.digest, self.actual
        )
    }
}

impl std::error::Error for DigestError {}

impl LayoutError {
    /// Turns an error from reading a [`VerifyingReader`] into `DigestMismatch` when that is
    /// what it was, or an I/O error on `path`.
    pub fn from_read(error: io::Error, path: &Path) -> Self {
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<DigestError>())
        {
            Some(d) => LayoutError::DigestMismatch {
                digest: d.digest.clone(),
                actual: d.actual.clone(),
            },
            None => LayoutError::Io {
                path: path.to_path_buf(),
                source: error,
            },
        }
    }
}

/// A reader that checks the digest of everything it read when it reaches the end.
pub struct VerifyingReader<R> {
    inner: HashingReader<R>,
    digest: String,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = self.inner.current_digest();
            if actual != self.digest {
                let digest = self.digest.clone();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    DigestError { digest, actual },
                ));
            }
        }
        Ok(n)
    }
}

/// OCI chain ids of a layer stack from its diff ids, bottom first (see [`chain_id`]).
/// containerd names committed layer snapshots by them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        out.push(chain_id(out.last().map(String::as_str), diff));
    }
    out
}

/// The chain id of a layer with diff id `diff_id` on a stack whose top chain id is `parent`:
/// the diff id itself for a base layer, else `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(parent) => fsformat::digest::digest_of(format!("{parent} {diff_id}").as_bytes()),
    }
}
