//! Group commit of concurrent writes: writers release the write lock after their store commit
//! and share index commits, yet each write is searchable when its call returns, conditional
//! interactions still see every earlier write, and nothing is lost across a reopen. Each test
//! runs real threads against a real encrypted database in a temporary directory.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::sync::Barrier;

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_query::{ConditionalOutcome, Database, EntryMode};
use serde_json::{Value, json};

const THREADS: usize = 8;
const PER_THREAD: usize = 15;
const SYSTEM: &str = "http://example.org/group";

fn key_source(dir: &Path) -> KeySource {
    let key = dir.join("key");
    if !key.exists() {
        create_key_file(&key).unwrap();
    }
    KeySource::KeyFile(key)
}

fn open(dir: &Path) -> Database {
    Database::builder(dir.join("db"))
        .key(key_source(dir))
        .open_or_create()
        .unwrap()
}

fn ctx() -> AccessContext {
    AccessContext::new("tester", "test-app", "127.0.0.1", "req-1")
}

/// The keys of the matches of `query`.
fn keys(db: &Database, query: &str) -> Vec<String> {
    let request = parse_search_url(&db.registry().unwrap(), query, Handling::Strict)
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    db.search(&ctx(), &request)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .entries
        .iter()
        .filter(|e| e.mode == EntryMode::Match)
        .map(|e| e.key.clone())
        .collect()
}

fn patient_with(value: &str) -> Value {
    json!({"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}],
           "name": [{"family": "Group"}]})
}

/// Runs `work(db, thread)` on [`THREADS`] threads that start at the same moment.
fn on_threads(db: &Database, work: impl Fn(&Database, usize) + Sync) {
    let start = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (start, work) = (&start, &work);
            scope.spawn(move || {
                start.wait();
                work(db, thread);
            });
        }
    });
}

#[test]
fn concurrent_writers_each_find_their_own_write_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    on_threads(&db, |db, thread| {
        for n in 0..PER_THREAD {
            let value = format!("t{thread}-n{n}");
            let created = db.create(&ctx(), patient_with(&value)).unwrap();
            // Read-your-writes: no flush, no retry.
            let found = keys(db, &format!("Patient?identifier={SYSTEM}|{value}"));
            assert_eq!(found, vec![format!("Patient/{}", created.id)], "{value}");
        }
    });
    let all = format!("Patient?identifier={SYSTEM}|&_count=1000");
    assert_eq!(keys(&db, &all).len(), THREADS * PER_THREAD);
    drop(db);
    // The index committed on the way is the one a reopen starts from: still every write.
    let db = open(dir.path());
    assert_eq!(keys(&db, &all).len(), THREADS * PER_THREAD);
}

#[test]
fn concurrent_updates_and_deletes_are_visible_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    on_threads(&db, |db, thread| {
        for n in 0..PER_THREAD {
            let id = format!("u{thread}-{n}");
            let mut body = patient_with(&format!("old-{id}"));
            body["id"] = json!(id);
            db.update(&ctx(), "Patient", &id, body.clone(), None)
                .unwrap();
            body["identifier"][0]["value"] = json!(format!("new-{id}"));
            db.update(&ctx(), "Patient", &id, body, None).unwrap();
            let old = keys(db, &format!("Patient?identifier={SYSTEM}|old-{id}"));
            assert!(old.is_empty(), "{id}: the replaced version still matches");
            let new = keys(db, &format!("Patient?identifier={SYSTEM}|new-{id}"));
            assert_eq!(new, vec![format!("Patient/{id}")]);
            db.delete(&ctx(), "Patient", &id, None).unwrap();
            let gone = keys(db, &format!("Patient?identifier={SYSTEM}|new-{id}"));
            assert!(gone.is_empty(), "{id}: deleted but still found");
        }
    });
}

#[test]
fn concurrent_if_none_exist_creates_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // Many rounds, each racing all threads on one new identifier, while other writers keep
    // the index behind the store (the case where a condition could miss a fresh write).
    for round in 0..5 {
        let value = format!("same-{round}");
        let condition = format!("identifier={SYSTEM}|{value}");
        let start = Barrier::new(THREADS * 2);
        let outcomes: Vec<ConditionalOutcome> = std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (db, start) = (&db, &start);
                scope.spawn(move || {
                    start.wait();
                    for n in 0..3 {
                        db.create(&ctx(), patient_with(&format!("noise-{round}-{thread}-{n}")))
                            .unwrap();
                    }
                });
            }
            let racers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (db, start, value, condition) = (&db, &start, &value, &condition);
                    scope.spawn(move || {
                        start.wait();
                        db.conditional_create(&ctx(), patient_with(value), condition)
                            .unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let created: Vec<String> = outcomes
            .iter()
            .filter_map(|o| match o {
                ConditionalOutcome::Created(stored) => Some(stored.id.clone()),
                ConditionalOutcome::Existing(_) => None,
            })
            .collect();
        assert_eq!(created.len(), 1, "round {round}: {created:?}");
        for outcome in &outcomes {
            if let ConditionalOutcome::Existing(stored) = outcome {
                assert_eq!(stored.id, created[0], "round {round}");
            }
        }
        let found = keys(&db, &format!("Patient?{condition}"));
        assert_eq!(
            found,
            vec![format!("Patient/{}", created[0])],
            "round {round}"
        );
    }
}

