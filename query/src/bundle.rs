//! FHIR `batch` and `transaction` Bundles with everything the query layer adds to the
//! engine's writes: conditional create (`ifNoneExist`), conditional update and delete
//! (`Type?query` URLs), conditional references, `urn:uuid:` full URLs, `ifMatch`, and GET
//! entries (reads and searches), answered as a `batch-response` / `transaction-response`.
//!
//! A transaction resolves every condition, assigns every id and rewrites every reference
//! before it writes; then it writes DELETEs, POSTs and PUTs in one store transaction (FHIR's
//! order) and answers GETs after the commit. Anything that fails fails the whole transaction,
//! and nothing is written. A batch runs each entry on its own.

use std::collections::{HashMap, HashSet};

use fhirkeep_engine::resource::{is_resource_type, new_server_id};
use fhirkeep_engine::store::{AccessContext, StoredResource, UpdateOutcome, Upsert, WriteTxn};
use serde_json::{Value, json};

use crate::database::Database;
use crate::params::{Handling, parse_search_url};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
    Get,
}

/// One parsed entry.
#[derive(Debug, Clone)]
struct Entry {
    index: usize,
    method: Method,
    resource_type: String,
    /// `Type/id` URLs.
    id: Option<String>,
    /// `_history/vid` of a GET.
    version: Option<u64>,
    /// `Type?query` URLs (conditional PUT/DELETE, GET searches).
    query: Option<String>,
    resource: Option<Value>,
    full_url: Option<String>,
    if_none_exist: Option<String>,
    if_match: Option<u64>,
}

/// What was decided for a write entry before writing.
#[derive(Debug, Clone)]
enum Plan {
    /// Write `resource` as `Type/id` (create when `create_only`).
    Write { id: String, create_only: bool },
    /// Delete `Type/id`.
    Delete { id: String },
    /// Nothing to write: the condition matched an existing resource (POST with
    /// ifNoneExist) or nothing (conditional DELETE).
    Nothing { existing: Option<String> },
    /// A GET, answered after the writes.
    Read,
}

/// The result of one entry, before it becomes a response entry.
#[derive(Debug)]
enum Done {
    Created(StoredResource),
    Updated(StoredResource),
    Deleted,
    Unchanged(StoredResource),
    NothingToDelete,
    Body(Value),
}

/// What the response entry of a written resource carries besides its `response` (status,
/// location, ETag, last modified): HTTP's `Prefer: return=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleReturn {
    /// The resource as stored (the default).
    #[default]
    Representation,
    /// No resource: what bulk loaders ask for, saving the server a serialization and the
    /// client a parse per resource.
    Minimal,
}

impl Database {
    /// Processes a `batch` or `transaction` Bundle and returns the response Bundle, with the
    /// stored resources in the response entries ([`BundleReturn::Representation`]).
    pub fn process_bundle(&self, ctx: &AccessContext, bundle: &Value, base: &str) -> Result<Value> {
        self.process_bundle_returning(ctx, bundle.clone(), base, BundleReturn::Representation)
    }

