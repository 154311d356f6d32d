//! The Database boundary: one write path keeping store and index in line, conditional
//! interactions, and the search features the oracle fixtures do not cover, each on a real
//! encrypted database in a temporary directory.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_query::{ConditionalOutcome, Database, EntryMode, Error, SearchResult};
use serde_json::{Value, json};

struct TestDb {
    dir: tempfile::TempDir,
    db: Database,
}

fn key_source(dir: &Path) -> KeySource {
    let key = dir.join("key");
    if !key.exists() {
        create_key_file(&key).unwrap();
    }
    KeySource::KeyFile(key)
}

fn new_db() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path().join("db"))
        .key(key_source(dir.path()))
        .create()
        .unwrap();
    TestDb { dir, db }
}

fn reopen(test: TestDb) -> TestDb {
    let TestDb { dir, db } = test;
    drop(db);
    let db = Database::builder(dir.path().join("db"))
        .key(key_source(dir.path()))
        .open()
        .unwrap();
    TestDb { dir, db }
}

fn ctx() -> AccessContext {
    AccessContext::new("tester", "test-app", "127.0.0.1", "req-1")
}

fn run(db: &Database, query: &str) -> SearchResult {
    let request = parse_search_url(&db.registry().unwrap(), query, Handling::Strict)
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    db.search(&ctx(), &request)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

/// The keys of the matches (not includes), in result order.
fn keys(db: &Database, query: &str) -> Vec<String> {
    run(db, query)
        .entries
        .iter()
        .filter(|e| e.mode == EntryMode::Match)
        .map(|e| e.key.clone())
        .collect()
}

fn put(db: &Database, resource: Value) {
    let t = resource["resourceType"].as_str().unwrap().to_string();
    let id = resource["id"].as_str().unwrap().to_string();
    db.update(&ctx(), &t, &id, resource, None).unwrap();
}

fn patient(id: &str, family: &str, birth: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Ann"]}],
           "birthDate": birth, "gender": "female",
           "identifier": [{"system": "http://hospital.example/mrn", "value": format!("mrn-{id}"),
                           "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
           "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient {family} likes <b>gardening</b></div>")}})
}

fn observation(id: &str, patient: &str, code: &str, value: f64, unit: &str, when: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": "Body weight"}], "text": "Weight"},
           "subject": {"reference": format!("Patient/{patient}")},
           "effectiveDateTime": when,
           "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
}

/// A custom SearchParameter resource (`id` also names its URL) of `kind` on `base`.
fn search_parameter(id: &str, code: &str, base: &str, kind: &str, expression: &str) -> Value {
    json!({"resourceType": "SearchParameter", "id": id, "url": format!("http://example.org/sp/{id}"),
           "name": id, "status": "active", "description": id, "code": code, "base": [base],
           "type": kind, "expression": expression})
}

#[test]
fn writes_are_searchable_at_once_and_updates_and_deletes_follow() {
    let t = new_db();
    put(&t.db, patient("p1", "Chalmers", "1974-12-25"));
    assert_eq!(keys(&t.db, "Patient?family=chal"), ["Patient/p1"]);
    put(&t.db, patient("p1", "Windsor", "1974-12-25"));
    assert!(keys(&t.db, "Patient?family=chal").is_empty());
    assert_eq!(keys(&t.db, "Patient?family=windsor"), ["Patient/p1"]);
    t.db.delete(&ctx(), "Patient", "p1", None).unwrap();
    assert!(keys(&t.db, "Patient?family=windsor").is_empty());
    assert!(keys(&t.db, "Patient").is_empty());
    let created =
        t.db.create(&ctx(), json!({"resourceType": "Patient", "gender": "male"}))
            .unwrap();
    assert_eq!(
        keys(&t.db, "Patient?gender=male"),
        [format!("Patient/{}", created.id)]
    );
}

#[test]
fn writes_leave_the_index_commit_to_the_next_search() {
    let t = new_db();
    let before = t.db.index_stats().unwrap();
    for n in 0..20 {
        put(&t.db, patient(&format!("w{n}"), "Weaver", "1990"));
    }
    // Committing the index per write made a segment per write, and merging them took most
    // of a write-heavy server's CPU; the writes wait for the next search instead (or the
    // commit interval, seconds away here).
    let deferred = t.db.index_stats().unwrap();
    assert_eq!(deferred.documents, before.documents);
    assert_eq!(keys(&t.db, "Patient?family=weaver").len(), 20);
    let searched = t.db.index_stats().unwrap();
    assert_eq!(searched.documents, before.documents + 20);
    assert!(searched.segments <= before.segments + 1, "{searched:?}");
    assert_eq!(
        searched.committed_seq,
        Some(t.db.store().last_change_seq().unwrap())
    );
}

#[test]
fn a_bulk_load_leaves_the_index_commit_to_the_next_search() {
    let t = new_db();
    let before = t.db.index_stats().unwrap();
    // Each load's catch-up indexes the loads before it but commits only every 200,000
    // changes: a commit holds the load while tantivy writes the segment out. (That the clock
    // does not commit them either is the unit test of the commit policy.)
    for load in 0..3 {
        let items: Vec<_> = (0..50)
            .map(|i| upsert(patient(&format!("k{load}-{i}"), "Kept", "1980")))
            .collect();
        assert!(
            t.db.load_many(&ctx(), items)
                .unwrap()
                .iter()
                .all(Result::is_ok)
        );
    }
    let loaded = t.db.index_stats().unwrap();
    assert_eq!(loaded.documents, before.documents, "{loaded:?}");
    assert_eq!(loaded.committed_seq, before.committed_seq);
    // Searches see every load all the same: they catch the index up and commit first.
    assert_eq!(keys(&t.db, "Patient?family=kept&_count=500").len(), 150);
    let searched = t.db.index_stats().unwrap();
    assert_eq!(searched.documents, before.documents + 150);
    assert_eq!(
        searched.committed_seq,
        Some(t.db.store().last_change_seq().unwrap())
    );
}

#[test]
fn searches_catch_the_index_up_with_writes_it_missed_and_it_survives_reopening() {
    let t = new_db();
    put(&t.db, patient("p1", "Chalmers", "1974-12-25"));
    // A write that bypasses the index (as after a crash between store commit and index
    // commit): the store is the source of truth.
    t.db.store()
        .update(
            &ctx(),
            "Patient",
            "p2",
            patient("p2", "Chalk", "1980"),
            None,
        )
        .unwrap();
    // A search first brings the index up to every committed store change.
    assert_eq!(
        keys(&t.db, "Patient?family=chal"),
        ["Patient/p1", "Patient/p2"]
    );
    let t = reopen(t);
    assert_eq!(
        keys(&t.db, "Patient?family=chal"),
        ["Patient/p1", "Patient/p2"]
    );
    let report = t.db.reindex(&ctx()).unwrap();
    assert_eq!(report.changes, 2);
    assert_eq!(
        keys(&t.db, "Patient?family=chal"),
        ["Patient/p1", "Patient/p2"]
    );
}

