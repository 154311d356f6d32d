//! Versions written among random keys: kept in the change table, and moved into `versions`
//! in key order by a merge once enough have gathered.
//!
//! Why: with random client ids every insert into `versions` lands in a random leaf, and a
//! commit of 1,000 such versions rewrites (copies, encrypts, writes) about as many leaves.
//! The change table is keyed by change seq, so the same rows appended there fill a few
//! leaves. A merge then inserts tens of thousands of pending versions in key order, touching
//! each leaf of `versions` about once instead of once per commit (BENCHMARKS.md, "pending
//! versions").
//!
//! Definitions:
//! - A *pending* version is one whose change row carries its record ([`Change::pending`]);
//!   its body is in `bodies` under the change seq. `WriteTxn::locate` decides which versions
//!   are pending (those whose key lands among random neighbours).
//! - `merged_through` (in `meta`) is the last change seq whose pending versions are in
//!   `versions`.
//!
//! Invariants:
//! - The versions of a snapshot are exactly `versions` ∪ the pending versions of its change
//!   rows in (`merged_through`, last seq]; both are read from the same redb snapshot, so a
//!   read never races a commit or a merge.
//! - A merge inserts the pending versions in (`merged_through`, last seq] into `versions` and
//!   moves `merged_through` to the last seq, in one transaction: a crash leaves either state
//!   whole, and both read the same.
//! - [`SharedPending`] is a cache of those change rows by `Type/id`: it holds every pending
//!   version with a seq above its `floor`, committed or being committed (a commit adds its
//!   versions before it becomes visible, and takes them out again if it fails). A snapshot
//!   whose `merged_through` is below the floor (it began before the last two merges) reads its
//!   own change rows instead.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use redb::ReadableTable;

use super::record::{
    CHANGES, Change, META, META_MERGED_THROUGH, PendingRecord, VERSIONS, VersionRecord,
    encode_record,
};
use crate::{Error, Result};

/// One pending version of a resource: its version id, change seq and the rest of its record
/// (held here so that a read needs no look-up in `changes`: versions never change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingVersion {
    pub(crate) version: u64,
    pub(crate) seq: u64,
    pub(crate) last_updated_micros: i64,
    pub(crate) record: PendingRecord,
}

impl PendingVersion {
    /// Its version record (format 3: the body is in `bodies` under the seq).
    pub(crate) fn version_record(&self) -> VersionRecord<'static> {
        self.record
            .version_record(self.seq, self.last_updated_micros)
    }
}

/// Pending versions by `Type/id`, each list in increasing version order.
#[derive(Debug, Default)]
pub(crate) struct PendingIndex {
    entries: HashMap<String, Vec<PendingVersion>>,
}

fn key_of(resource_type: &str, id: &str) -> String {
    let mut key = String::with_capacity(resource_type.len() + 1 + id.len());
    key.push_str(resource_type);
    key.push('/');
    key.push_str(id);
    key
}

impl PendingIndex {
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn insert(&mut self, resource_type: &str, id: &str, pending: PendingVersion) {
        let versions = self.entries.entry(key_of(resource_type, id)).or_default();
        // Versions of one resource are written in increasing order: this is an append.
        let at = versions.partition_point(|v| v.version < pending.version);
        versions.insert(at, pending);
    }

    /// Takes out exactly `pending` (a commit that failed), leaving any other entry alone.
    pub(crate) fn remove(&mut self, resource_type: &str, id: &str, pending: PendingVersion) {
        let key = key_of(resource_type, id);
        if let Some(versions) = self.entries.get_mut(&key) {
            versions.retain(|v| *v != pending);
            if versions.is_empty() {
                self.entries.remove(&key);
            }
        }
    }

    /// The pending versions of `Type/id` with a seq in (`after`, `through`], oldest first.
    pub(crate) fn candidates(
        &self,
        resource_type: &str,
        id: &str,
        after: u64,
        through: u64,
    ) -> Vec<PendingVersion> {
        match self.entries.get(&key_of(resource_type, id)) {
            Some(versions) => versions
                .iter()
                .filter(|v| v.seq > after && v.seq <= through)
                .copied()
                .collect(),
            None => Vec::new(),
        }
    }