    /// Processes a `batch` or `transaction` Bundle and returns the response Bundle.
    /// `base` is the server's base URL (for `fullUrl`s and search links); `returning` says
    /// whether written resources are repeated in the response. The Bundle is taken by value
    /// so that its resources are moved into the store rather than copied.
    ///
    /// A transaction that fails returns the error (nothing was written); a batch always
    /// answers, with an OperationOutcome and a status per failed entry.
    pub fn process_bundle_returning(
        &self,
        ctx: &AccessContext,
        mut bundle: Value,
        base: &str,
        returning: BundleReturn,
    ) -> Result<Value> {
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(Error::Unprocessable("the body is not a Bundle".into()));
        }
        let raw = match bundle.get_mut("entry").map(Value::take) {
            None => Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(Error::Unprocessable("Bundle.entry must be an array".into())),
        };
        match bundle.get("type").and_then(Value::as_str) {
            Some("transaction") => self.transaction(ctx, raw, base, returning),
            Some("batch") => self.batch(ctx, raw, base, returning),
            _ => Err(Error::Unprocessable(
                "only batch and transaction Bundles can be processed".into(),
            )),
        }
    }

    fn transaction(
        &self,
        ctx: &AccessContext,
        raw: Vec<Value>,
        base: &str,
        returning: BundleReturn,
    ) -> Result<Value> {
        let mut entries = raw
            .into_iter()
            .enumerate()
            .map(|(index, entry)| parse_entry(index, entry))
            .collect::<Result<Vec<_>>>()?;
        let in_flight = self.enter_in_flight()?;
        let guard = self.lock_writes()?;
        let mut plans = Vec::with_capacity(entries.len());
        let mut rewrites: HashMap<String, String> = HashMap::new();
        for entry in &entries {
            let plan = self.plan(entry)?;
            if let Some(full_url) = &entry.full_url {
                let target = match &plan {
                    Plan::Write { id, .. } => Some(format!("{}/{id}", entry.resource_type)),
                    Plan::Nothing {
                        existing: Some(key),
                    } => Some(key.clone()),
                    _ => None,
                };
                if let Some(target) = target
                    && (full_url.starts_with("urn:uuid:") || full_url.starts_with("urn:oid:"))
                {
                    rewrites.insert(full_url.clone(), target);
                }
            }
            plans.push(plan);
        }
        // One entry per resource: two writes to one resource in a transaction are ambiguous.
        let mut targets = HashSet::new();
        for (entry, plan) in entries.iter().zip(&plans) {
            if let Plan::Write { id, .. } | Plan::Delete { id } = plan
                && !targets.insert(format!("{}/{id}", entry.resource_type))
            {
                return Err(Error::Unprocessable(format!(
                    "entry {}: another entry of the transaction writes the same resource",
                    entry.index
                )));
            }
        }
        for entry in &mut entries {
            if let Some(resource) = entry.resource.as_mut() {
                self.rewrite_references(resource, &rewrites)?;
            }
        }
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].method);
        let mut done: Vec<Option<Done>> = (0..entries.len()).map(|_| None).collect();
        let write_order: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| entries[i].method != Method::Get)
            .collect();
        let mut written = None;
        if !write_order.is_empty() {
            let ((), ticket) = self.commit_locked_deferred(ctx, |txn| {
                let mut next = 0;
                while next < write_order.len() {
                    // Consecutive writes go through `update_many` together: the engine
                    // prepares them on its helper threads while it inserts.
                    let run = write_order[next..]
                        .iter()
                        .take_while(|&&i| matches!(plans[i], Plan::Write { .. }))
                        .count();
                    if run >= 2 {
                        let run = &write_order[next..next + run];
                        apply_writes(txn, &mut entries, &plans, run, &mut done)?;
                        next += run.len();
                    } else {
                        let i = write_order[next];
                        done[i] = Some(apply(txn, &mut entries[i], &plans[i])?);
                        next += 1;
                    }
                }
                Ok(())
            })?;
            written = Some(ticket);
        }
        // The next write starts while this one waits for the disk (Bundles committed
        // meanwhile share the sync) and indexes.
        drop(guard);
        in_flight.leave();
        if let Some(ticket) = written {
            self.sync_shared(ticket)?;
            self.hand_off(done.iter().filter_map(|done| match done {
                Some(Done::Created(stored) | Done::Updated(stored)) => Some(stored),
                _ => None,
            }))?;
            self.index_after_write(ticket.seq())?;
        }
        for &i in order.iter().filter(|&&i| entries[i].method == Method::Get) {
            done[i] = Some(self.get(ctx, &entries[i], base)?);
        }
        let response_entries: Vec<Value> = entries
            .iter()
            .zip(done)
            .map(|(entry, done)| match done {
                Some(done) => response_entry(entry, done, base, returning),
                None => json!({"response": {"status": "500 Internal Server Error"}}),
            })
            .collect();
        Ok(json!({
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": response_entries,
        }))
    }

    fn batch(
        &self,
        ctx: &AccessContext,
        raw: Vec<Value>,
        base: &str,
        returning: BundleReturn,
    ) -> Result<Value> {
        let mut response_entries = Vec::with_capacity(raw.len());
        let mut last_ticket = None;
        for (index, raw_entry) in raw.into_iter().enumerate() {
            let outcome = (|| -> Result<(Entry, Done)> {
                let mut entry = parse_entry(index, raw_entry)?;
                if entry.method == Method::Get {
                    // A search sees durable changes only: make the entries before it durable,
                    // so that it sees them as a batch processed in order should.
                    if let Some(ticket) = last_ticket {
                        self.store().wait_durable(ticket)?;
                    }
                    let done = self.get(ctx, &entry, base)?;
                    return Ok((entry, done));
                }
                let guard = self.lock_writes()?;
                let plan = self.plan(&entry)?;
                if let Some(resource) = entry.resource.as_mut() {
                    self.rewrite_references(resource, &HashMap::new())?;
                }
                let (done, ticket) =
                    self.commit_locked_deferred(ctx, |txn| apply(txn, &mut entry, &plan))?;
                drop(guard);
                last_ticket = Some(ticket);
                Ok((entry, done))
            })();
            response_entries.push(match outcome {
                Ok((entry, done)) => response_entry(&entry, done, base, returning),
                Err(error) => error_entry(&error),
            });
        }
        // Each entry committed on its own; one sync makes them all durable before the answer
        // (a sync covers every commit before it), and the index catches up once.
        // Nothing written by this batch is reported as done unless it is durable.
        if let Some(ticket) = last_ticket {
            self.store().wait_durable(ticket)?;
            self.index_after_write(ticket.seq())?;
        }
        Ok(json!({
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": response_entries,
        }))
    }

    /// Decides what a write entry will do, resolving its condition (under the write lock).
    fn plan(&self, entry: &Entry) -> Result<Plan> {
        let keyed_id = |key: &str| key.split_once('/').map_or(key, |(_, id)| id).to_string();
        Ok(match entry.method {
            Method::Get => Plan::Read,
            Method::Post => match &entry.if_none_exist {
                Some(condition) => match self
                    .condition_matches(&entry.resource_type, condition)?
                    .as_slice()
                {
                    [] => Plan::Write {
                        id: new_server_id(),
                        create_only: true,
                    },
                    [key] => Plan::Nothing {
                        existing: Some(key.clone()),
                    },
                    many => return Err(Error::MultipleMatches(many.len())),
                },
                None => Plan::Write {
                    id: new_server_id(),
                    create_only: true,
                },
            },
            Method::Put => match (&entry.id, &entry.query) {
                (Some(id), _) => Plan::Write {
                    id: id.clone(),
                    create_only: false,
                },
                (None, Some(query)) => match self
                    .condition_matches(&entry.resource_type, query)?
                    .as_slice()
                {
                    [] => Plan::Write {
                        id: entry
                            .resource
                            .as_ref()
                            .and_then(|r| r.get("id"))
                            .and_then(Value::as_str)
                            .map_or_else(new_server_id, String::from),
                        create_only: true,
                    },
                    [key] => Plan::Write {
                        id: keyed_id(key),
                        create_only: false,
                    },
                    many => return Err(Error::MultipleMatches(many.len())),
                },
                (None, None) => {
                    return Err(Error::Unprocessable(format!(
                        "entry {}: PUT needs Type/id or Type?condition",
                        entry.index
                    )));
                }
            },
            Method::Delete => match (&entry.id, &entry.query) {
                (Some(id), _) => Plan::Delete { id: id.clone() },
                (None, Some(query)) => match self
                    .condition_matches(&entry.resource_type, query)?
                    .as_slice()
                {
                    [] => Plan::Nothing { existing: None },
                    [key] => Plan::Delete { id: keyed_id(key) },
                    many => return Err(Error::MultipleMatches(many.len())),
                },
                (None, None) => {
                    return Err(Error::Unprocessable(format!(
                        "entry {}: DELETE needs Type/id or Type?condition",
                        entry.index
                    )));
                }
            },
        })
    }

    /// Rewrites `urn:uuid:` references to assigned ids and resolves conditional references
    /// (`Patient?identifier=...`) to the one resource they match.
    fn rewrite_references(
        &self,
        value: &mut Value,
        rewrites: &HashMap<String, String>,
    ) -> Result<()> {
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    if key == "reference"
                        && let Value::String(reference) = child
                    {
                        if let Some(target) = rewrites.get(reference.as_str()) {
                            *reference = target.clone();
                        } else if let Some((resource_type, query)) = reference.split_once('?')
                            && is_resource_type(resource_type)
                        {
                            let matches = self.condition_matches(resource_type, query)?;
                            match matches.as_slice() {
                                [key] => *reference = key.clone(),
                                [] => {
                                    return Err(Error::Unprocessable(
                                        "a conditional reference matches no resource".into(),
                                    ));
                                }
                                many => return Err(Error::MultipleMatches(many.len())),
                            }
                        }
                        continue;
                    }
                    self.rewrite_references(child, rewrites)?;
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.rewrite_references(item, rewrites)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers a GET entry: read, vread or search.
    fn get(&self, ctx: &AccessContext, entry: &Entry, base: &str) -> Result<Done> {
        match (&entry.id, entry.version) {
            (Some(id), Some(version)) => Ok(Done::Body(
                self.store()
                    .vread(ctx, &entry.resource_type, id, version)?
                    .to_json()?,
            )),
            (Some(id), None) => Ok(Done::Body(
                self.store()
                    .read(ctx, &entry.resource_type, id)?
                    .to_json()?,
            )),
            (None, _) => {
                let url = match &entry.query {
                    Some(query) => format!("{}?{query}", entry.resource_type),
                    None => entry.resource_type.clone(),
                };
                let request = parse_search_url(&*self.registry()?, &url, Handling::Strict)?;
                Ok(Done::Body(self.search(ctx, &request)?.into_bundle(base)))
            }
        }
    }
}

