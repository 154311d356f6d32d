//! FHIR `patch` with JSON Patch (RFC 6902): the six operations over a resource's JSON, the
//! patch interaction (plain and conditional) as one write transaction, and PATCH entries of
//! batch/transaction Bundles (a `Binary` holding the JSON Patch, or a `Parameters` FHIRPath
//! Patch) turned into version-checked updates before the Bundle is processed. FHIRPath Patch
//! itself is [`crate::fhirpath_patch`]; every function here takes either kind of patch.
//!
//! Error messages name the operation's index and kind, never paths' values or the resource's
//! content (they reach OperationOutcomes and logs).

use fhirkeep_engine::store::{AccessContext, UpdateOutcome};
use serde_json::{Map, Value, json};

use crate::bundle::BundleReturn;
use crate::database::Database;
use crate::{Error, Result};

fn unprocessable(message: impl Into<String>) -> Error {
    Error::Unprocessable(message.into())
}

/// The reference tokens of a JSON Pointer (RFC 6901); `""` is the whole document.
fn pointer_tokens(pointer: &str, op: usize) -> Result<Vec<String>> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(unprocessable(format!(
            "patch operation {op}: a path must be empty or start with '/'"
        )));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// An array index token: digits without leading zeros (`-` is handled by the caller).
fn array_index(token: &str, op: usize) -> Result<usize> {
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    if !valid {
        return Err(unprocessable(format!(
            "patch operation {op}: an array index in the path is not a number"
        )));
    }
    token
        .parse()
        .map_err(|_| unprocessable(format!("patch operation {op}: array index out of range")))
}

fn missing(op: usize) -> Error {
    unprocessable(format!(
        "patch operation {op}: the path names no element of the resource"
    ))
}

/// The value at `tokens`.
fn get<'a>(doc: &'a Value, tokens: &[String], op: usize) -> Result<&'a Value> {
    let mut at = doc;
    for token in tokens {
        at = match at {
            Value::Object(map) => map.get(token).ok_or_else(|| missing(op))?,
            Value::Array(items) => items
                .get(array_index(token, op)?)
                .ok_or_else(|| missing(op))?,
            _ => return Err(missing(op)),
        };
    }
    Ok(at)
}

/// The container of the last token, and that token.
fn parent_mut<'a>(
    doc: &'a mut Value,
    tokens: &'a [String],
    op: usize,
) -> Result<(&'a mut Value, &'a str)> {
    let Some((last, parents)) = tokens.split_last() else {
        return Err(unprocessable(format!(
            "patch operation {op}: the whole resource cannot be the target"
        )));
    };
    let mut at = doc;
    for token in parents {
        at = match at {
            Value::Object(map) => map.get_mut(token).ok_or_else(|| missing(op))?,
            Value::Array(items) => {
                let index = array_index(token, op)?;
                items.get_mut(index).ok_or_else(|| missing(op))?
            }
            _ => return Err(missing(op)),
        };
    }
    Ok((at, last.as_str()))
}

fn add(doc: &mut Value, tokens: &[String], value: Value, op: usize) -> Result<()> {
    let (parent, last) = parent_mut(doc, tokens, op)?;
    match parent {
        Value::Object(map) => {
            map.insert(last.to_owned(), value);
            Ok(())
        }
        Value::Array(items) => {
            let index = if last == "-" {
                items.len()
            } else {
                array_index(last, op)?
            };
            if index > items.len() {
                return Err(missing(op));
            }
            items.insert(index, value);
            Ok(())
        }
        _ => Err(missing(op)),
    }
}

fn remove(doc: &mut Value, tokens: &[String], op: usize) -> Result<Value> {
    let (parent, last) = parent_mut(doc, tokens, op)?;
    match parent {
        Value::Object(map) => map.shift_remove(last).ok_or_else(|| missing(op)),
        Value::Array(items) => {
            let index = array_index(last, op)?;
            if index >= items.len() {
                return Err(missing(op));
            }
            Ok(items.remove(index))
        }
        _ => Err(missing(op)),
    }
}

