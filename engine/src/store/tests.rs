//! Store behaviour at its API boundary: versions, history, point-in-time reads, audit leaves.

use std::path::Path;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;
use crate::audit::AuditOutcome;
use crate::crypto::create_key_file;

/// One helper per boundary: a fresh store on a real file in a temp dir, keyed by a key file.
pub(crate) fn temp_store(read_audit: ReadAudit) -> (TempDir, Store) {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), read_audit);
    (dir, store)
}

pub(crate) fn key_for(dir: &Path) -> KeySource {
    let key = dir.join("test.key");
    if !key.exists() {
        create_key_file(&key).unwrap();
    }
    KeySource::KeyFile(key)
}

pub(crate) fn open_store(dir: &Path, read_audit: ReadAudit) -> Store {
    Store::builder(dir.join("db"))
        .key(key_for(dir))
        .read_audit(read_audit)
        .cache_size(8 << 20)
        .open_or_create()
        .unwrap()
}

fn ctx() -> AccessContext {
    AccessContext::new("tester", "unit-test", "local", "req-1")
}

/// Copies every file of directory `from` into `to` (a database's files, to damage and restore).
fn copy_files(from: &Path, to: &Path) {
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
    }
}

/// Damage for `check` to find: the first row of `bodies` gets the bytes of the second.
fn give_the_first_body_the_seconds_bytes(txn: &redb::WriteTransaction) {
    let mut bodies = txn.open_table(record::BODIES).unwrap();
    let (seq, other) = {
        let mut rows = bodies.iter().unwrap();
        let (first, _) = rows.next().unwrap().unwrap();
        let (_, second) = rows.next().unwrap().unwrap();
        (first.value(), second.value().to_vec())
    };
    bodies.insert(seq, other.as_slice()).unwrap();
}

/// Copies `store` into `DIR/copy` under a new key file, whose source it returns.
fn copy_into(store: &Store, dir: &Path) -> KeySource {
    let copy_key = dir.join("copy.key");
    create_key_file(&copy_key).unwrap();
    store
        .copy_to(
            &ctx(),
            &dir.join("copy"),
            KeySource::KeyFile(copy_key.clone()),
            KdfParams::fast_insecure(),
        )
        .unwrap();
    KeySource::KeyFile(copy_key)
}

/// Moves every pending version into `versions` now (`pending.rs`), for tests that look at
/// the table's layout.
pub(crate) fn merge_now(store: &Store) {
    store.inner.merge_pending().unwrap();
}

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1970-01-01"})
}

#[test]
fn create_assigns_unguessable_id_and_meta() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let a = store.create(&ctx(), patient("A")).unwrap();
    let b = store.create(&ctx(), patient("B")).unwrap();
    assert_ne!(a.id, b.id);
    assert!(crate::resource::is_valid_id(&a.id));
    assert!(a.id.len() >= 32, "ids must carry enough randomness");
    assert_eq!(a.version, 1);
    let json = a.to_json().unwrap();
    assert_eq!(json["id"], a.id.as_str());
    assert_eq!(json["meta"]["versionId"], "1");
    assert_eq!(json["meta"]["lastUpdated"], a.last_updated_text().as_str());
    assert_eq!(json["name"][0]["family"], "A");
}

#[test]
fn a_written_version_keeps_its_parsed_json_equal_to_its_bytes() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let resource = json!({
        "resourceType": "Observation",
        "status": "final",
        "valueQuantity": {"value": 1.50, "unit": "mg"},
        "note": [{"text": "quote \" and \u{00e9}"}]
    });
    let mut written = store.create(&ctx(), resource).unwrap();
    let from_bytes: Value = serde_json::from_slice(written.json_bytes()).unwrap();
    let shared = written.shared_json().unwrap();
    assert_eq!(
        *shared, from_bytes,
        "the writer's copy is the stored bytes, parsed"
    );
    assert_eq!(
        shared["meta"]["versionId"], "1",
        "the copy is the stamped one"
    );
    assert_eq!(
        serde_json::to_vec(&*shared).unwrap(),
        written.json_bytes(),
        "numbers keep their text"
    );
    let read = store.read(&ctx(), "Observation", &written.id).unwrap();
    assert_eq!(read, written, "equality is of the stored parts");
    assert_eq!(*read.shared_json().unwrap(), from_bytes);
    written.drop_parsed();
    assert_eq!(*written.shared_json().unwrap(), from_bytes);
    assert_eq!(written.to_json().unwrap(), from_bytes);
}

#[test]
fn update_delete_and_versions() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let created = store
        .update(&c, "Patient", "p1", patient("One"), None)
        .unwrap();
    assert!(created.created);
    assert_eq!(created.resource.version, 1);
    let updated = store
        .update(&c, "Patient", "p1", patient("Two"), Some(1))
        .unwrap();
    assert!(!updated.created);
    assert_eq!(updated.resource.version, 2);

    let conflict = store
        .update(&c, "Patient", "p1", patient("Three"), Some(1))
        .unwrap_err();
    assert!(
        matches!(
            conflict,
            Error::VersionConflict {
                expected: 1,
                current: 2
            }
        ),
        "{conflict}"
    );

    assert_eq!(
        store.read(&c, "Patient", "p1").unwrap().to_json().unwrap()["name"][0]["family"],
        "Two"
    );
    assert_eq!(
        store
            .vread(&c, "Patient", "p1", 1)
            .unwrap()
            .to_json()
            .unwrap()["name"][0]["family"],
        "One"
    );

    let deleted = store.delete(&c, "Patient", "p1", None).unwrap();
    assert_eq!(
        deleted,
        DeleteOutcome {
            version: 3,
            already_deleted: false
        }
    );
    assert!(matches!(
        store.read(&c, "Patient", "p1"),
        Err(Error::Gone { version: 3 })
    ));
    assert!(matches!(
        store.vread(&c, "Patient", "p1", 3),
        Err(Error::Gone { version: 3 })
    ));
    assert_eq!(store.vread(&c, "Patient", "p1", 2).unwrap().version, 2);
    let again = store.delete(&c, "Patient", "p1", None).unwrap();
    assert!(again.already_deleted);

    // Updating a deleted resource re-creates it as a new version.
    let recreated = store
        .update(&c, "Patient", "p1", patient("Four"), None)
        .unwrap();
    assert!(recreated.created);
    assert_eq!(recreated.resource.version, 4);

    assert!(matches!(
        store.read(&c, "Patient", "nope"),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        store.vread(&c, "Patient", "p1", 99),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        store.delete(&c, "Patient", "nope", None),
        Err(Error::NotFound)
    ));
}

#[test]
fn bad_input_is_a_typed_error_and_writes_nothing() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    type Case<'a> = (Box<dyn Fn() -> Result<()> + 'a>, &'static str);
    let cases: Vec<Case<'_>> = vec![
        (
            Box::new(|| store.create(&c, json!("text")).map(drop)),
            "invalid-resource",
        ),
        (
            Box::new(|| store.create(&c, json!({"resourceType": "Nope"})).map(drop)),
            "unknown-resource-type",
        ),
        (
            Box::new(|| {
                store
                    .update(&c, "Patient", "bad id!", patient("x"), None)
                    .map(drop)
            }),
            "invalid-id",
        ),
        (
            Box::new(|| {
                store
                    .update(
                        &c,
                        "Patient",
                        "p",
                        json!({"resourceType": "Observation"}),
                        None,
                    )
                    .map(drop)
            }),
            "invalid-resource",
        ),
        (
            Box::new(|| {
                store
                    .update(
                        &c,
                        "Patient",
                        "p",
                        json!({"resourceType": "Patient", "id": "q"}),
                        None,
                    )
                    .map(drop)
            }),
            "invalid-resource",
        ),
        (
            Box::new(|| store.read(&c, "Nope", "x").map(drop)),
            "unknown-resource-type",
        ),
        (
            Box::new(|| store.read(&c, "Patient", "").map(drop)),
            "invalid-id",
        ),
    ];
    for (call, kind) in cases {
        assert_eq!(call().unwrap_err().kind_name(), kind);
    }
    let page = store.history_system(&c, &HistoryQuery::default()).unwrap();
    assert!(page.entries.is_empty());
}

