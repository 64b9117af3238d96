//! Untrusted layer tars through the sealer: errors are fine, panics are not, and whatever seals
//! must open again with the same key (prefetch order included).
#![no_main]
use fsformat::reader::UnverifiedTail;
use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = LayerKey::from_bytes([9; 32]);
    let mut blob = Vec::new();
    let mut options = SealOptions::with_chunk_size(1 << 16).expect("valid chunk size");
    // A profile naming short paths a generated tar is likely to have, so the packing of
    // listed files and the prefetch order see hostile input too.
    options
        .set_prefetch_paths(["a", "b", "a/b", "/c", "0"].map(str::as_bytes))
        .expect("valid paths");
    if let Ok(summary) = seal_layer(data, &mut blob, &key, &options) {
        let tail = UnverifiedTail::read(&blob, blob.len() as u64).expect("own footer parses");
        tail.open(&key, &summary.tail_digest).expect("own index opens");
    }
});
