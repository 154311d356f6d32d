//! Every official R4 example resource round-trips through the store as the same JSON value.

use std::io::Read;
use std::path::{Path, PathBuf};

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::{AccessContext, Store};
use fhirkeep_engine::{Error, resource};
use serde_json::Value;

fn examples_archive() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz")
}

/// The example resources in the package, as (file name, JSON value).
fn load_examples() -> Vec<(String, Value)> {
    let file = std::fs::File::open(examples_archive()).expect("vendored examples archive");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut examples = Vec::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let name = entry
            .path()
            .expect("entry path")
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).expect("utf-8 example");
        let value: Value = serde_json::from_str(&text).expect("example is JSON");
        if value.get("resourceType").is_some() {
            examples.push((name, value));
        }
    }
    examples
}

/// The value without the two meta elements the engine owns (and without an emptied meta).
fn without_engine_meta(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        let remove_meta = match object.get_mut("meta").and_then(Value::as_object_mut) {
            Some(meta) => {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.is_empty()
            }
            None => false,
        };
        if remove_meta {
            object.remove("meta");
        }
    }
    value
}

#[test]
fn every_r4_example_round_trips() {
    let examples = load_examples();
    assert!(
        examples.len() > 5000,
        "found only {} examples",
        examples.len()
    );

    let dir = tempfile::TempDir::new().unwrap();
    let key = dir.path().join("key");
    create_key_file(&key).unwrap();
    let store = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .open_or_create()
        .unwrap();
    let ctx = AccessContext::local("r4-examples-test");

    // Keyed by (type, id): a later example with the same identity is a new version of it.
    let mut stored = std::collections::BTreeMap::new();
    let mut rejected = Vec::new();
    for chunk in examples.chunks(500) {
        store
            .write(&ctx, |txn| {
                for (name, value) in chunk {
                    let resource_type = value["resourceType"].as_str().unwrap_or_default();
                    let id = value["id"].as_str().unwrap_or_default();
                    match txn.update(resource_type, id, value.clone(), None) {
                        Ok(outcome) => {
                            let key = (resource_type.to_owned(), outcome.resource.id);
                            stored.insert(key, (name.clone(), value.clone()));
                        }
                        Err(Error::InvalidId) => rejected.push(name.clone()),
                        Err(other) => panic!("{name}: {other}"),
                    }
                }
                Ok(())
            })
            .unwrap();
    }
    // The one official example whose id breaks the R4 id rule (67 characters) is refused.
    for name in &rejected {
        let id = examples.iter().find(|(n, _)| n == name).unwrap().1["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            !resource::is_valid_id(&id),
            "{name} was rejected but its id is valid"
        );
    }
    assert!(rejected.len() <= 1, "rejected: {rejected:?}");

    for ((resource_type, id), (name, original)) in &stored {
        let read = store.read(&ctx, resource_type, id).unwrap();
        let json = read.to_json().unwrap();
        assert_eq!(
            json["meta"]["versionId"],
            read.version.to_string(),
            "{name}"
        );
        assert_eq!(
            without_engine_meta(json),
            without_engine_meta(original.clone()),
            "{name} did not round-trip"
        );
    }
}