#[test]
fn transaction_is_all_or_nothing() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let result = store.write(&c, |txn| {
        txn.update("Patient", "a", patient("A"), None)?;
        txn.update("Patient", "b", patient("B"), None)?;
        // Sees its own writes.
        assert_eq!(txn.read("Patient", "a")?.version, 1);
        txn.update("Patient", "a", patient("A2"), Some(7))?;
        Ok(())
    });
    assert!(matches!(result, Err(Error::VersionConflict { .. })));
    assert!(matches!(
        store.read(&c, "Patient", "a"),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        store.read(&c, "Patient", "b"),
        Err(Error::NotFound)
    ));

    store
        .write(&c, |txn| {
            txn.update("Patient", "a", patient("A"), None)?;
            txn.update("Patient", "b", patient("B"), None)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(store.read(&c, "Patient", "a").unwrap().version, 1);
    assert_eq!(store.read(&c, "Patient", "b").unwrap().version, 1);
}

#[test]
fn history_since_at_count_and_cursor() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let mut stamps = Vec::new();
    for i in 0..5 {
        let outcome = store
            .update(&c, "Patient", "h", patient(&format!("v{i}")), None)
            .unwrap();
        stamps.push(outcome.resource.last_updated);
        store
            .update(
                &c,
                "Observation",
                &format!("o{i}"),
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}),
                None,
            )
            .unwrap();
    }
    store.delete(&c, "Patient", "h", None).unwrap();

    let all = store
        .history_instance(&c, "Patient", "h", &HistoryQuery::default())
        .unwrap();
    let versions: Vec<u64> = all.entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![6, 5, 4, 3, 2, 1]);
    assert!(all.entries[0].is_deleted());

    let since = HistoryQuery {
        since: Some(stamps[3]),
        ..Default::default()
    };
    let recent: Vec<u64> = store
        .history_instance(&c, "Patient", "h", &since)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(recent, vec![6, 5, 4]);

    let at = HistoryQuery {
        at: Some(stamps[2]),
        ..Default::default()
    };
    let current_then: Vec<u64> = store
        .history_instance(&c, "Patient", "h", &at)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(current_then, vec![3]);

    let mut query = HistoryQuery {
        count: Some(4),
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = store.history_system(&c, &query).unwrap();
        assert!(page.entries.len() <= 4);
        seen.extend(
            page.entries
                .iter()
                .map(|e| (e.resource_type.clone(), e.id.clone(), e.version)),
        );
        match page.next {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(seen.len(), 11);
    assert_eq!(seen[0], ("Patient".to_string(), "h".to_string(), 6));

    let types = store
        .history_type(&c, "Observation", &HistoryQuery::default())
        .unwrap();
    assert_eq!(types.entries.len(), 5);
    assert!(
        types
            .entries
            .iter()
            .all(|e| e.resource_type == "Observation")
    );
    assert_eq!(types.entries[0].id, "o4");

    let bundle = all.to_bundle().unwrap();
    assert_eq!(bundle["type"], "history");
    assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
    assert!(bundle["entry"][0].get("resource").is_none());
    assert_eq!(bundle["entry"][5]["request"]["method"], "PUT");
    assert_eq!(bundle["entry"][5]["resource"]["meta"]["versionId"], "1");
}

#[test]
fn point_in_time_read() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let v1 = store
        .update(&c, "Patient", "t", patient("First"), None)
        .unwrap()
        .resource;
    let v2 = store
        .update(&c, "Patient", "t", patient("Second"), None)
        .unwrap()
        .resource;
    let gone = store.delete(&c, "Patient", "t", None).unwrap();
    let before = v1.last_updated - chrono::Duration::microseconds(1);
    assert!(matches!(
        store.read_as_of(&c, "Patient", "t", before),
        Err(Error::NotFound)
    ));
    assert_eq!(
        store
            .read_as_of(&c, "Patient", "t", v1.last_updated)
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        store
            .read_as_of(&c, "Patient", "t", v2.last_updated)
            .unwrap()
            .version,
        2
    );
    assert!(matches!(
        store.read_as_of(&c, "Patient", "t", Utc::now() + chrono::Duration::seconds(5)),
        Err(Error::Gone { version }) if version == gone.version
    ));
}

#[test]
fn every_write_has_exactly_one_leaf_and_reads_are_audited() {
    for mode in [ReadAudit::Durable, ReadAudit::default()] {
        let (_dir, store) = temp_store(mode);
        let c = ctx();
        let start = store.audit_size().unwrap();
        let created = store.create(&c, patient("Leaf")).unwrap();
        store
            .write(&c, |txn| {
                txn.update("Patient", "x", patient("X"), None)?;
                txn.update("Patient", "y", patient("Y"), None)?;
                Ok(())
            })
            .unwrap();
        let _ = store.read(&c, "Patient", &created.id).unwrap();
        let _ = store.read(&c, "Patient", "missing");
        let _ = store.update(&c, "Patient", "x", patient("X"), Some(9));
        let size = store.audit_size().unwrap();
        assert_eq!(
            size - start,
            6,
            "{mode:?}: 3 writes + 2 reads + 1 refused write"
        );

        let leaves: Vec<_> = (start..size)
            .map(|seq| store.audit_leaf(seq).unwrap())
            .collect();
        let writes: Vec<_> = leaves
            .iter()
            .filter(|l| {
                matches!(l.record.action, AuditAction::Create | AuditAction::Update)
                    && l.record.outcome == AuditOutcome::Success
            })
            .collect();
        assert_eq!(writes.len(), 3);
        let created_leaf = writes
            .iter()
            .find(|l| l.record.id.as_deref() == Some(created.id.as_str()))
            .unwrap();
        assert_eq!(created_leaf.record.content_hash, Some(created.content_hash));
        assert_eq!(created_leaf.record.actor.subject, "tester");
        assert_eq!(created_leaf.record.request_id, "req-1");
        assert!(
            leaves.iter().any(|l| l.record.action == AuditAction::Read
                && l.record.outcome == AuditOutcome::NotFound)
        );
        assert!(
            leaves
                .iter()
                .any(|l| l.record.outcome == AuditOutcome::Conflict)
        );
        store.verify_audit().unwrap();
    }
}

#[test]
fn audit_head_and_proofs_verify_without_the_database() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    for i in 0..10 {
        store
            .update(&c, "Patient", &format!("p{i}"), patient("P"), None)
            .unwrap();
    }
    let old = store.audit_head().unwrap();
    for i in 10..17 {
        store
            .update(&c, "Patient", &format!("p{i}"), patient("P"), None)
            .unwrap();
    }
    let new = store.audit_head().unwrap();
    assert!(new.size > old.size);
    new.verify().unwrap();
    let inclusion = store.prove_inclusion(3, new.size).unwrap();
    inclusion.verify(&new).unwrap();
    let consistency = store.prove_consistency(old.size, new.size).unwrap();
    consistency.verify(&old, &new).unwrap();
    store.verify_audit_against(&old).unwrap();
}

#[test]
fn reopen_keeps_everything_and_clock_moves_forward() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let first = {
        let store = open_store(dir.path(), ReadAudit::default());
        let first = store
            .update(&c, "Patient", "keep", patient("Kept"), None)
            .unwrap();
        let _ = store.read(&c, "Patient", "keep").unwrap();
        first
    };
    let store = open_store(dir.path(), ReadAudit::default());
    let read = store.read(&c, "Patient", "keep").unwrap();
    assert_eq!(read, first.resource);
    let second = store
        .update(&c, "Patient", "keep", patient("Again"), None)
        .unwrap();
    assert!(second.resource.last_updated > first.resource.last_updated);
    // The group-committed read leaf from the first session was flushed on close.
    let size = store.audit_size().unwrap();
    let actions: Vec<_> = (0..size)
        .map(|s| store.audit_leaf(s).unwrap().record.action)
        .collect();
    assert!(actions.contains(&AuditAction::Read));
    store.verify_audit().unwrap();
}

#[test]
fn check_passes_on_a_healthy_database() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::default());
        for i in 0..50 {
            store
                .update(&ctx(), "Patient", &format!("c{i}"), patient("C"), None)
                .unwrap();
        }
    }
    let report = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap();
    assert!(report.redb_integrity_ok);
    assert!(report.audit.leaves >= 50);
}

#[test]
fn wrong_key_fails_at_open() {
    let dir = TempDir::new().unwrap();
    drop(open_store(dir.path(), ReadAudit::default()));
    let other = dir.path().join("other.key");
    create_key_file(&other).unwrap();
    let err = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(other))
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::WrongKey), "{err}");
    let missing = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(dir.path().join("absent.key")))
        .open()
        .unwrap_err();
    assert!(matches!(missing, Error::KeyFileMissing { .. }), "{missing}");
    let no_key = Store::builder(dir.path().join("db")).open().unwrap_err();
    assert!(matches!(no_key, Error::NoKeySource));
}

/// Someone holding the key edits, deletes or reorders audit leaves directly in redb: the
/// recomputed tree no longer matches the signed heads, and `check` fails.
#[test]
fn key_holder_editing_the_audit_log_is_detected() {
    use crate::audit::log::rewrite_leaves_for_tests;
    type Tamper = fn(&mut Vec<Vec<u8>>);
    let tampers: [(&str, Tamper); 3] = [
        ("edit", |leaves| {
            let last = leaves[2].len() - 1;
            leaves[2][last] ^= 1;
        }),
        ("delete", |leaves| {
            leaves.remove(1);
        }),
        ("reorder", |leaves| leaves.swap(1, 2)),
    ];
    for (name, tamper) in tampers {
        let dir = TempDir::new().unwrap();
        let trusted = {
            let store = open_store(dir.path(), ReadAudit::Durable);
            for i in 0..5 {
                store
                    .update(&ctx(), "Patient", &format!("a{i}"), patient("A"), None)
                    .unwrap();
            }
            let head = store.audit_head().unwrap();
            let txn = store.inner.db.begin_write().unwrap();
            rewrite_leaves_for_tests(&txn, tamper);
            txn.commit().unwrap();
            let err = store.verify_audit().unwrap_err();
            assert!(matches!(err, Error::AuditVerification(_)), "{name}: {err}");
            let err = store.verify_audit_against(&head).unwrap_err();
            assert!(matches!(err, Error::AuditVerification(_)), "{name}: {err}");
            head
        };
        assert!(trusted.size >= 5);
        let err = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap_err();
        assert!(matches!(err, Error::AuditVerification(_)), "{name}: {err}");
    }
}

