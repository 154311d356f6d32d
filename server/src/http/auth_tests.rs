//! `oneshot` tests of SMART on FHIR authentication and authorization, with real JWTs signed
//! by the test-only keys in `server/tests/fixtures/` (RS256, ES256) and by the server's own
//! issuer key (EdDSA), against a real database in a temporary directory.

#![allow(clippy::unwrap_used, clippy::panic)]

use axum::Router;
use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use fhirkeep_engine::audit::{AuditOutcome, AuditRecord};
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::Database;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt as _;

use super::auth::{ISSUER_KEY_PURPOSE, IssuerKey, TokenClaims, trusted_keys};
use super::{AppState, AuthMode, ServerConfig, SmartSettings, app};

const BASE: &str = "http://fhir.test";
const ISSUER: &str = "https://issuer.test";
const JWKS: &str = include_str!("../../tests/fixtures/test-only-jwks.json");
const RSA_KEY: &str = include_str!("../../tests/fixtures/test-only-rsa-private.pem");
const EC_KEY: &str = include_str!("../../tests/fixtures/test-only-ec-p256-private.pem");
const UNTRUSTED_KEY: &str =
    include_str!("../../tests/fixtures/test-only-untrusted-ec-p256-private.pem");

pub(super) struct Options {
    deny_status: StatusCode,
    require_mfa: bool,
    issuer: Option<String>,
    /// The default per-client rate limit (off for tests that send thousands of requests).
    rate_limited: bool,
}

impl Options {
    /// The defaults without the rate limit.
    pub(super) fn without_rate_limit() -> Options {
        Options {
            rate_limited: false,
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            require_mfa: false,
            deny_status: StatusCode::NOT_FOUND,
            issuer: None,
            rate_limited: true,
        }
    }
}

pub(super) struct Harness {
    _dir: TempDir,
    state: AppState,
    pub(super) app: Router,
}

struct Reply {
    status: StatusCode,
    www_authenticate: String,
    request_id: String,
    body: Value,
    raw: String,
}

impl Reply {
    fn issue_code(&self) -> &str {
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "{}",
            self.body
        );
        self.body["issue"][0]["code"].as_str().unwrap()
    }

    /// The `Type/id` of every entry of a Bundle.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.body["entry"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .filter_map(|e| {
                let r = &e["resource"];
                Some(format!(
                    "{}/{}",
                    r["resourceType"].as_str()?,
                    r["id"].as_str()?
                ))
            })
            .filter(|k| !k.starts_with("OperationOutcome"))
            .collect();
        keys.sort();
        keys
    }
}

pub(super) fn harness_with(options: Options) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    seed(&db);
    let (jwks, skipped) = trusted_keys(&serde_json::from_str(JWKS).unwrap());
    assert_eq!((jwks.len(), skipped), (2, 0));
    let mut hardening = super::hardening::Hardening::default();
    if !options.rate_limited {
        hardening.rate_limiter = None;
    }
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: format!("{BASE}/"),
            max_body_bytes: super::DEFAULT_BODY_LIMIT,
            auth: AuthMode::Smart(SmartSettings {
                jwks,
                jwks_file: None,
                issuer: options.issuer,
                require_mfa: options.require_mfa,
                endpoints: super::OAuthUris {
                    authorize: Some(format!("{ISSUER}/authorize")),
                    token: Some(format!("{ISSUER}/token")),
                },
            }),
            deny_status: options.deny_status,
            hardening,
        },
    );
    Harness {
        _dir: dir,
        app: app(state.clone()),
        state,
    }
}

fn harness() -> Harness {
    harness_with(Options::default())
}

impl Harness {
    /// The database behind the router (for checks that look past the API).
    pub(super) fn database(&self) -> std::sync::Arc<Database> {
        self.state.db()
    }
}

fn observation(id: &str, patient: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category,
        }]}],
        "code": {"text": "a measurement"},
        "subject": {"reference": format!("Patient/{patient}")},
    })
}

