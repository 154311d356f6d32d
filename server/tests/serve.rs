//! `fhirkeep serve` end to end: the real binary on a loopback port, real HTTP requests, a
//! graceful stop on SIGTERM, the refusal of non-loopback addresses without authentication,
//! and SMART on FHIR with a token minted by `fhirkeep token`.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use common::{Server, agent, body_of};

#[test]
fn serve_answers_create_read_and_search_over_http_and_stops_on_sigterm() {
    let dir = TempDir::new().unwrap();
    // No arguments but a free port: the embedded default in ./data with its key file.
    let server = Server::start(dir.path(), &["--listen", "127.0.0.1:0"]);
    let key_file = dir.path().join("data/fhirkeep.keyfile");
    assert!(key_file.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let agent = agent();

    let created = agent
        .post(format!("{}/Patient", server.base))
        .header("Content-Type", "application/fhir+json")
        .send(json!({"resourceType": "Patient", "name": [{"family": "Endtoend"}]}).to_string())
        .unwrap();
    let location = created
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        created.headers().get("x-content-type-options").unwrap(),
        "nosniff"
    );
    let (status, patient) = body_of(created);
    assert_eq!(status, 201, "{patient}");
    let id = patient["id"].as_str().unwrap();
    assert_eq!(location, format!("{}/Patient/{id}/_history/1", server.base));

    let read = agent
        .get(format!("{}/Patient/{id}", server.base))
        .call()
        .unwrap();
    assert_eq!(read.headers().get("etag").unwrap(), "W/\"1\"");
    let (status, again) = body_of(read);
    assert_eq!(status, 200);
    assert_eq!(again["name"][0]["family"], "Endtoend");

    let (status, bundle) = body_of(
        agent
            .get(format!("{}/Patient?family=endtoend", server.base))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["total"], 1);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("{}/Patient/{id}", server.base)
    );

    let (status, outcome) = body_of(
        agent
            .get(format!("{}/Patient/{id}", server.base))
            .header("Accept", "application/fhir+xml")
            .call()
            .unwrap(),
    );
    assert_eq!(status, 406);
    assert_eq!(outcome["resourceType"], "OperationOutcome");

    let stderr = server.stderr();
    assert!(stderr.contains("fhirkeep.keyfile"), "{stderr}");
    assert!(stderr.contains("production"), "{stderr}");
    assert!(stderr.contains("authentication is off"), "{stderr}");
    assert!(stderr.contains("route=/{type}/{id}"), "{stderr}");
    assert!(!stderr.contains(id), "a resource id was logged:\n{stderr}");

    // A graceful stop: SIGTERM, then a clean exit.
    #[cfg(unix)]
    {
        let mut server = server;
        let killed = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status:?}\n{}", server.stderr());
        assert!(server.stderr().contains("server stopped"));
    }
}

#[test]
fn serve_refuses_a_non_loopback_address_without_auth() {
    let dir = TempDir::new().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
        .args(["serve", "--listen", "0.0.0.0:8080"])
        .current_dir(dir.path())
        .env_remove("FHIRKEEP_PASSPHRASE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:8080"),
        "{stderr}"
    );
    assert!(stderr.contains("--auth none"), "{stderr}");
    assert!(stderr.contains("--auth smart"), "{stderr}");
    // Refused before anything was created.
    assert!(!dir.path().join("data").exists());
}