/// Byte-level damage to the files is reported by `check` as corruption, never as wrong data.
#[test]
fn check_detects_damaged_files() {
    use crate::crypto::page::image;
    let build = || {
        let dir = TempDir::new().unwrap();
        {
            let store = open_store(dir.path(), ReadAudit::Durable);
            for i in 0..300 {
                store
                    .update(
                        &ctx(),
                        "Patient",
                        &format!("d{i}"),
                        patient(&"Z".repeat(i)),
                        None,
                    )
                    .unwrap();
            }
        }
        dir
    };
    let data_file = |dir: &TempDir| dir.path().join("db").join(DATABASE_FILE);
    let written_pages = image::written_pages;
    type Damage = Box<dyn Fn(&mut Vec<u8>, &[u64])>;
    // One flipped byte, in one page at a time from the newest: a free page (left by
    // copy-on-write) is reported as a warning, a live page fails the check.
    let dir = build();
    let path = data_file(&dir);
    let pristine = std::fs::read(&path).unwrap();
    let pages = written_pages(&pristine);
    let mut failed = false;
    for &page in pages.iter().rev() {
        let mut bytes = pristine.clone();
        let at = image::block_byte(&pristine, page, 100);
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        match Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())) {
            Ok(report) => {
                assert_eq!(report.pages.failed_pages, vec![page]);
                assert!(report.warnings[0].contains("failed authentication"));
            }
            Err(err) => {
                assert!(matches!(err, Error::Corrupted(_)), "page {page}: {err}");
                assert!(err.to_string().contains(&page.to_string()), "{err}");
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "a flipped byte in a live page must fail the check");
    std::fs::write(&path, &pristine).unwrap();
    Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap();

    let damages: Vec<(&str, Damage)> = vec![
        (
            "swap two pages",
            Box::new(|bytes, pages| {
                let (a, b) = (image::block(bytes, pages[1]), image::block(bytes, pages[2]));
                image::put_block(bytes, pages[1], &b);
                image::put_block(bytes, pages[2], &a);
            }),
        ),
        (
            "truncate",
            Box::new(|bytes, _| {
                let len = bytes.len();
                bytes.truncate(len - 1000);
            }),
        ),
    ];
    for (name, damage) in damages {
        let dir = build();
        let path = data_file(&dir);
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = written_pages(&bytes);
        assert!(pages.len() > 3);
        damage(&mut bytes, &pages);
        std::fs::write(&path, &bytes).unwrap();
        let err = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap_err();
        assert!(matches!(err, Error::Corrupted(_)), "{name}: {err}");
        assert!(
            !err.to_string()
                .contains('Z'.to_string().repeat(20).as_str())
        );
    }

    // Another database's key header in place of ours: the key no longer opens it.
    let dir = build();
    let other = build();
    std::fs::copy(
        other.path().join("db").join(crate::crypto::KEY_HEADER_FILE),
        dir.path().join("db").join(crate::crypto::KEY_HEADER_FILE),
    )
    .unwrap();
    let err = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap_err();
    assert!(matches!(err, Error::WrongKey), "replaced key header: {err}");
    // ... and with that database's key, the data file is recognized as foreign.
    let err = Store::check(&ctx(), dir.path().join("db"), key_for(other.path())).unwrap_err();
    assert!(
        matches!(err, Error::Corrupted(_)),
        "foreign data file: {err}"
    );
}

#[test]
fn a_database_opens_only_once_at_a_time() {
    let dir = TempDir::new().unwrap();
    let first = open_store(dir.path(), ReadAudit::default());
    let second = Store::builder(dir.path().join("db"))
        .key(key_for(dir.path()))
        .open();
    let err = second.unwrap_err();
    assert!(err.to_string().contains("already open"), "{err}");
    drop(first);
    let _reopened = open_store(dir.path(), ReadAudit::default());
}

#[test]
fn copy_reencrypts_everything_and_keeps_the_audit_log() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    let c = ctx();
    for i in 0..20 {
        store
            .update(&c, "Patient", &format!("k{i}"), patient("K"), None)
            .unwrap();
    }
    store.delete(&c, "Patient", "k3", None).unwrap();
    let head = store.audit_head().unwrap();
    let new_key = dir.path().join("copy.key");
    create_key_file(&new_key).unwrap();
    let dest = dir.path().join("copy");
    let rows = store
        .copy_to(
            &c,
            &dest,
            KeySource::KeyFile(new_key.clone()),
            KdfParams::fast_insecure(),
        )
        .unwrap();
    assert!(rows > 40);
    assert!(matches!(
        store.copy_to(
            &c,
            &dest,
            KeySource::KeyFile(new_key.clone()),
            KdfParams::fast_insecure()
        ),
        Err(Error::AlreadyExists(_))
    ));
    drop(store);

    let copy = Store::builder(&dest)
        .key(KeySource::KeyFile(new_key.clone()))
        .open()
        .unwrap();
    assert_eq!(copy.read(&c, "Patient", "k7").unwrap().version, 1);
    assert!(matches!(
        copy.read(&c, "Patient", "k3"),
        Err(Error::Gone { version: 2 })
    ));
    assert_eq!(
        copy.history_system(&c, &HistoryQuery::default())
            .unwrap()
            .entries
            .len(),
        21
    );
    copy.verify_audit_against(&head).unwrap();
    let later = copy
        .update(&c, "Patient", "k7", patient("K2"), None)
        .unwrap();
    assert!(later.resource.last_updated > head_time(&head));
    drop(copy);
    let report = Store::check(&ctx(), &dest, KeySource::KeyFile(new_key)).unwrap();
    assert_eq!(
        report
            .pages
            .blocks_by_key
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![1]
    );
    // The old key does not open the copy.
    let err = Store::builder(&dest)
        .key(key_for(dir.path()))
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::WrongKey));
}

fn head_time(head: &crate::audit::SignedTreeHead) -> DateTime<Utc> {
    micros_to_datetime(head.time_micros).unwrap()
}

#[test]
fn update_many_matches_one_by_one_updates() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    store
        .update(&c, "Patient", "old", patient("Old"), None)
        .unwrap();
    let upsert = |t: &str, id: Option<&str>, body: Value, expected: Option<u64>| Upsert {
        resource_type: t.to_owned(),
        id: id.map(str::to_owned),
        resource: body,
        expected_version: expected,
    };
    let mut items = vec![
        upsert("Patient", Some("old"), patient("Old2"), Some(1)),
        upsert("Patient", Some("dup"), patient("D1"), None),
        upsert("Patient", Some("dup"), patient("D2"), Some(1)),
        upsert("Nope", Some("x"), json!({"resourceType": "Nope"}), None),
        upsert("Patient", Some("old"), patient("Stale"), Some(1)),
        upsert("Patient", None, patient("Fresh"), None),
        upsert("Patient", Some("bad id"), patient("B"), None),
    ];
    // Enough items to take the parallel path.
    for i in 0..100 {
        items.push(upsert("Observation", Some(&format!("o{i}")), json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("{i}")}}), None));
    }
    let results = store.write(&c, |txn| txn.update_many(items)).unwrap();
    assert_eq!(results.len(), 107);
    assert_eq!(results[0].as_ref().unwrap().resource.version, 2);
    assert!(results[1].as_ref().unwrap().created);
    assert_eq!(results[2].as_ref().unwrap().resource.version, 2);
    assert_eq!(
        results[3].as_ref().unwrap_err().kind_name(),
        "unknown-resource-type"
    );
    assert!(matches!(
        results[4],
        Err(Error::VersionConflict {
            expected: 1,
            current: 2
        })
    ));
    let fresh = results[5].as_ref().unwrap();
    assert_eq!(fresh.resource.kind, VersionKind::Created);
    assert_eq!(results[6].as_ref().unwrap_err().kind_name(), "invalid-id");
    for (i, result) in results[7..].iter().enumerate() {
        let stored = &result.as_ref().unwrap().resource;
        assert_eq!(stored.id, format!("o{i}"));
        assert_eq!(store.read(&c, "Observation", &stored.id).unwrap(), *stored);
    }
    assert_eq!(
        store.read(&c, "Patient", "dup").unwrap().to_json().unwrap()["name"][0]["family"],
        "D2"
    );
    assert_eq!(
        store.read(&c, "Patient", "old").unwrap().to_json().unwrap()["name"][0]["family"],
        "Old2"
    );
    assert_eq!(
        store
            .read(&c, "Patient", &fresh.resource.id)
            .unwrap()
            .version,
        1
    );
    // History is in write order, and every written version has exactly one write leaf.
    let history = store.history_system(&c, &HistoryQuery::default()).unwrap();
    assert_eq!(history.entries.len(), 1 + 104);
    assert!(
        history
            .entries
            .windows(2)
            .all(|w| w[0].last_updated > w[1].last_updated)
    );
    let size = store.audit_size().unwrap();
    let write_leaves = (0..size)
        .map(|seq| store.audit_leaf(seq).unwrap().record)
        .filter(|r| {
            r.outcome == AuditOutcome::Success
                && matches!(r.action, AuditAction::Create | AuditAction::Update)
        })
        .count();
    assert_eq!(write_leaves, 105);
    store.verify_audit().unwrap();
}

/// A page block copied back from an older copy of the same database authenticates (same
/// position, same key). Opening with `verify_on_open` checks every page against the checksum
/// its parent holds: each such replay is then refused or harmless, never stale data or a panic.
#[test]
fn replayed_old_page_is_caught_by_verify_on_open() {
    use crate::crypto::page::image;
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let gendered = |gender: &str| json!({"resourceType": "Patient", "gender": gender});
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..12 {
            store
                .update(&c, "Patient", &format!("p{i}"), gendered("male"), None)
                .unwrap();
        }
    }
    let path = dir.path().join("db").join(DATABASE_FILE);
    let old = std::fs::read(&path).unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..12 {
            store
                .update(&c, "Patient", &format!("p{i}"), gendered("female"), None)
                .unwrap();
        }
    }
    let current = std::fs::read(&path).unwrap();
    let mut replays = 0;
    let mut refused = 0;
    for page in 1..=image::page_count(&old).min(image::page_count(&current)) {
        let block = image::block(&old, page);
        if block == image::block(&current, page) || !image::is_written(&old, page) {
            continue;
        }
        replays += 1;
        let mut bytes = current.clone();
        image::put_block(&mut bytes, page, &block);
        std::fs::write(&path, &bytes).unwrap();
        let key = key_for(dir.path());
        let db = dir.path().join("db");
        let outcome = std::panic::catch_unwind(|| {
            let store = Store::builder(&db).key(key).verify_on_open(true).open()?;
            (0..12)
                .map(|i| {
                    store
                        .read(&ctx(), "Patient", &format!("p{i}"))
                        .map(|s| s.to_json())
                })
                .collect::<Result<Vec<_>>>()
        });
        match outcome.expect("a replayed page must never panic with verify_on_open") {
            Err(_) => refused += 1,
            Ok(resources) => {
                for resource in resources {
                    assert_eq!(
                        resource.unwrap()["gender"],
                        "female",
                        "page {page}: stale data"
                    );
                }
            }
        }
    }
    std::fs::write(&path, &current).unwrap();
    assert!(
        replays > 0 && refused > 0,
        "{replays} replays, {refused} refused"
    );
}