    /// Forgets every version with a seq at or below `seq`.
    fn drop_through(&mut self, seq: u64) {
        self.entries.retain(|_, versions| {
            versions.retain(|v| v.seq > seq);
            !versions.is_empty()
        });
    }

    /// The pending versions of the change rows in (`after`, `through`].
    pub(crate) fn scan(
        changes: &impl ReadableTable<u64, &'static [u8]>,
        after: u64,
        through: u64,
    ) -> Result<(Self, usize)> {
        let mut index = PendingIndex::default();
        let mut rows = 0;
        if through > after {
            for entry in changes.range(after + 1..=through)? {
                let (seq, bytes) = entry?;
                let change = Change::decode(bytes.value())?;
                if let Some(record) = change.pending {
                    let pending = PendingVersion {
                        version: change.version,
                        seq: seq.value(),
                        last_updated_micros: change.last_updated_micros,
                        record,
                    };
                    index.insert(&change.resource_type, &change.id, pending);
                    rows += 1;
                }
            }
        }
        Ok((index, rows))
    }
}

/// The process-wide cache of pending versions ([`PendingIndex`] with its floor).
#[derive(Debug, Default)]
pub(crate) struct SharedPending {
    index: PendingIndex,
    /// Every pending version with a seq above this is in `index`.
    floor: u64,
    /// Pending versions committed since the last merge (what decides the next one).
    unmerged: usize,
}

/// A pending version a write transaction adds, for [`SharedPending::publish`].
#[derive(Debug, Clone)]
pub(crate) struct NewPending {
    pub(crate) resource_type: String,
    pub(crate) id: String,
    pub(crate) pending: PendingVersion,
}

/// Where one snapshot's pending versions are: its bounds, and its own index if the shared
/// one no longer reaches back to it.
#[derive(Debug)]
pub(crate) struct SnapshotPending {
    merged_through: u64,
    visible_through: u64,
    own: OnceLock<PendingIndex>,
}

