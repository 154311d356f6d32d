//! `oneshot` tests of the FHIR operations (`patch`, `$everything`, `$validate`) against a real
//! database in a temporary directory, with and without SMART authorization (tokens signed
//! by the server's own issuer key).

#![allow(clippy::unwrap_used, clippy::panic)]

use axum::Router;
use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, IF_MATCH, LAST_MODIFIED};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use fhirkeep_engine::store::AccessContext;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt as _;

use super::auth::{ISSUER_KEY_PURPOSE, IssuerKey, TokenClaims};
use super::{AppState, AuthMode, ServerConfig, SmartSettings, app};

const BASE: &str = "http://fhir.test";
const JSON_PATCH: &str = "application/json-patch+json";

struct Harness {
    _dir: TempDir,
    state: AppState,
    app: Router,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: axum::http::HeaderName) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn diagnostics(&self) -> String {
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "{}",
            self.body
        );
        self.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The sorted `Type/id` of a Bundle's entries.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.body["entry"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .map(|e| {
                let r = &e["resource"];
                format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                )
            })
            .collect();
        keys.sort();
        keys
    }
}

fn harness(smart: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    let auth = if smart {
        AuthMode::Smart(SmartSettings {
            jwks: Vec::new(),
            jwks_file: None,
            issuer: None,
            require_mfa: false,
            endpoints: super::OAuthUris::default(),
        })
    } else {
        AuthMode::None
    };
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: format!("{BASE}/"),
            max_body_bytes: super::DEFAULT_BODY_LIMIT,
            auth,
            ..ServerConfig::for_tests()
        },
    );
    Harness {
        _dir: dir,
        app: app(state.clone()),
        state,
    }
}

impl Harness {
    fn token(&self, scope: &str, patient: Option<&str>) -> String {
        let key = IssuerKey::from_secret(self.state.db().store().derive_secret(ISSUER_KEY_PURPOSE));
        let now = chrono::Utc::now().timestamp();
        key.sign(&TokenClaims {
            iss: BASE.to_owned(),
            aud: BASE.to_owned(),
            sub: "tester".to_owned(),
            client_id: "ops-tests".to_owned(),
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: "ops".to_owned(),
            scope: scope.to_owned(),
            patient: patient.map(str::to_owned),
        })
        .unwrap()
    }

    /// Stores `resource` with its own id, directly in the database.
    fn put(&self, resource: Value) {
        let db = self.state.db();
        let ctx = AccessContext::local("ops-tests");
        let t = resource["resourceType"].as_str().unwrap().to_owned();
        let id = resource["id"].as_str().unwrap().to_owned();
        db.update(&ctx, &t, &id, resource, None).unwrap();
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        headers: &[(axum::http::HeaderName, &str)],
        token: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        for (name, value) in headers {
            builder = builder.header(name, *value);
        }
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = builder
            .body(body.map_or_else(Body::empty, Body::from))
            .unwrap();
        let response = self.app.clone().oneshot(req).await.unwrap();
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

    async fn patch(&self, uri: &str, patch: &Value) -> Reply {
        self.send(
            Method::PATCH,
            uri,
            Some(JSON_PATCH),
            &[],
            None,
            Some(patch.to_string()),
        )
        .await
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, uri, None, &[], token, None).await
    }

    async fn read_as(&self, uri: &str, token: &str) -> Value {
        let reply = self.get(uri, Some(token)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    async fn read(&self, uri: &str) -> Value {
        let reply = self.get(uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }
}

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}],
           "gender": "female", "birthDate": "1970-01-01"})
}

// ---------------------------------------------------------------------------------------
// PATCH