#[test]
fn conditional_create_update_and_delete() {
    let t = new_db();
    let condition = "identifier=http://hospital.example/mrn|mrn-x";
    let mut body = patient("ignored", "Conditional", "1990");
    body.as_object_mut().unwrap().remove("id");
    body["identifier"][0]["value"] = json!("mrn-x");
    let first =
        t.db.conditional_create(&ctx(), body.clone(), condition)
            .unwrap();
    let ConditionalOutcome::Created(created) = first else {
        panic!("expected a create")
    };
    let second =
        t.db.conditional_create(&ctx(), body.clone(), condition)
            .unwrap();
    let ConditionalOutcome::Existing(existing) = second else {
        panic!("expected the existing one")
    };
    assert_eq!(existing.id, created.id);

    let mut changed = body.clone();
    changed["gender"] = json!("other");
    let updated =
        t.db.conditional_update(&ctx(), "Patient", condition, changed.clone(), None)
            .unwrap();
    assert_eq!(updated.resource.id, created.id);
    assert_eq!(updated.resource.version, 2);
    assert_eq!(
        keys(&t.db, "Patient?gender=other"),
        [format!("Patient/{}", created.id)]
    );

    // Nothing matches: conditional update creates.
    let mut other = body.clone();
    other["identifier"][0]["value"] = json!("mrn-y");
    let made =
        t.db.conditional_update(
            &ctx(),
            "Patient",
            "identifier=http://hospital.example/mrn|mrn-y",
            other.clone(),
            None,
        )
        .unwrap();
    assert_eq!(made.resource.version, 1);
    // If-Match: the match must be at the expected version.
    let stale = t.db.conditional_update(
        &ctx(),
        "Patient",
        "identifier=http://hospital.example/mrn|mrn-y",
        other.clone(),
        Some(7),
    );
    assert_eq!(stale.unwrap_err().http_status(), 412);
    let fresh =
        t.db.conditional_update(
            &ctx(),
            "Patient",
            "identifier=http://hospital.example/mrn|mrn-y",
            other.clone(),
            Some(1),
        )
        .unwrap();
    assert_eq!(fresh.resource.version, 2);

    // Two match: refused, nothing written.
    let both = "identifier=http://hospital.example/mrn|mrn-x,http://hospital.example/mrn|mrn-y";
    assert!(matches!(
        t.db.conditional_create(&ctx(), other.clone(), both),
        Err(Error::MultipleMatches(2))
    ));
    assert!(matches!(
        t.db.conditional_delete(&ctx(), "Patient", both),
        Err(Error::MultipleMatches(2))
    ));
    assert_eq!(keys(&t.db, "Patient").len(), 2);

    assert!(
        t.db.conditional_delete(&ctx(), "Patient", condition)
            .unwrap()
            .is_some()
    );
    assert!(
        t.db.conditional_delete(&ctx(), "Patient", condition)
            .unwrap()
            .is_none()
    );
    assert_eq!(keys(&t.db, "Patient").len(), 1);
    // An empty or unknown condition is an error, never "match everything".
    assert!(matches!(
        t.db.conditional_delete(&ctx(), "Patient", ""),
        Err(Error::InvalidSearch(_))
    ));
    assert!(matches!(
        t.db.conditional_delete(&ctx(), "Patient", "bogus=1"),
        Err(Error::InvalidSearch(_))
    ));
}

fn clinical_db() -> TestDb {
    let t = new_db();
    put(&t.db, patient("p1", "Chalmers", "1974-12-25"));
    put(&t.db, patient("p2", "Baker", "1980-01-02"));
    put(&t.db, patient("p3", "Able", "1965-06-07"));
    put(
        &t.db,
        observation("o1", "p1", "29463-7", 80.0, "kg", "2020-01-01T10:00:00Z"),
    );
    put(
        &t.db,
        observation("o2", "p1", "29463-7", 82.5, "kg", "2021-01-01T10:00:00Z"),
    );
    let mut height = observation("o3", "p2", "8302-2", 180.0, "cm", "2021-06-01");
    height["code"]["coding"][0]["display"] = json!("Body height");
    height["code"]["text"] = json!("Height");
    put(&t.db, height);
    t
}

#[test]
fn sorting_on_several_keys_and_descending() {
    let t = clinical_db();
    assert_eq!(
        keys(&t.db, "Patient?_sort=family"),
        ["Patient/p3", "Patient/p2", "Patient/p1"]
    );
    assert_eq!(
        keys(&t.db, "Patient?_sort=-birthdate"),
        ["Patient/p2", "Patient/p1", "Patient/p3"]
    );
    assert_eq!(
        keys(&t.db, "Observation?_sort=patient,-date"),
        ["Observation/o2", "Observation/o1", "Observation/o3"]
    );
    assert_eq!(
        keys(&t.db, "Patient?_sort=-_id"),
        ["Patient/p3", "Patient/p2", "Patient/p1"]
    );
    // `combo-value-quantity` has no terms of its own (it is `value-quantity` and
    // `component-value-quantity`) but sorts on its own keys: the lowest value ascending,
    // the highest descending, a component's value counting like the observation's.
    let mut pressure = observation("o4", "p2", "85354-9", 0.0, "mm[Hg]", "2022-01-01");
    pressure.as_object_mut().unwrap().remove("valueQuantity");
    pressure["component"] = json!([
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 130, "unit": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 85, "unit": "mm[Hg]"}}
    ]);
    put(&t.db, pressure);
    assert_eq!(
        keys(&t.db, "Observation?_sort=combo-value-quantity"),
        [
            "Observation/o1",
            "Observation/o2",
            "Observation/o4",
            "Observation/o3"
        ]
    );
    assert_eq!(
        keys(&t.db, "Observation?_sort=-combo-value-quantity,_id"),
        [
            "Observation/o3",
            "Observation/o4",
            "Observation/o2",
            "Observation/o1"
        ]
    );
    assert_eq!(
        keys(
            &t.db,
            "Observation?combo-value-quantity=gt84&_sort=combo-code"
        ),
        ["Observation/o3", "Observation/o4"]
    );
}

#[test]
fn includes_revincludes_and_iterate() {
    let t = clinical_db();
    let result = run(
        &t.db,
        "Observation?code=29463-7&_include=Observation:subject",
    );
    let entries: Vec<(String, EntryMode)> = result
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.mode))
        .collect();
    assert_eq!(
        entries,
        [
            ("Observation/o1".to_string(), EntryMode::Match),
            ("Observation/o2".to_string(), EntryMode::Match),
            ("Patient/p1".to_string(), EntryMode::Include),
        ]
    );
    assert_eq!(result.total, Some(2));
    let rev = run(&t.db, "Patient?_id=p1&_revinclude=Observation:patient");
    let included: Vec<&str> = rev
        .entries
        .iter()
        .filter(|e| e.mode == EntryMode::Include)
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(included, ["Observation/o1", "Observation/o2"]);
    let bundle = rev.to_bundle("http://x/fhir");
    assert_eq!(bundle["entry"][1]["search"]["mode"], "include");
    // :iterate follows includes of includes: Observation -> Patient -> (revinclude) others.
    let iterated = run(
        &t.db,
        "Observation?_id=o1&_include=Observation:subject&_revinclude:iterate=Observation:subject",
    );
    let mut all: Vec<&str> = iterated.entries.iter().map(|e| e.key.as_str()).collect();
    all.sort();
    assert_eq!(all, ["Observation/o1", "Observation/o2", "Patient/p1"]);
}

#[test]
fn compartment_search_finds_only_the_patients_resources() {
    let t = clinical_db();
    assert_eq!(
        keys(&t.db, "Patient/p1/Observation"),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        keys(&t.db, "Patient/p2/Observation?code=8302-2"),
        ["Observation/o3"]
    );
    assert!(keys(&t.db, "Patient/p3/Observation").is_empty());
}

