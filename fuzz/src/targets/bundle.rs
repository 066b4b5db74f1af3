//! The enrollment bundle (`Bundle::parse`), the TOML file an agent starts from.

use flotilla_protocol::{Bundle, BUNDLE_VERSION};

/// Parses a bundle; a parsed one has a version this build reads and a
/// usable coordinator key, and its own TOML parses back to it.
pub fn bundle(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bundle) = Bundle::parse(text) else {
        return;
    };
    assert!(bundle.version >= 1 && bundle.version <= BUNDLE_VERSION);
    assert!(bundle.coordinator_public_key().is_ok());
    let again = bundle.to_toml();
    // Bundle's Debug leaves the secrets out; print the fields that matter.
    let back = Bundle::parse(&again)
        .unwrap_or_else(|e| panic!("a parsed bundle's own TOML does not parse: {e}"));
    assert!(
        back == bundle,
        "bundle changed across a TOML round trip: {back:?} / {bundle:?}"
    );
    assert_eq!(back.to_toml(), again);
}