#[tokio::test]
async fn patch_applies_json_patch_and_answers_like_an_update() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    let reply = h
        .patch(
            "/Patient/p1",
            &json!([
                {"op": "test", "path": "/gender", "value": "female"},
                {"op": "replace", "path": "/name/0/family", "value": "Windsor"},
                {"op": "add", "path": "/active", "value": true},
            ]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.header(ETAG), "W/\"2\"");
    assert!(!reply.header(LAST_MODIFIED).is_empty());
    assert_eq!(reply.body["name"][0]["family"], "Windsor");
    assert_eq!(reply.body["active"], true);
    assert_eq!(reply.body["meta"]["versionId"], "2");
    let stored = h.read("/Patient/p1").await;
    assert_eq!(stored["name"][0]["family"], "Windsor");

    // Prefer: return=minimal leaves the body out.
    let reply = h
        .send(
            Method::PATCH,
            "/Patient/p1",
            Some(JSON_PATCH),
            &[(
                axum::http::HeaderName::from_static("prefer"),
                "return=minimal",
            )],
            None,
            Some(json!([{"op": "remove", "path": "/active"}]).to_string()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, Value::Null);
    assert_eq!(reply.header(ETAG), "W/\"3\"");
}

/// A FHIRPath Patch (a `Parameters` resource as `application/fhir+json`) patches like a JSON
/// Patch: a new version, the update's headers, and a result that must still be valid.
#[tokio::test]
async fn patch_applies_fhirpath_patch_as_fhir_json() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    let send = |patch: Value| {
        h.send(
            Method::PATCH,
            "/Patient/p1",
            Some("application/fhir+json"),
            &[],
            None,
            Some(patch.to_string()),
        )
    };
    let reply = send(json!({"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Patient.name.family"},
            {"name": "value", "valueString": "Windsor"}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "telecom"},
            {"name": "value", "valueContactPoint": {"system": "phone", "value": "555"}}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"},
            {"name": "path", "valueString": "Patient.birthDate"}]}
    ]}))
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.header(ETAG), "W/\"2\"");
    let stored = h.read("/Patient/p1").await;
    assert_eq!(stored["name"][0]["family"], "Windsor");
    assert_eq!(stored["telecom"][0]["value"], "555");
    assert!(stored.get("birthDate").is_none());

    // A result that is not a valid Patient is refused, and nothing is written.
    let reply = send(json!({"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Patient.gender"},
            {"name": "value", "valueCode": "woman"}]}
    ]}))
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert!(reply.diagnostics().contains("not valid"), "{}", reply.body);
    assert!(!reply.diagnostics().contains("woman"));
    assert_eq!(h.read("/Patient/p1").await["meta"]["versionId"], "2");
}

#[tokio::test]
async fn patch_honours_if_match() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    let patch = json!([{"op": "replace", "path": "/gender", "value": "male"}]).to_string();
    let stale = h
        .send(
            Method::PATCH,
            "/Patient/p1",
            Some(JSON_PATCH),
            &[(IF_MATCH, "W/\"7\"")],
            None,
            Some(patch.clone()),
        )
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.body
    );
    assert_eq!(h.read("/Patient/p1").await["gender"], "female");
    let current = h
        .send(
            Method::PATCH,
            "/Patient/p1",
            Some(JSON_PATCH),
            &[(IF_MATCH, "W/\"1\"")],
            None,
            Some(patch),
        )
        .await;
    assert_eq!(current.status, StatusCode::OK, "{}", current.body);
    assert_eq!(h.read("/Patient/p1").await["gender"], "male");
}

#[tokio::test]
async fn patch_failures_are_422_and_change_nothing() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    for (patch, why) in [
        (
            json!([{"op": "test", "path": "/gender", "value": "male"}]),
            "test failed",
        ),
        (
            json!([{"op": "replace", "path": "/id", "value": "p2"}]),
            "id",
        ),
        (
            json!([{"op": "replace", "path": "/resourceType", "value": "Group"}]),
            "resourceType",
        ),
        (
            json!([{"op": "remove", "path": "/telecom"}]),
            "names no element",
        ),
        (
            json!([{"op": "replace", "path": "/gender", "value": "woman"}]),
            "not valid",
        ),
        (
            json!([{"op": "add", "path": "/name", "value": {"family": "Y"}}]),
            "not valid",
        ),
    ] {
        let reply = h.patch("/Patient/p1", &patch).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{patch}");
        assert!(reply.diagnostics().contains(why), "{}", reply.body);
        assert!(!reply.diagnostics().contains("Chalmers"));
        assert!(!reply.diagnostics().contains("woman"));
    }
    let stored = h.read("/Patient/p1").await;
    assert_eq!(stored["meta"]["versionId"], "1");

    // The wrong content type is 415; a JSON Patch sent as FHIR JSON (where a FHIRPath
    // Patch is expected) is 400; a missing resource 404.
    for (content_type, status, why) in [
        (
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "json-patch+json",
        ),
        (
            "application/fhir+json",
            StatusCode::BAD_REQUEST,
            "Parameters",
        ),
    ] {
        let reply = h
            .send(
                Method::PATCH,
                "/Patient/p1",
                Some(content_type),
                &[],
                None,
                Some("[]".into()),
            )
            .await;
        assert_eq!(reply.status, status, "{content_type}");
        assert!(reply.diagnostics().contains(why), "{}", reply.body);
    }
    let reply = h.patch("/Patient/nope", &json!([])).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn conditional_patch_patches_the_one_match() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    h.put(patient("p2", "Windsor"));
    h.put(patient("p3", "Windsor"));
    let patch = json!([{"op": "add", "path": "/active", "value": false}]);
    let reply = h.patch("/Patient?family=chalmers", &patch).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["id"], "p1");
    assert_eq!(h.read("/Patient/p1").await["active"], false);
    let reply = h.patch("/Patient?family=windsor", &patch).await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    let reply = h.patch("/Patient?family=nobody", &patch).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