#[test]
fn paging_is_stable_while_data_changes() {
    let t = new_db();
    for i in 0..10 {
        put(&t.db, patient(&format!("p{i:02}"), "Same", "1970"));
    }
    let registry_query = "Patient?family=same&_count=4";
    let mut request =
        parse_search_url(&t.db.registry().unwrap(), registry_query, Handling::Strict).unwrap();
    let first = t.db.search(&ctx(), &request).unwrap();
    let first_keys: Vec<String> = first.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        first_keys,
        ["Patient/p00", "Patient/p01", "Patient/p02", "Patient/p03"]
    );
    // A resource that sorts before the cursor appears, one after it disappears: the next page
    // neither repeats nor skips what was not touched.
    put(&t.db, patient("p000", "Same", "1970"));
    t.db.delete(&ctx(), "Patient", "p05", None).unwrap();
    request.cursor = first.next_cursor.clone();
    let second = t.db.search(&ctx(), &request).unwrap();
    let second_keys: Vec<String> = second.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        second_keys,
        ["Patient/p04", "Patient/p06", "Patient/p07", "Patient/p08"]
    );
    let bundle = second.to_bundle("http://x/fhir");
    let links: Vec<&str> = bundle["link"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["relation"].as_str().unwrap())
        .collect();
    assert_eq!(links, ["self", "next", "previous"]);
    // previous goes back to the page before.
    request.cursor = second.previous_cursor.clone();
    let back = t.db.search(&ctx(), &request).unwrap();
    let back_keys: Vec<String> = back.entries.iter().map(|e| e.key.clone()).collect();
    assert_eq!(
        back_keys,
        ["Patient/p000", "Patient/p01", "Patient/p02", "Patient/p03"]
    );
    // Cursors do not carry sort values (PHI) and are bound to their search.
    let next = bundle["link"][1]["url"].as_str().unwrap();
    assert!(!next.contains("Same") && !next.contains("1970"), "{next}");
    let mut other = parse_search_url(
        &t.db.registry().unwrap(),
        "Patient?family=other",
        Handling::Strict,
    )
    .unwrap();
    other.cursor = second.next_cursor;
    assert!(matches!(
        t.db.search(&ctx(), &other),
        Err(Error::InvalidSearch(_))
    ));
}

#[test]
fn a_value_written_twice_in_one_resource_matches_and_counts_once() {
    let t = new_db();
    let coding = json!({"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"});
    let mut twice = observation("twice", "p1", "29463-7", 70.0, "kg", "2024-05-01");
    twice["code"]["coding"] = json!([coding.clone(), coding]);
    twice["identifier"] =
        json!([{"system": "urn:x", "value": "same"}, {"system": "urn:x", "value": "same"}]);
    put(&t.db, twice);
    put(
        &t.db,
        observation("once", "p1", "29463-7", 80.0, "kg", "2024-05-02"),
    );
    put(
        &t.db,
        observation("other", "p1", "8867-4", 60.0, "/min", "2024-05-03"),
    );
    let mut found = keys(&t.db, "Observation?code=http://loinc.org|29463-7");
    found.sort();
    assert_eq!(found, ["Observation/once", "Observation/twice"]);
    assert_eq!(
        run(&t.db, "Observation?code=29463-7&_total=accurate").total,
        Some(2)
    );
    assert_eq!(
        run(&t.db, "Observation?identifier=urn:x|same&_total=accurate").total,
        Some(1)
    );
    assert_eq!(
        keys(&t.db, "Observation?code:not=29463-7"),
        ["Observation/other"]
    );
    // After an update that writes the value once, the old document's terms are gone.
    put(
        &t.db,
        observation("twice", "p1", "8867-4", 61.0, "/min", "2024-05-04"),
    );
    assert_eq!(
        keys(&t.db, "Observation?code=29463-7"),
        ["Observation/once"]
    );
    assert!(keys(&t.db, "Observation?identifier=urn:x|same").is_empty());
}

#[test]
fn totals_summary_and_elements() {
    let t = clinical_db();
    let count = run(&t.db, "Observation?_summary=count");
    assert_eq!(count.total, Some(3));
    assert!(count.entries.is_empty());
    assert_eq!(run(&t.db, "Observation?_total=none").total, None);
    let summary = run(&t.db, "Patient?_id=p1&_summary=true");
    let resource = &summary.entries[0].resource.to_json().unwrap();
    assert!(resource.get("text").is_none() && resource.get("name").is_some());
    assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED");
    let elements = run(&t.db, "Patient?_id=p1&_elements=birthDate");
    let resource = elements.entries[0].resource.to_json().unwrap();
    let object = resource.as_object().unwrap();
    assert!(object.contains_key("birthDate") && !object.contains_key("name"));
}

#[test]
fn every_parameter_type_and_modifier() {
    let t = clinical_db();
    let db = &t.db;
    // token: :text, :of-type, :not, system|
    assert_eq!(keys(db, "Observation?code:text=body").len(), 3);
    assert_eq!(
        keys(db, "Observation?code:text=weight"),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        keys(
            db,
            "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|mrn-p2"
        ),
        ["Patient/p2"]
    );
    assert_eq!(keys(db, "Observation?code:not=29463-7"), ["Observation/o3"]);
    assert_eq!(keys(db, "Observation?code=http://loinc.org|").len(), 3);
    // quantity with and without units, implied precision
    assert_eq!(
        keys(db, "Observation?value-quantity=82.5"),
        ["Observation/o2"]
    );
    assert_eq!(
        keys(
            db,
            "Observation?value-quantity=80|http://unitsofmeasure.org|kg"
        ),
        ["Observation/o1"]
    );
    assert!(
        keys(
            db,
            "Observation?value-quantity=80|http://unitsofmeasure.org|cm"
        )
        .is_empty()
    );
    assert_eq!(
        keys(db, "Observation?value-quantity=ge100||cm"),
        ["Observation/o3"]
    );
    assert_eq!(
        keys(db, "Observation?value-quantity=ap81"),
        ["Observation/o1", "Observation/o2"]
    );
    // date with time zones and precision
    assert_eq!(
        keys(db, "Observation?date=2020-01-01T11:00:00%2B01:00"),
        ["Observation/o1"]
    );
    assert_eq!(
        keys(db, "Observation?date=2021"),
        ["Observation/o2", "Observation/o3"]
    );
    assert_eq!(keys(db, "Observation?date=ne2021"), ["Observation/o1"]);
    // reference forms
    assert_eq!(
        keys(
            db,
            "Observation?subject=http://elsewhere.example/fhir/Patient/p2"
        ),
        ["Observation/o3"]
    );
    assert_eq!(
        keys(db, "Observation?subject:Patient=p2"),
        ["Observation/o3"]
    );
    // composite
    assert_eq!(
        keys(
            db,
            "Observation?code-value-quantity=http://loinc.org|29463-7$gt81"
        ),
        ["Observation/o2"]
    );
    // full text
    assert_eq!(
        keys(db, "Patient?_text=gardening"),
        ["Patient/p1", "Patient/p2", "Patient/p3"]
    );
    assert_eq!(keys(db, "Patient?_text=baker"), ["Patient/p2"]);
    assert_eq!(keys(db, "Patient?_content=mrn-p3"), ["Patient/p3"]);
    // `_content` is text (`string` and `markdown` values, the narrative), as in HAPI: codes,
    // dates, ids and URIs are searched by their own parameters.
    assert_eq!(keys(db, "Observation?_content=body").len(), 3);
    assert!(keys(db, "Patient?_content=female").is_empty());
    assert!(keys(db, "Patient?_content=1965").is_empty());
    assert!(keys(db, "Observation?_content=final").is_empty());
    assert!(keys(db, "Patient?_content=hospital").is_empty());
    // _has and chain
    assert_eq!(
        keys(db, "Patient?_has:Observation:patient:code=8302-2"),
        ["Patient/p2"]
    );
    assert_eq!(
        keys(db, "Observation?patient.birthdate=lt1975"),
        ["Observation/o1", "Observation/o2"]
    );
    // :missing, _type across types, _lastUpdated
    assert_eq!(
        keys(db, "Observation?value-quantity:missing=true"),
        Vec::<String>::new()
    );
    assert_eq!(
        keys(db, "?_type=Patient,Observation&_id=p1,o3"),
        ["Observation/o3", "Patient/p1"]
    );
    // An id has no system: `|id` finds it (without a term of its own), `system|id` does not.
    assert_eq!(
        keys(db, "?_type=Patient,Observation&_id=|p1,|o3"),
        ["Observation/o3", "Patient/p1"]
    );
    assert_eq!(keys(db, "Patient?_id:not=|p1").len(), 2);
    // `_id` without a type, chained, and `:missing` (ids are looked up as keys).
    assert_eq!(keys(db, "?_id=p1"), ["Patient/p1"]);
    assert_eq!(
        keys(db, "Observation?patient._id=p1"),
        keys(db, "Observation?patient=Patient/p1")
    );
    assert!(!keys(db, "Observation?patient._id=p1").is_empty());
    assert_eq!(keys(db, "Patient?_id:missing=false").len(), 3);
    assert!(keys(db, "Patient?_id:missing=true").is_empty());
    // `_sort=_id` across types: the general path (ids from the keys).
    assert_eq!(
        keys(db, "?_type=Patient,Observation&_id=p1,o3&_sort=-_id"),
        ["Patient/p1", "Observation/o3"]
    );
    assert!(keys(db, "Patient?_id=http://x|p1").is_empty());
    assert_eq!(keys(db, "Patient?_lastUpdated=gt2000-01-01").len(), 3);
    assert!(keys(db, "Patient?_lastUpdated=lt2000-01-01").is_empty());
}

