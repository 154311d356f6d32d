//! The FHIR interactions: read, vread, create, update, delete (plain and conditional), search
//! (type, system, compartment; GET and POST `_search`), history (instance, type, system),
//! batch/transaction and `/metadata`. Each parses and checks the request, runs the database
//! call in `spawn_blocking`, and answers with the FHIR headers of the interaction.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{
    CONTENT_LOCATION, CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, LOCATION,
};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use fhirkeep_engine::resource::is_resource_type;
use fhirkeep_engine::store::{HistoryPage, HistoryQuery, StoredResource};
use fhirkeep_query::bundle::{BundleReturn, parse_etag};
use fhirkeep_query::params::{Handling, decode_query, parse_search};
use fhirkeep_query::{ConditionalOutcome, Error};
use serde_json::{Value, json};

use super::AppState;
use super::access::{self, WriteTarget};
use super::auth::{self, Decision, authorize};
use super::capability;
use super::envelope::{RequestInfo, is_json_type};
use super::response::{ApiError, FhirResponse, ResponseBody, outcome};
use super::scopes::Letter;

pub(super) type Info = Extension<Arc<RequestInfo>>;
pub(super) type HandlerResult = Result<FhirResponse, ApiError>;

/// `_count` of a history page when the client gives none.
const DEFAULT_HISTORY_COUNT: usize = 100;

static IF_NONE_EXIST: HeaderName = HeaderName::from_static("if-none-exist");
static PREFER: HeaderName = HeaderName::from_static("prefer");

/// Runs blocking database work off the async threads. A panic in it becomes a 500.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        tracing::error!("a blocking database task failed");
        ApiError::internal()
    })
}

/// Whether the engine recorded a failed write in the audit log: errors of the engine come
/// from inside the store (which audits its refusals); the query layer's own refusals (a bad
/// condition, several matches) happen before it.
pub(super) fn audited_by_engine(error: &Error) -> bool {
    matches!(error, Error::Engine(_))
}

/// A 400 through the query layer's mapping (an invalid resource or body).
pub(super) fn invalid(message: &str) -> ApiError {
    ApiError::query(
        &Error::Engine(fhirkeep_engine::Error::InvalidResource(message.into())),
        false,
    )
}

/// 404 for a URL whose type is not an R4 resource type. The type is not echoed: the
/// segment could be anything a client put there.
pub(super) fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if is_resource_type(resource_type) {
        Ok(())
    } else {
        Err(ApiError::http(
            StatusCode::NOT_FOUND,
            "not-found",
            "the URL names no R4 resource type",
        ))
    }
}

/// The value of `key` in the `Prefer` header(s) (`Prefer: return=minimal, handling=lenient`).
fn prefer(headers: &HeaderMap, key: &str) -> Option<String> {
    headers
        .get_all(&PREFER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|token| token.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(key))
        .map(|(_, value)| value.trim().trim_matches('"').to_ascii_lowercase())
}

pub(super) fn handling(headers: &HeaderMap) -> Handling {
    match prefer(headers, "handling").as_deref() {
        Some("lenient") => Handling::Lenient,
        _ => Handling::Strict,
    }
}

/// `Prefer: return=...` of create and update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

fn prefer_return(headers: &HeaderMap) -> Return {
    match prefer(headers, "return").as_deref() {
        Some("minimal") => Return::Minimal,
        Some("operationoutcome") => Return::OperationOutcome,
        _ => Return::Representation,
    }
}

/// The version an `If-Match` header requires, if any (400 if it is not a version ETag).
pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(IF_MATCH) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(parse_etag)
            .map(Some)
            .ok_or_else(|| {
                ApiError::bad_request("If-Match must be a version ETag such as W/\"3\"")
            }),
    }
}

/// Whether `If-None-Match` names `version` (the client's copy is current).
fn if_none_match(headers: &HeaderMap, version: u64) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || parse_etag(tag) == Some(version))
}

