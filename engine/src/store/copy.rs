//! Re-encrypting copy: every table of a store written into a new database under a fresh
//! data key, so that no page encrypted under the old keys remains in the copy.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::record::{BODIES, CHANGES, META, TYPE_CHANGES, VERSIONS};
use super::{AccessContext, AccessRecord, Store, StoreBuilder};
use crate::audit::AuditAction;
use crate::crypto::{KdfParams, KeySource};
use crate::{Error, Result};

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    source: &redb::ReadTransaction,
    target: &redb::WriteTransaction,
    definition: TableDefinition<'_, K, V>,
) -> Result<u64> {
    let from = source.open_table(definition)?;
    let mut to = target.open_table(definition)?;
    copy_rows(&from, &mut to)
}

/// Inserts every row of `from` into `to` in key order. Into an empty table each insert lands
/// past the last key, where redb leaves the full leaf packed and starts a new one, so the
/// copy's leaves are as full as they can be.
pub(super) fn copy_rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &impl ReadableTable<K, V>,
    to: &mut redb::Table<'_, K, V>,
) -> Result<u64> {
    let mut copied = 0;
    for entry in from.iter()? {
        let (key, value) = entry?;
        to.insert(key.value(), value.value())?;
        copied += 1;
    }
    Ok(copied)
}

impl Store {
    /// Writes a complete copy of this store into a new database at `dest` (which must not
    /// exist), encrypted under a new database id and a fresh data key wrapped by `key`.
    ///
    /// Versions, history and the audit log (with its signing key, so earlier signed heads
    /// stay verifiable) are copied as they are; the copy then records a `rekey` leaf.
    /// Returns the number of rows copied.
    ///
    /// Auxiliary databases ([`Store::open_aux_database`], e.g. the search index) are not
    /// copied: they hold only data derived from the store, bound to this database's id and
    /// keys, and are rebuilt in the copy from its change feed.
    pub fn copy_to(
        &self,
        ctx: &AccessContext,
        dest: &Path,
        key: KeySource,
        kdf: KdfParams,
    ) -> Result<u64> {
        if dest.exists() {
            return Err(Error::AlreadyExists(dest.to_path_buf()));
        }
        self.flush_audit()?;
        let copy: StoreBuilder = Store::builder(dest)
            .key(key)
            .kdf(kdf)
            .read_audit(super::ReadAudit::Durable);
        let target = copy.create()?;
        let source = self.inner.db.begin_read()?;
        let txn = target.inner.begin_write_txn()?;
        let mut rows = 0;
        rows += copy_table(&source, &txn, VERSIONS)?;
        rows += copy_table(&source, &txn, BODIES)?;
        rows += copy_table(&source, &txn, CHANGES)?;
        rows += copy_table(&source, &txn, TYPE_CHANGES)?;
        rows += copy_table(&source, &txn, META)?;
        // The new database made its own (empty) audit log and signing key; replace them.
        {
            use crate::audit::log::{HEADS, LEAVES, META as AUDIT_META, NODES, TIME_BLOCKS};
            for table in [LEAVES, HEADS] {
                txn.delete_table(table)?;
            }
            txn.delete_table(NODES)?;
            txn.delete_table(AUDIT_META)?;
            txn.delete_table(TIME_BLOCKS)?;
            rows += copy_table(&source, &txn, LEAVES)?;
            rows += copy_table(&source, &txn, NODES)?;
            rows += copy_table(&source, &txn, HEADS)?;
            rows += copy_table(&source, &txn, AUDIT_META)?;
            // A log written before the time blocks has none; its searches by time read it
            // leaf by leaf, in the copy as in the original.
            match source.open_table(TIME_BLOCKS) {
                Ok(from) => rows += copy_rows(&from, &mut txn.open_table(TIME_BLOCKS)?)?,
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        txn.commit()?;
        target.inner.retire_read_snapshot();
        target.inner.reload_clock()?;
        target.inner.reload_pending()?;
        target.inner.reload_watermarks()?;
        target.record_access(ctx, AccessRecord::succeeded(AuditAction::Rekey))?;
        target.verify_audit()?;
        Ok(rows)
    }
}
