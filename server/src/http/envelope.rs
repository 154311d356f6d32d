//! The middleware around every route: request id, authentication (under `--auth smart`:
//! the bearer token becomes the request's [`Grant`] and its access context, or a 401), the
//! per-client rate limit (429, `limits.rs`), format
//! negotiation
//! (`_format`, `Accept`: 406 for anything but JSON), serialization of FHIR bodies (`_pretty`),
//! OperationOutcomes for error responses made outside the handlers, security headers, the
//! audit leaf of requests the engine never saw, and one PHI-free log line per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhirkeep_engine::audit::{AuditAction, AuditOutcome};
use fhirkeep_engine::store::{AccessContext, AccessRecord};
use serde_json::Value;

use super::auth::{AuthError, Grant, bearer_token};
use super::response::{
    ApiError, Audited, Denied, PendingBody, PendingStoredBody, outcome, outcome_for_status,
};
use super::{AppState, is_public_path};

/// The client recorded for HTTP requests without a token (`--auth none`, refusals).
pub(crate) const HTTP_CLIENT: &str = "fhirkeep-http";
/// The FHIR JSON media type of every body the server sends.
pub(crate) const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static NOSNIFF: HeaderName = HeaderName::from_static("x-content-type-options");

/// What handlers learn from the envelope about their request.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    /// Who asks, from where, under which request id: passed to every engine call.
    pub(crate) ctx: AccessContext,
    /// What the request may do (everything under `--auth none`).
    pub(crate) grant: Grant,
}

/// Authenticates a request: its grant, a PHI-free label for the log, or the refusal.
fn authenticate(state: &AppState, req: &Request) -> (Grant, &'static str, Option<AuthError>) {
    let Some(smart) = state.smart() else {
        return (Grant::unrestricted(HTTP_CLIENT), "none", None);
    };
    if req.method() == Method::GET && is_public_path(state, req.uri().path()) {
        return (Grant::nothing(HTTP_CLIENT), "public", None);
    }
    let validated = bearer_token(req.headers())
        .and_then(|token| token.ok_or(AuthError::Missing))
        .and_then(|token| smart.validate(token));
    match validated {
        Ok(grant) => (grant, "token", None),
        Err(error) => (Grant::nothing(HTTP_CLIENT), "refused", Some(error)),
    }
}

/// The 401 of a missing or invalid token (RFC 6750): no `error` when there was no token.
fn unauthorized(error: AuthError) -> Response {
    let (challenge, code) = match error {
        AuthError::Missing => ("Bearer realm=\"fhirkeep\"".to_owned(), "login"),
        AuthError::Invalid(description) => (
            format!(
                "Bearer realm=\"fhirkeep\", error=\"invalid_token\", error_description=\"{description}\""
            ),
            if description.contains("expired") {
                "expired"
            } else {
                "security"
            },
        ),
    };
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(WWW_AUTHENTICATE, value);
    }
    response
        .extensions_mut()
        .insert(PendingBody(outcome("error", code, error.description())));
    response.extensions_mut().insert(Denied);
    response
}

/// The middleware itself (see the module documentation).
pub(crate) async fn envelope(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    // The template (`/{type}/{id}`), never the path: ids are PHI-adjacent.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "<unmatched>".to_owned(), |p| p.as_str().to_owned());
    let request_id = uuid::Uuid::new_v4().to_string();
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let (grant, auth, refusal) = authenticate(&state, &req);
    let throttled = super::limits::throttle(&state, auth == "token", &grant.subject, &source);
    let ctx = AccessContext::new(
        grant.subject.clone(),
        grant.client.clone(),
        source,
        request_id.clone(),
    );
    let control = ControlParams::of(req.uri().query());
    // Export files are NDJSON: clients ask for that, not for JSON.
    let ndjson = super::export::is_file_path(req.uri().path());

    let negotiated = if ndjson {
        Ok(())
    } else {
        negotiate(req.headers(), control.format.as_deref())
    };
    let mut response = match (throttled, refusal, negotiated) {
        (Some(too_many), _, _) => too_many,
        (None, Some(error), _) => unauthorized(error),
        (None, None, Err(refusal)) => refusal.into_response(),
        (None, None, Ok(())) => {
            req.extensions_mut().insert(Arc::new(RequestInfo {
                ctx: ctx.clone(),
                grant,
            }));
            next.run(req).await
        }
    };
    if auth == "token"
        && response.status() == StatusCode::FORBIDDEN
        && response.extensions().get::<Denied>().is_some()
    {
        // RFC 6750: a valid token whose scopes do not allow the request.
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"fhirkeep\", error=\"insufficient_scope\""),
        );
    }
    finish(&mut response, control.pretty, &request_id);
    let status = response.status();
    if response.extensions().get::<Audited>().is_none() {
        let denied = response.extensions().get::<Denied>().is_some();
        record_unaudited(&state, ctx, status, denied).await;
    }
    tracing::info!(
        method = %method,
        route = %route,
        status = status.as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        request_id = %request_id,
        auth = %auth,
        "request"
    );
    response
}

/// `_format` and `_pretty`, the query parameters every interaction accepts.
#[derive(Debug, Default)]
struct ControlParams {
    format: Option<String>,
    pretty: bool,
}

