//! The reader's fixed negative vectors (`tests/vectors/read/`, see the README there): each
//! sealed blob breaks one rule a reader MUST enforce, and the reference reader refuses it at
//! the named stage with the named error class, every earlier stage succeeding, and releases
//! no plaintext of a refused chunk. The one valid blob reads back in full.

use std::collections::BTreeMap;
use std::path::Path;

use fsformat::reader::{ChunkDecoder, SealedLayer, UnverifiedTail};
use fsformat::{FormatError, LayerKey};
use sha2::{Digest, Sha256};

fn fields(expect: &str) -> BTreeMap<&str, &str> {
    expect
        .lines()
        .filter_map(|line| line.split_once(": "))
        .collect()
}

/// The stages of reading, as docs/format.md lists them.
fn tail(blob: &[u8], index_size: u64, digest: &str) -> Result<UnverifiedTail, FormatError> {
    let start = blob.len().saturating_sub(index_size as usize);
    UnverifiedTail::from_pinned(blob.len() as u64, blob[start..].to_vec(), digest)
}

fn open(tail: UnverifiedTail, key: &str, digest: &str) -> Result<SealedLayer, FormatError> {
    let key: [u8; 32] = hex::decode(key).unwrap().try_into().unwrap();
    tail.open(&LayerKey::from_bytes(key), digest)
}

fn chunk(layer: &SealedLayer, blob: &[u8], number: u32) -> Result<Vec<u8>, FormatError> {
    let (start, len) = layer.chunk_range(number).unwrap();
    let mut sealed = blob[start as usize..start as usize + len as usize].to_vec();
    layer.open_chunk(number, &mut sealed, &mut ChunkDecoder::new().unwrap())
}

fn class(error: &FormatError) -> String {
    format!("{error:?}")
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn every_reader_vector_is_refused_at_its_stage_with_its_class() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/read");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "sealed") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let blob = std::fs::read(&path).unwrap();
        let text = std::fs::read_to_string(path.with_extension("expect")).unwrap();
        let want = fields(&text);
        let (stage, digest) = (want["stage"], want["index_digest"]);
        let index_size: u64 = want["index_size"].parse().unwrap();
        let refused = |stage_error: FormatError| {
            assert_eq!(
                class(&stage_error),
                want["expect"],
                "{name}: refused for another reason: {stage_error}"
            );
        };

        let tail = tail(&blob, index_size, digest);
        if stage == "tail" {
            refused(
                tail.err()
                    .unwrap_or_else(|| panic!("{name}: tail accepted")),
            );
            checked += 1;
            continue;
        }
        let layer = open(tail.expect(&name), want["key"], digest);
        if stage == "open" {
            refused(layer.err().unwrap_or_else(|| panic!("{name}: opened")));
            checked += 1;
            continue;
        }
        let layer = layer.expect(&name);
        if let Some(number) = stage.strip_prefix("chunk ") {
            let number: u32 = number.parse().unwrap();
            refused(
                chunk(&layer, &blob, number)
                    .err()
                    .unwrap_or_else(|| panic!("{name}: chunk {number} released")),
            );
            checked += 1;
            continue;
        }
        // The valid layer: every chunk opens, and file `a` reads back.
        assert_eq!(stage, "ok", "{name}: unknown stage");
        for number in 0..layer.index().chunks.len() as u32 {
            chunk(&layer, &blob, number).expect(&name);
        }
        let a = layer.lookup(b"a").unwrap();
        let mut bytes = vec![0u8; 1 << 17];
        let read = layer
            .read_file(
                &blob[..],
                a,
                0,
                &mut bytes,
                &mut ChunkDecoder::new().unwrap(),
            )
            .expect("reading a");
        bytes.truncate(read);
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            want["file_a_sha256"]
        );
        checked += 1;
    }
    assert!(checked >= 13, "only {checked} vectors in {}", dir.display());
}
