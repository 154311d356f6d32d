//! Tests of the hardening layers through the real router over a real encrypted database:
//! CORS preflights, HSTS only under TLS, JSON depth, the per-client rate limit (by source
//! address and by token subject), the request timeout and `--max-count`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, AUTHORIZATION,
};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::get;
use fhirkeep_engine::audit::{AuditAction, AuditOutcome};
use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_query::{Database, SearchLimits};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::auth::{ISSUER_KEY_PURPOSE, IssuerKey, TokenClaims};
use super::hardening::{Hardening, parse_origin};
use super::limits::RateLimiter;
use super::{AppState, AuthMode, OAuthUris, ServerConfig, SmartSettings, app, layered, routes};

const BASE: &str = "http://fhir.test";
const APP_ORIGIN: &str = "https://app.example.org";

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    app: Router,
}

fn harness_with(hardening: Hardening, smart: bool, limits: SearchLimits) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    create_key_file(&key).unwrap();
    let db = Database::builder(dir.path().join("db"))
        .key(KeySource::KeyFile(key))
        .limits(limits)
        .create()
        .unwrap();
    let auth = if smart {
        AuthMode::Smart(SmartSettings {
            jwks: Vec::new(),
            jwks_file: None,
            issuer: None,
            require_mfa: false,
            endpoints: OAuthUris::default(),
        })
    } else {
        AuthMode::None
    };
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: BASE.to_owned(),
            max_body_bytes: super::DEFAULT_BODY_LIMIT,
            auth,
            hardening,
            ..ServerConfig::for_tests()
        },
    );
    Harness {
        _dir: dir,
        app: app(state.clone()),
        state,
    }
}

fn harness(hardening: Hardening) -> Harness {
    harness_with(hardening, false, SearchLimits::default())
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn issue_code(&self) -> &str {
        self.body["issue"][0]["code"].as_str().unwrap_or("")
    }

    fn request_id(&self) -> String {
        self.header("x-request-id").unwrap().to_owned()
    }
}

