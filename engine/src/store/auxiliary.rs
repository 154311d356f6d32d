//! Auxiliary databases: further encrypted redb files in the database directory for data
//! derived from the store (the search index), with their own writer lock.
//!
//! An auxiliary database `name` is the file `DIR/<name>.redb`, written through
//! [`EncryptedBackend::new_aux`]: the store's keyring (one nonce counter for all files),
//! the same page format, header copies and crash safety, but its own file id in the preamble
//! and every block's AAD, so no block can be moved between it and the store's file (or
//! another auxiliary file). It holds nothing that cannot be rebuilt from the store, so it can
//! be deleted ([`Store::delete_aux_database`]) at any time it is not open; `copy_to` does not
//! copy it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::{EncryptedBackend, FileReport, Keyring, verify_aux_file};
use crate::{Error, Result};

use super::{DATABASE_FILE, Store, describe_failed_pages, restrict_permissions};

/// How long opening an auxiliary file waits for a lock that a just-dropped handle of this
/// process still holds.
const AUX_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// File name extension of auxiliary databases.
const AUX_EXTENSION: &str = "redb";
/// Longest auxiliary database name.
const MAX_AUX_NAME: usize = 32;

/// What [`Store::check`] found in one auxiliary file.
#[derive(Debug, Clone)]
pub struct AuxFileReport {
    /// The auxiliary database's name (the file is `DIR/<name>.redb`).
    pub name: String,
    /// Page-level authentication of the whole file.
    pub pages: FileReport,
    /// redb's own structural and checksum check of the file.
    pub redb_integrity_ok: bool,
}

/// Checks an auxiliary database name: `[a-z0-9_-]{1,32}`, not starting with `fhirkeep`
/// (reserved for the engine's own files, e.g. `fhirkeep.redb`).
fn check_aux_name(name: &str) -> Result<()> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_AUX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with("fhirkeep");
    if well_formed {
        Ok(())
    } else {
        Err(Error::Storage(format!(
            "invalid auxiliary database name {name:?}: use 1 to 32 of [a-z0-9_-], not starting \
             with \"fhirkeep\""
        )))
    }
}

pub(super) fn aux_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{AUX_EXTENSION}"))
}

