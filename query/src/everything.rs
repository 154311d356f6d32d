//! `Patient/[id]/$everything`: the patient, every resource in its compartment (the R4
//! Patient CompartmentDefinition, through the same index terms compartment search uses), and
//! the resources those reference that belong to no patient (Practitioner, Organization,
//! Medication, Location, ...; one level), as one paged result.
//!
//! Paging uses server-side cursors like search does: a cursor names the last key of the
//! previous page, so pages stay stable while data changes and no id of patient data is put in
//! a `next` link. The whole operation reads its resources with one audit leaf per page
//! (action `Search`, a hash of the request).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use fhirkeep_engine::audit::AuditAction;
use fhirkeep_engine::resource::{is_resource_type, is_valid_id};
use fhirkeep_engine::store::{AccessContext, StoredResource};
use serde_json::Value;

use crate::compartment::patient_compartment;
use crate::database::Database;
use crate::params::{Handling, parse_search};
use crate::search::{EntryMode, EntryResource, SearchEntry, SearchResult};
use crate::{Error, Result};

/// The parameters of one `$everything` request.
#[derive(Debug, Clone, Default)]
pub struct EverythingRequest {
    /// The patient's id.
    pub patient: String,
    /// `_since`: only resources last updated at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// `_type`: only these resource types (empty: all).
    pub types: Vec<String>,
    /// `start`: only clinical records whose `date` search parameter reaches this date or
    /// later (records without a clinical date are kept).
    pub start: Option<String>,
    /// `end`: only clinical records whose `date` reaches this date or earlier.
    pub end: Option<String>,
    /// `_count`: the page size (capped by the database's limits).
    pub count: Option<usize>,
    /// `_cursor` of a `next` link.
    pub cursor: Option<String>,
}

impl EverythingRequest {
    /// The request's parameters in canonical form (for links; `_cursor` excluded).
    fn canonical_query(&self, count: usize) -> String {
        let mut parts = vec![format!("_count={count}")];
        if let Some(since) = &self.since {
            parts.push(format!(
                "_since={}",
                since.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            ));
        }
        if !self.types.is_empty() {
            parts.push(format!("_type={}", self.types.join(",")));
        }
        if let Some(end) = &self.end {
            parts.push(format!("end={end}"));
        }
        if let Some(start) = &self.start {
            parts.push(format!("start={start}"));
        }
        parts.join("&")
    }

    /// A hash of the request, for the audit leaf and to bind cursors to their request.
    fn digest(&self, count: usize) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("fhirkeep $everything v1");
        hasher.update(self.patient.as_bytes());
        hasher.update(&[0]);
        hasher.update(self.canonical_query(count).as_bytes());
        *hasher.finalize().as_bytes()
    }
}

const CURSOR_TTL: Duration = Duration::from_secs(3600);
const MAX_CURSORS: usize = 10_000;

/// Cursor token → (created, request digest, the last key of the previous page).
type Cursors = HashMap<String, (Instant, [u8; 32], (u8, String))>;

fn cursors() -> Result<std::sync::MutexGuard<'static, Cursors>> {
    static CURSORS: OnceLock<Mutex<Cursors>> = OnceLock::new();
    CURSORS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| Error::Internal("$everything cursor table lock poisoned".into()))
}

/// The order of an `$everything` result: the patient first, then by `Type/id`.
fn rank(patient: &str, key: &str) -> (u8, String) {
    let first = key.strip_prefix("Patient/").is_some_and(|id| id == patient);
    (u8::from(!first), key.to_owned())
}

/// The `Type/id` references in `value` (relative references only: absolute URLs point
/// outside this server, `#contained` ones inside the resource).
fn collect_references(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("reference") {
                let path = reference.split(['?', '#']).next().unwrap_or("");
                let mut parts = path.split('/');
                if let (Some(t), Some(id), None) = (parts.next(), parts.next(), parts.next())
                    && is_resource_type(t)
                    && is_valid_id(id)
                {
                    out.insert(format!("{t}/{id}"));
                }
            }
            for child in map.values() {
                collect_references(child, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_references(item, out);
            }
        }
        _ => {}
    }
}

fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

impl Database {
    /// Which of `keys` (the compartment's) are outside the care dates `start`..`end`: those of
    /// types with a `date` search parameter that `date=ge<start>&date=le<end>` does not match
    /// (FHIR date search: the record's date range overlaps the period). Records without a
    /// clinical date (`date:missing=true`, or types without a `date` parameter) are kept.
    fn outside_care_dates(
        &self,
        request: &EverythingRequest,
        keys: &[String],
    ) -> Result<HashSet<String>> {
        let registry = self.registry()?;
        let mut pairs = Vec::new();
        if let Some(start) = &request.start {
            pairs.push(("date".to_owned(), format!("ge{start}")));
        }
        if let Some(end) = &request.end {
            pairs.push(("date".to_owned(), format!("le{end}")));
        }
        let dated: HashSet<&str> = keys
            .iter()
            .filter_map(|k| split_key(k).map(|(t, _)| t))
            .filter(|t| registry.for_type(t).any(|p| p.code == "date"))
            .collect();
        let mut outside = HashSet::new();
        for resource_type in dated {
            let within = parse_search(
                &registry,
                vec![resource_type.to_owned()],
                Some(("Patient".to_owned(), request.patient.clone())),
                &pairs,
                Handling::Strict,
            )
            .map_err(|_| Error::InvalidSearch("start and end must be FHIR dates".into()))?;
            let mut within: HashSet<String> = self.matching_keys(&within)?.into_iter().collect();
            // Records without a clinical date are not filtered out.
            let undated = parse_search(
                &registry,
                vec![resource_type.to_owned()],
                Some(("Patient".to_owned(), request.patient.clone())),
                &[("date:missing".to_owned(), "true".to_owned())],
                Handling::Strict,
            )?;
            within.extend(self.matching_keys(&undated)?);
            outside.extend(
                keys.iter()
                    .filter(|k| split_key(k).is_some_and(|(t, _)| t == resource_type))
                    .filter(|k| !within.contains(*k))
                    .cloned(),
            );
        }
        Ok(outside)
    }

