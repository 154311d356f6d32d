//! Crash and fault-injection tests of the whole engine over a simulated disk.
//!
//! The real store runs on `EncryptedBackend<CrashBackend>`. A workload is cut off after every
//! possible number of disk operations (writes, `set_len`, syncs); the disk image a reboot
//! would find is then built four ways (unsynced writes lost, all kept, the last one torn,
//! a random torn subset) and reopened. After each reopen: every acknowledged commit is
//! there, the one in flight is either wholly there or wholly absent, every stored version
//! has exactly one audit leaf, and the audit log verifies.
//!
//! The model-based test drives random operations against the engine and an in-memory
//! model in lockstep, under an I/O-failure countdown, and compares every answer.
//!
//! Both run with merges of pending versions (`pending.rs`) every couple of versions, so that
//! the cut-offs and failures land inside merges as well as inside writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;
use tempfile::TempDir;

use super::*;
use crate::audit::AuditOutcome;
use crate::crypto::crash_backend::{CrashBackend, TestRng, TornMode};
use crate::crypto::{KeySource, Keyring, create_key_file};

/// `(type, id) -> (version, content hash)` of the current version; tombstones included.
type Visible = BTreeMap<(String, String), (u64, [u8; 32], bool)>;

struct Rig {
    _dir: TempDir,
    key: KeySource,
    keys_dir: std::path::PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = TempDir::new().unwrap();
        let key_path = dir.path().join("key");
        create_key_file(&key_path).unwrap();
        let key = KeySource::KeyFile(key_path);
        let keys_dir = dir.path().join("db");
        Keyring::create(&keys_dir, &key, KdfParams::fast_insecure()).unwrap();
        Rig {
            _dir: dir,
            key,
            keys_dir,
        }
    }

    fn open(&self, disk: &CrashBackend) -> Result<Store> {
        self.open_with(
            disk,
            ReadAudit::GroupCommit {
                max_delay: Duration::from_secs(3600),
            },
        )
    }

    fn open_with(&self, disk: &CrashBackend, read_audit: ReadAudit) -> Result<Store> {
        let keyring = Keyring::open(&self.keys_dir, &self.key)?;
        Store::builder(&self.keys_dir)
            .read_audit(read_audit)
            .cache_size(1 << 20)
            // Merges of pending versions after most commits, so that crash points and I/O
            // failures fall inside them too.
            .merge_threshold(2)
            .open_on_backend(disk.clone(), keyring)
    }
}

fn ctx() -> AccessContext {
    AccessContext::new("crash", "crash-test", "local", "r")
}

/// What the store holds, read through its public API.
fn visible(store: &Store) -> Visible {
    let page = store
        .history_system(&ctx(), &HistoryQuery::default())
        .unwrap();
    let mut state = Visible::new();
    for entry in page.entries.iter().rev() {
        state.insert(
            (entry.resource_type.clone(), entry.id.clone()),
            (entry.version, entry.content_hash, entry.is_deleted()),
        );
    }
    state
}

/// Every stored version has exactly one successful write leaf, and the log verifies.
fn check_audit(store: &Store) {
    store.verify_audit().unwrap();
    let versions = store
        .history_system(&ctx(), &HistoryQuery::default())
        .unwrap()
        .entries
        .len();
    let size = store.audit_size().unwrap();
    let write_leaves = (0..size)
        .map(|seq| store.audit_leaf(seq).unwrap().record)
        .filter(|r| {
            r.outcome == AuditOutcome::Success
                && matches!(
                    r.action,
                    AuditAction::Create | AuditAction::Update | AuditAction::Delete
                )
        })
        .count();
    assert_eq!(write_leaves, versions, "one audit leaf per committed write");
}

