//! Auxiliary databases (their own file id, keys shared with the store, check, delete) and the
//! change feed that derived indexes read.

use redb::{ReadableDatabase, TableDefinition};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::tests::{key_for, open_store};
use super::*;
use crate::crypto::page::{self, image};
use crate::crypto::{create_key_file, verify_aux_file, verify_file};

const T: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("t");

fn ctx() -> AccessContext {
    AccessContext::new("indexer", "unit-test", "local", "req-aux")
}

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}]})
}

fn fill(db: &redb::Database, range: std::ops::Range<u64>) {
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(T).unwrap();
        for i in range {
            t.insert(i, format!("value-{i}").repeat(50).as_bytes())
                .unwrap();
        }
    }
    txn.commit().unwrap();
}

fn read_all(db: &redb::Database) -> std::result::Result<Vec<(u64, Vec<u8>)>, redb::Error> {
    let txn = db.begin_read()?;
    let t = txn.open_table(T)?;
    let mut out = Vec::new();
    for entry in t.range::<u64>(..)? {
        let (k, v) = entry?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

fn expected(range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
    range
        .map(|i| (i, format!("value-{i}").repeat(50).into_bytes()))
        .collect()
}

fn aux_file(dir: &TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join("db").join(format!("{name}.redb"))
}

#[test]
fn aux_database_round_trips_and_reopens() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        let db = store.open_aux_database("index").unwrap();
        fill(&db, 0..200);
        // Open only once at a time, like the store.
        let err = store.open_aux_database("index").unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
        // The store keeps working next to it, with its own writer lock.
        let txn = db.begin_write().unwrap();
        store
            .update(&ctx(), "Patient", "p1", patient("A"), None)
            .unwrap();
        drop(txn);
        drop(db);
    }
    let path = aux_file(&dir, "index");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let store = open_store(dir.path(), ReadAudit::Durable);
    let db = store.open_aux_database("index").unwrap();
    assert_eq!(read_all(&db).unwrap(), expected(0..200));
    fill(&db, 200..300);
    drop(db);
    drop(store);
    let keyring = Keyring::open(&dir.path().join("db"), &key_for(dir.path())).unwrap();
    let report = verify_aux_file(&path, &keyring, "index").unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(report.page_blocks > 3);
    // Verified as the main file or as another aux file, it is foreign.
    assert!(!verify_file(&path, &keyring).unwrap().is_ok());
    assert!(!verify_aux_file(&path, &keyring, "other").unwrap().is_ok());
}

#[test]
fn aux_names_are_restricted() {
    let (_dir, store) = super::tests::temp_store(ReadAudit::Durable);
    for bad in [
        "",
        "Index",
        "a.b",
        "../x",
        "a/b",
        "fhirkeep",
        "fhirkeep-index",
        "x".repeat(33).as_str(),
        "ünï",
    ] {
        assert!(
            matches!(store.open_aux_database(bad), Err(Error::Storage(_))),
            "{bad:?}"
        );
        assert!(store.delete_aux_database(bad).is_err(), "{bad:?}");
    }
    let ok = "a-z_0-9".to_string() + &"x".repeat(25);
    assert_eq!(ok.len(), 32);
    drop(store.open_aux_database(&ok).unwrap());
}