/// Whether the client's copy is current: `If-None-Match` names `stored`'s version, or (only
/// without `If-None-Match`, as HTTP says) `stored` is not newer than `If-Modified-Since`.
fn not_modified(headers: &HeaderMap, stored: &StoredResource) -> bool {
    if headers.contains_key(IF_NONE_MATCH) {
        return if_none_match(headers, stored.version);
    }
    headers
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|text| DateTime::parse_from_rfc2822(text).ok())
        // HTTP dates have whole seconds.
        .is_some_and(|since| stored.last_updated.timestamp() <= since.timestamp())
}

/// 415 unless the request's Content-Type satisfies `accept`.
pub(super) fn require_content_type(
    headers: &HeaderMap,
    accept: impl Fn(&str) -> bool,
    expected: &str,
) -> Result<(), ApiError> {
    let ok = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(accept);
    if ok {
        Ok(())
    } else {
        Err(ApiError::http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            &format!("the request body must be {expected}"),
        ))
    }
}

/// The body as a JSON object (415 for another content type, 400 for bad JSON).
pub(super) fn json_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    require_content_type(headers, is_json_type, "application/fhir+json")?;
    let value: Value =
        serde_json::from_slice(body).map_err(|_| invalid("the body is not valid JSON"))?;
    if !value.is_object() {
        return Err(invalid("the body must be a JSON object"));
    }
    Ok(value)
}

/// The body as a resource of the URL's type.
fn resource_of_type(
    headers: &HeaderMap,
    body: &Bytes,
    resource_type: &str,
) -> Result<Value, ApiError> {
    let resource = json_body(headers, body)?;
    if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
        return Err(invalid("resourceType in the body does not match the URL"));
    }
    Ok(resource)
}

/// A 200 carrying a stored version as the store returned it (no parse, no re-serialization).
fn stored_response(stored: &StoredResource) -> Result<FhirResponse, ApiError> {
    if stored.json_bytes().is_empty() {
        // A deletion has no body; callers answer 410 before getting here.
        return Ok(FhirResponse::ok(stored_json(stored)?));
    }
    Ok(FhirResponse::stored(stored.json_bytes().to_vec()))
}

fn stored_json(stored: &StoredResource) -> Result<Value, ApiError> {
    stored
        .to_json()
        .map_err(|e| ApiError::query(&Error::Engine(e), true))
}

fn http_date(stored: &StoredResource) -> String {
    stored
        .last_updated
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// `ETag` and `Last-Modified` of a version.
fn with_version(response: FhirResponse, stored: &StoredResource) -> FhirResponse {
    response
        .header(ETAG, &format!("W/\"{}\"", stored.version))
        .header(LAST_MODIFIED, &http_date(stored))
}

/// The answer to an update: 201 when it created the resource, else 200.
fn written_update(
    state: &AppState,
    headers: &HeaderMap,
    outcome: &fhirkeep_engine::store::UpdateOutcome,
) -> HandlerResult {
    let (status, message) = if outcome.created {
        (StatusCode::CREATED, "created")
    } else {
        (StatusCode::OK, "updated")
    };
    written(state, headers, status, &outcome.resource, message)
}

/// The answer to a create or update: `Location`, `Content-Location`, the version headers,
/// and the body `Prefer: return=` asks for.
pub(super) fn written(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    stored: &StoredResource,
    message: &str,
) -> HandlerResult {
    let url = format!(
        "{}/{}/{}/_history/{}",
        state.base(),
        stored.resource_type,
        stored.id,
        stored.version
    );
    let body = match prefer_return(headers) {
        Return::Minimal => None,
        Return::OperationOutcome => Some(ResponseBody::Json(outcome(
            "information",
            "informational",
            message,
        ))),
        Return::Representation => Some(ResponseBody::Stored(stored.json_bytes().to_vec())),
    };
    let response = FhirResponse {
        status,
        headers: HeaderMap::new(),
        body,
        audited: true,
    };
    Ok(with_version(response, stored)
        .header(LOCATION, &url)
        .header(CONTENT_LOCATION, &url))
}

/// `GET [type]/[id]`
pub(crate) async fn read(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&resource_type)?;
    let db = state.db();
    let deny = state.deny_status();
    let stored = blocking(move || {
        access::check_instance(&db, &info.grant, deny, Letter::Read, &resource_type, &id)?;
        db.store()
            .read(&info.ctx, &resource_type, &id)
            .map_err(|e| ApiError::query(&Error::Engine(e), true))
    })
    .await??;
    if not_modified(&headers, &stored) {
        let response = FhirResponse {
            status: StatusCode::NOT_MODIFIED,
            headers: HeaderMap::new(),
            body: None,
            audited: true,
        };
        return Ok(with_version(response, &stored));
    }
    Ok(with_version(stored_response(&stored)?, &stored))
}