/// Applies a JSON Patch document (an array of operations) to `resource`, all or nothing.
/// A failed `test`, a path naming nothing or a malformed operation is
/// [`Error::Unprocessable`] (422).
pub fn apply_json_patch(resource: &Value, patch: &Value) -> Result<Value> {
    let Some(operations) = patch.as_array() else {
        return Err(unprocessable("a JSON Patch must be an array of operations"));
    };
    let mut doc = resource.clone();
    for (op, operation) in operations.iter().enumerate() {
        let Some(fields) = operation.as_object() else {
            return Err(unprocessable(format!(
                "patch operation {op} is not an object"
            )));
        };
        let text = |name: &str| -> Result<&str> {
            fields.get(name).and_then(Value::as_str).ok_or_else(|| {
                unprocessable(format!("patch operation {op} needs a string '{name}'"))
            })
        };
        let value = || -> Result<Value> {
            fields
                .get("value")
                .cloned()
                .ok_or_else(|| unprocessable(format!("patch operation {op} needs a 'value'")))
        };
        let path = pointer_tokens(text("path")?, op)?;
        match text("op")? {
            "add" => add(&mut doc, &path, value()?, op)?,
            "remove" => {
                remove(&mut doc, &path, op)?;
            }
            "replace" => {
                // The target must exist before it is replaced.
                get(&doc, &path, op)?;
                remove(&mut doc, &path, op)?;
                add(&mut doc, &path, value()?, op)?;
            }
            "move" => {
                let from = pointer_tokens(text("from")?, op)?;
                if path.len() > from.len() && path[..from.len()] == from[..] {
                    return Err(unprocessable(format!(
                        "patch operation {op}: an element cannot move into itself"
                    )));
                }
                let moved = remove(&mut doc, &from, op)?;
                add(&mut doc, &path, moved, op)?;
            }
            "copy" => {
                let from = pointer_tokens(text("from")?, op)?;
                let copied = get(&doc, &from, op)?.clone();
                add(&mut doc, &path, copied, op)?;
            }
            "test" => {
                if *get(&doc, &path, op)? != value()? {
                    return Err(unprocessable(format!("patch operation {op}: test failed")));
                }
            }
            _ => {
                return Err(unprocessable(format!(
                    "patch operation {op}: op must be add, remove, replace, move, copy or test"
                )));
            }
        }
    }
    Ok(doc)
}

/// Applies `patch` (a JSON Patch array, or a FHIRPath Patch `Parameters` resource) to
/// `resource` and checks that the result is still a valid resource of the
/// same type and id (422 otherwise: the patch, not the request, is at fault). Validity is
/// [`crate::validate`]'s: errors the patch adds refuse it, errors already there do not.
pub fn patched_resource(resource: &Value, patch: &Value) -> Result<Value> {
    let patched = if crate::fhirpath_patch::is_fhirpath_patch(patch) {
        crate::fhirpath_patch::apply_fhirpath_patch(resource, patch)?
    } else {
        apply_json_patch(resource, patch)?
    };
    if !patched.is_object() {
        return Err(unprocessable("the patched result is not a JSON object"));
    }
    if patched.get("resourceType") != resource.get("resourceType") {
        return Err(unprocessable("a patch must not change the resourceType"));
    }
    if patched.get("id") != resource.get("id") {
        return Err(unprocessable("a patch must not change the id"));
    }
    // The result must be a valid resource: errors the patch introduces (not those the
    // stored version already had) refuse it.
    let before = crate::validate::validate_resource(resource);
    if let Some(issue) = crate::validate::validate_resource(&patched)
        .into_iter()
        .find(|issue| issue.severity == "error" && !before.contains(issue))
    {
        return Err(unprocessable(format!(
            "the patched resource is not valid: {} ({})",
            issue.message, issue.path
        )));
    }
    Ok(patched)
}

/// A failed write of a patched resource: the engine's refusal of an invalid resource is the
/// patch's fault (422), not the request's.
fn patch_write_error(error: Error) -> Error {
    match error {
        Error::Engine(fhirkeep_engine::Error::InvalidResource(why)) => {
            unprocessable(format!("the patched resource is not valid: {why}"))
        }
        other => other,
    }
}

