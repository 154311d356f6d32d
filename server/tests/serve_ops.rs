//! The FHIR operations of `fhirkeep serve` end to end: the real binary on a loopback port,
//! PATCH, `$everything` and `$validate` over real HTTP, and no id or value of patient data
//! in the server's log.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use serde_json::{Value, json};
use tempfile::TempDir;

use common::{Server, agent, body_of};

#[test]
fn patch_everything_and_validate_over_http() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(dir.path(), &["--listen", "127.0.0.1:0"]);
    let agent = agent();
    let base = &server.base;
    let put = |path: &str, resource: Value| {
        let (status, body) = body_of(
            agent
                .put(format!("{base}/{path}"))
                .header("Content-Type", "application/fhir+json")
                .send(resource.to_string())
                .unwrap(),
        );
        assert_eq!(status, 201, "{body}");
    };
    put(
        "Patient/canary-pt",
        json!({"resourceType": "Patient", "id": "canary-pt",
               "name": [{"family": "Canaryfamily"}], "gender": "female"}),
    );
    put(
        "Practitioner/canary-dr",
        json!({"resourceType": "Practitioner", "id": "canary-dr"}),
    );
    put(
        "Observation/canary-obs",
        json!({"resourceType": "Observation", "id": "canary-obs", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/canary-pt"},
               "performer": [{"reference": "Practitioner/canary-dr"}]}),
    );

    let (status, body) = body_of(
        agent
            .patch(format!("{base}/Patient/canary-pt"))
            .header("Content-Type", "application/json-patch+json")
            .header("If-Match", "W/\"1\"")
            .send(
                json!([{"op": "replace", "path": "/name/0/family", "value": "Canarypatched"}])
                    .to_string(),
            )
            .unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["meta"]["versionId"], "2");

    let (status, body) = body_of(
        agent
            .get(format!("{base}/Patient/canary-pt/$everything"))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    let mut keys: Vec<String> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            )
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "Observation/canary-obs",
            "Patient/canary-pt",
            "Practitioner/canary-dr"
        ]
    );

    let (status, body) = body_of(
        agent
            .post(format!("{base}/Patient/$validate"))
            .header("Content-Type", "application/fhir+json")
            .send(json!({"resourceType": "Patient", "gender": "Canaryvalue"}).to_string())
            .unwrap(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issue"][0]["code"], "code-invalid");
    assert_eq!(body["issue"][0]["expression"][0], "Patient.gender");

    let log_file = server.stderr_file.clone();
    drop(server);
    let log = std::fs::read_to_string(log_file).unwrap();
    assert!(
        log.contains("$everything"),
        "the route template is logged:\n{log}"
    );
    for secret in [
        "canary-pt",
        "canary-obs",
        "Canaryfamily",
        "Canarypatched",
        "Canaryvalue",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}
