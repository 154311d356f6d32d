//! What a [`Grant`]'s decisions mean for database operations: which resources a filtered
//! grant reaches (patient compartment, v2 search restrictions), checked against the search
//! index; searches narrowed to what the token reaches; results (including `_include`d
//! resources) filtered; writes kept inside the patient's compartment; bundles checked entry
//! by entry before anything is applied.
//!
//! Every function here is blocking (index look-ups): handlers call them inside
//! `spawn_blocking`. Denials are [`ApiError`]s: 403 for a missing scope, the deny status
//! (404 by default, so existence is not revealed) for a resource outside the token's reach.

use std::collections::{BTreeMap, HashSet};

use axum::http::StatusCode;
use fhirkeep_engine::resource::is_valid_id;
use fhirkeep_engine::store::StoredResource;
use fhirkeep_query::extract::{SEP, extract};
use fhirkeep_query::params::{Criterion, Handling, SearchRequest, decode_query, parse_search};
use fhirkeep_query::registry::Registry;
use fhirkeep_query::{Database, EntryMode, SearchResult, patient_compartment};
use serde_json::Value;

use super::auth::{Decision, Filter, Grant, Interaction, authorize};
use super::response::ApiError;
use super::scopes::Letter;

/// A refusal because no scope allows the interaction.
fn forbidden(diagnostics: &str) -> ApiError {
    ApiError::forbidden(diagnostics)
}

/// Either 403 (missing scope) or `Ok` with the filters (`None`: everything).
fn decide(
    grant: &Grant,
    interaction: Interaction,
    resource_type: Option<&str>,
) -> Result<Option<Vec<Filter>>, ApiError> {
    match authorize(grant, interaction, resource_type) {
        Decision::Forbidden => Err(forbidden(
            "the token's scopes do not allow this interaction on this resource type",
        )),
        Decision::All => Ok(None),
        Decision::Filtered(filters) => Ok(Some(filters)),
    }
}

fn parse(
    registry: &Registry,
    resource_type: &str,
    compartment: Option<&str>,
    pairs: &[(String, String)],
) -> Result<SearchRequest, fhirkeep_query::Error> {
    parse_search(
        registry,
        vec![resource_type.to_owned()],
        compartment.map(|p| ("Patient".to_owned(), p.to_owned())),
        pairs,
        Handling::Strict,
    )
}

/// The search for the ids among `ids` (of `resource_type`) that `filter` reaches; `None`
/// when it reaches none of them.
fn reached_by(
    registry: &Registry,
    resource_type: &str,
    ids: &[&str],
    filter: &Filter,
) -> Option<SearchRequest> {
    let mut ids: Vec<&str> = ids.to_vec();
    let mut compartment = filter.compartment.as_deref();
    if resource_type == "Patient"
        && let Some(patient) = compartment
    {
        // A Patient is in its own compartment only: not the patients that link to it.
        ids.retain(|id| *id == patient);
        compartment = None;
    }
    if ids.is_empty() {
        return None;
    }
    let mut pairs = vec![("_id".to_owned(), ids.join(","))];
    pairs.extend(filter.restriction.iter().cloned());
    // A restriction that does not apply to this type reaches nothing (fails closed).
    parse(registry, resource_type, compartment, &pairs).ok()
}

/// The keys (`Type/id`) among `keys` that `grant` reaches for `interaction`.
pub(crate) fn visible_keys(
    db: &Database,
    grant: &Grant,
    interaction: Interaction,
    keys: &[String],
) -> Result<HashSet<String>, ApiError> {
    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for key in keys {
        if let Some((resource_type, id)) = key.split_once('/') {
            by_type.entry(resource_type).or_default().push(id);
        }
    }
    let mut visible = HashSet::new();
    let mut searches = Vec::new();
    {
        let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
        for (resource_type, ids) in by_type {
            match authorize(grant, interaction, Some(resource_type)) {
                Decision::Forbidden => {}
                Decision::All => {
                    visible.extend(ids.iter().map(|id| format!("{resource_type}/{id}")));
                }
                Decision::Filtered(filters) => searches.extend(
                    filters
                        .iter()
                        .filter_map(|f| reached_by(&registry, resource_type, &ids, f)),
                ),
            }
        }
        // The registry lock is released before searching, which takes it again.
    }
    for request in &searches {
        visible.extend(
            db.matching_keys(request)
                .map_err(|e| ApiError::query(&e, false))?,
        );
    }
    Ok(visible)
}