/// Names of the auxiliary files present in `dir`, sorted. Files whose names are not valid
/// auxiliary names (including the store's own file) are not auxiliary files.
pub(super) fn aux_names(dir: &Path) -> Result<Vec<String>> {
    let main_stem = DATABASE_FILE.strip_suffix(".redb").unwrap_or(DATABASE_FILE);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(stem) = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(".redb"))
            .filter(|stem| *stem != main_stem && check_aux_name(stem).is_ok())
        else {
            continue;
        };
        if entry.file_type()?.is_file() {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Authenticates every block of every auxiliary file in `dir` (the first step of
/// [`Store::check`]; the integrity walk follows in [`Store::check_aux_file`]).
pub(super) fn verify_aux_files(dir: &Path, keyring: &Keyring) -> Result<Vec<AuxFileReport>> {
    aux_names(dir)?
        .into_iter()
        .map(|name| {
            let pages = verify_aux_file(&aux_path(dir, &name), keyring, &name)?;
            Ok(AuxFileReport {
                name,
                pages,
                redb_integrity_ok: false,
            })
        })
        .collect()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Store {
    /// Opens the auxiliary database `name` (`[a-z0-9_-]{1,32}`), the encrypted redb file
    /// `DIR/<name>.redb`, creating it if absent. It is encrypted with this store's keys
    /// under its own file id (see [`EncryptedBackend::new_aux`]) and has its own writer
    /// lock, so its commits never wait for the store's.
    ///
    /// The returned database shares the store's keyring, and with it the nonce counter; it
    /// keeps the keyring alive, so it may outlive the store (the keyring persists its count
    /// when its last user goes). Its redb cache is a quarter of the store's (at least
    /// 8 MiB). Its transactions are the caller's: nothing here makes them durable or
    /// audited (it is meant for derived data; reads of the store that feed it are audited,
    /// see [`Store::changes_after`]). Durable commits should use two-phase commit, as the
    /// store's do (docs/design.md, "Commit strategy").
    ///
    /// A database can be open only once at a time: a second open while the first is alive
    /// fails with [`Error::Storage`] ("already open"). A file that does not authenticate
    /// fails with [`Error::Corrupted`]; being derived data, it can be deleted with
    /// [`Store::delete_aux_database`] and rebuilt.
    pub fn open_aux_database(&self, name: &str) -> Result<redb::Database> {
        check_aux_name(name)?;
        let path = aux_path(self.dir(), name);
        let (mut file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new().read(true).write(true).open(&path)?,
                false,
            ),
            Err(e) => return Err(Error::Io(e)),
        };
        if created {
            // The umask may have narrowed the mode, never widened it; make it exact, and
            // make the new name durable with the first durable commit.
            restrict_permissions(&path)?;
            sync_dir(self.dir())?;
        }
        // A handle of this process that was just dropped may still be closing: tantivy's
        // merge and updater threads let go of the index directory (and so of its file) a
        // moment after the index itself. A lock held that briefly is waited for; one held for
        // longer (another process) is reported.
        // redb takes its file locks in `FileBackend::new` and again (through the backend's
        // range locks) when it opens the database, so both are retried.
        let deadline = std::time::Instant::now() + AUX_LOCK_WAIT;
        let retry = |error: &redb::DatabaseError| {
            matches!(error, redb::DatabaseError::DatabaseAlreadyOpen)
                && std::time::Instant::now() < deadline
        };
        loop {
            let backend = match redb::backends::FileBackend::new(file) {
                Ok(backend) => backend,
                Err(error) if retry(&error) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    file = OpenOptions::new().read(true).write(true).open(&path)?;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let keyring = Arc::clone(&self.inner.counters.0);
            let backend = EncryptedBackend::new_aux(backend, keyring, name)?;
            let mut builder = redb::Builder::new();
            builder.set_cache_size(self.inner.aux_cache_size);
            match builder.create_with_backend(backend) {
                Ok(db) => return Ok(db),
                Err(error) if retry(&error) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    file = OpenOptions::new().read(true).write(true).open(&path)?;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Deletes the auxiliary database `name` (to rebuild it from scratch). Returns whether a
    /// file was deleted. Fails with [`Error::Storage`] if the database is open (its handle
    /// must be dropped first).
    pub fn delete_aux_database(&self, name: &str) -> Result<bool> {
        check_aux_name(name)?;
        let path = aux_path(self.dir(), name);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::Io(e)),
        };
        // redb holds an exclusive lock on the file while it is open (in this process or
        // another); deleting it then would leave that handle writing to a nameless file.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Storage(format!(
                    "auxiliary database {name:?} is open: close it before deleting it"
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::Io(e)),
        }
        std::fs::remove_file(&path)?;
        drop(file);
        sync_dir(self.dir())?;
        Ok(true)
    }

    /// The second half of checking one auxiliary file: judges failed blocks by whether the
    /// database reaches them (as for the store's file) and runs redb's integrity check.
    /// Returns warnings; a fault is an error naming the file.
    pub(super) fn check_aux_file(&self, report: &mut AuxFileReport) -> Result<Vec<String>> {
        let file = format!("{}.{AUX_EXTENSION}", report.name);
        let failed_pages = describe_failed_pages(&report.pages.failed_pages);
        let fault = |message: String| {
            let pages = failed_pages
                .as_ref()
                .map(|pages| format!("; {pages}"))
                .unwrap_or_default();
            Error::Corrupted(format!(
                "auxiliary file {file}: {message}{pages} (it holds derived data only: delete \
                 it and rebuild it)"
            ))
        };
        if !report.pages.problems.is_empty() {
            return Err(fault(report.pages.problems.join("; ")));
        }
        let mut db = self.open_aux_database(&report.name).map_err(|e| match e {
            Error::Corrupted(message) => fault(message),
            other => other,
        })?;
        let intact = db.check_integrity().map_err(|e| match Error::from(e) {
            Error::Corrupted(message) => fault(message),
            other => other,
        })?;
        if !intact {
            return Err(fault(
                "redb integrity check failed (checksums or tree structure)".into(),
            ));
        }
        report.redb_integrity_ok = true;
        Ok(failed_pages
            .map(|pages| {
                vec![format!(
                    "auxiliary file {file}: {pages}, but no page of it refers to them: free \
                     pages, typically torn by a crash; they are overwritten before reuse"
                )]
            })
            .unwrap_or_default())
    }
}