#[test]
fn a_deferred_commit_is_visible_at_once_and_joins_the_feed_when_durable() {
    let (dir, store) = temp_store(ReadAudit::default());
    let first = store.create(&ctx(), patient("Durable")).unwrap();
    assert_eq!(store.last_change_seq().unwrap(), 1);

    let mut txn = store.begin_write(&ctx()).unwrap();
    let deferred = txn.create(patient("Deferred")).unwrap();
    let ticket = txn.commit_deferred().unwrap();
    assert_eq!(ticket.seq(), 2);
    // Reads and later transactions see it; the change feed (and so the index) does not yet.
    let read = store.read(&ctx(), "Patient", &deferred.id).unwrap();
    assert_eq!(read.content_hash, deferred.content_hash);
    assert_eq!(store.last_change_seq().unwrap(), 1);
    let page = store.changes_after(&ctx(), None, 10).unwrap();
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.changes[0].1.id, first.id);
    assert!(!page.more);

    store.wait_durable(ticket).unwrap();
    assert_eq!(store.last_change_seq().unwrap(), 2);
    let page = store.changes_after(&ctx(), Some(1), 10).unwrap();
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.changes[0].1.id, deferred.id);
    // Waiting again costs nothing and changes nothing.
    store.wait_durable(ticket).unwrap();
    store.verify_audit().unwrap();
    drop(store);
    let store = open_store(dir.path(), ReadAudit::default());
    assert_eq!(store.last_change_seq().unwrap(), 2);
    store.read(&ctx(), "Patient", &deferred.id).unwrap();
}

#[test]
fn the_feed_names_only_the_versions_the_reader_says_it_has() {
    let (_dir, store) = temp_store(ReadAudit::default());
    let first = store.create(&ctx(), patient("One")).unwrap();
    let second = store.create(&ctx(), patient("Two")).unwrap();
    let updated = store
        .update(&ctx(), "Patient", &first.id, patient("One again"), None)
        .unwrap()
        .resource;
    store.delete(&ctx(), "Patient", &second.id, None).unwrap();
    let full = store.changes_after(&ctx(), None, 10).unwrap();
    let leaves = store.audit_size().unwrap();
    // The reader has the first version of `first` and its update: only their keys come back,
    // every other change as `changes_after` reads it, with the same seqs and paging.
    let known = |t: &str, id: &str, v: u64| t == "Patient" && id == first.id && v <= 2;
    let page = store.changes_after_except(&ctx(), None, 10, known).unwrap();
    assert_eq!(
        store.audit_size().unwrap(),
        leaves + 1,
        "one audit leaf per read"
    );
    assert_eq!((page.next_after, page.more), (full.next_after, full.more));
    assert_eq!(page.changes.len(), full.changes.len());
    for ((seq, item), (full_seq, stored)) in page.changes.iter().zip(&full.changes) {
        assert_eq!(seq, full_seq);
        match item {
            FeedItem::Known(key) => {
                assert!(known(&key.resource_type, &key.id, key.version));
                assert_eq!(
                    (key.resource_type.as_str(), key.id.as_str(), key.version),
                    (
                        stored.resource_type.as_str(),
                        stored.id.as_str(),
                        stored.version
                    )
                );
            }
            FeedItem::Read(read) => {
                assert!(!known(&read.resource_type, &read.id, read.version));
                assert_eq!(read.json_bytes(), stored.json_bytes());
                assert_eq!(read.kind, stored.kind);
            }
        }
    }
    let known_count = page
        .changes
        .iter()
        .filter(|(_, item)| matches!(item, FeedItem::Known(_)))
        .count();
    assert_eq!(known_count, 2);
    assert_eq!(updated.version, 2);
    // Paging is the same as the full feed's.
    let paged = store
        .changes_after_except(&ctx(), Some(1), 2, known)
        .unwrap();
    assert_eq!(paged.changes.len(), 2);
    assert!(paged.more);
    assert_eq!(paged.next_after, 3);
}

#[test]
fn concurrent_deferred_commits_all_become_durable_with_one_leaf_each() {
    let (dir, store) = temp_store(ReadAudit::default());
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let (store, ids) = (&store, &ids);
            scope.spawn(move || {
                for round in 0..10 {
                    let mut txn = store.begin_write(&ctx()).unwrap();
                    let a = txn
                        .create(patient(&format!("T{thread}-{round}-a")))
                        .unwrap();
                    let b = txn
                        .create(patient(&format!("T{thread}-{round}-b")))
                        .unwrap();
                    let ticket = txn.commit_deferred().unwrap();
                    store.wait_durable(ticket).unwrap();
                    // Acknowledged: durable, so in the feed.
                    assert!(store.last_change_seq().unwrap() >= ticket.seq());
                    ids.lock().unwrap().extend([a.id, b.id]);
                }
            });
        }
    });
    let ids = ids.into_inner().unwrap();
    assert_eq!(ids.len(), 80);
    assert_eq!(store.last_change_seq().unwrap(), 80);
    let leaves = store.audit_size().unwrap();
    let creates = (0..leaves)
        .filter(|&seq| store.audit_leaf(seq).unwrap().record.action == AuditAction::Create)
        .count();
    assert_eq!(creates, 80);
    store.verify_audit().unwrap();
    drop(store);
    let store = open_store(dir.path(), ReadAudit::default());
    for id in &ids {
        store.read(&ctx(), "Patient", id).unwrap();
    }
}

#[test]
fn reads_share_a_snapshot_until_the_next_commit_and_then_see_it() {
    let (_dir, store) = temp_store(ReadAudit::default());
    let created = store.create(&ctx(), patient("First")).unwrap();
    assert_eq!(
        store.read(&ctx(), "Patient", &created.id).unwrap().version,
        1
    );
    let shared = || lock(&store.inner.read_snapshot.current).is_some();
    assert!(shared(), "a read leaves its snapshot for the next one");

    let mut body = patient("Second");
    body["id"] = json!(created.id);
    store
        .update(&ctx(), "Patient", &created.id, body, None)
        .unwrap();
    assert!(!shared(), "a commit retires the shared snapshot");
    let read = store.read(&ctx(), "Patient", &created.id).unwrap();
    assert_eq!(read.version, 2);
    assert_eq!(read.to_json().unwrap()["name"][0]["family"], "Second");

    // A deferred commit is visible at once too, and so is a delete.
    let mut txn = store.begin_write(&ctx()).unwrap();
    let deferred = txn.create(patient("Deferred")).unwrap();
    let ticket = txn.commit_deferred().unwrap();
    assert_eq!(
        store.read(&ctx(), "Patient", &deferred.id).unwrap().version,
        1
    );
    store.wait_durable(ticket).unwrap();
    store.delete(&ctx(), "Patient", &created.id, None).unwrap();
    assert!(matches!(
        store.read(&ctx(), "Patient", &created.id),
        Err(Error::Gone { version: 3 })
    ));
    assert_eq!(
        store
            .vread(&ctx(), "Patient", &created.id, 1)
            .unwrap()
            .version,
        1
    );
}

#[test]
fn a_read_that_starts_after_a_write_returned_sees_it_while_others_share_snapshots() {
    let (_dir, store) = temp_store(ReadAudit::default());
    let created = store.create(&ctx(), patient("v1")).unwrap();
    let id = created.id.as_str();
    let stop = AtomicBool::new(false);
    let (acknowledged, written) = std::sync::mpsc::channel::<u64>();
    let (store, stop) = (&store, &stop);
    std::thread::scope(|scope| {
        // Keeps a shared snapshot in place, opened at every generation.
        for _ in 0..2 {
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    store.read(&ctx(), "Patient", id).unwrap();
                    // Each read buffers an audit leaf: keep the flusher ahead of them.
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            });
        }
        let checker = scope.spawn(move || {
            // Stops the readers however this ends, so that a failure is reported, not hung.
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
            let _stop = StopOnDrop(stop);
            for version in written {
                let seen = store.read(&ctx(), "Patient", id).unwrap().version;
                assert!(
                    seen >= version,
                    "read {seen} after version {version} was acknowledged"
                );
            }
        });
        for round in 2..=100u64 {
            let mut body = patient(&format!("v{round}"));
            body["id"] = json!(id);
            let updated = store.update(&ctx(), "Patient", id, body, None).unwrap();
            assert_eq!(updated.resource.version, round);
            acknowledged.send(round).unwrap();
        }
        drop(acknowledged);
        checker.join().unwrap();
    });
    assert_eq!(store.read(&ctx(), "Patient", id).unwrap().version, 100);
}

#[test]
fn a_database_whose_audit_log_has_one_leaf_to_a_row_opens_and_verifies() {
    let dir = TempDir::new().unwrap();
    let (ids, head) = {
        let store = open_store(dir.path(), ReadAudit::Durable);
        let ids: Vec<String> = (0..6)
            .map(|i| store.create(&ctx(), patient(&format!("P{i}"))).unwrap().id)
            .collect();
        let head = store.audit_head().unwrap();
        // The layout of databases written before rows of leaves (format 1).
        let txn = store.inner.db.begin_write().unwrap();
        crate::audit::log::legacy_layout_for_tests(&txn);
        txn.open_table(record::META)
            .unwrap()
            .insert(record::META_FORMAT, &1u32.to_le_bytes()[..])
            .unwrap();
        txn.commit().unwrap();
        (ids, head)
    };
    let store = open_store(dir.path(), ReadAudit::Durable);
    let report = store.verify_audit().unwrap();
    assert!(report.leaves >= head.size);
    store.verify_audit_against(&head).unwrap();
    for id in &ids {
        store.read(&ctx(), "Patient", id).unwrap();
    }
    store.verify_audit().unwrap();
    let format = |store: &Store| {
        let txn = store.inner.db.begin_read().unwrap();
        let meta = txn.open_table(record::META).unwrap();
        let bytes = meta
            .get(record::META_FORMAT)
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        u32::from_le_bytes(bytes.try_into().unwrap())
    };
    assert_eq!(format(&store), record::FORMAT_VERSION);
    // A format newer than this build is refused, and nothing is changed.
    let txn = store.inner.db.begin_write().unwrap();
    txn.open_table(record::META)
        .unwrap()
        .insert(record::META_FORMAT, &99u32.to_le_bytes()[..])
        .unwrap();
    txn.commit().unwrap();
    drop(store);
    let refused = Store::builder(dir.path().join("db"))
        .key(key_for(dir.path()))
        .open()
        .unwrap_err();
    assert!(refused.to_string().contains("format 99"), "{refused}");
}

