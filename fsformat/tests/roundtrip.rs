//! Round trips of real tar streams through seal -> open -> read and seal -> unseal, plus every
//! kind of tampering the format must detect.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use fsformat::layout::{EntryKind, FOOTER_LEN};
use fsformat::reader::{ChunkDecoder, SealedLayer, UnverifiedTail};
use fsformat::writer::{seal_layer, SealOptions, SealSummary};
use fsformat::{FormatError, LayerKey};
use sealfs_e2e::noise;

const CHUNK: usize = 64 * 1024;

/// What we expect of each entry after extraction, keyed by path.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Expect {
    kind: &'static str,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
    link: Vec<u8>,
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid + 1);
    h.set_mtime(mtime);
    h.set_size(0);
    h
}

/// A tar with every entry type and metadata the format must keep.
fn rich_tar() -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(T::Directory, 0o755, 0, 1000);
    b.append_data(&mut h, "./", std::io::empty()).unwrap();
    let mut h = header(T::Directory, 0o1777, 0, 1001);
    b.append_data(&mut h, "tmp/", std::io::empty()).unwrap();
    let mut h = header(T::Directory, 0o750, 5, 1002);
    b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
    for (path, data, mode) in [
        ("etc/empty", Vec::new(), 0o600),
        ("etc/small", b"hello sealfs\n".to_vec(), 0o644),
        ("etc/small-copy", b"hello sealfs\n".to_vec(), 0o644),
        ("bin/big", noise(1, 3 * CHUNK + 1234), 0o4755),
        ("bin/big-copy", noise(1, 3 * CHUNK + 1234), 0o755),
        ("bin/exact", vec![b'z'; CHUNK], 0o755),
        ("usr/share/text", b"compressible ".repeat(20_000), 0o644),
    ] {
        let mut h = header(T::Regular, mode, 3, 1003);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    // xattrs (security.capability included) and a sub-second mtime, as PAX records.
    b.append_pax_extensions([
        (
            "SCHILY.xattr.security.capability",
            &b"\x01\x00\x00\x02\x00\x20\x00\x00"[..],
        ),
        ("SCHILY.xattr.user.note", &b"a\0b"[..]),
        ("mtime", &b"1004.25"[..]),
    ])
    .unwrap();
    let mut h = header(T::Regular, 0o755, 0, 1004);
    h.set_size(4);
    b.append_data(&mut h, "bin/ping", &b"ping"[..]).unwrap();
    let mut h = header(T::Symlink, 0o777, 0, 1005);
    b.append_link(&mut h, "bin/sh", "busybox").unwrap();
    let mut h = header(T::Link, 0o755, 0, 1005);
    b.append_link(&mut h, "bin/ping6", "bin/ping").unwrap();
    let mut h = header(T::Char, 0o666, 0, 1006);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", std::io::empty()).unwrap();
    let mut h = header(T::Block, 0o660, 0, 1006);
    h.set_device_major(8).unwrap();
    h.set_device_minor(1).unwrap();
    b.append_data(&mut h, "dev/sda1", std::io::empty()).unwrap();
    let mut h = header(T::Fifo, 0o644, 0, 1007);
    b.append_data(&mut h, "run/initctl", std::io::empty())
        .unwrap();
    // OCI whiteout and opaque directory.
    let mut h = header(T::Regular, 0o644, 0, 1008);
    b.append_data(&mut h, "etc/.wh.gone", std::io::empty())
        .unwrap();
    let mut h = header(T::Directory, 0o755, 0, 1009);
    b.append_data(&mut h, "var/cache/", std::io::empty())
        .unwrap();
    let mut h = header(T::Regular, 0o644, 0, 1009);
    b.append_data(&mut h, "var/cache/.wh..wh..opq", std::io::empty())
        .unwrap();
    // A long path (GNU long name) deep in implicit directories.
    let long = format!("deep/{}/file", "d".repeat(150));
    let mut h = header(T::Regular, 0o644, 0, 1010);
    h.set_size(2);
    b.append_data(&mut h, long, &b"ok"[..]).unwrap();
    b.into_inner().unwrap()
}

