//! FHIR search over the official R4 examples, checked against the searches and results in
//! `tests/fixtures/r4-example-searches.txt` (computed by an independent oracle,
//! `tools/gen_search_fixtures.py`). Every search is paged with a small `_count`, so cursor
//! paging is exercised too.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_engine::store::{AccessContext, Upsert};
use fhirkeep_query::params::{Handling, parse_search_url};
use fhirkeep_query::{Database, EntryMode};
use serde_json::Value;

fn testdata(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Every example resource of the official package (each keeps its id).
fn examples() -> Vec<Value> {
    let file = std::fs::File::open(testdata("../testdata/r4/hl7.fhir.r4.examples-4.0.1.tgz"))
        .expect("vendored examples archive");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        if !name.ends_with(".json") || name.ends_with("package.json") || name.contains("/.") {
            continue;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).expect("utf-8");
        let value: Value = serde_json::from_str(&text).expect("json");
        if value.get("resourceType").is_some() && value.get("id").is_some() {
            out.push(value);
        }
    }
    out
}

struct Loaded {
    _dir: tempfile::TempDir,
    db: Database,
}

/// One database with every example, shared by the tests of this file.
fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        create_key_file(&key).unwrap();
        let db = Database::builder(dir.path().join("db"))
            .key(KeySource::KeyFile(key))
            .create()
            .unwrap();
        let ctx = AccessContext::local("test-loader");
        let items: Vec<Upsert> = examples()
            .into_iter()
            .filter_map(|resource| {
                let resource_type = resource["resourceType"].as_str()?.to_string();
                let id = resource["id"].as_str()?.to_string();
                Some(Upsert {
                    resource_type,
                    id: Some(id),
                    resource,
                    expected_version: None,
                })
            })
            .collect();
        for chunk in items.chunks(1000) {
            // One example has an id longer than 64 characters and is refused; the rest load.
            db.update_many(&ctx, chunk.to_vec()).unwrap();
        }
        Loaded { _dir: dir, db }
    })
}

/// Runs `query` page by page (`_count=7`), returning the matched keys, sorted.
fn search_all(db: &Database, query: &str) -> Vec<String> {
    let separator = if query.contains('?') { "&" } else { "?" };
    let url = format!("{query}{separator}_count=7");
    let mut request = parse_search_url(&db.registry().unwrap(), &url, Handling::Strict)
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    let ctx = AccessContext::local("test");
    let mut keys = Vec::new();
    let mut total = None;
    loop {
        let page = db
            .search(&ctx, &request)
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        total = total.or(page.total);
        assert!(page.entries.len() <= 7);
        keys.extend(
            page.entries
                .iter()
                .filter(|e| e.mode == EntryMode::Match)
                .map(|e| e.key.clone()),
        );
        match page.next_cursor {
            Some(cursor) => request.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(
        total,
        Some(keys.len()),
        "{query}: total disagrees with the pages"
    );
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "{query}: default order is by key");
    sorted
}

#[test]
fn searches_over_the_r4_examples_match_the_oracle() {
    let loaded = loaded();
    let fixtures =
        std::fs::read_to_string(testdata("tests/fixtures/r4-example-searches.txt")).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in fixtures.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (query, expected) = line.split_once(" =>").expect("query => keys");
        let expected: Vec<String> = expected.split_whitespace().map(String::from).collect();
        let found = search_all(&loaded.db, query.trim());
        if found != expected {
            failures.push(format!(
                "{query}\n  expected {expected:?}\n  found    {found:?}"
            ));
        }
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} fixtures");
    assert!(
        failures.is_empty(),
        "{} of {checked} searches differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
