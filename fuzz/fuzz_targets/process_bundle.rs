//! Fuzz target: arbitrary bytes, parsed as JSON, given to `Database::process_bundle` (batch and
//! transaction Bundles with conditional URLs, `ifNoneExist`, `urn:uuid:` references and GET
//! searches) on one database per process. Only typed errors, never a panic; a transaction that
//! fails writes nothing, and a response Bundle has one entry per request entry.
#![no_main]

use std::sync::OnceLock;

use fhirkeep_engine::crypto::{KdfParams, KeySource};
use fhirkeep_engine::store::{AccessContext, ReadAudit};
use fhirkeep_query::Database;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Fixture {
    db: Database,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fhirkeep-fuzz-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let key = dir.path().join("key");
        fhirkeep_engine::crypto::create_key_file(&key).expect("key file");
        let db = Database::builder(dir.path().join("db"))
            .key(KeySource::KeyFile(key))
            .kdf(KdfParams::fast_insecure())
            .read_audit(ReadAudit::GroupCommit {
                max_delay: std::time::Duration::from_secs(3600),
            })
            .create()
            .expect("database");
        Fixture { db, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(bundle) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let fx = fixture();
    let ctx = AccessContext::local("fuzz");
    let before = fx.db.store().last_change_seq().expect("last change");
    let is_transaction = bundle.get("type").and_then(Value::as_str) == Some("transaction");
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::len);
    match fx.db.process_bundle(&ctx, &bundle, "http://localhost/fhir") {
        Ok(response) => {
            let answered = response
                .get("entry")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            assert_eq!(Some(answered), entries.or(Some(0)), "one answer per entry");
        }
        Err(_) if is_transaction => {
            let after = fx.db.store().last_change_seq().expect("last change");
            assert_eq!(before, after, "a failed transaction wrote something");
        }
        Err(_) => {}
    }
});
