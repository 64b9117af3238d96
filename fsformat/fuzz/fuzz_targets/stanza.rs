//! A wrapped-key annotation as it arrives in a layer descriptor (an untrusted manifest): decode
//! it, read a keyprovider stanza's parts, and try an X25519 identity on it. Nothing may panic.
#![no_main]
use fsformat::keywrap::{unwrap_layer_key, Stanza};
use fsformat::{Identity, PrivateKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(stanza) = Stanza::decode(text) {
        let _ = stanza.provider();
        let _ = stanza.recipient_label();
        let identity = PrivateKey::from_bytes([9; 32]);
        let _ = unwrap_layer_key(&[&identity as &dyn Identity], &[stanza]);
    }
});
