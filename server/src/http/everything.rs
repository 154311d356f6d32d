//! `GET Patient/[id]/$everything` over HTTP: parses `start`, `end`, `_since`, `_type`,
//! `_count` and `_cursor`, asks the token, and answers the query crate's result as a
//! searchset Bundle.
//! Under SMART it needs read on Patient (and reach of this patient: a patient token only
//! for its own) and leaves out every type the token may not search, and every resource the
//! token's filters do not reach.
//!
//! `GET Patient/$everything` (no patient named) is the same operation on the patient of the
//! token's launch context. Without one, R4 lets a server refuse rather than return every
//! patient's record in one searchset; this server refuses and points to Bulk Data
//! (`Patient/$export`), which is built for that.

use axum::Extension;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use fhirkeep_engine::resource::is_resource_type;
use fhirkeep_query::everything::EverythingRequest;
use fhirkeep_query::params::{Handling, decode_query};
use fhirkeep_query::patient_compartment;

use super::AppState;
use super::access;
use super::auth::{Decision, authorize};
use super::handlers::{HandlerResult, Info, blocking, handling, parse_instant};
use super::response::{ApiError, FhirResponse};
use super::scopes::Letter;

fn parse(
    patient: String,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<EverythingRequest, ApiError> {
    let pairs = decode_query(query.unwrap_or("")).map_err(|e| ApiError::query(&e, false))?;
    let lenient = handling(headers) == Handling::Lenient;
    let mut request = EverythingRequest {
        patient,
        ..EverythingRequest::default()
    };
    for (name, value) in &pairs {
        match name.as_str() {
            "_since" => request.since = Some(parse_instant(name, value)?),
            "_type" => {
                for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !is_resource_type(t) {
                        return Err(ApiError::bad_request(
                            "_type names a type that is not an R4 resource type",
                        ));
                    }
                    request.types.push(t.to_owned());
                }
            }
            "_count" => {
                let count: usize = value
                    .parse()
                    .map_err(|_| ApiError::bad_request("_count must be a positive integer"))?;
                if count == 0 {
                    return Err(ApiError::bad_request("_count must be a positive integer"));
                }
                request.count = Some(count);
            }
            "_cursor" => request.cursor = Some(value.clone()),
            "start" => request.start = Some(value.clone()),
            "end" => request.end = Some(value.clone()),
            "_format" | "_pretty" => {}
            _ if lenient => {}
            _ => {
                return Err(ApiError::bad_request(
                    "$everything takes only start, end, _since, _type, _count and _cursor",
                ));
            }
        }
    }
    request.types.sort();
    request.types.dedup();
    Ok(request)
}

/// `GET Patient/[id]/$everything`
pub(crate) async fn everything(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    let request = parse(id, query.as_deref(), &headers)?;
    run(state, info, request).await
}

/// `GET Patient/$everything`: `$everything` of the token's patient (its launch context).
pub(crate) async fn everything_of_context(
    State(state): State<AppState>,
    Extension(info): Info,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> HandlerResult {
    let Some(patient) = info.grant.patient.clone() else {
        return Err(ApiError::http(
            axum::http::StatusCode::BAD_REQUEST,
            "not-supported",
            "GET Patient/$everything needs a token with a patient context; for one patient \
             use Patient/[id]/$everything, for every patient Bulk Data (Patient/$export)",
        ));
    };
    let request = parse(patient, query.as_deref(), &headers)?;
    run(state, info, request).await
}

async fn run(
    state: AppState,
    info: std::sync::Arc<super::envelope::RequestInfo>,
    request: EverythingRequest,
) -> HandlerResult {
    let db = state.db();
    let base = state.base().to_owned();
    let deny = state.deny_status();
    let bundle = blocking(move || {
        // Read on the patient, and the patient within the token's reach.
        access::check_instance(
            &db,
            &info.grant,
            deny,
            Letter::Read,
            "Patient",
            &request.patient,
        )?;
        let grant = info.grant.clone();
        // Types the token may not search are left out before paging, and so are types
        // outside the compartment when every filter is a patient compartment (a patient
        // token reaches no practitioner record), so that totals and pages are right.
        let allowed =
            move |resource_type: &str| match authorize(&grant, Letter::Search, Some(resource_type))
            {
                Decision::All => true,
                Decision::Forbidden => false,
                Decision::Filtered(filters) => {
                    resource_type == "Patient"
                        || patient_compartment().contains_key(resource_type)
                        || filters.iter().any(|f| f.compartment.is_none())
                }
            };
        let result = db
            .everything(&info.ctx, &request, &allowed)
            .map_err(|e| ApiError::query(&e, true))?;
        // Resources outside the token's compartment or search restrictions are left out.
        super::handlers::visible_searchset(&db, &info.grant, result, &base)
    })
    .await??;
    Ok(FhirResponse::stored(bundle))
}