/// Reads a tar into path -> Expect (PAX xattrs and mtime included).
fn tar_entries(bytes: &[u8]) -> BTreeMap<String, Expect> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let mut xattrs = BTreeMap::new();
        let mut mtime = entry.header().mtime().unwrap();
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for record in pax {
                let record = record.unwrap();
                let key = record.key().unwrap();
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), record.value_bytes().to_vec());
                }
                if key == "mtime" {
                    // Compare to the millisecond; both sides print it canonically.
                    let v: f64 = record.value().unwrap().parse().unwrap();
                    mtime = (v * 1000.0).round() as u64;
                }
            }
        }
        if mtime < 100_000 {
            mtime *= 1000;
        }
        let h = entry.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Regular => "file",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            other => panic!("unexpected {other:?}"),
        };
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        let dev = if matches!(kind, "char" | "block") {
            (
                h.device_major().unwrap().unwrap_or(0),
                h.device_minor().unwrap().unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let link = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        out.insert(
            path,
            Expect {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime,
                data,
                link,
                dev,
                xattrs,
            },
        );
    }
    out
}

fn seal(tar: &[u8], key: &LayerKey) -> (Vec<u8>, SealSummary) {
    let mut blob = Vec::new();
    let summary = seal_layer(
        tar,
        &mut blob,
        key,
        &SealOptions::with_chunk_size(CHUNK as u64).unwrap(),
    )
    .unwrap();
    (blob, summary)
}

fn open(blob: &[u8], key: &LayerKey, digest: &str) -> fsformat::Result<SealedLayer> {
    UnverifiedTail::read(blob, blob.len() as u64)?.open(key, digest)
}

fn read_all(layer: &SealedLayer, blob: &[u8], path: &str) -> fsformat::Result<Vec<u8>> {
    let number = layer
        .lookup(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"));
    let size = match &layer.data_entry(number).unwrap().kind {
        EntryKind::File { size, .. } => *size as usize,
        other => panic!("{path} is {other:?}"),
    };
    let mut buf = vec![0u8; size];
    let n = layer.read_file(blob, number, 0, &mut buf, &mut ChunkDecoder::new().unwrap())?;
    assert_eq!(n, size);
    Ok(buf)
}

#[test]
fn every_entry_type_survives_seal_and_unseal() {
    let tar = rich_tar();
    let key = LayerKey::generate().unwrap();
    let (blob, summary) = seal(&tar, &key);
    assert_eq!(summary.blob_size, blob.len() as u64);
    // Duplicate big file and duplicate small file are stored once.
    assert!(
        summary.data_bytes < summary.file_bytes - (3 * CHUNK as u64),
        "{summary:?}"
    );

    let layer = open(&blob, &key, &summary.tail_digest).unwrap();
    let entry = |p: &str| {
        layer
            .entry(layer.lookup(p.as_bytes()).unwrap())
            .unwrap()
            .clone()
    };
    assert_eq!(entry("etc/gone").kind, EntryKind::Whiteout);
    assert_eq!(
        entry("var/cache").kind,
        EntryKind::Dir {
            opaque: true,
            implicit: false
        }
    );
    assert_eq!(
        entry("bin").kind,
        EntryKind::Dir {
            opaque: false,
            implicit: true
        }
    );
    assert_eq!(
        entry("etc").kind,
        EntryKind::Dir {
            opaque: false,
            implicit: false
        }
    );
    assert!(layer.lookup(b"var/cache/.wh..wh..opq").is_none());
    assert_eq!(entry("bin/ping").mtime.nanos, 250_000_000);
    assert_eq!(entry("tmp").mode, 0o1777);
    assert!(matches!(
        entry("bin/ping6").kind,
        EntryKind::HardLink { .. }
    ));
    assert_eq!(read_all(&layer, &blob, "bin/ping6").unwrap(), b"ping");
    assert_eq!(
        read_all(&layer, &blob, "bin/big").unwrap(),
        noise(1, 3 * CHUNK + 1234)
    );

    // Reads at arbitrary offsets and lengths, across chunk boundaries.
    let big = noise(1, 3 * CHUNK + 1234);
    let number = layer.lookup(b"bin/big").unwrap();
    let mut decoder = ChunkDecoder::new().unwrap();
    for (offset, len) in [
        (0usize, 1usize),
        (CHUNK - 3, 10),
        (2 * CHUNK + 5, CHUNK + 2000),
        (big.len() - 1, 100),
    ] {
        let mut buf = vec![0u8; len];
        let n = layer
            .read_file(&blob, number, offset as u64, &mut buf, &mut decoder)
            .unwrap();
        let want = &big[offset..(offset + len).min(big.len())];
        assert_eq!(&buf[..n], want, "offset {offset} len {len}");
    }

    // Unseal and compare every field of every entry with the original tar.
    let unsealed = fsformat::unseal::unseal_layer(&layer, &blob[..], Vec::new()).unwrap();
    let (original, round) = (tar_entries(&tar), tar_entries(&unsealed));
    // Directories the tar left implicit come back explicit; nothing else is added.
    for (path, got) in &round {
        assert!(
            original.contains_key(path) || got.kind == "dir",
            "unexpected {path}"
        );
    }
    for (path, want) in &original {
        let got = round.get(path).unwrap_or_else(|| {
            panic!(
                "{path:?} missing; have {:?}",
                round.keys().take(3).collect::<Vec<_>>()
            )
        });
        if path.ends_with(".wh.gone") || path.ends_with(".wh..wh..opq") {
            assert_eq!(got.kind, "file", "{path}");
            continue;
        }
        assert_eq!(got, want, "{path}");
    }
    // Sealing the unsealed tar gives the same tree.
    let (blob2, summary2) = seal(&unsealed, &key);
    let layer2 = open(&blob2, &key, &summary2.tail_digest).unwrap();
    let strip = |l: &SealedLayer| {
        l.index()
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.mode, e.xattrs.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&layer), strip(&layer2));
}

