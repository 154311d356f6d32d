//! Where the bytes of a database go: per-table entry counts and B-tree sizes, for operators
//! sizing disks and for the disk-per-resource benchmarks.

use redb::{ReadableDatabase, ReadableTableMetadata};

use super::auxiliary::aux_names;
use super::{AccessContext, AccessRecord, Store};
use crate::Result;
use crate::audit::AuditAction;

/// The audit action of a space report.
pub const SPACE_ACTION: &str = "space-report";

/// The size of one redb table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableSpace {
    /// The file the table lives in: `fhirkeep.redb` or an auxiliary file such as `index.redb`.
    pub file: String,
    /// The table's name.
    pub table: String,
    /// Number of key-value pairs.
    pub entries: u64,
    /// Bytes of keys and values as inserted.
    pub stored_bytes: u64,
    /// Bytes of branch-page keys and other B-tree metadata.
    pub metadata_bytes: u64,
    /// Bytes lost to partly filled pages.
    pub fragmented_bytes: u64,
    /// Leaf pages.
    pub leaf_pages: u64,
    /// Branch pages.
    pub branch_pages: u64,
}

impl TableSpace {
    /// Everything the table occupies in its file.
    pub fn total_bytes(&self) -> u64 {
        self.stored_bytes + self.metadata_bytes + self.fragmented_bytes
    }
}

fn tables_of(file: &str, db: &redb::Database, into: &mut Vec<TableSpace>) -> Result<()> {
    let read = db.begin_read()?;
    for handle in read.list_tables()? {
        let table = read.open_untyped_table(handle)?;
        let stats = table.stats()?;
        into.push(TableSpace {
            file: file.to_owned(),
            table: redb::TableHandle::name(&table).to_owned(),
            entries: table.len()?,
            stored_bytes: stats.stored_bytes(),
            metadata_bytes: stats.metadata_bytes(),
            fragmented_bytes: stats.fragmented_bytes(),
            leaf_pages: stats.leaf_pages(),
            branch_pages: stats.branch_pages(),
        });
    }
    Ok(())
}

impl Store {
    /// The size of every table of the store file and of each auxiliary file (search index,
    /// exports). Names and sizes only: no content. Recorded in the audit log as a
    /// `space-report` leaf of `ctx`.
    ///
    /// An auxiliary file that is open elsewhere (a `Database` holds its index open) cannot be
    /// opened a second time: report through a `Store` opened alone, as `fhirkeep stats` does.
    pub fn space_report(&self, ctx: &AccessContext) -> Result<Vec<TableSpace>> {
        let mut tables = Vec::new();
        tables_of(super::DATABASE_FILE, &self.inner.db, &mut tables)?;
        for name in aux_names(self.dir())? {
            let db = self.open_aux_database(&name)?;
            tables_of(&format!("{name}.redb"), &db, &mut tables)?;
        }
        self.record_access(
            ctx,
            AccessRecord::succeeded(AuditAction::Other(SPACE_ACTION.into())),
        )?;
        Ok(tables)
    }
}
