//! Small builders for the FHIR R4 datatypes the cohort generator emits over and over.

use serde_json::{Value, json};

use super::codes::{Test, UCUM};
use crate::blocks::number;

/// A CodeableConcept with one coding; its text repeats the display, as most EHRs send.
pub(crate) fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}], "text": display})
}

/// A CodeableConcept with one coding and no text (status-like codes).
pub(crate) fn coded(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}]})
}

/// A literal reference to a resource of the output.
pub(crate) fn reference(resource_type: &str, id: &str) -> Value {
    json!({"reference": format!("{resource_type}/{id}")})
}

/// A logical reference by identifier: practitioners and organizations are not generated as
/// resources, and a literal reference to one would dangle.
pub(crate) fn logical(system: &str, value: &str, display: &str) -> Value {
    json!({"identifier": {"system": system, "value": value}, "display": display})
}

/// `value` rounded to the test's precision: results are compared against their reference
/// range after rounding, as a lab reports them.
pub(crate) fn rounded(test: &Test, value: f64) -> f64 {
    let scale = 10f64.powi(test.decimals);
    (value * scale).round() / scale
}

/// A UCUM Quantity of the test's unit.
pub(crate) fn quantity(test: &Test, value: f64) -> Value {
    json!({"value": number(value, test.decimals), "unit": test.unit, "system": UCUM, "code": test.unit})
}

/// `Observation.interpretation` (L, N or H) of `value` against the test's range.
pub(crate) fn interpretation(test: &Test, value: f64) -> Value {
    let (code, display) = if test.low.is_some_and(|low| value < low) {
        ("L", "Low")
    } else if test.high.is_some_and(|high| value > high) {
        ("H", "High")
    } else {
        ("N", "Normal")
    };
    json!([{
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": code, "display": display}],
        "text": display
    }])
}

/// `Observation.referenceRange` of the test (either bound may be open).
pub(crate) fn reference_range(test: &Test) -> Value {
    let mut range = serde_json::Map::new();
    if let Some(low) = test.low {
        range.insert("low".into(), quantity(test, low));
    }
    if let Some(high) = test.high {
        range.insert("high".into(), quantity(test, high));
    }
    json!([range])
}
