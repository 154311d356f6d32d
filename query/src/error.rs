//! The one error type of the query layer.
//!
//! Messages name parameters, modifiers and what was wrong with them, never search values or
//! resource content: values may be PHI (a patient's name in `name=`), and errors end up in
//! logs and OperationOutcomes.

/// Everything that can go wrong in the query layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage engine failed or refused (not found, version conflict, wrong key, ...).
    #[error(transparent)]
    Engine(#[from] fhirkeep_engine::Error),
    /// A search request is malformed: an unknown parameter (in strict mode), a bad modifier,
    /// a value that does not parse for the parameter's type. The message says which.
    #[error("invalid search: {0}")]
    InvalidSearch(String),
    /// A SearchParameter definition cannot be used.
    #[error("invalid search parameter definition: {0}")]
    InvalidSearchParameter(String),
    /// A conditional interaction matched more than one resource.
    #[error("the condition matched {0} resources; it must match at most one")]
    MultipleMatches(usize),
    /// A request is well-formed but cannot be processed (e.g. a bundle entry that is not
    /// allowed in a transaction).
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// The search index failed.
    #[error("search index: {0}")]
    Index(String),
    /// A bug or an impossible state; the message holds no user data.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A short stable name for the error's kind, for logs and audit outcomes.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Engine(e) => e.kind_name(),
            Error::InvalidSearch(_) => "invalid-search",
            Error::InvalidSearchParameter(_) => "invalid-search-parameter",
            Error::MultipleMatches(_) => "multiple-matches",
            Error::Unprocessable(_) => "unprocessable",
            Error::Index(_) => "index",
            Error::Internal(_) => "internal",
        }
    }
}

impl Error {
    /// The HTTP status this error answers with (the one mapping of errors to statuses; the
    /// server and bundle responses use it).
    pub fn http_status(&self) -> u16 {
        use fhirkeep_engine::Error as E;
        match self {
            Error::Engine(engine) => match engine {
                E::NotFound => 404,
                E::Gone { .. } => 410,
                E::VersionConflict { .. } => 412,
                E::InvalidResource(_) | E::InvalidId | E::UnknownResourceType(_) => 400,
                E::InvalidProofRequest(_) => 400,
                _ => 500,
            },
            Error::InvalidSearch(_) | Error::InvalidSearchParameter(_) => 400,
            Error::MultipleMatches(_) => 412,
            Error::Unprocessable(_) => 422,
            Error::Index(_) | Error::Internal(_) => 500,
        }
    }

    /// The error as a FHIR OperationOutcome. Server errors (5xx) carry no detail: their
    /// messages may name internal state; they are logged instead.
    pub fn operation_outcome(&self) -> serde_json::Value {
        let status = self.http_status();
        let (code, diagnostics) = match status {
            400 => ("invalid", self.to_string()),
            404 => ("not-found", self.to_string()),
            410 => ("deleted", self.to_string()),
            412 => ("conflict", self.to_string()),
            422 => ("processing", self.to_string()),
            _ => ("exception", "internal server error".to_string()),
        };
        serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
        })
    }
}

impl From<tantivy::TantivyError> for Error {
    fn from(e: tantivy::TantivyError) -> Self {
        // tantivy's messages name files and fields, not indexed values.
        Error::Index(e.to_string())
    }
}

/// Result with the query layer's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
