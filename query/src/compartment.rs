//! Which resources belong to a patient's compartment: the official R4 Patient
//! CompartmentDefinition (vendored in `data/`), as resource type → reference parameters.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

const PATIENT_COMPARTMENT: &str = include_str!("../data/compartmentdefinition-patient.json");

/// For each resource type in the Patient compartment, the parameters that link it to the
/// patient. Types absent from the map are not in the compartment.
pub fn patient_compartment() -> &'static BTreeMap<String, Vec<String>> {
    static TABLE: OnceLock<BTreeMap<String, Vec<String>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = BTreeMap::new();
        let Ok(definition) = serde_json::from_str::<Value>(PATIENT_COMPARTMENT) else {
            return table;
        };
        for entry in definition
            .get("resource")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(code), Some(params)) = (
                entry.get("code").and_then(Value::as_str),
                entry.get("param").and_then(Value::as_array),
            ) else {
                continue;
            };
            let params: Vec<String> = params
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            if !params.is_empty() {
                table.insert(code.to_string(), params);
            }
        }
        table
    })
}

/// The ids of the patients whose compartment holds `resource` of `resource_type`, found as
/// compartment search finds them: a Patient is in its own compartment, and any resource of a
/// type in the definition is in the compartment of each patient one of its compartment
/// parameters references. Used where the index cannot answer (a deleted resource's last
/// content is no longer indexed).
pub fn compartment_patients(
    registry: &crate::registry::Registry,
    resource_type: &str,
    resource: &Value,
) -> std::collections::BTreeSet<String> {
    let mut patients = std::collections::BTreeSet::new();
    if resource_type == "Patient"
        && let Some(id) = resource.get("id").and_then(Value::as_str)
    {
        patients.insert(id.to_owned());
    }
    let Some(params) = patient_compartment().get(resource_type) else {
        return patients;
    };
    let prefixes: Vec<String> = params
        .iter()
        .map(|code| crate::extract::term(code, "r", "Patient/"))
        .collect();
    let (entries, _) = crate::extract::extract(registry, resource_type, resource);
    for term in &entries.terms {
        if let Some(id) = prefixes
            .iter()
            .find_map(|prefix| term.strip_prefix(prefix.as_str()))
        {
            patients.insert(id.to_owned());
        }
    }
    patients
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compartment_patients_follow_the_compartment_parameters() {
        let registry = crate::registry::Registry::r4().unwrap();
        let observation = serde_json::json!({
            "resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/a"},
            "performer": [{"reference": "Patient/b"}, {"reference": "Practitioner/d"}],
            "focus": [{"reference": "Patient/not-a-compartment-link"}]
        });
        let found = compartment_patients(&registry, "Observation", &observation);
        assert_eq!(found.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        let patient = serde_json::json!({"resourceType": "Patient", "id": "p",
            "link": [{"other": {"reference": "Patient/q"}, "type": "seealso"}]});
        let found = compartment_patients(&registry, "Patient", &patient);
        assert_eq!(found.into_iter().collect::<Vec<_>>(), ["p", "q"]);
        let organization = serde_json::json!({"resourceType": "Organization", "id": "x",
            "partOf": {"reference": "Patient/a"}});
        assert!(compartment_patients(&registry, "Organization", &organization).is_empty());
    }

    #[test]
    fn the_official_definition_loads() {
        let table = patient_compartment();
        assert_eq!(table["Observation"], ["subject", "performer"]);
        assert_eq!(table["Patient"], ["link"]);
        assert!(!table.contains_key("Organization"));
        assert!(table.len() > 60, "{}", table.len());
    }
}
