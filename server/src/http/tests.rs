//! `oneshot` tests of every interaction and error status against a real database in a
//! temporary directory.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::header::{
    ACCEPT, CACHE_CONTROL, CONTENT_LOCATION, CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH,
    LAST_MODIFIED, LOCATION,
};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::routing::get;
use fhirkeep_engine::audit::{AuditAction, AuditOutcome};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt as _;

use super::{AppState, ServerConfig, app, layered, routes};

const BASE: &str = "http://fhir.test";

struct Harness {
    _dir: TempDir,
    state: AppState,
    app: Router,
}

fn harness_with_limit(max_body_bytes: usize) -> Harness {
    harness_at(&format!("{BASE}/"), max_body_bytes)
}

fn harness_at(base_url: &str, max_body_bytes: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: base_url.to_owned(),
            max_body_bytes,
            auth: super::AuthMode::None,
            ..ServerConfig::for_tests()
        },
    );
    Harness {
        _dir: dir,
        app: app(state.clone()),
        state,
    }
}

fn harness() -> Harness {
    harness_with_limit(super::DEFAULT_BODY_LIMIT)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    raw: Vec<u8>,
}

impl Reply {
    fn header(&self, name: impl axum::http::header::AsHeaderName) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// The first issue's code of an OperationOutcome body.
    fn issue_code(&self) -> &str {
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "not an OperationOutcome: {}",
            self.body
        );
        self.body["issue"][0]["code"].as_str().unwrap()
    }
}

fn request(method: Method, uri: &str, body: Option<&Value>) -> axum::http::request::Builder {
    let builder = Request::builder().method(method).uri(uri);
    match body {
        Some(_) => builder.header(CONTENT_TYPE, "application/fhir+json"),
        None => builder,
    }
}

impl Harness {
    async fn send(&self, req: Request<Body>) -> Reply {
        send_to(&self.app, req).await
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let builder = request(method, uri, body.as_ref());
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        self.send(builder.body(body).unwrap()).await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }
}

async fn send_to(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let raw = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap()
    };
    Reply {
        status,
        headers,
        body,
        raw,
    }
}

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "gender": "female"})
}

fn assert_security_headers(reply: &Reply) {
    assert_eq!(reply.header("x-content-type-options"), "nosniff");
    assert_eq!(reply.header(CACHE_CONTROL), "no-store");
    assert!(!reply.header("x-request-id").is_empty());
}

