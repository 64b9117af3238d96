//! Layer keys a keyprovider unwrapped, kept across daemon restarts by the session keeper.
//!
//! A layer opened with a key file is opened again from that file after a restart. A layer a
//! keyprovider opened (a KMS, an attestation agent) needs the provider again, and while it is
//! down, the containers running on that layer would fail their reads: a restart would break
//! them. So the keys providers gave for mounted layers are kept where the FUSE session is
//! kept, by the session keeper, as one memory file (`memfd`) it holds like the session's
//! descriptor; the next daemon takes it and reopens those layers without asking the provider.
//!
//! The file lives in memory only (no path; only root can reach it, through the keeper's or
//! the daemon's descriptors); like the daemon's own memory it can be swapped out on a node
//! with swap (`docs/semantics.md`). It holds the keys of mounted layers only: a removed
//! snapshot's key is dropped and the file rewritten, the old one overwritten with zeros; a
//! deliberate shutdown (`containerd-sealfs-grpc release`) lets it go. A key read back is only
//! used for the snapshot and layer it was kept for, and every layer's index is authenticated
//! with its key (key commitment), so a wrong or damaged entry fails to open, never opens
//! wrongly; it is then dropped, and the next attempt asks the provider. Cost: about 150 bytes
//! per provider-opened layer, and the file is rewritten whole at each change (a mount or
//! removal of a provider-opened layer), which is linear in those layers.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use fsformat::crypto::LayerKey;
use zeroize::Zeroizing;

/// The name the keys are kept under by the session keeper.
pub const KEPT_KEYS: &str = "layer-keys";

const MAGIC: &[u8] = b"sealfs kept layer keys v1\n";
const KEY_LEN: usize = 32;
/// The largest file read back: far above what a node's layers need (150 bytes each).
const MAX_FILE: u64 = 16 << 20;

/// One kept key: the layer it opens, what unwrapped it (`provider:NAME`), the key.
struct KeptKey {
    digest: String,
    opened_by: String,
    key: LayerKey,
}

/// The keys kept, by snapshot id.
#[derive(Default)]
pub struct KeptKeys {
    keys: Mutex<BTreeMap<u64, KeptKey>>,
}

impl KeptKeys {
    /// Nothing kept.
    pub fn new() -> Self {
        KeptKeys::default()
    }

    /// Replaces these keys with those in a file an earlier daemon kept; how many it holds. A
    /// file that does not parse is reported and changes nothing: its layers are then opened
    /// as if nothing had been kept.
    pub fn load(&self, file: &OwnedFd) -> io::Result<usize> {
        let file = std::fs::File::from(file.try_clone()?);
        let len = file.metadata()?.len();
        if len > MAX_FILE {
            return Err(invalid(format!("{len} bytes, more than {MAX_FILE}")));
        }
        let mut bytes = Zeroizing::new(vec![0u8; len as usize]);
        file.read_exact_at(&mut bytes, 0)?;
        let keys = parse(&bytes)?;
        let count = keys.len();
        *self.keys.lock().expect("kept keys lock") = keys;
        Ok(count)
    }

    /// The key kept for snapshot `id` if it opens layer `digest`, and what unwrapped it.
    pub fn get(&self, id: u64, digest: &str) -> Option<(LayerKey, String)> {
        let keys = self.keys.lock().expect("kept keys lock");
        keys.get(&id)
            .filter(|kept| kept.digest == digest)
            .map(|kept| (kept.key.clone(), kept.opened_by.clone()))
    }

    /// Keeps `key` for snapshot `id`; whether anything changed.
    pub fn insert(&self, id: u64, digest: &str, opened_by: &str, key: &LayerKey) -> bool {
        let mut keys = self.keys.lock().expect("kept keys lock");
        if keys
            .get(&id)
            .is_some_and(|kept| kept.digest == digest && kept.opened_by == opened_by)
        {
            return false;
        }
        keys.insert(
            id,
            KeptKey {
                digest: digest.to_string(),
                opened_by: opened_by.to_string(),
                key: key.clone(),
            },
        );
        true
    }

    /// Drops the key of snapshot `id`; whether one was kept.
    pub fn remove(&self, id: u64) -> bool {
        self.keys
            .lock()
            .expect("kept keys lock")
            .remove(&id)
            .is_some()
    }