impl ControlParams {
    fn of(query: Option<&str>) -> Self {
        let mut params = ControlParams::default();
        let Some(query) = query else {
            return params;
        };
        for (name, value) in fhirkeep_query::params::decode_query(query).unwrap_or_default() {
            match name.as_str() {
                // An unencoded `+` (application/fhir+json) arrives as a space.
                "_format" => params.format = Some(value.replace(' ', "+")),
                "_pretty" => params.pretty = value == "true",
                _ => {}
            }
        }
        params
    }
}

/// The media types (and `_format` short forms) answered with FHIR JSON.
pub(crate) fn is_json_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir"
    )
}

/// 406 unless the client accepts JSON (`_format` wins over `Accept`, as FHIR says).
fn negotiate(headers: &HeaderMap, format: Option<&str>) -> Result<(), ApiError> {
    let refuse = || {
        ApiError::http(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "only JSON (application/fhir+json) is supported; XML is not",
        )
    };
    if let Some(format) = format {
        return if is_json_type(format) {
            Ok(())
        } else {
            Err(refuse())
        };
    }
    let Some(accept) = headers.get(ACCEPT) else {
        return Ok(());
    };
    let accept = accept.to_str().map_err(|_| refuse())?;
    if accept.trim().is_empty() {
        return Ok(());
    }
    let acceptable = accept.split(',').any(|range| {
        let essence = range.split(';').next().unwrap_or("").trim();
        essence == "*/*" || essence == "application/*" || is_json_type(essence)
    });
    if acceptable { Ok(()) } else { Err(refuse()) }
}

/// Serializes a pending FHIR body, gives bodiless error responses an OperationOutcome, and
/// sets the headers every response carries.
fn finish(response: &mut Response, pretty: bool, request_id: &str) {
    let status = response.status();
    let stored = response.extensions_mut().remove::<PendingStoredBody>();
    if let Some(PendingStoredBody(json)) = stored {
        let value = if pretty {
            // Indentation needs the structure; the compact form goes out as stored.
            serde_json::from_slice::<Value>(&json).ok()
        } else {
            None
        };
        match value {
            Some(value) => {
                response.extensions_mut().insert(PendingBody(value));
            }
            None => {
                *response.body_mut() = Body::from(json);
                let headers = response.headers_mut();
                headers.remove(CONTENT_LENGTH);
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
            }
        }
    }
    let body = match response.extensions_mut().remove::<PendingBody>() {
        Some(PendingBody(value)) => Some(value),
        None if status.is_client_error() || status.is_server_error() => {
            let already_fhir = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/fhir+json"));
            (!already_fhir).then(|| outcome_for_status(status))
        }
        None => None,
    };
    if let Some(value) = body {
        let bytes = if pretty {
            serde_json::to_vec_pretty(&value)
        } else {
            serde_json::to_vec(&value)
        };
        match bytes {
            Ok(bytes) => {
                *response.body_mut() = Body::from(bytes);
                let headers = response.headers_mut();
                headers.remove(CONTENT_LENGTH);
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
            }
            Err(_) => {
                // A JSON value always serializes; should it not, the client still gets FHIR.
                tracing::error!("could not serialize a response body");
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                *response.body_mut() =
                    Body::from(outcome_for_status(StatusCode::INTERNAL_SERVER_ERROR).to_string());
                let headers = response.headers_mut();
                headers.remove(CONTENT_LENGTH);
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
            }
        }
    }
    let headers = response.headers_mut();
    headers.insert(NOSNIFF.clone(), HeaderValue::from_static("nosniff"));
    // Every response: bodies carry resources or outcomes about them, and none may be kept
    // in a shared or browser cache.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID.clone(), id);
    }
}

/// Records a request the engine did not audit (refused before reaching it, or answered
/// without it, such as `/metadata`), so that every request leaves a leaf.
/// `denied`: refused by authentication or authorization (recorded as such even when the
/// client was told 404).
async fn record_unaudited(state: &AppState, ctx: AccessContext, status: StatusCode, denied: bool) {
    let (action, outcome) = if status.is_success() || status.is_redirection() {
        (AuditAction::Other("http".into()), AuditOutcome::Success)
    } else {
        let outcome = match status {
            _ if denied => AuditOutcome::Denied,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => AuditOutcome::Denied,
            StatusCode::NOT_FOUND => AuditOutcome::NotFound,
            s if s.is_server_error() => AuditOutcome::Error,
            _ => AuditOutcome::Invalid,
        };
        (AuditAction::Other("http-refused".into()), outcome)
    };
    let db = state.db();
    let recorded = tokio::task::spawn_blocking(move || {
        db.store().record_access(
            &ctx,
            AccessRecord {
                action,
                resource_type: None,
                id: None,
                version: None,
                outcome,
                query_hash: None,
            },
        )
    })
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::error!("could not record a request in the audit log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_types_and_accept_ranges() {
        assert!(is_json_type("json"));
        assert!(is_json_type("application/fhir+json; fhirVersion=4.0"));
        assert!(!is_json_type("xml"));
        assert!(!is_json_type("application/fhir+xml"));
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("text/html, */*;q=0.8"));
        assert!(negotiate(&headers, None).is_ok());
        headers.insert(ACCEPT, HeaderValue::from_static("application/fhir+xml"));
        assert!(negotiate(&headers, None).is_err());
        assert!(negotiate(&headers, Some("json")).is_ok());
        assert!(negotiate(&HeaderMap::new(), Some("xml")).is_err());
    }
}
