//! Fuzz target: model-based test of the store (in the style of redb's own fuzzer). An
//! `Arbitrary` list of operations (upsert and delete of ids 0..8 with optional expected
//! versions, read, vread, history, explicit transactions with commit or abort, clean reopen,
//! and crash points) runs against `Store` and against a `BTreeMap` model in lockstep; every
//! answer, value or error, is compared with the model.
//!
//! The store can be opened only on a real directory through the public API (the fault-injecting
//! `StoreBuilder::open_on_backend` is `#[cfg(test)]`), so failures are injected at the file
//! level: a crash point copies the database file and key header as they are between two
//! commits, opens the copy (which goes through redb's recovery of an unclean shutdown on the
//! encrypted backend), checks it against the committed model and its audit log against the
//! writes, and may carry on with the copy as the live database.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use fhirkeep_engine::Error;
use fhirkeep_engine::audit::{AuditAction, AuditOutcome};
use fhirkeep_engine::crypto::{KEY_HEADER_FILE, KeySource};
use fhirkeep_engine::store::{
    AccessContext, DATABASE_FILE, HistoryQuery, ReadAudit, Store, VersionKind, WriteTxn,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const IDS: u8 = 8;
const MAX_OPS: usize = 64;

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Op {
    Upsert { id: u8, expected: Option<u8>, payload: u8 },
    Delete { id: u8, expected: Option<u8> },
    Read { id: u8 },
    VRead { id: u8, version: u8 },
    History { id: u8 },
    Begin,
    Commit,
    Abort,
    /// Close the store cleanly and open it again.
    Reopen,
    /// Replace the audit signing key (outside a write transaction: it needs the writer).
    RotateAuditKey,
    /// Copy the files as they are now, open the copy and compare it with the committed model;
    /// with `switch`, the copy becomes the live database (a crash and restart).
    Crash { switch: bool },
}

/// One version in the model: `Some(payload)` or a tombstone.
type Versions = Vec<Option<u8>>;
type Model = BTreeMap<u8, Versions>;

fn ctx() -> AccessContext {
    AccessContext::new("fuzz", "engine_model", "local", "r")
}

fn id_str(id: u8) -> String {
    format!("m{}", id % IDS)
}

fn body(payload: u8) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": format!("v{payload}")}]})
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fhirkeep-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir")
}

fn open(dir: &Path, key: &Path) -> Store {
    Store::builder(dir)
        .key(KeySource::KeyFile(key.to_path_buf()))
        .cache_size(4 << 20)
        // Reads must not need a write transaction while a WriteTxn is open.
        .read_audit(ReadAudit::GroupCommit {
            max_delay: std::time::Duration::from_secs(3600),
        })
        // Pending versions (ids m0..m7 land among each other) merge every few writes, so
        // that merges run between, and fail among, the other operations.
        .merge_threshold(3)
        .open_or_create()
        .expect("open store")
}

fn expected_kind(versions: &[Option<u8>], v: usize) -> VersionKind {
    match versions[v - 1] {
        None => VersionKind::Deleted,
        Some(_) if v == 1 || versions[v - 2].is_none() => VersionKind::CreatedWithId,
        Some(_) => VersionKind::Updated,
    }
}

/// Checks one stored version against the model.
fn check_version(found: &fhirkeep_engine::store::StoredResource, id: u8, versions: &[Option<u8>]) {
    let v = usize::try_from(found.version).expect("version fits");
    assert!(v >= 1 && v <= versions.len(), "version {v} of {} not in model", id_str(id));
    assert_eq!(found.id, id_str(id));
    assert_eq!(found.kind, expected_kind(versions, v), "kind of {}/{v}", id_str(id));
    match versions[v - 1] {
        None => assert!(found.is_deleted() && found.json_bytes().is_empty()),
        Some(payload) => {
            let json = found.to_json().expect("stored JSON");
            assert_eq!(json["name"][0]["family"], json!(format!("v{payload}")));
            assert_eq!(json["id"], json!(id_str(id)));
            assert_eq!(json["meta"]["versionId"], json!(v.to_string()));
            assert_eq!(json["meta"]["lastUpdated"], json!(found.last_updated_text()));
        }
    }
}

fn check_read(store: &Store, model: &Model, id: u8) {
    let got = store.read(&ctx(), "Patient", &id_str(id));
    match (model.get(&(id % IDS)), got) {
        (None, Err(Error::NotFound)) => {}
        (Some(vs), Err(Error::Gone { version })) => {
            assert_eq!(vs.last(), Some(&None), "Gone but model has a body");
            assert_eq!(version as usize, vs.len());
        }
        (Some(vs), Ok(found)) => {
            assert!(vs.last().is_some_and(Option::is_some), "read a deleted resource");
            assert_eq!(found.version as usize, vs.len(), "read is not the newest version");
            check_version(&found, id % IDS, vs);
        }
        (m, got) => panic!("read {}: model {m:?}, store {got:?}", id_str(id)),
    }
}

