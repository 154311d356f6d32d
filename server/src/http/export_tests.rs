//! `oneshot` tests of Bulk Data `$export` and the audit views against a real encrypted
//! database in a temporary directory, with and without SMART tokens.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_LOCATION, CONTENT_TYPE};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use fhirkeep_engine::audit::{ConsistencyProof, InclusionProof, SignedTreeHead};
use fhirkeep_engine::crypto::KeySource;
use fhirkeep_engine::store::AccessContext;
use fhirkeep_query::Database;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt as _;

use super::auth::trusted_keys;
use super::{AppState, AuthMode, ServerConfig, SmartSettings, app};

const BASE: &str = "http://fhir.test";
const ISSUER: &str = "https://issuer.test";
const JWKS: &str = include_str!("../../tests/fixtures/test-only-jwks.json");
const EC_KEY: &str = include_str!("../../tests/fixtures/test-only-ec-p256-private.pem");
const CANARY: &str = "Export-Canary-51d7-Okapi";

struct Harness {
    dir: TempDir,
    state: AppState,
    app: Router,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    raw: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.raw).unwrap()
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

fn resources() -> Vec<Value> {
    let observation = |id: &str, patient: &str| {
        json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "code": {"text": "a measurement"},
            "subject": {"reference": format!("Patient/{patient}")},
        })
    };
    vec![
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": CANARY}]}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]}),
        json!({"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Doc"}]}),
        observation("o1", "p1"),
        observation("o2", "p2"),
        observation("o3", "p1"),
        json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
               "member": [{"entity": {"reference": "Patient/p2"}}]}),
    ]
}

fn harness(smart: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = super::test_support::new_database(dir.path());
    let ctx = AccessContext::local("seed");
    for resource in resources() {
        let t = resource["resourceType"].as_str().unwrap().to_owned();
        let id = resource["id"].as_str().unwrap().to_owned();
        db.update(&ctx, &t, &id, resource, None).unwrap();
    }
    let auth = if smart {
        let (jwks, _) = trusted_keys(&serde_json::from_str(JWKS).unwrap());
        AuthMode::Smart(SmartSettings {
            jwks,
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
        dir,
        app: app(state.clone()),
        state,
    }
}

fn token(scope: &str, client: &str, patient: Option<&str>) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": ISSUER, "aud": BASE, "sub": "bulk-subject", "client_id": client,
        "iat": now, "exp": now + 300, "scope": scope,
    });
    if let Some(patient) = patient {
        claims["patient"] = json!(patient);
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-ec-1".to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
    )
    .unwrap()
}