async fn send_to(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let raw = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap()
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// A request from `source` (what `into_make_service_with_connect_info` gives handlers).
fn from(source: &str, builder: axum::http::request::Builder) -> axum::http::request::Builder {
    let addr: SocketAddr = format!("{source}:40000").parse().unwrap();
    builder.extension(ConnectInfo(addr))
}

fn create_patient(body: &Value) -> Request<Body> {
    Request::post("/Patient")
        .header("content-type", "application/fhir+json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn preflight(origin: &str) -> Request<Body> {
    Request::options("/Patient")
        .header("origin", origin)
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization, content-type, if-match, prefer",
        )
        .body(Body::empty())
        .unwrap()
}

fn with_cors() -> Hardening {
    Hardening {
        cors_origins: vec![parse_origin(APP_ORIGIN).unwrap()],
        ..Hardening::default()
    }
}

#[tokio::test]
async fn cors_preflight_allows_listed_origins_only() {
    // Under --auth smart: a preflight carries no token and must still be answered.
    let h = harness_with(with_cors(), true, SearchLimits::default());
    let allowed = send_to(&h.app, preflight(APP_ORIGIN)).await;
    assert!(allowed.status.is_success(), "{}", allowed.status);
    assert_eq!(
        allowed.header(ACCESS_CONTROL_ALLOW_ORIGIN),
        Some(APP_ORIGIN)
    );
    let methods = allowed.header(ACCESS_CONTROL_ALLOW_METHODS).unwrap();
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
        assert!(methods.contains(method), "{methods}");
    }
    let headers = allowed
        .header(ACCESS_CONTROL_ALLOW_HEADERS)
        .unwrap()
        .to_ascii_lowercase();
    for header in ["authorization", "if-none-exist", "prefer", "if-match"] {
        assert!(headers.contains(header), "{headers}");
    }

    let refused = send_to(&h.app, preflight("https://evil.example.com")).await;
    assert_eq!(refused.header(ACCESS_CONTROL_ALLOW_ORIGIN), None);

    // A simple request from the allowed origin sees the headers it needs.
    let metadata = send_to(
        &h.app,
        Request::get("/metadata")
            .header("origin", APP_ORIGIN)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(metadata.status, StatusCode::OK);
    assert_eq!(
        metadata.header(ACCESS_CONTROL_ALLOW_ORIGIN),
        Some(APP_ORIGIN)
    );
    let exposed = metadata
        .header(ACCESS_CONTROL_EXPOSE_HEADERS)
        .unwrap()
        .to_ascii_lowercase();
    for header in ["etag", "location", "content-location", "last-modified"] {
        assert!(exposed.contains(header), "{exposed}");
    }
}

#[tokio::test]
async fn cors_is_refused_without_an_allowlist() {
    let h = harness(Hardening::default());
    let reply = send_to(&h.app, preflight(APP_ORIGIN)).await;
    assert_eq!(reply.header(ACCESS_CONTROL_ALLOW_ORIGIN), None);
    assert!(!reply.status.is_success(), "{}", reply.status);
    let get = send_to(
        &h.app,
        Request::get("/metadata")
            .header("origin", APP_ORIGIN)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(get.header(ACCESS_CONTROL_ALLOW_ORIGIN), None);
}

#[tokio::test]
async fn hsts_on_every_response_under_tls_only() {
    let tls = harness(Hardening {
        tls: true,
        ..with_cors()
    });
    let requests = || {
        [
            Request::get("/metadata").body(Body::empty()).unwrap(),
            Request::get("/Patient/missing")
                .body(Body::empty())
                .unwrap(),
            preflight(APP_ORIGIN),
        ]
    };
    for req in requests() {
        let reply = send_to(&tls.app, req).await;
        assert_eq!(
            reply.header("strict-transport-security"),
            Some("max-age=63072000; includeSubDomains"),
            "{}",
            reply.status
        );
    }
    // The envelope's security headers stay.
    let reply = send_to(
        &tls.app,
        Request::get("/metadata").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));

    let plain = harness(with_cors());
    for req in requests() {
        let reply = send_to(&plain.app, req).await;
        assert_eq!(reply.header("strict-transport-security"), None);
    }
}

/// A Patient whose extension nests `levels` objects deep in total.
fn nested_patient(levels: usize) -> Value {
    // Patient {} is level 1; each extension adds an array and an object.
    let mut inner = json!({"url": "http://example.org/x", "valueString": "[{not brackets}]"});
    let mut depth = 3; // Patient, extension array, extension object
    while depth + 2 <= levels {
        inner = json!({"url": "http://example.org/x", "extension": [inner]});
        depth += 2;
    }
    json!({"resourceType": "Patient", "extension": [inner]})
}

#[tokio::test]
async fn json_nesting_deeper_than_the_limit_is_a_400() {
    let h = harness(Hardening {
        max_json_depth: 9,
        ..Hardening::default()
    });
    let ok = send_to(&h.app, create_patient(&nested_patient(9))).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    let deep = send_to(&h.app, create_patient(&nested_patient(11))).await;
    assert_eq!(deep.status, StatusCode::BAD_REQUEST, "{}", deep.body);
    assert_eq!(deep.body["resourceType"], "OperationOutcome");
    assert_eq!(deep.issue_code(), "too-costly");
    assert!(deep.body.to_string().contains("deeper than 9"));
    // Transaction bundles are checked too.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": nested_patient(9), "request": {"method": "POST", "url": "Patient"}}
    ]});
    let reply = send_to(
        &h.app,
        Request::post("/")
            .header("content-type", "application/fhir+json")
            .body(Body::from(bundle.to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    // Refused before the engine: audited by the envelope as a refusal.
    let leaves = leaves_of(&h.state, &deep.request_id());
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].action, AuditAction::Other("http-refused".into()));
    assert_eq!(leaves[0].outcome, AuditOutcome::Invalid);
}

#[tokio::test]
async fn a_chunked_json_body_over_the_size_limit_is_a_413() {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: BASE.to_owned(),
            max_body_bytes: 100,
            auth: AuthMode::None,
            ..ServerConfig::for_tests()
        },
    );
    let body = nested_patient(3).to_string() + &" ".repeat(200);
    // No Content-Length header (as with a chunked upload): the limit applies while reading.
    let stream = Body::from(body);
    let reply = send_to(
        &app(state),
        Request::post("/Patient")
            .header("content-type", "application/fhir+json")
            .body(stream)
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.issue_code(), "too-costly");
}

