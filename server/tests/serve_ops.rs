//! The FHIR operations of `fhirkeep serve` end to end: the real binary on a loopback port,
//! PATCH, `$everything` and `$validate` over real HTTP, and no id or value of patient data
//! in the server's log.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

/// A running server, killed when the test ends.
struct Server {
    child: Child,
    base: String,
    stderr_file: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `fhirkeep serve ARGS` in `cwd` and waits for its "serving" line.
    // The child is waited for by `Drop`, which clippy cannot see.
    #[allow(clippy::zombie_processes)]
    fn start(cwd: &Path, args: &[&str]) -> Server {
        let stderr_file = cwd.join("serve.stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
            .arg("serve")
            .args(args)
            .current_dir(cwd)
            .env_remove("FHIRKEEP_PASSPHRASE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                panic!(
                    "the server exited before serving:\n{}",
                    std::fs::read_to_string(&stderr_file).unwrap()
                );
            }
            if let Some((_, rest)) = line.split_once(" on http://") {
                let address = rest.split_whitespace().next().unwrap();
                return Server {
                    child,
                    base: format!("http://{address}"),
                    stderr_file,
                };
            }
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn body_of(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, value)
}

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
