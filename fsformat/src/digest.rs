//! SHA-256 digests in OCI spelling (`sha256:<hex>`), computed on the way through a reader or
//! writer, so a stream is hashed exactly once while it is being used.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Formats a finished SHA-256 as an OCI digest.
fn oci_digest(hash: Sha256) -> String {
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// The OCI digest of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    oci_digest(Sha256::new_with_prefix(bytes))
}

/// Hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// The digest of what was read so far, without ending the stream.
    pub fn current_digest(&self) -> String {
        oci_digest(self.hash.clone())
    }

    /// The digest and length of what was read so far.
    pub fn finish(self) -> (String, u64) {
        (oci_digest(self.hash), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The inner writer, the digest and the length of what was written.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, oci_digest(self.hash), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
