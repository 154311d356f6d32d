//! The FHIR operations of the library on a real encrypted database: `Database::patch`,
//! `conditional_patch`, PATCH entries of Bundles, and `everything`.

#![allow(clippy::unwrap_used, clippy::panic)]

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::Database;
use fhirkeep_query::everything::EverythingRequest;
use serde_json::{Value, json};

fn database() -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    create_key_file(&key).unwrap();
    let db = Database::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .create()
        .unwrap();
    (dir, db)
}

fn ctx() -> AccessContext {
    AccessContext::local("operations-test")
}

fn put(db: &Database, resource: Value) {
    let t = resource["resourceType"].as_str().unwrap().to_owned();
    let id = resource["id"].as_str().unwrap().to_owned();
    db.update(&ctx(), &t, &id, resource, None).unwrap();
}

#[test]
fn patch_writes_a_new_version_and_the_index_follows() {
    let (_dir, db) = database();
    put(
        &db,
        json!({"resourceType": "Patient", "id": "a", "gender": "female"}),
    );
    let patch = json!([{"op": "replace", "path": "/gender", "value": "male"}]);
    let outcome = db.patch(&ctx(), "Patient", "a", &patch, Some(1)).unwrap();
    assert_eq!(outcome.resource.version, 2);
    assert_eq!(outcome.resource.to_json().unwrap()["gender"], "male");
    // The index sees the patched version.
    assert_eq!(db.single_match("Patient", "gender=male").unwrap(), "a");
    // A stale version is a conflict (412) and writes nothing.
    let err = db
        .patch(&ctx(), "Patient", "a", &patch, Some(1))
        .unwrap_err();
    assert_eq!(err.http_status(), 412);
    let err = db
        .conditional_patch(&ctx(), "Patient", "gender=female", &patch, None)
        .unwrap_err();
    assert_eq!(err.http_status(), 404);
    let current = db.store().read(&ctx(), "Patient", "a").unwrap();
    assert_eq!(current.version, 2);
}

#[test]
fn everything_is_the_compartment_plus_referenced_records() {
    let (_dir, db) = database();
    put(&db, json!({"resourceType": "Patient", "id": "p1"}));
    put(&db, json!({"resourceType": "Patient", "id": "p2"}));
    put(&db, json!({"resourceType": "Organization", "id": "o1"}));
    put(&db, json!({"resourceType": "Organization", "id": "o2"}));
    put(
        &db,
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
               "asserter": {"reference": "Patient/p1"},
               "recorder": {"reference": "Organization/o1"}}),
    );
    put(
        &db,
        json!({"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"},
               "recorder": {"reference": "Organization/o2"}}),
    );
    let request = EverythingRequest {
        patient: "p1".into(),
        ..EverythingRequest::default()
    };
    let result = db.everything(&ctx(), &request, &|_| true).unwrap();
    let keys: Vec<&str> = result.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["Patient/p1", "Condition/c1", "Organization/o1"]);
    assert_eq!(result.total, Some(3));
    // The caller's type filter applies to every part.
    let result = db
        .everything(&ctx(), &request, &|t| t != "Organization")
        .unwrap();
    assert_eq!(result.entries.len(), 2);
    // A missing patient is 404.
    let missing = EverythingRequest {
        patient: "nobody".into(),
        ..EverythingRequest::default()
    };
    let err = db.everything(&ctx(), &missing, &|_| true).unwrap_err();
    assert_eq!(err.http_status(), 404);
}