/// `GET [type]/[id]/_history/[vid]`
pub(crate) async fn vread(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id, vid)): Path<(String, String, String)>,
) -> HandlerResult {
    check_type(&resource_type)?;
    let Ok(version) = vid.parse::<u64>() else {
        // Version ids here are numbers: anything else names no version.
        return Err(ApiError::query(
            &Error::Engine(fhirkeep_engine::Error::NotFound),
            false,
        ));
    };
    let db = state.db();
    let deny = state.deny_status();
    let stored = blocking(move || {
        access::check_instance(&db, &info.grant, deny, Letter::Read, &resource_type, &id)?;
        let stored = db
            .store()
            .vread(&info.ctx, &resource_type, &id, version)
            .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
        // An old version may predate the resource's move into the token's compartment.
        if access::version_reached(&db, &info.grant, Letter::Read, &stored)? {
            Ok(stored)
        } else {
            Err(ApiError::hidden(deny))
        }
    })
    .await??;
    Ok(with_version(stored_response(&stored)?, &stored))
}

/// `POST [type]`, conditional with `If-None-Exist`.
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let resource = resource_of_type(&headers, &body, &resource_type)?;
    let condition = match headers.get(&IF_NONE_EXIST) {
        None => None,
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::bad_request("If-None-Exist must be a search query"))?;
            // Clients send `identifier=x` or `Patient?identifier=x`.
            Some(text.split_once('?').map_or(text, |(_, q)| q).to_owned())
        }
    };
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        let target = match &condition {
            None => WriteTarget::New,
            Some(condition) => WriteTarget::IfNoneExist(condition),
        };
        access::check_write(
            &db,
            &info.grant,
            deny,
            &resource_type,
            target,
            Some(&resource),
        )?;
        match condition {
            None => db
                .create(&info.ctx, resource)
                .map(ConditionalOutcome::Created),
            Some(condition) => db.conditional_create(&info.ctx, resource, &condition),
        }
        .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    match outcome {
        ConditionalOutcome::Created(stored) => {
            written(&state, &headers, StatusCode::CREATED, &stored, "created")
        }
        ConditionalOutcome::Existing(stored) => written(
            &state,
            &headers,
            StatusCode::OK,
            &stored,
            "a resource matching If-None-Exist exists: nothing was created",
        ),
    }
}

/// `PUT [type]/[id]`, with `If-Match` for version-aware updates; creates with the client's
/// id when the resource does not exist.
pub(crate) async fn update(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let resource = resource_of_type(&headers, &body, &resource_type)?;
    let expected = if_match(&headers)?;
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        access::check_write(
            &db,
            &info.grant,
            deny,
            &resource_type,
            WriteTarget::Id(&id),
            Some(&resource),
        )?;
        db.update(&info.ctx, &resource_type, &id, resource, expected)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    written_update(&state, &headers, &outcome)
}

/// `PUT [type]?query`
pub(crate) async fn conditional_update(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let resource = resource_of_type(&headers, &body, &resource_type)?;
    let expected = if_match(&headers)?;
    let condition = query.unwrap_or_default();
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        access::check_write(
            &db,
            &info.grant,
            deny,
            &resource_type,
            WriteTarget::Condition(&condition),
            Some(&resource),
        )?;
        db.conditional_update(&info.ctx, &resource_type, &condition, resource, expected)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    written_update(&state, &headers, &outcome)
}