#[test]
fn a_value_absent_for_a_reason_is_missing_and_matches_no_value() {
    let t = new_db();
    let absent = json!({"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "asked-declined"}]});
    put(
        &t.db,
        json!({"resourceType": "Patient", "id": "declined", "_birthDate": absent,
            "name": [{"family": "Doe", "given": [null], "_given": [absent]}]}),
    );
    put(&t.db, patient("known", "Roe", "1970-01-01"));
    assert_eq!(
        keys(&t.db, "Patient?birthdate:missing=true"),
        ["Patient/declined"]
    );
    assert_eq!(
        keys(&t.db, "Patient?birthdate:missing=false"),
        ["Patient/known"]
    );
    assert_eq!(keys(&t.db, "Patient?birthdate=le2100"), ["Patient/known"]);
    assert_eq!(
        keys(&t.db, "Patient?given:missing=true"),
        ["Patient/declined"]
    );
    assert_eq!(keys(&t.db, "Patient?family=doe"), ["Patient/declined"]);
}

#[test]
fn lists_and_uris() {
    let t = clinical_db();
    put(
        &t.db,
        json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working",
        "entry": [{"item": {"reference": "Patient/p3"}}, {"item": {"reference": "Patient/p1"}}]}),
    );
    assert_eq!(
        keys(&t.db, "Patient?_list=l1"),
        ["Patient/p1", "Patient/p3"]
    );
    put(
        &t.db,
        json!({"resourceType": "ValueSet", "id": "v1", "status": "draft",
        "url": "http://example.org/fhir/ValueSet/vital/adult"}),
    );
    assert_eq!(
        keys(
            &t.db,
            "ValueSet?url=http://example.org/fhir/ValueSet/vital/adult"
        ),
        ["ValueSet/v1"]
    );
    assert_eq!(
        keys(&t.db, "ValueSet?url:below=http://example.org/fhir/ValueSet"),
        ["ValueSet/v1"]
    );
    assert_eq!(
        keys(
            &t.db,
            "ValueSet?url:above=http://example.org/fhir/ValueSet/vital/adult/extra"
        ),
        ["ValueSet/v1"]
    );
    assert!(keys(&t.db, "ValueSet?url=http://example.org/fhir/ValueSet/vital").is_empty());
}

fn eye_colour_parameter() -> Value {
    search_parameter(
        "eye",
        "eye-colour",
        "Patient",
        "token",
        "Patient.extension('http://example.org/eye').value",
    )
}

#[test]
fn custom_search_parameters_index_new_writes_and_reindex_covers_old_ones() {
    let t = new_db();
    let mut old = patient("old", "Old", "1950");
    old["extension"] = json!([{"url": "http://example.org/eye", "valueCode": "blue"}]);
    put(&t.db, old);
    put(&t.db, eye_colour_parameter());
    let mut new = patient("new", "New", "1990");
    new["extension"] = json!([{"url": "http://example.org/eye", "valueCode": "blue"}]);
    put(&t.db, new);
    assert_eq!(keys(&t.db, "Patient?eye-colour=blue"), ["Patient/new"]);
    t.db.reindex(&ctx()).unwrap();
    assert_eq!(
        keys(&t.db, "Patient?eye-colour=blue"),
        ["Patient/new", "Patient/old"]
    );
    // Known after reopening too.
    let t = reopen(t);
    assert_eq!(
        keys(&t.db, "Patient?eye-colour=blue"),
        ["Patient/new", "Patient/old"]
    );
}

#[test]
fn a_parameter_derived_on_one_type_and_not_on_another_matches_each_by_its_own_values() {
    let t = clinical_db();
    // `combo-code` is derived on Observation (from `code` and `component-code`); here a
    // custom `combo-code` on Condition is its severity, so a Condition whose `code` is the
    // searched code must not match.
    put(
        &t.db,
        search_parameter(
            "sev",
            "combo-code",
            "Condition",
            "token",
            "Condition.severity",
        ),
    );
    put(
        &t.db,
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "severity": {"coding": [{"system": "http://snomed.info/sct", "code": "24484000"}]}}),
    );
    assert_eq!(
        keys(
            &t.db,
            "?_type=Observation,Condition&combo-code=http://loinc.org|29463-7"
        ),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        keys(&t.db, "?_type=Observation,Condition&combo-code=24484000"),
        ["Condition/c1"]
    );
    assert_eq!(
        keys(&t.db, "?_type=Observation,Condition&combo-code:not=29463-7"),
        ["Condition/c1", "Observation/o3"]
    );
}

#[test]
fn a_reference_is_found_by_its_id_alone_whatever_form_it_was_written_in() {
    let t = new_db();
    let with_subject = |id: &str, reference: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final",
               "code": {"text": "x"}, "subject": {"reference": reference}})
    };
    put(
        &t.db,
        with_subject("abs", "http://other.example/fhir/Patient/p9"),
    );
    put(&t.db, with_subject("hist", "Patient/p8/_history/3"));
    put(&t.db, with_subject("local", "Patient/p7"));
    put(&t.db, with_subject("group", "Group/p7"));
    put(&t.db, with_subject("bare", "p6"));
    for (query, expected) in [
        ("Observation?subject=p9", vec!["Observation/abs"]),
        ("Observation?subject=Patient/p9", vec!["Observation/abs"]),
        (
            "Observation?subject=http://other.example/fhir/Patient/p9",
            vec!["Observation/abs"],
        ),
        ("Observation?subject=p8", vec!["Observation/hist"]),
        ("Observation?patient=p8", vec!["Observation/hist"]),
        // `subject` may point to a Group, `patient` only to a Patient.
        (
            "Observation?subject=p7",
            vec!["Observation/group", "Observation/local"],
        ),
        ("Observation?patient=p7", vec!["Observation/local"]),
        ("Observation?subject:Group=p7", vec!["Observation/group"]),
        // Written as a bare id (not a valid FHIR reference, but stored as given).
        ("Observation?subject=p6", vec!["Observation/bare"]),
        ("Observation?subject=nobody", vec![]),
    ] {
        assert_eq!(keys(&t.db, query), expected, "{query}");
    }
    // A composite's reference part is matched as written, bare id included. (R4's own
    // `relationship` pairs each component's type with the other's expression, so this is a
    // custom one with them the right way round.)
    let mut target_relation = search_parameter(
        "tr",
        "target-relation",
        "DocumentReference",
        "composite",
        "DocumentReference.relatesTo",
    );
    target_relation["component"] = json!([
        {"definition": "http://hl7.org/fhir/SearchParameter/DocumentReference-relatesto",
         "expression": "target"},
        {"definition": "http://hl7.org/fhir/SearchParameter/DocumentReference-relation",
         "expression": "code"}]);
    put(&t.db, target_relation);
    put(
        &t.db,
        json!({"resourceType": "DocumentReference", "id": "d1", "status": "current",
        "content": [{"attachment": {"url": "http://example.org/d1"}}],
        "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/d0"}}]}),
    );
    for query in [
        "DocumentReference?target-relation=d0$replaces",
        "DocumentReference?target-relation=DocumentReference/d0$replaces",
    ] {
        assert_eq!(keys(&t.db, query), ["DocumentReference/d1"], "{query}");
    }
}

