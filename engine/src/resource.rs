//! What the engine accepts as a resource: R4 types, id syntax, and the meta it stamps.

use serde_json::{Map, Value};

use crate::r4_types::R4_RESOURCE_TYPES;
use crate::{Error, Result};

/// Whether `name` is one of the FHIR R4 resource types (case-sensitive).
pub fn is_resource_type(name: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// All FHIR R4 resource type names, sorted.
pub fn resource_types() -> &'static [&'static str] {
    R4_RESOURCE_TYPES
}

/// Whether `id` is a valid FHIR id: `[A-Za-z0-9\-.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A new server-assigned id: a UUID version 7 (RFC 9562), 74 random bits after a 48-bit
/// millisecond timestamp. Unguessable, and time-ordered so that creates append to the
/// B-tree instead of touching random pages.
pub fn new_server_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Checks a resource type name, returning a typed error for an unknown one.
pub fn check_resource_type(name: &str) -> Result<()> {
    if is_resource_type(name) {
        Ok(())
    } else {
        Err(Error::UnknownResourceType(truncate_for_message(name)))
    }
}

/// Checks an id, returning [`Error::InvalidId`] for a malformed one.
pub fn check_id(id: &str) -> Result<()> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidId)
    }
}

/// The parts of a resource the engine checks before storing it.
#[derive(Debug)]
pub(crate) struct ResourceHead<'a> {
    pub(crate) resource_type: &'a str,
    pub(crate) id: Option<&'a str>,
}

/// Checks that `value` is a JSON object with a known `resourceType` and, if present, a valid `id`.
pub(crate) fn inspect(value: &Value) -> Result<ResourceHead<'_>> {
    let object = value
        .as_object()
        .ok_or_else(|| Error::InvalidResource("a resource must be a JSON object".into()))?;
    let resource_type = match object.get("resourceType") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => {
            return Err(Error::InvalidResource(
                "resourceType must be a string".into(),
            ));
        }
        None => return Err(Error::InvalidResource("resourceType is missing".into())),
    };
    check_resource_type(resource_type)?;
    let id = match object.get("id") {
        None => None,
        Some(Value::String(id)) => {
            check_id(id)?;
            Some(id.as_str())
        }
        Some(_) => return Err(Error::InvalidResource("id must be a string".into())),
    };
    if let Some(meta) = object.get("meta")
        && !meta.is_object()
    {
        return Err(Error::InvalidResource("meta must be a JSON object".into()));
    }
    Ok(ResourceHead { resource_type, id })
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping every other element as sent.
pub(crate) fn stamp(value: &mut Value, id: &str, version: u64, last_updated: &str) {
    let Some(object) = value.as_object_mut() else {
        return;
    };
    object.insert("id".into(), Value::String(id.to_owned()));
    let meta = object
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    if let Some(meta) = meta.as_object_mut() {
        meta.insert("versionId".into(), Value::String(version.to_string()));
        meta.insert("lastUpdated".into(), Value::String(last_updated.to_owned()));
    }
}

/// Shortens user-supplied text before it goes into an error message.
fn truncate_for_message(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_follow_the_r4_grammar() {
        assert!(is_valid_id("example"));
        assert!(is_valid_id("a-B.9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id("slash/id"));
        assert!(!is_valid_id("ünï"));
    }

    #[test]
    fn resource_types_are_the_r4_list() {
        assert!(is_resource_type("Patient"));
        assert!(is_resource_type("Observation"));
        assert!(is_resource_type("Bundle"));
        assert!(!is_resource_type("patient"));
        assert!(!is_resource_type("DomainResource"));
        assert!(!is_resource_type("Resource"));
        assert_eq!(resource_types().len(), 147);
        assert!(resource_types().windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn inspect_rejects_bad_shapes_with_typed_errors() {
        let cases = [
            (json!([1, 2]), "invalid-resource"),
            (json!({"id": "x"}), "invalid-resource"),
            (json!({"resourceType": 5}), "invalid-resource"),
            (json!({"resourceType": "Nope"}), "unknown-resource-type"),
            (
                json!({"resourceType": "Patient", "id": "bad id"}),
                "invalid-id",
            ),
            (
                json!({"resourceType": "Patient", "id": 7}),
                "invalid-resource",
            ),
            (
                json!({"resourceType": "Patient", "meta": "x"}),
                "invalid-resource",
            ),
        ];
        for (value, kind) in cases {
            let err = inspect(&value).unwrap_err();
            assert_eq!(err.kind_name(), kind, "{value}");
        }
        let ok = json!({"resourceType": "Patient", "id": "p1"});
        let head = inspect(&ok).unwrap();
        assert_eq!((head.resource_type, head.id), ("Patient", Some("p1")));
    }

    #[test]
    fn stamp_keeps_other_meta_and_sets_version() {
        let mut value =
            json!({"resourceType": "Patient", "meta": {"profile": ["p"], "versionId": "9"}});
        stamp(&mut value, "abc", 2, "2026-01-01T00:00:00.000000Z");
        assert_eq!(value["id"], "abc");
        assert_eq!(value["meta"]["versionId"], "2");
        assert_eq!(value["meta"]["profile"][0], "p");
        assert_eq!(value["meta"]["lastUpdated"], "2026-01-01T00:00:00.000000Z");
    }

    #[test]
    fn unknown_type_message_is_bounded() {
        let long = "X".repeat(500);
        let message = check_resource_type(&long).unwrap_err().to_string();
        assert!(message.len() < 120, "{message}");
    }
}