impl SnapshotPending {
    /// The bounds of the snapshot that `meta` and `changes` were opened in.
    pub(crate) fn of(
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        changes: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<Self> {
        Ok(SnapshotPending {
            merged_through: merged_through(meta)?,
            visible_through: changes.last()?.map_or(0, |(seq, _)| seq.value()),
            own: OnceLock::new(),
        })
    }

    /// Whether this snapshot had to read its pending versions from its own change rows.
    #[cfg(test)]
    pub(crate) fn read_its_own_rows(&self) -> bool {
        self.own.get().is_some()
    }

    /// The snapshot's pending versions of `Type/id`, oldest first.
    pub(crate) fn candidates(
        &self,
        shared: &RwLock<SharedPending>,
        changes: &impl ReadableTable<u64, &'static [u8]>,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<PendingVersion>> {
        if self.visible_through <= self.merged_through {
            return Ok(Vec::new());
        }
        if let Some(own) = self.own.get() {
            return Ok(own.candidates(
                resource_type,
                id,
                self.merged_through,
                self.visible_through,
            ));
        }
        {
            let shared = read(shared);
            if shared.floor <= self.merged_through {
                if shared.index.is_empty() {
                    return Ok(Vec::new());
                }
                return Ok(shared.index.candidates(
                    resource_type,
                    id,
                    self.merged_through,
                    self.visible_through,
                ));
            }
        }
        // Two merges since this snapshot began: the cache has forgotten versions it sees.
        let (index, _) = PendingIndex::scan(changes, self.merged_through, self.visible_through)?;
        let own = self.own.get_or_init(|| index);
        Ok(own.candidates(resource_type, id, self.merged_through, self.visible_through))
    }
}

/// The `merged_through` recorded in `meta` (0 before anything was merged).
pub(crate) fn merged_through(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64> {
    match meta.get(META_MERGED_THROUGH)? {
        Some(guard) => <[u8; 8]>::try_from(guard.value())
            .map(u64::from_le_bytes)
            .map_err(|_| Error::Corrupted("merged_through is malformed".into())),
        None => Ok(0),
    }
}

fn read(shared: &RwLock<SharedPending>) -> std::sync::RwLockReadGuard<'_, SharedPending> {
    // The index is updated only by complete operations on a HashMap; a panic while a writer
    // held the lock leaves at worst a missing or extra entry of a commit that failed.
    shared
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(shared: &RwLock<SharedPending>) -> std::sync::RwLockWriteGuard<'_, SharedPending> {
    shared
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SharedPending {
    /// Pending versions committed since the last merge.
    #[cfg(test)]
    pub(crate) fn unmerged_for_tests(&self) -> usize {
        self.unmerged
    }

    /// Loads the pending versions of the database as `txn` sees it, replacing the cache.
    pub(crate) fn reload(
        shared: &RwLock<SharedPending>,
        txn: &redb::ReadTransaction,
    ) -> Result<()> {
        let meta = txn.open_table(META)?;
        let changes = txn.open_table(CHANGES)?;
        let merged = merged_through(&meta)?;
        let last = changes.last()?.map_or(0, |(seq, _)| seq.value());
        let (index, rows) = PendingIndex::scan(&changes, merged, last)?;
        *write(shared) = SharedPending {
            index,
            floor: merged,
            unmerged: rows,
        };
        Ok(())
    }

    /// The committed pending versions of `Type/id` in (`after`, `through`], for the writer
    /// (which holds redb's writer lock, so the cache reaches back to its `merged_through`).
    pub(crate) fn candidates_for_writer(
        shared: &RwLock<SharedPending>,
        resource_type: &str,
        id: &str,
        after: u64,
        through: u64,
    ) -> Vec<PendingVersion> {
        let shared = read(shared);
        if shared.index.is_empty() {
            return Vec::new();
        }
        shared.index.candidates(resource_type, id, after, through)
    }

    /// Adds the pending versions of a commit about to happen.
    pub(crate) fn publish(shared: &RwLock<SharedPending>, added: &[NewPending]) {
        if added.is_empty() {
            return;
        }
        let mut shared = write(shared);
        for new in added {
            shared
                .index
                .insert(&new.resource_type, &new.id, new.pending);
        }
        shared.unmerged += added.len();
    }

    /// Takes out the versions of a commit that failed.
    pub(crate) fn withdraw(shared: &RwLock<SharedPending>, added: &[NewPending]) {
        if added.is_empty() {
            return;
        }
        let mut shared = write(shared);
        for new in added {
            shared
                .index
                .remove(&new.resource_type, &new.id, new.pending);
        }
        shared.unmerged = shared.unmerged.saturating_sub(added.len());
    }

    /// Whether enough versions are pending for a merge.
    pub(crate) fn merge_due(shared: &RwLock<SharedPending>, threshold: usize) -> bool {
        read(shared).unmerged >= threshold
    }

    /// After a merge from `old_merged_through` committed: snapshots from before the merge
    /// still read from the cache, so it keeps what they need and forgets what only snapshots
    /// from before the previous merge would.
    pub(crate) fn merged(shared: &RwLock<SharedPending>, old_merged_through: u64, rows: usize) {
        let mut shared = write(shared);
        shared.index.drop_through(old_merged_through);
        shared.floor = shared.floor.max(old_merged_through);
        shared.unmerged = shared.unmerged.saturating_sub(rows);
    }
}

/// Moves every pending version of the change rows after `merged_through` into `versions`, in
/// key order, and records the new `merged_through`, in `txn` (not committed). Returns the old
/// `merged_through` and the number of versions moved.
pub(crate) fn merge_into(txn: &redb::WriteTransaction) -> Result<(u64, usize)> {
    let mut meta = txn.open_table(META)?;
    let changes = txn.open_table(CHANGES)?;
    let old = merged_through(&meta)?;
    let last = changes.last()?.map_or(0, |(seq, _)| seq.value());
    let mut rows = Vec::new();
    if last > old {
        for entry in changes.range(old + 1..=last)? {
            let (seq, bytes) = entry?;
            let seq = seq.value();
            let change = Change::decode(bytes.value())?;
            if let Some(pending) = change.pending {
                let record = encode_record(
                    pending.kind,
                    change.last_updated_micros,
                    seq,
                    &pending.content_hash,
                    b"",
                )?
                .record;
                rows.push((change.resource_type, change.id, change.version, record));
            }
        }
    }
    rows.sort_unstable_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    let mut versions = txn.open_table(VERSIONS)?;
    for (resource_type, id, version, record) in &rows {
        versions.insert(
            (resource_type.as_str(), id.as_str(), *version),
            record.as_slice(),
        )?;
    }
    meta.insert(META_MERGED_THROUGH, &last.to_le_bytes()[..])?;
    Ok((old, rows.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: u64, seq: u64) -> PendingVersion {
        PendingVersion {
            version,
            seq,
            last_updated_micros: i64::try_from(seq).unwrap(),
            record: PendingRecord {
                kind: super::super::VersionKind::Updated,
                content_hash: [0; 32],
            },
        }
    }

    #[test]
    fn candidates_are_the_versions_in_the_seq_window_oldest_first() {
        let mut index = PendingIndex::default();
        index.insert("Patient", "a", at(2, 20));
        index.insert("Patient", "a", at(1, 10));
        index.insert("Patient", "a", at(3, 30));
        index.insert("Patient", "b", at(1, 15));
        assert_eq!(
            index.candidates("Patient", "a", 0, u64::MAX),
            [at(1, 10), at(2, 20), at(3, 30)]
        );
        assert_eq!(index.candidates("Patient", "a", 10, 29), [at(2, 20)]);
        assert!(index.candidates("Observation", "a", 0, u64::MAX).is_empty());
        // "Patient/a" + "b" never meets "Patient" + "/ab": ids hold no '/'.
        assert!(index.candidates("Patient/a", "", 0, u64::MAX).is_empty());
        index.remove("Patient", "a", at(2, 20));
        assert_eq!(
            index.candidates("Patient", "a", 0, 100),
            [at(1, 10), at(3, 30)]
        );
        index.drop_through(15);
        assert_eq!(index.candidates("Patient", "a", 0, 100), [at(3, 30)]);
        assert!(index.candidates("Patient", "b", 0, 100).is_empty());
        index.drop_through(30);
        assert!(index.is_empty());
    }

    #[test]
    fn a_failed_commit_withdraws_exactly_its_own_versions() {
        let shared = RwLock::new(SharedPending::default());
        let new = |id: &str, version, seq| NewPending {
            resource_type: "Patient".into(),
            id: id.into(),
            pending: at(version, seq),
        };
        let committed = [new("a", 1, 1), new("b", 1, 2)];
        SharedPending::publish(&shared, &committed);
        let failed = [new("a", 2, 3), new("c", 1, 4)];
        SharedPending::publish(&shared, &failed);
        SharedPending::withdraw(&shared, &failed);
        let all = |id| SharedPending::candidates_for_writer(&shared, "Patient", id, 0, u64::MAX);
        assert_eq!(all("a"), [at(1, 1)]);
        assert_eq!(all("b"), [at(1, 2)]);
        assert!(all("c").is_empty());
        assert!(!SharedPending::merge_due(&shared, 3));
        assert!(SharedPending::merge_due(&shared, 2));
        // After a merge through seq 2 from 0, snapshots from before it still find a and b.
        SharedPending::merged(&shared, 0, 2);
        assert_eq!(all("a"), [at(1, 1)]);
        assert!(!SharedPending::merge_due(&shared, 1));
        // The next merge forgets them: only snapshots from before the first would need them.
        SharedPending::publish(&shared, &[new("a", 2, 3)]);
        SharedPending::merged(&shared, 2, 1);
        assert_eq!(all("a"), [at(2, 3)]);
        assert_eq!(read(&shared).floor, 2);
    }
}