/// A randomized workload of write transactions and reads; returns the visible state after
/// each acknowledged commit, plus the state the in-flight commit would have produced.
fn run_workload(store: &Store, seed: u64, commits: usize) -> (Vec<Visible>, Option<Visible>) {
    let mut rng = TestRng(seed);
    let mut acknowledged = vec![Visible::new()];
    for round in 0..commits {
        let mut next = acknowledged.last().cloned().unwrap_or_default();
        // Half the commits are deferred and then synced by `wait_durable`, the group-commit
        // path of transaction Bundles; either way the commit is acknowledged only after.
        let deferred = rng.below(2) == 0;
        let outcome = store.begin_write(&ctx()).and_then(|mut txn| {
            for _ in 0..1 + rng.below(3) {
                let id = format!("r{}", rng.below(6));
                let big = "x".repeat(rng.below(3) as usize * 3000);
                let key = ("Observation".to_string(), id.clone());
                let deleted_or_absent = next.get(&key).is_none_or(|v| v.2);
                let written = if rng.below(4) == 0 && !deleted_or_absent {
                    let outcome = txn.delete("Observation", &id, None)?;
                    (outcome.version, *blake3::hash(b"").as_bytes(), true)
                } else {
                    let body = json!({"resourceType": "Observation", "status": "final",
                        "code": {"text": format!("round {round}")}, "note": [{"text": big}]});
                    let stored = txn.update("Observation", &id, body, None)?.resource;
                    (stored.version, stored.content_hash, false)
                };
                next.insert(key, written);
            }
            if deferred {
                let ticket = txn.commit_deferred()?;
                store.wait_durable(ticket)
            } else {
                txn.commit()
            }
        });
        match outcome {
            Ok(()) => acknowledged.push(next),
            Err(_) => return (acknowledged, Some(next)),
        }
        if rng.below(2) == 0 {
            let _ = store.read(&ctx(), "Observation", "r1");
        }
    }
    (acknowledged, None)
}

fn crash_points_for_seed(seed: u64, commits: usize) -> usize {
    let rig = Rig::new();
    // Dry run: how many disk operations the workload issues after the store is open.
    let total_ops = {
        let disk = CrashBackend::new();
        let store = rig.open(&disk).unwrap();
        let before = disk.ops();
        let (acked, in_flight) = run_workload(&store, seed, commits);
        assert_eq!(acked.len(), commits + 1);
        assert!(in_flight.is_none());
        disk.ops() - before
    };
    assert!(total_ops > 20, "workload too small: {total_ops} ops");

    let mut points = 0;
    for countdown in 0..total_ops {
        let disk = CrashBackend::new();
        let store = rig.open(&disk).unwrap();
        disk.set_countdown(Some(countdown));
        let (acknowledged, in_flight) = run_workload(&store, seed, commits);
        drop(store);
        let modes = [
            TornMode::LoseUnsynced,
            TornMode::KeepAll,
            TornMode::TearLast {
                keep: 1 + (countdown as usize * 977) % 4000,
            },
            TornMode::Random {
                seed: seed ^ countdown,
            },
        ];
        for mode in modes {
            points += 1;
            let image = disk.crash_image(mode);
            let rebooted = CrashBackend::from_image(image);
            let store = rig
                .open(&rebooted)
                .unwrap_or_else(|e| panic!("reopen after crash at op {countdown} ({mode:?}): {e}"));
            let state = visible(&store);
            let last = acknowledged.last().unwrap();
            let matches_acked = &state == last;
            let matches_in_flight = in_flight.as_ref().is_some_and(|f| &state == f);
            assert!(
                matches_acked || matches_in_flight,
                "crash at op {countdown} ({mode:?}): state is neither the acknowledged one \
                 ({} commits) nor the one in flight",
                acknowledged.len() - 1
            );
            check_audit(&store);
            // The recovered database takes new writes.
            store
                .update(
                    &ctx(),
                    "Patient",
                    "after",
                    json!({"resourceType": "Patient"}),
                    None,
                )
                .unwrap();
        }
    }
    points
}

