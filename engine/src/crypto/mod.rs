//! Encryption at rest: envelope keys (`keys`), the encrypted page format (`page`) and the
//! encrypting redb storage backend (`backend`).
//!
//! # Key hierarchy
//!
//! * A **key-encryption key (KEK)** comes from the user: Argon2id over a passphrase, or a
//!   32-byte key file (passed through BLAKE3 `derive_key`). It never touches data pages.
//! * One or more random 256-bit **data keys (DEKs)** encrypt pages with AES-256-GCM. They are
//!   stored wrapped under the KEK in the key header file `fhirkeep.keys` (see [`keys`]), so
//!   changing the passphrase ([`Keyring::change_key`]) rewrites only that small file.
//! * Data-key rotation ([`Keyring::rotate_data_key`]) adds a new DEK; every page block names the
//!   key id it was written with, so old pages stay readable and are re-encrypted with the new
//!   key as redb's copy-on-write rewrites them.
//!
//! # Physical file
//!
//! [`EncryptedBackend`] wraps any [`redb::StorageBackend`] and stores every 4 KiB logical page
//! of redb as one authenticated block; see [`page`] for the byte layout. The store's file and
//! its auxiliary files (derived data such as the search index, [`EncryptedBackend::new_aux`])
//! share the keys but not the file id bound into every block ([`page::aux_file_id`]), so no
//! block can be moved from one file to another.
//!
//! # Errors through redb
//!
//! redb backends can only return `std::io::Error`. Authentication failures and an exhausted
//! nonce budget are carried inside them as `io::Error::other(crate::Error::…)`;
//! [`error_from_io`] recovers the engine error.

pub mod backend;
pub mod keys;
pub mod page;

#[cfg(test)]
pub(crate) mod crash_backend;

pub use backend::{
    EncryptedBackend, FileReport, HeaderCopyStatus, HeaderSlot, verify_aux_file, verify_file,
};
pub use keys::{
    KEY_HEADER_FILE, KdfParams, KeySource, Keyring, NONCE_LIMIT, NONCE_RESERVATION_CHUNK,
    create_key_file,
};

use crate::Error;

/// Recovers the engine error carried inside an `io::Error` returned by [`EncryptedBackend`]
/// (authentication failure → [`Error::Corrupted`], [`Error::NonceBudgetExhausted`], …).
/// Any other I/O error becomes [`Error::Io`].
pub fn error_from_io(e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(err)) => *err,
            // Unreachable given the check above, but never panic.
            Some(Err(other)) => Error::Io(std::io::Error::other(other)),
            None => Error::Io(std::io::Error::other("unknown I/O error")),
        }
    } else {
        Error::Io(e)
    }
}

/// Wraps an engine error so it can travel through redb's `io::Error` interface.
pub(crate) fn to_io(e: Error) -> std::io::Error {
    match e {
        Error::Io(io) => io,
        other => std::io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_roundtrips_through_io() {
        let io = to_io(Error::Corrupted("page 3 failed authentication".into()));
        match error_from_io(io) {
            Error::Corrupted(m) => assert_eq!(m, "page 3 failed authentication"),
            other => panic!("unexpected {other:?}"),
        }
        let io = to_io(Error::NonceBudgetExhausted {
            key_id: 2,
            writes: 9,
        });
        assert!(matches!(
            error_from_io(io),
            Error::NonceBudgetExhausted {
                key_id: 2,
                writes: 9
            }
        ));
        let plain = std::io::Error::new(std::io::ErrorKind::NotFound, "x");
        assert!(matches!(error_from_io(plain), Error::Io(_)));
    }
}
