//! Key files: generation, loading, splitting and combining.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use fsformat::shares;
use fsformat::PrivateKey;
use sealfs_tools::keyfiles::{load_private, read_share};

/// Writes `text` to a new file with `mode`, refusing to overwrite unless `force`.
fn write_new(path: &Path, text: &str, mode: u32, force: bool) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).with_context(|| {
        if path.exists() && !force {
            format!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            )
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    // An existing file keeps its old mode when truncated; make sure secrets end up private.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}

pub fn keygen(private: &Path, public: &Path, force: bool) -> Result<()> {
    // Both paths are checked before either is written: a failure never leaves a private key
    // behind without its public key.
    if !force {
        for path in [private, public] {
            if path.exists() || path.is_symlink() {
                bail!(
                    "{} already exists; nothing was written (pass --force to overwrite both, or choose other paths)",
                    path.display()
                );
            }
        }
    }
    let key = PrivateKey::generate()?;
    let public_key = key.public();
    let text = format!(
        "# sealfs public key; key id {}\n{public_key}\n",
        public_key.key_id()
    );
    write_new(public, &text, 0o644, force)?;
    if let Err(error) = write_new(private, &key.to_file_text(), 0o600, force) {
        // The public key alone is harmless but useless: take it back.
        let _ = fs::remove_file(public);
        return Err(error);
    }
    eprintln!(
        "key id {}: private key in {}, public key in {}",
        public_key.key_id(),
        private.display(),
        public.display()
    );
    Ok(())
}

pub fn split(threshold: u8, total: u8, private: &Path, outdir: &Path) -> Result<()> {
    let key = load_private(private)?;
    let shares = shares::split(&key, threshold, total)?;
    fs::create_dir_all(outdir).with_context(|| format!("cannot create {}", outdir.display()))?;
    fs::set_permissions(outdir, fs::Permissions::from_mode(0o700))?;
    let key_id = key.public().key_id();
    for share in &shares {
        let path = outdir.join(format!("share-{}-of-{total}.txt", share.number()));
        let text = zeroize::Zeroizing::new(format!(
            "# sealfs key share {} of {total} for key id {key_id}; any {threshold} recover the key\n{}",
            share.number(),
            &**share.to_text()
        ));
        write_new(&path, &text, 0o600, false)?;
    }
    eprintln!(
        "wrote {total} shares of key {key_id} to {} (threshold {threshold})",
        outdir.display()
    );
    Ok(())
}

pub fn combine(paths: &[impl AsRef<Path>], output: Option<&Path>) -> Result<()> {
    let shares = paths
        .iter()
        .map(|p| read_share(p.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let key = shares::combine(&shares).context("combining key shares")?;
    match output {
        Some(path) => {
            write_new(path, &key.to_file_text(), 0o600, false)?;
            eprintln!(
                "recovered key {} into {}",
                key.public().key_id(),
                path.display()
            );
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                bail!("refusing to print a private key to a terminal; pass --output FILE or redirect standard output");
            }
            std::io::stdout().write_all(key.to_file_text().as_bytes())?;
        }
    }
    Ok(())
}
