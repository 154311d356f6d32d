//! Applying FHIR `batch` and `transaction` Bundles to the store.
//!
//! A transaction runs in one [`WriteTxn`]: all entries commit or none does. Entries are
//! processed in FHIR's order (DELETE, POST, PUT, GET is not a write and is refused here);
//! `urn:uuid:` full URLs of POST entries get their server ids before any entry is written,
//! and every `reference` naming such a URL is rewritten to `Type/id`.
//! A batch applies each entry on its own: a failed entry is reported and the rest go on.
//! Conditional references and conditional interactions belong to the query layer.

use std::collections::HashMap;

use serde_json::Value;

use crate::store::{AccessContext, Store, WriteTxn};
use crate::{Error, Result};

/// What happened to one bundle entry.
#[derive(Debug)]
pub struct EntryOutcome {
    /// Position of the entry in the bundle.
    pub index: usize,
    /// `Type/id/_history/vid` written, or the error.
    pub result: Result<String>,
}

/// Whether a JSON value is a Bundle the engine applies (batch or transaction).
pub fn is_applicable_bundle(value: &Value) -> bool {
    value.get("resourceType").and_then(Value::as_str) == Some("Bundle")
        && matches!(
            value.get("type").and_then(Value::as_str),
            Some("batch" | "transaction")
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
}

#[derive(Debug)]
struct Entry {
    index: usize,
    method: Method,
    resource: Option<Value>,
    resource_type: String,
    id: Option<String>,
    full_url: Option<String>,
}

fn parse_entry(index: usize, entry: &Value) -> Result<Entry> {
    let request = entry
        .get("request")
        .ok_or_else(|| Error::InvalidResource(format!("entry {index} has no request")))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("DELETE") => Method::Delete,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some(other) => {
            return Err(Error::InvalidResource(format!(
                "request method {other:?} is not supported here (reads belong to the query layer)"
            )));
        }
        None => {
            return Err(Error::InvalidResource(format!(
                "entry {index} has no request.method"
            )));
        }
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidResource(format!("entry {index} has no request.url")))?;
    if url.contains('?') {
        return Err(Error::InvalidResource(
            "conditional requests are not supported by the engine yet".to_string(),
        ));
    }
    let (resource_type, id) = split_request_url(url);
    let resource = entry.get("resource").cloned();
    if method != Method::Delete && resource.is_none() {
        return Err(Error::InvalidResource(format!(
            "entry {index} has no resource"
        )));
    }
    if method != Method::Post && id.is_none() {
        return Err(Error::InvalidResource(format!(
            "entry {index}: {method:?} needs a url of the form Type/id"
        )));
    }
    Ok(Entry {
        index,
        method,
        resource,
        resource_type,
        id,
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// `Type`, `Type/id`, or an absolute URL ending in one of them (`http://server/fhir/Type/id`).
fn split_request_url(url: &str) -> (String, Option<String>) {
    let path = match url.find("://") {
        Some(scheme_end) => {
            let after = &url[scheme_end + 3..];
            let segments: Vec<&str> = after.split('/').skip(1).collect();
            let start = segments
                .iter()
                .rposition(|s| crate::resource::is_resource_type(s))
                .unwrap_or(0);
            segments[start..].join("/")
        }
        None => url.trim_start_matches('/').to_owned(),
    };
    let mut parts = path.split('/');
    let resource_type = parts.next().unwrap_or_default().to_owned();
    (resource_type, parts.next().map(str::to_owned))
}

fn entries(bundle: &Value) -> Result<Vec<Value>> {
    match bundle.get("entry") {
        None => Ok(Vec::new()),
        Some(Value::Array(entries)) => Ok(entries.clone()),
        Some(_) => Err(Error::InvalidResource(
            "Bundle.entry must be an array".into(),
        )),
    }
}

/// Applies a transaction bundle atomically; returns one `Type/id/_history/vid` per entry,
/// in bundle order.
pub fn apply_transaction(
    store: &Store,
    ctx: &AccessContext,
    bundle: &Value,
) -> Result<Vec<String>> {
    let mut parsed = entries(bundle)?
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_entry(index, entry))
        .collect::<Result<Vec<_>>>()?;
    // Assign ids to POST entries first, so references between entries can be rewritten.
    let mut rewrites = HashMap::new();
    for entry in &mut parsed {
        if entry.method == Method::Post {
            let id = crate::resource::new_server_id();
            if let Some(url) = entry
                .full_url
                .as_ref()
                .filter(|u| u.starts_with("urn:uuid:"))
            {
                rewrites.insert(url.clone(), format!("{}/{}", entry.resource_type, id));
            }
            entry.id = Some(id);
        }
    }
    for entry in &mut parsed {
        if let Some(resource) = entry.resource.as_mut() {
            rewrite_references(resource, &rewrites);
        }
    }
    let mut order: Vec<usize> = (0..parsed.len()).collect();
    order.sort_by_key(|&i| parsed[i].method);
    let mut written = vec![String::new(); parsed.len()];
    store.write(ctx, |txn| {
        for i in order {
            written[i] = apply_entry(txn, &mut parsed[i])?;
        }
        Ok(())
    })?;
    Ok(written)
}

/// Applies a batch bundle: each entry on its own, in one commit for speed.
pub fn apply_batch(
    store: &Store,
    ctx: &AccessContext,
    bundle: &Value,
) -> Result<Vec<EntryOutcome>> {
    let raw = entries(bundle)?;
    store.write(ctx, |txn| {
        Ok(raw
            .iter()
            .enumerate()
            .map(|(index, entry)| EntryOutcome {
                index,
                result: parse_entry(index, entry).and_then(|mut e| {
                    if e.method == Method::Post {
                        e.id = None;
                    }
                    apply_entry(txn, &mut e)
                }),
            })
            .collect())
    })
}

fn apply_entry(txn: &mut WriteTxn<'_>, entry: &mut Entry) -> Result<String> {
    let id = entry.id.clone();
    let written = match (entry.method, id) {
        (Method::Delete, Some(id)) => {
            let outcome = txn.delete(&entry.resource_type, &id, None)?;
            (entry.resource_type.clone(), id, outcome.version)
        }
        (Method::Post, None) => {
            let resource = entry.resource.take().unwrap_or(Value::Null);
            let stored = txn.create(resource)?;
            (stored.resource_type, stored.id, stored.version)
        }
        (Method::Post | Method::Put, Some(id)) => {
            let mut resource = entry.resource.take().unwrap_or(Value::Null);
            if let Some(object) = resource.as_object_mut() {
                object.insert("id".into(), Value::String(id.clone()));
            }
            let outcome = txn.update(&entry.resource_type, &id, resource, None)?;
            (
                outcome.resource.resource_type,
                outcome.resource.id,
                outcome.resource.version,
            )
        }
        (Method::Delete | Method::Put, None) => {
            return Err(Error::InvalidResource(format!(
                "entry {} has no id",
                entry.index
            )));
        }
    };
    Ok(format!(
        "{}/{}/_history/{}",
        written.0, written.1, written.2
    ))
}

fn rewrite_references(value: &mut Value, rewrites: &HashMap<String, String>) {
    if rewrites.is_empty() {
        return;
    }
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "reference"
                    && let Value::String(reference) = child
                {
                    if let Some(target) = rewrites.get(reference.as_str()) {
                        *reference = target.clone();
                    }
                    continue;
                }
                rewrite_references(child, rewrites);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite_references(item, rewrites)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::ReadAudit;
    use crate::store::tests::temp_store;

    fn ctx() -> AccessContext {
        AccessContext::new("t", "bundle-test", "local", "r")
    }

    #[test]
    fn request_urls_may_be_absolute() {
        assert_eq!(split_request_url("Patient"), ("Patient".into(), None));
        assert_eq!(
            split_request_url("/Patient/1"),
            ("Patient".into(), Some("1".into()))
        );
        assert_eq!(
            split_request_url("http://example.org/fhir/Patient/1"),
            ("Patient".into(), Some("1".into()))
        );
        assert_eq!(
            split_request_url("https://h/Observation"),
            ("Observation".into(), None)
        );
    }

    #[test]
    fn transaction_rewrites_urn_uuid_references() {
        let (_dir, store) = temp_store(ReadAudit::Durable);
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:obs", "resource": {"resourceType": "Observation", "status": "final",
                "code": {"text": "x"}, "subject": {"reference": "urn:uuid:pat"}},
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "urn:uuid:pat", "resource": {"resourceType": "Patient"},
             "request": {"method": "POST", "url": "Patient"}},
        ]});
        let written = apply_transaction(&store, &ctx(), &bundle).unwrap();
        assert_eq!(written.len(), 2);
        let obs_id = written[0].split('/').nth(1).unwrap();
        let pat_id = written[1].split('/').nth(1).unwrap();
        let obs = store
            .read(&ctx(), "Observation", obs_id)
            .unwrap()
            .to_json()
            .unwrap();
        assert_eq!(obs["subject"]["reference"], format!("Patient/{pat_id}"));
    }

    #[test]
    fn failed_transaction_writes_nothing_but_batch_keeps_good_entries() {
        let (_dir, store) = temp_store(ReadAudit::Durable);
        let entries = json!([
            {"resource": {"resourceType": "Patient", "id": "ok"}, "request": {"method": "PUT", "url": "Patient/ok"}},
            {"resource": {"resourceType": "Nope"}, "request": {"method": "POST", "url": "Nope"}},
        ]);
        let transaction =
            json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        assert!(apply_transaction(&store, &ctx(), &transaction).is_err());
        assert!(matches!(
            store.read(&ctx(), "Patient", "ok"),
            Err(Error::NotFound)
        ));
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        let outcomes = apply_batch(&store, &ctx(), &batch).unwrap();
        assert!(outcomes[0].result.is_ok());
        assert_eq!(
            outcomes[1].result.as_ref().unwrap_err().kind_name(),
            "unknown-resource-type"
        );
        assert_eq!(store.read(&ctx(), "Patient", "ok").unwrap().version, 1);
    }
}