fn fhirpath_patch(parts: Value) -> Value {
    json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]})
}

fn binary_patch(patch: &Value) -> Value {
    json!({
        "resourceType": "Binary",
        "contentType": JSON_PATCH,
        "data": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
    })
}

#[tokio::test]
async fn patch_entries_in_transactions_and_batches() {
    let h = harness(false);
    h.put(patient("p1", "Chalmers"));
    h.put(patient("p2", "Windsor"));
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": binary_patch(&json!([{"op": "replace", "path": "/gender", "value": "male"}])),
             "request": {"method": "PATCH", "url": "Patient/p1"}},
            {"resource": binary_patch(&json!([{"op": "add", "path": "/active", "value": true}])),
             "request": {"method": "PATCH", "url": "Patient?family=windsor"}},
        ],
    });
    let reply = h
        .send(
            Method::POST,
            "/",
            Some("application/fhir+json"),
            &[],
            None,
            Some(bundle.to_string()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "transaction-response");
    assert_eq!(h.read("/Patient/p1").await["gender"], "male");
    assert_eq!(h.read("/Patient/p2").await["active"], true);

    // A failing test op fails the whole transaction: nothing is written.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": binary_patch(&json!([{"op": "replace", "path": "/gender", "value": "other"}])),
             "request": {"method": "PATCH", "url": "Patient/p1"}},
            {"resource": binary_patch(&json!([{"op": "test", "path": "/gender", "value": "male"}])),
             "request": {"method": "PATCH", "url": "Patient/p2"}},
        ],
    });
    let reply = h
        .send(
            Method::POST,
            "/",
            Some("application/fhir+json"),
            &[],
            None,
            Some(bundle.to_string()),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert!(reply.diagnostics().contains("entry 1"));
    assert_eq!(h.read("/Patient/p1").await["gender"], "male");

    // In a batch each entry answers for itself: a FHIRPath Patch that names no element is
    // refused with a clear message, a missing resource is 404, and the other entries (a
    // FHIRPath Patch among them) are applied.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": fhirpath_patch(json!([
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Patient.deceased"},
                {"name": "value", "valueBoolean": true}])),
             "request": {"method": "PATCH", "url": "Patient/p1"}},
            {"resource": binary_patch(&json!([{"op": "add", "path": "/active", "value": false}])),
             "request": {"method": "PATCH", "url": "Patient/p1"}},
            {"resource": binary_patch(&json!([])),
             "request": {"method": "PATCH", "url": "Patient/nobody"}},
            {"resource": patient("p3", "Third"),
             "request": {"method": "PUT", "url": "Patient/p3"}},
            {"resource": fhirpath_patch(json!([
                {"name": "type", "valueCode": "add"},
                {"name": "path", "valueString": "Patient"},
                {"name": "name", "valueString": "telecom"},
                {"name": "value", "valueContactPoint": {"system": "phone", "value": "555"}}])),
             "request": {"method": "PATCH", "url": "Patient/p2"}},
        ],
    });
    let reply = h
        .send(
            Method::POST,
            "/",
            Some("application/fhir+json"),
            &[],
            None,
            Some(bundle.to_string()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "batch-response");
    let entries = reply.body["entry"].as_array().unwrap();
    let statuses: Vec<&str> = entries
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "422 Unprocessable Entity",
            "200 OK",
            "404 Not Found",
            "201 Created",
            "200 OK"
        ]
    );
    let diagnostics = entries[0]["response"]["outcome"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(diagnostics.contains("matches no element"), "{diagnostics}");
    assert_eq!(h.read("/Patient/p2").await["telecom"][0]["value"], "555");
    assert_eq!(h.read("/Patient/p1").await["active"], false);
    assert_eq!(h.read("/Patient/p3").await["name"][0]["family"], "Third");
}