#[tokio::test]
async fn create_read_update_vread_history_search_delete() {
    let h = harness();
    let created = h
        .call(Method::POST, "/Patient", Some(patient("Chalmers")))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let location = format!("{BASE}/Patient/{id}/_history/1");
    assert_eq!(created.header(LOCATION), location);
    assert_eq!(created.header(CONTENT_LOCATION), location);
    assert_eq!(created.header(ETAG), "W/\"1\"");
    assert!(created.header(LAST_MODIFIED).ends_with(" GMT"));
    assert!(
        created
            .header(CONTENT_TYPE)
            .starts_with("application/fhir+json")
    );
    assert_security_headers(&created);

    let read = h.get(&format!("/Patient/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["name"][0]["family"], "Chalmers");
    assert_eq!(read.header(ETAG), "W/\"1\"");
    assert_security_headers(&read);
    assert!(
        read.header(CONTENT_TYPE)
            .starts_with("application/fhir+json")
    );
    // The stored JSON goes out as is (compact) unless `_pretty` asks for indentation.
    assert!(!read.raw.contains(&b'\n'));
    assert_eq!(read.body, created.body);
    let pretty = h.get(&format!("/Patient/{id}?_pretty=true")).await;
    assert_eq!(pretty.status, StatusCode::OK);
    assert!(pretty.raw.contains(&b'\n'));
    assert_eq!(pretty.body, read.body);

    let not_modified = h
        .send(
            Request::get(format!("/Patient/{id}"))
                .header(IF_NONE_MATCH, "W/\"1\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.raw.is_empty());
    let if_modified_since = |date: &str| {
        Request::get(format!("/Patient/{id}"))
            .header("if-modified-since", date)
            .body(Body::empty())
            .unwrap()
    };
    let unchanged = h
        .send(if_modified_since(created.header(LAST_MODIFIED)))
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    let older = h
        .send(if_modified_since("Sat, 01 Jan 2000 00:00:00 GMT"))
        .await;
    assert_eq!(older.status, StatusCode::OK);

    let mut changed = read.body.clone();
    changed["gender"] = json!("other");
    let put = |if_match: &'static str| {
        Request::put(format!("/Patient/{id}"))
            .header(CONTENT_TYPE, "application/fhir+json")
            .header(IF_MATCH, if_match)
            .body(Body::from(changed.to_string()))
            .unwrap()
    };
    let updated = h.send(put("W/\"1\"")).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.header(ETAG), "W/\"2\"");
    assert_eq!(
        updated.header(LOCATION),
        format!("{BASE}/Patient/{id}/_history/2")
    );
    let stale = h.send(put("W/\"1\"")).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.issue_code(), "conflict");

    let v1 = h.get(&format!("/Patient/{id}/_history/1")).await;
    assert_eq!(v1.status, StatusCode::OK);
    assert_eq!(v1.body["gender"], "female");
    assert_eq!(v1.header(ETAG), "W/\"1\"");
    let missing_version = h.get(&format!("/Patient/{id}/_history/9")).await;
    assert_eq!(missing_version.status, StatusCode::NOT_FOUND);

    let history = h.get(&format!("/Patient/{id}/_history")).await;
    assert_eq!(history.status, StatusCode::OK);
    assert_eq!(history.body["type"], "history");
    let entries = history.body["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["fullUrl"], format!("{BASE}/Patient/{id}"));
    assert_eq!(entries[0]["resource"]["gender"], "other");

    let found = h.get("/Patient?family=chalmers").await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.body);
    assert_eq!(found.body["type"], "searchset");
    assert_eq!(found.body["total"], 1);
    assert_eq!(
        found.body["entry"][0]["fullUrl"],
        format!("{BASE}/Patient/{id}")
    );
    assert_security_headers(&found);

    let deleted = h
        .call(Method::DELETE, &format!("/Patient/{id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.header(ETAG), "W/\"3\"");
    let gone = h.get(&format!("/Patient/{id}")).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert_eq!(gone.issue_code(), "deleted");
    assert_security_headers(&gone);
    let empty = h.get("/Patient?family=chalmers").await;
    assert_eq!(empty.body["total"], 0);
}

#[tokio::test]
async fn update_with_a_client_id_creates_and_prefer_return_is_honoured() {
    let h = harness();
    let mut body = patient("Client");
    body["id"] = json!("client-1");
    let created = h
        .send(
            Request::put("/Patient/client-1")
                .header(CONTENT_TYPE, "application/json")
                .header("prefer", "return=minimal")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert!(created.raw.is_empty(), "return=minimal sends no body");
    assert_eq!(
        created.header(LOCATION),
        format!("{BASE}/Patient/client-1/_history/1")
    );

    let outcome = h
        .send(
            Request::put("/Patient/client-1")
                .header(CONTENT_TYPE, "application/fhir+json; charset=utf-8")
                .header("prefer", "return=OperationOutcome")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(outcome.status, StatusCode::OK);
    assert_eq!(outcome.issue_code(), "informational");

    let mismatched = h
        .call(Method::PUT, "/Patient/other-id", Some(body.clone()))
        .await;
    assert_eq!(mismatched.status, StatusCode::BAD_REQUEST);
    let wrong_type = h
        .call(Method::PUT, "/Observation/client-1", Some(body))
        .await;
    assert_eq!(wrong_type.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn conditional_create_update_and_delete() {
    let h = harness();
    let mut body = patient("Conditional");
    body["identifier"] = json!([{"system": "http://mrn.test", "value": "42"}]);
    let post = || {
        Request::post("/Patient")
            .header(CONTENT_TYPE, "application/fhir+json")
            .header("if-none-exist", "identifier=http://mrn.test|42")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let first = h.send(post()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let second = h.send(post()).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body["id"], first.body["id"]);
    let id = first.body["id"].as_str().unwrap().to_owned();

    let mut changed = body.clone();
    changed["gender"] = json!("male");
    let updated = h
        .call(
            Method::PUT,
            "/Patient?identifier=http://mrn.test|42",
            Some(changed.clone()),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["id"], id.as_str());
    assert_eq!(updated.header(ETAG), "W/\"2\"");
    // If-Match applies to the resource the condition matched.
    let conditional_put = |version: &str| {
        Request::put("/Patient?identifier=http://mrn.test|42")
            .header(CONTENT_TYPE, "application/fhir+json")
            .header(IF_MATCH, version)
            .body(Body::from(changed.to_string()))
            .unwrap()
    };
    let stale = h.send(conditional_put("W/\"1\"")).await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.body
    );
    let fresh = h.send(conditional_put("W/\"2\"")).await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
    assert_eq!(fresh.header(ETAG), "W/\"3\"");

    let mut other = changed.clone();
    other["identifier"] = json!([{"system": "http://mrn.test", "value": "43"}]);
    let created = h
        .call(
            Method::PUT,
            "/Patient?identifier=http://mrn.test|43",
            Some(other),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);

    let ambiguous = h.call(Method::DELETE, "/Patient?gender=male", None).await;
    assert_eq!(ambiguous.status, StatusCode::PRECONDITION_FAILED);

    let no_condition = h.call(Method::DELETE, "/Patient", None).await;
    assert_eq!(no_condition.status, StatusCode::BAD_REQUEST);

    let deleted = h
        .call(
            Method::DELETE,
            "/Patient?identifier=http://mrn.test|42",
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.header(ETAG), "W/\"4\"");
    assert_eq!(
        h.get(&format!("/Patient/{id}")).await.status,
        StatusCode::GONE
    );
    let nothing = h
        .call(
            Method::DELETE,
            "/Patient?identifier=http://mrn.test|42",
            None,
        )
        .await;
    assert_eq!(nothing.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn transaction_and_batch_bundles() {
    let h = harness();
    let transaction = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": patient("Transact"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    });
    let reply = h.call(Method::POST, "/", Some(transaction)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "transaction-response");
    let entries = reply.body["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(
        entries[0]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201")
    );
    let found = h.get("/Observation?subject.family=transact").await;
    assert_eq!(found.body["total"], 1, "{}", found.body);
    assert_eq!(entries[0]["resource"]["name"][0]["family"], "Transact");

    // Bulk loaders ask for no resources back: each entry says where its resource went.
    let minimal = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient("Minimal"), "request": {"method": "POST", "url": "Patient"}}],
    });
    let reply = h
        .send(
            request(Method::POST, "/", Some(&minimal))
                .header("prefer", "return=minimal")
                .body(Body::from(minimal.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let entry = &reply.body["entry"][0];
    assert!(entry.get("resource").is_none(), "{entry}");
    let location = entry["response"]["location"].as_str().unwrap();
    assert!(location.starts_with("Patient/"), "{location}");
    assert_eq!(entry["response"]["etag"], "W/\"1\"");

    let failing = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": "Patient/nope"}}],
    });
    let failed = h.call(Method::POST, "/", Some(failing)).await;
    assert!(failed.status.is_client_error(), "{}", failed.status);
    assert_eq!(failed.body["resourceType"], "OperationOutcome");

    let batch = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("Batch"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        ],
    });
    let reply = h.call(Method::POST, "/", Some(batch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["type"], "batch-response");
    assert!(
        reply.body["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("404")
    );
}

#[tokio::test]
async fn searches_of_every_kind() {
    let h = harness();
    let p = h
        .call(Method::POST, "/Patient", Some(patient("Kind")))
        .await;
    let pid = p.body["id"].as_str().unwrap().to_owned();
    let observation = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "subject": {"reference": format!("Patient/{pid}")},
    });
    let o = h
        .call(Method::POST, "/Observation", Some(observation))
        .await;
    assert_eq!(o.status, StatusCode::CREATED);

    let compartment = h.get(&format!("/Patient/{pid}/Observation")).await;
    assert_eq!(compartment.status, StatusCode::OK, "{}", compartment.body);
    assert_eq!(compartment.body["total"], 1);
    let everything = h.get(&format!("/Patient/{pid}/*")).await;
    assert_eq!(everything.status, StatusCode::OK, "{}", everything.body);
    assert!(everything.body["total"].as_u64().unwrap() >= 1);

    let system = h.get("/?_type=Patient,Observation").await;
    assert_eq!(system.status, StatusCode::OK, "{}", system.body);
    assert_eq!(system.body["total"], 2);

    let posted = h
        .send(
            Request::post("/Patient/_search")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from("family=kind"))
                .unwrap(),
        )
        .await;
    assert_eq!(posted.status, StatusCode::OK, "{}", posted.body);
    assert_eq!(posted.body["total"], 1);
    let posted_json = h
        .call(Method::POST, "/Patient/_search", Some(json!({})))
        .await;
    assert_eq!(posted_json.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let system_post = h
        .send(
            Request::post("/_search")
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from("_type=Observation"))
                .unwrap(),
        )
        .await;
    assert_eq!(system_post.body["total"], 1, "{}", system_post.body);

    let strict = h.get("/Patient?nonsense=1").await;
    assert_eq!(strict.status, StatusCode::BAD_REQUEST);
    assert_eq!(strict.issue_code(), "invalid");
    assert_security_headers(&strict);

    let lenient = h
        .send(
            Request::get("/Patient?nonsense=1&family=kind")
                .header("prefer", "handling=lenient")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(lenient.status, StatusCode::OK, "{}", lenient.body);
    assert_eq!(lenient.body["total"], 1);
    let warning = lenient.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("a warning entry");
    assert_eq!(warning["resource"]["issue"][0]["severity"], "warning");
    assert!(
        warning["resource"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("nonsense")
    );
}

#[tokio::test]
async fn search_and_history_paging_follow_next_links() {
    let h = harness();
    for family in ["Page", "Page", "Page"] {
        let r = h
            .call(Method::POST, "/Patient", Some(patient(family)))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let relative = |url: &str| url.strip_prefix(BASE).unwrap().to_owned();
    let next_of = super::test_support::next_link;

    let first = h.get("/Patient?family=page&_count=2").await;
    assert_eq!(first.body["entry"].as_array().unwrap().len(), 2);
    let next = next_of(&first.body).expect("a next link");
    let second = h.get(&relative(&next)).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_eq!(second.body["entry"].as_array().unwrap().len(), 1);

    let first = h.get("/Patient/_history?_count=2").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["entry"].as_array().unwrap().len(), 2);
    let next = next_of(&first.body).expect("a history next link");
    assert!(next.contains("_cursor="), "{next}");
    let second = h.get(&relative(&next)).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_eq!(second.body["entry"].as_array().unwrap().len(), 1);

    let system = h.get("/_history?_since=2000-01-01").await;
    assert_eq!(system.status, StatusCode::OK, "{}", system.body);
    assert_eq!(system.body["entry"].as_array().unwrap().len(), 3);
    let future = h.get("/_history?_since=2999-01-01T00:00:00Z").await;
    assert_eq!(future.body["entry"].as_array().unwrap().len(), 0);
    let at = h.get("/Patient/_history?_at=2000-01-01").await;
    assert_eq!(at.status, StatusCode::OK, "{}", at.body);
    assert_eq!(at.body["entry"].as_array().unwrap().len(), 0);
    let bad = h.get("/_history?_since=yesterday").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let unknown = h.get("/_history?family=x").await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn metadata_lists_types_interactions_and_search_parameters() {
    let h = harness();
    let reply = h.get("/metadata").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_security_headers(&reply);
    let statement = &reply.body;
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    assert_eq!(statement["implementation"]["url"], BASE);
    let rest = &statement["rest"][0];
    let resources = rest["resource"].as_array().unwrap();
    assert_eq!(
        resources.len(),
        fhirkeep_engine::resource::resource_types().len()
    );
    let patient = resources.iter().find(|r| r["type"] == "Patient").unwrap();
    let params = patient["searchParam"].as_array().unwrap();
    let param = |name: &str| params.iter().find(|p| p["name"] == name);
    assert_eq!(param("family").unwrap()["type"], "string");
    assert_eq!(param("birthdate").unwrap()["type"], "date");
    assert_eq!(param("identifier").unwrap()["type"], "token");
    let interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    for code in ["read", "vread", "update", "delete", "create", "search-type"] {
        assert!(interactions.contains(&code), "{code}");
    }
    let system: Vec<&str> = rest["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert!(system.contains(&"transaction"));
}

#[tokio::test]
async fn xml_is_not_acceptable() {
    let h = harness();
    let accept_xml = h
        .send(
            Request::get("/metadata")
                .header(ACCEPT, "application/fhir+xml")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(accept_xml.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(accept_xml.issue_code(), "not-supported");
    assert_security_headers(&accept_xml);
    let format_xml = h.get("/Patient?_format=xml").await;
    assert_eq!(format_xml.status, StatusCode::NOT_ACCEPTABLE);
    // `_format` wins over Accept, and the unencoded `+` of fhir+json is understood.
    let format_json = h
        .send(
            Request::get("/metadata?_format=application/fhir+json&_pretty=true")
                .header(ACCEPT, "application/fhir+xml")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(format_json.status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&format_json.raw).contains("\n  \"resourceType\""),
        "_pretty=true indents"
    );
    let browser = h
        .send(
            Request::get("/metadata")
                .header(ACCEPT, "text/html,application/xml;q=0.9,*/*;q=0.8")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(browser.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_content_type_is_unsupported() {
    let h = harness();
    for content_type in [Some("text/plain"), Some("application/fhir+xml"), None] {
        let mut builder = Request::post("/Patient");
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        let reply = h
            .send(builder.body(Body::from(patient("X").to_string())).unwrap())
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.issue_code(), "not-supported");
        assert_security_headers(&reply);
    }
}

#[tokio::test]
async fn bad_json_and_non_resources_are_bad_requests() {
    let h = harness();
    let reply = h
        .send(
            Request::post("/Patient")
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.issue_code(), "invalid");
    let array = h.call(Method::POST, "/Patient", Some(json!([1, 2]))).await;
    assert_eq!(array.status, StatusCode::BAD_REQUEST);
    let not_bundle = h.call(Method::POST, "/", Some(patient("NotABundle"))).await;
    assert_eq!(not_bundle.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(not_bundle.body["resourceType"], "OperationOutcome");
    let bad_if_match = h
        .send(
            Request::put("/Patient/x")
                .header(CONTENT_TYPE, "application/fhir+json")
                .header(IF_MATCH, "not-a-version")
                .body(Body::from(patient("X").to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(bad_if_match.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn body_over_the_limit_is_too_large() {
    let h = harness_with_limit(1024);
    let big = patient(&"x".repeat(4096));
    let reply = h.call(Method::POST, "/Patient", Some(big)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.issue_code(), "too-costly");
    assert_security_headers(&reply);
    let small = h.call(Method::POST, "/Patient", Some(patient("Y"))).await;
    assert_eq!(small.status, StatusCode::CREATED);
}

#[tokio::test]
async fn unknown_types_routes_and_ids_are_not_found() {
    let h = harness();
    for uri in [
        "/Foo/1",
        "/Foo",
        "/Foo/_history",
        "/a/b/c/d/e",
        "/Patient/1/Nope",
    ] {
        let reply = h.get(uri).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.issue_code(), "not-found", "{uri}");
        assert_security_headers(&reply);
    }
    let missing = h.get("/Patient/does-not-exist").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.issue_code(), "not-found");
    let bad_id = h.get("/Patient/bad_id!").await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unsupported_methods_are_not_allowed() {
    let h = harness();
    // PATCH is an interaction of resources (and of type conditions), not of histories.
    let patch = h
        .call(Method::PATCH, "/Patient/1/_history", Some(json!([])))
        .await;
    assert_eq!(patch.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(patch.issue_code(), "not-supported");
    assert_security_headers(&patch);
    let delete_metadata = h.call(Method::DELETE, "/metadata", None).await;
    assert_eq!(delete_metadata.status, StatusCode::METHOD_NOT_ALLOWED);
}

async fn boom() -> &'static str {
    panic!("secret detail Patient/canary")
}

#[tokio::test]
async fn a_panicking_handler_answers_500_without_detail() {
    let h = harness();
    let router = layered(routes().route("/boom", get(boom)), h.state.clone());
    let reply = send_to(&router, Request::get("/boom").body(Body::empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.issue_code(), "exception");
    assert!(!String::from_utf8_lossy(&reply.raw).contains("secret"));
    assert_security_headers(&reply);
}

/// The audit leaves recorded under `request_id`.
fn leaves_of(state: &AppState, request_id: &str) -> Vec<fhirkeep_engine::audit::AuditRecord> {
    let store = state.db();
    let size = store.store().audit_size().unwrap();
    (0..size)
        .map(|seq| store.store().audit_leaf(seq).unwrap().record)
        .filter(|r| r.request_id == request_id)
        .collect()
}

#[tokio::test]
async fn refused_requests_are_audited_once_and_engine_requests_not_twice() {
    let h = harness();
    let refused = [
        h.send(
            Request::post("/Patient")
                .header(CONTENT_TYPE, "text/plain")
                .body(Body::from("x"))
                .unwrap(),
        )
        .await,
        h.send(
            Request::get("/Patient")
                .header(ACCEPT, "application/xml")
                .body(Body::empty())
                .unwrap(),
        )
        .await,
        h.get("/Foo/1").await,
        h.call(Method::PATCH, "/Patient/1", None).await,
        h.get("/Patient?nonsense=1").await,
    ];
    for reply in &refused {
        let leaves = leaves_of(&h.state, reply.header("x-request-id"));
        assert_eq!(leaves.len(), 1, "status {}", reply.status);
        assert_eq!(leaves[0].action, AuditAction::Other("http-refused".into()));
        assert_ne!(leaves[0].outcome, AuditOutcome::Success);
        assert_eq!(leaves[0].actor.subject, "anonymous");
    }

    let created = h.call(Method::POST, "/Patient", Some(patient("A"))).await;
    let leaves = leaves_of(&h.state, created.header("x-request-id"));
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].action, AuditAction::Create);
    let id = created.body["id"].as_str().unwrap();
    let read = h.get(&format!("/Patient/{id}")).await;
    let leaves = leaves_of(&h.state, read.header("x-request-id"));
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].action, AuditAction::Read);
    let missing = h.get("/Patient/nothing-here").await;
    let leaves = leaves_of(&h.state, missing.header("x-request-id"));
    assert_eq!(leaves.len(), 1);
    assert_eq!(leaves[0].outcome, AuditOutcome::NotFound);
    let metadata = h.get("/metadata").await;
    assert_eq!(
        leaves_of(&h.state, metadata.header("x-request-id")).len(),
        1
    );
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_carry_route_templates_but_no_ids_or_query_values() {
    let captured = Captured::default();
    let writer = captured.clone();
    // Global, so that lines logged on blocking threads are captured as well. No other test
    // installs a subscriber.
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let h = harness();
    let mut body = patient("Canaryfamilyvalue");
    body["id"] = json!("canary-id-7731");
    let put = h
        .call(Method::PUT, "/Patient/canary-id-7731", Some(body))
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    let _ = h.get("/Patient/canary-id-7731").await;
    let _ = h.get("/Patient/canary-id-7731/_history/1").await;
    let _ = h.get("/Patient?family=Canaryfamilyvalue").await;
    let _ = h.get("/Patient?canaryparam=Canaryqueryvalue").await;
    let _ = h.get("/Patient/canary-missing-id").await;
    let _ = h.get("/Canarytype/canary-id-7731").await;
    let _ = h.call(Method::PATCH, "/Patient/canary-id-7731", None).await;
    let _ = h
        .call(Method::DELETE, "/Patient/canary-id-7731", None)
        .await;
    let _ = h.get("/Patient/canary-id-7731").await;
    let request_id = put.header("x-request-id").to_owned();
    std::io::stdout().flush().unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture works: the request lines are there, with their templates and ids.
    assert!(logs.contains("route=/{type}/{id}"), "{logs}");
    assert!(logs.contains("route=/{type}"), "{logs}");
    assert!(logs.contains(&request_id), "{logs}");
    assert!(logs.contains("status=410"), "{logs}");
    for canary in [
        "canary-id-7731",
        "Canaryfamilyvalue",
        "Canaryqueryvalue",
        "canary-missing-id",
        "Canarytype",
        "canaryparam",
    ] {
        assert!(!logs.contains(canary), "{canary} was logged:\n{logs}");
    }
}

#[tokio::test]
async fn the_api_is_served_at_the_path_of_the_base_url() {
    let h = harness_at("http://proxy.test/fhir/r4", super::DEFAULT_BODY_LIMIT);
    let created = h
        .call(Method::POST, "/fhir/r4/Patient", Some(patient("Prefixed")))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let location = created.header(LOCATION);
    assert_eq!(
        location,
        format!("http://proxy.test/fhir/r4/Patient/{id}/_history/1")
    );
    let path = location.strip_prefix("http://proxy.test").unwrap();
    assert_eq!(h.get(path).await.status, StatusCode::OK);
    assert_eq!(h.get("/fhir/r4/metadata").await.status, StatusCode::OK);
    let outside = h.get(&format!("/Patient/{id}")).await;
    assert_eq!(outside.status, StatusCode::NOT_FOUND);
    assert_eq!(outside.issue_code(), "not-found");
    assert_security_headers(&outside);
}
