//! The engine's Merkle audit log over HTTP, for administrators: `GET /AuditEvent` and
//! `GET /AuditEvent/[leaf]` show leaves as read-only FHIR R4 AuditEvent resources, and
//! `$audit-head`, `$audit-proof` and `$audit-consistency` answer with the same JSON as
//! `fhirkeep audit head|prove`, so that an auditor can check the log without the key.
//!
//! AuditEvent is not writable: the log is written by the engine alone, and a client-written
//! AuditEvent would sit beside it looking like one. Writes of AuditEvent (PUT, POST, DELETE,
//! bundle entries) are refused with 405.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, SecondsFormat, Utc};
use fhirkeep_engine::audit::{AuditAction, AuditLeaf, AuditOutcome};
use fhirkeep_query::Error;
use fhirkeep_query::params::decode_query;
use serde_json::{Value, json};

use super::AppState;
use super::envelope::RequestInfo;
use super::response::{ApiError, FhirResponse};
use super::scopes::Letter;

type Info = Extension<Arc<RequestInfo>>;
type HandlerResult = Result<FhirResponse, ApiError>;

/// `_count` of a page of AuditEvents when the client gives none, and the most it may ask.
const DEFAULT_COUNT: u64 = 50;
const MAX_COUNT: u64 = 1000;
/// The extension that carries a leaf's hash (hex).
const LEAF_HASH_URL: &str = "urn:fhirkeep:audit:leaf-hash";
const REQUEST_ID_URL: &str = "urn:fhirkeep:audit:request-id";

/// The audit routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        // GET only: every other method on these URLs is a 405.
        .route("/AuditEvent", get(search))
        .route("/AuditEvent/{id}", get(read))
        .route("/$audit-head", get(head))
        .route("/$audit-proof", get(proof))
        .route("/$audit-consistency", get(consistency))
}

/// 403 unless the request may read the audit log: `--auth none`, or a `system/` scope that
/// reads AuditEvent (`system/AuditEvent.read`, `system/AuditEvent.rs`, `system/*.read`).
fn require_admin(info: &RequestInfo) -> Result<(), ApiError> {
    if info.grant.has_system_scope(Letter::Read, "AuditEvent") {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "the audit log needs a system/AuditEvent.read scope",
        ))
    }
}

/// Whether a bundle writes AuditEvent resources (refused: see the module documentation).
pub(crate) fn bundle_writes_audit_events(bundle: &Value) -> bool {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|entry| {
            let method = entry
                .pointer("/request/method")
                .and_then(Value::as_str)
                .unwrap_or("");
            let url = entry
                .pointer("/request/url")
                .and_then(Value::as_str)
                .unwrap_or("");
            let is_write = !method.eq_ignore_ascii_case("GET") && !method.is_empty();
            let names_audit = url == "AuditEvent"
                || url.starts_with("AuditEvent/")
                || url.starts_with("AuditEvent?")
                || entry
                    .pointer("/resource/resourceType")
                    .and_then(Value::as_str)
                    == Some("AuditEvent");
            is_write && names_audit
        })
}

/// The 405 of a write of AuditEvent.
pub(crate) fn audit_event_not_writable() -> ApiError {
    ApiError::http(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "AuditEvent is read-only: the audit log is written by the server alone",
    )
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ApiError::internal())
}

fn engine_error(error: fhirkeep_engine::Error) -> ApiError {
    ApiError::query(&Error::Engine(error), false)
}

