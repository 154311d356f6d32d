//! Fuzz target: arbitrary bytes as a resource and a JSON Patch (split at the first NUL byte),
//! applied with `apply_json_patch` and `patched_resource`. Only typed errors, never a panic;
//! an empty patch changes nothing.
#![no_main]

use fhirkeep_query::patch::{apply_json_patch, patched_resource};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let (resource, patch) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"[]"[..]),
    };
    let Ok(resource) = serde_json::from_slice::<Value>(resource) else {
        return;
    };
    let Ok(patch) = serde_json::from_slice::<Value>(patch) else {
        return;
    };
    let _ = apply_json_patch(&resource, &patch);
    let _ = patched_resource(&resource, &patch);
    if let Ok(unchanged) = apply_json_patch(&resource, &json!([])) {
        assert_eq!(unchanged, resource, "an empty patch changed the resource");
    }
});