impl Database {
    /// `PATCH Type/id` with a JSON Patch: reads the current version, applies the patch and
    /// writes the result in one write transaction. With `expected_version` (`If-Match`) the
    /// current version must be that one (412 otherwise).
    pub fn patch(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        id: &str,
        patch: &Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        self.write(ctx, |txn| {
            let current = txn.read(resource_type, id)?;
            if let Some(expected) = expected_version
                && expected != current.version
            {
                return Err(Error::Engine(fhirkeep_engine::Error::VersionConflict {
                    expected,
                    current: current.version,
                }));
            }
            let patched = patched_resource(&current.to_json()?, patch)?;
            txn.update(resource_type, id, patched, Some(current.version))
                .map_err(|e| patch_write_error(e.into()))
        })
    }

    /// `PATCH Type?condition`: patches the one match; no match is 404, several are
    /// [`Error::MultipleMatches`].
    pub fn conditional_patch(
        &self,
        ctx: &AccessContext,
        resource_type: &str,
        condition: &str,
        patch: &Value,
        expected_version: Option<u64>,
    ) -> Result<UpdateOutcome> {
        let id = self.single_match(resource_type, condition)?;
        self.patch(ctx, resource_type, &id, patch, expected_version)
    }

    /// The id of the one resource `condition` matches.
    pub fn single_match(&self, resource_type: &str, condition: &str) -> Result<String> {
        match self.condition_matches(resource_type, condition)?.as_slice() {
            [] => Err(Error::Engine(fhirkeep_engine::Error::NotFound)),
            [key] => Ok(key
                .split_once('/')
                .map_or(key.as_str(), |(_, id)| id)
                .to_owned()),
            many => Err(Error::MultipleMatches(many.len())),
        }
    }