/// The store's file and an aux file share the data keys: without distinct file ids, a block
/// copied from one into the other at the same index would authenticate.
#[test]
fn a_store_block_copied_into_the_aux_file_fails_authentication() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..40 {
            store
                .update(&ctx(), "Patient", &format!("p{i}"), patient("B"), None)
                .unwrap();
        }
        let db = store.open_aux_database("index").unwrap();
        fill(&db, 0..300);
    }
    let main = dir.path().join("db").join(DATABASE_FILE);
    let aux = aux_file(&dir, "index");
    let main_bytes = std::fs::read(&main).unwrap();
    let aux_bytes = std::fs::read(&aux).unwrap();
    let keyring = Keyring::open(&dir.path().join("db"), &key_for(dir.path())).unwrap();
    assert!(verify_aux_file(&aux, &keyring, "index").unwrap().is_ok());
    let shared = image::page_count(&main_bytes).min(image::page_count(&aux_bytes));
    let mut tried = 0;
    for pg in 1..=shared {
        if !image::is_written(&main_bytes, pg) {
            continue;
        }
        let mut bad = aux_bytes.clone();
        image::put_block(&mut bad, pg, &image::block(&main_bytes, pg));
        std::fs::write(&aux, &bad).unwrap();
        let report = verify_aux_file(&aux, &keyring, "index").unwrap();
        assert_eq!(report.failed_pages, vec![pg]);
        tried += 1;
    }
    assert!(tried > 3, "only {tried} blocks compared");
    // The header copies and the preamble do not move either.
    for range in [
        0..page::PREAMBLE_SIZE,
        image::header(&aux_bytes, false),
        image::header(&aux_bytes, true),
    ] {
        let mut bad = aux_bytes.clone();
        bad[range.clone()].copy_from_slice(&main_bytes[range]);
        std::fs::write(&aux, &bad).unwrap();
        let report = verify_aux_file(&aux, &keyring, "index").unwrap();
        assert!(
            !report.problems.is_empty() || !report.warnings.is_empty(),
            "{report:?}"
        );
    }
    // The aux file renamed as the store's file is refused before any block is used.
    std::fs::write(&aux, &aux_bytes).unwrap();
    std::fs::copy(&aux, &main).unwrap();
    drop(keyring);
    let err = Store::builder(dir.path().join("db"))
        .key(key_for(dir.path()))
        .open()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Corrupted(m) if m.contains("another")),
        "{err}"
    );
}

#[test]
fn a_page_copied_into_the_aux_file_is_an_error_through_redb() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        for i in 0..40 {
            store
                .update(&ctx(), "Patient", &format!("p{i}"), patient("C"), None)
                .unwrap();
        }
        fill(&store.open_aux_database("index").unwrap(), 0..300);
    }
    let main_bytes = std::fs::read(dir.path().join("db").join(DATABASE_FILE)).unwrap();
    let aux = aux_file(&dir, "index");
    let good = std::fs::read(&aux).unwrap();
    let mut errors = 0;
    for pg in 1..image::page_count(&good).min(image::page_count(&main_bytes) + 1) {
        if !image::is_written(&main_bytes, pg) || !image::is_written(&good, pg) {
            continue;
        }
        let mut bad = good.clone();
        image::put_block(&mut bad, pg, &image::block(&main_bytes, pg));
        std::fs::write(&aux, &bad).unwrap();
        let store = open_store(dir.path(), ReadAudit::Durable);
        let outcome = store
            .open_aux_database("index")
            .map_err(|e| e.to_string())
            .and_then(|db| read_all(&db).map_err(|e| e.to_string()));
        match outcome {
            // A free page: never read.
            Ok(data) => assert_eq!(data, expected(0..300)),
            Err(message) => {
                assert!(message.contains("failed authentication"), "{message}");
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "no moved block was ever read");
}

#[test]
fn aux_database_with_another_key_fails() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        fill(&store.open_aux_database("index").unwrap(), 0..50);
    }
    // Another database's store cannot use this aux file, even under its own name.
    let other = TempDir::new().unwrap();
    let other_store = open_store(other.path(), ReadAudit::Durable);
    std::fs::copy(aux_file(&dir, "index"), aux_file(&other, "index")).unwrap();
    let err = other_store.open_aux_database("index").unwrap_err();
    assert!(
        matches!(&err, Error::Corrupted(m) if m.contains("another")),
        "{err}"
    );
    // With the right preamble but the wrong keys, no block authenticates.
    let mut bytes = std::fs::read(aux_file(&other, "index")).unwrap();
    let other_keyring = &other_store.inner.counters.0;
    let id = page::aux_file_id(&other_keyring.db_id(), "index");
    bytes[..page::PREAMBLE_SIZE]
        .copy_from_slice(&page::encode_preamble(page::PageFormat::NEWEST, &id));
    std::fs::write(aux_file(&other, "index"), &bytes).unwrap();
    let err = other_store.open_aux_database("index").unwrap_err();
    assert!(
        matches!(&err, Error::Corrupted(m) if m.contains("header")),
        "{err}"
    );
    // The wrong key for the store itself fails before any aux file is touched.
    drop(other_store);
    let wrong = dir.path().join("wrong.key");
    create_key_file(&wrong).unwrap();
    let err = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(wrong))
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::WrongKey), "{err}");
}

