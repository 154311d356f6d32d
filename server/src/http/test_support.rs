//! What the router tests share: a new encrypted database in a temporary directory, and test
//! settings that each test overrides where it needs to (so a new setting is added here once).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use axum::http::StatusCode;
use fhirkeep_engine::crypto::{KeySource, create_key_file};
use fhirkeep_query::Database;
use serde_json::Value;

use super::{AuthMode, DEFAULT_BODY_LIMIT, ServerConfig};

/// A new database in `dir/db`, its key file beside it.
pub(super) fn new_database(dir: &Path) -> Database {
    let key = dir.join("key");
    create_key_file(&key).unwrap();
    Database::builder(dir.join("db"))
        .key(KeySource::KeyFile(key))
        .create()
        .unwrap()
}

impl ServerConfig {
    /// Settings of a router test: base `http://fhir.test/`, default limits, no auth, 404
    /// for what a token does not reach.
    pub(super) fn for_tests() -> ServerConfig {
        ServerConfig {
            base_url: "http://fhir.test/".to_owned(),
            max_body_bytes: DEFAULT_BODY_LIMIT,
            auth: AuthMode::None,
            deny_status: StatusCode::NOT_FOUND,
            hardening: Default::default(),
        }
    }
}

/// The URL of a Bundle's `next` link, if it has one.
pub(super) fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == "next")
        .and_then(|link| link["url"].as_str())
        .map(str::to_owned)
}