#[test]
fn sealing_on_many_threads_gives_the_layer_one_thread_gives() {
    // Many chunks (a big file, small files packed together, duplicates) so the workers finish
    // out of order.
    let mut tar = rich_tar();
    tar.truncate(tar.len() - 1024); // reopen the archive: drop its end-of-archive blocks
    let mut builder = tar::Builder::new(tar);
    let big = noise(77, 40 * CHUNK + 123);
    builder
        .append_data(
            &mut sealfs_e2e::regular_header(big.len() as u64),
            "big/noise",
            &big[..],
        )
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let key = LayerKey::generate().unwrap();
    let sealed: Vec<_> = [1, 2, 5]
        .into_iter()
        .map(|threads| {
            let options = SealOptions {
                threads,
                ..SealOptions::with_chunk_size(CHUNK as u64).unwrap()
            };
            let mut blob = Vec::new();
            let summary = seal_layer(&tar[..], &mut blob, &key, &options).unwrap();
            let layer = open(&blob, &key, &summary.tail_digest).unwrap();
            assert_eq!(read_all(&layer, &blob, "big/noise").unwrap(), big);
            let unsealed = fsformat::unseal::unseal_layer(&layer, &blob[..], Vec::new()).unwrap();
            (blob.len(), layer.index().clone(), unsealed)
        })
        .collect();
    assert!(
        sealed[0].1.chunks.len() > 40,
        "{} chunks",
        sealed[0].1.chunks.len()
    );
    for other in &sealed[1..] {
        // Layer ids (and so the sealed bytes) differ per seal; sizes, the index and what
        // unsealing gives back do not.
        assert_eq!(other.0, sealed[0].0);
        assert_eq!(other.1, sealed[0].1);
        assert_eq!(other.2, sealed[0].2);
    }
}

