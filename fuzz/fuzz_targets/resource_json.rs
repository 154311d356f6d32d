//! Fuzz target: arbitrary bytes, parsed as JSON, given to `Store::create`, `Store::update`,
//! `bundle::apply_transaction` and `bundle::apply_batch` on one store per process. Only typed
//! errors, never a panic; what is accepted reads back byte for byte; a transaction that fails
//! writes nothing and one that succeeds wrote every entry it reports.
#![no_main]

use std::sync::Mutex;

use fhirkeep_engine::bundle::{apply_batch, apply_transaction};
use fhirkeep_engine::crypto::{KdfParams, KeySource};
use fhirkeep_engine::store::{AccessContext, HistoryQuery, ReadAudit, Store};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Iterations before the store is thrown away, to keep the database small.
const RECYCLE_AFTER: u32 = 2_000;

struct Fixture {
    store: Store,
    runs: u32,
    _dir: tempfile::TempDir,
}

/// A temporary directory, on tmpfs when there is one (fsync is then nearly free).
fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fhirkeep-fuzz-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir")
}

fn new_fixture() -> Fixture {
    let dir = tmpdir();
    let key = dir.path().join("key");
    fhirkeep_engine::crypto::create_key_file(&key).expect("key file");
    let store = Store::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .kdf(KdfParams::fast_insecure())
        .cache_size(8 << 20)
        .read_audit(ReadAudit::GroupCommit {
            max_delay: std::time::Duration::from_secs(3600),
        })
        .open_or_create()
        .expect("create store");
    Fixture {
        store,
        runs: 0,
        _dir: dir,
    }
}

fn ctx() -> AccessContext {
    AccessContext::new("fuzz", "resource_json", "local", "r")
}

/// The newest change in the whole store, as (type, id, version).
fn newest_change(store: &Store) -> Option<(String, String, u64)> {
    let page = store
        .history_system(
            &ctx(),
            &HistoryQuery {
                count: Some(1),
                ..HistoryQuery::default()
            },
        )
        .expect("system history");
    page.entries
        .first()
        .map(|e| (e.resource_type.clone(), e.id.clone(), e.version))
}

/// `Type/id/_history/v` must vread to a version of that resource.
fn check_written(store: &Store, written: &str) {
    let parts: Vec<&str> = written.split('/').collect();
    assert_eq!(parts.len(), 4, "malformed outcome {written:?}");
    assert_eq!(parts[2], "_history");
    let version: u64 = parts[3].parse().expect("version number");
    match store.vread(&ctx(), parts[0], parts[1], version) {
        Ok(found) => {
            assert_eq!(found.version, version);
            found.to_json().expect("stored body is JSON");
        }
        // A DELETE entry reports the tombstone's version.
        Err(fhirkeep_engine::Error::Gone { version: v }) => assert_eq!(v, version),
        Err(e) => panic!("{written} was reported written but vread fails: {e:?}"),
    }
}

fn exercise(store: &Store, value: Value) {
    // create
    if let Ok(stored) = store.create(&ctx(), value.clone()) {
        let read = store
            .read(&ctx(), &stored.resource_type, &stored.id)
            .expect("read after create");
        assert_eq!(read.json_bytes(), stored.json_bytes());
        let body = read.to_json().expect("stored body is JSON");
        assert_eq!(body["id"], json!(stored.id));
        assert_eq!(body["resourceType"], json!(stored.resource_type));
    }

    // update, at the type and id the body names (or fixed ones)
    let rtype = value
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Patient")
        .to_owned();
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("fuzz-id")
        .to_owned();
    if let Ok(out) = store.update(&ctx(), &rtype, &id, value.clone(), None) {
        let read = store.read(&ctx(), &rtype, &id).expect("read after update");
        assert_eq!(read.json_bytes(), out.resource.json_bytes());
        assert_eq!(read.version, out.resource.version);
    }

    // transaction: all or nothing
    let before = newest_change(store);
    match apply_transaction(store, &ctx(), &value) {
        Ok(written) => written.iter().for_each(|w| check_written(store, w)),
        Err(_) => assert_eq!(
            newest_change(store),
            before,
            "a failed transaction changed the store"
        ),
    }

    // batch: every entry reported written is there
    if let Ok(outcomes) = apply_batch(store, &ctx(), &value) {
        for outcome in &outcomes {
            if let Ok(w) = &outcome.result {
                check_written(store, w);
            }
        }
    }
}

static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let mut guard = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|f| f.runs >= RECYCLE_AFTER) {
        *guard = None;
        *guard = Some(new_fixture());
    }
    let fx = guard.as_mut().expect("fixture");
    fx.runs += 1;
    exercise(&fx.store, value.clone());
    // The same value as a transaction / batch bundle entry, so single resources reach the
    // bundle paths too.
    if value.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        for (kind, method) in [("transaction", "POST"), ("batch", "PUT")] {
            let url = match method {
                "POST" => value
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or("Patient")
                    .to_owned(),
                _ => format!(
                    "{}/{}",
                    value.get("resourceType").and_then(Value::as_str).unwrap_or("Patient"),
                    value.get("id").and_then(Value::as_str).unwrap_or("x")
                ),
            };
            let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": [
                {"fullUrl": "urn:uuid:a", "resource": value.clone(),
                 "request": {"method": method, "url": url}}
            ]});
            exercise(&fx.store, bundle);
        }
    }
});