#[test]
fn concurrent_transactions_with_if_none_exist_create_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    on_threads(&db, |db, thread| {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:0b3c0b52-0000-4000-8000-000000000001",
             "resource": patient_with("shared"),
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": format!("identifier={SYSTEM}|shared")}},
            {"resource": patient_with(&format!("own-{thread}")),
             "request": {"method": "POST", "url": "Patient"}}
        ]});
        db.process_bundle(&ctx(), &bundle, "http://localhost/fhir")
            .unwrap();
        let own = keys(db, &format!("Patient?identifier={SYSTEM}|own-{thread}"));
        assert_eq!(own.len(), 1, "thread {thread}: own entry not visible");
    });
    assert_eq!(
        keys(&db, &format!("Patient?identifier={SYSTEM}|shared")).len(),
        1
    );
}

#[test]
fn a_refused_write_in_a_group_leaves_the_others_and_each_leaf_names_its_caller() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let mut shared = patient_with("shared");
    shared["id"] = json!("shared");
    db.update(&ctx(), "Patient", "shared", shared.clone(), None)
        .unwrap();
    let start = Barrier::new(THREADS);
    let outcomes: Vec<(String, Result<u64, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (db, start, shared) = (&db, &start, &shared);
                scope.spawn(move || {
                    let caller = AccessContext::new(
                        format!("user-{thread}"),
                        "test-app",
                        "127.0.0.1",
                        format!("req-{thread}"),
                    );
                    start.wait();
                    // Every thread tries to move the resource from version 1: one wins,
                    // the others are refused without writing anything.
                    let contested = db
                        .update(&caller, "Patient", "shared", shared.clone(), Some(1))
                        .map(|o| o.resource.version)
                        .map_err(|e| e.to_string());
                    // And every thread's own create succeeds beside the refusals.
                    let created = db
                        .create(&caller, patient_with(&format!("own-{thread}")))
                        .unwrap();
                    (created.id, contested)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
    assert_eq!(winners, 1, "{outcomes:?}");
    for (_, result) in &outcomes {
        if let Err(message) = result {
            assert!(message.contains("version conflict"), "{message}");
        }
    }
    assert_eq!(
        db.store()
            .read(&ctx(), "Patient", "shared")
            .unwrap()
            .version,
        2
    );
    for thread in 0..THREADS {
        let found = keys(&db, &format!("Patient?identifier={SYSTEM}|own-{thread}"));
        assert_eq!(found.len(), 1, "thread {thread}");
    }
    // Each create's audit leaf records the caller who made it, even when it shared a commit.
    db.store().flush_audit().unwrap();
    let size = db.store().audit_size().unwrap();
    let mut creators = std::collections::BTreeMap::new();
    for seq in 0..size {
        let leaf = db.store().audit_leaf(seq).unwrap();
        if leaf.record.action == fhirkeep_engine::audit::AuditAction::Create
            && let Some(id) = leaf.record.id.clone()
        {
            creators.insert(id, leaf.record.request_id.clone());
        }
    }
    for (thread, (id, _)) in outcomes.iter().enumerate() {
        assert_eq!(creators.get(id), Some(&format!("req-{thread}")), "{id}");
    }
    db.store().verify_audit().unwrap();
}

#[test]
fn a_condition_sees_a_write_still_waiting_for_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // Another writer committed deferred and has not synced yet: its write is not in the
    // change feed, so not in the index, but a condition must still see it.
    let mut txn = db.store().begin_write(&ctx()).unwrap();
    let pending = txn.create(patient_with("pending")).unwrap();
    let ticket = txn.commit_deferred().unwrap();
    assert!(db.store().last_change_seq().unwrap() < ticket.seq());
    let outcome = db
        .conditional_create(
            &ctx(),
            patient_with("pending"),
            &format!("identifier={SYSTEM}|pending"),
        )
        .unwrap();
    match outcome {
        ConditionalOutcome::Existing(found) => assert_eq!(found.id, pending.id),
        other => panic!("a second Patient was created: {other:?}"),
    }
    db.store().wait_durable(ticket).unwrap();
}

#[test]
fn concurrent_transaction_bundles_are_durable_and_searchable_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open(dir.path());
        on_threads(&db, |db, thread| {
            for round in 0..4 {
                let entries: Vec<Value> = (0..5)
                    .map(|k| {
                        json!({"resource": patient_with(&format!("tx-{thread}-{round}-{k}")),
                               "request": {"method": "POST", "url": "Patient"}})
                    })
                    .collect();
                let bundle = json!({"resourceType": "Bundle", "type": "transaction",
                                    "entry": entries});
                db.process_bundle(&ctx(), &bundle, "http://localhost/fhir")
                    .unwrap();
                // Acknowledged means durable, hence in the change feed and searchable.
                let own = keys(
                    db,
                    &format!("Patient?identifier={SYSTEM}|tx-{thread}-{round}-4"),
                );
                assert_eq!(own.len(), 1, "thread {thread} round {round}");
            }
        });
    }
    let db = open(dir.path());
    assert_eq!(
        keys(&db, "Patient?family=Group&_count=1000").len(),
        THREADS * 4 * 5
    );
    db.store().verify_audit().unwrap();
}