#[test]
fn crash_at_every_disk_operation_loses_no_acknowledged_commit() {
    let mut points = 0;
    for seed in [1, 2, 3] {
        points += crash_points_for_seed(seed, 9);
    }
    assert!(points >= 1000, "only {points} crash points exercised");
}

/// One model operation of the property test.
#[derive(Debug, Clone)]
enum Op {
    Upsert { id: u8, expected: Option<u64> },
    Delete { id: u8 },
    Read { id: u8 },
    VRead { id: u8, version: u64 },
    Commit,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..5, proptest::option::of(0u64..4)).prop_map(|(id, expected)| Op::Upsert { id, expected }),
        1 => (0u8..5).prop_map(|id| Op::Delete { id }),
        2 => (0u8..5).prop_map(|id| Op::Read { id }),
        1 => (0u8..5, 1u64..5).prop_map(|(id, version)| Op::VRead { id, version }),
        2 => Just(Op::Commit),
    ]
}

/// The model: per id, every version's deleted flag (index = version - 1).
type Model = BTreeMap<u8, Vec<bool>>;

fn model_current(model: &Model, id: u8) -> (u64, bool) {
    model.get(&id).map_or((0, false), |versions| {
        (versions.len() as u64, *versions.last().unwrap_or(&false))
    })
}