#[test]
fn a_composite_of_one_focus_matches_like_one_of_combinations() {
    let t = new_db();
    // The same code on two types: on Patient one focus (the resource: indexed by component),
    // on Group one focus per characteristic (indexed by combination).
    let mut on_patient = search_parameter("gb", "gender-born", "Patient", "composite", "Patient");
    on_patient["component"] = json!([
        {"definition": "http://hl7.org/fhir/SearchParameter/individual-gender", "expression": "gender"},
        {"definition": "http://hl7.org/fhir/SearchParameter/individual-birthdate", "expression": "birthDate"}]);
    let mut on_group = search_parameter(
        "gbg",
        "gender-born",
        "Group",
        "composite",
        "Group.characteristic",
    );
    on_group["component"] = json!([
        {"definition": "http://hl7.org/fhir/SearchParameter/Group-characteristic", "expression": "code"},
        {"definition": "http://hl7.org/fhir/SearchParameter/individual-birthdate", "expression": "value.as(Period)"}]);
    put(&t.db, on_patient);
    put(&t.db, on_group);
    let mut female = patient("f", "Fay", "1974-12-25");
    female["gender"] = json!("female");
    let mut male = patient("m", "Mo", "1980-01-02");
    male["gender"] = json!("male");
    let mut unknown = patient("u", "Ux", "1974-12-25");
    unknown.as_object_mut().unwrap().remove("gender");
    put(&t.db, female);
    put(&t.db, male);
    put(&t.db, unknown);
    // Two characteristics: each pair of code and period must come from the same one.
    put(
        &t.db,
        json!({"resourceType": "Group", "id": "g", "type": "person", "actual": false,
               "characteristic": [
                   {"code": {"text": "a", "coding": [{"code": "female"}]}, "exclude": false,
                    "valuePeriod": {"start": "1970-01-01", "end": "1975-12-31"}},
                   {"code": {"text": "b", "coding": [{"code": "male"}]}, "exclude": false,
                    "valuePeriod": {"start": "1980-01-01", "end": "1980-12-31"}}]}),
    );
    for (query, expected) in [
        ("Patient?gender-born=female$1974", vec!["Patient/f"]),
        ("Patient?gender-born=female$ge1974-12-25", vec!["Patient/f"]),
        ("Patient?gender-born=female$1980", vec![]),
        ("Patient?gender-born=male$1980-01-02", vec!["Patient/m"]),
        ("Patient?gender-born=male$lt1980", vec![]),
        // No gender: no value of the composite, though the date matches.
        ("Patient?gender-born:missing=true", vec!["Patient/u"]),
        ("Group?gender-born=female$ge1975", vec!["Group/g"]),
        ("Group?gender-born=male$ge1981", vec![]),
        // `female` with `male`'s period: the pairs come from different characteristics.
        ("Group?gender-born=female$ge1980", vec![]),
        (
            "?_type=Patient,Group&gender-born=female$ge1974",
            vec!["Group/g", "Patient/f"],
        ),
        (
            "?_type=Patient,Group&gender-born=male$ge1980",
            vec!["Group/g", "Patient/m"],
        ),
    ] {
        assert_eq!(keys(&t.db, query), expected, "{query}");
    }
}

#[test]
fn minute_and_second_searches_are_exact_when_a_day_holds_several_values() {
    let t = new_db();
    put(
        &t.db,
        search_parameter(
            "stay",
            "stay",
            "Patient",
            "date",
            "Patient.extension('http://example.org/stay').value",
        ),
    );
    let stays = |id: &str, values: Vec<Value>| {
        let extension: Vec<Value> = values
            .into_iter()
            .map(|value| {
                let key = if value.is_string() {
                    "valueDateTime"
                } else {
                    "valuePeriod"
                };
                json!({"url": "http://example.org/stay", key: value})
            })
            .collect();
        put(
            &t.db,
            json!({"resourceType": "Patient", "id": id, "extension": extension}),
        );
    };
    let period = |start: &str, end: &str| json!({"start": start, "end": end});
    // Two stays of one day whose bounds bracket 10:00, neither within that minute.
    stays(
        "bracketing",
        vec![
            period("2020-01-01T10:00:30Z", "2020-01-01T11:00:00Z"),
            period("2020-01-01T09:00:00Z", "2020-01-01T10:00:40Z"),
        ],
    );
    stays(
        "alone",
        vec![period("2020-01-01T10:00:10Z", "2020-01-01T10:00:50Z")],
    );
    stays(
        "crowded",
        vec![
            period("2020-01-01T10:00:10Z", "2020-01-01T10:00:50Z"),
            period("2020-01-01T15:00:00Z", "2020-01-01T16:00:00Z"),
        ],
    );
    stays("second", vec![json!("2020-01-01T10:00:20Z")]);
    stays(
        "second-crowded",
        vec![json!("2020-01-01T10:00:20Z"), json!("2020-01-01T23:00:00Z")],
    );
    stays("other-day", vec![json!("2020-01-02T10:00:20Z")]);
    // To the microsecond: a point value, one term for both bounds.
    stays("point", vec![json!("2020-01-01T10:00:20.123456Z")]);
    for (query, expected) in [
        (
            "Patient?stay=2020-01-01T10:00",
            vec![
                "Patient/alone",
                "Patient/crowded",
                "Patient/point",
                "Patient/second",
                "Patient/second-crowded",
            ],
        ),
        (
            "Patient?stay=2020-01-01T10:00:20Z",
            vec!["Patient/point", "Patient/second", "Patient/second-crowded"],
        ),
        (
            "Patient?stay=2020-01-01T11:00:20%2B01:00",
            vec!["Patient/point", "Patient/second", "Patient/second-crowded"],
        ),
        (
            "Patient?stay=2020-01-01T10:00:20.123456Z",
            vec!["Patient/point"],
        ),
        ("Patient?stay=2020-01-01T10:00:20.123457Z", vec![]),
        // Each prefix on its own bound (gt: ends after, lt: starts before, ...), expected
        // lists as tools/gen_search_fixtures.py's reading of the rules gives them.
        (
            "Patient?stay=gt2020-01-01T10:00:20.123455Z&stay=lt2020-01-01T10:00:20.2Z",
            vec![
                "Patient/alone",
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/point",
                "Patient/second",
                "Patient/second-crowded",
            ],
        ),
        (
            "Patient?stay=ge2020-01-01T10:00:20.123456Z&stay=le2020-01-01T10:00:20.123456Z",
            vec![
                "Patient/alone",
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/point",
                "Patient/second",
                "Patient/second-crowded",
            ],
        ),
        (
            "Patient?stay=sa2020-01-01T10:00:20.123455Z",
            vec![
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/other-day",
                "Patient/point",
                "Patient/second-crowded",
            ],
        ),
        (
            "Patient?stay=eb2020-01-01T10:00:20.123457Z",
            vec!["Patient/point"],
        ),
        (
            "Patient?stay=sa2020-01-01T10:00:20.123455Z&stay=eb2020-01-01T10:00:20.123457Z",
            vec!["Patient/point"],
        ),
        (
            "Patient?stay=sa2020-01-01T10:00:20.123456Z&stay=lt2020-01-02",
            vec![
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/second-crowded",
            ],
        ),
        ("Patient?stay=gt2020-01-03", vec![]),
        (
            "Patient?stay=lt2020-01-01T10:00:21Z&stay=ge2020-01-01T10:00:20.1Z",
            vec![
                "Patient/alone",
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/point",
                "Patient/second",
                "Patient/second-crowded",
            ],
        ),
        ("Patient?stay=2020-01-01T10:01", vec![]),
        (
            "Patient?stay=2020-01-01",
            vec![
                "Patient/alone",
                "Patient/bracketing",
                "Patient/crowded",
                "Patient/point",
                "Patient/second",
                "Patient/second-crowded",
            ],
        ),
    ] {
        assert_eq!(keys(&t.db, query), expected, "{query}");
    }
}

