//! The `searchset` Bundle of a search result, as the server sends it and the CLI prints it.

use serde_json::{Map, Value, json};

use crate::search::{EntryMode, EntryResource, SearchResult};
use crate::{Error, Result};

impl SearchResult {
    /// The result as a FHIR `searchset` Bundle; `base` is the server's base URL (no trailing
    /// slash), used for `fullUrl` and links. Copies every resource: prefer
    /// [`SearchResult::into_bundle`] when the result is not needed afterwards.
    pub fn to_bundle(&self, base: &str) -> Value {
        self.clone().into_bundle(base)
    }

    /// [`SearchResult::to_bundle`], moving the resources into the Bundle instead of copying
    /// them (a page of resources is most of a search's memory traffic).
    pub fn into_bundle(mut self, base: &str) -> Value {
        let entries = std::mem::take(&mut self.entries);
        let mut bundle = self.bundle_head(base);
        let mut out: Vec<Value> = entries
            .into_iter()
            .map(|entry| {
                // A stored resource that does not parse (never expected: the store wrote it)
                // stays in the Bundle as null rather than failing the whole page.
                let resource = entry.resource.into_json().unwrap_or(Value::Null);
                // Built by hand: `json!` would copy the resource through `to_value`.
                let mut object = Map::with_capacity(3);
                object.insert(
                    "fullUrl".into(),
                    Value::String(format!("{base}/{}", entry.key)),
                );
                object.insert("resource".into(), resource);
                object.insert("search".into(), search_of(entry.mode));
                Value::Object(object)
            })
            .collect();
        out.extend(self.outcome_entry());
        bundle.insert("entry".into(), Value::Array(out));
        Value::Object(bundle)
    }

    /// The same Bundle as [`SearchResult::into_bundle`], serialized (compact JSON): stored
    /// resources are copied in as the store returned them, not parsed and re-serialized,
    /// which is most of the cost of sending a page.
    pub fn into_bundle_json(mut self, base: &str) -> Result<Vec<u8>> {
        let entries = std::mem::take(&mut self.entries);
        let outcome = self.outcome_entry();
        let head = Value::Object(self.bundle_head(base));
        let mut out = serde_json::to_vec(&head)
            .map_err(|_| Error::Internal("a Bundle did not serialize".into()))?;
        // `head` is a non-empty object: drop its closing brace and append the entries.
        if out.pop() != Some(b'}') {
            return Err(Error::Internal("a Bundle did not serialize".into()));
        }
        let stored_len: usize = entries
            .iter()
            .map(|e| match &e.resource {
                EntryResource::Stored(json) => json.len(),
                EntryResource::Parsed(_) => 0,
            })
            .sum();
        out.reserve(stored_len + entries.len() * (base.len() + 96) + 16);
        out.extend_from_slice(br#","entry":["#);
        let mut first = true;
        for entry in entries {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(br#"{"fullUrl":"#);
            write_json(&mut out, &Value::String(format!("{base}/{}", entry.key)))?;
            out.extend_from_slice(br#","resource":"#);
            match entry.resource {
                EntryResource::Stored(json) if !json.is_empty() => out.extend_from_slice(&json),
                EntryResource::Stored(_) => out.extend_from_slice(b"null"),
                EntryResource::Parsed(value) => write_json(&mut out, &value)?,
            }
            out.extend_from_slice(br#","search":"#);
            write_json(&mut out, &search_of(entry.mode))?;
            out.push(b'}');
        }
        if let Some(outcome) = outcome {
            if !first {
                out.push(b',');
            }
            write_json(&mut out, &outcome)?;
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// Everything of the Bundle but its entries.
    fn bundle_head(&self, base: &str) -> Map<String, Value> {
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
        let mut bundle = Map::new();
        bundle.insert("resourceType".into(), json!("Bundle"));
        bundle.insert("type".into(), json!("searchset"));
        if let Some(total) = self.total {
            bundle.insert("total".into(), json!(total));
        }
        bundle.insert("link".into(), Value::Array(links));
        bundle
    }

    /// The entry that tells the client which parameters a lenient search ignored.
    fn outcome_entry(&self) -> Option<Value> {
        if self.ignored.is_empty() {
            return None;
        }
        Some(json!({
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
        }))
    }
}

fn search_of(mode: EntryMode) -> Value {
    json!({"mode": match mode {
        EntryMode::Match => "match",
        EntryMode::Include => "include",
    }})
}

fn write_json(out: &mut Vec<u8>, value: &Value) -> Result<()> {
    serde_json::to_writer(&mut *out, value)
        .map_err(|_| Error::Internal("a Bundle entry did not serialize".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::SearchEntry;

    fn result(entries: Vec<SearchEntry>, ignored: Vec<String>) -> SearchResult {
        SearchResult {
            total: Some(entries.len()),
            entries,
            next_cursor: Some("abc".into()),
            previous_cursor: None,
            ignored,
            canonical_query: "name=x".into(),
            path: "Patient".into(),
        }
    }

    #[test]
    fn the_serialized_bundle_is_the_bundle() {
        let stored =
            json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Ünïcode \"q\""}]});
        let parsed = json!({"resourceType": "Patient", "id": "p2", "meta": {"tag": [{"code": "SUBSETTED"}]}});
        let entries = vec![
            SearchEntry {
                key: "Patient/p1".into(),
                resource: EntryResource::Stored(serde_json::to_vec(&stored).unwrap()),
                mode: EntryMode::Match,
            },
            SearchEntry {
                key: "Patient/p2".into(),
                resource: EntryResource::Parsed(parsed.clone()),
                mode: EntryMode::Include,
            },
        ];
        for ignored in [vec![], vec!["_foo".to_string()]] {
            let result = result(entries.clone(), ignored.clone());
            let value = result.clone().into_bundle("http://h/fhir");
            let bytes = result.into_bundle_json("http://h/fhir").unwrap();
            let reparsed: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(reparsed, value);
            assert_eq!(value["entry"][0]["resource"], stored);
            assert_eq!(value["entry"][1]["resource"], parsed);
            assert_eq!(value["entry"][1]["search"]["mode"], "include");
            assert_eq!(value["entry"].as_array().unwrap().len(), 2 + ignored.len());
        }
        let empty = result(vec![], vec![]);
        let reparsed: Value =
            serde_json::from_slice(&empty.clone().into_bundle_json("http://h").unwrap()).unwrap();
        assert_eq!(reparsed, empty.into_bundle("http://h"));
        assert_eq!(reparsed["entry"], json!([]));
    }
}
