//! `$validate` over the official R4 examples: every example of a few common types must
//! validate without error-level issues, and a broken copy of each must not.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::path::Path;

use fhirkeep_query::validate::validate_resource;
use serde_json::{Value, json};

/// The types whose every official example is checked.
const TYPES: [&str; 10] = [
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "Practitioner",
    "Organization",
    "AllergyIntolerance",
    "Procedure",
    "Immunization",
];

/// Every example resource of the official package.
fn examples() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz");
    let file = std::fs::File::open(path).expect("vendored examples archive");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).expect("utf-8");
        let value: Value = serde_json::from_str(&text).expect("json");
        if value.get("resourceType").is_some() {
            out.push(value);
        }
    }
    out
}

#[test]
fn official_examples_of_common_types_validate_without_errors() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for example in examples() {
        let resource_type = example["resourceType"].as_str().unwrap().to_owned();
        if !TYPES.contains(&resource_type.as_str()) {
            continue;
        }
        checked += 1;
        let errors: Vec<_> = validate_resource(&example)
            .into_iter()
            .filter(|i| i.severity == "error")
            .collect();
        if !errors.is_empty() {
            failures.push(format!(
                "{resource_type}/{}: {errors:?}",
                example["id"].as_str().unwrap_or("?")
            ));
        }
        // The same example with a broken element must not pass.
        let mut broken = example.clone();
        broken["notAnElement"] = json!(true);
        assert!(
            validate_resource(&broken)
                .iter()
                .any(|i| i.path == format!("{resource_type}.notAnElement")),
            "{resource_type}: an unknown element went unnoticed"
        );
    }
    assert!(checked > 100, "only {checked} examples of {TYPES:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