    /// [`Database::process_bundle`] for Bundles that may hold PATCH entries: a transaction's
    /// PATCH entries are expanded first ([`Database::expand_patch_entries`]; one that fails
    /// fails the transaction), a batch's one by one, and a batch entry that cannot be
    /// patched answers with its own error (422, 404, 412, ...) in its place of the
    /// `batch-response` while the other entries are processed.
    pub fn process_bundle_with_patches(
        &self,
        ctx: &AccessContext,
        mut bundle: Value,
        base: &str,
        returning: BundleReturn,
    ) -> Result<Value> {
        let is_batch = bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            && bundle.get("type").and_then(Value::as_str) == Some("batch");
        let has_patch = bundle
            .get("entry")
            .and_then(Value::as_array)
            .is_some_and(|entries| entries.iter().any(is_patch_entry));
        if !has_patch {
            return self.process_bundle_returning(ctx, bundle, base, returning);
        }
        if !is_batch {
            let expanded = self.expand_patch_entries(ctx, &bundle)?;
            return self.process_bundle_returning(ctx, expanded, base, returning);
        }
        let mut failed: Vec<(usize, Error)> = Vec::new();
        if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
            let mut kept = Vec::with_capacity(entries.len());
            for (index, entry) in entries.drain(..).enumerate() {
                if !is_patch_entry(&entry) {
                    kept.push(entry);
                    continue;
                }
                match self.expand_patch_entry(ctx, &entry) {
                    Ok(expanded) => kept.push(expanded),
                    Err(error) => failed.push((index, error)),
                }
            }
            *entries = kept;
        }
        let mut response = self.process_bundle_returning(ctx, bundle, base, returning)?;
        if let Some(entries) = response.get_mut("entry").and_then(Value::as_array_mut) {
            // Ascending indexes: each insertion puts a failure back at its request position.
            for (index, error) in failed {
                let status = error.http_status();
                let entry = json!({"response": {
                    "status": format!("{status} {}", crate::bundle::reason_phrase(status)),
                    "outcome": error.operation_outcome(),
                }});
                entries.insert(index.min(entries.len()), entry);
            }
        }
        Ok(response)
    }

    /// Turns the PATCH entries of a batch or transaction Bundle into PUT entries: the
    /// `Binary` resource's base64 JSON Patch (or the `Parameters` resource's FHIRPath Patch)
    /// applied to the current version, the update guarded by `ifMatch` with the version the
    /// patch was applied to (so a concurrent write makes it fail with 412 rather than be
    /// overwritten). Any entry that cannot be turned into an update fails the whole request,
    /// with the entry's index in the message; other entries are left as they are.
    pub fn expand_patch_entries(&self, ctx: &AccessContext, bundle: &Value) -> Result<Value> {
        let mut bundle = bundle.clone();
        let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) else {
            return Ok(bundle);
        };
        for (index, entry) in entries.iter_mut().enumerate() {
            if !is_patch_entry(entry) {
                continue;
            }
            let replacement = self.expand_patch_entry(ctx, entry).map_err(|e| match e {
                Error::Unprocessable(why) => Error::Unprocessable(format!("entry {index}: {why}")),
                other => other,
            })?;
            *entry = replacement;
        }
        Ok(bundle)
    }

    fn expand_patch_entry(&self, ctx: &AccessContext, entry: &Value) -> Result<Value> {
        let patch = patch_of_entry(entry)?;
        let url = entry
            .pointer("/request/url")
            .and_then(Value::as_str)
            .ok_or_else(|| unprocessable("a PATCH entry needs request.url"))?;
        let (path, query) = match url.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (url, None),
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (resource_type, id) = match (segments.as_slice(), query) {
            ([t, id], None) => ((*t).to_owned(), (*id).to_owned()),
            ([t], Some(query)) => ((*t).to_owned(), self.single_match(t, query)?),
            _ => {
                return Err(unprocessable(
                    "a PATCH entry's url must be Type/id or Type?condition",
                ));
            }
        };
        fhirkeep_engine::resource::check_resource_type(&resource_type)?;
        let current = self.store().read(ctx, &resource_type, &id)?;
        if let Some(expected) = entry
            .pointer("/request/ifMatch")
            .and_then(Value::as_str)
            .and_then(crate::bundle::parse_etag)
            && expected != current.version
        {
            return Err(Error::Engine(fhirkeep_engine::Error::VersionConflict {
                expected,
                current: current.version,
            }));
        }
        let patched = patched_resource(&current.to_json()?, &patch)?;
        let mut request = Map::new();
        request.insert("method".into(), json!("PUT"));
        request.insert("url".into(), json!(format!("{resource_type}/{id}")));
        request.insert(
            "ifMatch".into(),
            json!(format!("W/\"{}\"", current.version)),
        );
        let mut replacement = Map::new();
        if let Some(full_url) = entry.get("fullUrl") {
            replacement.insert("fullUrl".into(), full_url.clone());
        }
        replacement.insert("resource".into(), patched);
        replacement.insert("request".into(), Value::Object(request));
        Ok(Value::Object(replacement))
    }
}

fn is_patch_entry(entry: &Value) -> bool {
    entry
        .pointer("/request/method")
        .and_then(Value::as_str)
        .is_some_and(|m| m.eq_ignore_ascii_case("PATCH"))
}

/// The patch of a Bundle PATCH entry: a `Binary` with a JSON Patch content type and the
/// patch in base64 `data`, or a `Parameters` resource (a FHIRPath Patch) as it is.
fn patch_of_entry(entry: &Value) -> Result<Value> {
    let resource = entry
        .get("resource")
        .ok_or_else(|| unprocessable("a PATCH entry needs a resource (a Binary JSON Patch)"))?;
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("Binary") => {}
        Some("Parameters") => return Ok(resource.clone()),
        _ => {
            return Err(unprocessable(
                "a PATCH entry's resource must be a Binary holding a JSON Patch or a \
                 Parameters resource holding a FHIRPath Patch",
            ));
        }
    }
    let content_type = resource
        .get("contentType")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !is_json_patch_type(content_type) {
        return Err(unprocessable(
            "the Binary of a PATCH entry must have contentType application/json-patch+json",
        ));
    }
    let data = resource
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| unprocessable("the Binary of a PATCH entry has no data"))?;
    let bytes =
        decode_base64(data).ok_or_else(|| unprocessable("the Binary's data is not base64"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| unprocessable("the Binary's data is not a JSON Patch document"))
}