#[tokio::test]
async fn patch_is_authorized_as_an_update() {
    let h = harness(true);
    h.put(patient("p1", "Chalmers"));
    h.put(patient("p2", "Windsor"));
    let patch = json!([{"op": "add", "path": "/active", "value": true}]).to_string();
    let send = |token: String, uri: &'static str| {
        let patch = patch.clone();
        let h = &h;
        async move {
            h.send(
                Method::PATCH,
                uri,
                Some(JSON_PATCH),
                &[],
                Some(&token),
                Some(patch),
            )
            .await
        }
    };
    // Without a token: 401. Read-only: 403.
    let reply = h
        .send(
            Method::PATCH,
            "/Patient/p1",
            Some(JSON_PATCH),
            &[],
            None,
            Some(patch.clone()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(h.token("user/Patient.rs", None), "/Patient/p1").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // A patient token patches its own patient only; another one is hidden (404).
    let own = h.token("patient/Patient.ru", Some("p1"));
    let reply = send(own.clone(), "/Patient/p2").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = send(own.clone(), "/Patient/p1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // A conditional patch needs an unrestricted scope.
    let reply = send(own, "/Patient?family=chalmers").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = send(h.token("user/Patient.rus", None), "/Patient?family=windsor").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["id"], "p2");
}

#[tokio::test]
async fn the_capability_statement_names_patch_and_the_operations() {
    let h = harness(false);
    let statement = h.read("/metadata").await;
    let patient = statement["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    assert!(
        patient["interaction"]
            .as_array()
            .unwrap()
            .contains(&json!({"code": "patch"}))
    );
    assert_eq!(
        statement["patchFormat"],
        json!([JSON_PATCH, "application/fhir+json"])
    );
    let operations: Vec<&str> = patient["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(operations.contains(&"everything"), "{operations:?}");
    assert!(operations.contains(&"validate"), "{operations:?}");
}

// ---------------------------------------------------------------------------------------
// $everything

/// Two patients with their records, the practitioners, organizations, locations and
/// medications those reference, and one organization nobody references.
fn seed_everything(h: &Harness) {
    for resource in [
        patient("p1", "Chalmers"),
        patient("p2", "Windsor"),
        json!({"resourceType": "Practitioner", "id": "d1"}),
        json!({"resourceType": "Practitioner", "id": "d2"}),
        json!({"resourceType": "Organization", "id": "o1"}),
        json!({"resourceType": "Organization", "id": "o9"}),
        json!({"resourceType": "Location", "id": "l1"}),
        json!({"resourceType": "Medication", "id": "m1"}),
        json!({"resourceType": "Observation", "id": "obs1", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
               "performer": [{"reference": "Practitioner/d1"}]}),
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
               "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"},
               "serviceProvider": {"reference": "Organization/o1"},
               "location": [{"location": {"reference": "Location/l1"}}]}),
        json!({"resourceType": "MedicationRequest", "id": "mr1", "status": "active",
               "intent": "order", "subject": {"reference": "Patient/p1"},
               "medicationReference": {"reference": "Medication/m1"},
               "requester": {"reference": "Practitioner/d1"}}),
        json!({"resourceType": "Observation", "id": "obs2", "status": "final",
               "code": {"text": "y"}, "subject": {"reference": "Patient/p2"},
               "performer": [{"reference": "Practitioner/d2"}]}),
    ] {
        h.put(resource);
    }
}

const P1_EVERYTHING: [&str; 8] = [
    "Encounter/e1",
    "Location/l1",
    "Medication/m1",
    "MedicationRequest/mr1",
    "Observation/obs1",
    "Organization/o1",
    "Patient/p1",
    "Practitioner/d1",
];

