//! Maps redb's error types onto the engine's one error type, recovering backend errors.

use crate::Error;
use crate::crypto::error_from_io;

fn from_storage(error: redb::StorageError) -> Error {
    match error {
        redb::StorageError::Io(io) => error_from_io(io),
        redb::StorageError::Corrupted(message) => Error::Corrupted(message),
        redb::StorageError::PreviousIo => Error::Storage(
            "an earlier I/O error left the database unusable: close and reopen it".into(),
        ),
        other => Error::Storage(other.to_string()),
    }
}

impl From<redb::StorageError> for Error {
    fn from(error: redb::StorageError) -> Self {
        from_storage(error)
    }
}

impl From<redb::TransactionError> for Error {
    fn from(error: redb::TransactionError) -> Self {
        match error {
            redb::TransactionError::Storage(storage) => from_storage(storage),
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<redb::TableError> for Error {
    fn from(error: redb::TableError) -> Self {
        match error {
            redb::TableError::Storage(storage) => from_storage(storage),
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<redb::CommitError> for Error {
    fn from(error: redb::CommitError) -> Self {
        match error {
            redb::CommitError::Storage(storage) => from_storage(storage),
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<redb::DatabaseError> for Error {
    fn from(error: redb::DatabaseError) -> Self {
        match error {
            redb::DatabaseError::Storage(storage) => from_storage(storage),
            redb::DatabaseError::DatabaseAlreadyOpen => {
                Error::Storage("the database is already open in another process or handle".into())
            }
            other => Error::Storage(other.to_string()),
        }
    }
}

impl From<redb::SetDurabilityError> for Error {
    fn from(error: redb::SetDurabilityError) -> Self {
        Error::Storage(error.to_string())
    }
}

impl From<redb::CompactionError> for Error {
    fn from(error: redb::CompactionError) -> Self {
        match error {
            redb::CompactionError::Storage(storage) => from_storage(storage),
            other => Error::Storage(other.to_string()),
        }
    }
}