#[test]
fn delete_aux_database_refuses_an_open_one() {
    let (dir, store) = super::tests::temp_store(ReadAudit::Durable);
    assert!(!store.delete_aux_database("index").unwrap());
    let db = store.open_aux_database("index").unwrap();
    fill(&db, 0..10);
    let err = store.delete_aux_database("index").unwrap_err();
    assert!(err.to_string().contains("is open"), "{err}");
    drop(db);
    assert!(store.delete_aux_database("index").unwrap());
    assert!(!aux_file(&dir, "index").exists());
    let db = store.open_aux_database("index").unwrap();
    assert!(read_all(&db).is_err(), "a rebuilt database starts empty");
}

#[test]
fn check_authenticates_aux_files() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::Durable);
        store
            .update(&ctx(), "Patient", "p1", patient("D"), None)
            .unwrap();
        fill(&store.open_aux_database("index").unwrap(), 0..300);
        fill(&store.open_aux_database("second").unwrap(), 0..5);
    }
    // Not aux files: wrong names, other extensions.
    std::fs::write(dir.path().join("db").join("Notes.redb"), b"x").unwrap();
    std::fs::write(dir.path().join("db").join("index.bak"), b"x").unwrap();
    let report = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap();
    let names: Vec<&str> = report.aux_files.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["index", "second"]);
    assert!(
        report
            .aux_files
            .iter()
            .all(|a| a.pages.is_ok() && a.redb_integrity_ok)
    );

    // A flipped byte in a live page of the aux file fails the check, naming the file.
    let aux = aux_file(&dir, "index");
    let good = std::fs::read(&aux).unwrap();
    let mut failed = false;
    for pg in (1..=image::page_count(&good)).rev() {
        if !image::is_written(&good, pg) {
            continue;
        }
        let mut bad = good.clone();
        bad[image::block_byte(&good, pg, 100)] ^= 0x40;
        std::fs::write(&aux, &bad).unwrap();
        match Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())) {
            Ok(report) => {
                assert_eq!(report.aux_files[0].pages.failed_pages, vec![pg]);
                assert!(report.warnings.iter().any(|w| w.contains("index.redb")));
            }
            Err(err) => {
                assert!(
                    matches!(&err, Error::Corrupted(m) if m.contains("index.redb")),
                    "{err}"
                );
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "a damaged live page of an aux file must fail the check"
    );
    // A truncated aux file is a structural fault.
    std::fs::write(&aux, &good[..good.len() - 7]).unwrap();
    let err = Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupted(m) if m.contains("index.redb")),
        "{err}"
    );
}

#[test]
fn copy_does_not_copy_aux_files() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    store
        .update(&ctx(), "Patient", "p1", patient("E"), None)
        .unwrap();
    fill(&store.open_aux_database("index").unwrap(), 0..5);
    let key = dir.path().join("copy.key");
    create_key_file(&key).unwrap();
    let dest = dir.path().join("copy");
    store
        .copy_to(
            &ctx(),
            &dest,
            KeySource::KeyFile(key),
            KdfParams::fast_insecure(),
        )
        .unwrap();
    assert!(!dest.join("index.redb").exists());
}

