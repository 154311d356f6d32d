//! Fuzz target: arbitrary text parsed as a FHIRPath expression and, when it parses, evaluated
//! on a few resources. Only typed errors, never a panic, hang or stack overflow.
#![no_main]

use fhirkeep_fhirpath::Expression;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use std::sync::OnceLock;

fn resources() -> &'static [Value] {
    static RESOURCES: OnceLock<Vec<Value>> = OnceLock::new();
    RESOURCES.get_or_init(|| {
        vec![
            json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
                   "birthDate": "1974-12-25", "_birthDate": {"extension": [{"url": "http://x", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
                   "deceasedBoolean": false, "contained": [{"resourceType": "Organization", "id": "o"}],
                   "managingOrganization": {"reference": "#o"}}),
            json!({"resourceType": "Observation", "id": "o", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                   "subject": {"reference": "Patient/p"}, "valueQuantity": {"value": 185, "unit": "lbs", "code": "[lb_av]"},
                   "effectivePeriod": {"start": "2013-04-02T10:30:10+01:00"},
                   "component": [{"code": {"text": "x"}, "valueString": "y"}]}),
            // Primitives that exist without a value (only their `_name` sibling).
            json!({"resourceType": "Patient", "id": "q",
                   "_birthDate": {"extension": [{"url": "http://x", "valueCode": "unknown"}]},
                   "name": [{"given": ["Ann", null], "_given": [null, {"id": "g2"}, {"id": "g3"}]}],
                   "_deceasedBoolean": {"id": "d"}, "_active": {"extension": []}}),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(expression) = Expression::parse(text) else {
        return;
    };
    for resource in resources() {
        if let Ok(items) = expression.evaluate(resource) {
            for item in &items {
                let _ = item.to_string();
                let _ = item.fhir_type();
            }
        }
    }
});