fn check_vread(store: &Store, model: &Model, id: u8, version: u8) {
    let v = u64::from(version % 10);
    let got = store.vread(&ctx(), "Patient", &id_str(id), v);
    let want = model
        .get(&(id % IDS))
        .and_then(|vs| (v >= 1).then(|| vs.get(v as usize - 1)).flatten().map(|x| (vs, *x)));
    match (want, got) {
        (None, Err(Error::NotFound)) => {}
        (Some((_, None)), Err(Error::Gone { version })) => assert_eq!(version, v),
        (Some((vs, Some(_))), Ok(found)) => {
            assert_eq!(found.version, v);
            check_version(&found, id % IDS, vs);
        }
        (m, got) => panic!("vread {}/{v}: model {m:?}, store {got:?}", id_str(id)),
    }
}

fn check_history(store: &Store, model: &Model, id: u8) {
    let got = store.history_instance(&ctx(), "Patient", &id_str(id), &HistoryQuery::default());
    match (model.get(&(id % IDS)), got) {
        (None, Err(Error::NotFound)) => {}
        (Some(vs), Ok(page)) => {
            assert_eq!(page.entries.len(), vs.len(), "history length of {}", id_str(id));
            assert!(page.next.is_none());
            for (k, entry) in page.entries.iter().enumerate() {
                assert_eq!(entry.version as usize, vs.len() - k, "history is newest first");
                check_version(entry, id % IDS, vs);
            }
            for w in page.entries.windows(2) {
                assert!(w[0].last_updated > w[1].last_updated, "clock not increasing");
            }
            page.to_bundle().expect("history bundle");
        }
        (m, got) => panic!("history {}: model {m:?}, store {got:?}", id_str(id)),
    }
}

/// Applies a write to the store (in `txn`) and to `model`, comparing the outcomes.
fn write_op(txn: &mut WriteTxn<'_>, model: &mut Model, op: Op) {
    match op {
        Op::Upsert { id, expected, payload } => {
            let id = id % IDS;
            let current = model.get(&id).map_or(0, Vec::len) as u64;
            let expected = expected.map(|e| u64::from(e % 6));
            let got = txn.update("Patient", &id_str(id), body(payload), expected);
            match (expected, got) {
                (Some(e), Err(Error::VersionConflict { expected: ge, current: gc })) if e != current => {
                    assert_eq!((ge, gc), (e, current));
                }
                (e, Ok(out)) if e.is_none_or(|e| e == current) => {
                    let was_live = model.get(&id).and_then(|v| v.last()).is_some_and(Option::is_some);
                    assert_eq!(out.created, !was_live, "created flag");
                    model.entry(id).or_default().push(Some(payload));
                    assert_eq!(out.resource.version, current + 1);
                    check_version(&out.resource, id, &model[&id]);
                }
                (e, got) => panic!("upsert {} expected {e:?} current {current}: {got:?}", id_str(id)),
            }
        }
        Op::Delete { id, expected } => {
            let id = id % IDS;
            let expected = expected.map(|e| u64::from(e % 6));
            let got = txn.delete("Patient", &id_str(id), expected);
            let Some(vs) = model.get_mut(&id) else {
                assert!(matches!(got, Err(Error::NotFound)), "delete of missing: {got:?}");
                return;
            };
            let current = vs.len() as u64;
            match (expected, got) {
                (Some(e), Err(Error::VersionConflict { expected: ge, current: gc })) if e != current => {
                    assert_eq!((ge, gc), (e, current));
                }
                (e, Ok(out)) if e.is_none_or(|e| e == current) => {
                    if vs.last() == Some(&None) {
                        assert!(out.already_deleted);
                        assert_eq!(out.version, current);
                    } else {
                        assert!(!out.already_deleted);
                        vs.push(None);
                        assert_eq!(out.version, current + 1);
                    }
                }
                (e, got) => panic!("delete {} expected {e:?} current {current}: {got:?}", id_str(id)),
            }
        }
        _ => unreachable!("not a write"),
    }
}

fn check_all(store: &Store, model: &Model) {
    for id in 0..IDS {
        check_read(store, model, id);
        check_history(store, model, id);
    }
}

