//! The engine's one error type, and what each failure means for the caller.
//!
//! Messages never carry resource content, names, or other PHI: they say what was wrong
//! and what to do, so that they can be logged and shown to clients as they are.

use std::io;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The passphrase or key file does not unwrap this database's data key.
    #[error("wrong key: the passphrase or key file does not open this database (nothing was read)")]
    WrongKey,

    /// The key file named by the caller does not exist.
    #[error("key file {path} does not exist: pass the key file this database was created with")]
    KeyFileMissing {
        /// Path of the missing key file.
        path: std::path::PathBuf,
    },

    /// The key file exists but is not a 32-byte key (raw, or 64 hex characters).
    #[error("key file {path} is not a valid key: {reason}")]
    KeyFileInvalid {
        /// Path of the key file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Neither a passphrase nor a key file was supplied.
    #[error("no key given: pass --key-file FILE or set FHIRKEEP_PASSPHRASE")]
    NoKeySource,

    /// The key header (the wrapped data keys) is missing or damaged.
    #[error("key header is unusable: {0}")]
    KeyHeader(String),

    /// The active data key has used up its random-nonce budget.
    #[error(
        "data key {key_id} has encrypted {writes} page writes, the safe limit for random \
         96-bit nonces: run `fhirkeep rekey --rotate-data-key` to start a new data key"
    )]
    NonceBudgetExhausted {
        /// Id of the exhausted data key.
        key_id: u32,
        /// Writes already made with it.
        writes: u64,
    },

    /// Stored bytes failed authentication or are structurally damaged.
    #[error("database is corrupted or was tampered with: {0}")]
    Corrupted(String),

    /// A database already exists where one was to be created.
    #[error("a database already exists in {0}")]
    AlreadyExists(std::path::PathBuf),

    /// No database exists at the given path.
    #[error("no database in {0}: create one with `fhirkeep init`")]
    DatabaseNotFound(std::path::PathBuf),

    /// The resource JSON is not acceptable (not an object, unknown type, bad id, ...).
    #[error("invalid resource: {0}")]
    InvalidResource(String),

    /// A resource id does not match `[A-Za-z0-9\-.]{1,64}`.
    #[error("invalid id: ids must match [A-Za-z0-9-.]{{1,64}}")]
    InvalidId,

    /// A resource type is not one of the FHIR R4 resource types.
    #[error("unknown resource type {0:?}: not an R4 resource type")]
    UnknownResourceType(String),

    /// No resource (or version) with that type and id.
    #[error("resource not found")]
    NotFound,

    /// The resource was deleted; `version` is the tombstone's version id.
    #[error("resource was deleted (version {version})")]
    Gone {
        /// Version id of the deletion.
        version: u64,
    },

    /// An update named a version that is not the current one.
    #[error("version conflict: expected version {expected}, current version is {current}")]
    VersionConflict {
        /// The version the caller expected.
        expected: u64,
        /// The version that is current.
        current: u64,
    },

    /// The audit log does not verify: a leaf or a tree head was altered, removed or reordered.
    #[error("audit log verification failed: {0}")]
    AuditVerification(String),

    /// An audit proof was requested for sizes or indexes the log does not have.
    #[error("invalid audit proof request: {0}")]
    InvalidProofRequest(String),

    /// A storage-layer failure (redb) that is not corruption.
    #[error("storage error: {0}")]
    Storage(String),

    /// An operating-system I/O failure.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// A short machine-readable name for the error kind, stable across versions.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::WrongKey => "wrong-key",
            Error::KeyFileMissing { .. } => "key-file-missing",
            Error::KeyFileInvalid { .. } => "key-file-invalid",
            Error::NoKeySource => "no-key-source",
            Error::KeyHeader(_) => "key-header",
            Error::NonceBudgetExhausted { .. } => "nonce-budget-exhausted",
            Error::Corrupted(_) => "corrupted",
            Error::AlreadyExists(_) => "already-exists",
            Error::DatabaseNotFound(_) => "database-not-found",
            Error::InvalidResource(_) => "invalid-resource",
            Error::InvalidId => "invalid-id",
            Error::UnknownResourceType(_) => "unknown-resource-type",
            Error::NotFound => "not-found",
            Error::Gone { .. } => "gone",
            Error::VersionConflict { .. } => "version-conflict",
            Error::AuditVerification(_) => "audit-verification",
            Error::InvalidProofRequest(_) => "invalid-proof-request",
            Error::Storage(_) => "storage",
            Error::Io(_) => "io",
        }
    }
}