#[test]
fn change_feed_returns_every_change_once_in_order() {
    let (_dir, store) = super::tests::temp_store(ReadAudit::Durable);
    let c = ctx();
    assert_eq!(store.last_change_seq().unwrap(), 0);
    let empty = store.changes_after(&c, None, 10).unwrap();
    assert!(empty.changes.is_empty() && !empty.more);
    assert_eq!(empty.next_after, 0);

    for i in 0..7 {
        store
            .update(
                &c,
                "Patient",
                &format!("f{i}"),
                patient(&format!("F{i}")),
                None,
            )
            .unwrap();
    }
    store
        .update(&c, "Patient", "f1", patient("F1-second"), None)
        .unwrap();
    store.delete(&c, "Patient", "f2", None).unwrap();
    // A delete of a deleted resource writes no version, hence no change.
    store.delete(&c, "Patient", "f2", None).unwrap();
    store
        .write(&c, |txn| {
            txn.update(
                "Observation",
                "o1",
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}),
                None,
            )?;
            txn.update("Patient", "f3", patient("F3-second"), None)
        })
        .unwrap();
    assert_eq!(store.last_change_seq().unwrap(), 11);

    // Paged in threes from a fresh index: every seq once, increasing, nothing skipped.
    let before = store.audit_size().unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    let mut calls = 0;
    loop {
        let page = store.changes_after(&c, after, 3).unwrap();
        calls += 1;
        assert!(page.changes.len() <= 3);
        seen.extend(page.changes.iter().cloned());
        after = Some(page.next_after);
        if !page.more {
            break;
        }
    }
    assert_eq!(calls, 4);
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    assert_eq!(after, Some(11));
    assert_eq!(seen[7].1.id, "f1");
    assert_eq!(seen[7].1.version, 2);
    assert_eq!(
        seen[7].1.to_json().unwrap()["name"][0]["family"],
        "F1-second"
    );
    let (_, tombstone) = &seen[8];
    assert_eq!((tombstone.id.as_str(), tombstone.version), ("f2", 2));
    assert_eq!(tombstone.kind, VersionKind::Deleted);
    assert!(tombstone.json_bytes().is_empty());
    assert_eq!(seen[9].1.resource_type, "Observation");
    // Each version is exactly what history returns for it.
    for (_, stored) in &seen {
        let v = store
            .history_instance(
                &c,
                &stored.resource_type,
                &stored.id,
                &HistoryQuery::default(),
            )
            .unwrap()
            .entries
            .into_iter()
            .find(|e| e.version == stored.version)
            .unwrap();
        assert_eq!(&v, stored);
    }

    // One audit leaf per call, `index-sync`, with a query hash and no resource named.
    let after_calls = store.audit_size().unwrap();
    let leaves: Vec<_> = (before..after_calls)
        .map(|seq| store.audit_leaf(seq).unwrap())
        .map(|leaf| leaf.record)
        .filter(|record| record.action == AuditAction::Other("index-sync".into()))
        .collect();
    assert_eq!(leaves.len(), calls);
    for leaf in &leaves {
        assert_eq!(leaf.outcome, AuditOutcome::Success);
        assert!(leaf.resource_type.is_none() && leaf.id.is_none());
        assert!(leaf.query_hash.is_some() && leaf.content_hash.is_none());
    }

    // Caught up: nothing after the last seq; a new write shows up after it.
    let page = store.changes_after(&c, Some(11), 100).unwrap();
    assert!(page.changes.is_empty() && !page.more && page.next_after == 11);
    store
        .update(&c, "Patient", "f9", patient("F9"), None)
        .unwrap();
    let page = store.changes_after(&c, Some(11), 100).unwrap();
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.changes[0].0, 12);
    assert_eq!(page.next_after, 12);
    // Extremes are not errors.
    assert!(
        store
            .changes_after(&c, Some(u64::MAX), 5)
            .unwrap()
            .changes
            .is_empty()
    );
    let zero = store.changes_after(&c, Some(0), 0).unwrap();
    assert!(zero.changes.is_empty() && zero.more && zero.next_after == 0);
}