/// The answer to a delete: 204, with the tombstone's version as ETag when there is one.
fn deleted(version: Option<u64>) -> FhirResponse {
    let response = FhirResponse {
        status: StatusCode::NO_CONTENT,
        headers: HeaderMap::new(),
        body: None,
        audited: true,
    };
    match version {
        Some(version) => response.header(ETAG, &format!("W/\"{version}\"")),
        None => response,
    }
}

/// `DELETE [type]/[id]`, with `If-Match` for version-aware deletes.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&resource_type)?;
    let expected = if_match(&headers)?;
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        access::check_write(
            &db,
            &info.grant,
            deny,
            &resource_type,
            WriteTarget::Id(&id),
            None,
        )?;
        db.delete(&info.ctx, &resource_type, &id, expected)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    Ok(deleted(Some(outcome.version)))
}

/// `DELETE [type]?query`: deletes the one match; nothing matched is still a success.
pub(crate) async fn conditional_delete(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
) -> HandlerResult {
    check_type(&resource_type)?;
    let condition = query.unwrap_or_default();
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        access::check_write(
            &db,
            &info.grant,
            deny,
            &resource_type,
            WriteTarget::Condition(&condition),
            None,
        )?;
        db.conditional_delete(&info.ctx, &resource_type, &condition)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    Ok(deleted(outcome.map(|o| o.version)))
}

/// Parses and runs a search; answers the searchset Bundle.
async fn run_search(
    state: &AppState,
    info: Arc<RequestInfo>,
    types: Vec<String>,
    compartment: Option<(String, String)>,
    query: &str,
    headers: &HeaderMap,
) -> HandlerResult {
    let handling = handling(headers);
    let pairs = decode_query(query).map_err(|e| ApiError::query(&e, false))?;
    let db = state.db();
    let base = state.base().to_owned();
    let deny = state.deny_status();
    let bundle = blocking(move || -> Result<Vec<u8>, ApiError> {
        let request = {
            let registry = db.registry().map_err(|e| ApiError::query(&e, false))?;
            let mut request = parse_search(&registry, types, compartment, &pairs, handling)
                .map_err(|e| ApiError::query(&e, false))?;
            // The token's patient compartment and search restrictions become part of it.
            access::narrow_search(&registry, &info.grant, deny, &mut request)?;
            request
        };
        // The search records its own audit leaf, failed or not.
        let result = db
            .search(&info.ctx, &request)
            .map_err(|e| ApiError::query(&e, true))?;
        // `_include`d resources (and patients linked to the token's patient) the token does
        // not reach are left out.
        visible_searchset(&db, &info.grant, result, &base)
    })
    .await??;
    Ok(FhirResponse::stored(bundle))
}