/// A version whose key lands after every key of its type keeps its body inline; any other
/// puts it in `bodies`. Both read back the same, by every path.
#[test]
fn appended_versions_keep_their_body_inline_and_others_use_the_bodies_table() {
    use redb::ReadableTableMetadata;
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let layout = |store: &Store| -> (u64, Vec<(String, u64, u8)>) {
        let txn = store.inner.db.begin_read().unwrap();
        let bodies = txn.open_table(record::BODIES).unwrap().len().unwrap();
        let versions = txn.open_table(VERSIONS).unwrap();
        let formats = versions
            .iter()
            .unwrap()
            .map(|entry| {
                let (key, value) = entry.unwrap();
                let (_, id, version) = key.value();
                (id.to_owned(), version, value.value()[0])
            })
            .collect();
        (bodies, formats)
    };
    for id in ["m", "d", "x"] {
        store.update(&c, "Patient", id, patient(id), None).unwrap();
    }
    // An Observation after every Patient key, then a Patient again: appends per type.
    store
        .update(
            &c,
            "Observation",
            "a",
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "t"}}),
            None,
        )
        .unwrap();
    store
        .update(&c, "Patient", "z", patient("z"), None)
        .unwrap();
    store
        .update(&c, "Patient", "d", patient("d2"), None)
        .unwrap();
    store.delete(&c, "Patient", "m", None).unwrap();
    merge_now(&store);
    let (bodies, formats) = layout(&store);
    let expected: Vec<(String, u64, u8)> = [
        ("a", 1, 2),
        ("d", 1, 3),
        ("d", 2, 3),
        ("m", 1, 2),
        ("m", 2, 2),
        ("x", 1, 2),
        ("z", 1, 2),
    ]
    .into_iter()
    .map(|(id, version, format)| (id.to_owned(), version, format))
    .collect();
    assert_eq!(
        formats, expected,
        "record formats: 2 inline, 3 body in `bodies`"
    );
    assert_eq!(bodies, 2, "d version 1 (before m) and d version 2");
    assert_eq!(
        store.read(&c, "Patient", "d").unwrap().to_json().unwrap()["name"][0]["family"],
        "d2"
    );
    assert_eq!(
        store
            .vread(&c, "Patient", "d", 1)
            .unwrap()
            .to_json()
            .unwrap()["name"][0]["family"],
        "d"
    );
    assert!(matches!(
        store.read(&c, "Patient", "m"),
        Err(Error::Gone { version: 2 })
    ));
    let feed = store.changes_after(&c, None, 100).unwrap();
    let families: Vec<Value> = feed
        .changes
        .iter()
        .map(|(_, v)| v.to_json().unwrap()["name"][0]["family"].clone())
        .collect();
    assert_eq!(
        families,
        [
            json!("m"),
            json!("d"),
            json!("x"),
            Value::Null,
            json!("z"),
            json!("d2"),
            Value::Null
        ]
    ); // Dense ids written about in order: "obs-…05" lands before "obs-…09", next to an id
    // that shares its first 12 bytes, so its body stays inline too.
    for id in ["obs-0000000009", "obs-0000000005"] {
        let observation =
            json!({"resourceType": "Observation", "status": "final", "code": {"text": id}});
        store
            .update(&c, "Observation", id, observation, None)
            .unwrap();
    }
    let (bodies_after, formats) = layout(&store);
    assert_eq!(bodies_after, 2);
    assert!(
        formats
            .iter()
            .filter(|(id, _, _)| id.starts_with("obs-"))
            .all(|(_, _, f)| *f == 2)
    );
}

/// An item that fails while it is prepared on a helper thread (here: too large) gets its own
/// error; the items around it are inserted in order under consecutive change seqs.
#[test]
fn an_item_refused_while_prepared_leaves_the_rest_of_the_batch_in_order() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    let items: Vec<Upsert> = (0..100)
        .map(|i| {
            let family = if i == 50 {
                "Z".repeat(record::MAX_BODY + 1)
            } else {
                format!("F{i}")
            };
            Upsert {
                resource_type: "Patient".to_owned(),
                id: Some(format!("q{i:03}")),
                resource: patient(&family),
                expected_version: None,
            }
        })
        .collect();
    let results = store.write(&c, |txn| txn.update_many(items)).unwrap();
    assert_eq!(results.len(), 100);
    match &results[50] {
        Err(Error::InvalidResource(why)) => assert!(why.contains("larger than"), "{why}"),
        other => panic!("expected the oversize item refused, got {other:?}"),
    }
    assert!(matches!(
        store.read(&c, "Patient", "q050"),
        Err(Error::NotFound)
    ));
    // The refusal is on record, like a refused single write (and so is the read).
    store.flush_audit().unwrap();
    let on_record = (0..store.audit_size().unwrap())
        .map(|seq| store.audit_leaf(seq).unwrap().record)
        .filter(|r| r.id.as_deref() == Some("q050"))
        .collect::<Vec<_>>();
    assert_eq!(on_record.len(), 2, "{on_record:?}");
    assert!(
        on_record
            .iter()
            .any(|r| r.action == AuditAction::Create && r.outcome != AuditOutcome::Success),
        "{on_record:?}"
    );
    let feed = store.changes_after(&c, None, 1000).unwrap();
    let ids: Vec<String> = feed.changes.iter().map(|(_, s)| s.id.clone()).collect();
    let expected: Vec<String> = (0..100)
        .filter(|&i| i != 50)
        .map(|i| format!("q{i:03}"))
        .collect();
    assert_eq!(ids, expected, "written in item order");
    let seqs: Vec<u64> = feed.changes.iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    for (i, result) in results.iter().enumerate().filter(|(i, _)| *i != 50) {
        let stored = &result.as_ref().unwrap().resource;
        assert_eq!(stored.id, format!("q{i:03}"));
        assert_eq!(
            store
                .read(&c, "Patient", &stored.id)
                .unwrap()
                .to_json()
                .unwrap()["name"][0]["family"],
            format!("F{i}")
        );
    }
}

/// A resource with more versions than a forward walk takes is looked up from its end: its
/// next version gets the right number and the same layout rule, in single writes and batches.
#[test]
fn long_lived_resources_get_their_next_version_and_layout_right() {
    let (_dir, store) = temp_store(ReadAudit::Durable);
    let c = ctx();
    store
        .update(&c, "Patient", "m", patient("m"), None)
        .unwrap();
    // "k" sorts before "m" (a random neighbour): bodies in `bodies`. "z" appends: inline.
    for n in 1..=12 {
        for id in ["k", "z"] {
            let outcome = store
                .update(&c, "Patient", id, patient(&format!("{id}{n}")), None)
                .unwrap();
            assert_eq!(outcome.resource.version, n);
        }
    }
    let upsert = |id: &str, family: &str, expected: Option<u64>| Upsert {
        resource_type: "Patient".to_owned(),
        id: Some(id.to_owned()),
        resource: patient(family),
        expected_version: expected,
    };
    let mut items = vec![
        upsert("k", "k13", Some(12)),
        upsert("z", "z13", Some(12)),
        upsert("k", "k14", Some(13)),
        upsert("z", "stale", Some(12)),
    ];
    for i in 0..80 {
        items.push(upsert(&format!("n{i:02}"), "n", None));
    }
    let results = store.write(&c, |txn| txn.update_many(items)).unwrap();
    assert_eq!(results[0].as_ref().unwrap().resource.version, 13);
    assert_eq!(results[1].as_ref().unwrap().resource.version, 13);
    assert_eq!(results[2].as_ref().unwrap().resource.version, 14);
    assert!(matches!(
        results[3],
        Err(Error::VersionConflict {
            expected: 12,
            current: 13
        })
    ));
    assert!(results[4..].iter().all(|r| r.as_ref().unwrap().created));
    merge_now(&store);
    let txn = store.inner.db.begin_read().unwrap();
    let versions = txn.open_table(VERSIONS).unwrap();
    let format_of = |id: &str, version: u64| {
        versions
            .get(("Patient", id, version))
            .unwrap()
            .unwrap()
            .value()[0]
    };
    for version in 1..=14 {
        assert_eq!(format_of("k", version), 3, "k version {version}");
    }
    for version in 1..=13 {
        assert_eq!(format_of("z", version), 2, "z version {version}");
    }
    drop((versions, txn));
    for version in 1..=14 {
        let family = store
            .vread(&c, "Patient", "k", version)
            .unwrap()
            .to_json()
            .unwrap()["name"][0]["family"]
            .clone();
        assert_eq!(family, format!("k{version}"));
    }
    assert_eq!(
        store.read(&c, "Patient", "z").unwrap().to_json().unwrap()["name"][0]["family"],
        "z13"
    );
    assert_eq!(
        store
            .history_instance(&c, "Patient", "k", &HistoryQuery::default())
            .unwrap()
            .entries
            .len(),
        14
    );
}

/// `check` finds tables that each look fine but disagree: a body that is not the one its
/// record hashed, a missing or orphaned `bodies` row, a change row naming another version.
#[test]
fn check_finds_versions_that_disagree_with_their_bodies_or_changes() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let db_dir = dir.path().join("db");
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        // "r…" ids land in the middle (format 3), "z" appends (format 2).
        for id in ["r5", "r1", "r3", "z"] {
            store.update(&c, "Patient", id, patient(id), None).unwrap();
        }
        merge_now(&store);
    }
    let report = Store::check(&c, &db_dir, key_for(dir.path())).unwrap();
    assert_eq!(report.versions, 4);
    // Each damage is made through redb on the open store (the pages authenticate), checked,
    // and undone by the next one's setup from a saved copy of the files.
    let saved = dir.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    copy_files(&db_dir, &saved);
    let restore = || copy_files(&saved, &db_dir);
    type Damage = fn(&redb::WriteTransaction);
    let damages: [(&str, Damage); 4] = [
        ("content hash", give_the_first_body_the_seconds_bytes),
        ("missing", |txn| {
            let mut bodies = txn.open_table(record::BODIES).unwrap();
            let seq = bodies.first().unwrap().unwrap().0.value();
            bodies.remove(seq).unwrap();
        }),
        ("no version refers", |txn| {
            let mut bodies = txn.open_table(record::BODIES).unwrap();
            let body = bodies.first().unwrap().unwrap().1.value().to_vec();
            bodies.insert(999, body.as_slice()).unwrap();
        }),
        ("does not name", |txn| {
            let mut changes = txn.open_table(record::CHANGES).unwrap();
            let first = changes.get(1).unwrap().unwrap().value().to_vec();
            changes.insert(2, first.as_slice()).unwrap();
        }),
    ];
    for (expected, damage) in damages {
        restore();
        {
            let store = open_store(dir.path(), ReadAudit::Durable);
            let txn = store.inner.db.begin_write().unwrap();
            damage(&txn);
            txn.commit().unwrap();
        }
        let error = Store::check(&c, &db_dir, key_for(dir.path())).unwrap_err();
        assert!(
            matches!(&error, Error::Corrupted(m) if m.contains(expected)),
            "{expected}: {error}"
        );
    }
    restore();
    assert_eq!(
        Store::check(&c, &db_dir, key_for(dir.path()))
            .unwrap()
            .versions,
        4
    );
}

