//! Helpers shared by the test suites of every crate (and, with the snapshotter, the end-to-end
//! tests against containerd, the registry and FUSE that will live in `tests/tests/`).

pub mod containerd;
pub mod keyprovider;
pub mod log_watch;
pub mod registry;
pub mod sealfs;
pub mod tls;
pub mod token_issuer;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Detaches every mount at or below `dir`, deepest first (lazily: a busy mount goes when its
/// last user does).
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dir = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = std::process::Command::new("umount")
            .args(["-l", point])
            .status();
    }
}

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

/// Everything observable about a tree: type, mode, owner, size, mtime, device, link, content
/// hash and xattrs of every path.
pub fn snapshot_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mut desc = format!(
                "mode={:o} uid={} gid={} mtime={}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime()
            );
            let ft = meta.file_type();
            if ft.is_file() {
                desc += &format!(
                    " size={} sha={} nlink={}",
                    meta.len(),
                    hex::encode(Sha256::digest(fs::read(&path).unwrap())),
                    meta.nlink()
                );
            } else if ft.is_symlink() {
                desc += &format!(" link={}", fs::read_link(&path).unwrap().display());
            } else if ft.is_dir() {
                stack.push(path.clone());
            } else {
                desc += &format!(" rdev={}", meta.rdev());
            }
            let mut names: Vec<_> = xattr::list(&path).map(|l| l.collect()).unwrap_or_default();
            names.sort();
            for name in names {
                let value = xattr::get(&path, &name).ok().flatten().unwrap_or_default();
                desc += &format!(" xattr:{}={}", name.to_string_lossy(), hex::encode(value));
            }
            out.insert(rel, desc);
        }
    }
    out
}

/// Compares two tree snapshots, reporting only the paths that differ.
pub fn assert_same_tree(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) {
    let keys: std::collections::BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| format!("{k}:\n  want {:?}\n  got  {:?}", want.get(k), got.get(k)))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} path(s) differ:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