fn check_against_model(store: &Store, model: &Model) {
    for id in 0u8..5 {
        let name = format!("m{id}");
        let (current, deleted) = model_current(model, id);
        match store.read(&ctx(), "Patient", &name) {
            Ok(stored) => assert!(current > 0 && !deleted && stored.version == current),
            Err(Error::Gone { version }) => assert!(deleted && version == current),
            Err(Error::NotFound) => assert_eq!(current, 0),
            Err(other) => panic!("read m{id}: {other}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_under_io_failures(
        ops in proptest::collection::vec(op_strategy(), 1..40),
        fail_after in proptest::option::of(0u64..200),
    ) {
        let rig = Rig::new();
        let disk = CrashBackend::new();
        let mut committed = Model::new();
        // The transaction whose commit returned an I/O error: its outcome is unknown (redb can
        // fail after the commit is durable, e.g. trimming the file), so it may be there whole.
        let mut in_doubt: Option<Model> = None;
        let mut failed = false;
        {
            let store = rig.open(&disk).unwrap();
            disk.set_countdown(fail_after);
            let mut working = committed.clone();
            let mut txn = Some(store.begin_write(&ctx()));
            for op in &ops {
                let Some(Ok(open)) = txn.as_mut() else { failed = true; break };
                match *op {
                    Op::Upsert { id, expected } => {
                        let (current, _) = model_current(&working, id);
                        let body = json!({"resourceType": "Patient", "active": true});
                        match open.update("Patient", &format!("m{id}"), body, expected) {
                            Ok(outcome) => {
                                prop_assert!(expected.is_none_or(|e| e == current));
                                prop_assert_eq!(outcome.resource.version, current + 1);
                                working.entry(id).or_default().push(false);
                            }
                            Err(Error::VersionConflict { current: reported, .. }) => {
                                prop_assert_eq!(reported, current);
                                prop_assert!(expected.is_some_and(|e| e != current));
                            }
                            Err(_) => { failed = true; break; }
                        }
                    }
                    Op::Delete { id } => {
                        let (current, deleted) = model_current(&working, id);
                        match open.delete("Patient", &format!("m{id}"), None) {
                            Ok(outcome) => {
                                prop_assert!(current > 0);
                                prop_assert_eq!(outcome.already_deleted, deleted);
                                if !deleted {
                                    working.entry(id).or_default().push(true);
                                }
                            }
                            Err(Error::NotFound) => prop_assert_eq!(current, 0),
                            Err(_) => { failed = true; break; }
                        }
                    }
                    Op::Read { id } => {
                        let (current, deleted) = model_current(&working, id);
                        match open.read("Patient", &format!("m{id}")) {
                            Ok(stored) => prop_assert!(!deleted && stored.version == current),
                            Err(Error::Gone { version }) => prop_assert!(deleted && version == current),
                            Err(Error::NotFound) => prop_assert_eq!(current, 0),
                            Err(_) => { failed = true; break; }
                        }
                    }
                    Op::VRead { id, version } => {
                        // Committed data only: Store::vread sees no open transaction.
                        let exists = committed.get(&id).and_then(|v| v.get(version as usize - 1)).copied();
                        let open_txn = txn.take();
                        drop(open_txn);
                        match store.vread(&ctx(), "Patient", &format!("m{id}"), version) {
                            Ok(stored) => prop_assert_eq!((exists, stored.version), (Some(false), version)),
                            Err(Error::Gone { .. }) => prop_assert_eq!(exists, Some(true)),
                            Err(Error::NotFound) => prop_assert_eq!(exists, None),
                            Err(_) => { failed = true; break; }
                        }
                        working = committed.clone();
                        txn = Some(store.begin_write(&ctx()));
                    }
                    Op::Commit => {
                        let Some(Ok(open)) = txn.take() else { failed = true; break };
                        match open.commit() {
                            Ok(()) => committed = working.clone(),
                            Err(_) => { in_doubt = Some(working.clone()); failed = true; break; }
                        }
                        txn = Some(store.begin_write(&ctx()));
                    }
                }
            }
            drop(txn);
        }
        // Whatever happened, reopening from what reached the disk shows a committed state.
        let image = if failed { disk.crash_image(TornMode::LoseUnsynced) } else { disk.live_image() };
        let rebooted = CrashBackend::from_image(image);
        let store = rig.open(&rebooted).unwrap();
        if failed {
            // The transaction cut off by the failure is absent (at most the committed model),
            // or, if its commit failed, possibly there as a whole.
            let visible = visible(&store);
            let within = |model: &Model| {
                visible.iter().all(|((_, name), (version, _, _))| {
                    let id: u8 = name.trim_start_matches('m').parse().unwrap();
                    *version <= model_current(model, id).0
                })
            };
            prop_assert!(
                within(&committed) || in_doubt.as_ref().is_some_and(within),
                "visible {visible:?} is beyond the committed model {committed:?} and the one in doubt {in_doubt:?}"
            );
        } else {
            check_against_model(&store, &committed);
        }
        store.verify_audit().unwrap();
    }
}

/// Opens a store on `disk` whose read leaves are group-committed every `max_delay`, writes
/// one patient, then opens a write transaction, writes another, reads the first from another
/// thread (its leaf is buffered) and hands the open transaction to `then`.
fn read_during_a_write(
    rig: &Rig,
    disk: &CrashBackend,
    max_delay: Duration,
    then: impl FnOnce(&Store, WriteTxn<'_>),
) {
    let store = rig
        .open_with(disk, ReadAudit::GroupCommit { max_delay })
        .unwrap();
    let first = store
        .create(&ctx(), json!({"resourceType": "Patient"}))
        .unwrap();
    store.flush_audit().unwrap();
    let mut txn = store.begin_write(&ctx()).unwrap();
    txn.create(json!({"resourceType": "Patient"})).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| store.read(&ctx(), "Patient", &first.id).unwrap())
            .join()
            .unwrap()
    });
    then(&store, txn);
}

/// The number of read leaves a crash now would leave on `disk`.
fn read_leaves_after_a_crash(rig: &Rig, disk: &CrashBackend) -> usize {
    let image = disk.crash_image(TornMode::LoseUnsynced);
    let reopened = rig.open(&CrashBackend::from_image(image)).unwrap();
    (0..reopened.audit_size().unwrap())
        .filter(|&seq| reopened.audit_leaf(seq).unwrap().record.action == AuditAction::Read)
        .count()
}

