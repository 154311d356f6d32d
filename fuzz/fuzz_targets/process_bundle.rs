//! Fuzz target: arbitrary bytes, parsed as JSON, given to `Database::process_bundle` (batch and
//! transaction Bundles with conditional URLs, `ifNoneExist`, `urn:uuid:` references and GET
//! searches) on one database per process. Only typed errors, never a panic; a transaction that
//! fails writes nothing, and a response Bundle has one entry per request entry.
#![no_main]

use std::sync::OnceLock;

use fhirkeep_engine::store::AccessContext;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "shared/database.rs"]
mod shared;

fn fixture() -> &'static shared::FuzzDatabase {
    static FIXTURE: OnceLock<shared::FuzzDatabase> = OnceLock::new();
    FIXTURE.get_or_init(shared::new_database)
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