/// What a token for p1 may see of [`seed`]: p1's compartment.
pub(super) const P1_COMPARTMENT: &[&str] = &[
    "Patient/p1",
    "Observation/o1",
    "Observation/o3",
    "Observation/o4",
];

/// Two patients; p1 has a lab result (o1), a vital sign (o3) and an observation performed by
/// p2 (o4, which `_include=Observation:performer` would pull p2 in through); p2 has o2.
fn seed(db: &Database) {
    let ctx = AccessContext::local("seed");
    let mut o4 = observation("o4", "p1", "laboratory");
    o4["performer"] = json!([{"reference": "Patient/p2"}, {"reference": "Practitioner/dr1"}]);
    for resource in [
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]}),
        json!({"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Doc"}]}),
        observation("o1", "p1", "laboratory"),
        observation("o2", "p2", "laboratory"),
        observation("o3", "p1", "vital-signs"),
        o4,
    ] {
        let resource_type = resource["resourceType"].as_str().unwrap().to_owned();
        let id = resource["id"].as_str().unwrap().to_owned();
        db.update(&ctx, &resource_type, &id, resource, None)
            .unwrap();
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims of a valid token from the external issuer.
fn claims(scope: &str, patient: Option<&str>) -> Value {
    let mut claims = json!({
        "iss": ISSUER,
        "aud": BASE,
        "sub": "dr-secret-subject",
        "client_id": "test-app",
        "iat": now(),
        "exp": now() + 300,
        "scope": scope,
    });
    if let Some(patient) = patient {
        claims["patient"] = json!(patient);
    }
    claims
}

#[derive(Clone, Copy)]
enum Key {
    Rsa,
    Ec,
    Untrusted,
}

fn sign(key: Key, kid: Option<&str>, claims: &Value) -> String {
    let (algorithm, encoding, default_kid) = match key {
        Key::Rsa => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
            Some("test-rsa-1"),
        ),
        Key::Ec => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
            Some("test-ec-1"),
        ),
        // Claims to be the trusted EC key.
        Key::Untrusted => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(UNTRUSTED_KEY.as_bytes()).unwrap(),
            Some("test-ec-1"),
        ),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.or(default_kid).map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// A token of `scope` signed with the trusted EC key.
pub(super) fn token(scope: &str, patient: Option<&str>) -> String {
    sign(Key::Ec, None, &claims(scope, patient))
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(req).await.unwrap();
        let status = response.status();
        let header = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &axum::http::HeaderValue| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let www_authenticate = header(WWW_AUTHENTICATE);
        let request_id = header(axum::http::HeaderName::from_static("x-request-id"));
        let raw = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let raw = String::from_utf8(raw.to_vec()).unwrap();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).unwrap()
        };
        Reply {
            status,
            www_authenticate,
            request_id,
            body,
            raw,
        }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                builder = builder.header(CONTENT_TYPE, "application/fhir+json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        self.send(builder.body(body).unwrap()).await
    }

    async fn get(&self, uri: &str, token: &str) -> Reply {
        self.call(Method::GET, uri, Some(token), None).await
    }

    fn own_key(&self) -> IssuerKey {
        IssuerKey::from_secret(self.state.db().store().derive_secret(ISSUER_KEY_PURPOSE))
    }

    fn leaves_of(&self, request_id: &str) -> Vec<AuditRecord> {
        let db = self.state.db();
        db.store().flush_audit().unwrap();
        let size = db.store().audit_size().unwrap();
        (0..size)
            .map(|seq| db.store().audit_leaf(seq).unwrap().record)
            .filter(|r| r.request_id == request_id)
            .collect()
    }
}

fn assert_invalid_token(reply: &Reply, token: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    assert!(
        reply
            .www_authenticate
            .starts_with("Bearer realm=\"fhirkeep\", error=\"invalid_token\""),
        "{}",
        reply.www_authenticate
    );
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    assert!(!reply.raw.contains(token), "the body echoes the token");
    assert!(!reply.raw.contains("dr-secret-subject"));
}