/// The keys among `keys` (all of `resource_type`) that one filter reaches.
fn reached_keys(
    db: &Database,
    resource_type: &str,
    keys: &[String],
    filter: &Filter,
) -> Result<HashSet<String>, ApiError> {
    let ids: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.split_once('/'))
        .filter(|(t, _)| *t == resource_type)
        .map(|(_, id)| id)
        .collect();
    let request = {
        let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
        reached_by(&registry, resource_type, &ids, filter)
    };
    match request {
        None => Ok(HashSet::new()),
        Some(request) => Ok(db
            .matching_keys(&request)
            .map_err(|e| ApiError::query(&e, false))?
            .into_iter()
            .collect()),
    }
}

/// Checks `interaction` on one existing resource: 403 without a scope for it, the deny
/// status if the resource is outside what the token reaches (or does not exist, when the
/// token is filtered: the answer is the same either way).
pub(crate) fn check_instance(
    db: &Database,
    grant: &Grant,
    deny: StatusCode,
    interaction: Interaction,
    resource_type: &str,
    id: &str,
) -> Result<(), ApiError> {
    if decide(grant, interaction, Some(resource_type))?.is_none() {
        return Ok(());
    }
    let key = format!("{resource_type}/{id}");
    if visible_keys(db, grant, interaction, std::slice::from_ref(&key))?.contains(&key) {
        Ok(())
    } else {
        Err(ApiError::hidden(deny))
    }
}

/// Whether `resource` (of `resource_type`, with `id` when known) is in `patient`'s
/// compartment, by the same index terms the compartment search uses.
pub(crate) fn in_compartment(
    registry: &Registry,
    resource_type: &str,
    id: Option<&str>,
    resource: &Value,
    patient: &str,
) -> bool {
    if resource_type == "Patient" {
        return id == Some(patient);
    }
    let Some(params) = patient_compartment().get(resource_type) else {
        return false;
    };
    let (entries, _) = extract(registry, resource_type, resource);
    let target = format!("Patient/{patient}");
    params.iter().any(|code| {
        let term = format!("{code}{SEP}r{SEP}{target}");
        entries.terms.contains(&term)
    })
}

/// Whether one stored version of a resource (already let through by [`check_instance`]) is
/// itself inside the compartment the grant's filters name: an old version from before the
/// resource moved into the token's patient's compartment is not. Deletions pass (no body).
/// Search restrictions are checked on the current version only (by `check_instance`).
pub(crate) fn version_reached(
    db: &Database,
    grant: &Grant,
    interaction: Interaction,
    stored: &StoredResource,
) -> Result<bool, ApiError> {
    let filters = match authorize(grant, interaction, Some(&stored.resource_type)) {
        Decision::All => return Ok(true),
        Decision::Forbidden => return Ok(false),
        Decision::Filtered(filters) => filters,
    };
    if stored.is_deleted() {
        return Ok(true);
    }
    let resource = stored
        .to_json()
        .map_err(|e| ApiError::query(&fhirkeep_query::Error::Engine(e), false))?;
    let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
    Ok(filters.iter().any(|f| match &f.compartment {
        None => true,
        Some(patient) => in_compartment(
            &registry,
            &stored.resource_type,
            Some(&stored.id),
            &resource,
            patient,
        ),
    }))
}

/// The keys of `resource_type` resources matching a condition (`identifier=x`), as the
/// library will find them; none for an empty condition (which the library refuses). Chained
/// criteria in it are checked like a search's.
fn condition_keys(
    db: &Database,
    grant: &Grant,
    resource_type: &str,
    condition: &str,
) -> Result<Vec<String>, ApiError> {
    let condition = condition.trim_start_matches('?');
    if condition.trim().is_empty() {
        return Ok(Vec::new());
    }
    let pairs = decode_query(condition).map_err(|e| ApiError::query(&e, false))?;
    let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
    let request =
        parse(&registry, resource_type, None, &pairs).map_err(|e| ApiError::query(&e, false))?;
    drop(registry);
    check_criteria(grant, &request.criteria)?;
    db.matching_keys(&request)
        .map_err(|e| ApiError::query(&e, false))
}