/// A tiny examples package (`package/<Type>-<id>.json`), as `--load-samples` reads it.
fn write_samples(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut archive = tar::Builder::new(gz);
    for (name, resource) in [
        (
            "package/Patient-s1.json",
            json!({"resourceType": "Patient", "id": "s1", "name": [{"family": "Sample"}]}),
        ),
        (
            "package/Observation-s2.json",
            json!({"resourceType": "Observation", "id": "s2", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/s1"}}),
        ),
    ] {
        let bytes = serde_json::to_vec(&resource).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive
            .append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    archive.into_inner().unwrap().finish().unwrap();
}

#[test]
fn serve_loads_samples_into_an_empty_database_only() {
    let dir = TempDir::new().unwrap();
    let samples = dir.path().join("samples.tgz");
    write_samples(&samples);
    let samples_arg = samples.to_str().unwrap().to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--load-samples",
        samples_arg.as_str(),
    ];
    let server = Server::start(dir.path(), &args);
    let response = agent()
        .get(format!("{}/Observation?patient.family=sample", server.base))
        .call()
        .unwrap();
    let (status, bundle) = body_of(response);
    assert_eq!(status, 200);
    assert_eq!(bundle["total"], 1);
    drop(server);
    // A second start finds data and loads nothing again.
    let server = Server::start(dir.path(), &args);
    assert!(
        server.stderr().contains("already has data"),
        "{}",
        server.stderr()
    );
}

/// Runs `fhirkeep ARGS` in `cwd`; returns (success, stdout, stderr).
fn fhirkeep(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fhirkeep"))
        .args(args)
        .current_dir(cwd)
        .env_remove("FHIRKEEP_PASSPHRASE")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn serve_with_smart_auth_accepts_tokens_minted_by_fhirkeep_token_only() {
    let dir = TempDir::new().unwrap();
    let (ok, _, stderr) = fhirkeep(dir.path(), &["init", "--db", "data", "--key-file", "key"]);
    assert!(ok, "{stderr}");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, include_str!("fixtures/test-only-jwks.json")).unwrap();
    // With authentication, a non-loopback address is allowed.
    let server = Server::start(
        dir.path(),
        &[
            "--db",
            "data",
            "--key-file",
            "key",
            "--listen",
            "0.0.0.0:0",
            "--auth",
            "smart",
            "--jwks",
            jwks.to_str().unwrap(),
        ],
    );
    let base = server.base.clone();
    // Minted while the server holds the database open.
    let mint = |scope: &str, base_url: &str, ttl: &str| {
        fhirkeep(
            dir.path(),
            &[
                "token",
                "--db",
                "data",
                "--key-file",
                "key",
                "--scope",
                scope,
                "--base-url",
                base_url,
                "--ttl",
                ttl,
                "--subject",
                "e2e-admin",
            ],
        )
    };
    let (ok, token, stderr) = mint("system/*.*", &base, "5m");
    assert!(ok, "{stderr}");
    let token = token.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let agent = agent();

    let anonymous = agent.get(format!("{base}/Patient")).call().unwrap();
    assert_eq!(
        anonymous.headers().get("www-authenticate").unwrap(),
        "Bearer realm=\"fhirkeep\""
    );
    let (status, outcome) = body_of(anonymous);
    assert_eq!(status, 401);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let (status, _) = body_of(agent.get(format!("{base}/metadata")).call().unwrap());
    assert_eq!(status, 200);

    let (status, created) = body_of(
        agent
            .post(format!("{base}/Patient"))
            .header("Content-Type", "application/fhir+json")
            .header("Authorization", &format!("Bearer {token}"))
            .send(json!({"resourceType": "Patient", "name": [{"family": "Smart"}]}).to_string())
            .unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, read) = body_of(
        agent
            .get(format!("{base}/Patient/{id}"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["name"][0]["family"], "Smart");

    // A token for another server (aud) is refused.
    let (ok, other, _) = mint("system/*.*", "http://elsewhere.test", "5m");
    assert!(ok);
    let refused = agent
        .get(format!("{base}/Patient/{id}"))
        .header("Authorization", &format!("Bearer {}", other.trim()))
        .call()
        .unwrap();
    assert!(
        refused
            .headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(refused.status().as_u16(), 401);

    // The minting side refuses long lifetimes and scopes that grant nothing.
    let (ok, _, stderr) = mint("system/*.*", &base, "2h");
    assert!(!ok && stderr.contains("60 minutes"), "{stderr}");
    let (ok, _, stderr) = mint("openid profile", &base, "5m");
    assert!(!ok && stderr.contains("no usable SMART scope"), "{stderr}");
    let (ok, _, stderr) = mint("patient/*.rs", &base, "5m");
    assert!(!ok && stderr.contains("--patient"), "{stderr}");

    let stderr = server.stderr();
    assert!(stderr.contains("SMART on FHIR"), "{stderr}");
    assert!(!stderr.contains(&token), "a token was logged");
    assert!(
        !stderr.contains("e2e-admin"),
        "a token's subject was logged"
    );
    assert!(stderr.contains("auth=token"), "{stderr}");
    assert!(stderr.contains("auth=refused"), "{stderr}");
}

#[test]
fn serve_refuses_inconsistent_auth_options_before_creating_anything() {
    let dir = TempDir::new().unwrap();
    let empty_jwks = dir.path().join("empty.json");
    std::fs::write(&empty_jwks, r#"{"keys": []}"#).unwrap();
    let empty = empty_jwks.to_str().unwrap();
    for (args, expected) in [
        (vec!["--jwks", empty], "need --auth smart"),
        (vec!["--auth", "smart", "--deny-status", "500"], "500"),
        (
            vec!["--auth", "smart", "--jwks", empty],
            "no usable signature key",
        ),
        (
            vec!["--auth", "smart", "--jwks", "missing.json"],
            "reading the JWKS",
        ),
        (vec!["--auth", "basic"], "basic"),
    ] {
        let (ok, _, stderr) = fhirkeep(
            dir.path(),
            &[&["serve", "--listen", "127.0.0.1:0"][..], &args[..]].concat(),
        );
        assert!(!ok, "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(!dir.path().join("data").exists());
}