fn leaves_of(state: &AppState, request_id: &str) -> Vec<fhirkeep_engine::audit::AuditRecord> {
    let db = state.db();
    db.store().flush_audit().unwrap();
    let size = db.store().audit_size().unwrap();
    (0..size)
        .map(|seq| db.store().audit_leaf(seq).unwrap().record)
        .filter(|r| r.request_id == request_id)
        .collect()
}

fn rate_limited(rate: u32) -> Hardening {
    Hardening {
        rate_limiter: Some(RateLimiter::new(rate)),
        ..Hardening::default()
    }
}

#[tokio::test]
async fn over_the_rate_limit_a_client_gets_429_with_retry_after() {
    // One request per second: the second comes well within the second (bursts of 1).
    let h = harness(rate_limited(1));
    let metadata = |source: &str| {
        from(source, Request::get("/metadata"))
            .body(Body::empty())
            .unwrap()
    };
    let first = send_to(&h.app, metadata("192.0.2.1")).await;
    assert_eq!(first.status, StatusCode::OK);
    let refused = send_to(&h.app, metadata("192.0.2.1")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["resourceType"], "OperationOutcome");
    assert_eq!(refused.issue_code(), "throttled");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 1);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
    // Audited like the envelope's other refusals.
    let leaves = leaves_of(&h.state, &refused.request_id());
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].action, AuditAction::Other("http-refused".into()));
    assert_ne!(leaves[0].outcome, AuditOutcome::Success);
    // Another address has its own bucket.
    let other = send_to(&h.app, metadata("192.0.2.2")).await;
    assert_eq!(other.status, StatusCode::OK);
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = send_to(&h.app, metadata("192.0.2.1")).await;
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn with_a_token_the_client_is_its_subject() {
    let h = harness_with(rate_limited(1), true, SearchLimits::default());
    let key = IssuerKey::from_secret(h.state.db().store().derive_secret(ISSUER_KEY_PURPOSE));
    let now = chrono::Utc::now().timestamp();
    let token = |sub: &str| {
        key.sign(&TokenClaims {
            iss: BASE.to_owned(),
            aud: BASE.to_owned(),
            sub: sub.to_owned(),
            client_id: "test-app".to_owned(),
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: "system/*.read".to_owned(),
            patient: None,
        })
        .unwrap()
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let search = |token: &str| {
        from("192.0.2.7", Request::get("/Patient"))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send_to(&h.app, search(&alice)).await.status, StatusCode::OK);
    let refused = send_to(&h.app, search(&alice)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    // Same address, another subject: not limited by alice's requests.
    assert_eq!(send_to(&h.app, search(&bob)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_over_the_timeout_is_a_503() {
    let state = harness(Hardening {
        request_timeout: Duration::from_millis(100),
        ..Hardening::default()
    })
    .state;
    let slow = routes()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK
            }),
        )
        .route("/fast", get(|| async { StatusCode::NO_CONTENT }));
    let app = layered(slow, state.clone());
    let started = std::time::Instant::now();
    let reply = send_to(&app, Request::get("/slow").body(Body::empty()).unwrap()).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    assert_eq!(reply.issue_code(), "timeout");
    let leaves = leaves_of(&state, &reply.request_id());
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].outcome, AuditOutcome::Error);
    // Fast routes are untouched.
    let fast = send_to(&app, Request::get("/fast").body(Body::empty()).unwrap()).await;
    assert_eq!(fast.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn count_is_capped_by_max_count() {
    let limits = SearchLimits {
        max_count: 3,
        default_count: 3,
        ..SearchLimits::default()
    };
    let h = harness_with(Hardening::default(), false, limits);
    for i in 0..5 {
        let patient = json!({"resourceType": "Patient", "active": i % 2 == 0});
        let reply = send_to(&h.app, create_patient(&patient)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let reply = send_to(
        &h.app,
        Request::get("/Patient?_count=100&_total=accurate")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["entry"].as_array().map(Vec::len), Some(3));
    assert_eq!(reply.body["total"], 5);
}
