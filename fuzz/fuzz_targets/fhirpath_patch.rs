//! Fuzz target: FHIRPath Patch operations built from the input bytes (operation kinds, paths
//! from a list or taken from the bytes, names, values, indexes), applied to a resource given
//! as JSON before the first NUL byte (or a built-in Patient) with `apply_fhirpath_patch` and
//! `patched_resource`. Only typed errors, never a panic; a failed patch leaves the input as
//! it was; a patch with no operations changes nothing.
#![no_main]

use fhirkeep_query::fhirpath_patch::apply_fhirpath_patch;
use fhirkeep_query::patch::patched_resource;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const PATHS: &[&str] = &[
    "Patient",
    "Patient.name",
    "Patient.name[0]",
    "Patient.name.given",
    "Patient.name.given[1]",
    "Patient.identifier",
    "Patient.identifier.where(system = 'http://b')",
    "Patient.birthDate",
    "Patient.contact",
    "Patient.contact.telecom",
    "Patient.extension",
    "Patient.active",
    "Patient.name.first()",
    "'literal'",
    "Patient.name | Patient.identifier",
];
const NAMES: &[&str] = &["given", "telecom", "active", "gender", "extension", "name", "x"];
const KINDS: &[&str] = &["add", "insert", "delete", "replace", "move", "other"];

fn value(choice: u8) -> Value {
    match choice % 6 {
        0 => json!({"name": "value", "valueString": "v"}),
        1 => json!({"name": "value", "valueBoolean": true}),
        2 => json!({"name": "value", "valueIdentifier": {"system": "http://z", "value": "9"}}),
        3 => json!({"name": "value", "part": [
            {"name": "name", "valueHumanName": {"family": "F"}},
            {"name": "telecom", "valueContactPoint": {"value": "1"}}]}),
        4 => json!({"name": "value", "part": [{"name": "x", "part": []}]}),
        _ => json!({"name": "value"}),
    }
}

fuzz_target!(|data: &[u8]| {
    let (resource, ops) = match data.iter().position(|&b| b == 0) {
        Some(at) => (serde_json::from_slice::<Value>(&data[..at]).ok(), &data[at + 1..]),
        None => (None, data),
    };
    let resource = resource.unwrap_or_else(|| {
        json!({
            "resourceType": "Patient", "id": "p",
            "name": [{"family": "A", "given": ["a", "b"], "_given": [null, {"id": "g"}]}],
            "identifier": [{"system": "http://a", "value": "1"}, {"system": "http://b", "value": "2"}],
            "birthDate": "1970-01-01", "_birthDate": {"id": "d"}, "active": true
        })
    });
    let mut parameters = Vec::new();
    for chunk in ops.chunks(5).take(16) {
        let byte = |i: usize| chunk.get(i).copied().unwrap_or(0);
        let path = if byte(1) >= 240 {
            String::from_utf8_lossy(chunk).into_owned()
        } else {
            PATHS[usize::from(byte(1)) % PATHS.len()].to_owned()
        };
        parameters.push(json!({"name": "operation", "part": [
            {"name": "type", "valueCode": KINDS[usize::from(byte(0)) % KINDS.len()]},
            {"name": "path", "valueString": path},
            {"name": "name", "valueString": NAMES[usize::from(byte(2)) % NAMES.len()]},
            {"name": "index", "valueInteger": byte(3) % 4},
            {"name": "source", "valueInteger": byte(3) % 3},
            {"name": "destination", "valueInteger": byte(4) % 3},
            value(byte(4)),
        ]}));
    }
    let patch = json!({"resourceType": "Parameters", "parameter": parameters});
    let before = resource.clone();
    let _ = apply_fhirpath_patch(&resource, &patch);
    let _ = patched_resource(&resource, &patch);
    assert_eq!(resource, before, "a patch changed its input");
    let empty = json!({"resourceType": "Parameters", "parameter": []});
    if let Ok(unchanged) = apply_fhirpath_patch(&resource, &empty) {
        assert_eq!(unchanged, resource, "an empty patch changed the resource");
    }
});
