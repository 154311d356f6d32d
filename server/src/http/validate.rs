//! `$validate` over HTTP: `POST [type]/$validate` and `POST [type]/[id]/$validate` with a
//! resource or a Parameters holding one (`resource`). The checks are the query crate's
//! (`fhirkeep_query::validate`); the answer is an OperationOutcome with status 200 whatever
//! it finds. Nothing is read or written: under SMART it needs a create or update scope on
//! the type (validating is a dry run of a write).

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use fhirkeep_query::validate::{Issue, issues_outcome, validate_resource};
use serde_json::Value;

use super::AppState;
use super::auth::{Decision, authorize};
use super::handlers::{HandlerResult, Info, blocking, check_type, json_body};
use super::response::{ApiError, FhirResponse};
use super::scopes::Letter;

/// The resource to validate: the body, or the `resource` parameter of a Parameters body.
fn resource_of(body: Value) -> Result<Value, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Ok(body);
    }
    body.get("parameter")
        .and_then(Value::as_array)
        .and_then(|params| {
            params
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some("resource"))
        })
        .and_then(|p| p.get("resource"))
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request("a Parameters body needs a 'resource' parameter with a resource")
        })
}

async fn run(
    info: &super::envelope::RequestInfo,
    resource_type: &str,
    id: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> HandlerResult {
    check_type(resource_type)?;
    let allowed = [Letter::Create, Letter::Update]
        .into_iter()
        .any(|letter| authorize(&info.grant, letter, Some(resource_type)) != Decision::Forbidden);
    if !allowed {
        return Err(ApiError::forbidden(
            "$validate needs a create or update scope on the resource type",
        ));
    }
    let resource = resource_of(json_body(headers, body)?)?;
    // Large resources take a while: off the async threads, like database work.
    let (resource, mut issues) = blocking(move || {
        let issues = validate_resource(&resource);
        (resource, issues)
    })
    .await?;
    let mut mismatch = |message: &str| {
        issues.insert(
            0,
            Issue {
                severity: "error",
                code: "invalid",
                path: resource_type.to_owned(),
                message: message.to_owned(),
            },
        );
    };
    if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
        mismatch("resourceType does not match the URL");
    }
    if let Some(id) = id
        && resource.get("id").and_then(Value::as_str) != Some(id)
    {
        mismatch("the resource's id does not match the URL");
    }
    let mut response = FhirResponse::ok(issues_outcome(&issues));
    // No data was read or written; the envelope records the request.
    response.audited = false;
    Ok(response)
}

/// `POST [type]/$validate`
pub(crate) async fn validate_type(
    State(_state): State<AppState>,
    Extension(info): Info,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    run(&info, &resource_type, None, &headers, &body).await
}

/// `POST [type]/[id]/$validate`
pub(crate) async fn validate_instance(
    State(_state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    run(&info, &resource_type, Some(&id), &headers, &body).await
}
