//! Fuzz target: the store against a `BTreeMap` model under an I/O-failure countdown, as redb's
//! own fuzzer does. The engine runs on `EncryptedBackend` over an in-memory disk that fails
//! every write, `set_len` and sync after a fuzzer-chosen number of them. Until the failure,
//! every answer must match the model; the failure must surface as an error (never a panic);
//! and reopening the disk as it was left must show exactly a committed state of the model,
//! with an audit log that verifies.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use fhirkeep_engine::Error;
use fhirkeep_engine::crypto::{KdfParams, KeySource, Keyring, create_key_file};
use fhirkeep_engine::store::{AccessContext, HistoryQuery, ReadAudit, Store};
use libfuzzer_sys::fuzz_target;
use redb::StorageBackend;
use serde_json::json;

#[derive(Debug, Arbitrary)]
struct Input {
    countdown: u16,
    ops: Vec<Op>,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Op {
    Upsert { id: u8, expected: Option<u8> },
    Delete { id: u8 },
    Read { id: u8 },
    Commit,
}

/// An in-memory disk whose mutating operations fail once the countdown reaches zero.
#[derive(Debug, Clone)]
struct CountdownDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    countdown: Arc<AtomicU64>,
}

impl CountdownDisk {
    fn tick(&self) -> io::Result<()> {
        let left = self.countdown.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("injected I/O failure"));
        }
        self.countdown.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageBackend for CountdownDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + out.len();
        if end > bytes.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"));
        }
        out.copy_from_slice(&bytes[start..end]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.tick()?;
        self.lock().resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.tick()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.tick()?;
        let mut bytes = self.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        if bytes.len() < start + data.len() {
            bytes.resize(start + data.len(), 0);
        }
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn ctx() -> AccessContext {
    AccessContext::new("fuzz", "engine_faults", "local", "r")
}

/// Current version and deleted flag of each id.
type Model = BTreeMap<u8, (u64, bool)>;

fn open(dir: &std::path::Path, key: &KeySource, disk: &CountdownDisk) -> Result<Store, Error> {
    let keyring = Keyring::open(dir, key)?;
    Store::builder(dir)
        .key(key.clone())
        .cache_size(1 << 20)
        .read_audit(ReadAudit::GroupCommit {
            max_delay: std::time::Duration::from_secs(3600),
        })
        // Pending versions (ids m0..m7 land among each other) merge every few writes, so
        // that merges run between, and fail among, the other operations.
        .merge_threshold(3)
        .open_on_backend(disk.clone(), keyring)
}

fuzz_target!(|input: Input| {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("key");
    create_key_file(&key_path).expect("key file");
    let key = KeySource::KeyFile(key_path);
    let db = dir.path().join("db");
    Keyring::create(&db, &key, KdfParams::fast_insecure()).expect("keyring");
    let disk = CountdownDisk {
        bytes: Arc::new(Mutex::new(Vec::new())),
        countdown: Arc::new(AtomicU64::new(u64::MAX)),
    };

    let mut committed = Model::new();
    // The state a commit that failed would have produced (it may or may not have landed).
    let mut attempted: Option<Model> = None;
    {
        let store = open(&db, &key, &disk).expect("fresh store opens");
        disk.countdown.store(u64::from(input.countdown), Ordering::SeqCst);
        let mut working = committed.clone();
        let mut txn = match store.begin_write(&ctx()) {
            Ok(txn) => Some(txn),
            Err(_) => None,
        };
        for op in input.ops.iter().take(64) {
            let Some(open_txn) = txn.as_mut() else { break };
            match *op {
                Op::Upsert { id, expected } => {
                    let (current, _) = working.get(&(id % 6)).copied().unwrap_or((0, false));
                    let expected = expected.map(|e| u64::from(e % 4));
                    let body = json!({"resourceType": "Patient", "active": true});
                    match open_txn.update("Patient", &format!("m{}", id % 6), body, expected) {
                        Ok(outcome) => {
                            assert!(expected.is_none_or(|e| e == current));
                            assert_eq!(outcome.resource.version, current + 1);
                            working.insert(id % 6, (current + 1, false));
                        }
                        Err(Error::VersionConflict { current: c, .. }) => assert_eq!(c, current),
                        Err(_) => break,
                    }
                }
                Op::Delete { id } => {
                    let state = working.get(&(id % 6)).copied();
                    match open_txn.delete("Patient", &format!("m{}", id % 6), None) {
                        Ok(outcome) => {
                            let (current, deleted) = state.expect("deleted something absent");
                            assert_eq!(outcome.already_deleted, deleted);
                            if !deleted {
                                working.insert(id % 6, (current + 1, true));
                            }
                        }
                        Err(Error::NotFound) => assert!(state.is_none()),
                        Err(_) => break,
                    }
                }
                Op::Read { id } => {
                    let state = working.get(&(id % 6)).copied();
                    match open_txn.read("Patient", &format!("m{}", id % 6)) {
                        Ok(stored) => assert_eq!(Some((stored.version, false)), state),
                        Err(Error::Gone { version }) => assert_eq!(Some((version, true)), state),
                        Err(Error::NotFound) => assert!(state.is_none()),
                        Err(_) => break,
                    }
                }
                Op::Commit => {
                    let Some(done) = txn.take() else { break };
                    match done.commit() {
                        Ok(()) => committed = working.clone(),
                        Err(_) => {
                            attempted = Some(working.clone());
                            break;
                        }
                    }
                    txn = store.begin_write(&ctx()).ok();
                }
            }
        }
        drop(txn);
    }
    // Reopen the disk exactly as the failure left it: a committed state, never a partial one.
    disk.countdown.store(u64::MAX, Ordering::SeqCst);
    let store = match open(&db, &key, &disk) {
        Ok(store) => store,
        // The failure can hit the very first commit, before the database exists on disk.
        Err(_) if committed.is_empty() => return,
        Err(error) => panic!("reopen after an I/O failure: {error}"),
    };
    let history = store
        .history_system(&ctx(), &HistoryQuery::default())
        .expect("history after reopen");
    let mut seen = Model::new();
    for entry in history.entries.iter().rev() {
        let id: u8 = entry.id.trim_start_matches('m').parse().expect("model id");
        seen.insert(id, (entry.version, entry.is_deleted()));
    }
    assert!(
        seen == committed || attempted.as_ref() == Some(&seen),
        "after the failure the store shows neither the committed state nor the whole failed commit"
    );
    store.verify_audit().expect("audit log verifies after reopen");
});
