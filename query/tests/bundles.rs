//! Batch and transaction Bundles through the Database: conditional interactions inside
//! bundles, urn:uuid and conditional references, GET entries, all-or-nothing transactions.

#![allow(clippy::unwrap_used, clippy::panic)]

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_query::{Database, Error};
use serde_json::{Value, json};

fn new_db() -> (tempfile::TempDir, Database) {
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
    AccessContext::new("tester", "bundle-test", "127.0.0.1", "req")
}

fn count(db: &Database, query: &str) -> usize {
    let request = parse_search_url(&db.registry().unwrap(), query, Handling::Strict).unwrap();
    db.matching_keys(&request).unwrap().len()
}

fn statuses(response: &Value) -> Vec<String> {
    response["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

const BASE: &str = "http://localhost:8080/fhir";

#[test]
fn a_transaction_resolves_conditions_and_references_before_writing() {
    let (_dir, db) = new_db();
    db.update(
        &ctx(),
        "Patient",
        "known",
        json!({"resourceType": "Patient", "id": "known",
        "identifier": [{"system": "http://mrn", "value": "1"}]}),
        None,
    )
    .unwrap();
    db.update(
        &ctx(),
        "Patient",
        "doomed",
        json!({"resourceType": "Patient", "id": "doomed",
        "identifier": [{"system": "http://mrn", "value": "9"}]}),
        None,
    )
    .unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        // conditional create that finds the existing patient: nothing written, urn maps to it
        {"fullUrl": "urn:uuid:pat", "resource": {"resourceType": "Patient", "identifier": [{"system": "http://mrn", "value": "1"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://mrn|1"}},
        // a new encounter referenced by urn
        {"fullUrl": "urn:uuid:enc", "resource": {"resourceType": "Encounter", "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": "urn:uuid:pat"}},
         "request": {"method": "POST", "url": "Encounter"}},
        // an observation with a conditional reference and a urn reference
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient?identifier=http://mrn|1"}, "encounter": {"reference": "urn:uuid:enc"}},
         "request": {"method": "POST", "url": "Observation"}},
        // conditional update creating a new patient
        {"resource": {"resourceType": "Patient", "identifier": [{"system": "http://mrn", "value": "2"}]},
         "request": {"method": "PUT", "url": "Patient?identifier=http://mrn|2"}},
        // conditional delete
        {"request": {"method": "DELETE", "url": "Patient?identifier=http://mrn|9"}},
        // a search, answered after the writes
        {"request": {"method": "GET", "url": "Observation?subject=Patient/known"}},
    ]});
    let response = db.process_bundle(&ctx(), &bundle, BASE).unwrap();
    assert_eq!(response["type"], "transaction-response");
    assert_eq!(
        statuses(&response),
        [
            "200 OK",
            "201 Created",
            "201 Created",
            "201 Created",
            "204 No Content",
            "200 OK"
        ]
    );
    let encounter = &response["entry"][1]["resource"];
    assert_eq!(encounter["subject"]["reference"], "Patient/known");
    let observation = &response["entry"][2]["resource"];
    assert_eq!(observation["subject"]["reference"], "Patient/known");
    assert_eq!(
        observation["encounter"]["reference"],
        format!("Encounter/{}", encounter["id"].as_str().unwrap())
    );
    let search = &response["entry"][5]["resource"];
    assert_eq!(search["type"], "searchset");
    assert_eq!(search["total"], 1);
    assert_eq!(count(&db, "Patient?identifier=http://mrn|2"), 1);
    assert_eq!(count(&db, "Patient?identifier=http://mrn|9"), 0);
    assert!(
        response["entry"][1]["response"]["location"]
            .as_str()
            .unwrap()
            .starts_with("Encounter/")
    );
}

#[test]
fn a_failing_transaction_writes_nothing() {
    let (_dir, db) = new_db();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient?identifier=http://mrn|nobody"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]});
    assert!(matches!(
        db.process_bundle(&ctx(), &bundle, BASE),
        Err(Error::Unprocessable(_))
    ));
    assert_eq!(count(&db, "Patient"), 0);
    let twice = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"request": {"method": "DELETE", "url": "Patient/a"}},
    ]});
    assert!(matches!(
        db.process_bundle(&ctx(), &twice, BASE),
        Err(Error::Unprocessable(_))
    ));
    let conflict = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/b", "ifMatch": "W/\"4\""}},
    ]});
    let error = db.process_bundle(&ctx(), &conflict, BASE).unwrap_err();
    assert_eq!(error.http_status(), 412);
    assert_eq!(count(&db, "Patient"), 0);
}