#[test]
fn change_feed_survives_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let store = open_store(dir.path(), ReadAudit::default());
        for i in 0..5 {
            store
                .update(&ctx(), "Patient", &format!("r{i}"), patient("R"), None)
                .unwrap();
        }
    }
    let store = open_store(dir.path(), ReadAudit::default());
    assert_eq!(store.last_change_seq().unwrap(), 5);
    store
        .update(&ctx(), "Patient", "r5", patient("R"), None)
        .unwrap();
    let page = store.changes_after(&ctx(), Some(4), 10).unwrap();
    let seqs: Vec<u64> = page.changes.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [5, 6]);
    store.verify_audit().unwrap();
}

#[test]
fn compaction_shrinks_files_and_keeps_everything() {
    let dir = TempDir::new().unwrap();
    let mut store = open_store(dir.path(), ReadAudit::Durable);
    // Free pages in the store: bodies written, then overwritten by small ones.
    let mut ids = Vec::new();
    for round in 0..3 {
        let family = format!("{}-{round}", "x".repeat(if round < 2 { 3_000 } else { 1 }));
        store
            .write(&ctx(), |txn| {
                for i in 0..200 {
                    let mut p = patient(&family);
                    p["id"] = json!(format!("p{i}"));
                    txn.update("Patient", &format!("p{i}"), p, None)?;
                }
                Ok(())
            })
            .unwrap();
        ids = (0..200).map(|i| format!("p{i}")).collect();
    }
    // Free pages in an auxiliary file: most of its data removed again.
    {
        let db = store.open_aux_database("index").unwrap();
        fill(&db, 0..2_000);
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(T).unwrap();
            for i in 100..2_000u64 {
                t.remove(i).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let leaves = store.audit_size().unwrap();

    let report = store.compact(&ctx()).unwrap();
    let (before, after) = report.totals();
    assert!(after < before, "{report:?}");
    let index = report.files.iter().find(|f| f.0 == "index.redb").unwrap();
    assert!(index.2 < index.1 / 2, "{report:?}");

    // Everything is still there, readable and audited; the compaction has its own leaf.
    for id in &ids {
        let stored = store.read(&ctx(), "Patient", id).unwrap();
        assert_eq!(stored.version, 3);
    }
    let db = store.open_aux_database("index").unwrap();
    assert_eq!(read_all(&db).unwrap(), expected(0..100));
    drop(db);
    store.flush_audit().unwrap();
    let leaf = store.audit_leaf(leaves).unwrap();
    assert_eq!(
        leaf.record.action,
        crate::audit::AuditAction::Other(COMPACT_ACTION.into())
    );
    store.verify_audit().unwrap();
    // Writes go on after compaction, and the whole directory checks out.
    store
        .write(&ctx(), |txn| {
            txn.update("Patient", "p0", patient("after"), None)
        })
        .unwrap();
    drop(store);
    let key = key_for(dir.path());
    Store::check(&ctx(), dir.path().join("db"), key).unwrap();
}

#[test]
fn compaction_packs_half_empty_leaves_and_keeps_every_version_and_leaf() {
    let dir = TempDir::new().unwrap();
    let mut store = open_store(dir.path(), ReadAudit::Durable);
    // Ids inserted out of key order split leaves in the middle; every split leaves two
    // half-full leaves, which only a rewrite packs again.
    let ids: Vec<String> = (0..1_500u32)
        .map(|i| format!("id-{:08}", i.wrapping_mul(2_654_435_761) % 1_000_000))
        .collect();
    for chunk in ids.chunks(100) {
        store
            .write(&ctx(), |txn| {
                for id in chunk {
                    txn.update("Patient", id, patient(&"y".repeat(300)), None)?;
                }
                Ok(())
            })
            .unwrap();
        // Into `versions` at once, out of key order, as before pending versions existed.
        super::tests::merge_now(&store);
    }
    let versions_before = |tables: &[TableSpace]| {
        tables
            .iter()
            .find(|t| t.file == DATABASE_FILE && t.table == "versions")
            .cloned()
            .unwrap()
    };
    let before = versions_before(&store.space_report(&ctx()).unwrap());
    assert_eq!(before.entries, 1_500);
    assert!(
        before.fragmented_bytes * 5 > before.total_bytes(),
        "the workload should leave slack: {before:?}"
    );
    let leaves = store.audit_size().unwrap();

    let report = store.compact(&ctx()).unwrap();
    // Nothing is committed after the rewrite (the compaction's leaf went first), so the file
    // is as small as reported.
    let store_file = dir.path().join("db").join(DATABASE_FILE);
    assert_eq!(
        std::fs::metadata(&store_file).unwrap().len(),
        report.files[0].2
    );
    let versions = report
        .packed_tables
        .iter()
        .find(|(name, _, _)| name == "versions")
        .unwrap_or_else(|| panic!("versions not packed: {report:?}"));
    assert!(versions.2 < versions.1 * 4 / 5, "{report:?}");
    let after = versions_before(&store.space_report(&ctx()).unwrap());
    assert_eq!(after.entries, 1_500);
    assert!(
        after.fragmented_bytes * 8 < after.total_bytes(),
        "{after:?}"
    );

    for id in &ids {
        assert_eq!(store.read(&ctx(), "Patient", id).unwrap().version, 1);
    }
    // Every leaf is still there (plus the space reports', the compaction's and the reads'),
    // and the tree over them matches the signed heads made before the rewrite.
    store.flush_audit().unwrap();
    assert!(store.audit_size().unwrap() > leaves);
    store.verify_audit().unwrap();
    store
        .write(&ctx(), |txn| {
            txn.update("Patient", &ids[0], patient("after"), None)
        })
        .unwrap();
    drop(store);
    Store::check(&ctx(), dir.path().join("db"), key_for(dir.path())).unwrap();
}

#[test]
fn space_report_covers_the_store_and_auxiliary_files_and_is_audited() {
    let dir = TempDir::new().unwrap();
    let store = open_store(dir.path(), ReadAudit::Durable);
    store.create(&ctx(), patient("Space")).unwrap();
    fill(&store.open_aux_database("index").unwrap(), 0..10);
    let tables = store.space_report(&ctx()).unwrap();
    let find = |file: &str, table: &str| {
        tables
            .iter()
            .find(|t| t.file == file && t.table == table)
            .unwrap_or_else(|| panic!("{file} {table} missing: {tables:?}"))
    };
    assert_eq!(find(DATABASE_FILE, "versions").entries, 1);
    assert!(find(DATABASE_FILE, "audit_leaf_chunks").entries >= 1);
    assert_eq!(find("index.redb", "t").entries, 10);
    assert!(find("index.redb", "t").stored_bytes > 0);
    let last = store.audit_size().unwrap() - 1;
    assert_eq!(
        store.audit_leaf(last).unwrap().record.action,
        crate::audit::AuditAction::Other(SPACE_ACTION.into())
    );
}

#[test]
fn compaction_drops_the_merkle_levels_that_are_recomputed() {
    let dir = TempDir::new().unwrap();
    let mut store = open_store(dir.path(), ReadAudit::Durable);
    for i in 0..40 {
        store.create(&ctx(), patient(&format!("N{i}"))).unwrap();
    }
    // A log written before only levels 4 and up were stored.
    let txn = store.inner.db.begin_write().unwrap();
    let lower = crate::audit::log::store_lower_levels(&txn).unwrap();
    txn.commit().unwrap();
    assert!(lower > 0);
    let lower_nodes = |store: &Store| {
        let read = store.inner.db.begin_read().unwrap();
        let table = read.open_table(crate::audit::log::NODES).unwrap();
        let first_stored = crate::audit::log::FIRST_STORED_LEVEL;
        table
            .range((1u8, 0u64)..(first_stored, 0u64))
            .unwrap()
            .count() as u64
    };
    assert_eq!(lower_nodes(&store), lower);
    store.verify_audit().unwrap();
    store.compact(&ctx()).unwrap();
    assert_eq!(lower_nodes(&store), 0);
    store.verify_audit().unwrap();
    let head = store.audit_head().unwrap();
    store
        .prove_inclusion(3, head.size)
        .unwrap()
        .verify(&head)
        .unwrap();
}
