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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_official_definition_loads() {
        let table = patient_compartment();
        assert_eq!(table["Observation"], ["subject", "performer"]);
        assert_eq!(table["Patient"], ["link"]);
        assert!(!table.contains_key("Organization"));
        assert!(table.len() > 60, "{}", table.len());
    }
}