/// Nice values of this process's threads whose name starts with `prefix` (Linux `/proc`).
#[cfg(target_os = "linux")]
fn nice_of_threads(prefix: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if name.starts_with(prefix) {
            // Fields after the name in parentheses: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            out.push(rest.split(' ').nth(16).unwrap().parse().unwrap());
        }
    }
    out
}

#[cfg(target_os = "linux")]
#[test]
fn index_work_runs_below_the_priority_of_the_caller() {
    let own_nice = || -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .nth(16)
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = own_nice();
    let t = clinical_db();
    // A search commits the index: tantivy starts its indexing worker again then.
    assert_eq!(keys(&t.db, "Patient?family=baker"), ["Patient/p2"]);
    let floor = before.max(10);
    let workers = nice_of_threads("thrd-tantivy-in");
    assert!(!workers.is_empty());
    assert!(workers.iter().all(|&nice| nice >= floor), "{workers:?}");
    let extractors = nice_of_threads("fhirkeep-index-");
    assert!(!extractors.is_empty());
    assert!(
        extractors.iter().all(|&nice| nice >= floor),
        "{extractors:?}"
    );
    // The caller's own thread keeps its priority.
    assert_eq!(own_nice(), before);
}

#[test]
fn searches_are_audited_as_one_leaf_with_a_hash() {
    let t = clinical_db();
    t.db.store().flush_audit().unwrap();
    let before = t.db.store().audit_size().unwrap();
    let result = run(
        &t.db,
        "Observation?subject=Patient/p1&_include=Observation:subject",
    );
    assert_eq!(result.entries.len(), 3);
    t.db.store().flush_audit().unwrap();
    let after = t.db.store().audit_size().unwrap();
    assert_eq!(after, before + 1);
    let leaf = t.db.store().audit_leaf(before).unwrap();
    assert_eq!(
        leaf.record.action,
        fhirkeep_engine::audit::AuditAction::Search
    );
    assert!(leaf.record.query_hash.is_some());
    // A refused search is recorded too.
    let request = parse_search_url(
        &t.db.registry().unwrap(),
        "Patient?_list=not/valid",
        Handling::Strict,
    )
    .unwrap();
    assert!(t.db.search(&ctx(), &request).is_err());
    t.db.store().flush_audit().unwrap();
    assert!(t.db.store().audit_size().unwrap() > after);
}

#[test]
fn errors_on_bad_input_hold_no_values() {
    let t = clinical_db();
    for (query, fragment) in [
        ("Patient?birthdate=ge19x0", "birthdate"),
        ("Patient?family:exact:x=1", "family"),
        ("Patient?unknown-param=secret", "unknown-param"),
        ("Observation?value-quantity=abc", "value-quantity"),
    ] {
        match parse_search_url(&t.db.registry().unwrap(), query, Handling::Strict) {
            Err(Error::InvalidSearch(message)) => {
                assert!(message.contains(fragment), "{message}");
                assert!(!message.contains("secret"), "{message}");
            }
            other => panic!("{query}: {other:?}"),
        }
    }
    let _ = t.dir.path();
}

#[test]
fn no_file_of_the_database_holds_resource_or_index_content_in_plaintext() {
    let t = new_db();
    let canary = "Quagga-Canary-93f1-Zebu";
    for i in 0..50 {
        put(
            &t.db,
            patient(&format!("c{i}"), &format!("{canary}{i}"), "1970"),
        );
    }
    assert_eq!(keys(&t.db, "Patient?family=quagga-canary").len(), 50);
    assert_eq!(keys(&t.db, "Patient?_content=quagga").len(), 50);
    let TestDb { dir, db } = t;
    drop(db);
    let mut needles: Vec<Vec<u8>> = vec![
        canary.as_bytes().to_vec(),
        canary.to_lowercase().into_bytes(),
        b"quagga".to_vec(),
        canary.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        canary.encode_utf16().flat_map(u16::to_be_bytes).collect(),
    ];
    use base64::Engine as _;
    for shift in 0..3 {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}{canary}", "x".repeat(shift)));
        let start = (shift * 4).div_ceil(3) + 1;
        needles.push(encoded.as_bytes()[start..encoded.len() - 4].to_vec());
    }
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path().join("db")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds content in plaintext",
                path.display()
            );
        }
    }
    assert!(
        files >= 3,
        "expected the store, the index and the key header, found {files} files"
    );
}

#[test]
fn in_and_not_in_use_stored_value_sets() {
    let t = clinical_db();
    put(
        &t.db,
        json!({"resourceType": "ValueSet", "id": "weights", "status": "active",
        "url": "http://example.org/ValueSet/weights",
        "compose": {"include": [{"system": "http://loinc.org", "concept": [{"code": "29463-7"}, {"code": "3141-9"}]}]}}),
    );
    put(
        &t.db,
        json!({"resourceType": "CodeSystem", "id": "local", "status": "active", "content": "complete",
        "url": "http://example.org/cs", "concept": [{"code": "a", "concept": [{"code": "a1"}]}]}),
    );
    put(
        &t.db,
        json!({"resourceType": "ValueSet", "id": "local-all", "status": "active",
        "url": "http://example.org/ValueSet/local", "compose": {"include": [{"system": "http://example.org/cs"}]}}),
    );
    assert_eq!(
        keys(
            &t.db,
            "Observation?code:in=http://example.org/ValueSet/weights"
        ),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        keys(&t.db, "Observation?code:in=ValueSet/weights"),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        keys(
            &t.db,
            "Observation?code:not-in=http://example.org/ValueSet/weights"
        ),
        ["Observation/o3"]
    );
    let mut coded = observation("o9", "p3", "x", 1.0, "kg", "2022");
    coded["code"]["coding"][0] = json!({"system": "http://example.org/cs", "code": "a1"});
    put(&t.db, coded);
    assert_eq!(
        keys(
            &t.db,
            "Observation?code:in=http://example.org/ValueSet/local"
        ),
        ["Observation/o9"]
    );
    let missing = parse_search_url(
        &t.db.registry().unwrap(),
        "Observation?code:in=http://nowhere/vs",
        Handling::Strict,
    )
    .unwrap();
    assert!(matches!(
        t.db.search(&ctx(), &missing),
        Err(Error::InvalidSearch(_))
    ));
}