/// A leaf as an AuditEvent (the leaf carries no content: only type, id and version).
fn audit_event(leaf: &AuditLeaf) -> Value {
    let record = &leaf.record;
    let recorded = DateTime::from_timestamp_micros(record.time_micros)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    // The FHIR action code; the engine's own action name goes into `subtype`.
    let action = match &record.action {
        AuditAction::Create => "C",
        AuditAction::Read
        | AuditAction::VRead
        | AuditAction::HistoryInstance
        | AuditAction::HistoryType
        | AuditAction::HistorySystem
        | AuditAction::PointInTimeRead
        | AuditAction::Export => "R",
        AuditAction::Update | AuditAction::Patch => "U",
        AuditAction::Delete => "D",
        _ => "E",
    };
    let code = record.action.as_str();
    let outcome = match record.outcome {
        AuditOutcome::Success => "0",
        AuditOutcome::Error => "8",
        _ => "4",
    };
    let mut extensions = vec![
        json!({"url": LEAF_HASH_URL, "valueString": hex::encode(leaf.hash())}),
        json!({"url": REQUEST_ID_URL, "valueString": record.request_id}),
    ];
    if let Some(hash) = record.query_hash {
        extensions.push(
            json!({"url": "urn:fhirkeep:audit:query-hash", "valueString": hex::encode(hash)}),
        );
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": leaf.seq.to_string(),
        "extension": extensions,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": "urn:fhirkeep:audit:action", "code": code}],
        "action": action,
        "recorded": recorded,
        "outcome": outcome,
        "outcomeDesc": record.outcome.as_str(),
        "agent": [
            {
                "who": {"identifier": {"system": "urn:fhirkeep:subject", "value": record.actor.subject}},
                "requestor": true,
                "network": {"address": record.actor.source, "type": "2"},
            },
            {
                "who": {"identifier": {"system": "urn:fhirkeep:client", "value": record.actor.client}},
                "requestor": false,
            },
        ],
        "source": {"observer": {"display": "fhirkeep"}},
    });
    if let (Some(resource_type), Some(id)) = (&record.resource_type, &record.id) {
        let reference = match record.version {
            Some(v) => format!("{resource_type}/{id}/_history/{v}"),
            None => format!("{resource_type}/{id}"),
        };
        event["entity"] = json!([{"what": {"reference": reference}}]);
    } else if let Some(resource_type) = &record.resource_type {
        event["entity"] = json!([{"what": {"display": resource_type}}]);
    }
    event
}

/// `date=ge..`/`le..`/`gt..`/`lt..` as bounds in microseconds.
#[derive(Debug, Default)]
struct Bounds {
    low: Option<i64>,
    high: Option<i64>,
}

fn parse_date(value: &str) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let bad = || ApiError::bad_request("date must be ge, le, gt or lt and an instant with a zone");
    // `get`, not `split_at`: the value is the client's, and its third byte may be inside a
    // character.
    let (Some(prefix), Some(text)) = (value.get(..2), value.get(2..)) else {
        return Err(bad());
    };
    // An unencoded `+` of the zone offset arrives as a space.
    let micros = DateTime::parse_from_rfc3339(&text.replace(' ', "+"))
        .map_err(|_| bad())?
        .with_timezone(&Utc)
        .timestamp_micros();
    match prefix {
        "ge" => Ok((Some(micros), None)),
        "gt" => Ok((Some(micros + 1), None)),
        "le" => Ok((None, Some(micros))),
        "lt" => Ok((None, Some(micros - 1))),
        _ => Err(bad()),
    }
}

/// `GET /AuditEvent?[_count=N][&_offset=M][&date=geX][&date=leY]`: leaves in log order.
async fn search(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
) -> HandlerResult {
    require_admin(&info)?;
    let pairs =
        decode_query(query.as_deref().unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
    let mut count = DEFAULT_COUNT;
    let mut offset = 0u64;
    let mut bounds = Bounds::default();
    let number = |value: &str, name: &str| {
        value
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(&format!("{name} must be a whole number")))
    };
    for (name, value) in &pairs {
        match name.as_str() {
            "_count" => count = number(value, "_count")?.clamp(1, MAX_COUNT),
            "_offset" => offset = number(value, "_offset")?,
            "date" => {
                let (low, high) = parse_date(value)?;
                bounds.low = low.or(bounds.low);
                bounds.high = high.or(bounds.high);
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::bad_request(
                    "AuditEvent supports _count, _offset and date (ge, le, gt, lt) only",
                ));
            }
        }
    }
    let db = state.db();
    let (events, next) = blocking(move || {
        let times = bounds.low.unwrap_or(i64::MIN)..=bounds.high.unwrap_or(i64::MAX);
        // `count` is at most MAX_COUNT.
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let (leaves, next) = db
            .store()
            .audit_leaves_in_time_range(times, offset, count)
            .map_err(engine_error)?;
        Ok::<_, ApiError>((leaves.iter().map(audit_event).collect::<Vec<_>>(), next))
    })
    .await??;
    let base = state.base();
    let link_query = |start: u64| {
        let mut q = format!("_count={count}&_offset={start}");
        for (name, value) in &pairs {
            if name == "date" {
                q.push_str(&format!("&date={}", value.replace('+', "%2B")));
            }
        }
        q
    };
    let mut links = vec![
        json!({"relation": "self", "url": format!("{base}/AuditEvent?{}", link_query(offset))}),
    ];
    if let Some(start) = next {
        links.push(
            json!({"relation": "next", "url": format!("{base}/AuditEvent?{}", link_query(start))}),
        );
    }
    let entries: Vec<Value> = events
        .into_iter()
        .map(|event| {
            json!({
                "fullUrl": format!("{base}/AuditEvent/{}", event["id"].as_str().unwrap_or("")),
                "resource": event,
                "search": {"mode": "match"},
            })
        })
        .collect();
    Ok(FhirResponse {
        audited: false,
        ..FhirResponse::ok(json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": entries,
        }))
    })
}

