//! One blob read by byte ranges: the [`ChunkSource`] a remote layer's chunks come from.

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::Reference;

use super::mirror_fill::RangeIgnored;
use super::route::{Attempt, RequestKind};
use oci_spec::image::Descriptor;

use super::{Registry, RegistryError, RemoteImage};
use crate::hosts::Capability;
use crate::source::{ChunkSource, SourceError};

impl Registry {
    /// A blob of `reference`'s repository as a chunk source.
    pub fn blob(&self, reference: &Reference, digest: &str, size: u64) -> RegistryBlob {
        RegistryBlob {
            registry: self.clone(),
            reference: reference.clone(),
            digest: digest.to_string(),
            size,
            last_host: self.last_host(reference, Capability::Pull),
        }
    }

    /// A layer of a resolved image as a chunk source.
    pub fn layer(&self, image: &RemoteImage, layer: &Descriptor) -> RegistryBlob {
        self.blob(&image.reference, layer.digest().as_ref(), layer.size())
    }
}

/// One blob in a registry, read by byte ranges.
#[derive(Clone)]
pub struct RegistryBlob {
    registry: Registry,
    reference: Reference,
    digest: String,
    size: u64,
    /// The host asked last, which has nothing to fall back to (a whole-blob answer from it is
    /// read through); worked out once, not per read.
    last_host: Option<String>,
}

impl RegistryBlob {
    /// Reads exactly `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, RegistryError> {
        let registry = self.reference.resolve_registry().to_string();
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(RegistryError::Invalid {
                registry,
                what: format!("range {offset}+{len} is outside blob {}", self.digest),
            });
        }
        let descriptor = OciDescriptor {
            digest: self.digest.clone(),
            size: self.size as i64,
            ..OciDescriptor::default()
        };
        let what = format!("blob {} bytes {offset}+{len}", self.digest);
        let descriptor = &descriptor;
        let size = self.size;
        let last_host = self.last_host.as_deref();
        self.registry.call(
            Capability::Pull,
            RequestKind::BlobRead {
                digest: &self.digest,
            },
            &self.reference,
            &what,
            |Attempt { client, target, .. }| async move {
                let response = client
                    .pull_blob_stream_partial(&target, descriptor, offset, Some(len as u64))
                    .await?;
                // A registry that ignores Range sends the whole blob: skip to the offset and stop
                // reading once the range is complete, instead of downloading the rest. A mirror
                // doing so is still fetching the blob: ask the next endpoint.
                let (mut stream, mut skip) = match response {
                    BlobResponse::Partial(sized) => (sized.stream, 0u64),
                    BlobResponse::Full(_)
                        if len as u64 != size && Some(target.resolve_registry()) != last_host =>
                    {
                        return Err(RangeIgnored::error());
                    }
                    BlobResponse::Full(sized) => (sized.stream, offset),
                };
                let mut out = Vec::with_capacity(len);
                while out.len() < len {
                    let Some(piece) = stream.next().await else {
                        break;
                    };
                    let piece = piece?;
                    let mut piece = &piece[..];
                    if skip > 0 {
                        let drop = (skip as usize).min(piece.len());
                        piece = &piece[drop..];
                        skip -= drop as u64;
                    }
                    let take = piece.len().min(len - out.len());
                    out.extend_from_slice(&piece[..take]);
                }
                if out.len() != len {
                    return Err(OciDistributionError::IoError(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the registry sent {} of {len} bytes", out.len()),
                    )));
                }
                Ok(out)
            },
        )
    }
}

/// Blob `digest` (`size` bytes) whole, through oci-client (a document read that cannot go
/// out bare); more bytes than `size` are refused while they arrive.
pub(super) async fn read_whole(
    attempt: Attempt,
    digest: &str,
    size: u64,
) -> Result<Vec<u8>, OciDistributionError> {
    let descriptor = OciDescriptor {
        digest: digest.to_string(),
        size: size as i64,
        ..OciDescriptor::default()
    };
    let mut stream = attempt
        .client
        .pull_blob_stream(&attempt.target, &descriptor)
        .await?
        .stream;
    let mut out = Vec::with_capacity(size as usize);
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        if (out.len() + piece.len()) as u64 > size {
            return Err(OciDistributionError::SpecViolationError(format!(
                "blob {digest} has more than the {size} bytes its descriptor gives"
            )));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

impl ChunkSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        self.read(offset, len).map_err(|error| SourceError::Io {
            what: format!("{}@{}", self.reference, self.digest),
            offset,
            len,
            source: std::io::Error::other(error),
        })
    }
}