#[test]
fn a_batch_answers_every_entry_on_its_own() {
    let (_dir, db) = new_db();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/b", "ifMatch": "W/\"4\""}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"request": {"method": "GET", "url": "Patient?bogus=1"}},
        {"request": {"method": "GET", "url": "Patient/a"}},
        {"request": {"method": "PATCH", "url": "Patient/a"}},
        // A search after a write of the same batch sees it (the batch's writes wait for
        // their disk sync, and the search for them).
        {"request": {"method": "GET", "url": "Patient?_id=a"}},
    ]});
    let response = db.process_bundle(&ctx(), &bundle, BASE).unwrap();
    assert_eq!(response["type"], "batch-response");
    assert_eq!(
        statuses(&response),
        [
            "201 Created",
            "412 Precondition Failed",
            "404 Not Found",
            "400 Bad Request",
            "200 OK",
            "422 Unprocessable Entity",
            "200 OK"
        ]
    );
    assert_eq!(response["entry"][6]["resource"]["total"], 1);
    assert_eq!(
        response["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(response["entry"][4]["response"]["etag"], "W/\"1\"");
    assert_eq!(count(&db, "Patient"), 1);
    // Not a batch or transaction: refused.
    let collection = json!({"resourceType": "Bundle", "type": "collection"});
    assert!(matches!(
        db.process_bundle(&ctx(), &collection, BASE),
        Err(Error::Unprocessable(_))
    ));
}

#[test]
fn transactions_in_a_row_and_at_once_are_indexed_as_their_newest_versions() {
    let (_dir, db) = new_db();
    let put = |id: &str, family: &str| {
        json!({"resource": {"resourceType": "Patient", "id": id, "name": [{"family": family}]},
               "request": {"method": "PUT", "url": format!("Patient/{id}")}})
    };
    let transaction = |entries: Vec<Value>| json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    // Each transaction's versions are indexed from what it wrote; the next one replaces some.
    for round in 0..3 {
        let entries = (0..20)
            .filter(|i| round == 0 || i % 2 == 0)
            .map(|i| put(&format!("p{i}"), &format!("round{round}")))
            .collect();
        db.process_bundle(&ctx(), &transaction(entries), BASE)
            .unwrap();
    }
    assert_eq!(count(&db, "Patient?family=round0"), 10);
    assert_eq!(count(&db, "Patient?family=round1"), 0);
    assert_eq!(count(&db, "Patient?family=round2"), 10);
    // Concurrent transactions, each on its own ids, with a delete between them.
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let (db, transaction, put) = (&db, &transaction, &put);
            scope.spawn(move || {
                for round in 0..5 {
                    let entries = (0..10)
                        .map(|i| put(&format!("t{thread}-{i}"), &format!("t{thread}r{round}")))
                        .collect();
                    db.process_bundle(&ctx(), &transaction(entries), BASE)
                        .unwrap();
                }
            });
        }
    });
    db.delete(&ctx(), "Patient", "t0-0", None).unwrap();
    for thread in 0..4 {
        let expected = if thread == 0 { 9 } else { 10 };
        assert_eq!(count(&db, &format!("Patient?family=t{thread}r4")), expected);
        assert_eq!(count(&db, &format!("Patient?family=t{thread}r3")), 0);
    }
    assert_eq!(count(&db, "Patient"), 20 + 40 - 1);
}
