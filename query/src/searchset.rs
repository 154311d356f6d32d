//! The `searchset` Bundle of a search result, as the server sends it and the CLI prints it.

use serde_json::{Value, json};

use crate::search::{EntryMode, SearchResult};

impl SearchResult {
    /// The result as a FHIR `searchset` Bundle; `base` is the server's base URL (no trailing
    /// slash), used for `fullUrl` and links. Copies every resource: prefer
    /// [`SearchResult::into_bundle`] when the result is not needed afterwards.
    pub fn to_bundle(&self, base: &str) -> Value {
        self.clone().into_bundle(base)
    }

    /// [`SearchResult::to_bundle`], moving the resources into the Bundle instead of copying
    /// them (a page of resources is most of a search's memory traffic).
    pub fn into_bundle(self, base: &str) -> Value {
        let path_url = if self.path.is_empty() {
            base.to_string()
        } else {
            format!("{base}/{}", self.path)
        };
        let with_query = |extra: Option<(&str, &str)>| -> String {
            let mut query = self.canonical_query.clone();
            if let Some((name, value)) = extra {
                if !query.is_empty() {
                    query.push('&');
                }
                query.push_str(name);
                query.push('=');
                query.push_str(value);
            }
            if query.is_empty() {
                path_url.clone()
            } else {
                format!("{path_url}?{query}")
            }
        };
        let mut links = vec![json!({"relation": "self", "url": with_query(None)})];
        if let Some(cursor) = &self.next_cursor {
            links.push(json!({"relation": "next", "url": with_query(Some(("_cursor", cursor)))}));
        }
        if let Some(cursor) = &self.previous_cursor {
            links.push(
                json!({"relation": "previous", "url": with_query(Some(("_cursor", cursor)))}),
            );
        }
        let mut entries: Vec<Value> = self
            .entries
            .into_iter()
            .map(|entry| {
                // Built by hand: `json!` would copy the resource through `to_value`.
                let mut object = serde_json::Map::with_capacity(3);
                object.insert(
                    "fullUrl".into(),
                    Value::String(format!("{base}/{}", entry.key)),
                );
                object.insert("resource".into(), entry.resource);
                object.insert(
                    "search".into(),
                    json!({"mode": match entry.mode {
                        EntryMode::Match => "match",
                        EntryMode::Include => "include",
                    }}),
                );
                Value::Object(object)
            })
            .collect();
        if !self.ignored.is_empty() {
            entries.push(json!({
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [{
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": format!(
                            "ignored unknown or unsupported parameters: {}",
                            self.ignored.join(", ")
                        ),
                    }],
                },
                "search": {"mode": "outcome"},
            }));
        }
        let mut bundle = json!({
            "resourceType": "Bundle",
            "type": "searchset",
        });
        if let Some(total) = self.total {
            bundle["total"] = json!(total);
        }
        bundle["link"] = Value::Array(links);
        bundle["entry"] = Value::Array(entries);
        bundle
    }
}
