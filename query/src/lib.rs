//! The FHIR layer of fhirkeep: search parameters, an encrypted tantivy index, FHIR search.
//!
//! Applications open a [`Database`] (the engine's encrypted store plus the search index, kept
//! in line by one write path) and run searches parsed by [`params::parse_search_url`]:
//!
//! ```
//! use fhirkeep_engine::crypto::{KeySource, create_key_file};
//! use fhirkeep_engine::store::AccessContext;
//! use fhirkeep_query::Database;
//! use fhirkeep_query::params::{Handling, parse_search_url};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let key = dir.path().join("key");
//! create_key_file(&key)?;
//! let db = Database::builder(dir.path().join("db")).key(KeySource::KeyFile(key)).create()?;
//! let ctx = AccessContext::new("dr-who", "ward-app", "10.0.0.7", "req-1");
//! db.create(&ctx, json!({"resourceType": "Patient", "name": [{"family": "Chalmers"}],
//!                        "birthDate": "1974-12-25"}))?;
//!
//! let request = parse_search_url(&*db.registry()?, "Patient?family=chal&birthdate=ge1970",
//!                                Handling::Strict)?;
//! let result = db.search(&ctx, &request)?;
//! assert_eq!(result.total, Some(1));
//! let bundle = result.to_bundle("http://localhost:8080/fhir");
//! assert_eq!(bundle["type"], "searchset");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod bundle;
mod compartment;
mod database;
pub mod directory;
mod error;
pub mod everything;
pub mod extract;
pub mod fhirpath_patch;
pub mod index;
pub mod params;
pub mod patch;
mod priority;
pub mod registry;
mod search;
mod searchset;
mod summary;
mod terminology;
pub mod validate;
pub mod values;

pub use compartment::{compartment_patients, patient_compartment};
pub use database::{
    ConditionalOutcome, Database, DatabaseBuilder, IndexStats, SearchLimits, SyncReport,
};
pub use error::{Error, Result};
pub use search::{EntryMode, EntryResource, SearchEntry, SearchResult};
pub use summary::{apply_elements, apply_summary};
