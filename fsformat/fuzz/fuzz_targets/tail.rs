//! Footer + sealed index as read from an untrusted blob: parse, then open with a fixed key.
//! Nothing may panic or allocate beyond what the input justifies.
#![no_main]
use fsformat::reader::UnverifiedTail;
use fsformat::LayerKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tail) = UnverifiedTail::parse(data.len() as u64, data) {
        let _ = tail.open_unpinned(&LayerKey::from_bytes([7; 32]));
    }
});