#[test]
fn packs_stay_within_the_pack_size_and_larger_pieces_get_a_chunk_of_their_own() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    for n in 0..20u64 {
        files.push((format!("small/{n:02}"), noise(n, 10 << 10)));
    }
    files.push(("medium".to_string(), noise(99, 100 << 10)));
    for (name, data) in &files {
        let mut header = sealfs_e2e::regular_header(data.len() as u64);
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let key = LayerKey::generate().unwrap();
    let options = SealOptions {
        pack_size_log2: 16,
        ..SealOptions::with_chunk_size(256 << 10).unwrap()
    };
    let mut blob = Vec::new();
    let summary = seal_layer(&tar[..], &mut blob, &key, &options).unwrap();
    let layer = open(&blob, &key, &summary.tail_digest).unwrap();
    let chunk_of = |path: &str| match &layer
        .entry(layer.lookup(path.as_bytes()).unwrap())
        .unwrap()
        .kind
    {
        EntryKind::File { extents, .. } => {
            assert_eq!(extents.len(), 1, "{path}");
            extents[0]
        }
        other => panic!("{path} is {other:?}"),
    };
    let medium = chunk_of("medium");
    assert_eq!(
        (medium.offset, medium.len),
        (0, 100 << 10),
        "a chunk of its own"
    );
    for (name, data) in &files {
        let extent = chunk_of(name);
        if name != "medium" {
            assert_ne!(extent.chunk, medium.chunk, "{name} is packed");
            let plain = layer.index().chunks[extent.chunk as usize].plain_len;
            assert!(plain <= 64 << 10, "a pack of {plain} bytes");
        }
        assert_eq!(&read_all(&layer, &blob, name).unwrap(), data);
    }
    // Six 10 KiB files fit a 64 KiB pack: 20 files take 4 packs, plus the medium file's chunk.
    assert_eq!(layer.index().chunks.len(), 5);

    let too_big = SealOptions {
        pack_size_log2: 19,
        ..SealOptions::with_chunk_size(256 << 10).unwrap()
    };
    let error = seal_layer(&tar[..], &mut Vec::new(), &key, &too_big).unwrap_err();
    assert!(error.to_string().contains("pack size"), "{error}");
}

#[test]
fn gzip_and_zstd_inputs_give_the_same_tree_and_diff_id() {
    let tar = rich_tar();
    let key = LayerKey::generate().unwrap();
    let (_, plain) = seal(&tar, &key);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let (_, gzip) = seal(&gz.finish().unwrap(), &key);
    let (_, zst) = seal(&zstd::encode_all(&tar[..], 3).unwrap(), &key);
    for other in [&gzip, &zst] {
        assert_eq!(other.input_diff_id, plain.input_diff_id);
        assert_eq!(other.entry_count, plain.entry_count);
        assert_eq!(other.data_bytes, plain.data_bytes);
    }
    use sha2::Digest;
    assert_eq!(
        plain.input_diff_id,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)))
    );
}

#[test]
fn every_tail_byte_is_protected() {
    let key = LayerKey::generate().unwrap();
    let (blob, summary) = seal(&rich_tar(), &key);
    let tail_start = blob.len() - summary.tail_size as usize;
    for at in tail_start..blob.len() {
        let mut broken = blob.clone();
        broken[at] ^= 0x01;
        // Pinned: the digest catches it before any key is used.
        match open(&broken, &key, &summary.tail_digest) {
            Err(FormatError::TailDigestMismatch { .. } | FormatError::BadFooter(_)) => {}
            other => panic!("byte {at}: {other:?}"),
        }
        // Unpinned: authentication still catches it, as damage (never as success).
        let unpinned = UnverifiedTail::read(&broken[..], broken.len() as u64)
            .and_then(|t| t.open_unpinned(&key));
        match unpinned {
            Err(FormatError::IndexAuth | FormatError::BadFooter(_)) => {}
            // The commitment itself or the layer id changed: indistinguishable from a wrong key.
            Err(FormatError::WrongKey) if at >= blob.len() - FOOTER_LEN + 40 => {}
            other => panic!("byte {at} (unpinned): {other:?}"),
        }
    }
    // Truncation anywhere is caught.
    for cut in [1, 50, FOOTER_LEN, summary.tail_size as usize + 10] {
        let short = &blob[..blob.len() - cut];
        assert!(
            open(short, &key, &summary.tail_digest).is_err(),
            "cut {cut}"
        );
    }
}