/// A database written before table format 3 (bodies inline in `versions`) opens, reads every
/// old version, takes writes in the new layout beside the old ones, and compacts, copies and
/// checks with both.
#[test]
fn records_with_inline_bodies_are_read_beside_records_with_bodies_in_their_table() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let body_rows = |store: &Store| {
        use redb::ReadableTableMetadata;
        let txn = store.inner.db.begin_read().unwrap();
        txn.open_table(record::BODIES).unwrap().len().unwrap()
    };
    let (before, history_before) = {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..30 {
            store
                .update(
                    &c,
                    "Patient",
                    &format!("o{i}"),
                    patient(&format!("Old{i}")),
                    None,
                )
                .unwrap();
        }
        store
            .update(&c, "Patient", "o1", patient("Old1-second"), None)
            .unwrap();
        store.delete(&c, "Patient", "o2", None).unwrap();
        // "o10".."o29" land before "o3".."o9", and "o1" version 2 before "o10".
        assert_eq!(
            body_rows(&store),
            21,
            "bodies of versions that did not append"
        );
        let before: Vec<StoredResource> = (0..30)
            .filter(|i| *i != 2)
            .map(|i| store.read(&c, "Patient", &format!("o{i}")).unwrap())
            .collect();
        let history = store.history_system(&c, &HistoryQuery::default()).unwrap();
        let txn = store.inner.db.begin_write().unwrap();
        record::inline_layout_for_tests(&txn);
        txn.commit().unwrap();
        assert_eq!(body_rows(&store), 0);
        (before, history.entries)
    };
    let mut store = open_store(dir.path(), ReadAudit::Durable);
    // Every old version reads back exactly, by every path.
    for old in &before {
        assert_eq!(&store.read(&c, "Patient", &old.id).unwrap(), old);
    }
    assert_eq!(
        store
            .vread(&c, "Patient", "o1", 1)
            .unwrap()
            .to_json()
            .unwrap()["name"][0]["family"],
        "Old1"
    );
    assert!(matches!(
        store.read(&c, "Patient", "o2"),
        Err(Error::Gone { version: 2 })
    ));
    assert_eq!(
        store
            .history_system(&c, &HistoryQuery::default())
            .unwrap()
            .entries,
        history_before
    );
    let feed = store.changes_after(&c, None, 100).unwrap();
    assert_eq!(feed.changes.len(), 32);
    let keys = [("Patient", "o0"), ("Patient", "o1")];
    let many = store
        .read_many(&c, AuditAction::Other("search".into()), [0; 32], &keys)
        .unwrap();
    assert_eq!(many[1].as_ref().unwrap(), &before[1]);
    // New versions go where they go in a new database; old and new read side by side.
    store
        .update(&c, "Patient", "o0", patient("New0"), None)
        .unwrap();
    store
        .update(&c, "Patient", "n1", patient("New1"), None)
        .unwrap();
    assert_eq!(body_rows(&store), 2, "neither is an append");
    let history = store
        .history_instance(&c, "Patient", "o0", &HistoryQuery::default())
        .unwrap();
    let families: Vec<Value> = history
        .entries
        .iter()
        .map(|v| v.to_json().unwrap()["name"][0]["family"].clone())
        .collect();
    assert_eq!(families, [json!("New0"), json!("Old0")]);
    // Compaction, `check` and a copy keep both kinds.
    store.compact(&c).unwrap();
    assert_eq!(store.read(&c, "Patient", "o5").unwrap(), before[4]);
    assert_eq!(store.read(&c, "Patient", "n1").unwrap().version, 1);
    let copy_key = copy_into(&store, dir.path());
    drop(store);
    let report = Store::check(&c, dir.path().join("db"), key_for(dir.path())).unwrap();
    assert!(report.redb_integrity_ok);
    let copy = Store::builder(dir.path().join("copy"))
        .key(copy_key)
        .open()
        .unwrap();
    assert_eq!(copy.read(&c, "Patient", "o7").unwrap(), before[6]);
    assert_eq!(
        copy.read(&c, "Patient", "o0").unwrap().to_json().unwrap()["name"][0]["family"],
        "New0"
    );
}

#[test]
fn audit_leaves_are_found_by_time_and_a_copy_keeps_the_time_blocks() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    let c = ctx();
    for i in 0..20 {
        store
            .update(&c, "Patient", &format!("t{i}"), patient("Time"), None)
            .unwrap();
        store.read(&c, "Patient", &format!("t{i}")).unwrap();
    }
    let size = store.audit_size().unwrap();
    let all: Vec<audit::AuditLeaf> = (0..size)
        .map(|seq| store.audit_leaf(seq).unwrap())
        .collect();
    let middle = all[size as usize / 2].record.time_micros;
    let expected: Vec<u64> = all
        .iter()
        .filter(|leaf| leaf.record.time_micros >= middle)
        .map(|leaf| leaf.seq)
        .collect();
    let (found, next) = store
        .audit_leaves_in_time_range(middle..=i64::MAX, 0, 1_000)
        .unwrap();
    assert_eq!(
        found.iter().map(|leaf| leaf.seq).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(next, None);
    let (first, next) = store
        .audit_leaves_in_time_range(middle..=i64::MAX, 0, 2)
        .unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(next, Some(expected[2]));

    let copy_key = copy_into(&store, dir.path());
    drop(store);
    let copy = Store::builder(dir.path().join("copy"))
        .key(copy_key)
        .open()
        .unwrap();
    let (in_copy, _) = copy
        .audit_leaves_in_time_range(middle..=i64::MAX, 0, 1_000)
        .unwrap();
    assert_eq!(
        in_copy
            .iter()
            .map(|leaf| leaf.seq)
            .take(expected.len())
            .collect::<Vec<_>>(),
        expected
    );
    // The copy's one time block covers every leaf, the copied ones and its own since.
    let copy_size = copy.audit_size().unwrap();
    let txn = copy.inner.db.begin_read().unwrap();
    let blocks = txn.open_table(crate::audit::log::TIME_BLOCKS).unwrap();
    let row = blocks.get(0).unwrap().unwrap().value();
    assert_eq!(u64::from_le_bytes(row[16..].try_into().unwrap()), copy_size);
}

/// A database written in page format 1 (before format 2 existed) opens, reads, takes writes
/// and passes `check` in its own format; `copy_to` rewrites it in format 2.
#[test]
fn a_store_in_page_format_1_keeps_working_and_copies_into_format_2() {
    use crate::crypto::backend::set_new_file_format_for_tests;
    use crate::crypto::page::PageFormat;
    let dir = TempDir::new().unwrap();
    let c = ctx();
    set_new_file_format_for_tests(PageFormat::V1);
    let created = std::panic::catch_unwind(|| {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..50 {
            store
                .update(&c, "Patient", &format!("v{i}"), patient("One"), None)
                .unwrap();
        }
        store.audit_head().unwrap()
    });
    set_new_file_format_for_tests(PageFormat::NEWEST);
    let head = created.unwrap();
    let file = dir.path().join("db").join(DATABASE_FILE);
    let format_of = |path: &Path| crate::crypto::page::image::format(&std::fs::read(path).unwrap());
    assert_eq!(format_of(&file), PageFormat::V1);

    let store = open_store(dir.path(), ReadAudit::Durable);
    for i in 0..50 {
        store
            .update(&c, "Patient", &format!("v{i}"), patient("Two"), None)
            .unwrap();
    }
    for i in 50..80 {
        store
            .update(&c, "Patient", &format!("v{i}"), patient("Two"), None)
            .unwrap();
    }
    assert_eq!(store.read(&c, "Patient", "v7").unwrap().version, 2);
    store.verify_audit_against(&head).unwrap();
    drop(store);
    assert_eq!(format_of(&file), PageFormat::V1, "a file keeps its format");
    let report = Store::check(&c, dir.path().join("db"), key_for(dir.path())).unwrap();
    assert_eq!(report.pages.format_version, 1);
    assert!(report.pages.is_ok());
    assert!(
        report.warnings.iter().any(|w| w.contains("page format 1")),
        "{:?}",
        report.warnings
    );

    let store = open_store(dir.path(), ReadAudit::Durable);
    let dest = dir.path().join("copy");
    store
        .copy_to(&c, &dest, key_for(dir.path()), KdfParams::fast_insecure())
        .unwrap();
    drop(store);
    assert_eq!(format_of(&dest.join(DATABASE_FILE)), PageFormat::V2);
    let copy = Store::builder(&dest)
        .key(key_for(dir.path()))
        .open()
        .unwrap();
    for i in 0..80 {
        let version = if i < 50 { 2 } else { 1 };
        assert_eq!(
            copy.read(&c, "Patient", &format!("v{i}")).unwrap().version,
            version
        );
    }
    drop(copy);
    let report = Store::check(&c, &dest, key_for(dir.path())).unwrap();
    assert_eq!(report.pages.format_version, 2);
    assert!(!report.warnings.iter().any(|w| w.contains("page format")));
}

