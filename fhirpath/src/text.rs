//! Which strings of a resource are text, for full-text search (`_content`): the values of
//! elements whose R4 type is `string` or `markdown`, and the narrative's XHTML.
//!
//! Codes, URIs, ids, dates and references are left out: they are searched by their own
//! parameters, and their fragments (the parts of a UUID or a URL) would only be noise in a
//! text index. Elements the model does not know (a resource that is not valid R4) keep
//! their strings, so that nothing a user stored becomes unsearchable.

use serde_json::Value;

use crate::eval::{first_upper, suffix_type};
use crate::model::{TypeId, model};

/// One piece of text of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text<'a> {
    /// A `string` or `markdown` value.
    Plain(&'a str),
    /// A narrative `div` (XHTML markup; the caller strips the tags).
    Xhtml(&'a str),
}

/// Deeper than any resource nests; the bound keeps hostile input from overflowing the stack.
const MAX_DEPTH: usize = 64;

/// Calls `visit` for every piece of text of `resource`, in document order.
pub fn visit_text<'a>(resource: &'a Value, visit: &mut impl FnMut(Text<'a>)) {
    walk(resource, None, 0, visit);
}

fn walk<'a>(value: &'a Value, ty: Option<TypeId>, depth: usize, visit: &mut impl FnMut(Text<'a>)) {
    if depth > MAX_DEPTH {
        return;
    }
    let m = model();
    match value {
        Value::String(s) => match ty.map(|t| m.name(t)) {
            None | Some("string" | "markdown") => visit(Text::Plain(s)),
            Some("xhtml") => visit(Text::Xhtml(s)),
            Some(_) => {}
        },
        Value::Array(items) => {
            for item in items {
                walk(item, ty, depth + 1, visit);
            }
        }
        Value::Object(map) => {
            // A resource (the root, `contained`, `Bundle.entry.resource`) names its own type;
            // data types and backbone elements never do, so they are not asked.
            let ty = if ty.is_none_or(|t| m.is_resource_like(t)) {
                match crate::item::member(map, "resourceType").and_then(Value::as_str) {
                    Some(name) if m.is_resource_type(name) => m.type_id(name),
                    _ => ty,
                }
            } else {
                ty
            };
            for (key, child) in map {
                if key == "resourceType" || key == "id" || key == "reference" {
                    continue;
                }
                walk(child, child_type(ty, key), depth + 1, visit);
            }
        }
        _ => {}
    }
}

/// The type of element `key` of an object of type `ty`; `None` when unknown.
fn child_type(ty: Option<TypeId>, key: &str) -> Option<TypeId> {
    let m = model();
    // `_name` holds a primitive's id and extensions.
    if key.starts_with('_') {
        return m.type_id("Element");
    }
    if key == "extension" || key == "modifierExtension" {
        return m.type_id("Extension");
    }
    let ty = ty?;
    if let Some(def) = m.child(ty, key) {
        return if def.choice {
            None
        } else {
            def.types.first().copied()
        };
    }
    // A choice element: `valueString` is `value[x]` with type `string`.
    key.char_indices()
        .filter(|(i, c)| *i > 0 && c.is_ascii_uppercase())
        .find_map(|(i, _)| {
            let def = m.child(ty, &key[..i])?;
            let suffix = &key[i..];
            (def.choice && first_upper(suffix))
                .then(|| suffix_type(Some(&def.types), suffix))
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn texts(resource: &Value) -> Vec<String> {
        let mut out = Vec::new();
        visit_text(resource, &mut |t| {
            out.push(match t {
                Text::Plain(s) => s.to_owned(),
                Text::Xhtml(s) => format!("<{s}>"),
            })
        });
        out
    }

    #[test]
    fn strings_and_markdown_are_text_codes_uris_ids_dates_and_references_are_not() {
        let obs = json!({
            "resourceType": "Observation", "id": "obs-1",
            "meta": {"versionId": "3", "lastUpdated": "2024-01-01T00:00:00Z"},
            "text": {"status": "generated", "div": "<div>Heart rate</div>"},
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                 "display": "Heart rate display"}], "text": "HR text"},
            "subject": {"reference": "Patient/p1", "display": "Peter Chalmers"},
            "effectiveDateTime": "2024-01-01",
            "valueQuantity": {"value": 72, "unit": "beats/minute",
                              "system": "http://unitsofmeasure.org", "code": "/min"},
            "note": [{"text": "markdown **note**"}],
            "valueString": "ignored: Observation has one value"
        });
        let found = texts(&obs);
        for s in [
            "HR text",
            "Heart rate display",
            "Peter Chalmers",
            "beats/minute",
            "markdown **note**",
        ] {
            assert!(found.iter().any(|f| f == s), "{s} missing from {found:?}");
        }
        for s in [
            "obs-1",
            "3",
            "final",
            "http://loinc.org",
            "8867-4",
            "Patient/p1",
            "2024-01-01",
            "/min",
        ] {
            assert!(!found.iter().any(|f| f == s), "{s} is not text: {found:?}");
        }
        assert!(found.contains(&"<<div>Heart rate</div>>".to_owned()));
    }

    #[test]
    fn contained_resources_extensions_and_unknown_elements_keep_their_text() {
        let patient = json!({
            "resourceType": "Patient",
            "identifier": [{"system": "urn:mrn", "value": "mrn-p3"}],
            "name": [{"family": "Quagga", "given": ["Zed"], "_family": {
                "extension": [{"url": "http://x", "valueString": "family note"}]}}],
            "contained": [{"resourceType": "Organization", "id": "o1", "name": "Clinic Org"}],
            "extension": [{"url": "http://y", "valueCode": "a-code",
                           "valueMarkdown": "md ext"}],
            "madeUpElement": "kept because unknown"
        });
        let found = texts(&patient);
        for s in [
            "mrn-p3",
            "Quagga",
            "Zed",
            "family note",
            "Clinic Org",
            "md ext",
            "kept because unknown",
        ] {
            assert!(found.iter().any(|f| f == s), "{s} missing from {found:?}");
        }
        for s in ["urn:mrn", "o1", "http://x", "http://y", "a-code"] {
            assert!(!found.iter().any(|f| f == s), "{s} is not text: {found:?}");
        }
    }

    #[test]
    fn hostile_nesting_stops_at_the_depth_bound() {
        let mut value = json!("deep");
        for _ in 0..200 {
            value = json!([value]);
        }
        assert!(texts(&value).is_empty());
    }
}
