//! Helpers shared by the test suites of every crate (and, with the snapshotter, the end-to-end
//! tests against containerd, the registry and FUSE that will live in `tests/tests/`).

/// Deterministic, incompressible bytes from a seed (xorshift64): test data that neither zstd
/// nor deduplication can shrink, identical on every run.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A complete header for a regular file of `size` bytes, mode 0644, owned by root, mtime 0.
/// (The `tar` crate leaves numeric fields empty unless they are set, which strict readers
/// refuse.)
pub fn regular_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    header
}