#[tokio::test]
async fn without_a_token_every_route_but_metadata_and_smart_configuration_is_401() {
    let h = harness();
    for (method, uri) in [
        (Method::GET, "/Patient/p1"),
        (Method::GET, "/Observation?subject=Patient/p1"),
        (Method::GET, "/"),
        (Method::POST, "/"),
        (Method::GET, "/_history"),
        (Method::GET, "/Patient/p1/Observation"),
        (Method::GET, "/Patient/p1/_history"),
        (Method::DELETE, "/Patient/p1"),
        (Method::GET, "/no/such/route/at/all"),
        (Method::POST, "/metadata"),
    ] {
        let reply = h.call(method.clone(), uri, None, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(reply.www_authenticate, "Bearer realm=\"fhirkeep\"");
        assert_eq!(reply.issue_code(), "login");
        let leaves = h.leaves_of(&reply.request_id);
        assert_eq!(leaves.len(), 1, "{method} {uri}");
        assert_eq!(leaves[0].outcome, AuditOutcome::Denied);
        assert_eq!(leaves[0].actor.subject, "anonymous");
    }
    // Another scheme is no token either.
    let basic = h
        .send(
            Request::get("/Patient/p1")
                .header(AUTHORIZATION, "Basic dXNlcjpwYXNz")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(basic.www_authenticate, "Bearer realm=\"fhirkeep\"");

    let metadata = h.call(Method::GET, "/metadata", None, None).await;
    assert_eq!(metadata.status, StatusCode::OK);
    let security = &metadata.body["rest"][0]["security"];
    assert_eq!(
        security["service"][0]["coding"][0]["system"],
        "http://terminology.hl7.org/CodeSystem/restful-security-service"
    );
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let oauth = &security["extension"][0];
    assert_eq!(
        oauth["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert_eq!(oauth["extension"][0]["url"], "authorize");
    assert_eq!(oauth["extension"][1]["valueUri"], format!("{ISSUER}/token"));

    let smart = h
        .call(Method::GET, "/.well-known/smart-configuration", None, None)
        .await;
    assert_eq!(smart.status, StatusCode::OK, "{}", smart.body);
    assert_eq!(smart.body["issuer"], BASE);
    let capabilities = smart.body["capabilities"].as_array().unwrap();
    assert!(capabilities.contains(&json!("permission-v2")));
    assert!(capabilities.contains(&json!("permission-patient")));
    assert_eq!(smart.body["fhirkeep_issuer_key"]["kty"], "OKP");
    assert_eq!(smart.body["token_endpoint"], format!("{ISSUER}/token"));
    assert_eq!(
        smart.body["authorization_endpoint"],
        format!("{ISSUER}/authorize")
    );
}

#[tokio::test]
async fn invalid_tokens_are_401_invalid_token_without_echoing_them() {
    let h = harness_with(Options {
        issuer: Some(ISSUER.to_owned()),
        ..Options::default()
    });
    let scope = "system/*.*";
    let mut expired = claims(scope, None);
    expired["iat"] = json!(now() - 3600);
    expired["exp"] = json!(now() - 120);
    let mut wrong_audience = claims(scope, None);
    wrong_audience["aud"] = json!("http://other.test");
    let mut not_yet = claims(scope, None);
    not_yet["nbf"] = json!(now() + 600);
    let mut wrong_issuer = claims(scope, None);
    wrong_issuer["iss"] = json!("https://evil.test");
    let mut no_exp = claims(scope, None);
    no_exp.as_object_mut().unwrap().remove("exp");
    let cases = [
        ("expired", sign(Key::Ec, None, &expired), "expired"),
        (
            "wrong audience",
            sign(Key::Rsa, None, &wrong_audience),
            "audience",
        ),
        ("nbf in the future", sign(Key::Ec, None, &not_yet), "nbf"),
        (
            "wrong issuer",
            sign(Key::Rsa, None, &wrong_issuer),
            "issuer",
        ),
        ("no exp", sign(Key::Ec, None, &no_exp), "required claim"),
        (
            "signed by an untrusted key",
            sign(Key::Untrusted, None, &claims(scope, None)),
            "signature",
        ),
        (
            "untrusted key without kid",
            sign(Key::Untrusted, Some("nope"), &claims(scope, None)),
            "signature",
        ),
        ("garbage", "not.a.jwt".to_owned(), "not a valid JWT"),
        (
            "tampered payload",
            {
                let good = sign(Key::Rsa, None, &claims("patient/*.rs", Some("p1")));
                let parts: Vec<&str> = good.split('.').collect();
                let other = sign(Key::Rsa, None, &claims(scope, None));
                let other_payload = other.split('.').nth(1).unwrap();
                format!("{}.{}.{}", parts[0], other_payload, parts[2])
            },
            "signature",
        ),
    ];
    for (case, token, description) in &cases {
        let reply = h.get("/Patient/p1", token).await;
        assert_invalid_token(&reply, token);
        assert!(
            reply.www_authenticate.contains(description),
            "{case}: {}",
            reply.www_authenticate
        );
        let leaves = h.leaves_of(&reply.request_id);
        assert_eq!(leaves.len(), 1, "{case}");
        assert_eq!(leaves[0].outcome, AuditOutcome::Denied, "{case}");
        assert_eq!(leaves[0].actor.subject, "anonymous", "{case}");
    }
    let expired_reply = h.get("/Patient/p1", &cases[0].1).await;
    assert_eq!(expired_reply.issue_code(), "expired");

    // The same claims, properly signed, pass: RS256 and ES256, with or without a kid.
    for token in [
        sign(Key::Rsa, None, &claims(scope, None)),
        sign(Key::Ec, None, &claims(scope, None)),
        sign(Key::Ec, Some("unknown-kid"), &claims(scope, None)),
    ] {
        let reply = h.get("/Patient/p1", &token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let leaves = h.leaves_of(&reply.request_id);
        assert_eq!(leaves[0].actor.subject, "dr-secret-subject");
        assert_eq!(leaves[0].actor.client, "test-app");
    }
}

#[tokio::test]
async fn the_servers_own_tokens_are_accepted_within_an_hour_of_lifetime() {
    let h = harness();
    let key = h.own_key();
    let own = |lifetime: i64, iss: &str| {
        key.sign(&TokenClaims {
            iss: iss.to_owned(),
            aud: BASE.to_owned(),
            sub: "admin".to_owned(),
            client_id: "cli".to_owned(),
            iat: now(),
            nbf: now(),
            exp: now() + lifetime,
            jti: "j".to_owned(),
            scope: "user/Patient.rs".to_owned(),
            patient: None,
        })
        .unwrap()
    };
    let reply = h.get("/Patient/p2", &own(900, BASE)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let too_long = own(2 * 3600, BASE);
    assert_invalid_token(&h.get("/Patient/p2", &too_long).await, &too_long);
    let mut claims = TokenClaims {
        iss: BASE.to_owned(),
        aud: BASE.to_owned(),
        sub: "admin".to_owned(),
        client_id: "cli".to_owned(),
        iat: now() + 86_400,
        nbf: now(),
        exp: now() + 86_400 + 900,
        jti: "j".to_owned(),
        scope: "user/Patient.rs".to_owned(),
        patient: None,
    };
    let issued_in_the_future = key.sign(&claims).unwrap();
    assert_invalid_token(
        &h.get("/Patient/p2", &issued_in_the_future).await,
        &issued_in_the_future,
    );
    claims.iat = now();
    claims.exp = now() + 900;
    assert_eq!(
        h.get("/Patient/p2", &key.sign(&claims).unwrap())
            .await
            .status,
        StatusCode::OK
    );
    // The own key only vouches for tokens naming the server as issuer.
    let foreign = own(900, ISSUER);
    assert_invalid_token(&h.get("/Patient/p2", &foreign).await, &foreign);
}

#[tokio::test]
async fn the_wrong_scope_for_an_interaction_is_403() {
    let h = harness();
    let read_only = token("user/Observation.rs user/Patient.read", None);
    let reply = h
        .call(
            Method::POST,
            "/Observation",
            Some(&read_only),
            Some(observation("new", "p1", "laboratory")),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(reply.issue_code(), "forbidden");
    assert_eq!(
        reply.www_authenticate,
        "Bearer realm=\"fhirkeep\", error=\"insufficient_scope\""
    );
    let leaves = h.leaves_of(&reply.request_id);
    assert_eq!(leaves[0].outcome, AuditOutcome::Denied);
    assert_eq!(leaves[0].actor.subject, "dr-secret-subject");
    for uri in ["/Condition?subject=Patient/p1", "/Practitioner/dr1", "/"] {
        let reply = h.get(uri, &read_only).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{uri}: {}", reply.body);
    }
    let delete = h
        .call(Method::DELETE, "/Observation/o1", Some(&read_only), None)
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);
    // Scopes that parse to nothing grant nothing.
    let nothing = token("openid fhirUser launch/patient patient/Nonsense.rs", None);
    assert_eq!(
        h.get("/Patient/p1", &nothing).await.status,
        StatusCode::FORBIDDEN
    );
    // patient/ scopes without a patient claim grant nothing.
    let no_patient = token("patient/*.rs", None);
    assert_eq!(
        h.get("/Observation/o1", &no_patient).await.status,
        StatusCode::FORBIDDEN
    );
    // The read scope reads.
    assert_eq!(
        h.get("/Observation/o2", &read_only).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_patient_token_reads_only_its_patients_compartment() {
    let h = harness();
    let p1 = token("patient/*.rs", Some("p1"));
    for uri in [
        "/Observation/o1",
        "/Patient/p1",
        "/Observation/o1/_history/1",
    ] {
        let reply = h.get(uri, &p1).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.body);
    }
    let missing = h.get("/Observation/does-not-exist", &p1).await;
    for uri in [
        "/Observation/o2",
        "/Patient/p2",
        "/Practitioner/dr1",
        "/Observation/o2/_history/1",
        "/Observation/o2/_history",
        "/Patient/p2/Observation",
    ] {
        let reply = h.get(uri, &p1).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}: {}", reply.body);
        // Indistinguishable from a resource that does not exist.
        assert_eq!(reply.body, missing.body, "{uri}");
        let leaves = h.leaves_of(&reply.request_id);
        assert_eq!(leaves[0].outcome, AuditOutcome::Denied, "{uri}");
    }
    // History of a whole type cannot be narrowed to the compartment.
    assert_eq!(
        h.get("/Observation/_history", &p1).await.status,
        StatusCode::FORBIDDEN
    );

    let strict = harness_with(Options {
        deny_status: StatusCode::FORBIDDEN,
        ..Options::default()
    });
    let reply = strict.get("/Observation/o2", &p1).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert_eq!(reply.issue_code(), "forbidden");
    assert_eq!(
        strict.get("/Observation/o1", &p1).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_patient_tokens_searches_return_only_its_patients_data() {
    let h = harness();
    let p1 = token("patient/*.rs", Some("p1"));
    let reply = h.get("/Observation", &p1).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.keys(),
        ["Observation/o1", "Observation/o3", "Observation/o4"]
    );
    assert_eq!(reply.body["total"], 3);
    let reply = h.get("/Observation?subject=Patient/p2", &p1).await;
    assert_eq!(reply.keys(), Vec::<String>::new());
    let reply = h.get("/Patient", &p1).await;
    assert_eq!(reply.keys(), ["Patient/p1"]);
    let reply = h
        .get("/Patient/p1/Observation?category=vital-signs", &p1)
        .await;
    assert_eq!(reply.keys(), ["Observation/o3"]);
    let reply = h.get("/?_type=Observation,Patient", &p1).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(
        reply
            .keys()
            .iter()
            .all(|k| k != "Patient/p2" && k != "Observation/o2")
    );
    assert!(reply.keys().contains(&"Patient/p1".to_owned()));

    // `_include` and `_revinclude` must not pull in another patient's resources.
    let reply = h
        .get("/Observation?_include=Observation:performer", &p1)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.keys(),
        ["Observation/o1", "Observation/o3", "Observation/o4"],
        "p2 (a performer of o4) and the practitioner are outside the compartment"
    );
    let reply = h
        .get("/Patient?_revinclude=Observation:performer", &p1)
        .await;
    assert!(!reply.keys().contains(&"Patient/p2".to_owned()));
    // Chained criteria may not look into resources the token reaches only partly.
    for uri in [
        "/Observation?performer:Patient.name=Two",
        "/Patient?_has:Observation:performer:category=laboratory",
    ] {
        let reply = h.get(uri, &p1).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{uri}: {}", reply.body);
    }
    // Nor are includes of types the token has no scope for returned.
    let observations_only = token("user/Observation.rs", None);
    let reply = h
        .get(
            "/Observation?_id=o4&_include=Observation:performer",
            &observations_only,
        )
        .await;
    assert_eq!(reply.keys(), ["Observation/o4"]);
    let reply = h
        .get("/Observation?subject:Patient.name=Two", &observations_only)
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    // A user token sees the includes and may chain.
    let user = token("user/*.rs", None);
    let reply = h.get("/Observation?subject:Patient.name=Two", &user).await;
    assert_eq!(reply.keys(), ["Observation/o2"]);
    let reply = h
        .get("/Observation?_id=o4&_include=Observation:performer", &user)
        .await;
    assert_eq!(
        reply.keys(),
        ["Observation/o4", "Patient/p2", "Practitioner/dr1"]
    );
}

#[tokio::test]
async fn v2_search_restrictions_are_enforced_on_search_and_read() {
    let h = harness();
    let labs = token("patient/Observation.rs?category=laboratory", Some("p1"));
    let reply = h.get("/Observation", &labs).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.keys(), ["Observation/o1", "Observation/o4"]);
    let reply = h.get("/Observation?category=vital-signs", &labs).await;
    assert_eq!(reply.keys(), Vec::<String>::new());
    assert_eq!(h.get("/Observation/o1", &labs).await.status, StatusCode::OK);
    assert_eq!(
        h.get("/Observation/o3", &labs).await.status,
        StatusCode::NOT_FOUND
    );
    // Without the patient context: every patient's lab results, no vital signs.
    let user_labs = token("user/Observation.rs?category=laboratory", None);
    let reply = h.get("/Observation", &user_labs).await;
    assert_eq!(
        reply.keys(),
        ["Observation/o1", "Observation/o2", "Observation/o4"]
    );
    assert_eq!(
        h.get("/Observation/o3", &user_labs).await.status,
        StatusCode::NOT_FOUND
    );
    // Two restrictions on one parameter combine (OR).
    let both = token(
        "user/Observation.rs?category=laboratory user/Observation.rs?category=vital-signs",
        None,
    );
    assert_eq!(h.get("/Observation", &both).await.keys().len(), 4);
    assert_eq!(h.get("/Observation/o3", &both).await.status, StatusCode::OK);
    // Writes through a restricted scope are refused.
    let restricted_write = token("user/Observation.cruds?category=laboratory", None);
    let reply = h
        .call(
            Method::POST,
            "/Observation",
            Some(&restricted_write),
            Some(observation("x", "p1", "laboratory")),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
}

#[tokio::test]
async fn a_patient_token_writes_only_inside_its_patients_compartment() {
    let h = harness();
    let p1 = token("patient/Observation.cruds patient/Patient.rs", Some("p1"));
    let inside = h
        .call(
            Method::POST,
            "/Observation",
            Some(&p1),
            Some(observation("ignored", "p1", "laboratory")),
        )
        .await;
    assert_eq!(inside.status, StatusCode::CREATED, "{}", inside.body);
    let outside = h
        .call(
            Method::POST,
            "/Observation",
            Some(&p1),
            Some(observation("ignored", "p2", "laboratory")),
        )
        .await;
    assert_eq!(outside.status, StatusCode::FORBIDDEN, "{}", outside.body);
    // Moving own data to another patient, or touching another patient's data.
    let moved = h
        .call(
            Method::PUT,
            "/Observation/o1",
            Some(&p1),
            Some(observation("o1", "p2", "laboratory")),
        )
        .await;
    assert_eq!(moved.status, StatusCode::FORBIDDEN, "{}", moved.body);
    let theirs = h
        .call(
            Method::PUT,
            "/Observation/o2",
            Some(&p1),
            Some(observation("o2", "p1", "laboratory")),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND, "{}", theirs.body);
    // Nor through a restricted scope that reaches it, combined with the patient scope.
    let combined = token(
        "patient/Observation.cruds user/Observation.u?category=laboratory",
        Some("p1"),
    );
    let theirs = h
        .call(
            Method::PUT,
            "/Observation/o2",
            Some(&combined),
            Some(observation("o2", "p1", "laboratory")),
        )
        .await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND, "{}", theirs.body);
    let delete = h
        .call(Method::DELETE, "/Observation/o2", Some(&p1), None)
        .await;
    assert_eq!(delete.status, StatusCode::NOT_FOUND);
    let conditional = h
        .call(
            Method::DELETE,
            "/Observation?subject=Patient/p2",
            Some(&p1),
            None,
        )
        .await;
    assert_eq!(conditional.status, StatusCode::NOT_FOUND);
    let put_own = h
        .call(
            Method::PUT,
            "/Observation/o3",
            Some(&p1),
            Some(observation("o3", "p1", "laboratory")),
        )
        .await;
    assert_eq!(put_own.status, StatusCode::OK, "{}", put_own.body);
    // Nothing was changed for p2: a system token still finds o2 as it was.
    let system = token("system/*.*", None);
    let o2 = h.get("/Observation/o2", &system).await;
    assert_eq!(o2.body["meta"]["versionId"], "1");
    assert_eq!(o2.body["subject"]["reference"], "Patient/p2");
    // Bundles need unfiltered scopes.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Observation/o2"}}],
    });
    let reply = h.call(Method::POST, "/", Some(&p1), Some(bundle)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
}

#[tokio::test]
async fn a_patch_entry_needs_update_and_not_create() {
    let h = harness();
    let patch = json!([{"op": "replace", "path": "/status", "value": "amended"}]);
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{
            "resource": {
                "resourceType": "Binary",
                "contentType": "application/json-patch+json",
                "data": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
            },
            "request": {"method": "PATCH", "url": "Observation/o1"},
        }],
    });
    let create_only = token("system/Observation.c", None);
    let reply = h
        .call(Method::POST, "/", Some(&create_only), Some(bundle.clone()))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let update_only = token("system/Observation.u", None);
    let reply = h
        .call(Method::POST, "/", Some(&update_only), Some(bundle))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let system = token("system/*.*", None);
    let o1 = h.get("/Observation/o1", &system).await;
    assert_eq!(o1.body["status"], "amended", "{}", o1.body);
}

#[tokio::test]
async fn a_system_token_can_do_everything() {
    let h = harness();
    let system = token("system/*.*", None);
    let created = h
        .call(
            Method::POST,
            "/Patient",
            Some(&system),
            Some(json!({"resourceType": "Patient", "name": [{"family": "Three"}]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    for uri in [
        format!("/Patient/{id}"),
        "/Observation/o2".to_owned(),
        "/Observation?_include=Observation:performer".to_owned(),
        "/Patient/p2/Observation".to_owned(),
        "/_history".to_owned(),
        "/Observation/_history".to_owned(),
        "/?_type=Patient".to_owned(),
        "/".to_owned(),
    ] {
        let reply = h.get(&uri, &system).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.body);
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"family": "Four"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Observation/o2"}},
        ],
    });
    let reply = h
        .call(Method::POST, "/", Some(&system), Some(bundle.clone()))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // Searches inside bundles (which could `_include` anything) need search on every type.
    let search_bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET",
                               "url": "Observation?_include=Observation:subject"}}],
    });
    let observations = token("user/Observation.rs", None);
    let reply = h
        .call(
            Method::POST,
            "/",
            Some(&observations),
            Some(search_bundle.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = h
        .call(Method::POST, "/", Some(&system), Some(search_bundle))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // The same bundle with a token that may not delete is refused before anything happens.
    let no_delete = token("system/*.cru", None);
    let reply = h
        .call(Method::POST, "/", Some(&no_delete), Some(bundle))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    let reply = h
        .call(
            Method::DELETE,
            &format!("/Patient/{id}"),
            Some(&system),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn privileged_scopes_need_mfa_when_required() {
    let h = harness_with(Options {
        require_mfa: true,
        ..Options::default()
    });
    let without = token("system/*.* user/*.cruds", None);
    let mut with_mfa = claims("system/*.* user/*.cruds", None);
    with_mfa["amr"] = json!(["pwd", "mfa"]);
    let with = sign(Key::Rsa, None, &with_mfa);
    let hr = &h;
    let write = |token: String| async move {
        hr.call(
            Method::POST,
            "/Patient",
            Some(&token),
            Some(json!({"resourceType": "Patient"})),
        )
        .await
        .status
    };
    assert_eq!(write(without.clone()).await, StatusCode::FORBIDDEN);
    assert_eq!(write(with).await, StatusCode::CREATED);
    // The read part of the user scope stays usable without MFA.
    assert_eq!(h.get("/Patient/p1", &without).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_patient_tokens_search_pages_stay_in_the_compartment() {
    let h = harness();
    let p1 = token("patient/*.rs", Some("p1"));
    let mut uri = "/Observation?_count=1".to_owned();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let reply = h.get(&uri, &p1).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.body["total"], 3, "{}", reply.body);
        assert_eq!(reply.keys().len(), 1, "{}", reply.body);
        seen.extend(reply.keys());
        let next = super::test_support::next_link(&reply.body);
        match next {
            Some(url) => uri = url.strip_prefix(BASE).unwrap().to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ["Observation/o1", "Observation/o3", "Observation/o4"]);
}

#[tokio::test]
async fn versions_from_before_a_resource_moved_into_the_compartment_stay_hidden() {
    let h = harness();
    let system = token("system/*.*", None);
    // o2 belonged to p2; its second version belongs to p1.
    let moved = h
        .call(
            Method::PUT,
            "/Observation/o2",
            Some(&system),
            Some(observation("o2", "p1", "laboratory")),
        )
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    let p1 = token("patient/*.rs", Some("p1"));
    assert_eq!(h.get("/Observation/o2", &p1).await.status, StatusCode::OK);
    assert_eq!(
        h.get("/Observation/o2/_history/2", &p1).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/Observation/o2/_history/1", &p1).await.status,
        StatusCode::NOT_FOUND
    );
    let history = h.get("/Observation/o2/_history", &p1).await;
    assert_eq!(history.status, StatusCode::OK, "{}", history.body);
    let versions: Vec<&str> = history.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2"]);
    // p2 no longer reaches any version of it.
    let p2 = token("patient/*.rs", Some("p2"));
    assert_eq!(
        h.get("/Observation/o2/_history/1", &p2).await.status,
        StatusCode::NOT_FOUND
    );
}