/// Successful write leaves in the audit log must equal the versions written.
fn check_audit(store: &Store, model: &Model) {
    let report = store.verify_audit().expect("audit log verifies");
    let _ = report;
    let size = store.audit_size().expect("audit size");
    let mut writes = 0usize;
    for seq in 0..size {
        let leaf = store.audit_leaf(seq).expect("audit leaf");
        assert_eq!(leaf.seq, seq);
        let r = &leaf.record;
        if r.outcome == AuditOutcome::Success
            && matches!(r.action, AuditAction::Create | AuditAction::Update | AuditAction::Delete)
        {
            writes += 1;
        }
    }
    let versions: usize = model.values().map(Vec::len).sum();
    assert_eq!(writes, versions, "audit write leaves vs versions written");
}

fn copy_db(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for name in [DATABASE_FILE, KEY_HEADER_FILE] {
        std::fs::copy(from.join(name), to.join(name)).expect("copy");
    }
}

struct Run {
    root: tempfile::TempDir,
    key: PathBuf,
    dir: PathBuf,
    copies: u32,
    committed: Model,
}

/// Runs ops on one open store until one asks for the store to be replaced; returns how many
/// ops were consumed and the directory to continue in.
fn epoch(run: &mut Run, ops: &[Op]) -> (usize, Option<PathBuf>) {
    let store = open(&run.dir, &run.key);
    check_all(&store, &run.committed);
    let mut txn: Option<(WriteTxn<'_>, Model)> = None;
    for (i, &op) in ops.iter().enumerate() {
        match op {
            Op::Upsert { .. } | Op::Delete { .. } => match txn.as_mut() {
                Some((t, working)) => write_op(t, working, op),
                None => {
                    let mut t = store.begin_write(&ctx()).expect("begin");
                    let mut working = run.committed.clone();
                    write_op(&mut t, &mut working, op);
                    t.commit().expect("commit");
                    run.committed = working;
                }
            },
            Op::RotateAuditKey => {
                if txn.is_none() {
                    let before = store.audit_keys().expect("audit keys");
                    let head = store.rotate_audit_key(&ctx()).expect("rotate the audit key");
                    let after = store.audit_keys().expect("audit keys");
                    assert_eq!(after.len(), before.len() + 1);
                    assert_eq!(Some(head.public_key), before.last().map(|k| k.public_key));
                    assert_eq!(after.last().map(|k| k.first_size), Some(head.size + 1));
                }
            }
            Op::Read { id } => check_read(&store, &run.committed, id),
            Op::VRead { id, version } => check_vread(&store, &run.committed, id, version),
            Op::History { id } => check_history(&store, &run.committed, id),
            Op::Begin => {
                if txn.is_none() {
                    txn = Some((store.begin_write(&ctx()).expect("begin"), run.committed.clone()));
                }
            }
            Op::Commit => {
                if let Some((t, working)) = txn.take() {
                    t.commit().expect("commit");
                    run.committed = working;
                    check_all(&store, &run.committed);
                }
            }
            Op::Abort => {
                if let Some((t, _)) = txn.take() {
                    t.abort().expect("abort");
                    check_all(&store, &run.committed);
                }
            }
            Op::Reopen | Op::Crash { .. } => {
                if let Some((t, _)) = txn.take() {
                    // Dropping a WriteTxn aborts it.
                    drop(t);
                }
                match op {
                    Op::Reopen => {
                        drop(store);
                        return (i + 1, None);
                    }
                    Op::Crash { switch } => {
                        run.copies += 1;
                        let copy = run.root.path().join(format!("crash{}", run.copies));
                        copy_db(&run.dir, &copy);
                        if switch {
                            // The live store is dropped after the copy was taken: the copy
                            // is an unclean shutdown image.
                            drop(store);
                            return (i + 1, Some(copy));
                        }
                        let other = open(&copy, &run.key);
                        check_all(&other, &run.committed);
                        check_audit(&other, &run.committed);
                        drop(other);
                        let _ = std::fs::remove_dir_all(&copy);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    drop(txn);
    check_all(&store, &run.committed);
    check_audit(&store, &run.committed);
    (ops.len(), None)
}

fuzz_target!(|data: &[u8]| {
    let Ok(ops) = Vec::<Op>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let ops = &ops[..ops.len().min(MAX_OPS)];
    let root = tmpdir();
    let key = root.path().join("key");
    fhirkeep_engine::crypto::create_key_file(&key).expect("key file");
    let dir = root.path().join("db");
    let mut run = Run {
        root,
        key,
        dir,
        copies: 0,
        committed: Model::new(),
    };
    let mut at = 0;
    while at < ops.len() {
        let (used, next_dir) = epoch(&mut run, &ops[at..]);
        at += used;
        if let Some(d) = next_dir {
            run.dir = d;
        }
    }
    if ops.is_empty() {
        epoch(&mut run, &[]);
    }
});