    /// Runs `$everything` for one patient. `allowed(type)` says which resource types the
    /// caller may see (types it may not are left out, not refused). A missing patient is
    /// `NotFound`, a deleted one `Gone`.
    pub fn everything(
        &self,
        ctx: &AccessContext,
        request: &EverythingRequest,
        allowed: &dyn Fn(&str) -> bool,
    ) -> Result<SearchResult> {
        let count = request
            .count
            .unwrap_or(self.limits().default_count)
            .min(self.limits().max_count);
        let digest = request.digest(count);
        let anchor = match &request.cursor {
            None => None,
            Some(token) => match cursors()?.get(token) {
                Some((at, d, last)) if *d == digest && at.elapsed() < CURSOR_TTL => {
                    Some(last.clone())
                }
                Some(_) | None => {
                    return Err(Error::InvalidSearch(
                        "_cursor is unknown, expired or of another request; run $everything \
                         again"
                            .into(),
                    ));
                }
            },
        };
        // The patient must exist (its own read is audited like any read).
        let patient = self.store().read(ctx, "Patient", &request.patient)?;

        let wanted = |resource_type: &str| {
            allowed(resource_type)
                && (request.types.is_empty() || request.types.iter().any(|t| t == resource_type))
        };
        let recent = |stored: &StoredResource| {
            request
                .since
                .is_none_or(|since| stored.last_updated >= since)
        };

        // Everything in the compartment, through the index.
        let compartment_request = parse_search(
            &*self.registry()?,
            Vec::new(),
            Some(("Patient".to_owned(), request.patient.clone())),
            &[],
            Handling::Strict,
        )?;
        let mut compartment_keys = self.matching_keys(&compartment_request)?;
        if request.start.is_some() || request.end.is_some() {
            let outside = self.outside_care_dates(request, &compartment_keys)?;
            compartment_keys.retain(|key| !outside.contains(key));
        }
        let pairs: Vec<(&str, &str)> = compartment_keys
            .iter()
            .filter_map(|k| split_key(k))
            .collect();
        let found = self
            .store()
            .read_many(ctx, AuditAction::Search, digest, &pairs)?;
        let mut members: Vec<StoredResource> = Vec::with_capacity(found.len() + 1);
        members.push(patient);
        members.extend(found.into_iter().flatten());

        // One level of references to resources of no patient.
        let mut referenced = BTreeSet::new();
        for member in &members {
            collect_references(&member.to_json()?, &mut referenced);
        }
        let compartment = patient_compartment();
        let referenced: Vec<String> = referenced
            .into_iter()
            .filter(|key| {
                split_key(key).is_some_and(|(t, _)| !compartment.contains_key(t) && wanted(t))
            })
            .collect();
        let pairs: Vec<(&str, &str)> = referenced.iter().filter_map(|k| split_key(k)).collect();
        let others = self
            .store()
            .read_many(ctx, AuditAction::Search, digest, &pairs)?;

        let mut all: Vec<((u8, String), StoredResource)> = members
            .into_iter()
            .chain(others.into_iter().flatten())
            .filter(|s| wanted(&s.resource_type) && recent(s))
            .map(|s| {
                let key = format!("{}/{}", s.resource_type, s.id);
                (rank(&request.patient, &key), s)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|a, b| a.0 == b.0);

        let total = all.len();
        let start = anchor
            .as_ref()
            .map_or(0, |last| all.partition_point(|(rank, _)| rank <= last));
        let end = (start + count).min(total);
        let next_cursor = if end < total && end > start {
            let mut table = cursors()?;
            let now = Instant::now();
            table.retain(|_, (at, _, _)| now.duration_since(*at) < CURSOR_TTL);
            if table.len() >= MAX_CURSORS
                && let Some(oldest) = table
                    .iter()
                    .min_by_key(|(_, (at, _, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                table.remove(&oldest);
            }
            let token = uuid::Uuid::new_v4().simple().to_string();
            table.insert(token.clone(), (now, digest, all[end - 1].0.clone()));
            Some(token)
        } else {
            None
        };
        let mut entries = Vec::with_capacity(end - start);
        for ((_, key), stored) in all.drain(start..end) {
            entries.push(SearchEntry {
                key,
                resource: EntryResource::Stored(stored.into_json_bytes()),
                mode: EntryMode::Match,
            });
        }
        Ok(SearchResult {
            total: Some(total),
            entries,
            next_cursor,
            previous_cursor: None,
            ignored: Vec::new(),
            canonical_query: request.canonical_query(count),
            path: format!("Patient/{}/$everything", request.patient),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_relative_type_id_pairs() {
        let mut out = BTreeSet::new();
        collect_references(
            &json!({"subject": {"reference": "Patient/p1"},
                    "performer": [{"reference": "Practitioner/d1"},
                                  {"reference": "http://elsewhere/Practitioner/d2"},
                                  {"reference": "#contained"},
                                  {"reference": "Nonsense/x"}],
                    "note": [{"text": "reference"}]}),
            &mut out,
        );
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            ["Patient/p1", "Practitioner/d1"]
        );
    }

    #[test]
    fn the_patient_ranks_first() {
        let mut keys = [
            rank("p1", "Observation/a"),
            rank("p1", "Patient/p1"),
            rank("p1", "AllergyIntolerance/z"),
        ];
        keys.sort();
        assert_eq!(keys[0].1, "Patient/p1");
        assert_eq!(keys[1].1, "AllergyIntolerance/z");
    }
}
