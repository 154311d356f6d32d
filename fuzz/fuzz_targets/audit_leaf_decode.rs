//! Fuzz target: `AuditLeaf::decode` on arbitrary bytes never panics, and whatever it accepts is
//! the canonical encoding (`encode(decode(b)) == b`), so a leaf has exactly one byte form and
//! therefore exactly one Merkle hash.
#![no_main]

use fhirkeep_engine::audit::AuditLeaf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(leaf) = AuditLeaf::decode(data) {
        let encoded = leaf.encode();
        assert_eq!(
            encoded.as_slice(),
            data,
            "decode accepted a non-canonical leaf encoding: {leaf:?}"
        );
        // The hash is a function of the canonical bytes.
        assert_eq!(leaf.hash(), fhirkeep_engine::audit::leaf_hash(data));
        // Decoding the re-encoding gives the same leaf.
        let again = AuditLeaf::decode(&encoded).expect("re-encoded leaf must decode");
        assert_eq!(again, leaf);
    }
});
