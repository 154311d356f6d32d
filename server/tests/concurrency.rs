//! Optimistic concurrency over HTTP: eight threads race read → update with `If-Match` on the
//! same resource of the real `fhirkeep serve` binary on a loopback port. Every update either
//! wins (200, the next version) or loses (412); afterwards the history holds exactly the
//! winners' versions, numbered 1..=n without gaps or duplicates, each with its winner's content.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};

use serde_json::{Value, json};
use tempfile::TempDir;

use common::{Server, agent};

const THREADS: usize = 8;
const ROUNDS: usize = 12;
/// The extension each update sets, naming the thread and round that wrote the version.
const WRITER_URL: &str = "http://fhirkeep.test/StructureDefinition/writer";

/// Status, ETag and JSON body of a response.
fn parts(mut response: ureq::http::Response<ureq::Body>) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .map(|value| value.to_str().unwrap().to_owned());
    let text = response.body_mut().read_to_string().unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, etag, body)
}

/// The version number in a weak ETag `W/"N"`.
fn version_of(etag: &str) -> u64 {
    etag.strip_prefix("W/\"")
        .and_then(|rest| rest.strip_suffix('"'))
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("not a weak version ETag: {etag}"))
}

fn writer_of(resource: &Value) -> Option<String> {
    resource["extension"]
        .as_array()?
        .iter()
        .find(|extension| extension["url"] == WRITER_URL)
        .and_then(|extension| extension["valueString"].as_str())
        .map(str::to_owned)
}

/// What one thread saw: the versions it wrote (version → writer tag) and its 412s.
#[derive(Default)]
struct Outcome {
    won: Vec<(u64, String)>,
    lost: usize,
}

fn race(base: &str, id: &str, thread: usize, start: &Barrier) -> Outcome {
    let agent = agent();
    let url = format!("{base}/Patient/{id}");
    let mut outcome = Outcome::default();
    start.wait();
    for round in 0..ROUNDS {
        let (status, etag, mut patient) = parts(agent.get(&url).call().unwrap());
        assert_eq!(status, 200, "{patient}");
        let etag = etag.unwrap();
        let read_version = version_of(&etag);
        let tag = format!("thread-{thread}-round-{round}");
        patient["extension"] = json!([{"url": WRITER_URL, "valueString": tag}]);
        let (status, new_etag, body) = parts(
            agent
                .put(&url)
                .header("Content-Type", "application/fhir+json")
                .header("If-Match", &etag)
                .send(patient.to_string())
                .unwrap(),
        );
        match status {
            200 => {
                let version = version_of(&new_etag.unwrap());
                // A win is exactly the version after the one read: nothing in between.
                assert_eq!(version, read_version + 1, "{tag}");
                assert_eq!(body["meta"]["versionId"], version.to_string());
                assert_eq!(writer_of(&body).as_deref(), Some(tag.as_str()));
                outcome.won.push((version, tag));
            }
            412 => {
                assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
                outcome.lost += 1;
            }
            other => panic!("update answered {other}: {body}"),
        }
    }
    outcome
}

/// Every version in the resource's history (following `next` links), version → entry.
fn history(base: &str, id: &str) -> Vec<Value> {
    let agent = agent();
    let mut url = format!("{base}/Patient/{id}/_history?_count=20");
    let mut versions = Vec::new();
    // Bounded: at most one page per 20 versions that can exist, plus slack.
    for _ in 0..(THREADS * ROUNDS / 20 + 3) {
        let (status, _, bundle) = parts(agent.get(&url).call().unwrap());
        assert_eq!(status, 200, "{bundle}");
        assert_eq!(bundle["type"], "history");
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            versions.push(entry["resource"].clone());
        }
        let next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|link| link["relation"] == "next")
            .and_then(|link| link["url"].as_str());
        match next {
            Some(next) => url = next.to_owned(),
            None => return versions,
        }
    }
    panic!("history paging did not end");
}

#[test]
fn concurrent_if_match_updates_lose_nothing_and_number_versions_without_gaps() {
    let dir = TempDir::new().unwrap();
    let db = dir.path().join("db");
    let server = Server::start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()],
    );
    let (status, _, created) = parts(
        agent()
            .post(format!("{}/Patient", server.base))
            .header("Content-Type", "application/fhir+json")
            .send(json!({"resourceType": "Patient", "name": [{"family": "Race"}]}).to_string())
            .unwrap(),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (base, id, start) = (server.base.clone(), id.clone(), Arc::clone(&start));
            std::thread::spawn(move || race(&base, &id, thread, &start))
        })
        .collect();
    let outcomes: Vec<Outcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let lost: usize = outcomes.iter().map(|outcome| outcome.lost).sum();
    let mut winners = BTreeMap::new();
    for (version, tag) in outcomes.iter().flat_map(|outcome| outcome.won.iter()) {
        assert!(
            winners.insert(*version, tag.clone()).is_none(),
            "two updates both won version {version}"
        );
    }
    assert_eq!(winners.len() + lost, THREADS * ROUNDS);
    assert!(!winners.is_empty(), "no update won");
    eprintln!("{} updates won, {lost} answered 412", winners.len());

    let versions = history(&server.base, &id);
    // Version 1 (the create) plus one version per win, and nothing else.
    assert_eq!(versions.len(), 1 + winners.len());
    let mut in_history = BTreeMap::new();
    for resource in &versions {
        let version: u64 = resource["meta"]["versionId"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            in_history.insert(version, writer_of(resource)).is_none(),
            "version {version} appears twice in the history"
        );
    }
    let numbers: BTreeSet<u64> = in_history.keys().copied().collect();
    let expected: BTreeSet<u64> = (1..=versions.len() as u64).collect();
    assert_eq!(numbers, expected, "version ids have gaps");
    assert_eq!(in_history[&1], None, "the created version has no writer");
    for (version, tag) in &winners {
        assert_eq!(
            in_history[version].as_deref(),
            Some(tag.as_str()),
            "version {version} does not hold its winner's content"
        );
    }

    // The current version is the last winner's.
    let (status, etag, current) = parts(
        agent()
            .get(format!("{}/Patient/{id}", server.base))
            .call()
            .unwrap(),
    );
    assert_eq!(status, 200);
    let last = *winners.keys().next_back().unwrap();
    assert_eq!(version_of(&etag.unwrap()), last);
    assert_eq!(writer_of(&current), winners.get(&last).cloned());
    let log = std::fs::read_to_string(&server.stderr_file).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}