#[tokio::test]
async fn everything_returns_the_compartment_and_what_it_references() {
    let h = harness(false);
    seed_everything(&h);
    let reply = h.get("/Patient/p1/$everything", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "searchset");
    assert_eq!(reply.keys(), P1_EVERYTHING);
    assert_eq!(reply.body["total"], 8);
    // The patient comes first.
    assert_eq!(
        reply.body["entry"][0]["fullUrl"],
        format!("{BASE}/Patient/p1")
    );

    let reply = h
        .get(
            "/Patient/p1/$everything?_type=Observation,Practitioner",
            None,
        )
        .await;
    assert_eq!(reply.keys(), ["Observation/obs1", "Practitioner/d1"]);

    let reply = h.get("/Patient/p2/$everything", None).await;
    assert_eq!(
        reply.keys(),
        ["Observation/obs2", "Patient/p2", "Practitioner/d2"]
    );
    let reply = h.get("/Patient/nobody/$everything", None).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = h.get("/Patient/p1/$everything?date=ge2020", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn everything_pages_with_next_links_and_honours_since() {
    let h = harness(false);
    seed_everything(&h);
    let mut seen = Vec::new();
    let mut uri = "/Patient/p1/$everything?_count=3".to_owned();
    let mut pages = 0;
    loop {
        let reply = h.get(&uri, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(reply.keys().len() <= 3);
        seen.extend(reply.keys());
        pages += 1;
        let next = super::test_support::next_link(&reply.body);
        match next {
            Some(url) => {
                assert!(!url.contains("obs1"), "no id of patient data in a link");
                uri = url.strip_prefix(BASE).unwrap().to_owned();
            }
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    seen.sort();
    assert_eq!(seen, P1_EVERYTHING);

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let since = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(10));
    let mut changed = h.read("/Observation/obs1").await;
    changed["status"] = json!("amended");
    h.put(changed);
    h.put(
        json!({"resourceType": "Observation", "id": "obs3", "status": "final",
                 "code": {"text": "z"}, "subject": {"reference": "Patient/p2"}}),
    );
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let reply = h
        .get(
            &format!(
                "/Patient/p1/$everything?_since={}",
                since.replace('+', "%2B")
            ),
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.keys(), ["Observation/obs1"]);
}

#[tokio::test]
async fn everything_under_smart_keeps_to_the_token() {
    let h = harness(true);
    seed_everything(&h);
    let all = h.token("patient/*.rs", Some("p1"));
    let reply = h.get("/Patient/p1/$everything", Some(&all)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // A patient token reaches its compartment only: the practitioner and organization
    // records it references are not the patient's.
    assert_eq!(
        reply.keys(),
        [
            "Encounter/e1",
            "MedicationRequest/mr1",
            "Observation/obs1",
            "Patient/p1"
        ]
    );
    assert_eq!(reply.body["total"], 4);
    // Pages count only what the token reaches, from the first page on.
    let reply = h.get("/Patient/p1/$everything?_count=2", Some(&all)).await;
    assert_eq!(reply.body["total"], 4);
    assert_eq!(reply.keys(), ["Encounter/e1", "Patient/p1"]);
    // Another patient is hidden.
    let reply = h.get("/Patient/p2/$everything", Some(&all)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // Types the token cannot search are left out.
    let some = h.token("patient/Patient.rs patient/Observation.rs", Some("p1"));
    let reply = h.get("/Patient/p1/$everything", Some(&some)).await;
    assert_eq!(reply.keys(), ["Observation/obs1", "Patient/p1"]);
    // Without read on Patient: 403.
    let none = h.token("patient/Observation.rs", Some("p1"));
    let reply = h.get("/Patient/p1/$everything", Some(&none)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // A user token with every type sees what an unrestricted caller sees.
    let user = h.token("user/*.rs", None);
    let reply = h.get("/Patient/p1/$everything", Some(&user)).await;
    assert_eq!(reply.keys(), P1_EVERYTHING);
}

/// `GET Patient/$everything` is `$everything` of the token's patient; without a patient
/// context it is refused with a pointer to Bulk Data, not answered with every patient.
#[tokio::test]
async fn everything_without_a_patient_is_that_of_the_tokens_patient() {
    let h = harness(true);
    seed_everything(&h);
    let p1 = h.token("patient/*.rs", Some("p1"));
    let of_context = h.get("/Patient/$everything", Some(&p1)).await;
    assert_eq!(of_context.status, StatusCode::OK, "{}", of_context.body);
    let named = h.get("/Patient/p1/$everything", Some(&p1)).await;
    assert_eq!(of_context.keys(), named.keys());
    assert_eq!(of_context.body["total"], 4);
    let p2 = h.token("patient/*.rs", Some("p2"));
    let reply = h
        .get("/Patient/$everything?_type=Observation", Some(&p2))
        .await;
    assert_eq!(reply.keys(), ["Observation/obs2"]);
    // Its pages follow like those of the named patient.
    let mut uri = "/Patient/$everything?_count=2".to_owned();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let reply = h.get(&uri, Some(&p1)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        seen.extend(reply.keys());
        let next = super::test_support::next_link(&reply.body);
        match next {
            Some(url) => uri = url.strip_prefix(BASE).unwrap().to_owned(),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, named.keys());

    // No patient context: refused, for a user token and without auth alike.
    let user = h.token("user/*.rs", None);
    let reply = h.get("/Patient/$everything", Some(&user)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["issue"][0]["code"], "not-supported");
    assert!(
        reply.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("$export")
    );
    let open = harness(false);
    seed_everything(&open);
    let reply = open.get("/Patient/$everything", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
}

// ---------------------------------------------------------------------------------------
// $validate

impl Harness {
    async fn validate(&self, uri: &str, body: &Value, token: Option<&str>) -> Reply {
        self.send(
            Method::POST,
            uri,
            Some("application/fhir+json"),
            &[],
            token,
            Some(body.to_string()),
        )
        .await
    }
}

/// `(code, expression)` of every issue of an OperationOutcome.
fn issues(reply: &Reply) -> Vec<(String, String)> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["resourceType"], "OperationOutcome");
    reply.body["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["severity"] == "error")
        .map(|i| {
            (
                i["code"].as_str().unwrap().to_owned(),
                i["expression"][0].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn pair(code: &str, path: &str) -> (String, String) {
    (code.to_owned(), path.to_owned())
}

#[tokio::test]
async fn validate_reports_the_issues_of_a_resource() {
    let h = harness(false);
    let reply = h
        .validate("/Patient/$validate", &patient("p1", "Chalmers"), None)
        .await;
    assert_eq!(issues(&reply), Vec::<(String, String)>::new());
    assert_eq!(reply.body["issue"][0]["severity"], "information");

    let broken = json!({"resourceType": "Patient", "gender": "woman", "active": "yes",
                        "hairColour": "red", "name": {"family": "X"},
                        "birthDate": "01/02/1970"});
    let found = issues(&h.validate("/Patient/$validate", &broken, None).await);
    for expected in [
        pair("code-invalid", "Patient.gender"),
        pair("value", "Patient.active"),
        pair("structure", "Patient.hairColour"),
        pair("structure", "Patient.name"),
        pair("value", "Patient.birthDate"),
    ] {
        assert!(found.contains(&expected), "{expected:?} not in {found:?}");
    }
    assert_eq!(found.len(), 5, "{found:?}");

    let observation = json!({"resourceType": "Observation", "valueString": "x"});
    let found = issues(
        &h.validate("/Observation/$validate", &observation, None)
            .await,
    );
    assert_eq!(
        found,
        [
            pair("required", "Observation.status"),
            pair("required", "Observation.code")
        ]
    );

    // The Parameters form, and nothing was stored.
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": broken}]});
    let found = issues(&h.validate("/Patient/$validate", &parameters, None).await);
    assert_eq!(found.len(), 5, "{found:?}");
    let search = h.get("/Patient", None).await;
    assert_eq!(search.body["total"], 0);
}

#[tokio::test]
async fn validate_says_which_profiles_it_did_not_check() {
    let h = harness(false);
    let all = |reply: &Reply| -> Vec<(String, String, String)> {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["issue"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["severity"].as_str().unwrap().to_owned(),
                    i["code"].as_str().unwrap().to_owned(),
                    i["expression"][0].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let issue = |severity: &str, code: &str, path: &str| {
        (severity.to_owned(), code.to_owned(), path.to_owned())
    };
    let body = patient("p1", "Chalmers");
    let us_core = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
    // The base definition asked for: checked, clean.
    let base = "http://hl7.org/fhir/StructureDefinition/Patient";
    let reply = h
        .validate(&format!("/Patient/$validate?profile={base}"), &body, None)
        .await;
    assert_eq!(all(&reply), [issue("information", "informational", "")]);
    // Another profile, in the URL or in Parameters: an error, not a clean answer.
    let reply = h
        .validate(
            &format!("/Patient/$validate?profile={us_core}"),
            &body,
            None,
        )
        .await;
    assert_eq!(all(&reply), [issue("error", "not-supported", "Patient")]);
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": body},
        {"name": "profile", "valueCanonical": us_core}]});
    let reply = h.validate("/Patient/$validate", &parameters, None).await;
    assert_eq!(all(&reply), [issue("error", "not-supported", "Patient")]);
    // A profile the resource declares: said to be unchecked.
    let mut declaring = patient("p1", "Chalmers");
    declaring["meta"] = json!({"profile": [us_core, base]});
    let reply = h.validate("/Patient/$validate", &declaring, None).await;
    assert_eq!(
        all(&reply),
        [issue(
            "information",
            "informational",
            "Patient.meta.profile"
        )]
    );
    assert!(
        reply.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains(us_core)
    );
}

#[tokio::test]
async fn validate_checks_the_url_against_the_resource() {
    let h = harness(false);
    let found = issues(
        &h.validate("/Patient/p1/$validate", &patient("p2", "Chalmers"), None)
            .await,
    );
    assert_eq!(found, [pair("invalid", "Patient")]);
    let found = issues(
        &h.validate("/Patient/p1/$validate", &patient("p1", "Chalmers"), None)
            .await,
    );
    assert!(found.is_empty(), "{found:?}");
    let found = issues(
        &h.validate("/Observation/$validate", &patient("p1", "Chalmers"), None)
            .await,
    );
    assert_eq!(found, [pair("invalid", "Observation")]);
    let reply = h
        .send(
            Method::POST,
            "/Patient/$validate",
            Some("application/fhir+json"),
            &[],
            None,
            Some("{not json".into()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn validate_needs_a_write_scope_under_smart() {
    let h = harness(true);
    let body = patient("p1", "Chalmers");
    let reply = h.validate("/Patient/$validate", &body, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let read_only = h.token("user/Patient.rs", None);
    let reply = h
        .validate("/Patient/$validate", &body, Some(&read_only))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let writer = h.token("patient/Patient.u", Some("p1"));
    let reply = h.validate("/Patient/$validate", &body, Some(&writer)).await;
    assert!(issues(&reply).is_empty());
}

#[tokio::test]
async fn patch_entries_need_update_on_their_type_not_on_binary() {
    let h = harness(true);
    h.put(patient("p1", "Chalmers"));
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": binary_patch(&json!([{"op": "add", "path": "/active", "value": true}])),
             "request": {"method": "PATCH", "url": "Patient/p1"}},
        ],
    });
    let post = |token: String| {
        let body = bundle.to_string();
        let h = &h;
        async move {
            h.send(
                Method::POST,
                "/",
                Some("application/fhir+json"),
                &[],
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let reply = post(h.token("user/Observation.cu", None)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        h.read_as("/Patient/p1", &h.token("user/Patient.r", None))
            .await["active"],
        Value::Null
    );
    let reply = post(h.token("user/Patient.cu", None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(
        h.read_as("/Patient/p1", &h.token("user/Patient.r", None))
            .await["active"],
        true
    );
}

#[tokio::test]
async fn everything_start_and_end_filter_clinical_dates() {
    let h = harness(false);
    for resource in [
        patient("p1", "Chalmers"),
        json!({"resourceType": "Practitioner", "id": "d1"}),
        json!({"resourceType": "Practitioner", "id": "d2"}),
        json!({"resourceType": "Observation", "id": "old", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
               "effectiveDateTime": "2019-05-01", "performer": [{"reference": "Practitioner/d1"}]}),
        json!({"resourceType": "Observation", "id": "new", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
               "effectiveDateTime": "2020-06-01T10:00:00Z",
               "performer": [{"reference": "Practitioner/d2"}]}),
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
               "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"},
               "period": {"start": "2018-01-01", "end": "2020-02-01"}}),
        json!({"resourceType": "Flag", "id": "f1", "status": "active",
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
    ] {
        h.put(resource);
    }
    let reply = h
        .get(
            "/Patient/p1/$everything?start=2020-01-01&end=2020-12-31",
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // The encounter overlaps 2020; the 2019 observation (and the practitioner only it
    // references) do not; a Flag has no clinical date and is kept.
    assert_eq!(
        reply.keys(),
        [
            "Encounter/e1",
            "Flag/f1",
            "Observation/new",
            "Patient/p1",
            "Practitioner/d2"
        ]
    );
    let reply = h.get("/Patient/p1/$everything?end=2019-12-31", None).await;
    assert_eq!(
        reply.keys(),
        [
            "Encounter/e1",
            "Flag/f1",
            "Observation/old",
            "Patient/p1",
            "Practitioner/d1"
        ]
    );
    let reply = h.get("/Patient/p1/$everything?start=yesterday", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}