/// `GET /AuditEvent/[leaf]`
async fn read(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(id): Path<String>,
) -> HandlerResult {
    require_admin(&info)?;
    let Ok(seq) = id.parse::<u64>() else {
        return Err(engine_error(fhirkeep_engine::Error::NotFound));
    };
    let db = state.db();
    let leaf = blocking(move || {
        db.store().flush_audit()?;
        db.store().audit_leaf(seq)
    })
    .await?
    .map_err(engine_error)?;
    Ok(FhirResponse {
        audited: false,
        ..FhirResponse::ok(audit_event(&leaf))
    })
}

fn json_of(text: &str) -> Result<Value, ApiError> {
    serde_json::from_str(text).map_err(|_| ApiError::internal())
}

/// `GET /$audit-head`: the signed tree head (`fhirkeep audit head`).
async fn head(State(state): State<AppState>, Extension(info): Info) -> HandlerResult {
    require_admin(&info)?;
    let db = state.db();
    let head = blocking(move || db.store().audit_head())
        .await?
        .map_err(engine_error)?;
    Ok(FhirResponse {
        audited: false,
        ..FhirResponse::ok(json_of(&head.to_json())?)
    })
}

/// The whole-number query parameter `name`, if given.
fn number_param(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(&format!("{name} must be a whole number")))
        })
        .transpose()
}

/// `GET /$audit-proof?leaf=N[&size=M]`: an inclusion proof (`fhirkeep audit prove --leaf`),
/// against the current head unless `size` names an earlier one.
async fn proof(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
) -> HandlerResult {
    require_admin(&info)?;
    let pairs =
        decode_query(query.as_deref().unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
    let leaf = number_param(&pairs, "leaf")?
        .ok_or_else(|| ApiError::bad_request("$audit-proof needs leaf=N"))?;
    let size = number_param(&pairs, "size")?;
    let db = state.db();
    let proof = blocking(move || {
        let head = db.store().audit_head().map_err(engine_error)?;
        let size = size.unwrap_or(head.size);
        if leaf >= size || size > head.size {
            return Err(ApiError::bad_request(
                "leaf must be below size, and size at most the log's size",
            ));
        }
        db.store().prove_inclusion(leaf, size).map_err(engine_error)
    })
    .await??;
    Ok(FhirResponse {
        audited: false,
        ..FhirResponse::ok(json_of(&proof.to_json())?)
    })
}

/// `GET /$audit-consistency?first=A&second=B`: a consistency proof
/// (`fhirkeep audit prove --from A --to B`).
async fn consistency(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
) -> HandlerResult {
    require_admin(&info)?;
    let pairs =
        decode_query(query.as_deref().unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
    let (Some(first), Some(second)) = (
        number_param(&pairs, "first")?,
        number_param(&pairs, "second")?,
    ) else {
        return Err(ApiError::bad_request(
            "$audit-consistency needs first=A and second=B",
        ));
    };
    let db = state.db();
    let proof = blocking(move || {
        let head = db.store().audit_head().map_err(engine_error)?;
        if first == 0 || first > second || second > head.size {
            return Err(ApiError::bad_request(
                "need 0 < first <= second <= the log's size",
            ));
        }
        db.store()
            .prove_consistency(first, second)
            .map_err(engine_error)
    })
    .await??;
    Ok(FhirResponse {
        audited: false,
        ..FhirResponse::ok(json_of(&proof.to_json())?)
    })
}
