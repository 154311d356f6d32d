//! The `patch` interaction over HTTP: `PATCH [type]/[id]` and `PATCH [type]?condition` with a
//! JSON Patch body (`application/json-patch+json`) or a FHIRPath Patch (a `Parameters`
//! resource, `application/fhir+json`), and the Bundle entry forms (a `Binary` JSON Patch, or
//! a `Parameters` FHIRPath Patch) expanded before a batch or transaction is processed. The
//! patching itself is the query crate's (`fhirkeep_query::patch`); this module checks the
//! request and the token, and answers like an update.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use fhirkeep_query::Database;
use fhirkeep_query::fhirpath_patch::is_fhirpath_patch;
use fhirkeep_query::patch::{is_json_patch_type, patched_resource};
use serde_json::Value;

use super::AppState;
use super::access::{self, WriteTarget};
use super::auth::{Decision, Grant, authorize};
use super::envelope::is_json_type;
use super::handlers::{
    HandlerResult, Info, audited_by_engine, blocking, check_type, if_match, invalid,
    require_content_type, written,
};
use super::response::ApiError;
use super::scopes::Letter;

/// The body as a JSON Patch document (`application/json-patch+json`) or a FHIRPath Patch
/// (`application/fhir+json`, a `Parameters` resource): 415 for another content type, 400 for
/// bad JSON or a body of the wrong shape for its content type.
fn patch_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let fhirpath = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type);
    if !fhirpath {
        require_content_type(
            headers,
            is_json_patch_type,
            "application/json-patch+json (JSON Patch) or application/fhir+json (FHIRPath Patch)",
        )?;
    }
    let patch: Value =
        serde_json::from_slice(body).map_err(|_| invalid("the body is not valid JSON"))?;
    if fhirpath && !is_fhirpath_patch(&patch) {
        return Err(invalid(
            "a FHIRPath Patch must be a Parameters resource (send a JSON Patch as \
             application/json-patch+json)",
        ));
    }
    if !fhirpath && !patch.is_array() {
        return Err(invalid("a JSON Patch must be an array of operations"));
    }
    Ok(patch)
}

/// Checks a patch of `resource_type/id` against the token: a patch is an update (`u`). A
/// filtered token must reach the resource as it is and as the patch leaves it; the version
/// the checked result was computed from is returned, so the write can insist on it.
fn check_patch(
    db: &Database,
    ctx: &fhirkeep_engine::store::AccessContext,
    grant: &Grant,
    deny: StatusCode,
    resource_type: &str,
    id: &str,
    patch: &Value,
) -> Result<Option<u64>, ApiError> {
    match authorize(grant, Letter::Update, Some(resource_type)) {
        Decision::All => Ok(None),
        Decision::Forbidden => Err(ApiError::forbidden(
            "the token's scopes do not allow updates of this resource type",
        )),
        Decision::Filtered(_) => {
            // Outside the token's reach answers like a missing resource, before any read.
            access::check_instance(db, grant, deny, Letter::Update, resource_type, id)?;
            let current = db
                .store()
                .read(ctx, resource_type, id)
                .map_err(|e| ApiError::query(&fhirkeep_query::Error::Engine(e), true))?;
            let json = current
                .to_json()
                .map_err(|e| ApiError::query(&fhirkeep_query::Error::Engine(e), true))?;
            let patched = patched_resource(&json, patch).map_err(|e| ApiError::query(&e, false))?;
            access::check_write(
                db,
                grant,
                deny,
                resource_type,
                WriteTarget::Id(id),
                Some(&patched),
            )?;
            Ok(Some(current.version))
        }
    }
}

/// The version to insist on: `If-Match`'s, else the one the authorization check saw.
fn expected(
    if_match: Option<u64>,
    checked: Option<u64>,
) -> Result<Option<u64>, fhirkeep_query::Error> {
    match (if_match, checked) {
        (Some(wanted), Some(seen)) if wanted != seen => Err(fhirkeep_query::Error::Engine(
            fhirkeep_engine::Error::VersionConflict {
                expected: wanted,
                current: seen,
            },
        )),
        (Some(version), _) | (None, Some(version)) => Ok(Some(version)),
        (None, None) => Ok(None),
    }
}

/// `PATCH [type]/[id]` with a JSON Patch or a FHIRPath Patch; `If-Match` for version-aware patches.
pub(crate) async fn patch(
    State(state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let patch = patch_body(&headers, &body)?;
    let wanted = if_match(&headers)?;
    let db = state.db();
    let deny = state.deny_status();
    let outcome = blocking(move || {
        let checked = check_patch(
            &db,
            &info.ctx,
            &info.grant,
            deny,
            &resource_type,
            &id,
            &patch,
        )?;
        let version = expected(wanted, checked).map_err(|e| ApiError::query(&e, false))?;
        db.patch(&info.ctx, &resource_type, &id, &patch, version)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    written(
        &state,
        &headers,
        StatusCode::OK,
        &outcome.resource,
        "patched",
    )
}

/// `PATCH [type]?condition`: patches the one match (404 for none, 412 for several).
pub(crate) async fn conditional_patch(
    State(state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    check_type(&resource_type)?;
    let patch = patch_body(&headers, &body)?;
    let wanted = if_match(&headers)?;
    let condition = query.unwrap_or_default();
    let db = state.db();
    let outcome = blocking(move || {
        // The condition is a search the token could not otherwise narrow: only a scope
        // without patient or search restrictions may patch by condition.
        match authorize(&info.grant, Letter::Update, Some(&resource_type)) {
            Decision::All => {}
            Decision::Forbidden => {
                return Err(ApiError::forbidden(
                    "the token's scopes do not allow updates of this resource type",
                ));
            }
            Decision::Filtered(_) => {
                return Err(ApiError::forbidden(
                    "a conditional patch needs a scope without patient or search \
                     restrictions; patch by id instead",
                ));
            }
        }
        if authorize(&info.grant, Letter::Search, Some(&resource_type)) != Decision::All {
            return Err(ApiError::forbidden(
                "a conditional patch searches: it needs search on the resource type",
            ));
        }
        db.conditional_patch(&info.ctx, &resource_type, &condition, &patch, wanted)
            .map_err(|e| ApiError::query(&e, audited_by_engine(&e)))
    })
    .await??;
    written(
        &state,
        &headers,
        StatusCode::OK,
        &outcome.resource,
        "patched",
    )
}

/// The bundle as its authorization check sees it: a PATCH entry's `Binary` is the patch, not
/// a resource written, so only its URL's type (as an update) is checked.
pub(crate) fn for_bundle_check(bundle: &Value) -> std::borrow::Cow<'_, Value> {
    let is_patch = |entry: &Value| {
        entry
            .pointer("/request/method")
            .and_then(Value::as_str)
            .is_some_and(|m| m.eq_ignore_ascii_case("PATCH"))
    };
    let Some(entries) = bundle.get("entry").and_then(Value::as_array) else {
        return std::borrow::Cow::Borrowed(bundle);
    };
    if !entries.iter().any(is_patch) {
        return std::borrow::Cow::Borrowed(bundle);
    }
    let mut view = bundle.clone();
    if let Some(entries) = view.get_mut("entry").and_then(Value::as_array_mut) {
        for entry in entries.iter_mut().filter(|e| is_patch(e)) {
            if let Some(entry) = entry.as_object_mut() {
                entry.remove("resource");
            }
        }
    }
    std::borrow::Cow::Owned(view)
}