/// The resource of a write entry with its id set, and the version the write insists on.
fn write_input(entry: &mut Entry, id: &str, create_only: bool) -> (Value, Option<u64>) {
    let mut resource = entry.resource.take().unwrap_or(Value::Null);
    if let Some(object) = resource.as_object_mut() {
        object.insert("id".into(), Value::String(id.to_owned()));
    }
    let expected = if create_only { Some(0) } else { entry.if_match };
    (resource, expected)
}

fn done_of_write(outcome: UpdateOutcome) -> Done {
    if outcome.resource.version == 1
        || outcome.resource.kind != fhirkeep_engine::store::VersionKind::Updated
    {
        Done::Created(outcome.resource)
    } else {
        Done::Updated(outcome.resource)
    }
}

/// Applies the write entries `run` (each planned as [`Plan::Write`]) in one `update_many`.
/// The first refused entry, in order, fails the transaction as [`apply`] would.
fn apply_writes(
    txn: &mut WriteTxn<'_>,
    entries: &mut [Entry],
    plans: &[Plan],
    run: &[usize],
    done: &mut [Option<Done>],
) -> Result<()> {
    let mut items = Vec::with_capacity(run.len());
    for &i in run {
        let Plan::Write { id, create_only } = &plans[i] else {
            return Err(Error::Internal(
                "a batch of writes holds another entry".into(),
            ));
        };
        let (resource, expected_version) = write_input(&mut entries[i], id, *create_only);
        items.push(Upsert {
            resource_type: entries[i].resource_type.clone(),
            id: Some(id.clone()),
            resource,
            expected_version,
        });
    }
    for (&i, outcome) in run.iter().zip(txn.update_many(items)?) {
        done[i] = Some(done_of_write(outcome?));
    }
    Ok(())
}

