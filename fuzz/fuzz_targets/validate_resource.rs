//! Fuzz target: arbitrary bytes, parsed as JSON, given to `$validate`'s validator — the walk
//! against the R4 definitions and the invariants it evaluates with FHIRPath on whatever the
//! input holds, narrative XHTML included. Only issues, never a panic; an issue names a path
//! and never echoes the input's values back beyond its element names.
#![no_main]

use fhirkeep_query::validate::{issues_outcome, validate_resource};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let issues = validate_resource(&value);
    for issue in &issues {
        assert!(!issue.path.is_empty(), "an issue without a path");
        assert!(matches!(issue.severity, "error" | "warning" | "information"));
    }
    let outcome = issues_outcome(&issues);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
});
