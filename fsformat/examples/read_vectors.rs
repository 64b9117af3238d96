//! Writes the reader's negative vectors (`tests/vectors/read/`, see the README there): one
//! sealed blob per rule a reader MUST enforce, each made from the same valid layer by the
//! smallest change that breaks that rule alone, with a `.expect` file naming the stage at
//! which a reader must refuse it and the error class.
//!
//! Usage: `cargo run -p fsformat --example read_vectors -- fsformat/tests/vectors/read`
//!
//! Each run seals with a fresh random layer id, so it writes other bytes (and digests) than
//! the committed files, which are one run's output: the vectors are fixed, the program says
//! how they were made.

use std::fmt::Write as _;
use std::path::Path;

use fsformat::layout::FOOTER_LEN;
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;
use sha2::{Digest, Sha256};

/// The layer key of every vector; `wrong_key` is opened with [`WRONG_KEY`].
const KEY: [u8; 32] = [7; 32];
const WRONG_KEY: [u8; 32] = [8; 32];
/// 64 KiB chunks: the two 64 KiB files below are one chunk each; one byte repeated, they
/// compress to a few bytes each, of equal sealed length (so they can be swapped), and keep
/// the vectors small.
const CHUNK: u64 = 64 << 10;

fn file_a() -> Vec<u8> {
    vec![b'a'; CHUNK as usize]
}

fn file_b() -> Vec<u8> {
    vec![b'b'; CHUNK as usize]
}

