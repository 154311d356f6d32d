//! fhirkeep's storage engine: an encrypted, versioned, audited store of FHIR R4 resources.
//!
//! Open a [`store::Store`] with [`store::Store::builder`], giving it a directory and a key
//! ([`crypto::KeySource`]). Every operation takes an [`store::AccessContext`] and is recorded
//! in the Merkle audit log ([`audit`]). See `ARCHITECTURE.md` and `docs/design.md` in the
//! repository for the design and the byte formats.
//!
//! ```
//! use fhirkeep_engine::crypto::{KdfParams, KeySource, create_key_file};
//! use fhirkeep_engine::store::{AccessContext, HistoryQuery, Store};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let key = dir.path().join("key");
//! create_key_file(&key)?; // 32 random bytes, mode 0600
//! let store = Store::builder(dir.path().join("db"))
//!     .key(KeySource::KeyFile(key))
//!     .create()?;
//!
//! // Every call says who is asking; every call lands in the audit log.
//! let ctx = AccessContext::new("dr-who", "ward-app", "10.0.0.7", "req-42");
//! let created = store.create(&ctx, json!({"resourceType": "Patient", "gender": "female"}))?;
//! let updated = store.update(&ctx, "Patient", &created.id,
//!     json!({"resourceType": "Patient", "gender": "other"}), Some(created.version))?;
//! assert_eq!(updated.resource.version, 2);
//!
//! let history = store.history_instance(&ctx, "Patient", &created.id, &HistoryQuery::default())?;
//! assert_eq!(history.entries.len(), 2);
//!
//! // An auditor keeps signed heads and checks proofs without the database key.
//! let head = store.audit_head()?;
//! store.prove_inclusion(0, head.size)?.verify(&head)?;
//! # let _ = KdfParams::default();
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod audit;
pub mod bundle;
pub mod crypto;
mod error;
pub mod process;
mod r4_types;
pub mod resource;
pub mod store;

pub use error::{Error, Result};
