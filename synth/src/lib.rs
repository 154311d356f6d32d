//! Deterministic synthetic FHIR R4 data for tests and benchmarks.
//!
//! Two generators, neither of which reads the wall clock or needs a `rand` crate; every value
//! is drawn from a [`SplitMix64`] stream seeded by a hash of `(seed, position)`, so any slice
//! of a data set can be regenerated alone, in any order, on any number of threads, and comes
//! out byte for byte the same:
//!
//! - [`Cohort`]: patient-centric data. Patient `i` of a seed is a [`PatientRecord`] holding the
//!   Patient and several years of clinical history (Encounters, Observations, Conditions,
//!   MedicationRequests, Procedures, Immunizations, DiagnosticReports) whose references all
//!   resolve inside the record. [`NdjsonExport`] writes a cohort as one NDJSON file per type,
//!   like a Bulk Data export; it is what `fhirkeep gen` runs.
//! - [`Dataset`]: the flat, fixed-mix stream the engine benchmarks load by position
//!   (`resource(index)`), kept byte-stable so benchmark figures stay comparable.
//!
//! ```
//! use fhirkeep_synth::Cohort;
//!
//! let cohort = Cohort::new(7);
//! let record = cohort.patient(42);
//! assert_eq!(record.resources()[0].resource_type, "Patient");
//! assert_eq!(record, cohort.patient(42)); // a pure function of (seed, index)
//! ```
#![warn(missing_docs)]

mod blocks;
mod cohort;
mod error;
mod ndjson;
mod resource;
mod rng;
mod time;
mod vocab;

pub use blocks::{BLOCK, DEFAULT_SEED, Dataset, Kind};
pub use cohort::{Cohort, PatientRecord, RESOURCE_TYPES};
pub use error::{Error, Result};
pub use ndjson::{ExportSummary, NdjsonExport};
pub use resource::{GeneratedResource, ParsedResource};
pub use rng::{SplitMix64, mix};