/// Whether a media type is JSON Patch's (`application/json-patch+json`, parameters allowed).
pub fn is_json_patch_type(media_type: &str) -> bool {
    media_type
        .split(';')
        .next()
        .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json-patch+json"))
}

/// Standard base64 (RFC 4648, padding optional, whitespace ignored). Written out because the
/// query crate has no base64 dependency outside its tests and this is its only use.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn sextet(b: u8) -> Option<u32> {
        match b {
            b'A'..=b'Z' => Some(u32::from(b - b'A')),
            b'a'..=b'z' => Some(u32::from(b - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(b - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let symbols: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed = symbols
        .strip_suffix(b"==")
        .or_else(|| symbols.strip_suffix(b"="));
    let symbols = trimmed.unwrap_or(&symbols);
    if symbols.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(symbols.len() * 3 / 4);
    for chunk in symbols.chunks(4) {
        let mut acc = 0u32;
        for &b in chunk {
            acc = (acc << 6) | sextet(b)?;
        }
        // `acc` holds chunk.len() * 6 bits; its whole bytes, high first, are the output.
        let bits = 6 * chunk.len();
        for k in 1..chunk.len() {
            out.push(u8::try_from((acc >> (bits - 8 * k)) & 0xff).ok()?);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_six_operations() {
        let doc = json!({"resourceType": "Patient", "id": "a", "name": [{"family": "X"}]});
        let patch = json!([
            {"op": "add", "path": "/name/0/given", "value": ["Ann"]},
            {"op": "replace", "path": "/name/0/family", "value": "Y"},
            {"op": "copy", "from": "/name/0", "path": "/name/-"},
            {"op": "move", "from": "/name/1/family", "path": "/name/1/text"},
            {"op": "test", "path": "/name/1/text", "value": "Y"},
            {"op": "remove", "path": "/name/0/given"},
            {"op": "add", "path": "/active", "value": true},
        ]);
        let out = apply_json_patch(&doc, &patch).unwrap();
        assert_eq!(
            out,
            json!({"resourceType": "Patient", "id": "a", "active": true,
                   "name": [{"family": "Y"}, {"given": ["Ann"], "text": "Y"}]})
        );
    }

    #[test]
    fn failures_are_unprocessable_and_name_no_values() {
        let doc = json!({"resourceType": "Patient", "id": "a", "gender": "female"});
        for patch in [
            json!([{"op": "test", "path": "/gender", "value": "male"}]),
            json!([{"op": "remove", "path": "/birthDate"}]),
            json!([{"op": "replace", "path": "/name/0", "value": 1}]),
            json!([{"op": "frobnicate", "path": "/gender"}]),
            json!([{"op": "add", "path": "gender", "value": "x"}]),
            json!({"op": "add"}),
        ] {
            let err = apply_json_patch(&doc, &patch).unwrap_err();
            assert_eq!(err.http_status(), 422, "{patch}");
            assert!(!err.to_string().contains("female"));
        }
        let err = patched_resource(
            &doc,
            &json!([{"op": "replace", "path": "/id", "value": "b"}]),
        )
        .unwrap_err();
        assert_eq!(err.http_status(), 422);
    }

    #[test]
    fn only_errors_the_patch_adds_refuse_it() {
        let stored = json!({"resourceType": "Patient", "id": "a", "legacyField": 1});
        let add = json!([{"op": "add", "path": "/active", "value": true}]);
        assert_eq!(patched_resource(&stored, &add).unwrap()["active"], true);
        let bad = json!([{"op": "add", "path": "/active", "value": "yes"}]);
        let err = patched_resource(&stored, &bad).unwrap_err();
        assert_eq!(err.http_status(), 422);
        assert!(err.to_string().contains("Patient.active"), "{err}");
    }

    #[test]
    fn base64_round_trip() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert!(decode_base64("a$==").is_none());
    }
}
