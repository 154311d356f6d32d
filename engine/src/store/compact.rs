//! Compaction: giving the space of free pages back to the file system. redb files never
//! shrink on their own (a bulk load, or an index's segment merges, leave many free pages),
//! so an operator compacts them offline.

use std::sync::Arc;

use super::auxiliary::{aux_names, aux_path};
use super::{AccessContext, AccessRecord, DATABASE_FILE, Flusher, Store};
use crate::audit::AuditAction;
use crate::{Error, Result};

/// The audit action of a compaction.
pub const COMPACT_ACTION: &str = "compact";

/// What [`Store::compact`] did: each file's size before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// `(file name, bytes before, bytes after)`, the store file first.
    pub files: Vec<(String, u64, u64)>,
}

impl CompactReport {
    /// Bytes before and after, over every file.
    pub fn totals(&self) -> (u64, u64) {
        self.files
            .iter()
            .fold((0, 0), |(b, a), (_, before, after)| (b + before, a + after))
    }
}

impl Store {
    /// Compacts the store file and every auxiliary file in the directory (the search
    /// index, export files), so that each file holds its live pages only. Every page is
    /// rewritten through the encrypting backend, so nothing is ever written in plaintext.
    ///
    /// Needs the store to itself: no auxiliary database of it may be open (a `Database`
    /// holds its index open, so compact through a `Store` opened alone, as `fhirkeep compact`
    /// does). Recorded in the audit log as a `compact` leaf of `ctx`.
    pub fn compact(&mut self, ctx: &AccessContext) -> Result<CompactReport> {
        let dir = self.dir().to_path_buf();
        let size = |path: &std::path::Path| -> Result<u64> { Ok(std::fs::metadata(path)?.len()) };
        let mut files = Vec::new();
        let store_path = dir.join(DATABASE_FILE);
        let store_before = size(&store_path)?;
        // The flusher holds a reference to the store's internals; redb compacts only with
        // no other user, so it pauses for the duration.
        let delay = self.flush_delay();
        if let Some(flusher) = self.flusher.take() {
            flusher.stop();
        }
        let compacted = (|| -> Result<()> {
            self.inner.flush_pending()?;
            let inner = Arc::get_mut(&mut self.inner).ok_or_else(|| {
                Error::Storage("compaction needs exclusive access to the store".into())
            })?;
            while inner.db.compact()? {}
            Ok(())
        })();
        self.flusher = Some(Flusher::start(&self.inner, delay));
        compacted?;
        files.push((DATABASE_FILE.to_owned(), store_before, size(&store_path)?));
        for name in aux_names(&dir)? {
            let path = aux_path(&dir, &name);
            let before = size(&path)?;
            let mut db = self.open_aux_database(&name)?;
            while db.compact()? {}
            drop(db);
            files.push((format!("{name}.redb"), before, size(&path)?));
        }
        self.record_access(
            ctx,
            AccessRecord::succeeded(AuditAction::Other(COMPACT_ACTION.into())),
        )?;
        Ok(CompactReport { files })
    }
}