/// The parameters of a `POST .../_search`: the URL's and the form body's.
fn form_query(
    headers: &HeaderMap,
    query: Option<String>,
    body: &Bytes,
) -> Result<String, ApiError> {
    require_content_type(
        headers,
        |ct| {
            ct.split(';').next().is_some_and(|e| {
                e.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        },
        "application/x-www-form-urlencoded",
    )?;
    let form = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the form body is not UTF-8"))?;
    let mut all = query.unwrap_or_default();
    if !form.is_empty() {
        if !all.is_empty() {
            all.push('&');
        }
        all.push_str(form);
    }
    Ok(all)
}

/// A search result as the searchset Bundle's bytes, without the entries `grant` does not
/// reach (blocking: index look-ups). Stored resources go into the bytes as they are.
pub(super) fn visible_searchset(
    db: &fhirkeep_query::Database,
    grant: &super::auth::Grant,
    mut result: fhirkeep_query::SearchResult,
    base: &str,
) -> Result<Vec<u8>, ApiError> {
    access::filter_result(db, grant, &mut result)?;
    result
        .into_bundle_json(base)
        .map_err(|e| ApiError::query(&e, false))
}

/// `GET [type]?...`
pub(crate) async fn search_type(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&resource_type)?;
    let query = query.unwrap_or_default();
    run_search(&state, info, vec![resource_type], None, &query, &headers).await
}

/// `POST [type]/_search` with a form body.
pub(crate) async fn search_type_post(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let query = form_query(&headers, query, &body)?;
    run_search(&state, info, vec![resource_type], None, &query, &headers).await
}

/// `GET /?_type=...` (all types unless `_type` narrows them).
pub(crate) async fn search_system(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    let query = query.unwrap_or_default();
    run_search(&state, info, Vec::new(), None, &query, &headers).await
}

/// `POST /_search` with a form body.
pub(crate) async fn search_system_post(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    let query = form_query(&headers, query, &body)?;
    run_search(&state, info, Vec::new(), None, &query, &headers).await
}

/// `GET Patient/[id]/[type]?...` (`*` for every type in the compartment).
pub(crate) async fn search_compartment(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((compartment, id, resource_type)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&compartment)?;
    let types = if resource_type == "*" {
        Vec::new()
    } else {
        check_type(&resource_type)?;
        vec![resource_type]
    };
    let query = query.unwrap_or_default();
    run_search(
        &state,
        info,
        types,
        Some((compartment, id)),
        &query,
        &headers,
    )
    .await
}

/// The history parameters of a request, kept for the paging links.
#[derive(Debug, Default)]
struct HistoryParams {
    query: HistoryQuery,
}

/// `_since` and `_at`: a FHIR instant, or a date (its midnight, UTC).
pub(super) fn parse_instant(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(value) {
        return Ok(instant.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .ok_or_else(|| {
            ApiError::bad_request(&format!(
                "{name} must be an instant (2024-01-31T12:00:00Z) or a date"
            ))
        })
}

impl HistoryParams {
    fn parse(query: Option<&str>, headers: &HeaderMap, max_count: usize) -> Result<Self, ApiError> {
        let pairs = decode_query(query.unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
        let lenient = handling(headers) == Handling::Lenient;
        let mut params = HistoryParams::default();
        for (name, value) in &pairs {
            match name.as_str() {
                "_since" => params.query.since = Some(parse_instant(name, value)?),
                "_at" => params.query.at = Some(parse_instant(name, value)?),
                "_count" => {
                    let count: usize = value.parse().map_err(|_| {
                        ApiError::bad_request("_count must be a non-negative integer")
                    })?;
                    params.query.count = Some(count);
                }
                "_cursor" => {
                    let cursor: u64 = value
                        .parse()
                        .map_err(|_| ApiError::bad_request("_cursor is not a history cursor"))?;
                    params.query.cursor = Some(cursor);
                }
                "_format" | "_pretty" => {}
                _ if lenient => {}
                _ => {
                    return Err(ApiError::bad_request(
                        "history takes only _since, _at, _count and _cursor",
                    ));
                }
            }
        }
        // Never unbounded: a system history could be the whole database.
        let count = params
            .query
            .count
            .unwrap_or(DEFAULT_HISTORY_COUNT)
            .min(max_count);
        params.query.count = Some(count);
        Ok(params)
    }

    /// The canonical query of this request, or of its page at `cursor`.
    fn link_query(&self, cursor: Option<u64>) -> String {
        let instant = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut parts = Vec::new();
        if let Some(at) = &self.query.at {
            parts.push(format!("_at={}", instant(at)));
        }
        if let Some(count) = self.query.count {
            parts.push(format!("_count={count}"));
        }
        if let Some(cursor) = cursor {
            parts.push(format!("_cursor={cursor}"));
        }
        if let Some(since) = &self.query.since {
            parts.push(format!("_since={}", instant(since)));
        }
        parts.join("&")
    }
}

/// The history Bundle with absolute `fullUrl`s and `self`/`next` links.
fn history_bundle(
    page: &HistoryPage,
    base: &str,
    path: &str,
    params: &HistoryParams,
) -> Result<Value, ApiError> {
    let mut bundle = page
        .to_bundle()
        .map_err(|e| ApiError::query(&Error::Engine(e), true))?;
    let Some(map) = bundle.as_object_mut() else {
        return Err(ApiError::internal());
    };
    if let Some(entries) = map.get_mut("entry").and_then(Value::as_array_mut) {
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(url) = entry.get("fullUrl").and_then(Value::as_str) {
                let absolute = format!("{base}/{url}");
                entry.insert("fullUrl".into(), json!(absolute));
            }
        }
    }
    let url = |cursor: Option<u64>| format!("{base}/{path}?{}", params.link_query(cursor));
    let mut links = vec![json!({"relation": "self", "url": url(params.query.cursor)})];
    if let Some(next) = page.next {
        links.push(json!({"relation": "next", "url": url(Some(next))}));
        // The engine counts the entries of this page, not of the whole history.
        map.remove("total");
    }
    map.insert("link".into(), Value::Array(links));
    Ok(bundle)
}

/// Which history: of one resource, of a type, or of everything.
enum HistoryScope {
    Instance(String, String),
    Type(String),
    System,
}

/// History is a search (`s`): of one resource, it needs the resource to be within the
/// token's reach; of a whole type or of everything, a scope without patient or search
/// restrictions (history cannot be narrowed to a compartment).
fn history_allowed(
    db: &fhirkeep_query::Database,
    info: &RequestInfo,
    deny: StatusCode,
    scope: &HistoryScope,
) -> Result<(), ApiError> {
    let resource_type = match scope {
        HistoryScope::Instance(t, id) => {
            return access::check_instance(db, &info.grant, deny, Letter::Search, t, id);
        }
        HistoryScope::Type(t) => Some(t.as_str()),
        HistoryScope::System => None,
    };
    match authorize(&info.grant, Letter::Search, resource_type) {
        Decision::All => Ok(()),
        Decision::Forbidden => Err(ApiError::forbidden(
            "the token's scopes do not allow this history",
        )),
        Decision::Filtered(_) => Err(ApiError::forbidden(
            "the history of a whole type needs a scope without patient or search \
             restrictions; read the history of single resources instead",
        )),
    }
}

async fn run_history(
    state: &AppState,
    info: Arc<RequestInfo>,
    scope: HistoryScope,
    query: Option<String>,
    headers: &HeaderMap,
) -> HandlerResult {
    let db = state.db();
    let params = HistoryParams::parse(query.as_deref(), headers, db.limits().max_count)?;
    let path = match &scope {
        HistoryScope::Instance(t, id) => format!("{t}/{id}/_history"),
        HistoryScope::Type(t) => format!("{t}/_history"),
        HistoryScope::System => "_history".to_owned(),
    };
    let history_query = params.query.clone();
    let deny = state.deny_status();
    let page = blocking(move || {
        history_allowed(&db, &info, deny, &scope)?;
        let store = db.store();
        match scope {
            HistoryScope::Instance(t, id) => {
                store.history_instance(&info.ctx, &t, &id, &history_query)
            }
            HistoryScope::Type(t) => store.history_type(&info.ctx, &t, &history_query),
            HistoryScope::System => store.history_system(&info.ctx, &history_query),
        }
        .map_err(|e| ApiError::query(&Error::Engine(e), true))
        .and_then(|mut page| {
            // Versions from before the resource came into the token's compartment are left
            // out (type and system history need unfiltered scopes).
            let mut kept = Vec::with_capacity(page.entries.len());
            for stored in page.entries.drain(..) {
                if access::version_reached(&db, &info.grant, Letter::Search, &stored)? {
                    kept.push(stored);
                }
            }
            page.entries = kept;
            Ok(page)
        })
    })
    .await??;
    Ok(FhirResponse::ok(history_bundle(
        &page,
        state.base(),
        &path,
        &params,
    )?))
}

/// `GET [type]/[id]/_history`
pub(crate) async fn history_instance(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&resource_type)?;
    let scope = HistoryScope::Instance(resource_type, id);
    run_history(&state, info, scope, query, &headers).await
}

/// `GET [type]/_history`
pub(crate) async fn history_type(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    check_type(&resource_type)?;
    let scope = HistoryScope::Type(resource_type);
    run_history(&state, info, scope, query, &headers).await
}

/// `GET /_history`
pub(crate) async fn history_system(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    run_history(&state, info, HistoryScope::System, query, &headers).await
}

/// `POST /`: a batch or transaction Bundle.
pub(crate) async fn bundle(
    State(state): State<AppState>,
    Extension(info): Info,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    let db = state.db();
    let base = state.base().to_owned();
    // PATCH entries become version-guarded updates.
    // `Prefer: return=minimal` leaves written resources out of the response entries.
    let returning = match prefer_return(&headers) {
        Return::Minimal => BundleReturn::Minimal,
        Return::Representation | Return::OperationOutcome => BundleReturn::Representation,
    };
    // Parsing a Bundle of a hundred resources takes a millisecond or more: it runs with the
    // processing, off the async threads, and on the thread that frees most of what it
    // allocates (a free made on another thread costs the allocator a deferred collection).
    let response = blocking(move || {
        let bundle = json_body(&headers, &body)?;
        if super::audit_view::bundle_writes_audit_events(&bundle) {
            return Err(super::audit_view::audit_event_not_writable());
        }
        // Every entry is checked before anything is applied.
        access::check_bundle(&info.grant, &super::patch::for_bundle_check(&bundle))?;
        db.process_bundle_with_patches(&info.ctx, bundle, &base, returning)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    Ok(FhirResponse::ok(response))
}

/// `GET /metadata`: the CapabilityStatement.
pub(crate) async fn metadata(State(state): State<AppState>) -> HandlerResult {
    let db = state.db();
    let base = state.base().to_owned();
    let smart = state.smart().map(|s| s.endpoints().clone());
    let statement = blocking(move || capability::statement(&db, &base, smart.as_ref()))
        .await?
        .map_err(|e| ApiError::query(&e, false))?;
    let mut response = FhirResponse::ok(statement);
    // Reads no patient data; the envelope records it as a plain HTTP request.
    response.audited = false;
    Ok(response)
}

/// `GET /.well-known/smart-configuration`: what a SMART client needs to know (404 without
/// `--auth smart`). There is no authorization server here: tokens come from an external
/// one (`--jwks`) or from `fhirkeep token`, so no authorization or token endpoint is named.
pub(crate) async fn smart_configuration(State(state): State<AppState>) -> HandlerResult {
    let Some(smart) = state.smart() else {
        return Err(unknown_route().await);
    };
    let mut body = json!({
        "issuer": state.base(),
        "capabilities": [
            "permission-v1",
            "permission-v2",
            "permission-patient",
            "permission-user",
        ],
        "scopes_supported": auth::scopes_supported(),
        "fhirkeep_issuer_key": smart.own_jwk(),
    });
    // The external authorization server's endpoints, when the operator named them.
    let endpoints = smart.endpoints();
    let mut grant_types = Vec::new();
    if let Some(authorize) = &endpoints.authorize {
        body["authorization_endpoint"] = json!(authorize);
        // SMART requires PKCE with S256 of authorization servers.
        body["code_challenge_methods_supported"] = json!(["S256"]);
        grant_types.push("authorization_code");
    }
    if let Some(token) = &endpoints.token {
        body["token_endpoint"] = json!(token);
        grant_types.push("client_credentials");
    }
    body["grant_types_supported"] = json!(grant_types);
    if smart.requires_mfa() {
        body["fhirkeep_mfa_required_for_privileged"] = json!(true);
    }
    let mut response = FhirResponse::ok(body);
    response.audited = false;
    Ok(response)
}

/// Any URL no route matches.
pub(crate) async fn unknown_route() -> ApiError {
    ApiError::http(
        StatusCode::NOT_FOUND,
        "not-found",
        "no FHIR interaction at this URL",
    )
}