/// Which resource a write is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WriteTarget<'a> {
    /// `POST [type]`: a new resource.
    New,
    /// `POST [type]` with `If-None-Exist`: new, unless the condition matches (then the match
    /// is returned, which is a read).
    IfNoneExist(&'a str),
    /// `PUT` or `DELETE [type]/[id]`.
    Id(&'a str),
    /// `PUT` or `DELETE [type]?condition`.
    Condition(&'a str),
}

/// Checks a create, update (`new` is the resource to write) or delete (`new` is `None`).
pub(crate) fn check_write(
    db: &Database,
    grant: &Grant,
    deny: StatusCode,
    resource_type: &str,
    target: WriteTarget<'_>,
    new: Option<&Value>,
) -> Result<(), ApiError> {
    let all = |letters: &[Letter]| {
        letters
            .iter()
            .all(|l| authorize(grant, *l, Some(resource_type)) == Decision::All)
    };
    let needed: &[Letter] = match (target, new) {
        (_, None) => &[Letter::Delete],
        (WriteTarget::New, Some(_)) => &[Letter::Create],
        (WriteTarget::IfNoneExist(_), Some(_)) => &[Letter::Create, Letter::Read],
        (WriteTarget::Id(_) | WriteTarget::Condition(_), Some(_)) => {
            &[Letter::Create, Letter::Update]
        }
    };
    if all(needed) {
        return Ok(());
    }
    // Which existing resources the write touches.
    let existing: Vec<String> = match target {
        WriteTarget::New => Vec::new(),
        // An invalid id names nothing (and the library refuses it).
        WriteTarget::Id(id) if !is_valid_id(id) => Vec::new(),
        WriteTarget::Id(id) => {
            let id_condition = format!("_id={id}");
            condition_keys(db, grant, resource_type, &id_condition)?
        }
        WriteTarget::IfNoneExist(condition) | WriteTarget::Condition(condition) => {
            condition_keys(db, grant, resource_type, condition)?
        }
    };
    let Some(new) = new else {
        let filters = decide(grant, Letter::Delete, Some(resource_type))?;
        return all_visible(db, grant, deny, Letter::Delete, filters, &existing);
    };
    if !existing.is_empty() {
        if let WriteTarget::IfNoneExist(_) = target {
            // Nothing is created: the match is returned, so it must be readable.
            let filters = decide(grant, Letter::Read, Some(resource_type))?;
            return all_visible(db, grant, deny, Letter::Read, filters, &existing);
        }
        let Some(filters) = decide(grant, Letter::Update, Some(resource_type))? else {
            return Ok(());
        };
        let id = match target {
            WriteTarget::Id(id) => Some(id.to_owned()),
            _ => existing
                .first()
                .and_then(|k| k.split_once('/'))
                .map(|(_, id)| id.to_owned()),
        };
        // One filter must reach what is there and admit what replaces it: a patient scope
        // does not move another patient's resource in, whatever other scopes reach.
        let unrestricted: Vec<&Filter> = filters
            .iter()
            .filter(|f| f.restriction.is_empty())
            .collect();
        if unrestricted.is_empty() {
            return Err(forbidden(
                "writes through scopes with search restrictions are not supported",
            ));
        }
        for filter in unrestricted {
            let reached = reached_keys(db, resource_type, &existing, filter)?;
            if existing.iter().all(|k| reached.contains(k)) {
                return new_resource_allowed(
                    db,
                    Some(vec![filter.clone()]),
                    resource_type,
                    id.as_deref(),
                    new,
                );
            }
        }
        return Err(ApiError::hidden(deny));
    }
    let filters = decide(grant, Letter::Create, Some(resource_type))?;
    let id = match target {
        WriteTarget::Id(id) => Some(id),
        _ => None,
    };
    new_resource_allowed(db, filters, resource_type, id, new)
}

/// The deny status unless every key is visible.
fn all_visible(
    db: &Database,
    grant: &Grant,
    deny: StatusCode,
    interaction: Interaction,
    filters: Option<Vec<Filter>>,
    keys: &[String],
) -> Result<(), ApiError> {
    if filters.is_none() || keys.is_empty() {
        return Ok(());
    }
    let visible = visible_keys(db, grant, interaction, keys)?;
    if keys.iter().all(|k| visible.contains(k)) {
        Ok(())
    } else {
        Err(ApiError::hidden(deny))
    }
}

/// Whether a resource about to be written stays within what the filters reach: some filter
/// without a search restriction whose compartment (if any) holds the resource.
fn new_resource_allowed(
    db: &Database,
    filters: Option<Vec<Filter>>,
    resource_type: &str,
    id: Option<&str>,
    new: &Value,
) -> Result<(), ApiError> {
    let Some(filters) = filters else {
        return Ok(());
    };
    let unrestricted: Vec<&Filter> = filters
        .iter()
        .filter(|f| f.restriction.is_empty())
        .collect();
    if unrestricted.is_empty() {
        return Err(forbidden(
            "writes through scopes with search restrictions are not supported",
        ));
    }
    let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
    let inside = unrestricted.iter().any(|f| match &f.compartment {
        None => true,
        Some(patient) => in_compartment(&registry, resource_type, id, new, patient),
    });
    if inside {
        Ok(())
    } else {
        Err(forbidden(
            "the resource would not be in the compartment of the token's patient",
        ))
    }
}

/// Chained (`subject:Patient.name=`), reverse-chained (`_has`) and `_list` criteria look into
/// other resources: their types must be searchable by the token without patient or search
/// restrictions, or what those resources hold would leak through which results match.
fn check_criteria(grant: &Grant, criteria: &[Criterion]) -> Result<(), ApiError> {
    for criterion in criteria {
        let (types, inner): (Vec<&str>, Option<&Criterion>) = match criterion {
            Criterion::Chain {
                target_types,
                inner,
                ..
            } => (
                target_types.iter().map(String::as_str).collect(),
                Some(inner),
            ),
            Criterion::Has {
                source_type, inner, ..
            } => (vec![source_type.as_str()], Some(inner)),
            Criterion::List(_) => (vec!["List"], None),
            _ => continue,
        };
        for resource_type in types {
            if authorize(grant, Letter::Search, Some(resource_type)) != Decision::All {
                return Err(forbidden(
                    "chained, _has and _list criteria need search scopes without patient or \
                     search restrictions on the types they look into (name the type, as in \
                     subject:Patient.name)",
                ));
            }
        }
        if let Some(inner) = inner {
            check_criteria(grant, std::slice::from_ref(inner))?;
        }
    }
    Ok(())
}

/// Narrows a parsed search to what `grant` reaches: 403 without a search scope for every
/// searched type (or for the types chained criteria look into); otherwise the patient
/// compartment and the v2 restriction are added to the request. The result must still go
/// through [`filter_result`] (for `_include`d resources).
pub(crate) fn narrow_search(
    registry: &Registry,
    grant: &Grant,
    deny: StatusCode,
    request: &mut SearchRequest,
) -> Result<(), ApiError> {
    check_criteria(grant, &request.criteria)?;
    let types = request.resource_types.clone();
    let decisions: Vec<Option<Vec<Filter>>> = if types.is_empty() {
        vec![decide(grant, Letter::Search, None)?]
    } else {
        types
            .iter()
            .map(|t| decide(grant, Letter::Search, Some(t)))
            .collect::<Result<_, _>>()?
    };
    if decisions.iter().all(Option::is_none) {
        return Ok(());
    }
    let first = decisions.first().cloned().flatten();
    if decisions.iter().any(|d| *d != first) {
        return Err(forbidden(
            "the token reaches these resource types differently: search them one at a time",
        ));
    }
    let filters = first.unwrap_or_default();
    let filter = merge(&filters).ok_or_else(|| {
        forbidden(
            "the token's scopes for this search cannot be combined into one search: \
             search within one scope's restriction",
        )
    })?;
    if let Some(patient) = &filter.compartment {
        match &request.compartment {
            Some((_, id)) if id != patient => return Err(ApiError::hidden(deny)),
            Some(_) => {}
            None if types == ["Patient"] => {
                let id = parse_search(
                    registry,
                    types.clone(),
                    None,
                    &[("_id".to_owned(), patient.clone())],
                    Handling::Strict,
                )
                .map_err(|e| ApiError::query(&e, false))?;
                request.criteria.extend(id.criteria);
            }
            None => request.compartment = Some(("Patient".to_owned(), patient.clone())),
        }
    }
    if !filter.restriction.is_empty() {
        let restriction =
            parse_search(registry, types, None, &filter.restriction, Handling::Strict).map_err(
                |_| {
                    forbidden("the token's search restriction does not apply to this resource type")
                },
            )?;
        request.criteria.extend(restriction.criteria);
    }
    Ok(())
}

/// One filter equivalent to the union of `filters`: the filter itself when there is one;
/// several with the same compartment whose restrictions are one parameter each, the same
/// parameter, become one with the values OR-ed. `None` when they cannot be combined.
fn merge(filters: &[Filter]) -> Option<Filter> {
    let (first, rest) = filters.split_first()?;
    if rest.is_empty() {
        return Some(first.clone());
    }
    let [(name, _)] = first.restriction.as_slice() else {
        return None;
    };
    let mut values = Vec::new();
    for filter in filters {
        match filter.restriction.as_slice() {
            [(n, v)] if n == name && filter.compartment == first.compartment => {
                values.push(v.clone());
            }
            _ => return None,
        }
    }
    Some(Filter {
        compartment: first.compartment.clone(),
        restriction: vec![(name.clone(), values.join(","))],
    })
}

/// Removes from a search result every entry (match or `_include`d) the grant does not reach
/// for search; the total counts the removed matches out. Cheap for types the grant reaches
/// entirely (no index look-up).
pub(crate) fn filter_result(
    db: &Database,
    grant: &Grant,
    result: &mut SearchResult,
) -> Result<(), ApiError> {
    if grant.is_unrestricted() {
        return Ok(());
    }
    let keys: Vec<String> = result.entries.iter().map(|e| e.key.clone()).collect();
    let visible = visible_keys(db, grant, Letter::Search, &keys)?;
    let before = result
        .entries
        .iter()
        .filter(|e| e.mode == EntryMode::Match)
        .count();
    result.entries.retain(|e| visible.contains(&e.key));
    let removed = before
        - result
            .entries
            .iter()
            .filter(|e| e.mode == EntryMode::Match)
            .count();
    if let Some(total) = result.total.as_mut() {
        *total = total.saturating_sub(removed);
    }
    Ok(())
}

/// Checks every entry of a batch or transaction Bundle before anything is applied: each
/// entry's type and interaction must be allowed without patient or search-restriction
/// filters (a filtered token sends its writes one at a time instead).
pub(crate) fn check_bundle(grant: &Grant, bundle: &Value) -> Result<(), ApiError> {
    let processed = bundle.get("resourceType").and_then(Value::as_str) == Some("Bundle")
        && matches!(
            bundle.get("type").and_then(Value::as_str),
            Some("batch" | "transaction")
        );
    if grant.is_unrestricted() || !processed {
        // Everything is allowed, or the library refuses the body without applying anything.
        return Ok(());
    }
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for entry in entries {
        let request = entry.get("request");
        let method = request
            .and_then(|r| r.get("method"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let url = request
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let path = url.split(['?', '#']).next().unwrap_or("");
        let has_query = url.contains('?');
        let if_none_exist = request.and_then(|r| r.get("ifNoneExist")).is_some();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let resource_type = segments.first().copied();
        let (letters, types): (&[Letter], Vec<Option<&str>>) = match (method, segments.as_slice()) {
            // With `ifNoneExist`, a match is returned instead: a read.
            ("POST", [_]) if if_none_exist => {
                (&[Letter::Create, Letter::Read], vec![resource_type])
            }
            ("POST", [_]) => (&[Letter::Create], vec![resource_type]),
            // A PUT may create; a PATCH only changes what exists (404 otherwise).
            ("PUT", [_]) if has_query => (&[Letter::Create, Letter::Update], vec![resource_type]),
            ("PUT", [_, _]) => (&[Letter::Create, Letter::Update], vec![resource_type]),
            ("PATCH", [_]) if has_query => (&[Letter::Update], vec![resource_type]),
            ("PATCH", [_, _]) => (&[Letter::Update], vec![resource_type]),
            ("DELETE", [_] | [_, _]) => (&[Letter::Delete], vec![resource_type]),
            // Everything at once: only scopes for every type.
            ("GET" | "HEAD", [] | ["_history"]) => (&[Letter::Search], vec![None]),
            ("GET" | "HEAD", [_, "_history"] | [_, _, "_history"] | [_]) => {
                (&[Letter::Search], vec![resource_type])
            }
            ("GET" | "HEAD", [_, _, "_history", _] | [_, _]) => {
                (&[Letter::Read], vec![resource_type])
            }
            // A compartment search: of every type in it.
            ("GET" | "HEAD", [_, _, _]) => (&[Letter::Search], vec![None]),
            _ => {
                return Err(forbidden(
                    "a bundle entry's request is not one the authorization understands",
                ));
            }
        };
        // A search in an entry (a GET with a query, a condition, `ifNoneExist`) is not
        // narrowed or filtered like a search request: it needs search on every type.
        let searches = has_query || if_none_exist;
        if searches && authorize(grant, Letter::Search, None) != Decision::All {
            return Err(forbidden(
                "searches and conditions inside bundles need search scopes for every type \
                 (such as system/*.rs)",
            ));
        }
        let body_type = entry
            .get("resource")
            .and_then(|r| r.get("resourceType"))
            .and_then(Value::as_str);
        for letter in letters {
            for resource_type in types.iter().copied().chain(body_type.map(Some)) {
                match authorize(grant, *letter, resource_type) {
                    Decision::All => {}
                    Decision::Forbidden => {
                        return Err(forbidden(
                            "the token's scopes do not allow every entry of this bundle",
                        ));
                    }
                    Decision::Filtered(_) => {
                        return Err(forbidden(
                            "bundles need scopes without patient or search restrictions \
                             for every entry; send the requests one at a time",
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