/// Builds the clinical database, does `damage` to its index while it is closed (given the
/// test directory), reopens it, and checks that searches answer from the store's data.
fn assert_rebuilt_on_open(damage: impl FnOnce(&Path)) {
    let TestDb { dir, db } = clinical_db();
    drop(db);
    damage(dir.path());
    let db = Database::builder(dir.path().join("db"))
        .key(key_source(dir.path()))
        .open()
        .unwrap();
    assert_eq!(
        keys(&db, "Observation?patient=p1"),
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(keys(&db, "Patient?_count=2"), ["Patient/p1", "Patient/p2"]);
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_store_on_open() {
    assert_rebuilt_on_open(|dir| {
        let index_file = dir.join("db").join("index.redb");
        assert!(index_file.exists());
        std::fs::remove_file(&index_file).unwrap();
    });
}

#[test]
fn an_index_of_the_previous_schema_version_is_rebuilt_from_the_store_on_open() {
    assert_rebuilt_on_open(|dir| {
        // Mark the index as written by schema version 9 (the FST term dictionary), as a
        // database from before version 10 has it, and as holding every change but no
        // document: only a rebuild from the store answers the searches.
        let store = fhirkeep_engine::store::Store::builder(dir.join("db"))
            .key(key_source(dir))
            .open()
            .unwrap();
        let directory = fhirkeep_query::directory::RedbDirectory::new(
            store.open_aux_database("index").unwrap(),
        )
        .unwrap();
        let index = tantivy::Index::open(directory).unwrap();
        let mut writer: tantivy::IndexWriter =
            index.writer_with_num_threads(1, 15_000_000).unwrap();
        writer.delete_all_documents().unwrap();
        let mut prepared = writer.prepare_commit().unwrap();
        prepared.set_payload(&format!("fhirkeep-index v9 seq {}", u64::MAX));
        prepared.commit().unwrap();
    });
}

/// Every page of `query` (`_count` in it), following next links.
fn all_pages(db: &Database, query: &str) -> Vec<String> {
    let mut request = parse_search_url(&db.registry().unwrap(), query, Handling::Strict).unwrap();
    let mut out = Vec::new();
    loop {
        let page = db.search(&ctx(), &request).unwrap();
        out.extend(page.entries.iter().map(|e| e.key.clone()));
        match page.next_cursor {
            Some(cursor) => request.cursor = Some(cursor),
            None => return out,
        }
    }
}

#[test]
fn single_key_sorts_agree_with_the_general_sort_across_pages() {
    let t = new_db();
    let families = ["Baker", "able", "Chalk", "Baker", "Ähm", "zed"];
    for i in 0..23 {
        let mut p = patient(
            &format!("p{i:02}"),
            families[i % families.len()],
            &format!("19{:02}", 50 + i % 7),
        );
        if i % 5 == 0 {
            p.as_object_mut().unwrap().remove("birthDate");
        }
        if i % 3 == 0 {
            p["gender"] = json!("male");
        }
        put(&t.db, p);
    }
    for key in [
        "family",
        "-family",
        "birthdate",
        "-birthdate",
        "gender",
        "-gender",
        "_lastUpdated",
        "-_lastUpdated",
        "_id",
        "-_id",
    ] {
        // `_id` as a second key breaks ties like the key order does, through the general path.
        let fast = all_pages(&t.db, &format!("Patient?_sort={key}&_count=4"));
        let general = all_pages(&t.db, &format!("Patient?_sort={key},_id&_count=4"));
        assert_eq!(fast.len(), 23, "{key}");
        assert_eq!(fast, general, "{key}");
    }
    // Backward from the last page gives the same sequence reversed page by page.
    let mut request = parse_search_url(
        &t.db.registry().unwrap(),
        "Patient?_sort=-birthdate&_count=5",
        Handling::Strict,
    )
    .unwrap();
    let mut forward_pages = Vec::new();
    let last = loop {
        let page = t.db.search(&ctx(), &request).unwrap();
        forward_pages.push(
            page.entries
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
        );
        match page.next_cursor.clone() {
            Some(cursor) => request.cursor = Some(cursor),
            None => break page,
        }
    };
    let mut backward_pages = vec![forward_pages.last().unwrap().clone()];
    let mut page = last;
    while let Some(cursor) = page.previous_cursor.clone() {
        request.cursor = Some(cursor);
        page = t.db.search(&ctx(), &request).unwrap();
        backward_pages.push(page.entries.iter().map(|e| e.key.clone()).collect());
    }
    backward_pages.reverse();
    assert_eq!(backward_pages, forward_pages);
}

#[test]
fn common_parameters_deep_chains_nested_has_and_wildcard_includes() {
    let t = clinical_db();
    let db = &t.db;
    put(
        db,
        json!({"resourceType": "Practitioner", "id": "dr", "name": [{"family": "House"}]}),
    );
    let mut p1 = patient("p1", "Chalmers", "1974-12-25");
    p1["generalPractitioner"] = json!([{"reference": "Practitioner/dr"}]);
    p1["meta"] = json!({"tag": [{"system": "http://example.org/tags", "code": "vip"}],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
        "profile": ["http://example.org/StructureDefinition/special-patient"],
        "source": "http://example.org/feeds/ward-7"});
    put(db, p1);
    put(
        db,
        json!({"resourceType": "Provenance", "id": "prov", "recorded": "2021-01-01T00:00:00Z",
        "target": [{"reference": "Observation/o1"}], "agent": [{"who": {"reference": "Practitioner/dr"}}]}),
    );

    assert_eq!(
        keys(db, "Patient?_tag=http://example.org/tags|vip"),
        ["Patient/p1"]
    );
    assert_eq!(keys(db, "Patient?_security=R"), ["Patient/p1"]);
    assert_eq!(
        keys(
            db,
            "Patient?_profile=http://example.org/StructureDefinition/special-patient"
        ),
        ["Patient/p1"]
    );
    assert_eq!(
        keys(db, "Patient?_source=http://example.org/feeds/ward-7"),
        ["Patient/p1"]
    );
    // Two levels of chaining: Observation -> Patient -> Practitioner.
    assert_eq!(
        keys(db, "Observation?patient.general-practitioner.name=house"),
        ["Observation/o1", "Observation/o2"]
    );
    // Nested reverse chaining: patients with an observation that a provenance targets.
    assert_eq!(
        keys(
            db,
            "Patient?_has:Observation:patient:_has:Provenance:target:agent=Practitioner/dr"
        ),
        ["Patient/p1"]
    );
    // `_include=Type:*` follows every reference parameter.
    let wildcard = run(db, "Provenance?_id=prov&_include=Provenance:*");
    let mut included: Vec<&str> = wildcard
        .entries
        .iter()
        .filter(|e| e.mode == EntryMode::Include)
        .map(|e| e.key.as_str())
        .collect();
    included.sort();
    assert_eq!(included, ["Observation/o1", "Practitioner/dr"]);
}

#[test]
fn page_sizes_are_capped_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::builder(dir.path().join("db"))
        .key(key_source(dir.path()))
        .limits(fhirkeep_query::SearchLimits {
            max_count: 3,
            ..Default::default()
        })
        .create()
        .unwrap();
    for i in 0..5 {
        put(&db, patient(&format!("p{i}"), "Same", "1970"));
    }
    let result = run(&db, "Patient?_count=100");
    assert_eq!(result.entries.len(), 3);
    assert_eq!(result.total, Some(5));
    assert!(result.next_cursor.is_some());
}

#[test]
fn date_prefixes_agree_with_brute_force_on_every_calendar_class() {
    use fhirkeep_query::values::parse_fhir_date;
    let t = new_db();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    // Values of every class: days, months, years, instants, and periods inside a day, a
    // month, a year, across years and open-ended.
    let mut values: Vec<(String, Value)> = Vec::new();
    for i in 0..120 {
        let (y, m, d, h) = (2019 + next(3) as i32, 1 + next(12), 1 + next(28), next(24));
        let effective = match i % 8 {
            0 => json!({"effectiveDateTime": format!("{y}-{m:02}-{d:02}")}),
            1 => json!({"effectiveDateTime": format!("{y}-{m:02}")}),
            2 => json!({"effectiveDateTime": format!("{y}")}),
            3 => json!({"effectiveDateTime": format!("{y}-{m:02}-{d:02}T{h:02}:15:00Z")}),
            4 => {
                json!({"effectivePeriod": {"start": format!("{y}-{m:02}-{d:02}T01:00:00Z"), "end": format!("{y}-{m:02}-{d:02}T05:00:00Z")}})
            }
            5 => {
                json!({"effectivePeriod": {"start": format!("{y}-{m:02}-01"), "end": format!("{y}-{m:02}-{:02}", 1 + next(27))}})
            }
            6 => {
                json!({"effectivePeriod": {"start": format!("{y}-01-15"), "end": format!("{y}-{:02}-02", 2 + next(11))}})
            }
            _ => {
                if next(2) == 0 {
                    json!({"effectivePeriod": {"start": format!("{y}-{m:02}-{d:02}"), "end": format!("{}-02-03", y + 1)}})
                } else {
                    json!({"effectivePeriod": {"start": format!("{y}-{m:02}-{d:02}")}})
                }
            }
        };
        let id = format!("o{i}");
        let mut resource = json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"}});
        for (k, v) in effective.as_object().unwrap() {
            resource[k] = v.clone();
        }
        put(&t.db, resource.clone());
        values.push((format!("Observation/{id}"), effective));
    }
    let range_of = |effective: &Value| -> (i64, i64) {
        if let Some(text) = effective.get("effectiveDateTime").and_then(Value::as_str) {
            let r = parse_fhir_date(text).unwrap().range;
            return (r.low, r.high);
        }
        let period = &effective["effectivePeriod"];
        let low = period["start"]
            .as_str()
            .map_or(i64::MIN, |s| parse_fhir_date(s).unwrap().range.low);
        let high = period["end"]
            .as_str()
            .map_or(i64::MAX, |s| parse_fhir_date(s).unwrap().range.high);
        (low, high)
    };
    let mut checked = 0;
    for _ in 0..60 {
        let (y, m, d) = (2019 + next(3) as i32, 1 + next(12), 1 + next(28));
        let point = match next(4) {
            0 => format!("{y}"),
            1 => format!("{y}-{m:02}"),
            2 => format!("{y}-{m:02}-{d:02}"),
            _ => format!("{y}-{m:02}-{d:02}T{:02}:30:00Z", next(24)),
        };
        let x = parse_fhir_date(&point).unwrap().range;
        for prefix in ["ge", "gt", "le", "lt", "sa", "eb", "eq", "ne"] {
            let mut expected: Vec<String> = values
                .iter()
                .filter(|(_, e)| {
                    let (low, high) = range_of(e);
                    match prefix {
                        "ge" => high >= x.low,
                        "gt" => high > x.high,
                        "le" => low <= x.high,
                        "lt" => low < x.low,
                        "sa" => low > x.high,
                        "eb" => high < x.low,
                        "eq" => low >= x.low && high <= x.high,
                        _ => !(low >= x.low && high <= x.high),
                    }
                })
                .map(|(k, _)| k.clone())
                .collect();
            expected.sort();
            let found = all_pages(
                &t.db,
                &format!(
                    "Observation?date={prefix}{}&_count=1000",
                    point.replace('+', "%2B")
                ),
            );
            assert_eq!(found, expected, "date={prefix}{point}");
            checked += 1;
        }
    }
    assert_eq!(checked, 480);
}

fn upsert(resource: Value) -> fhirkeep_engine::store::Upsert {
    fhirkeep_engine::store::Upsert {
        resource_type: resource["resourceType"].as_str().unwrap().to_string(),
        id: resource["id"].as_str().map(str::to_string),
        resource,
        expected_version: None,
    }
}

#[test]
fn bulk_loads_index_every_batch_by_the_flush_and_by_the_next_open() {
    let t = new_db();
    // Enough resources per batch that the extraction runs on several threads, with a
    // SearchParameter in the middle of a batch: it applies to the resources after it in the
    // same batch, and not to those before it (until a reindex).
    let eye = |id: &str| {
        let mut p = patient(id, "Bulk", "1970");
        p["extension"] = json!([{"url": "http://example.org/eye", "valueCode": "green"}]);
        p
    };
    let mut first: Vec<_> = (0..300).map(|i| upsert(eye(&format!("a{i}")))).collect();
    first.insert(150, upsert(eye_colour_parameter()));
    let second: Vec<_> = (0..300).map(|i| upsert(eye(&format!("b{i}")))).collect();
    // Version 2 of resources loaded in the first batch: the old documents must go.
    let third: Vec<_> = (0..100)
        .map(|i| upsert(patient(&format!("a{i}"), "Renamed", "1970")))
        .collect();
    for batch in [first, second, third] {
        let results = t.db.load_many(&ctx(), batch).unwrap();
        assert!(results.iter().all(Result::is_ok));
    }
    t.db.flush_index().unwrap();
    let count = |db: &Database, query: &str| run(db, &format!("{query}&_total=accurate")).total;
    assert_eq!(count(&t.db, "Patient?family=Bulk"), Some(500));
    assert_eq!(count(&t.db, "Patient?family=Renamed"), Some(100));
    // a150..a299 (after the definition) and every b.
    assert_eq!(count(&t.db, "Patient?eye-colour=green"), Some(450));

    // Loaded but never flushed: dropping or reopening brings the index in line.
    let batch: Vec<_> = (0..200)
        .map(|i| upsert(patient(&format!("c{i}"), "Late", "1980")))
        .collect();
    t.db.load_many(&ctx(), batch).unwrap();
    let t = reopen(t);
    assert_eq!(count(&t.db, "Patient?family=Late"), Some(200));
    assert_eq!(count(&t.db, "Patient?family=Bulk"), Some(500));

    // Batches that each index the one before while they write: every document must be its
    // own resource's, and the newest version's.
    let named = |id: &str, family: &str| upsert(patient(id, family, "1990"));
    let batches = [
        (0..300)
            .map(|i| named(&format!("d{i}"), &format!("fam{i}")))
            .collect::<Vec<_>>(),
        (0..300)
            .map(|i| named(&format!("d{i}"), &format!("new{i}")))
            .collect(),
        (0..10)
            .map(|i| named(&format!("e{i}"), &format!("fam{i}")))
            .collect(),
    ];
    for batch in batches {
        assert!(
            t.db.load_many(&ctx(), batch)
                .unwrap()
                .iter()
                .all(Result::is_ok)
        );
    }
    t.db.flush_index().unwrap();
    for i in [0, 7, 150, 299] {
        assert_eq!(
            keys(&t.db, &format!("Patient?family:exact=new{i}")),
            [format!("Patient/d{i}")]
        );
        let expected: Vec<String> = if i < 10 {
            vec![format!("Patient/e{i}")]
        } else {
            Vec::new()
        };
        assert_eq!(
            keys(&t.db, &format!("Patient?family:exact=fam{i}")),
            expected
        );
    }

    // A load's versions are indexed from what it wrote, other writes' from the store, in
    // the feed's order: a delete and an update between two loads, and a search before the
    // second load's versions are indexed.
    let handed: Vec<_> = (0..100)
        .map(|i| named(&format!("h{i}"), "Handed"))
        .collect();
    t.db.load_many(&ctx(), handed).unwrap();
    t.db.delete(&ctx(), "Patient", "h5", None).unwrap();
    put(&t.db, patient("h6", "Between", "1990"));
    assert_eq!(count(&t.db, "Patient?family=Handed"), Some(98));
    let again: Vec<_> = (7..9).map(|i| named(&format!("h{i}"), "Again")).collect();
    t.db.load_many(&ctx(), again).unwrap();
    t.db.delete(&ctx(), "Patient", "h7", None).unwrap();
    t.db.flush_index().unwrap();
    assert_eq!(count(&t.db, "Patient?family=Handed"), Some(96));
    assert_eq!(keys(&t.db, "Patient?family=Between"), ["Patient/h6"]);
    assert_eq!(keys(&t.db, "Patient?family=Again"), ["Patient/h8"]);
    assert!(keys(&t.db, "Patient?_id=h5,h7").is_empty());
}