/// A read during a long write leaves its audit leaf to that write's synced commit: the
/// flusher, woken meanwhile and waiting for the writer, finds the leaf taken and syncs
/// nothing more, and a crash right after the commit keeps the leaf.
#[test]
fn a_read_leaf_taken_by_a_synced_commit_costs_the_flusher_no_sync() {
    let rig = Rig::new();
    let disk = CrashBackend::new();
    let max_delay = Duration::from_millis(10);
    read_during_a_write(&rig, &disk, max_delay, |_, txn| {
        // The flusher wakes several times meanwhile and waits for the writer.
        std::thread::sleep(max_delay * 5);
        let syncs_before = disk.syncs();
        txn.commit().unwrap();
        let commit_syncs = disk.syncs() - syncs_before;
        assert!(commit_syncs > 0);
        std::thread::sleep(max_delay * 10);
        assert_eq!(
            disk.syncs() - syncs_before,
            commit_syncs,
            "the flusher synced a commit with nothing left to flush"
        );
        assert_eq!(
            read_leaves_after_a_crash(&rig, &disk),
            1,
            "the read's leaf is on disk"
        );
    });
}

/// A deferred commit that takes buffered read leaves leaves them owed a sync: the flusher
/// makes them durable within a few rounds, with nobody waiting on a ticket.
#[test]
fn read_leaves_taken_by_a_deferred_commit_are_synced_by_the_flusher() {
    let rig = Rig::new();
    let disk = CrashBackend::new();
    let max_delay = Duration::from_millis(10);
    read_during_a_write(&rig, &disk, max_delay, |_, txn| {
        std::thread::sleep(max_delay * 3);
        let _ticket = txn.commit_deferred().unwrap();
        std::thread::sleep(max_delay * 10);
        assert_eq!(
            read_leaves_after_a_crash(&rig, &disk),
            1,
            "the read's leaf is on disk"
        );
    });
}

#[test]
fn store_level_canary_scan_finds_no_plaintext() {
    let dir = TempDir::new().unwrap();
    let canary = "CANARY-4d1e-Zebra-Quokka";
    {
        let store = super::tests::open_store(dir.path(), ReadAudit::default());
        for i in 0..200 {
            store
                .update(
                    &ctx(),
                    "Patient",
                    &format!("canary{i}"),
                    json!({"resourceType": "Patient", "name": [{"family": canary, "given": [canary]}],
                           "text": {"status": "generated", "div": format!("<div>{canary} {i}</div>")}}),
                    None,
                )
                .unwrap();
            let _ = store
                .read(&ctx(), "Patient", &format!("canary{i}"))
                .unwrap();
        }
        store.delete(&ctx(), "Patient", "canary0", None).unwrap();
    }
    let needles = canary_forms(canary);
    let mut scanned = 0;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        scanned += bytes.len();
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} holds the canary in plaintext",
                entry.display()
            );
        }
    }
    assert!(scanned > 100_000, "scanned only {scanned} bytes");
}

/// The canary as UTF-8, UTF-16 (both byte orders) and base64 at each of the 3 alignments.
fn canary_forms(canary: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut forms = vec![canary.as_bytes().to_vec()];
    forms.push(canary.encode_utf16().flat_map(u16::to_le_bytes).collect());
    forms.push(
        canary
            .encode_utf16()
            .flat_map(|u| [(u >> 8) as u8, u as u8])
            .collect(),
    );
    for shift in 0..3 {
        let padded = format!("{}{canary}", "x".repeat(shift));
        let encoded = base64::engine::general_purpose::STANDARD.encode(padded);
        // Skip the characters that depend on the padding; keep a long stable middle.
        let start = (shift * 4).div_ceil(3) + 1;
        forms.push(encoded.as_bytes()[start..encoded.len() - 4].to_vec());
    }
    forms
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<Arc<Keyring>>();
}