    /// How many keys are kept.
    pub fn len(&self) -> usize {
        self.keys.lock().expect("kept keys lock").len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new memory file holding every kept key, for the keeper, and how many it holds.
    pub fn to_file(&self) -> io::Result<(OwnedFd, usize)> {
        let (bytes, count) = {
            let keys = self.keys.lock().expect("kept keys lock");
            (serialize(&keys), keys.len())
        };
        let name = c"sealfs-kept-layer-keys";
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone()?).write_all_at(&bytes, 0)?;
        Ok((fd, count))
    }
}

/// Overwrites a kept-keys file no one will read again with zeros, so its pages do not go
/// back to the kernel holding keys.
pub fn wipe(file: &OwnedFd) {
    if let Ok(clone) = file.try_clone() {
        let file = std::fs::File::from(clone);
        if let Ok(meta) = file.metadata() {
            let _ = file.write_all_at(&vec![0u8; meta.len() as usize], 0);
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("kept layer keys: {what}"),
    )
}

fn serialize(keys: &BTreeMap<u64, KeptKey>) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(MAGIC.len() + 4 + keys.len() * 150));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for (id, kept) in keys {
        out.extend_from_slice(&id.to_le_bytes());
        for text in [&kept.digest, &kept.opened_by] {
            // Digests and provider labels are short (checked when they were made).
            let text = &text.as_bytes()[..text.len().min(u8::MAX as usize)];
            out.push(text.len() as u8);
            out.extend_from_slice(text);
        }
        out.extend_from_slice(kept.key.expose_bytes());
    }
    out
}

fn parse(bytes: &[u8]) -> io::Result<BTreeMap<u64, KeptKey>> {
    let short = || invalid("the file ends early".into());
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| invalid("not a kept-keys file".into()))?;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        if rest.len() < n {
            return Err(short());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let mut keys = BTreeMap::new();
    for _ in 0..count {
        let id = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let mut texts = [String::new(), String::new()];
        for text in &mut texts {
            let len = take(1)?[0] as usize;
            *text = std::str::from_utf8(take(len)?)
                .map_err(|_| invalid("a name is not text".into()))?
                .to_string();
        }
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(take(KEY_LEN)?);
        let key = LayerKey::from_bytes(key);
        let [digest, opened_by] = texts;
        keys.insert(
            id,
            KeptKey {
                digest,
                opened_by,
                key,
            },
        );
    }
    if !rest.is_empty() {
        return Err(invalid("bytes after the last key".into()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> LayerKey {
        LayerKey::from_bytes([byte; KEY_LEN])
    }

    #[test]
    fn kept_keys_come_back_from_their_file_for_their_snapshot_and_layer_only() {
        let kept = KeptKeys::new();
        assert!(kept.insert(7, "sha256:aa", "provider:kms", &key(1)));
        assert!(!kept.insert(7, "sha256:aa", "provider:kms", &key(1)));
        assert!(kept.insert(9, "sha256:bb", "provider:attestation", &key(2)));
        let (file, _) = kept.to_file().unwrap();
        let back = KeptKeys::new();
        assert_eq!(back.load(&file).unwrap(), 2);
        assert_eq!(back.len(), 2);
        let (found, by) = back.get(7, "sha256:aa").unwrap();
        assert_eq!(found.expose_bytes(), key(1).expose_bytes());
        assert_eq!(by, "provider:kms");
        assert!(back.get(7, "sha256:bb").is_none(), "another layer");
        assert!(back.get(8, "sha256:aa").is_none(), "another snapshot");
        assert!(back.remove(9));
        assert!(!back.remove(9));
        assert_eq!(KeptKeys::new().load(&back.to_file().unwrap().0).unwrap(), 1);

        wipe(&file);
        assert!(
            KeptKeys::new().load(&file).is_err(),
            "a wiped file holds nothing"
        );
    }

    #[test]
    fn damaged_files_are_refused() {
        let kept = KeptKeys::new();
        kept.insert(1, "sha256:aa", "provider:kms", &key(3));
        let (file, _) = kept.to_file().unwrap();
        let whole = {
            let file = std::fs::File::from(file.try_clone().unwrap());
            let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
            file.read_exact_at(&mut bytes, 0).unwrap();
            bytes
        };
        for cut in [0, MAGIC.len(), MAGIC.len() + 4, whole.len() - 1] {
            assert!(parse(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = whole.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
        // A count far beyond the bytes ends early instead of allocating for it.
        let mut huge = whole.clone();
        huge[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&huge).is_err());
    }
}