impl Harness {
    async fn call(&self, method: Method, uri: &str, token: Option<&str>, asynch: bool) -> Reply {
        let mut builder = Request::builder().method(method).uri(uri);
        if asynch {
            builder = builder
                .header("prefer", "respond-async")
                .header("accept", "application/fhir+json");
        }
        if let Some(token) = token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = self
            .app
            .clone()
            .oneshot(builder.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let raw = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Reply {
            status,
            headers,
            raw,
        }
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Reply {
        self.call(Method::GET, uri, token, false).await
    }

    /// Kicks off an export and returns the status URL's path.
    async fn kick_off(&self, uri: &str, token: Option<&str>) -> String {
        let reply = self.call(Method::GET, uri, token, true).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.json());
        let location = reply.header(CONTENT_LOCATION.as_str());
        let path = location.strip_prefix(BASE).unwrap().to_owned();
        let id = path.strip_prefix("/$export-status/").unwrap();
        assert_eq!(id.len(), 64, "an unguessable id");
        path
    }

    /// Polls until the manifest is there.
    async fn manifest(&self, status: &str, token: Option<&str>) -> Value {
        for _ in 0..200 {
            let reply = self.get(status, token).await;
            match reply.status {
                StatusCode::ACCEPTED => {
                    assert!(!reply.header("x-progress").is_empty());
                    assert_eq!(reply.header("retry-after"), "1");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                StatusCode::OK => return reply.json(),
                other => panic!("status {other}: {:?}", String::from_utf8_lossy(&reply.raw)),
            }
        }
        panic!("the export did not finish");
    }

    /// Runs an export without a token to its end: every file, as [`Harness::files`] gives it.
    async fn export(&self, uri: &str) -> Vec<(String, Vec<Value>)> {
        let status = self.kick_off(uri, None).await;
        self.files(&self.manifest(&status, None).await, None).await
    }

    /// Every file of a manifest: (type, parsed lines).
    async fn files(&self, manifest: &Value, token: Option<&str>) -> Vec<(String, Vec<Value>)> {
        let mut files = Vec::new();
        for output in manifest["output"].as_array().unwrap() {
            let url = output["url"].as_str().unwrap();
            let reply = self.get(url.strip_prefix(BASE).unwrap(), token).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(
                reply.header(CONTENT_TYPE.as_str()),
                "application/fhir+ndjson"
            );
            let lines: Vec<Value> = String::from_utf8(reply.raw)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect();
            assert_eq!(output["count"], lines.len());
            files.push((output["type"].as_str().unwrap().to_owned(), lines));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    fn stored(&self, key: &str) -> Value {
        let (t, id) = key.split_once('/').unwrap();
        let db = self.state.db();
        db.store()
            .read(&AccessContext::local("test"), t, id)
            .unwrap()
            .to_json()
            .unwrap()
    }
}

fn keys(files: &[(String, Vec<Value>)]) -> Vec<String> {
    let mut keys: Vec<String> = files
        .iter()
        .flat_map(|(_, lines)| lines.iter())
        .map(|r| {
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

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn a_system_export_returns_every_stored_resource_as_ndjson() {
    let h = harness(false);
    let status = h.kick_off("/$export", None).await;
    let manifest = h.manifest(&status, None).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["error"], json!([]));
    assert_eq!(manifest["request"], format!("{BASE}/$export"));
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    let files = h.files(&manifest, None).await;
    let types: Vec<&str> = files.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["Group", "Observation", "Patient", "Practitioner"]);
    let mut expected: Vec<String> = resources()
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    expected.sort();
    assert_eq!(keys(&files), expected);
    for (_, lines) in &files {
        for line in lines {
            let key = format!(
                "{}/{}",
                line["resourceType"].as_str().unwrap(),
                line["id"].as_str().unwrap()
            );
            assert_eq!(line, &h.stored(&key), "{key}");
        }
    }

    // The files are encrypted at rest: no plaintext canary in any file of the directory.
    h.state.db().store().flush_audit().unwrap();
    let mut scanned = 0;
    for path in walk(h.dir.path()) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "plaintext canary in {}",
            path.display()
        );
        scanned += 1;
    }
    assert!(h.dir.path().join("db/exports.redb").exists());
    assert!(scanned >= 4, "{scanned} files scanned");
}

#[tokio::test]
async fn type_and_since_filter_the_export() {
    let h = harness(false);
    let files = h
        .export("/$export?_type=Patient,Practitioner&_outputFormat=application/fhir%2Bndjson")
        .await;
    assert_eq!(
        keys(&files),
        ["Patient/p1", "Patient/p2", "Practitioner/dr1"]
    );

    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let db = h.state.db();
    db.update(
        &AccessContext::local("test"),
        "Patient",
        "p2",
        json!({"resourceType": "Patient", "id": "p2", "gender": "female"}),
        None,
    )
    .unwrap();
    // With a `+00:00` offset, sent unencoded as clients do.
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    assert!(since.ends_with("+00:00"));
    let files = h.export(&format!("/$export?_since={since}")).await;
    assert_eq!(keys(&files), ["Patient/p2"]);
    assert_eq!(files[0].1[0]["gender"], "female");
}

/// `_elements` keeps the listed root elements (unqualified ones in every type, `Type.name` in
/// its type), the mandatory ones, `id` and `meta`, and tags what it cut as SUBSETTED; a type
/// the list does not speak of is exported whole.
#[tokio::test]
async fn elements_subset_the_exported_resources() {
    let h = harness(false);
    let files = h.export("/$export?_type=Patient,Observation,Practitioner&_elements=Patient.id,Observation.subject").await;
    for (name, resources) in &files {
        for resource in resources {
            let keys: Vec<&str> = resource
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let subsetted = resource["meta"]["tag"]
                .as_array()
                .is_some_and(|tags| tags.iter().any(|t| t["code"] == "SUBSETTED"));
            match resource["resourceType"].as_str().unwrap() {
                "Patient" => {
                    assert!(!keys.contains(&"name"), "{name}: {resource}");
                    assert!(subsetted, "{resource}");
                }
                "Observation" => {
                    // subject as asked; status and code are mandatory.
                    for kept in ["subject", "status", "code", "id", "meta"] {
                        assert!(keys.contains(&kept), "{kept} missing: {resource}");
                    }
                }
                "Practitioner" => {
                    assert!(keys.contains(&"name"), "{resource}");
                    assert!(!subsetted, "{resource}");
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert_eq!(
        keys(&files),
        [
            "Observation/o1",
            "Observation/o2",
            "Observation/o3",
            "Patient/p1",
            "Patient/p2",
            "Practitioner/dr1"
        ]
    );
}

/// A system export with `_since` lists the resources deleted since then (and not written
/// again) under `deleted`, as Bundles of DELETE entries; without `_since` there are none.
#[tokio::test]
async fn since_exports_list_the_deletions_since_then() {
    let h = harness(false);
    let status = h.kick_off("/$export", None).await;
    assert_eq!(h.manifest(&status, None).await["deleted"], json!([]));

    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let db = h.state.db();
    let ctx = AccessContext::local("test");
    db.delete(&ctx, "Observation", "o2", None).unwrap();
    // Deleted and written again: it is in `output`, not in `deleted`.
    db.delete(&ctx, "Patient", "p1", None).unwrap();
    db.update(
        &ctx,
        "Patient",
        "p1",
        json!({"resourceType": "Patient", "id": "p1", "gender": "other"}),
        None,
    )
    .unwrap();
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let status = h.kick_off(&format!("/$export?_since={since}"), None).await;
    let manifest = h.manifest(&status, None).await;
    let files = h.files(&manifest, None).await;
    assert_eq!(keys(&files), ["Patient/p1"]);
    let deleted = manifest["deleted"].as_array().unwrap();
    assert_eq!(deleted.len(), 1, "{manifest}");
    assert_eq!(deleted[0]["type"], "Bundle");
    assert_eq!(deleted[0]["count"], 1);
    let url = deleted[0]["url"].as_str().unwrap();
    assert!(url.ends_with("/deleted-Observation.ndjson"), "{url}");
    let reply = h.get(url.strip_prefix(BASE).unwrap(), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let bundle: Value = serde_json::from_slice(&reply.raw).unwrap();
    assert_eq!(bundle["type"], "transaction");
    assert_eq!(
        bundle["entry"],
        json!([{"request": {"method": "DELETE", "url": "Observation/o2"}}])
    );
}

impl Harness {
    /// The `Type/id` of every DELETE entry of a manifest's `deleted` files, sorted.
    async fn deletions(&self, manifest: &Value) -> Vec<String> {
        let mut urls = Vec::new();
        for file in manifest["deleted"].as_array().unwrap() {
            let url = file["url"].as_str().unwrap();
            let reply = self.get(url.strip_prefix(BASE).unwrap(), None).await;
            assert_eq!(reply.status, StatusCode::OK);
            for line in reply.raw.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let bundle: Value = serde_json::from_slice(line).unwrap();
                for entry in bundle["entry"].as_array().unwrap() {
                    assert_eq!(entry["request"]["method"], "DELETE");
                    urls.push(entry["request"]["url"].as_str().unwrap().to_owned());
                }
            }
        }
        urls.sort();
        urls
    }
}

/// Patient and Group exports with `_since` list the deletions they cover: deleted patients
/// (of the group, for a Group export) and deleted resources whose last content was in the
/// compartment of a patient (a member) — judged from that content, since the index no
/// longer holds them.
#[tokio::test]
async fn patient_and_group_exports_list_the_deletions_of_their_compartments() {
    let h = harness(false);
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let db = h.state.db();
    let ctx = AccessContext::local("test");
    for (resource_type, id) in [
        ("Observation", "o1"),
        ("Observation", "o2"),
        ("Practitioner", "dr1"),
        ("Patient", "p2"),
    ] {
        db.delete(&ctx, resource_type, id, None).unwrap();
    }
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);

    let status = h
        .kick_off(
            &format!("/Patient/$export?_type=Patient,Observation,Practitioner&_since={since}"),
            None,
        )
        .await;
    let manifest = h.manifest(&status, None).await;
    assert_eq!(
        h.deletions(&manifest).await,
        ["Observation/o1", "Observation/o2", "Patient/p2"],
        "{manifest}"
    );

    // The group's one member is p2: its deletion and its observation's, not p1's.
    let status = h
        .kick_off(&format!("/Group/g1/$export?_since={since}"), None)
        .await;
    let manifest = h.manifest(&status, None).await;
    assert_eq!(
        h.deletions(&manifest).await,
        ["Observation/o2", "Patient/p2"],
        "{manifest}"
    );
}

#[tokio::test]
async fn type_filters_export_only_matches_of_their_types() {
    let h = harness(false);
    let db = h.state.db();
    db.update(
        &AccessContext::local("test"),
        "Observation",
        "o3",
        json!({"resourceType": "Observation", "id": "o3", "status": "amended",
               "code": {"text": "a measurement"}, "subject": {"reference": "Patient/p1"}}),
        None,
    )
    .unwrap();
    // Observations: only those matching either filter (one with an OR of values); every
    // other type whole.
    let files = h
        .export(concat!(
            "/$export?_type=Observation,Practitioner",
            "&_typeFilter=Observation%3Fstatus%3Damended%2Ccancelled,",
            "Observation%3Fsubject%3DPatient%2Fp2",
        ))
        .await;
    assert_eq!(
        keys(&files),
        ["Observation/o2", "Observation/o3", "Practitioner/dr1"]
    );
    // In a Patient export the filter applies within each compartment.
    let files = h
        .export(
            "/Patient/$export?_type=Patient,Observation&_typeFilter=Observation%3Fstatus%3Dfinal",
        )
        .await;
    assert_eq!(
        keys(&files),
        [
            "Observation/o1",
            "Observation/o2",
            "Patient/p1",
            "Patient/p2"
        ]
    );
}

#[tokio::test]
async fn patient_and_group_exports_cover_compartments() {
    let h = harness(false);
    let files = h
        .export("/Patient/$export?_type=Patient,Observation,Practitioner")
        .await;
    // Practitioner is not in the patient compartment.
    assert_eq!(
        keys(&files),
        [
            "Observation/o1",
            "Observation/o2",
            "Observation/o3",
            "Patient/p1",
            "Patient/p2"
        ]
    );
    let files = h.export("/Group/g1/$export").await;
    // The group itself is in its member's compartment (Group.member).
    assert_eq!(keys(&files), ["Group/g1", "Observation/o2", "Patient/p2"]);
    let missing = h.call(Method::GET, "/Group/nope/$export", None, true).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn kick_off_needs_respond_async_and_valid_parameters() {
    let h = harness(false);
    assert_eq!(
        h.get("/$export", None).await.status,
        StatusCode::BAD_REQUEST
    );
    for uri in [
        "/$export?_outputFormat=text/csv",
        "/$export?_type=Nonsense",
        "/$export?_since=yesterday",
        // `_elements` names root elements of known types only.
        "/$export?_elements=Patient.name.family",
        "/$export?_elements=Nonsense.name",
        "/$export?_elements=Name",
        "/$export?_count=5",
        // A _typeFilter must be a search of a known type with known parameters only.
        "/$export?_typeFilter=Nonsense%3Fx%3D1",
        "/$export?_typeFilter=Patient%3Fnope%3D1",
        "/$export?_typeFilter=Patient",
        "/$export?_typeFilter=Patient%3F_sort%3Dname",
        "/$export?_type=Observation&_typeFilter=Patient%3Fgender%3Dmale",
    ] {
        let reply = h.call(Method::GET, uri, None, true).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(
        h.get("/$export-status/0123456789abcdef", None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn delete_and_expiry_remove_jobs_and_files() {
    let h = harness(false);
    let status = h.kick_off("/$export?_type=Patient", None).await;
    let manifest = h.manifest(&status, None).await;
    let file = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .strip_prefix(BASE)
        .unwrap()
        .to_owned();
    let deleted = h.call(Method::DELETE, &status, None, false).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED);
    assert_eq!(h.get(&status, None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.get(&file, None).await.status, StatusCode::NOT_FOUND);

    let status = h.kick_off("/$export?_type=Patient", None).await;
    let manifest = h.manifest(&status, None).await;
    let file = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .strip_prefix(BASE)
        .unwrap()
        .to_owned();
    assert_eq!(h.get(&file, None).await.status, StatusCode::OK);
    // Not expired yet: nothing is swept.
    assert_eq!(
        h.state
            .sweep_exports_at(chrono::Utc::now().timestamp_millis()),
        0
    );
    let later = chrono::Utc::now().timestamp_millis() + 2 * 3600 * 1000;
    assert_eq!(h.state.sweep_exports_at(later), 1);
    assert_eq!(h.get(&status, None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.get(&file, None).await.status, StatusCode::NOT_FOUND);
    // The chunks are gone from the encrypted file too.
    assert_eq!(file_chunks(&h), 0);
}

/// The number of file chunks in the export store.
fn file_chunks(h: &Harness) -> u64 {
    let db = h.state.db();
    let aux = h.state.exports().db(db.store()).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&*aux).unwrap();
    let files = txn.open_table(super::export::FILES).unwrap();
    redb::ReadableTableMetadata::len(&files).unwrap()
}

#[tokio::test]
async fn a_tiny_ttl_expires_jobs_on_the_periodic_task() {
    let h = harness(false);
    h.state.start_exports(Duration::from_secs(2)).unwrap();
    let status = h.kick_off("/$export?_type=Patient", None).await;
    h.manifest(&status, None).await;
    assert!(file_chunks(&h) > 0);
    let mut gone = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The periodic task, not the status check, removes the files.
        if file_chunks(&h) == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "the job's files outlived its ttl");
    assert_eq!(h.get(&status, None).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn under_smart_only_the_owner_downloads_and_patient_tokens_are_refused() {
    let h = harness(true);
    let owner = token("system/*.read", "bulk-client", None);
    let other = token("system/*.read", "other-client", None);
    let status = h.kick_off("/$export", Some(&owner)).await;
    let manifest = h.manifest(&status, Some(&owner)).await;
    assert_eq!(
        h.get(&status, Some(&other)).await.status,
        StatusCode::NOT_FOUND
    );
    for output in manifest["output"].as_array().unwrap() {
        let file = output["url"].as_str().unwrap().strip_prefix(BASE).unwrap();
        assert_eq!(
            h.get(file, Some(&other)).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(h.get(file, None).await.status, StatusCode::UNAUTHORIZED);
        assert_eq!(h.get(file, Some(&owner)).await.status, StatusCode::OK);
    }
    assert_eq!(
        h.call(Method::DELETE, &status, Some(&other), false)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Types the token cannot read are left out.
    let observations = token("system/Observation.read", "bulk-client", None);
    let status = h.kick_off("/$export", Some(&observations)).await;
    let files = h
        .files(
            &h.manifest(&status, Some(&observations)).await,
            Some(&observations),
        )
        .await;
    assert_eq!(
        keys(&files),
        ["Observation/o1", "Observation/o2", "Observation/o3"]
    );

    let patient = token("patient/*.read", "bulk-client", Some("p1"));
    let refused = h
        .call(Method::GET, "/Patient/$export", Some(&patient), true)
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let writer = token("system/*.write", "bulk-client", None);
    let refused = h.call(Method::GET, "/$export", Some(&writer), true).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    // Every export request left a leaf naming the token's subject and client, and the
    // job's reads are audited as exports by the same subject.
    let db = h.state.db();
    let size = db.store().audit_size().unwrap();
    let leaves: Vec<_> = (0..size)
        .map(|i| db.store().audit_leaf(i).unwrap())
        .collect();
    assert!(leaves.iter().any(|l| l.record.action.as_str() == "export"
        && l.record.actor.subject == "bulk-subject"
        && l.record.actor.client == "bulk-client"));
    assert!(
        leaves
            .iter()
            .any(|l| l.record.actor.client == "other-client"
                && l.record.outcome.as_str() != "success")
    );
    // Kick-offs, polls and downloads: each request of the owner left an `http` leaf.
    let owner_requests = leaves
        .iter()
        .filter(|l| l.record.actor.client == "bulk-client" && l.record.action.as_str() == "http")
        .count();
    let downloads = manifest["output"].as_array().unwrap().len();
    assert!(owner_requests >= 2 + 2 * downloads, "{owner_requests}");
}

#[tokio::test]
async fn audit_events_show_the_log_read_only() {
    let h = harness(false);
    let page = h.get("/AuditEvent?_count=3", None).await;
    assert_eq!(page.status, StatusCode::OK);
    let bundle = page.json();
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["resource"]["resourceType"], "AuditEvent");
    assert_eq!(entries[0]["resource"]["id"], "0");
    // The leaf of the first seeded write, as an AuditEvent.
    let db = h.state.db();
    let (seq, leaf) = (0..db.store().audit_size().unwrap())
        .map(|i| (i, db.store().audit_leaf(i).unwrap()))
        .find(|(_, l)| l.record.id.is_some() && l.record.version.is_some())
        .unwrap();
    let first = h.get(&format!("/AuditEvent/{seq}"), None).await.json();
    assert_eq!(first["resourceType"], "AuditEvent");
    assert_eq!(first["id"], seq.to_string());
    assert_eq!(
        first["extension"][0]["valueString"],
        hex::encode(leaf.hash())
    );
    assert_eq!(
        first["agent"][0]["who"]["identifier"]["value"],
        leaf.record.actor.subject
    );
    let reference = format!(
        "{}/{}/_history/{}",
        leaf.record.resource_type.as_deref().unwrap(),
        leaf.record.id.as_deref().unwrap(),
        leaf.record.version.unwrap()
    );
    assert_eq!(first["entity"][0]["what"]["reference"], reference);
    assert_eq!(first["recorded"].as_str().unwrap().len(), 27);
    let next = super::test_support::next_link(&bundle).unwrap();
    let second = h.get(next.strip_prefix(BASE).unwrap(), None).await.json();
    assert_eq!(second["entry"][0]["resource"]["id"], "3");
    let one = h.get("/AuditEvent/1", None).await;
    assert_eq!(one.json()["id"], "1");
    assert_eq!(
        h.get("/AuditEvent/999999", None).await.status,
        StatusCode::NOT_FOUND
    );

    // Dates: nothing before 2000, everything after.
    let none = h
        .get("/AuditEvent?date=le2000-01-01T01:00:00+01:00", None)
        .await
        .json();
    assert!(none["entry"].as_array().unwrap().is_empty());
    let all = h
        .get("/AuditEvent?date=ge2000-01-01T00:00:00Z&_count=1000", None)
        .await
        .json();
    assert!(all["entry"].as_array().unwrap().len() >= 7);
    // A value too short for a prefix, or whose second byte is inside a character: 400.
    for value in ["g", "%F0%9F%98%80", "g%C3%A9", "ge"] {
        let reply = h.get(&format!("/AuditEvent?date={value}"), None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{value}");
    }

    let body = json!({"resourceType": "AuditEvent", "id": "x"}).to_string();
    for (method, uri) in [
        (Method::POST, "/AuditEvent"),
        (Method::PUT, "/AuditEvent/x"),
        (Method::DELETE, "/AuditEvent/1"),
    ] {
        let reply = h
            .app
            .clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header(CONTENT_TYPE, "application/fhir+json")
                    .body(Body::from(body.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::METHOD_NOT_ALLOWED, "{uri}");
        let body = axum::body::to_bytes(reply.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
    }
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [{
        "resource": {"resourceType": "AuditEvent"},
        "request": {"method": "POST", "url": "AuditEvent"},
    }]});
    let reply = h
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/")
                .header(CONTENT_TYPE, "application/fhir+json")
                .body(Body::from(bundle.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn audit_proofs_verify_without_the_key() {
    let h = harness(false);
    let old = SignedTreeHead::from_json(
        &String::from_utf8(h.get("/$audit-head", None).await.raw).unwrap(),
    )
    .unwrap();
    old.verify().unwrap();
    // More requests, more leaves.
    h.get("/Patient/p1", None).await;
    h.get("/Patient/p2", None).await;
    let new = SignedTreeHead::from_json(
        &String::from_utf8(h.get("/$audit-head", None).await.raw).unwrap(),
    )
    .unwrap();
    assert!(new.size > old.size);
    let proof = h
        .get(&format!("/$audit-proof?leaf=2&size={}", new.size), None)
        .await;
    assert_eq!(proof.status, StatusCode::OK);
    let proof = InclusionProof::from_json(&String::from_utf8(proof.raw).unwrap()).unwrap();
    proof.verify(&new).unwrap();
    // A proof for another leaf does not verify as this one's.
    let mut forged = proof.clone();
    forged.leaf_index = 3;
    assert!(forged.verify(&new).is_err());
    let consistency = h
        .get(
            &format!("/$audit-consistency?first={}&second={}", old.size, new.size),
            None,
        )
        .await;
    let consistency =
        ConsistencyProof::from_json(&String::from_utf8(consistency.raw).unwrap()).unwrap();
    consistency.verify(&old, &new).unwrap();
    for uri in [
        "/$audit-proof",
        "/$audit-proof?leaf=999999",
        "/$audit-consistency?first=0&second=1",
        "/$audit-consistency?first=5&second=2",
    ] {
        assert_eq!(
            h.get(uri, None).await.status,
            StatusCode::BAD_REQUEST,
            "{uri}"
        );
    }
}

#[tokio::test]
async fn the_audit_log_needs_a_system_audit_scope() {
    let h = harness(true);
    let admin = token("system/AuditEvent.read", "admin", None);
    let v2 = token("system/AuditEvent.rs", "admin", None);
    let user = token("user/*.read", "app", None);
    let patient = token("patient/*.read", "app", Some("p1"));
    for uri in [
        "/AuditEvent",
        "/AuditEvent/0",
        "/$audit-head",
        "/$audit-proof?leaf=0",
        "/$audit-consistency?first=1&second=1",
    ] {
        assert_eq!(
            h.get(uri, Some(&admin)).await.status,
            StatusCode::OK,
            "{uri}"
        );
        assert_eq!(h.get(uri, Some(&v2)).await.status, StatusCode::OK, "{uri}");
        assert_eq!(
            h.get(uri, Some(&user)).await.status,
            StatusCode::FORBIDDEN,
            "{uri}"
        );
        assert_eq!(
            h.get(uri, Some(&patient)).await.status,
            StatusCode::FORBIDDEN,
            "{uri}"
        );
        assert_eq!(
            h.get(uri, None).await.status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
}

#[tokio::test]
async fn finished_jobs_survive_a_restart_until_they_expire() {
    let h = harness(false);
    let status = h.kick_off("/$export?_type=Patient", None).await;
    let manifest = h.manifest(&status, None).await;
    let before = h.files(&manifest, None).await;
    let Harness {
        dir,
        state,
        app: router,
    } = h;
    drop(router);
    drop(state);
    // The job's thread lets go of the database a moment after the manifest appears.
    let mut db = None;
    for _ in 0..100 {
        match Database::builder(dir.path().join("db"))
            .key(KeySource::KeyFile(dir.path().join("key")))
            .open()
        {
            Ok(opened) => {
                db = Some(opened);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let db = db.unwrap();
    let state = AppState::new(
        db,
        ServerConfig {
            base_url: format!("{BASE}/"),
            max_body_bytes: super::DEFAULT_BODY_LIMIT,
            auth: AuthMode::None,
            ..ServerConfig::for_tests()
        },
    );
    let h = Harness {
        dir,
        app: app(state.clone()),
        state,
    };
    assert_eq!(h.manifest(&status, None).await, manifest);
    assert_eq!(h.files(&manifest, None).await, before);
}

#[tokio::test]
async fn metadata_lists_the_operations_and_a_read_only_audit_event() {
    let h = harness(false);
    let statement = h.get("/metadata", None).await.json();
    let rest = &statement["rest"][0];
    let names: Vec<&str> = rest["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    for name in [
        "export",
        "patient-export",
        "group-export",
        "audit-head",
        "audit-proof",
        "audit-consistency",
    ] {
        assert!(names.contains(&name), "{name}");
    }
    let audit = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "AuditEvent")
        .unwrap();
    assert_eq!(
        audit["interaction"],
        json!([{"code": "read"}, {"code": "search-type"}])
    );
}

#[tokio::test]
async fn large_types_are_split_into_several_files_and_chunks() {
    let h = harness(false);
    let db = h.state.db();
    let ctx = AccessContext::local("seed");
    for i in 0..120 {
        let id = format!("many{i}");
        let patient = json!({"resourceType": "Patient", "id": id, "name": [{"family": format!("Family number {i}"), "given": ["A", "rather", "long", "given", "name"]}]});
        db.update(&ctx, "Patient", &id, patient, None).unwrap();
    }
    let status = h.kick_off("/$export?_type=Patient", None).await;
    let manifest = h.manifest(&status, None).await;
    let outputs = manifest["output"].as_array().unwrap();
    assert!(outputs.len() >= 3, "{manifest}");
    assert_eq!(
        outputs[0]["url"],
        format!("{BASE}{}", status.replace("$export-status", "$export-file")) + "/Patient.ndjson"
    );
    assert_eq!(
        outputs[1]["url"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap(),
        "Patient.2.ndjson"
    );
    assert!(outputs.iter().all(|o| o["type"] == "Patient"));
    let files = h.files(&manifest, None).await;
    let keys = keys(&files);
    assert_eq!(keys.len(), 122);
    let unique: std::collections::BTreeSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), 122, "a resource in two files");
    for (_, lines) in &files {
        for line in lines {
            let key = format!("Patient/{}", line["id"].as_str().unwrap());
            assert_eq!(line, &h.stored(&key));
        }
    }
}

#[tokio::test]
async fn a_client_may_run_only_a_few_exports_at_once() {
    let h = harness(true);
    let busy = token("system/*.read", "busy-client", None);
    let calm = token("system/*.read", "calm-client", None);
    let grant = |client: &str| {
        super::auth::Grant::from_token("bulk-subject".into(), client.into(), None, Vec::new())
    };
    h.state.fake_running_exports(&grant("busy-client"), 3);
    // Three running: a fourth is let in, a fifth is not.
    h.kick_off("/$export?_type=Patient", Some(&busy)).await;
    h.state.fake_running_exports(&grant("busy-client"), 4);
    let refused = h.call(Method::GET, "/$export", Some(&busy), true).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["issue"][0]["code"], "throttled");
    // Another client is not affected.
    h.kick_off("/$export?_type=Patient", Some(&calm)).await;
}
