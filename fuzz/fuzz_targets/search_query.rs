//! Fuzz target: arbitrary text as a FHIR search URL (`Type?name:modifier=value&...`), parsed
//! strictly and leniently against the R4 parameters and, when it parses, run on a small
//! database. Only typed errors, never a panic; a cursor from a result is accepted back.
#![no_main]

use std::sync::OnceLock;

use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::params::{Handling, parse_search_url};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

#[path = "shared/database.rs"]
mod shared;

/// A database with a few patients and observations, made once per process.
fn fixture() -> &'static shared::FuzzDatabase {
    static FIXTURE: OnceLock<shared::FuzzDatabase> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let fixture = shared::new_database();
        let db = &fixture.db;
        let ctx = AccessContext::local("fuzz");
        for i in 0..5 {
            db.update(&ctx, "Patient", &format!("p{i}"), json!({"resourceType": "Patient", "id": format!("p{i}"),
                "name": [{"family": format!("Fam{i}")}], "birthDate": format!("19{}0-01-0{}", i + 5, i + 1),
                "gender": if i % 2 == 0 { "female" } else { "male" }}), None).expect("patient");
            db.update(&ctx, "Observation", &format!("o{i}"), json!({"resourceType": "Observation", "id": format!("o{i}"),
                "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": format!("1234-{i}")}]},
                "subject": {"reference": format!("Patient/p{i}")}, "effectiveDateTime": format!("20{}0-02-03", i),
                "valueQuantity": {"value": i * 10, "system": "http://unitsofmeasure.org", "code": "kg"}}), None).expect("observation");
        }
        fixture
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fx = fixture();
    let registry = fx.db.registry().expect("registry");
    let strict = parse_search_url(&registry, text, Handling::Strict);
    let lenient = parse_search_url(&registry, text, Handling::Lenient);
    drop(registry);
    if strict.is_ok() {
        assert!(lenient.is_ok(), "lenient parsing refused what strict parsing accepted");
    }
    let Ok(mut request) = lenient else {
        return;
    };
    let ctx = AccessContext::local("fuzz");
    if let Ok(result) = fx.db.search(&ctx, &request) {
        let _ = result.to_bundle("http://localhost/fhir");
        if let Some(cursor) = result.next_cursor {
            request.cursor = Some(cursor);
            fx.db.search(&ctx, &request).expect("a fresh cursor is accepted");
        }
    }
});
