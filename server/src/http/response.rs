//! Responses before the envelope finishes them: FHIR bodies as JSON values, errors as
//! OperationOutcomes, and the marker that says whether the engine already audited a request.
//!
//! Handlers do not serialize: they attach a [`PendingBody`] and the envelope serializes it
//! once, with `_pretty` and the content type applied in one place.

use std::any::Any;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fhirkeep_query::Error;
use serde_json::{Value, json};

/// A FHIR JSON body waiting to be serialized by the envelope.
#[derive(Debug, Clone)]
pub(crate) struct PendingBody(pub(crate) Value);

/// JSON already serialized (compact), such as a resource exactly as the store returned it or
/// a searchset Bundle with stored resources copied in, which the envelope sends as is unless
/// `_pretty` asks for indentation: no parsing and re-serializing of resources.
#[derive(Debug, Clone)]
pub(crate) struct PendingStoredBody(pub(crate) Vec<u8>);

/// The body of a [`FhirResponse`].
#[derive(Debug)]
pub(crate) enum ResponseBody {
    /// A JSON value to serialize.
    Json(Value),
    /// Serialized JSON (a stored resource, a Bundle of them) to send as is.
    Stored(Vec<u8>),
}

impl From<Value> for ResponseBody {
    fn from(value: Value) -> Self {
        ResponseBody::Json(value)
    }
}

/// Marks a response whose request the engine recorded in the audit log itself, so that the
/// envelope does not record it a second time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Audited;

/// Marks a response that refused a request for authorization reasons (401, 403, or a
/// resource hidden as 404), so that the envelope audits it as denied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Denied;

/// A successful FHIR response.
#[derive(Debug)]
pub(crate) struct FhirResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<ResponseBody>,
    /// Whether the engine audited the request.
    pub(crate) audited: bool,
}

impl FhirResponse {
    /// A 200 with `body`, audited by the engine.
    pub(crate) fn ok(body: Value) -> Self {
        FhirResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Some(ResponseBody::Json(body)),
            audited: true,
        }
    }

    /// A 200 with serialized JSON (a stored resource, a searchset Bundle), sent as is.
    pub(crate) fn stored(json: Vec<u8>) -> Self {
        FhirResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Some(ResponseBody::Stored(json)),
            audited: true,
        }
    }

    pub(crate) fn header(mut self, name: HeaderName, value: &str) -> Self {
        // Values are built from ids, versions and URLs the server made; one that is not a
        // valid header value is left out rather than failing the request.
        if let Ok(value) = HeaderValue::from_str(value) {
            self.headers.insert(name, value);
        }
        self
    }
}

impl IntoResponse for FhirResponse {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.headers).into_response();
        match self.body {
            Some(ResponseBody::Json(body)) => {
                response.extensions_mut().insert(PendingBody(body));
            }
            Some(ResponseBody::Stored(json)) => {
                response.extensions_mut().insert(PendingStoredBody(json));
            }
            None => {}
        }
        if self.audited {
            response.extensions_mut().insert(Audited);
        }
        response
    }
}

/// An error answered as an OperationOutcome.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    outcome: Value,
    /// Whether the engine audited the failed request.
    audited: bool,
    /// Whether authorization refused the request.
    denied: bool,
}

impl ApiError {
    /// An error of the query layer or engine, through their one mapping to status and
    /// OperationOutcome. `audited`: whether the engine recorded the attempt.
    pub(crate) fn query(error: &Error, audited: bool) -> Self {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            // The kind only: messages may name internal state, never shown to clients.
            tracing::error!(kind = error.kind_name(), "request failed in the database");
        }
        ApiError {
            status,
            outcome: error.operation_outcome(),
            audited,
            denied: false,
        }
    }

    /// A refusal at the HTTP level (format, content type, route), before the engine.
    pub(crate) fn http(status: StatusCode, code: &str, diagnostics: &str) -> Self {
        ApiError {
            status,
            outcome: outcome("error", code, diagnostics),
            audited: false,
            denied: false,
        }
    }

    /// 403: the token's scopes do not allow the interaction.
    pub(crate) fn forbidden(diagnostics: &str) -> Self {
        ApiError {
            denied: true,
            ..ApiError::http(StatusCode::FORBIDDEN, "forbidden", diagnostics)
        }
    }

    /// A resource outside the token's reach: with the deny status 404 the answer is the
    /// same as for a resource that does not exist; otherwise a 403.
    pub(crate) fn hidden(deny: StatusCode) -> Self {
        let error = if deny == StatusCode::NOT_FOUND {
            ApiError::query(&Error::Engine(fhirkeep_engine::Error::NotFound), false)
        } else {
            ApiError::http(
                deny,
                "forbidden",
                "the resource is outside what the token may reach",
            )
        };
        ApiError {
            denied: true,
            ..error
        }
    }

    /// A request the server refuses as malformed (400), before the engine.
    pub(crate) fn bad_request(diagnostics: &str) -> Self {
        ApiError::http(StatusCode::BAD_REQUEST, "invalid", diagnostics)
    }

    /// A server failure without detail.
    pub(crate) fn internal() -> Self {
        ApiError::http(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "internal server error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(PendingBody(self.outcome));
        if self.audited {
            response.extensions_mut().insert(Audited);
        }
        if self.denied {
            response.extensions_mut().insert(Denied);
        }
        response
    }
}

/// An OperationOutcome with one issue.
pub(crate) fn outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    })
}

/// The OperationOutcome for an error response that carries none (a status made by axum or a
/// layer: 404 route, 405, 413, a path that did not parse). Generic on purpose: the text axum
/// would give may quote the request.
pub(crate) fn outcome_for_status(status: StatusCode) -> Value {
    let (code, diagnostics) = match status {
        StatusCode::NOT_FOUND => ("not-found", "no such resource or route"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("not-supported", "this method is not supported on this URL")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("too-costly", "the request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "not-supported",
            "the request body must be application/fhir+json",
        ),
        StatusCode::NOT_ACCEPTABLE => ("not-supported", "only JSON is supported"),
        s if s.is_server_error() => ("exception", "internal server error"),
        _ => ("invalid", "the request is not valid"),
    };
    outcome("error", code, diagnostics)
}

/// The response of [`tower_http::catch_panic`]: a 500 without detail (the panic message may
/// name request data, so it is neither logged nor sent).
pub(crate) fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal().into_response()
}
