//! The server's hardening settings (TLS flag, CORS allowlist, limits) and the layers outside
//! the envelope: CORS (it answers browser preflights itself, before any token is asked for) and
//! `Strict-Transport-Security` on every response served over TLS.

use std::time::Duration;

use axum::Router;
use axum::http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LOCATION, CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, LOCATION, STRICT_TRANSPORT_SECURITY,
};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::limits::RateLimiter;

/// Default deepest JSON nesting of a request body (FHIR resources nest about 10 levels, a
/// Bundle adds 3); serde_json's own recursion limit (128) stays out of reach.
pub(crate) const DEFAULT_MAX_JSON_DEPTH: usize = 64;
/// Default requests per second per client: far above an interactive client, low enough that
/// one client cannot keep every blocking thread busy.
pub(crate) const DEFAULT_RATE_LIMIT: u32 = 200;
/// Default longest time a request may take before it is answered 503.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Two years, with subdomains: the value the HSTS preload list asks for.
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// The hardening part of [`super::ServerConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Hardening {
    /// The server speaks TLS: every response carries `Strict-Transport-Security`.
    pub(crate) tls: bool,
    /// Origins a browser may call the API from (`--cors-origin`); empty: CORS is refused.
    pub(crate) cors_origins: Vec<HeaderValue>,
    /// Deepest JSON nesting accepted in a request body (deeper: 400).
    pub(crate) max_json_depth: usize,
    /// Requests per second per client (`None`: unlimited).
    pub(crate) rate_limiter: Option<RateLimiter>,
    /// Longest a request may take before it is answered 503.
    pub(crate) request_timeout: Duration,
}

impl Default for Hardening {
    fn default() -> Self {
        Hardening {
            tls: false,
            cors_origins: Vec::new(),
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            rate_limiter: Some(RateLimiter::new(DEFAULT_RATE_LIMIT)),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Checks a `--cors-origin` value: an explicit `scheme://host[:port]` origin (no `*`, no
/// path), as browsers send it in `Origin`.
pub(crate) fn parse_origin(text: &str) -> Result<HeaderValue, String> {
    let text = text.trim().trim_end_matches('/');
    let valid = text.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '*', '?', '#', ' ', '@'])
    });
    if !valid {
        return Err(format!(
            "{text:?} is not an origin: give scheme://host[:port] (no wildcard, no path)"
        ));
    }
    HeaderValue::from_str(text).map_err(|_| format!("{text:?} is not a valid origin"))
}

/// Adds the layers outside the envelope to the finished router.
pub(crate) fn outer_layers(router: Router, hardening: &Hardening) -> Router {
    let router = if hardening.cors_origins.is_empty() {
        // Deny by default: no CORS headers at all, so browsers refuse cross-origin calls.
        router
    } else {
        router.layer(cors_layer(&hardening.cors_origins))
    };
    if hardening.tls {
        // Outermost, so that CORS preflight answers carry it too.
        router.layer(axum::middleware::map_response(add_hsts))
    } else {
        router
    }
}

async fn add_hsts(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
    response
}

/// The CORS policy: exactly the listed origins, the FHIR methods and headers. No
/// credentials: tokens travel in `Authorization`, never in cookies.
fn cors_layer(origins: &[HeaderValue]) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            ACCEPT,
            IF_MATCH,
            IF_NONE_MATCH,
            HeaderName::from_static("if-none-exist"),
            IF_MODIFIED_SINCE,
            HeaderName::from_static("prefer"),
        ])
        .expose_headers([ETAG, LOCATION, CONTENT_LOCATION, LAST_MODIFIED])
        .max_age(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_be_explicit() {
        assert_eq!(
            parse_origin("https://app.example.org/").unwrap(),
            "https://app.example.org"
        );
        assert!(parse_origin("http://localhost:3000").is_ok());
        for bad in [
            "*",
            "https://*.example.org",
            "app.example.org",
            "https://a/b",
            "ftp://a",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad} accepted");
        }
    }
}