fn layer_tar() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, data).unwrap();
    };
    add("a", &file_a());
    add("b", &file_b());
    add("etc/motd", b"hello, sealfs\n");
    tar.into_inner().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Vector {
    name: &'static str,
    /// What the rule says, for the README table and the `.expect` file.
    rule: &'static str,
    blob: Vec<u8>,
    /// The tail length and digest a descriptor pins (of the valid blob, or of the broken one
    /// when the rule is past the digest check).
    index_size: u64,
    index_digest: String,
    key: [u8; 32],
    /// `tail`, `open` or `chunk N`; `ok` for the valid blob.
    stage: String,
    /// The `FormatError` variant.
    class: &'static str,
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: read_vectors OUTPUT_DIR");
    let out = Path::new(&out);
    std::fs::create_dir_all(out).unwrap();
    let mut valid = Vec::new();
    let summary = seal_layer(
        &layer_tar()[..],
        &mut valid,
        &LayerKey::from_bytes(KEY),
        &SealOptions::with_chunk_size(CHUNK).unwrap(),
    )
    .unwrap();
    let tail_size = summary.tail_size;
    let tail_start = valid.len() - tail_size as usize;
    let footer = valid.len() - FOOTER_LEN;
    // The files a and b are chunks 0 and 1, equally long sealed (checked below).
    let chunk_len = {
        let tail = fsformat::reader::UnverifiedTail::from_pinned(
            valid.len() as u64,
            valid[tail_start..].to_vec(),
            &summary.tail_digest,
        )
        .unwrap();
        let layer = tail
            .open(&LayerKey::from_bytes(KEY), &summary.tail_digest)
            .unwrap();
        let (first, second) = (layer.chunk_range(0).unwrap(), layer.chunk_range(1).unwrap());
        assert_eq!((first.0, first.1), (0, second.1), "chunks 0 and 1 alike");
        assert_eq!(second.0, u64::from(first.1));
        first.1 as usize
    };

    let pinned_as_is = |name, rule, blob: Vec<u8>, stage: &str, class| Vector {
        name,
        rule,
        index_digest: sha256(&blob[blob.len() - tail_size as usize..]),
        index_size: tail_size,
        blob,
        key: KEY,
        stage: stage.to_string(),
        class,
    };
    let edited = |at: usize, byte: u8| {
        let mut blob = valid.clone();
        blob[at] = byte;
        blob
    };
    let flipped = |at: usize| edited(at, valid[at] ^ 0x01);

    let mut vectors = vec![pinned_as_is(
        "valid",
        "a valid layer: every stage succeeds",
        valid.clone(),
        "ok",
        "",
    )];
    vectors.push(Vector {
        index_digest: summary.tail_digest.clone(),
        ..pinned_as_is(
            "tail_digest_mismatch",
            "the tail MUST hash to the pinned sealfs.index.digest before any of it is parsed",
            flipped(tail_start + 3),
            "tail",
            "TailDigestMismatch",
        )
    });
    vectors.push(pinned_as_is(
        "footer_magic_wrong",
        "a footer with wrong magic",
        flipped(footer),
        "tail",
        "BadFooter",
    ));
    vectors.push(pinned_as_is(
        "footer_end_magic_wrong",
        "a footer with wrong end magic",
        flipped(valid.len() - 1),
        "tail",
        "BadFooter",
    ));
    vectors.push(pinned_as_is(
        "footer_version_unknown",
        "another format version",
        edited(footer + 8, 2),
        "tail",
        "BadFooter",
    ));
    vectors.push(pinned_as_is(
        "footer_chunk_shift_out_of_range",
        "a chunk size exponent outside 16..=24",
        edited(footer + 10, 25),
        "tail",
        "BadFooter",
    ));
    vectors.push(pinned_as_is(
        "footer_reserved_byte_set",
        "a nonzero reserved byte",
        edited(footer + 11, 1),
        "tail",
        "BadFooter",
    ));
    vectors.push(pinned_as_is(
        "footer_data_exceeds_chunks",
        "more plaintext bytes than n x 2^s",
        edited(footer + 23, 0x7f),
        "tail",
        "BadFooter",
    ));
    {
        // Ten bytes cut from the end of the sealed index: the footer no longer begins where
        // the index ends.
        let mut blob = valid[..footer - 10].to_vec();
        blob.extend_from_slice(&valid[footer..]);
        let size = tail_size - 10;
        vectors.push(Vector {
            index_size: size,
            index_digest: sha256(&blob[blob.len() - size as usize..]),
            ..pinned_as_is(
                "index_truncated",
                "an index that does not end exactly where the footer begins",
                blob,
                "tail",
                "BadFooter",
            )
        });
    }
    vectors.push(pinned_as_is(
        "index_tag_flipped",
        "a sealed index whose tag does not verify",
        flipped(footer - 1),
        "open",
        "IndexAuth",
    ));
    vectors.push(Vector {
        key: WRONG_KEY,
        ..pinned_as_is(
            "wrong_key",
            "a key whose commitment differs from the footer's (told apart from damage)",
            valid.clone(),
            "open",
            "WrongKey",
        )
    });
    vectors.push(pinned_as_is(
        "chunk_tag_flipped",
        "a chunk whose tag does not verify",
        flipped(chunk_len - 1),
        "chunk 0",
        "ChunkAuth",
    ));
    {
        let mut blob = valid.clone();
        let (first, second) = blob.split_at_mut(chunk_len);
        first.swap_with_slice(&mut second[..chunk_len]);
        vectors.push(pinned_as_is(
            "chunks_swapped",
            "chunks moved: the AAD binds each chunk to its number and offset",
            blob,
            "chunk 0",
            "ChunkAuth",
        ));
    }

    let mut readme_rows = String::new();
    for vector in &vectors {
        std::fs::write(out.join(format!("{}.sealed", vector.name)), &vector.blob).unwrap();
        let mut expect = String::new();
        writeln!(expect, "rule: {}", vector.rule).unwrap();
        writeln!(expect, "stage: {}", vector.stage).unwrap();
        if !vector.class.is_empty() {
            writeln!(expect, "expect: {}", vector.class).unwrap();
        }
        writeln!(expect, "key: {}", hex::encode(vector.key)).unwrap();
        writeln!(expect, "index_size: {}", vector.index_size).unwrap();
        writeln!(expect, "index_digest: {}", vector.index_digest).unwrap();
        if vector.stage == "ok" {
            writeln!(expect, "file_a_sha256: {}", sha256(&file_a())).unwrap();
        }
        std::fs::write(out.join(format!("{}.expect", vector.name)), expect).unwrap();
        writeln!(
            readme_rows,
            "| `{}` | {} | {} | {} |",
            vector.name,
            vector.rule,
            vector.stage,
            if vector.class.is_empty() {
                "–"
            } else {
                vector.class
            }
        )
        .unwrap();
    }
    print!("{readme_rows}");
}
