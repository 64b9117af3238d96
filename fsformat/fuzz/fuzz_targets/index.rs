//! The decrypted index decoder. A key holder (any image author) controls these bytes, so the
//! decoder must be robust on its own, behind the AEAD. Decoded indexes must re-encode to the
//! same bytes (canonical encoding).
#![no_main]
use fsformat::layout::Index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<4>() else { return };
    let chunk_count = u32::from_le_bytes(*head) % 4096;
    if let Ok(index) = Index::decode(body, chunk_count, 1 << 20) {
        // Whatever decodes stays within the limits the encoder enforces.
        for entry in &index.entries {
            assert!(entry.name.len() <= fsformat::layout::MAX_NAME_LEN);
            assert!(entry.xattrs.len() <= fsformat::layout::MAX_XATTRS_PER_ENTRY);
            assert!(entry.xattrs.iter().all(|(n, _)| n.len() <= fsformat::layout::MAX_NAME_LEN));
        }
        assert_eq!(index.encode().expect("a decoded index encodes"), body, "decode accepted a non-canonical encoding");
    }
});
