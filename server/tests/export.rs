//! `fhirkeep serve` Bulk Data `$export` end to end: the real binary on a loopback port with a
//! short `--export-ttl`, kick-off, polling, an NDJSON download, expiry, and no plaintext of
//! the exported data anywhere on disk nor any id of it in the log.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use common::{Server, agent};

const CANARY: &str = "Bulk-Canary-0e3b-Gnu";

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

#[test]
fn export_over_http_is_downloadable_expires_and_leaves_no_plaintext() {
    let dir = TempDir::new().unwrap();
    let server = Server::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--export-ttl", "3s"],
    );
    let agent = agent();
    let patient = json!({"resourceType": "Patient", "id": "bulk1", "name": [{"family": CANARY}]});
    let response = agent
        .put(format!("{}/Patient/bulk1", server.base))
        .header("content-type", "application/fhir+json")
        .send(patient.to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);

    let response = agent
        .get(format!("{}/$export?_type=Patient", server.base))
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let status_url = response
        .headers()
        .get("content-location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let job_id = status_url.rsplit('/').next().unwrap().to_owned();

    let started = Instant::now();
    let manifest: Value = loop {
        let mut response = agent.get(&status_url).call().unwrap();
        match response.status().as_u16() {
            202 => std::thread::sleep(Duration::from_millis(50)),
            200 => {
                break serde_json::from_str(&response.body_mut().read_to_string().unwrap())
                    .unwrap();
            }
            other => panic!("status {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the export did not finish"
        );
    };
    let url = manifest["output"][0]["url"].as_str().unwrap();
    assert_eq!(manifest["output"][0]["count"], 1);
    let mut response = agent
        .get(url)
        .header("accept", "application/fhir+ndjson")
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers().get("content-type").unwrap(),
        "application/fhir+ndjson"
    );
    let text = response.body_mut().read_to_string().unwrap();
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["name"][0]["family"], CANARY);

    // --export-ttl 3s: the periodic task deletes the job and its file.
    let mut expired = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if agent.get(url).call().unwrap().status().as_u16() == 404 {
            expired = true;
            break;
        }
    }
    assert!(expired, "the file outlived --export-ttl");
    assert_eq!(
        agent.get(&status_url).call().unwrap().status().as_u16(),
        404
    );

    let stderr_file = server.stderr_file.clone();
    drop(server);
    let log = std::fs::read_to_string(&stderr_file).unwrap();
    assert!(log.contains("/$export-status/{id}"), "{log}");
    assert!(!log.contains(&job_id), "the job id reached the log");
    assert!(
        !log.contains(CANARY) && !log.contains("bulk1"),
        "PHI in the log"
    );
    assert!(dir.path().join("data/exports.redb").exists());
    for path in walk(&dir.path().join("data")) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "plaintext canary in {}",
            path.display()
        );
    }
}