/// A data file cut down to nothing (or to its preamble) is refused on open, never taken for
/// a new, empty database with a new audit log; the file is left as it was.
#[test]
fn a_data_file_cut_to_nothing_is_refused_not_started_afresh() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        store
            .update(&ctx(), "Patient", "kept", patient("K"), None)
            .unwrap();
    }
    let path = dir.path().join("db").join(DATABASE_FILE);
    let original = std::fs::read(&path).unwrap();
    for keep in [0, crate::crypto::page::PREAMBLE_SIZE, 4096] {
        std::fs::write(&path, &original[..keep]).unwrap();
        let err = Store::builder(dir.path().join("db"))
            .key(key_for(dir.path()))
            .open()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Corrupted(m) if m.contains("holds no database")),
            "{keep} bytes: {err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap().len(),
            keep,
            "the file was changed"
        );
    }
    std::fs::write(&path, &original).unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    assert_eq!(store.read(&ctx(), "Patient", "kept").unwrap().version, 1);
}

/// A rotated audit key: the rotation is a leaf naming the new key under a head of the old
/// one, later heads carry the new key, and the whole chain verifies, also after reopening
/// and against heads kept from before the rotation.
#[test]
fn rotating_the_audit_key_chains_the_old_key_to_the_new() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    for i in 0..3 {
        store
            .update(
                &ctx(),
                "Patient",
                &format!("p{i}"),
                json!({"resourceType": "Patient"}),
                None,
            )
            .unwrap();
    }
    let before = store.audit_head().unwrap();
    let old_key = before.public_key;

    let rotation = store.rotate_audit_key(&ctx()).unwrap();
    rotation.verify().unwrap();
    assert_eq!(
        rotation.public_key, old_key,
        "the old key signs over the rotation"
    );
    let leaf = store.audit_leaf(rotation.size - 1).unwrap();
    assert_eq!(leaf.record.action, AuditAction::AuditKeyRotation);
    let new_key = leaf.record.content_hash.unwrap();
    assert_ne!(new_key, old_key);
    store
        .prove_inclusion(rotation.size - 1, rotation.size)
        .unwrap()
        .verify(&rotation)
        .unwrap();
    let keys = store.audit_keys().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!((keys[0].first_size, keys[0].public_key), (0, old_key));
    assert_eq!(
        (keys[1].first_size, keys[1].public_key),
        (rotation.size + 1, new_key)
    );

    store
        .update(
            &ctx(),
            "Patient",
            "p9",
            json!({"resourceType": "Patient"}),
            None,
        )
        .unwrap();
    let after = store.audit_head().unwrap();
    assert!(after.size > rotation.size);
    assert_eq!(after.public_key, new_key);
    let report = store.verify_audit().unwrap();
    assert_eq!(report.public_key, new_key);
    assert_eq!(report.keys, keys);
    store.verify_audit_against(&before).unwrap();
    store.verify_audit_against(&rotation).unwrap();
    store.verify_audit_against(&after).unwrap();
    // Consistency across the rotation holds under the key the rotation leaf names only.
    let across = store.prove_consistency(before.size, after.size).unwrap();
    across.verify_rotated(&before, &after, &new_key).unwrap();
    assert!(
        across.verify(&before, &after).is_err(),
        "two keys, one expected"
    );
    assert!(across.verify_rotated(&before, &after, &old_key).is_err());
    drop(store);

    // Reopened: the schedule stays, new heads keep the new key, a second rotation chains on.
    let store = open_store(dir.path(), ReadAudit::Durable);
    assert_eq!(store.audit_keys().unwrap(), keys);
    store.read(&ctx(), "Patient", "p1").unwrap();
    assert_eq!(store.audit_head().unwrap().public_key, new_key);
    let second = store.rotate_audit_key(&ctx()).unwrap();
    assert_eq!(second.public_key, new_key);
    assert_eq!(store.audit_keys().unwrap().len(), 3);
    let report = store.verify_audit().unwrap();
    assert_eq!(report.keys.len(), 3);
    store.verify_audit_against(&before).unwrap();
    store.verify_audit_against(&after).unwrap();
}

/// The key schedule is checked, not believed: without its entries, or with a key starting
/// later than its first head, the heads no longer verify.
#[test]
fn a_tampered_audit_key_schedule_fails_verification() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    store
        .update(
            &ctx(),
            "Patient",
            "p",
            json!({"resourceType": "Patient"}),
            None,
        )
        .unwrap();
    let before = store.audit_head().unwrap();
    let rotation = store.rotate_audit_key(&ctx()).unwrap();
    store
        .update(
            &ctx(),
            "Patient",
            "q",
            json!({"resourceType": "Patient"}),
            None,
        )
        .unwrap();
    let after = store.audit_head().unwrap();
    store.verify_audit().unwrap();
    let schedule_now = |store: &Store| {
        let txn = store.inner.db.begin_read().unwrap();
        let meta = txn.open_table(crate::audit::log::META).unwrap();
        meta.get(crate::audit::log::KEY_SCHEDULE)
            .unwrap()
            .unwrap()
            .value()
            .to_vec()
    };
    let rewrite = |store: &Store, schedule: Option<&[u8]>| {
        let txn = store.inner.db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(crate::audit::log::META).unwrap();
            match schedule {
                Some(bytes) => meta.insert(crate::audit::log::KEY_SCHEDULE, bytes).unwrap(),
                None => meta.remove(crate::audit::log::KEY_SCHEDULE).unwrap(),
            };
        }
        txn.commit().unwrap();
    };
    let genuine = schedule_now(&store);

    // Forgetting the rotation: the old heads do not verify under the new key alone.
    rewrite(&store, None);
    assert!(store.verify_audit().is_err());
    assert!(store.verify_audit_against(&before).is_err());
    // The new key claimed to start later than it did.
    let mut later = genuine.clone();
    let first = u64::from_le_bytes(later[40..48].try_into().unwrap());
    later[40..48].copy_from_slice(&(first + 1).to_le_bytes());
    rewrite(&store, Some(&later));
    assert!(store.verify_audit().is_err());
    assert!(store.verify_audit_against(&after).is_err());
    // The rotation claimed one leaf earlier, where no rotation leaf is.
    let mut earlier = genuine.clone();
    earlier[40..48].copy_from_slice(&(first - 1).to_le_bytes());
    rewrite(&store, Some(&earlier));
    assert!(store.verify_audit().is_err());
    // Put back, it verifies again.
    rewrite(&store, Some(&genuine));
    store.verify_audit().unwrap();
    store.verify_audit_against(&rotation).unwrap();
}

/// A store that merges only when a test says so.
fn store_without_merges(dir: &Path) -> Store {
    Store::builder(dir.join("db"))
        .key(key_for(dir))
        .read_audit(ReadAudit::Durable)
        .cache_size(8 << 20)
        .merge_threshold(usize::MAX)
        .open_or_create()
        .unwrap()
}

/// Ids that land among each other in no particular order, as random client ids do.
fn scattered_ids(count: u32) -> Vec<String> {
    (0..count)
        .map(|i| format!("s{:08x}", i.wrapping_mul(2_654_435_761)))
        .collect()
}

/// How many versions are pending in the store's cache (`pending.rs`).
fn pending_in_cache(store: &Store) -> usize {
    store.inner.pending.read().unwrap().unmerged_for_tests()
}