fn apply(txn: &mut WriteTxn<'_>, entry: &mut Entry, plan: &Plan) -> Result<Done> {
    Ok(match plan {
        Plan::Write { id, create_only } => {
            let (resource, expected) = write_input(entry, id, *create_only);
            done_of_write(txn.update(&entry.resource_type, id, resource, expected)?)
        }
        Plan::Delete { id } => {
            txn.delete(&entry.resource_type, id, entry.if_match)?;
            Done::Deleted
        }
        Plan::Nothing {
            existing: Some(key),
        } => {
            let (resource_type, id) = key.split_once('/').unwrap_or((key.as_str(), ""));
            Done::Unchanged(txn.read(resource_type, id)?)
        }
        Plan::Nothing { existing: None } => Done::NothingToDelete,
        Plan::Read => return Err(Error::Internal("a GET was planned as a write".into())),
    })
}

fn response_entry(entry: &Entry, done: Done, base: &str, returning: BundleReturn) -> Value {
    let written = |status: &str, stored: &StoredResource| {
        let location = format!(
            "{}/{}/_history/{}",
            stored.resource_type, stored.id, stored.version
        );
        let mut out = json!({
            "fullUrl": format!("{base}/{}/{}", stored.resource_type, stored.id),
            "response": {
                "status": status,
                "location": location,
                "etag": format!("W/\"{}\"", stored.version),
                "lastModified": stored.last_updated_text(),
            }
        });
        if returning == BundleReturn::Representation {
            out["resource"] = stored.to_json().unwrap_or(Value::Null);
        }
        out
    };
    match done {
        Done::Created(stored) => written("201 Created", &stored),
        Done::Updated(stored) => written("200 OK", &stored),
        Done::Unchanged(stored) => written("200 OK", &stored),
        Done::Deleted => json!({"response": {"status": "204 No Content"}}),
        Done::NothingToDelete => json!({"response": {"status": "204 No Content"}}),
        Done::Body(body) => {
            let mut out = json!({"resource": body, "response": {"status": "200 OK"}});
            if entry.id.is_some()
                && let Some(version) = out["resource"]["meta"]["versionId"]
                    .as_str()
                    .map(String::from)
            {
                out["response"]["etag"] = json!(format!("W/\"{version}\""));
            }
            out
        }
    }
}

