//! fhirkeep's storage engine: an encrypted, versioned, audited store of FHIR R4 resources.
//!
//! Open a [`store::Store`] with [`store::Store::builder`], giving it a directory and a key
//! ([`crypto::KeySource`]). Every operation takes an [`store::AccessContext`] and is recorded
//! in the Merkle audit log ([`audit`]). See `ARCHITECTURE.md` and `docs/design.md` in the
//! repository for the design and the byte formats.
#![warn(missing_docs)]

pub mod audit;
pub mod bundle;
pub mod crypto;
mod error;
mod r4_types;
pub mod resource;
pub mod store;

pub use error::{Error, Result};
