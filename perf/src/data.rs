//! Test layers for the benchmarks: real files from the machine, or many generated small files.

use std::path::PathBuf;

use anyhow::Result;

/// A layer tar of the regular files under `root` (sorted walk), up to `limit` bytes of file
/// data. Returns the tar, the file bytes and the file count.
pub fn tar_from_dir(root: &PathBuf, limit: u64) -> Result<(Vec<u8>, u64, usize)> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let (mut total, mut files) = (0u64, 0usize);
    let mut stack = vec![root.clone()];
    'walk: while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let Ok(data) = std::fs::read(&path) else {
                    continue;
                };
                let name = path.strip_prefix(root).unwrap_or(&path);
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, name, &data[..])?;
                total += data.len() as u64;
                files += 1;
                if total >= limit {
                    break 'walk;
                }
            }
        }
    }
    Ok((builder.into_inner()?, total, files))
}

/// A layer tar of `count` small files (100-2000 bytes each, seeded) in directories of 1000.
pub fn tar_of_small_files(count: usize) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for n in 0..count {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = 100 + (state % 1900) as usize;
        let body: Vec<u8> = format!("file {n} ")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(len)
            .collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(len as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder.append_data(&mut header, format!("d{:03}/f{n:06}", n / 1000), &body[..])?;
    }
    Ok(builder.into_inner()?)
}