/// A failed batch entry: its status and an OperationOutcome without internal detail.
fn error_entry(error: &Error) -> Value {
    let status = error.http_status();
    json!({
        "response": {
            "status": format!("{status} {}", reason_phrase(status)),
            "outcome": error.operation_outcome(),
        }
    })
}

/// The standard reason phrase of a status code.
pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    }
}

fn parse_entry(index: usize, mut entry: Value) -> Result<Entry> {
    let bad = |what: &str| Error::Unprocessable(format!("entry {index}: {what}"));
    let resource = entry.get_mut("resource").map(Value::take);
    let request = entry.get("request").ok_or_else(|| bad("no request"))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET" | "HEAD") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("PATCH") => return Err(bad("PATCH in bundles is not supported yet")),
        _ => return Err(bad("request.method must be GET, POST, PUT or DELETE")),
    };
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no request.url"))?;
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let path = strip_base(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| s.starts_with('$')) {
        return Err(bad("operations ($...) in bundles are not supported yet"));
    }
    let (resource_type, id, version) = match segments.as_slice() {
        [t] => (*t, None, None),
        [t, id] => (*t, Some((*id).to_string()), None),
        [t, id, "_history", v] => (
            *t,
            Some((*id).to_string()),
            Some(
                v.parse::<u64>()
                    .map_err(|_| bad("the version in the url is not a number"))?,
            ),
        ),
        _ => {
            return Err(bad(
                "request.url must be Type, Type/id, Type/id/_history/vid or Type?query",
            ));
        }
    };
    if !is_resource_type(resource_type) {
        return Err(bad("request.url does not name an R4 resource type"));
    }
    if matches!(method, Method::Post | Method::Put) {
        let body_type = resource
            .as_ref()
            .and_then(|r| r.get("resourceType"))
            .and_then(Value::as_str);
        if body_type != Some(resource_type) {
            return Err(bad("the resource type does not match request.url"));
        }
        if method == Method::Post && id.is_some() {
            return Err(bad("POST goes to Type, not Type/id"));
        }
    }
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(etag) => {
            Some(parse_etag(etag).ok_or_else(|| bad("ifMatch must be an ETag like W/\"3\""))?)
        }
        None => None,
    };
    Ok(Entry {
        index,
        method,
        resource_type: resource_type.to_string(),
        id,
        version,
        query,
        resource,
        full_url: entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(String::from),
        // The query part; some clients send `Type?query` or `?query` instead.
        if_none_exist: request
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(|s| s.split_once('?').map_or(s, |(_, query)| query).to_string()),
        if_match,
    })
}

