//! Fixed negative vectors (`tests/vectors/`, see its README): each layer tar breaks one rule a
//! sealer must enforce, and sealing it fails with the named error class and message.

use std::path::Path;

use fsformat::writer::{seal_layer, SealOptions};
use fsformat::LayerKey;

#[test]
fn every_negative_vector_is_refused_with_its_expected_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "tar") {
            continue;
        }
        let expect = std::fs::read_to_string(path.with_extension("expect"))
            .unwrap_or_else(|e| panic!("{}: no .expect beside it: {e}", path.display()));
        let field = |name: &str| {
            expect
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{}: no {name} line", path.display()))
        };
        let (class, message) = (field("expect:"), field("message:"));
        let mut blob = Vec::new();
        let result = seal_layer(
            std::fs::File::open(&path).unwrap(),
            &mut blob,
            &LayerKey::from_bytes([7; 32]),
            &SealOptions::default(),
        );
        let error = match result {
            Ok(_) => panic!("{} sealed, but must be refused", path.display()),
            Err(error) => error,
        };
        let debug = format!("{error:?}");
        assert!(
            debug.starts_with(class),
            "{}: expected {class}, got {debug}",
            path.display()
        );
        assert!(
            error.to_string().contains(message),
            "{}: expected a message with {message:?}, got {error}",
            path.display()
        );
        checked += 1;
    }
    assert!(
        checked >= 6,
        "only {checked} vectors found in {}",
        dir.display()
    );
}