/// Everything a reader can learn about `ids` through every read path, as text.
fn every_read(store: &Store, ids: &[String]) -> Vec<String> {
    let c = ctx();
    let mut seen = Vec::new();
    let describe = |result: Result<StoredResource>| match result {
        Ok(stored) => format!(
            "{} v{} {:?} {} {}",
            stored.id,
            stored.version,
            stored.kind,
            stored.last_updated.timestamp_micros(),
            String::from_utf8_lossy(stored.json_bytes())
        ),
        Err(error) => format!("error {error}"),
    };
    for id in ids {
        seen.push(describe(store.read(&c, "Patient", id)));
        let history = store.history_instance(&c, "Patient", id, &HistoryQuery::default());
        let versions = history.as_ref().map_or(0, |page| page.entries.len() as u64);
        for version in 0..=versions + 1 {
            seen.push(describe(store.vread(&c, "Patient", id, version)));
        }
        if let Ok(page) = &history {
            for stored in &page.entries {
                seen.push(describe(store.read_as_of(
                    &c,
                    "Patient",
                    id,
                    stored.last_updated,
                )));
                let just_before = stored.last_updated - chrono::Duration::microseconds(1);
                seen.push(describe(store.read_as_of(&c, "Patient", id, just_before)));
            }
            // Paged two at a time, and as of the instant of each version.
            let mut cursor = None;
            loop {
                let query = HistoryQuery {
                    count: Some(2),
                    cursor,
                    ..HistoryQuery::default()
                };
                let page = store.history_instance(&c, "Patient", id, &query).unwrap();
                seen.extend(page.entries.into_iter().map(|s| describe(Ok(s))));
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            for stored in &page.entries {
                let query = HistoryQuery {
                    at: Some(stored.last_updated),
                    ..HistoryQuery::default()
                };
                let at = store.history_instance(&c, "Patient", id, &query).unwrap();
                seen.extend(at.entries.into_iter().map(|s| describe(Ok(s))));
            }
        }
        if let Err(error) = &history {
            seen.push(format!("history: error {error}"));
        }
    }
    let mut history_at = Vec::new();
    for query in [
        HistoryQuery::default(),
        HistoryQuery {
            count: Some(7),
            ..HistoryQuery::default()
        },
    ] {
        for page in [
            store.history_type(&c, "Patient", &query).unwrap(),
            store.history_system(&c, &query).unwrap(),
        ] {
            history_at.extend(page.entries.iter().map(|s| s.last_updated));
            seen.extend(page.entries.into_iter().map(|s| describe(Ok(s))));
        }
    }
    for at in history_at.into_iter().step_by(5) {
        let query = HistoryQuery {
            at: Some(at),
            ..HistoryQuery::default()
        };
        let page = store.history_system(&c, &query).unwrap();
        seen.extend(page.entries.into_iter().map(|s| describe(Ok(s))));
    }
    let feed = store.changes_after(&c, None, usize::MAX).unwrap();
    seen.extend(
        feed.changes
            .into_iter()
            .map(|(seq, s)| format!("{seq}: {}", describe(Ok(s)))),
    );
    let keys: Vec<(&str, &str)> = ids.iter().map(|id| ("Patient", id.as_str())).collect();
    let many = store
        .read_many(&c, AuditAction::Other("search".into()), [0; 32], &keys)
        .unwrap();
    seen.extend(
        many.into_iter()
            .map(|found| found.map_or_else(|| "none".into(), |s| describe(Ok(s)))),
    );
    seen
}

/// Versions written among random keys wait in the change table (`pending.rs`); every read
/// path answers the same before a merge moves them into `versions`, after it, after more
/// versions of the same resources wait again, and after a reopen; `check` passes throughout.
#[test]
fn pending_versions_read_the_same_by_every_path_before_and_after_merges() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let ids = scattered_ids(40);
    let mut store = store_without_merges(dir.path());
    let write_round = |store: &Store, round: u32| {
        // Singles, a batch, deletions and re-creations, all out of key order.
        for id in ids.iter().take(10) {
            store
                .update(&c, "Patient", id, patient(&format!("{id}-{round}")), None)
                .unwrap();
        }
        let items = ids
            .iter()
            .skip(10)
            .map(|id| Upsert {
                resource_type: "Patient".into(),
                id: Some(id.clone()),
                resource: patient(&format!("{id}-{round}")),
                expected_version: None,
            })
            .collect();
        for result in store.write(&c, |txn| txn.update_many(items)).unwrap() {
            result.unwrap();
        }
        for id in ids.iter().skip(usize::try_from(round).unwrap()).step_by(7) {
            store.delete(&c, "Patient", id, None).unwrap();
        }
    };
    write_round(&store, 1);
    write_round(&store, 2);
    assert!(
        pending_in_cache(&store) > 40,
        "scattered ids are written as pending versions"
    );
    let before = every_read(&store, &ids);
    merge_now(&store);
    assert_eq!(pending_in_cache(&store), 0);
    assert_eq!(every_read(&store, &ids), before, "after the merge");
    // Merged versions and new pending ones of the same resources, side by side.
    write_round(&store, 3);
    assert!(pending_in_cache(&store) > 0);
    let mixed = every_read(&store, &ids);
    assert_ne!(mixed, before);
    let versions = store
        .changes_after(&c, None, usize::MAX)
        .unwrap()
        .changes
        .len();
    drop(store);
    let report = Store::check(&c, dir.path().join("db"), key_for(dir.path())).unwrap();
    assert_eq!(
        report.versions,
        u64::try_from(versions).unwrap(),
        "check counts pending versions too"
    );
    store = store_without_merges(dir.path());
    assert!(pending_in_cache(&store) > 0, "reopening finds them again");
    assert_eq!(every_read(&store, &ids), mixed, "after a reopen");
    let copy_key = copy_into(&store, dir.path());
    store.compact(&c).unwrap();
    assert_eq!(pending_in_cache(&store), 0, "compaction merges first");
    assert_eq!(every_read(&store, &ids), mixed, "after compaction");
    let copy = Store::builder(dir.path().join("copy"))
        .key(copy_key)
        .merge_threshold(usize::MAX)
        .open()
        .unwrap();
    assert!(pending_in_cache(&copy) > 0, "a copy keeps them pending");
    assert_eq!(every_read(&copy, &ids), mixed, "in a copy");
    merge_now(&copy);
    assert_eq!(every_read(&copy, &ids), mixed, "in a copy, merged");
}

/// A write transaction sees the pending versions committed before it and its own: versions
/// and deletions decide right, its reads find them, and a tombstone (written to `versions`
/// at once) after pending versions is the current version.
#[test]
fn a_write_transaction_sees_pending_versions_old_and_its_own() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let store = store_without_merges(dir.path());
    let ids = scattered_ids(6);
    for id in &ids {
        store
            .update(&c, "Patient", id, patient("one"), None)
            .unwrap();
    }
    // One that landed among the others (not after them all) is pending.
    let id = ids
        .iter()
        .find(|id| {
            !pending::SharedPending::candidates_for_writer(
                &store.inner.pending,
                "Patient",
                id,
                0,
                u64::MAX,
            )
            .is_empty()
        })
        .unwrap();
    store
        .write(&c, |txn| {
            assert_eq!(txn.read("Patient", id)?.version, 1);
            let second = txn.update("Patient", id, patient("two"), Some(1))?;
            assert_eq!((second.resource.version, second.created), (2, false));
            let third = txn.update("Patient", id, patient("three"), Some(2))?;
            assert_eq!(third.resource.version, 3);
            assert!(matches!(
                txn.update("Patient", id, patient("stale"), Some(2)),
                Err(Error::VersionConflict {
                    expected: 2,
                    current: 3
                })
            ));
            assert_eq!(
                txn.read("Patient", id)?.to_json()?["name"][0]["family"],
                "three"
            );
            let deleted = txn.delete("Patient", id, Some(3))?;
            assert_eq!(deleted.version, 4);
            assert!(matches!(
                txn.read("Patient", id),
                Err(Error::Gone { version: 4 })
            ));
            let again = txn.update("Patient", id, patient("five"), Some(4))?;
            assert_eq!((again.resource.version, again.created), (5, true));
            Ok(())
        })
        .unwrap();
    // An aborted transaction's pending versions leave no trace.
    let mut txn = store.begin_write(&c).unwrap();
    txn.update("Patient", &ids[1], patient("aborted"), None)
        .unwrap();
    txn.abort().unwrap();
    let families = |store: &Store| -> Vec<(u64, Value)> {
        store
            .history_instance(&c, "Patient", id, &HistoryQuery::default())
            .unwrap()
            .entries
            .iter()
            .map(|v| (v.version, v.to_json().unwrap()["name"][0]["family"].clone()))
            .collect()
    };
    let expected = vec![
        (5, json!("five")),
        (4, Value::Null),
        (3, json!("three")),
        (2, json!("two")),
        (1, json!("one")),
    ];
    assert_eq!(families(&store), expected);
    assert_eq!(store.read(&c, "Patient", &ids[1]).unwrap().version, 1);
    merge_now(&store);
    assert_eq!(families(&store), expected);
    assert_eq!(store.read(&c, "Patient", &ids[1]).unwrap().version, 1);
}

/// A read snapshot keeps reading exactly what it saw while merges run: from the shared
/// cache after one merge, and from its own change rows once two merges have made the cache
/// forget versions it still sees.
#[test]
fn a_snapshot_reads_its_pending_versions_across_merges() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let store = store_without_merges(dir.path());
    let ids = scattered_ids(8);
    for id in &ids {
        store
            .update(&c, "Patient", id, patient("seen"), None)
            .unwrap();
    }
    let snapshot = store.inner.versions_snapshot().unwrap();
    let family_in = |snapshot: &VersionTables, id: &str| -> (u64, Value) {
        let (version, stored) = snapshot
            .find(&store.inner.pending, "Patient", id, Lookup::Current)
            .unwrap()
            .unwrap();
        (
            version,
            stored.to_json().unwrap()["name"][0]["family"].clone(),
        )
    };
    let seen: Vec<(u64, Value)> = ids.iter().map(|id| family_in(&snapshot, id)).collect();
    assert!(seen.iter().all(|(v, f)| *v == 1 && f == "seen"));
    for round in ["later", "latest"] {
        for id in &ids {
            store
                .update(&c, "Patient", id, patient(round), None)
                .unwrap();
        }
        merge_now(&store);
        let now: Vec<(u64, Value)> = ids.iter().map(|id| family_in(&snapshot, id)).collect();
        assert_eq!(now, seen, "after the merge of the {round} versions");
    }
    assert!(
        snapshot.pending.read_its_own_rows(),
        "two merges later, the cache no longer reaches back to the snapshot"
    );
    let fresh = store.inner.versions_snapshot().unwrap();
    assert!(!fresh.pending.read_its_own_rows());
    assert!(
        ids.iter()
            .all(|id| family_in(&fresh, id) == (3, json!("latest")))
    );
}

/// `check` finds a pending version whose body is not the one its change row hashed, and
/// one that is in `versions` as well as pending.
#[test]
fn check_finds_pending_versions_that_disagree_with_the_other_tables() {
    let dir = TempDir::new().unwrap();
    let c = ctx();
    let db_dir = dir.path().join("db");
    let ids = scattered_ids(12);
    {
        let store = store_without_merges(dir.path());
        for id in &ids {
            store.update(&c, "Patient", id, patient(id), None).unwrap();
        }
        assert!(pending_in_cache(&store) >= 2);
    }
    let saved = dir.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    copy_files(&db_dir, &saved);
    type Damage = fn(&redb::WriteTransaction);
    let damages: [(&str, Damage); 2] = [
        (
            "does not match its content hash",
            give_the_first_body_the_seconds_bytes,
        ),
        (
            "is pending, but its version is in the versions table",
            |txn| {
                let changes = txn.open_table(record::CHANGES).unwrap();
                let (seq, change) = changes
                    .iter()
                    .unwrap()
                    .map(|entry| {
                        let (seq, bytes) = entry.unwrap();
                        (seq.value(), record::Change::decode(bytes.value()).unwrap())
                    })
                    .find(|(_, change)| change.pending.is_some())
                    .unwrap();
                let header = change.pending_record(seq).unwrap();
                let encoded = record::encode_record(
                    header.kind,
                    header.last_updated_micros,
                    seq,
                    &header.content_hash,
                    b"",
                )
                .unwrap();
                txn.open_table(VERSIONS)
                    .unwrap()
                    .insert(
                        (
                            change.resource_type.as_str(),
                            change.id.as_str(),
                            change.version,
                        ),
                        encoded.record.as_slice(),
                    )
                    .unwrap();
            },
        ),
    ];
    for (expected, damage) in damages {
        copy_files(&saved, &db_dir);
        {
            let store = store_without_merges(dir.path());
            let txn = store.inner.db.begin_write().unwrap();
            damage(&txn);
            txn.commit().unwrap();
        }
        let error = Store::check(&c, &db_dir, key_for(dir.path())).unwrap_err();
        assert!(
            matches!(&error, Error::Corrupted(m) if m.contains(expected)),
            "{expected}: {error}"
        );
    }
}
