//! fhirkeep's storage engine: an encrypted, versioned, audited store of FHIR R4 resources.
#![warn(missing_docs)]

pub mod audit;
pub mod crypto;
mod error;

pub use error::{Error, Result};