#[test]
fn tampered_or_swapped_chunks_fail_only_their_reads() {
    let key = LayerKey::generate().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, seed) in [("a", 10), ("b", 11), ("c", 12)] {
        let data = noise(seed, CHUNK);
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 1);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let (blob, summary) = seal(&b.into_inner().unwrap(), &key);
    let layer = open(&blob, &key, &summary.tail_digest).unwrap();
    let (a_off, a_len) = layer.chunk_range(0).unwrap();
    let (b_off, b_len) = layer.chunk_range(1).unwrap();
    assert_eq!(
        a_len, b_len,
        "incompressible chunks are stored at equal length"
    );

    for at in [
        a_off as usize,
        a_off as usize + 777,
        (a_off + u64::from(a_len)) as usize - 1,
    ] {
        let mut broken = blob.clone();
        broken[at] ^= 0x80;
        assert!(matches!(
            read_all(&layer, &broken, "a"),
            Err(FormatError::ChunkAuth { chunk: 0 })
        ));
        assert_eq!(read_all(&layer, &broken, "b").unwrap(), noise(11, CHUNK));
    }
    // Swap chunks 0 and 1: both must fail, nothing is released.
    let mut swapped = blob.clone();
    let (a, b) = (a_off as usize, b_off as usize);
    let chunk_a = blob[a..a + a_len as usize].to_vec();
    swapped.copy_within(b..b + b_len as usize, a);
    swapped[b..b + a_len as usize].copy_from_slice(&chunk_a);
    assert!(matches!(
        read_all(&layer, &swapped, "a"),
        Err(FormatError::ChunkAuth { chunk: 0 })
    ));
    assert!(matches!(
        read_all(&layer, &swapped, "b"),
        Err(FormatError::ChunkAuth { chunk: 1 })
    ));
    assert_eq!(read_all(&layer, &swapped, "c").unwrap(), noise(12, CHUNK));
}

#[test]
fn wrong_key_is_told_apart_from_damage() {
    let key = LayerKey::generate().unwrap();
    let (blob, summary) = seal(&rich_tar(), &key);
    let wrong = LayerKey::generate().unwrap();
    assert!(matches!(
        open(&blob, &wrong, &summary.tail_digest),
        Err(FormatError::WrongKey)
    ));
    let mut damaged = blob.clone();
    let index_byte = blob.len() - summary.tail_size as usize + 3;
    damaged[index_byte] ^= 4;
    let err = UnverifiedTail::read(&damaged[..], damaged.len() as u64)
        .unwrap()
        .open_unpinned(&key)
        .unwrap_err();
    assert!(matches!(err, FormatError::IndexAuth), "{err:?}");
}

fn raw_entry(path: &[u8], kind: u8, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        old.linkname[..link.len()].copy_from_slice(link);
        old.linkflag[0] = kind;
    }
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn seal_error(tar: &[u8]) -> String {
    let mut out = Vec::new();
    match seal_layer(
        tar,
        &mut out,
        &LayerKey::generate().unwrap(),
        &SealOptions::default(),
    ) {
        Err(e @ FormatError::BadTar { .. }) => e.to_string(),
        other => panic!("expected a tar error, got {other:?}"),
    }
}

#[test]
fn hostile_tars_are_rejected_naming_the_entry() {
    let end = vec![0u8; 1024];
    let err = seal_error(&[raw_entry(b"../etc/passwd", b'0', 0, b""), end.clone()].concat());
    assert!(
        err.contains("../etc/passwd") && err.contains("escapes"),
        "{err}"
    );
    let err = seal_error(&[raw_entry(b"a/../../x", b'0', 0, b""), end.clone()].concat());
    assert!(err.contains("escapes"), "{err}");
    let err = seal_error(
        &[
            raw_entry(b"x", b'0', 0, b""),
            raw_entry(b"y", b'1', 0, b"/etc/shadow"),
            end.clone(),
        ]
        .concat(),
    );
    assert!(err.contains("\"y\"") && err.contains("absolute"), "{err}");
    let err = seal_error(&[raw_entry(b"y", b'1', 0, b"nowhere"), end.clone()].concat());
    assert!(err.contains("not an earlier entry"), "{err}");
    let err = seal_error(&[raw_entry(b"huge", b'0', 1 << 60, b""), end.clone()].concat());
    assert!(err.contains("huge") && err.contains("1 TiB"), "{err}");
    let mut truncated = raw_entry(b"cut", b'0', 10_000, b"");
    truncated.extend_from_slice(&[7u8; 3000]);
    let err = seal_error(&truncated);
    assert!(err.contains("cut") && err.contains("truncated"), "{err}");
    let mut bad_checksum = raw_entry(b"ok", b'0', 0, b"");
    bad_checksum[148] ^= 1;
    let err = seal_error(&[raw_entry(b"first", b'0', 0, b""), bad_checksum, end].concat());
    assert!(err.contains("after first"), "{err}");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Any set of files with any sizes reads back byte for byte.
        #[test]
        fn files_read_back(files in proptest::collection::btree_map("[a-z]{1,12}", (0usize..200_000, any::<u64>()), 1..12)) {
            let mut b = tar::Builder::new(Vec::new());
            for (name, (size, seed)) in &files {
                // Half compressible, half not.
                let data = if seed % 2 == 0 { noise(*seed, *size) } else { vec![(*seed % 251) as u8; *size] };
                let mut h = header(tar::EntryType::Regular, 0o644, 0, 1);
                h.set_size(*size as u64);
                b.append_data(&mut h, name, &data[..]).unwrap();
            }
            let key = LayerKey::generate().unwrap();
            let (blob, summary) = seal(&b.into_inner().unwrap(), &key);
            let layer = open(&blob, &key, &summary.tail_digest).unwrap();
            for (name, (size, seed)) in &files {
                let want = if seed % 2 == 0 { noise(*seed, *size) } else { vec![(*seed % 251) as u8; *size] };
                prop_assert!(read_all(&layer, &blob, name).unwrap() == want, "{} differs", name);
            }
        }
    }
}

