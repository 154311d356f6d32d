//! Compaction: packing tables and giving the space of free pages back to the file system.
//! redb files never shrink on their own (a bulk load, or an index's segment merges, leave
//! many free pages), and B-tree leaves that took inserts in the middle of the key space
//! (random ids, one history per type, one Merkle level beside another) stay about half
//! full, so an operator compacts offline.

use std::sync::Arc;

use redb::{ReadableTableMetadata, TableDefinition};

use super::auxiliary::{aux_names, aux_path};
use super::copy::copy_rows;
use super::record::{BODIES, CHANGES, TYPE_CHANGES, VERSIONS};
use super::{AccessContext, AccessRecord, DATABASE_FILE, Flusher, Store};
use crate::audit::AuditAction;
use crate::audit::log::{FIRST_STORED_LEVEL, HEADS, LEAVES, NODES};
use crate::{Error, Result};

/// The audit action of a compaction.
pub const COMPACT_ACTION: &str = "compact";

/// What [`Store::compact`] did: each file's size before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// `(file name, bytes before, bytes after)`, the store file first.
    pub files: Vec<(String, u64, u64)>,
    /// `(table, bytes before, bytes after)` of each store table that was rewritten with
    /// full leaves (keys, values, B-tree metadata and slack).
    pub packed_tables: Vec<(String, u64, u64)>,
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
    /// Pending versions (docs/design.md, "Pending versions") are merged into the versions
    /// table first, whatever their number.
    ///
    /// Needs the store to itself: no auxiliary database of it may be open (a `Database`
    /// holds its index open, so compact through a `Store` opened alone, as `fhirkeep compact`
    /// does). Recorded in the audit log as a `compact` leaf of `ctx`, committed before the
    /// rewrite: a commit after it would grow the compacted file again at once (redb grows a
    /// full file by doubling it, or by a region). A compaction that then fails records a
    /// second `compact` leaf with outcome `error`.
    pub fn compact(&mut self, ctx: &AccessContext) -> Result<CompactReport> {
        let action = AuditAction::Other(COMPACT_ACTION.into());
        // Pending versions join `versions` first, so that it is packed whole.
        self.inner.merge_pending()?;
        self.record_access(ctx, AccessRecord::succeeded(action.clone()))?;
        let result = self.compact_files();
        if result.is_err() {
            let mut failed = AccessRecord::succeeded(action);
            failed.outcome = crate::audit::AuditOutcome::Error;
            self.record_access(ctx, failed)?;
        }
        result
    }

    fn compact_files(&mut self) -> Result<CompactReport> {
        let dir = self.dir().to_path_buf();
        let size = |path: &std::path::Path| -> Result<u64> { Ok(std::fs::metadata(path)?.len()) };
        let mut files = Vec::new();
        let mut packed_tables = Vec::new();
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
            // redb compacts only with no live read transaction, and the shared read
            // snapshot is one; no read can open a new one while this holds `&mut`.
            inner.retire_read_snapshot();
            drop_recomputable_nodes(&inner.db)?;
            for packed in [
                pack_table(&inner.db, VERSIONS)?,
                pack_table(&inner.db, BODIES)?,
                pack_table(&inner.db, CHANGES)?,
                pack_table(&inner.db, TYPE_CHANGES)?,
                pack_table(&inner.db, LEAVES)?,
                pack_table(&inner.db, NODES)?,
                pack_table(&inner.db, HEADS)?,
            ]
            .into_iter()
            .flatten()
            {
                packed_tables.push(packed);
            }
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
        Ok(CompactReport {
            files,
            packed_tables,
        })
    }
}

/// Removes the Merkle nodes of levels below `FIRST_STORED_LEVEL` that logs written before
/// that rule stored: they are recomputed from the leaves when needed, and `verify` does not
/// require them. The packing that follows gives their space back.
fn drop_recomputable_nodes(db: &redb::Database) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    txn.set_two_phase_commit(true);
    {
        let mut nodes = txn.open_table(NODES)?;
        nodes.retain_in((1u8, 0u64)..(FIRST_STORED_LEVEL, 0u64), |_, _| false)?;
    }
    txn.commit()?;
    Ok(())
}

/// A table is rewritten when more than this share of its bytes is slack in part-filled pages.
const PACK_WHEN_SLACK_OVER: f64 = 0.125;

fn table_bytes(stats: &redb::TableStats) -> u64 {
    stats.stored_bytes() + stats.metadata_bytes() + stats.fragmented_bytes()
}

/// Rewrites `definition` in key order into a fresh table that then takes its name, all in one
/// transaction (a crash leaves the old table or the new one, never a mix). Returns
/// `(name, bytes before, bytes after)`, or `None` when the table was packed enough already.
fn pack_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    db: &redb::Database,
    definition: TableDefinition<'_, K, V>,
) -> Result<Option<(String, u64, u64)>> {
    let name = redb::TableHandle::name(&definition).to_owned();
    let packed_name = format!("{name}.packing");
    let packed_definition: TableDefinition<'_, K, V> = TableDefinition::new(&packed_name);
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    txn.set_two_phase_commit(true);
    let before = {
        let table = txn.open_table(definition)?;
        let stats = table.stats()?;
        let total = table_bytes(&stats);
        if total == 0 || (stats.fragmented_bytes() as f64) <= PACK_WHEN_SLACK_OVER * total as f64 {
            return Ok(None);
        }
        let mut packed = txn.open_table(packed_definition)?;
        copy_rows(&table, &mut packed)?;
        total
    };
    txn.delete_table(definition)?;
    txn.rename_table(packed_definition, definition)?;
    let after = table_bytes(&txn.open_table(definition)?.stats()?);
    txn.commit()?;
    Ok(Some((name, before, after)))
}
