//! `$validate` over the official R4 examples: every example of a few common types must
//! validate without error-level issues, and a broken copy of each must not; the invariants
//! hold on every example but the few that break them.

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
    named_examples()
        .into_iter()
        .map(|(_, _, value)| value)
        .collect()
}

/// Every example resource of the official package, with its file name and size in bytes.
fn named_examples() -> Vec<(String, usize, Value)> {
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
            let file = name.rsplit('/').next().unwrap_or(&name).to_owned();
            out.push((file, text.len(), value));
        }
    }
    out
}

/// Official examples of those types that reference a type their element does not allow
/// (checked by hand against the R4 definitions): `(Type/id, element path)`.
const EXAMPLES_WITH_WRONG_REFERENCE_TARGETS: [(&str, &str); 2] = [
    // dispenseRequest.performer is Reference(Organization); the example names a Practitioner.
    (
        "MedicationRequest/medrx0301",
        "MedicationRequest.dispenseRequest.performer",
    ),
    // performer does not allow an Encounter.
    ("Observation/clinical-gender", "Observation.performer[0]"),
];

#[test]
fn official_examples_of_common_types_validate_without_errors() {
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut wrong_targets = Vec::new();
    for example in examples() {
        let resource_type = example["resourceType"].as_str().unwrap().to_owned();
        if !TYPES.contains(&resource_type.as_str()) {
            continue;
        }
        checked += 1;
        let key = format!("{resource_type}/{}", example["id"].as_str().unwrap_or("?"));
        let errors: Vec<_> = validate_resource(&example)
            .into_iter()
            .filter(|i| i.severity == "error")
            .filter(|i| {
                let known = i.message.starts_with("the reference points to")
                    && EXAMPLES_WITH_WRONG_REFERENCE_TARGETS
                        .contains(&(key.as_str(), i.path.as_str()));
                if known {
                    wrong_targets.push((key.clone(), i.path.clone()));
                }
                !known
            })
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
    // The known wrong targets are found (the check runs on real data).
    let expected: Vec<(String, String)> = EXAMPLES_WITH_WRONG_REFERENCE_TARGETS
        .iter()
        .map(|(key, path)| ((*key).to_owned(), (*path).to_owned()))
        .collect();
    wrong_targets.sort();
    assert_eq!(wrong_targets, expected);
}

/// The official examples that break an error-level invariant of R4 itself (each checked by
/// hand): narratives with only whitespace (`txt-2`; R4 writes `txt-1` with the same
/// expression, `htmlChecks()`, so both are reported), and logical models without a base
/// definition that are not abstract (`sdf-4`).
const EXAMPLES_BREAKING_INVARIANTS: [(&str, &str); 12] = [
    ("ActivityDefinition-blood-tubes-supply.json", "txt-1"),
    ("ActivityDefinition-blood-tubes-supply.json", "txt-2"),
    ("ActivityDefinition-heart-valve-replacement.json", "txt-1"),
    ("ActivityDefinition-heart-valve-replacement.json", "txt-2"),
    ("EventDefinition-example.json", "txt-1"),
    ("EventDefinition-example.json", "txt-2"),
    ("Questionnaire-zika-virus-exposure-assessment.json", "txt-1"),
    ("Questionnaire-zika-virus-exposure-assessment.json", "txt-2"),
    ("StructureDefinition-Definition.json", "sdf-4"),
    ("StructureDefinition-Event.json", "sdf-4"),
    ("StructureDefinition-FiveWs.json", "sdf-4"),
    ("StructureDefinition-Request.json", "sdf-4"),
];

/// The largest example files are left out here (the definitions' own Bundles, up to 35 MB):
/// they take most of the time, and `Bundle-dataelements.json` breaks `bdl-7` (fullUrls that
/// repeat without versions).
const LARGEST_CHECKED: usize = 1 << 20;

#[test]
fn official_examples_keep_the_invariants_but_the_few_that_break_them() {
    let mut checked = 0;
    let mut broken = Vec::new();
    for (file, size, example) in named_examples() {
        if size > LARGEST_CHECKED {
            continue;
        }
        checked += 1;
        for issue in validate_resource(&example) {
            // Every invariant of an example this size is evaluated within the budget.
            assert_ne!(issue.code, "too-costly", "{file}: {}", issue.message);
            if issue.code == "invariant" {
                let key = issue.message.split(':').next().unwrap_or("").to_owned();
                broken.push((file.clone(), key));
            }
        }
    }
    broken.sort();
    broken.dedup();
    assert!(checked > 5_000, "only {checked} examples");
    let expected: Vec<(String, String)> = EXAMPLES_BREAKING_INVARIANTS
        .iter()
        .map(|(file, key)| ((*file).to_owned(), (*key).to_owned()))
        .collect();
    assert_eq!(broken, expected);
}