/// The chunks holding a file's data.
fn chunks_of(layer: &SealedLayer, path: &str) -> Vec<u32> {
    let number = layer.lookup(path.as_bytes()).unwrap();
    match &layer.data_entry(number).unwrap().kind {
        EntryKind::File { extents, .. } => extents.iter().map(|e| e.chunk).collect(),
        other => panic!("{path} is {other:?}"),
    }
}

#[test]
fn a_prefetch_list_packs_listed_files_together_and_orders_their_chunks() {
    // 200 small files of 2 KiB fill ~6 packs in tar order; the list names four of them spread
    // over the layer, one large file (two whole chunks and a tail) and paths it lacks.
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 1);
        h.set_size(data.len() as u64);
        builder.append_data(&mut h, path, data).unwrap();
    };
    for n in 0..200u64 {
        add(&format!("small/{n:03}"), &noise(n, 2048));
    }
    add("big", &noise(999, 2 * CHUNK + 100));
    let tar = builder.into_inner().unwrap();
    let listed = [
        "small/150",
        "/big",
        "small/007",
        "missing/file",
        "small/090",
        "small/199",
    ];
    let mut options = SealOptions::with_chunk_size(CHUNK as u64).unwrap();
    options
        .set_prefetch_paths(listed.iter().map(|p| p.as_bytes()))
        .unwrap();
    let key = LayerKey::generate().unwrap();
    let mut blob = Vec::new();
    let summary = seal_layer(&tar[..], &mut blob, &key, &options).unwrap();
    let layer = open(&blob, &key, &summary.tail_digest).unwrap();

    // The four small files share one pack that no unlisted file is in.
    let pack = chunks_of(&layer, "small/150");
    assert_eq!(pack.len(), 1);
    for path in ["small/007", "small/090", "small/199"] {
        assert_eq!(chunks_of(&layer, path), pack, "{path}");
    }
    for n in (0..200).filter(|n| ![7, 90, 150, 199].contains(n)) {
        assert_ne!(chunks_of(&layer, &format!("small/{n:03}")), pack);
    }
    // Prefetch order: the first listed file's chunk, then big's chunks (its tail is in the
    // same listed pack, already named), nothing for the missing path.
    let big = chunks_of(&layer, "big");
    assert_eq!(big.len(), 3);
    assert_eq!(
        big[2], pack[0],
        "big's tail is packed with the listed files"
    );
    assert_eq!(layer.index().prefetch, vec![pack[0], big[0], big[1]]);
    assert_eq!(summary.prefetch_chunks, 3);
    // The files still read back intact.
    assert_eq!(
        read_all(&layer, &blob, "small/090").unwrap(),
        noise(90, 2048)
    );
    assert_eq!(
        read_all(&layer, &blob, "big").unwrap(),
        noise(999, 2 * CHUNK + 100)
    );

    // A path that leaves the root is refused.
    let error = SealOptions::default()
        .set_prefetch_paths([&b"../etc/passwd"[..]])
        .unwrap_err();
    assert!(
        error.to_string().contains("leaves the layer root"),
        "{error}"
    );
}