/// `W/"3"` or `"3"` or `3` → 3.
pub fn parse_etag(etag: &str) -> Option<u64> {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// `http://server/fhir/Patient/1` → `Patient/1`.
fn strip_base(path: &str) -> &str {
    if !path.contains("://") {
        return path.trim_start_matches('/');
    }
    let segments: Vec<(usize, &str)> = path
        .match_indices('/')
        .map(|(i, _)| (i, &path[i + 1..]))
        .collect();
    for (i, rest) in segments {
        let head = rest.split('/').next().unwrap_or("");
        if is_resource_type(head) {
            return &path[i + 1..];
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_urls_parse() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("abc"), None);
        assert_eq!(strip_base("http://h/fhir/Patient/1"), "Patient/1");
        assert_eq!(strip_base("/Patient"), "Patient");
    }

    #[test]
    fn entries_are_checked() {
        let ok = json!({"request": {"method": "GET", "url": "Patient/1/_history/2"}});
        let entry = parse_entry(0, ok.clone()).unwrap();
        assert_eq!((entry.id.as_deref(), entry.version), (Some("1"), Some(2)));
        for condition in [
            "identifier=a|b",
            "?identifier=a|b",
            "Patient?identifier=a|b",
        ] {
            let post = json!({"request": {"method": "POST", "url": "Patient", "ifNoneExist": condition},
                              "resource": {"resourceType": "Patient"}});
            assert_eq!(
                parse_entry(0, post.clone())
                    .unwrap()
                    .if_none_exist
                    .as_deref(),
                Some("identifier=a|b")
            );
        }
        let operation = json!({"request": {"method": "POST", "url": "ValueSet/$lookup"},
                               "resource": {"resourceType": "Parameters"}});
        match parse_entry(0, operation.clone()) {
            Err(Error::Unprocessable(message)) => {
                assert!(message.contains("operations"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            json!({}),
            json!({"request": {"method": "PATCH", "url": "Patient/1"}}),
            json!({"request": {"method": "POST", "url": "Patient/1", "resource": {"resourceType": "Patient"}}}),
            json!({"request": {"method": "PUT", "url": "Nope/1"}, "resource": {"resourceType": "Nope"}}),
            json!({"request": {"method": "PUT", "url": "Patient/1"}, "resource": {"resourceType": "Observation"}}),
            json!({"request": {"method": "DELETE", "url": "Patient/1", "ifMatch": "x"}}),
        ] {
            assert!(
                matches!(parse_entry(0, bad.clone()), Err(Error::Unprocessable(_))),
                "{bad}"
            );
        }
    }
}
