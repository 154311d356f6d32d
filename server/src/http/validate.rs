//! `$validate` over HTTP: `POST [type]/$validate` and `POST [type]/[id]/$validate` with a
//! resource or a Parameters holding one (`resource`). The checks are the query crate's
//! (`fhirkeep_query::validate`); the answer is an OperationOutcome with status 200 whatever
//! it finds. Nothing is read or written: under SMART it needs a create or update scope on
//! the type (validating is a dry run of a write).
//!
//! Only the base R4 definitions are checked. A `profile` asked for (a Parameters `profile`,
//! or `?profile=` in the URL) other than the type's base definition is answered with a
//! `not-supported` error issue, and a profile the resource declares in `meta.profile` with an
//! informational one, so that a clean answer never stands for a check that was not made.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use fhirkeep_query::validate::{Issue, issues_outcome, validate_resource};
use serde_json::Value;

use super::AppState;
use super::auth::{Decision, authorize};
use super::handlers::{HandlerResult, Info, blocking, check_type, json_body};
use super::response::{ApiError, FhirResponse};
use super::scopes::Letter;

/// The resource to validate (the body, or the `resource` parameter of a Parameters body)
/// and the profiles the Parameters ask for.
fn resource_of(body: Value) -> Result<(Value, Vec<String>), ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Ok((body, Vec::new()));
    }
    let params = body
        .get("parameter")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let named = |name: &'static str| {
        params
            .iter()
            .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
    };
    let profiles = named("profile")
        .filter_map(|p| {
            ["valueUri", "valueCanonical", "valueString"]
                .iter()
                .find_map(|key| p.get(*key).and_then(Value::as_str))
        })
        .map(str::to_owned)
        .collect();
    let resource = named("resource")
        .find_map(|p| p.get("resource"))
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request("a Parameters body needs a 'resource' parameter with a resource")
        })?;
    Ok((resource, profiles))
}

/// The `profile` values of the URL's query.
fn profiles_in_query(query: Option<&str>) -> Result<Vec<String>, ApiError> {
    let pairs = fhirkeep_query::params::decode_query(query.unwrap_or(""))
        .map_err(|e| ApiError::query(&e, false))?;
    Ok(pairs
        .into_iter()
        .filter(|(name, _)| name == "profile")
        .map(|(_, value)| value)
        .collect())
}

/// Issues for the profiles asked for and declared that were not checked (all but the base
/// definition of `resource_type`).
fn unchecked_profiles(resource_type: &str, asked: &[String], resource: &Value) -> Vec<Issue> {
    let base = format!("http://hl7.org/fhir/StructureDefinition/{resource_type}");
    let is_base = |url: &str| url.split('|').next() == Some(base.as_str());
    let mut issues: Vec<Issue> = asked
        .iter()
        .filter(|url| !is_base(url))
        .map(|url| Issue {
            severity: "error",
            code: "not-supported",
            path: resource_type.to_owned(),
            message: format!(
                "validation against profile {url} is not supported: only the base R4 \
                 definitions are checked"
            ),
        })
        .collect();
    let declared = resource
        .pointer("/meta/profile")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    issues.extend(
        declared
            .iter()
            .filter_map(Value::as_str)
            .filter(|url| !is_base(url) && !asked.iter().any(|a| a == url))
            .map(|url| Issue {
                severity: "information",
                code: "informational",
                path: format!("{resource_type}.meta.profile"),
                message: format!(
                    "the declared profile {url} was not checked: only the base R4 definitions are"
                ),
            }),
    );
    issues
}

async fn run(
    info: &super::envelope::RequestInfo,
    resource_type: &str,
    id: Option<&str>,
    query: Option<&str>,
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
    let mut asked = profiles_in_query(query)?;
    let (resource, in_parameters) = resource_of(json_body(headers, body)?)?;
    asked.extend(in_parameters);
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
    issues.extend(unchecked_profiles(resource_type, &asked, &resource));
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
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    run(
        &info,
        &resource_type,
        None,
        query.as_deref(),
        &headers,
        &body,
    )
    .await
}

/// `POST [type]/[id]/$validate`
pub(crate) async fn validate_instance(
    State(_state): State<AppState>,
    Extension(info): Info,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> HandlerResult {
    run(
        &info,
        &resource_type,
        Some(&id),
        query.as_deref(),
        &headers,
        &body,
    )
    .await
}
