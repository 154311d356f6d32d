//! The audit log stored in redb: appending leaves, signing tree heads, proofs, and full verification.
//!
//! Four tables live in the same (page-encrypted) database as the data, so a write's leaf commits
//! or rolls back with the write:
//!
//! * `audit_leaf_chunks`: `u64` row → the encoded [`AuditLeaf`]s of seqs `4·row .. 4·row+4`,
//!   each preceded by its `u32` length (see [`super::leaf`]); logs written one leaf to a row
//!   (`audit_leaves`) are moved into it when the database opens.
//! * `audit_nodes`: `(u8 level, u64 index)` → 32-byte hash of the complete subtree
//!   `[index·2^level, (index+1)·2^level)` (the Go `sumdb/tlog` stored hashes).
//! * `audit_heads`: `u64` size → stored [`SignedTreeHead`] (145 bytes, see [`super::head`]).
//! * `audit_meta`: `&str` → bytes; `"signing_key"` holds the 32-byte Ed25519 seed that signs heads.
//!
//! Appending leaf `n` writes the leaf and the nodes of level [`FIRST_STORED_LEVEL`] and above
//! that it completes (about one per 2^(`FIRST_STORED_LEVEL` − 1) leaves). Nodes of the levels
//! below are recomputed from at most 2^(`FIRST_STORED_LEVEL` − 1) leaves when a root or a proof
//! needs them; logs written before this rule also hold them, and they are checked like the
//! rest. Roots and proofs read `O(log n)` nodes. [`verify_log`] trusts no stored node: it
//! recomputes everything from the leaf bytes and checks every stored node and signed head
//! against that.
//! Error messages name sequence numbers and sizes, never leaf content.

use std::ops::ControlFlow;

use ed25519_dalek::SigningKey;
use redb::{
    ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::head::{ConsistencyProof, InclusionProof, SignedTreeHead};
use super::leaf::{AuditAction, AuditLeaf, AuditRecord, encode_leaf, hex32};
use super::merkle::{
    Hash, NodeSource, consistency_proof, empty_root, inclusion_proof, leaf_hash, node_hash,
    nodes_to_store_on_append, root,
};
use crate::{Error, Result};

/// Leaves, [`LEAVES_PER_ROW`] to a row: row `r` holds leaves `4r .. 4r+4` in order, each as
/// `u32` length ‖ encoded leaf; only the last row may hold fewer.
pub(crate) const LEAVES: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("audit_leaf_chunks");
/// Leaves one to a row (seq → encoded leaf), as logs written before rows of leaves were;
/// moved into [`LEAVES`] when such a database opens.
pub(crate) const LEGACY_LEAVES: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("audit_leaves");
/// Leaves per row of [`LEAVES`]. Why rows of leaves: a B-tree insert per audited read was
/// most of the cost of committing read leaves. Why four: a row (about 700 bytes) still packs
/// well into 4 KiB pages, where rows of eight left a third of each page empty (+72 bytes per
/// leaf on disk at a million leaves, against +19 for four) for a little more speed.
/// Every node below the first stored level is hashed from at most two rows.
pub(crate) const LEAVES_PER_ROW: u64 = 4;
/// Stored complete-subtree hashes: (level, index) → hash.
pub(crate) const NODES: TableDefinition<'static, (u8, u64), [u8; 32]> =
    TableDefinition::new("audit_nodes");
/// Signed tree heads: size → encoded head.
pub(crate) const HEADS: TableDefinition<'static, u64, &'static [u8]> =
    TableDefinition::new("audit_heads");
/// The time range of each block of [`LEAVES_PER_TIME_BLOCK`] leaves: block → earliest time ‖
/// latest time (`i64` LE µs each) ‖ number of the block's leaves the range covers (`u64` LE).
/// Leaf times follow the log's order only roughly (a read's leaf carries the time of the
/// read and joins the log at the next group commit, after writes that came later), so a
/// search by time cannot bisect the log; it skips the blocks whose range misses its own.
/// A block whose range does not cover all its leaves (begun before the table existed) is
/// read leaf by leaf.
pub(crate) const TIME_BLOCKS: TableDefinition<'static, u64, [u8; 24]> =
    TableDefinition::new("audit_time_blocks");
/// A block's earliest and latest leaf time (µs) and the number of its leaves they cover.
type TimeRange = (i64, i64, u64);

/// Leaves per block of [`TIME_BLOCKS`]: a search by time reads one row per 1,024 leaves it
/// skips, and a block's range is updated once per appended batch.
pub(crate) const LEAVES_PER_TIME_BLOCK: u64 = 1024;

/// Log metadata (the signing key).
pub(crate) const META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("audit_meta");

/// Key of the Ed25519 signing key seed in [`META`].
const SIGNING_KEY: &str = "signing_key";

/// Key of the signing-key schedule in [`META`]: entries of 40 bytes, the first tree size a
/// key signs (u64 LE) and its Ed25519 public key, in order. Absent until the first rotation:
/// then the current key has signed every head.
pub(crate) const KEY_SCHEDULE: &str = "signing_key_schedule";

/// One entry of the signing-key schedule: `public_key` signs the heads of `first_size` leaves
/// and more, until the next entry's `first_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditKey {
    /// The smallest tree size whose head this key signs.
    pub first_size: u64,
    /// The Ed25519 public key.
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
}

/// What a full verification of the log checked (`Store::verify_audit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Number of leaves, all decoded and hashed.
    pub leaves: u64,
    /// Number of stored nodes recomputed and compared.
    pub nodes: u64,
    /// Number of signed heads whose signature and root were checked.
    pub heads: u64,
    /// The recomputed root of the whole log.
    #[serde(with = "hex32")]
    pub root: Hash,
    /// The audit public key that signs new heads (the last of `keys`).
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
    /// Every key that has signed heads, oldest first; more than one after a rotation.
    pub keys: Vec<AuditKey>,
    /// The stored head of the largest size, if any.
    pub latest_head: Option<SignedTreeHead>,
}

/// A storage failure under the audit log. Corruption and failed authentication keep their
/// kind (a tampered audit page is `Corrupted`, like any other); the rest says where it was.
fn storage(e: impl Into<Error>) -> Error {
    match e.into() {
        Error::Storage(message) => Error::Storage(format!("audit log: {message}")),
        other => other,
    }
}

fn fail(msg: impl Into<String>) -> Error {
    Error::AuditVerification(msg.into())
}

fn open_err(name: &str, e: redb::TableError) -> Error {
    match e {
        redb::TableError::TableDoesNotExist(_) => fail(format!(
            "audit table {name} is missing: the audit log was removed or never initialized"
        )),
        e => storage(e),
    }
}

/// A transaction the audit log can be read through: redb's read or write transaction.
pub(crate) trait AuditTxn {
    /// The opened leaves table.
    type Leaves<'t>: ReadableTable<u64, &'static [u8]>
    where
        Self: 't;
    /// The opened nodes table.
    type Nodes<'t>: ReadableTable<(u8, u64), [u8; 32]>
    where
        Self: 't;
    /// The opened heads table.
    type Heads<'t>: ReadableTable<u64, &'static [u8]>
    where
        Self: 't;
    /// The opened metadata table.
    type Meta<'t>: ReadableTable<&'static str, &'static [u8]>
    where
        Self: 't;

    /// Opens `audit_leaf_chunks`.
    fn leaves(&self) -> Result<Self::Leaves<'_>>;
    /// Opens `audit_nodes`.
    fn nodes(&self) -> Result<Self::Nodes<'_>>;
    /// Opens `audit_heads`.
    fn heads(&self) -> Result<Self::Heads<'_>>;
    /// Opens `audit_meta`.
    fn meta(&self) -> Result<Self::Meta<'_>>;
}

impl AuditTxn for ReadTransaction {
    type Leaves<'t> = redb::ReadOnlyTable<u64, &'static [u8]>;
    type Nodes<'t> = redb::ReadOnlyTable<(u8, u64), [u8; 32]>;
    type Heads<'t> = redb::ReadOnlyTable<u64, &'static [u8]>;
    type Meta<'t> = redb::ReadOnlyTable<&'static str, &'static [u8]>;

    fn leaves(&self) -> Result<Self::Leaves<'_>> {
        self.open_table(LEAVES)
            .map_err(|e| open_err("audit_leaf_chunks", e))
    }
    fn nodes(&self) -> Result<Self::Nodes<'_>> {
        self.open_table(NODES)
            .map_err(|e| open_err("audit_nodes", e))
    }
    fn heads(&self) -> Result<Self::Heads<'_>> {
        self.open_table(HEADS)
            .map_err(|e| open_err("audit_heads", e))
    }
    fn meta(&self) -> Result<Self::Meta<'_>> {
        self.open_table(META).map_err(|e| open_err("audit_meta", e))
    }
}

impl AuditTxn for WriteTransaction {
    type Leaves<'t> = redb::Table<'t, u64, &'static [u8]>;
    type Nodes<'t> = redb::Table<'t, (u8, u64), [u8; 32]>;
    type Heads<'t> = redb::Table<'t, u64, &'static [u8]>;
    type Meta<'t> = redb::Table<'t, &'static str, &'static [u8]>;

    fn leaves(&self) -> Result<Self::Leaves<'_>> {
        self.open_table(LEAVES)
            .map_err(|e| open_err("audit_leaf_chunks", e))
    }
    fn nodes(&self) -> Result<Self::Nodes<'_>> {
        self.open_table(NODES)
            .map_err(|e| open_err("audit_nodes", e))
    }
    fn heads(&self) -> Result<Self::Heads<'_>> {
        self.open_table(HEADS)
            .map_err(|e| open_err("audit_heads", e))
    }
    fn meta(&self) -> Result<Self::Meta<'_>> {
        self.open_table(META).map_err(|e| open_err("audit_meta", e))
    }
}

/// The lowest level of Merkle node kept in `audit_nodes`. Why not every level: a node per
/// leaf (levels 1 and up) was one more B-tree insert per audited read and half the table's
/// bytes; a node below this level costs at most 8 leaf reads and 7 hashes to recompute.
pub(crate) const FIRST_STORED_LEVEL: u8 = 4;

/// Stored nodes read through an opened nodes table.
/// Complete-subtree hashes: level 0 is hashed from the leaf itself (so it is never stored
/// twice); levels below [`FIRST_STORED_LEVEL`] are hashed from their leaves; higher levels
/// come from the `audit_nodes` table.
struct TableNodes<'a, L, N> {
    leaves: &'a L,
    nodes: &'a N,
}

impl<L, N> NodeSource for TableNodes<'_, L, N>
where
    L: ReadableTable<u64, &'static [u8]>,
    N: ReadableTable<(u8, u64), [u8; 32]>,
{
    fn node(&self, level: u8, index: u64) -> Result<Hash> {
        if level == 0 {
            return match leaf_bytes(self.leaves, index)? {
                Some(leaf) => Ok(leaf_hash(&leaf)),
                None => Err(Error::Corrupted(format!("audit leaf {index} is missing"))),
            };
        }
        if level < FIRST_STORED_LEVEL {
            return subtree_from_leaves(self.leaves, level, index);
        }
        match self.nodes.get((level, index)).map_err(storage)? {
            Some(h) => Ok(h.value()),
            None => Err(Error::Corrupted(format!(
                "audit node (level {level}, index {index}) is missing"
            ))),
        }
    }
}

/// The hash of the complete subtree `(level, index)`, from its `2^level` leaves.
fn subtree_from_leaves<L: ReadableTable<u64, &'static [u8]>>(
    leaves: &L,
    level: u8,
    index: u64,
) -> Result<Hash> {
    let width = 1u64 << level;
    let start = index.checked_mul(width).ok_or_else(|| {
        Error::Corrupted(format!(
            "audit node (level {level}, index {index}) is out of range"
        ))
    })?;
    // Level-by-level pairing of the leaf hashes, in place.
    let mut hashes: Vec<Hash> = Vec::with_capacity(width as usize);
    for_each_leaf(leaves, start, |_, bytes| {
        hashes.push(leaf_hash(bytes));
        Ok(if hashes.len() as u64 == width {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    if hashes.len() as u64 != width {
        return Err(Error::Corrupted(format!(
            "audit leaf {} is missing",
            start + hashes.len() as u64
        )));
    }
    while hashes.len() > 1 {
        let pairs = hashes.len() / 2;
        for i in 0..pairs {
            hashes[i] = node_hash(&hashes[2 * i], &hashes[2 * i + 1]);
        }
        hashes.truncate(pairs);
    }
    Ok(hashes[0])
}

/// Stores the nodes of levels 1 to 3, as logs written before [`FIRST_STORED_LEVEL`] did
/// (tests of old logs). Returns how many it stored.
#[cfg(test)]
pub(crate) fn store_lower_levels(txn: &WriteTransaction) -> Result<u64> {
    let leaves = txn.open_table(LEAVES).map_err(storage)?;
    let mut nodes = txn.open_table(NODES).map_err(storage)?;
    let count = leaf_count(&leaves)?;
    let mut stored = 0;
    for level in 1..FIRST_STORED_LEVEL {
        for index in 0..(count >> level) {
            let hash = subtree_from_leaves(&leaves, level, index)?;
            nodes.insert((level, index), hash).map_err(storage)?;
            stored += 1;
        }
    }
    Ok(stored)
}

/// Number of leaves: the rows before the last one are full.
fn leaf_count<T: ReadableTable<u64, &'static [u8]>>(leaves: &T) -> Result<u64> {
    match leaves.last().map_err(storage)? {
        None => Ok(0),
        Some((k, v)) => {
            let row = k.value();
            let in_row = row_leaves(row, v.value())?.len() as u64;
            row.checked_mul(LEAVES_PER_ROW)
                .and_then(|first| first.checked_add(in_row))
                .ok_or_else(|| Error::Corrupted("audit log is full".to_owned()))
        }
    }
}

/// Splits row `row` of [`LEAVES`] into its leaves' bytes.
fn row_leaves(row: u64, bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let damaged = || {
        fail(format!(
            "audit leaf row {row} is damaged and cannot be split"
        ))
    };
    let mut leaves = Vec::with_capacity(LEAVES_PER_ROW as usize);
    let mut rest = bytes;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(damaged)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| damaged())?;
        if tail.len() < len {
            return Err(damaged());
        }
        let (leaf, tail) = tail.split_at(len);
        leaves.push(leaf);
        rest = tail;
    }
    if leaves.is_empty() || leaves.len() as u64 > LEAVES_PER_ROW {
        return Err(damaged());
    }
    Ok(leaves)
}

/// Writes leaves in order into rows of [`LEAVES`], from leaf `next`: a row is written when it
/// is full and by [`RowWriter::finish`]. Until then the table keeps what it held.
struct RowWriter {
    next: u64,
    row: Vec<u8>,
}

impl RowWriter {
    /// Continues the log at leaf `next`, taking up the stored last row if it is not full.
    fn resume<T: ReadableTable<u64, &'static [u8]>>(leaves: &T, next: u64) -> Result<Self> {
        let row = match next % LEAVES_PER_ROW {
            0 => Vec::new(),
            _ => {
                let index = next / LEAVES_PER_ROW;
                leaves
                    .get(index)
                    .map_err(storage)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| fail(format!("audit leaf row {index} is missing")))?
            }
        };
        Ok(RowWriter { next, row })
    }

    fn push(
        &mut self,
        leaves: &mut redb::Table<'_, u64, &'static [u8]>,
        leaf: &[u8],
    ) -> Result<()> {
        let len = u32::try_from(leaf.len()).map_err(|_| fail("an audit leaf is too long"))?;
        self.row.extend_from_slice(&len.to_le_bytes());
        self.row.extend_from_slice(leaf);
        self.next += 1;
        if self.next.is_multiple_of(LEAVES_PER_ROW) {
            self.write(leaves)?;
            self.row.clear();
        }
        Ok(())
    }

    /// Writes the last row if it is not full (a full one is already written).
    fn finish(self, leaves: &mut redb::Table<'_, u64, &'static [u8]>) -> Result<()> {
        if self.row.is_empty() {
            return Ok(());
        }
        self.write(leaves)
    }

    fn write(&self, leaves: &mut redb::Table<'_, u64, &'static [u8]>) -> Result<()> {
        let index = (self.next - 1) / LEAVES_PER_ROW;
        leaves.insert(index, self.row.as_slice()).map_err(storage)?;
        Ok(())
    }
}

/// The bytes of leaf `seq`, if it is stored.
fn leaf_bytes<T: ReadableTable<u64, &'static [u8]>>(
    leaves: &T,
    seq: u64,
) -> Result<Option<Vec<u8>>> {
    let row = seq / LEAVES_PER_ROW;
    match leaves.get(row).map_err(storage)? {
        None => Ok(None),
        Some(v) => Ok(row_leaves(row, v.value())?
            .get((seq % LEAVES_PER_ROW) as usize)
            .map(|leaf| leaf.to_vec())),
    }
}

/// Calls `each` with every stored leaf from `from` on, in order, with the seq its position
/// gives it, until `each` breaks. A row missing, or one that is not full and not the last,
/// is a missing leaf (`Error::Corrupted`).
fn for_each_leaf<T: ReadableTable<u64, &'static [u8]>>(
    leaves: &T,
    from: u64,
    mut each: impl FnMut(u64, &[u8]) -> Result<ControlFlow<()>>,
) -> Result<()> {
    // Seq the next row must start at; a row that is not full ends the log.
    let mut expected = from - from % LEAVES_PER_ROW;
    let mut short_row = None;
    for entry in leaves.range(from / LEAVES_PER_ROW..).map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let first = k.value().saturating_mul(LEAVES_PER_ROW);
        if short_row.is_some() || first != expected {
            return Err(fail(format!(
                "audit leaf {expected} is missing (the next stored leaf is {first}): leaves were deleted"
            )));
        }
        let row = row_leaves(k.value(), v.value())?;
        if (row.len() as u64) < LEAVES_PER_ROW {
            short_row = Some(k.value());
        }
        for (seq, bytes) in (first..).zip(row) {
            expected = seq + 1;
            if seq >= from && each(seq, bytes)?.is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Moves the leaves of a log written one leaf to a row ([`LEGACY_LEAVES`]) into rows of
/// [`LEAVES_PER_ROW`], in key order, inside `txn`; does nothing for a log that has none.
/// A gap in the old table (leaves deleted) is closed up, not refused: every leaf carries its
/// own seq, so `verify` still reports the leaves that moved.
/// Computes [`TIME_BLOCKS`] from the leaves if they do not cover the log: for a log written
/// before the table existed (a new log starts with it empty), or appended to since by a
/// binary that did not know it (after a downgrade); such appends only ever leave the last
/// blocks short, which is what is looked at.
fn build_time_blocks_if_missing(txn: &WriteTransaction) -> Result<()> {
    let exists = txn
        .list_tables()
        .map_err(storage)?
        .any(|table| redb::TableHandle::name(&table) == redb::TableHandle::name(&TIME_BLOCKS));
    if exists && time_blocks_cover_the_log(txn)? {
        return Ok(());
    }
    txn.delete_table(TIME_BLOCKS).map_err(storage)?;
    // A log whose leaves cannot be read back in order is damaged: opening it must still work,
    // for `check` to report it. Without rows its searches by time read it leaf by leaf.
    let blocks =
        time_blocks_of_leaves(&txn.open_table(LEAVES).map_err(storage)?).unwrap_or_default();
    let mut time_blocks = txn.open_table(TIME_BLOCKS).map_err(storage)?;
    for (block, range) in blocks {
        time_blocks
            .insert(block, encode_time_block(range))
            .map_err(storage)?;
    }
    Ok(())
}

/// Whether [`TIME_BLOCKS`] has a row for every block, the last one covering all its leaves.
fn time_blocks_cover_the_log(txn: &WriteTransaction) -> Result<bool> {
    let size = leaf_count(&txn.open_table(LEAVES).map_err(storage)?)?;
    let blocks = size.div_ceil(LEAVES_PER_TIME_BLOCK);
    let time_blocks = txn.open_table(TIME_BLOCKS).map_err(storage)?;
    if time_blocks.len().map_err(storage)? != blocks {
        return Ok(false);
    }
    let Some(last) = blocks.checked_sub(1) else {
        return Ok(true);
    };
    Ok(match time_blocks.get(last).map_err(storage)? {
        Some(row) => decode_time_block(&row.value()).2 == size - last * LEAVES_PER_TIME_BLOCK,
        None => false,
    })
}

/// Each block's time range, computed from the leaves: (block, (earliest, latest, leaves)).
fn time_blocks_of_leaves(
    leaves: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<Vec<(u64, TimeRange)>> {
    let mut blocks: Vec<(u64, TimeRange)> = Vec::new();
    for_each_leaf(leaves, 0, |seq, bytes| {
        let time = decode_leaf_at(seq, bytes)?.record.time_micros;
        let block = seq / LEAVES_PER_TIME_BLOCK;
        if blocks.last().is_none_or(|(at, _)| *at != block) {
            blocks.push((block, (time, time, 0)));
        }
        if let Some((_, range)) = blocks.last_mut() {
            widen(range, time);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(blocks)
}

/// Checks [`TIME_BLOCKS`] against the leaves: one row per block, each with its leaves' exact
/// time range. Returns the number of blocks checked. A wrong row would hide leaves from
/// searches by time (it cannot change a leaf: those are checked by [`verify_log`]).
pub(crate) fn verify_time_blocks(txn: &ReadTransaction) -> Result<u64> {
    let expected = time_blocks_of_leaves(&txn.open_table(LEAVES).map_err(storage)?)?;
    let stored = txn.open_table(TIME_BLOCKS).map_err(storage)?;
    if stored.len().map_err(storage)? != expected.len() as u64 {
        return Err(fail(format!(
            "the audit log has {} time blocks of leaves but {} stored ranges",
            expected.len(),
            stored.len().map_err(storage)?
        )));
    }
    for &(block, range) in &expected {
        let row = stored.get(block).map_err(storage)?.map(|row| row.value());
        if row != Some(encode_time_block(range)) {
            return Err(fail(format!(
                "the stored time range of audit leaves {}.. does not match the leaves",
                block * LEAVES_PER_TIME_BLOCK
            )));
        }
    }
    Ok(expected.len() as u64)
}

fn move_legacy_leaves(txn: &WriteTransaction) -> Result<()> {
    let legacy_exists = txn
        .list_tables()
        .map_err(storage)?
        .any(|table| redb::TableHandle::name(&table) == "audit_leaves");
    if !legacy_exists {
        return Ok(());
    }
    {
        let legacy = txn.open_table(LEGACY_LEAVES).map_err(storage)?;
        let mut leaves = txn.open_table(LEAVES).map_err(storage)?;
        if !legacy.is_empty().map_err(storage)? && !leaves.is_empty().map_err(storage)? {
            return Err(fail(
                "the audit log holds leaves in both the old and the new table",
            ));
        }
        let mut rows = RowWriter::resume(&leaves, 0)?;
        for entry in legacy.range(0u64..).map_err(storage)? {
            let (_, v) = entry.map_err(storage)?;
            rows.push(&mut leaves, v.value())?;
        }
        rows.finish(&mut leaves)?;
    }
    txn.delete_table(LEGACY_LEAVES).map_err(storage)?;
    Ok(())
}

/// Every stored leaf's bytes, in order (tests).
#[cfg(test)]
fn all_leaves_for_tests(txn: &WriteTransaction) -> Vec<Vec<u8>> {
    let leaves = txn.open_table(LEAVES).unwrap();
    let mut all = Vec::new();
    for entry in leaves.range(0u64..).unwrap() {
        let (k, v) = entry.unwrap();
        let row = row_leaves(k.value(), v.value()).unwrap();
        all.extend(row.into_iter().map(<[u8]>::to_vec));
    }
    all
}

/// Rewrites the leaf rows from the list of leaves `edit` leaves behind, as someone holding
/// the key could (tamper tests).
#[cfg(test)]
pub(crate) fn rewrite_leaves_for_tests(
    txn: &WriteTransaction,
    edit: impl FnOnce(&mut Vec<Vec<u8>>),
) {
    let mut all = all_leaves_for_tests(txn);
    edit(&mut all);
    txn.delete_table(LEAVES).unwrap();
    let mut leaves = txn.open_table(LEAVES).unwrap();
    let mut rows = RowWriter::resume(&leaves, 0).unwrap();
    for leaf in &all {
        rows.push(&mut leaves, leaf).unwrap();
    }
    rows.finish(&mut leaves).unwrap();
}

/// Moves the leaves back to one per row in [`LEGACY_LEAVES`], as logs were written before
/// rows of leaves (migration tests).
#[cfg(test)]
pub(crate) fn legacy_layout_for_tests(txn: &WriteTransaction) {
    let all = all_leaves_for_tests(txn);
    txn.delete_table(LEAVES).unwrap();
    let mut legacy = txn.open_table(LEGACY_LEAVES).unwrap();
    for (seq, leaf) in (0u64..).zip(&all) {
        legacy.insert(seq, leaf.as_slice()).unwrap();
    }
}

/// Creates the audit tables and a fresh signing key if they do not exist yet.
pub(crate) fn initialize(txn: &WriteTransaction) -> Result<()> {
    move_legacy_leaves(txn)?;
    build_time_blocks_if_missing(txn)?;
    txn.open_table(LEAVES).map_err(storage)?;
    txn.open_table(NODES).map_err(storage)?;
    txn.open_table(HEADS).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    if meta.get(SIGNING_KEY).map_err(storage)?.is_none() {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| {
            Error::Storage(format!(
                "audit log: cannot get random bytes for the signing key: {e}"
            ))
        })?;
        meta.insert(SIGNING_KEY, seed.as_slice()).map_err(storage)?;
    }
    Ok(())
}

/// Appends `record` as the next leaf; returns its seq.
///
/// Call it inside the write transaction of the operation it records, with no audit table open.
#[cfg(test)]
pub(crate) fn append(txn: &WriteTransaction, record: AuditRecord) -> Result<u64> {
    let mut last = None;
    append_many(txn, std::iter::once(record), |seq| last = Some(seq))?;
    last.ok_or_else(|| fail("no leaf was appended".to_owned()))
}

/// Appends several records in order, opening the audit tables once; `on_seq` sees each seq.
///
/// Call it inside the write transaction of the operations it records, with no audit table open.
pub(crate) fn append_many(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = impl std::borrow::Borrow<AuditRecord>>,
    mut on_seq: impl FnMut(u64),
) -> Result<()> {
    let mut leaves = txn.open_table(LEAVES).map_err(storage)?;
    let mut nodes = txn.open_table(NODES).map_err(storage)?;
    let first = leaf_count(&leaves)?;
    // Until a row is written the table still holds its earlier leaves; this batch's leaves
    // are read from `produced`.
    let mut rows = RowWriter::resume(&leaves, first)?;
    // This batch's time range per block: (earliest, latest, leaves).
    let mut blocks: std::collections::BTreeMap<u64, TimeRange> = std::collections::BTreeMap::new();
    // The right edge of the nodes produced in this batch (level 0 included): appending reads
    // its left siblings, which are mostly from this batch, so they come from memory instead
    // of being re-read (and, for level 0, re-hashed). It holds O(log n) nodes.
    let mut produced: std::collections::HashMap<(u8, u64), Hash> = std::collections::HashMap::new();
    for (seq, record) in (first..).zip(records) {
        let record = record.borrow();
        record.check_limits()?;
        let bytes = encode_leaf(seq, record);
        let source = BatchNodes {
            produced: &produced,
            stored: TableNodes {
                leaves: &leaves,
                nodes: &nodes,
            },
        };
        let new_nodes = nodes_to_store_on_append(seq, leaf_hash(&bytes), &source)?;
        rows.push(&mut leaves, &bytes)?;
        let time = record.time_micros;
        widen(
            blocks
                .entry(seq / LEAVES_PER_TIME_BLOCK)
                .or_insert((time, time, 0)),
            time,
        );
        for (level, index, hash) in new_nodes {
            if level > 0 {
                if level >= FIRST_STORED_LEVEL {
                    nodes.insert((level, index), hash).map_err(storage)?;
                }
                // Its children are never a left sibling again: keep only the right edge.
                produced.remove(&(level - 1, 2 * index));
                produced.remove(&(level - 1, 2 * index + 1));
            }
            produced.insert((level, index), hash);
        }
        on_seq(seq);
    }
    rows.finish(&mut leaves)?;
    let mut time_blocks = txn.open_table(TIME_BLOCKS).map_err(storage)?;
    for (block, (earliest, latest, added)) in blocks {
        let merged = match time_blocks.get(block).map_err(storage)? {
            Some(row) => {
                let (old_earliest, old_latest, covered) = decode_time_block(&row.value());
                (
                    earliest.min(old_earliest),
                    latest.max(old_latest),
                    covered + added,
                )
            }
            None => (earliest, latest, added),
        };
        time_blocks
            .insert(block, encode_time_block(merged))
            .map_err(storage)?;
    }
    Ok(())
}

/// Takes one more leaf, of time `time`, into `range`.
fn widen(range: &mut TimeRange, time: i64) {
    range.0 = range.0.min(time);
    range.1 = range.1.max(time);
    range.2 += 1;
}

fn encode_time_block((earliest, latest, covered): TimeRange) -> [u8; 24] {
    let mut row = [0u8; 24];
    row[..8].copy_from_slice(&earliest.to_le_bytes());
    row[8..16].copy_from_slice(&latest.to_le_bytes());
    row[16..].copy_from_slice(&covered.to_le_bytes());
    row
}

fn decode_time_block(row: &[u8; 24]) -> TimeRange {
    let field = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&row[at..at + 8]);
        bytes
    };
    (
        i64::from_le_bytes(field(0)),
        i64::from_le_bytes(field(8)),
        u64::from_le_bytes(field(16)),
    )
}

/// Up to `count` leaves from seq `from` on whose time is within `times`, in log order, and
/// the seq to continue from if there are more. Blocks whose recorded time range misses
/// `times` are skipped unread.
pub(crate) fn leaves_in_time_range(
    txn: &ReadTransaction,
    times: std::ops::RangeInclusive<i64>,
    from: u64,
    count: usize,
) -> Result<(Vec<AuditLeaf>, Option<u64>)> {
    let size = self::size(txn)?;
    let time_blocks = match txn.open_table(TIME_BLOCKS) {
        Ok(table) => Some(table),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage(e)),
    };
    let leaves = txn.leaves()?;
    let mut found = Vec::new();
    let mut seq = from;
    while seq < size {
        let block = seq / LEAVES_PER_TIME_BLOCK;
        let block_start = block * LEAVES_PER_TIME_BLOCK;
        let block_end = size.min(block_start + LEAVES_PER_TIME_BLOCK);
        if let Some(table) = &time_blocks
            && let Some(row) = table.get(block).map_err(storage)?
        {
            let (earliest, latest, covered) = decode_time_block(&row.value());
            let whole = covered == block_end - block_start;
            if whole && (latest < *times.start() || earliest > *times.end()) {
                seq = block_end;
                continue;
            }
        }
        let mut next = None;
        for_each_leaf(&leaves, seq, |at, bytes| {
            if at >= block_end {
                return Ok(ControlFlow::Break(()));
            }
            let leaf = decode_leaf_at(at, bytes)?;
            if times.contains(&leaf.record.time_micros) {
                if found.len() == count {
                    next = Some(at);
                    return Ok(ControlFlow::Break(()));
                }
                found.push(leaf);
            }
            Ok(ControlFlow::Continue(()))
        })?;
        if next.is_some() {
            return Ok((found, next));
        }
        seq = block_end;
    }
    Ok((found, None))
}

/// Stored nodes, preferring those produced earlier in the same batch.
struct BatchNodes<'a, L, N> {
    produced: &'a std::collections::HashMap<(u8, u64), Hash>,
    stored: TableNodes<'a, L, N>,
}

impl<L, N> NodeSource for BatchNodes<'_, L, N>
where
    L: ReadableTable<u64, &'static [u8]>,
    N: ReadableTable<(u8, u64), [u8; 32]>,
{
    fn node(&self, level: u8, index: u64) -> Result<Hash> {
        match self.produced.get(&(level, index)) {
            Some(hash) => Ok(*hash),
            None => self.stored.node(level, index),
        }
    }
}

/// Loads the signing key (the seed is zeroized when dropped; `SigningKey` zeroizes itself).
fn signing_key<M: ReadableTable<&'static str, &'static [u8]>>(meta: &M) -> Result<SigningKey> {
    let guard = meta
        .get(SIGNING_KEY)
        .map_err(storage)?
        .ok_or_else(|| Error::Corrupted("the audit signing key is missing".to_owned()))?;
    let mut seed = Zeroizing::new([0u8; 32]);
    let stored = guard.value();
    if stored.len() != 32 {
        return Err(Error::Corrupted(
            "the audit signing key is damaged".to_owned(),
        ));
    }
    seed.copy_from_slice(stored);
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs the current size and root and stores the head; if a head of this size is already
/// stored, returns it instead.
pub(crate) fn sign_head(txn: &WriteTransaction, time_micros: i64) -> Result<SignedTreeHead> {
    let (size, current_root) = {
        let leaves = txn.open_table(LEAVES).map_err(storage)?;
        let nodes = txn.open_table(NODES).map_err(storage)?;
        let size = leaf_count(&leaves)?;
        let source = TableNodes {
            leaves: &leaves,
            nodes: &nodes,
        };
        (size, root(size, &source)?)
    };
    let mut heads = txn.open_table(HEADS).map_err(storage)?;
    if let Some(stored) = heads.get(size).map_err(storage)? {
        let head = SignedTreeHead::decode(stored.value())?;
        if head.size != size || head.root != current_root {
            return Err(fail(format!(
                "the stored tree head of size {size} does not match the log"
            )));
        }
        return Ok(head);
    }
    let key = {
        let meta = txn.open_table(META).map_err(storage)?;
        signing_key(&meta)?
    };
    let head = SignedTreeHead::sign(&key, size, current_root, time_micros);
    heads
        .insert(size, head.encode().as_slice())
        .map_err(storage)?;
    Ok(head)
}

/// Number of leaves in the log.
pub(crate) fn size(txn: &impl AuditTxn) -> Result<u64> {
    leaf_count(&txn.leaves()?)
}

/// The root of the first `size` leaves, from stored nodes.
#[cfg(test)]
pub(crate) fn root_at(txn: &impl AuditTxn, size: u64) -> Result<Hash> {
    let n = self::size(txn)?;
    if size > n {
        return Err(Error::InvalidProofRequest(format!(
            "tree size {size} is larger than the log's {n} leaves"
        )));
    }
    root(
        size,
        &TableNodes {
            leaves: &txn.leaves()?,
            nodes: &txn.nodes()?,
        },
    )
}

/// The stored head of the largest size, if any.
pub(crate) fn latest_head(txn: &impl AuditTxn) -> Result<Option<SignedTreeHead>> {
    match txn.heads()?.last().map_err(storage)? {
        None => Ok(None),
        Some((_, v)) => SignedTreeHead::decode(v.value()).map(Some),
    }
}

/// The stored head of exactly `size` leaves, if one was signed.
pub(crate) fn head_at(txn: &impl AuditTxn, size: u64) -> Result<Option<SignedTreeHead>> {
    match txn.heads()?.get(size).map_err(storage)? {
        None => Ok(None),
        Some(v) => SignedTreeHead::decode(v.value()).map(Some),
    }
}

/// The leaf with this seq, if it exists.
pub(crate) fn leaf(txn: &impl AuditTxn, seq: u64) -> Result<Option<AuditLeaf>> {
    match leaf_bytes(&txn.leaves()?, seq)? {
        None => Ok(None),
        Some(bytes) => decode_leaf_at(seq, &bytes).map(Some),
    }
}

/// The leaf stored at `seq`, which must say so.
fn decode_leaf_at(seq: u64, bytes: &[u8]) -> Result<AuditLeaf> {
    let leaf = AuditLeaf::decode(bytes)?;
    if leaf.seq != seq {
        return Err(Error::Corrupted(format!(
            "audit leaf stored at {seq} claims seq {}",
            leaf.seq
        )));
    }
    Ok(leaf)
}

/// Proof that leaf `seq` is in the tree of `size` leaves; its leaf hash is computed from the
/// stored leaf bytes.
pub(crate) fn prove_inclusion(txn: &impl AuditTxn, seq: u64, size: u64) -> Result<InclusionProof> {
    let leaves = txn.leaves()?;
    let n = leaf_count(&leaves)?;
    if size > n {
        return Err(Error::InvalidProofRequest(format!(
            "tree size {size} is larger than the log's {n} leaves"
        )));
    }
    if seq >= size {
        return Err(Error::InvalidProofRequest(format!(
            "leaf {seq} is not in a tree of {size} leaves"
        )));
    }
    let leaf_hash = match leaf_bytes(&leaves, seq)? {
        Some(bytes) => leaf_hash(&bytes),
        None => return Err(Error::Corrupted(format!("audit leaf {seq} is missing"))),
    };
    let path = inclusion_proof(
        seq,
        size,
        &TableNodes {
            leaves: &leaves,
            nodes: &txn.nodes()?,
        },
    )?;
    Ok(InclusionProof {
        leaf_index: seq,
        tree_size: size,
        leaf_hash,
        path,
    })
}

/// Proof that the tree of `old` leaves is a prefix of the tree of `new` leaves.
pub(crate) fn prove_consistency(
    txn: &impl AuditTxn,
    old: u64,
    new: u64,
) -> Result<ConsistencyProof> {
    let n = size(txn)?;
    if new > n {
        return Err(Error::InvalidProofRequest(format!(
            "tree size {new} is larger than the log's {n} leaves"
        )));
    }
    let path = consistency_proof(
        old,
        new,
        &TableNodes {
            leaves: &txn.leaves()?,
            nodes: &txn.nodes()?,
        },
    )?;
    Ok(ConsistencyProof {
        old_size: old,
        new_size: new,
        path,
    })
}

/// The Ed25519 public key that signs this log's heads.
pub(crate) fn public_key(txn: &impl AuditTxn) -> Result<[u8; 32]> {
    Ok(signing_key(&txn.meta()?)?.verifying_key().to_bytes())
}

/// The signing-key schedule: every key that has signed heads, oldest first.
pub(crate) fn key_schedule(txn: &impl AuditTxn) -> Result<Vec<AuditKey>> {
    schedule_of(&txn.meta()?)
}

fn schedule_of<M: ReadableTable<&'static str, &'static [u8]>>(meta: &M) -> Result<Vec<AuditKey>> {
    let current = signing_key(meta)?.verifying_key().to_bytes();
    let Some(stored) = meta.get(KEY_SCHEDULE).map_err(storage)? else {
        return Ok(vec![AuditKey {
            first_size: 0,
            public_key: current,
        }]);
    };
    let bytes = stored.value();
    let damaged = || Error::Corrupted("the audit signing-key schedule is damaged".to_owned());
    if bytes.is_empty() || bytes.len() % 40 != 0 {
        return Err(damaged());
    }
    let mut schedule: Vec<AuditKey> = Vec::with_capacity(bytes.len() / 40);
    for entry in bytes.chunks_exact(40) {
        let (size, key) = entry.split_at(8);
        let first_size = u64::from_le_bytes(size.try_into().map_err(|_| damaged())?);
        let public_key: [u8; 32] = key.try_into().map_err(|_| damaged())?;
        let in_order = match schedule.last() {
            None => first_size == 0,
            Some(previous) => first_size > previous.first_size,
        };
        if !in_order {
            return Err(damaged());
        }
        schedule.push(AuditKey {
            first_size,
            public_key,
        });
    }
    if schedule.last().map(|k| k.public_key) != Some(current) {
        return Err(fail(
            "the audit signing key is not the last key of its schedule",
        ));
    }
    Ok(schedule)
}

/// The key that signs the head of `size` leaves, per `schedule`.
fn key_for_size(schedule: &[AuditKey], size: u64) -> Option<&AuditKey> {
    schedule.iter().rev().find(|k| k.first_size <= size)
}

/// Replaces the signing key, in `txn`: appends a leaf naming the new public key (`record`,
/// its action and content hash set here), signs a head over it with the old key, then makes
/// the new key the one that signs every later head. Returns that last head of the old key:
/// whoever trusts the old key can follow the log to the new one from it.
pub(crate) fn rotate_signing_key(
    txn: &WriteTransaction,
    mut record: AuditRecord,
    time_micros: i64,
) -> Result<SignedTreeHead> {
    let mut schedule = schedule_of(&txn.open_table(META).map_err(storage)?)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|e| {
        Error::Storage(format!(
            "audit log: cannot get random bytes for the signing key: {e}"
        ))
    })?;
    let new_public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    record.action = AuditAction::AuditKeyRotation;
    record.content_hash = Some(new_public);
    record.query_hash = None;
    append_many(txn, std::iter::once(&record), |_| {})?;
    let head = sign_head(txn, time_micros)?;
    schedule.push(AuditKey {
        first_size: head.size + 1,
        public_key: new_public,
    });
    let encoded: Vec<u8> = schedule
        .iter()
        .flat_map(|k| k.first_size.to_le_bytes().into_iter().chain(k.public_key))
        .collect();
    let mut meta = txn.open_table(META).map_err(storage)?;
    meta.insert(KEY_SCHEDULE, encoded.as_slice())
        .map_err(storage)?;
    meta.insert(SIGNING_KEY, seed.as_slice()).map_err(storage)?;
    Ok(head)
}

/// Checks that each rotation of `schedule` is on record: the leaf just below the size where
/// the new key starts names that key, and the old key signed a head over it.
fn check_rotations(txn: &impl AuditTxn, schedule: &[AuditKey]) -> Result<()> {
    for pair in schedule.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let rotated_at = new.first_size - 1;
        let named = rotated_at
            .checked_sub(1)
            .map(|seq| leaf(txn, seq))
            .transpose()?
            .flatten()
            .is_some_and(|leaf| {
                leaf.record.action == AuditAction::AuditKeyRotation
                    && leaf.record.content_hash == Some(new.public_key)
            });
        if !named {
            return Err(fail(format!(
                "no audit leaf records the rotation to the signing key that starts at size {}",
                new.first_size
            )));
        }
        match head_at(txn, rotated_at)? {
            Some(head) if head.public_key == old.public_key => {}
            _ => {
                return Err(fail(format!(
                    "the rotation at size {rotated_at} has no head signed by the key before it"
                )));
            }
        }
    }
    Ok(())
}

/// The right edge of a tree being rebuilt from its leaves: the complete subtrees that make up
/// the first `n` leaves, largest first.
#[derive(Default)]
struct Frontier {
    stack: Vec<(u8, Hash)>,
    n: u64,
}

impl Frontier {
    /// Adds the next leaf; returns the nodes this completes, as `nodes_to_store_on_append` does.
    fn push(&mut self, leaf: Hash, out: &mut Vec<(u8, u64, Hash)>) {
        out.clear();
        let mut hash = leaf;
        let mut level = 0u8;
        let mut index = self.n;
        out.push((0, index, hash));
        while index & 1 == 1 {
            match self.stack.pop() {
                Some((_, left)) => hash = node_hash(&left, &hash),
                // Unreachable: an odd index always has a left sibling on the stack.
                None => break,
            }
            level += 1;
            index >>= 1;
            out.push((level, index, hash));
        }
        self.stack.push((level, hash));
        self.n += 1;
    }

    fn root(&self) -> Hash {
        let mut parts = self.stack.iter().rev();
        match parts.next() {
            None => empty_root(),
            Some(&(_, last)) => parts.fold(last, |acc, (_, left)| node_hash(left, &acc)),
        }
    }
}

/// Reads leaves `0..limit` (all if `None`) in order, checking that seqs are contiguous, that every
/// leaf decodes and carries its own seq, and calls `each` with the frontier after every leaf.
fn replay<L: ReadableTable<u64, &'static [u8]>>(
    leaves: &L,
    limit: Option<u64>,
    mut each: impl FnMut(&Frontier, &[(u8, u64, Hash)]) -> Result<()>,
) -> Result<Frontier> {
    let mut frontier = Frontier::default();
    let mut produced = Vec::with_capacity(65);
    if limit == Some(0) {
        return Ok(frontier);
    }
    for_each_leaf(leaves, 0, |key, bytes| {
        let leaf = AuditLeaf::decode(bytes)
            .map_err(|_| fail(format!("audit leaf {key} is damaged and cannot be decoded")))?;
        if leaf.seq != key {
            return Err(fail(format!(
                "audit leaf stored at {key} carries seq {}: leaves were moved or reordered",
                leaf.seq
            )));
        }
        frontier.push(leaf_hash(bytes), &mut produced);
        each(&frontier, &produced)?;
        Ok(if limit.is_some_and(|l| frontier.n >= l) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    Ok(frontier)
}

/// Checks one stored head: key/size agreement, signature, signing key, and root.
fn check_head(
    key: u64,
    bytes: &[u8],
    public_key: &[u8; 32],
    root: &Hash,
) -> Result<SignedTreeHead> {
    let head = SignedTreeHead::decode(bytes)
        .map_err(|_| fail(format!("the tree head of size {key} is damaged")))?;
    if head.size != key {
        return Err(fail(format!(
            "the tree head stored for size {key} claims size {}",
            head.size
        )));
    }
    head.verify_with_key(public_key)?;
    if &head.root != root {
        return Err(fail(format!(
            "the signed tree head of size {key} does not match the leaves: leaves below {key} were altered"
        )));
    }
    Ok(head)
}

/// Verifies the whole log from scratch: every leaf, every stored node, every signed head.
pub(crate) fn verify_log(txn: &impl AuditTxn) -> Result<VerifyReport> {
    let schedule = key_schedule(txn)?;
    // The schedule ends in the current key (`schedule_of` checks it).
    let public_key = public_key(txn)?;
    check_rotations(txn, &schedule)?;
    let leaves = txn.leaves()?;
    let nodes = txn.nodes()?;
    let heads_table = txn.heads()?;
    let mut heads = heads_table.range(0u64..).map_err(storage)?.peekable();
    let mut heads_checked = 0u64;
    let mut nodes_checked = 0u64;
    let mut latest_head = None;

    // Checks every stored head of size `n` against the frontier's root.
    let mut check_heads_at =
        |n: u64, root: &Hash, latest: &mut Option<SignedTreeHead>, count: &mut u64| -> Result<()> {
            while let Some(entry) = heads.peek() {
                let key = match entry {
                    Ok((k, _)) => k.value(),
                    Err(_) => {
                        // Take the error out of the iterator to keep its kind.
                        return Err(match heads.next() {
                            Some(Err(e)) => storage(e),
                            _ => Error::Storage("audit log: the heads table cannot be read".into()),
                        });
                    }
                };
                if key != n {
                    break;
                }
                if let Some(Ok((_, v))) = heads.next() {
                    let signer = key_for_size(&schedule, key).map_or(public_key, |k| k.public_key);
                    *latest = Some(check_head(key, v.value(), &signer, root)?);
                    *count += 1;
                }
            }
            Ok(())
        };

    check_heads_at(0, &empty_root(), &mut latest_head, &mut heads_checked)?;
    let frontier = replay(&leaves, None, |frontier, produced| {
        // Level 0 is the leaf itself; only higher levels are stored.
        for &(level, index, hash) in produced.iter().filter(|n| n.0 > 0) {
            match nodes.get((level, index)).map_err(storage)? {
                Some(stored) if stored.value() == hash => nodes_checked += 1,
                Some(_) => {
                    return Err(fail(format!(
                        "stored audit node (level {level}, index {index}) does not match the leaves"
                    )));
                }
                // Lower levels are recomputed, not stored (older logs stored them).
                None if level < FIRST_STORED_LEVEL => {}
                None => {
                    return Err(fail(format!(
                        "stored audit node (level {level}, index {index}) is missing"
                    )));
                }
            }
        }
        check_heads_at(
            frontier.n,
            &frontier.root(),
            &mut latest_head,
            &mut heads_checked,
        )
    })?;
    let n = frontier.n;
    if let Some(entry) = heads.next() {
        let (k, _) = entry.map_err(storage)?;
        return Err(fail(format!(
            "a signed tree head covers {} leaves but the log has only {n}: leaves were deleted",
            k.value()
        )));
    }
    let stored_nodes = nodes.len().map_err(storage)?;
    if stored_nodes != nodes_checked {
        return Err(fail(format!(
            "the log has {} stored audit nodes but its {n} leaves make {nodes_checked}",
            stored_nodes
        )));
    }
    // Every commit signs a head over everything it appended, so unsigned leaves at the end
    // were added outside the engine.
    let signed = latest_head.as_ref().map_or(0, |h| h.size);
    if n > signed {
        return Err(fail(format!(
            "leaves {signed}..{n} are not covered by any signed tree head: they were added outside the engine"
        )));
    }
    Ok(VerifyReport {
        leaves: n,
        nodes: nodes_checked,
        heads: heads_checked,
        root: frontier.root(),
        public_key,
        keys: schedule,
        latest_head,
    })
}

/// Checks the log against a head an auditor kept from earlier: the head must be signed by this
/// log's key, and the first `trusted.size` leaves (recomputed from their bytes) must still have
/// its root.
pub(crate) fn verify_against_trusted_head(
    txn: &impl AuditTxn,
    trusted: &SignedTreeHead,
) -> Result<()> {
    trusted.verify()?;
    let schedule = key_schedule(txn)?;
    if key_for_size(&schedule, trusted.size).map(|k| k.public_key) != Some(trusted.public_key) {
        return Err(fail(
            "the trusted tree head was signed by a different key than this log's audit key",
        ));
    }
    check_rotations(txn, &schedule)?;
    let leaves = txn.leaves()?;
    let frontier = replay(&leaves, Some(trusted.size), |_, _| Ok(()))?;
    if frontier.n < trusted.size {
        return Err(fail(format!(
            "the trusted tree head covers {} leaves but the log has only {}: leaves were removed or the database was rolled back",
            trusted.size, frontier.n
        )));
    }
    if frontier.root() != trusted.root {
        return Err(fail(format!(
            "the log's first {} leaves no longer match the trusted tree head: the log was rewritten",
            trusted.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::leaf::{AuditActor, AuditOutcome};
    use crate::audit::merkle::{verify_consistency, verify_inclusion};
    use redb::{Database, ReadableDatabase};

    fn record(i: u64) -> AuditRecord {
        AuditRecord {
            time_micros: 1_700_000_000_000_000 + i as i64,
            actor: AuditActor {
                subject: format!("user{}", i % 3),
                client: "test".into(),
                source: "local".into(),
            },
            request_id: format!("req-{i}"),
            action: if i.is_multiple_of(2) {
                AuditAction::Create
            } else {
                AuditAction::Read
            },
            resource_type: Some("Patient".into()),
            id: Some(format!("p{i}")),
            version: Some(1),
            outcome: AuditOutcome::Success,
            content_hash: Some([i as u8; 32]),
            query_hash: None,
        }
    }

    fn new_db() -> (tempfile::NamedTempFile, Database) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let db = Database::create(file.path()).unwrap();
        let txn = db.begin_write().unwrap();
        initialize(&txn).unwrap();
        txn.commit().unwrap();
        (file, db)
    }

    /// Appends leaves until the log has `count`, in batches of `batch`, signing a head after
    /// each batch.
    fn fill(db: &Database, count: u64, batch: u64) -> Vec<SignedTreeHead> {
        let mut heads = Vec::new();
        let mut i = size(&db.begin_read().unwrap()).unwrap();
        while i < count {
            let txn = db.begin_write().unwrap();
            for _ in 0..batch.min(count - i) {
                assert_eq!(append(&txn, record(i)).unwrap(), i);
                i += 1;
            }
            heads.push(sign_head(&txn, i as i64).unwrap());
            txn.commit().unwrap();
        }
        heads
    }

    fn write<R>(db: &Database, f: impl FnOnce(&WriteTransaction) -> R) -> R {
        let txn = db.begin_write().unwrap();
        let r = f(&txn);
        txn.commit().unwrap();
        r
    }

    /// Every page of a search by time, from `from`, in pages of `count`.
    fn all_in_time_range(
        db: &Database,
        times: std::ops::RangeInclusive<i64>,
        count: usize,
    ) -> Vec<u64> {
        let mut seqs = Vec::new();
        let mut from = Some(0);
        while let Some(start) = from {
            let txn = db.begin_read().unwrap();
            let (page, next) = leaves_in_time_range(&txn, times.clone(), start, count).unwrap();
            assert!(page.len() <= count);
            assert!(
                next.is_none() || page.len() == count,
                "a short page is the last"
            );
            seqs.extend(page.iter().map(|leaf| leaf.seq));
            from = next;
        }
        seqs
    }

    #[test]
    fn searches_by_time_skip_blocks_and_find_what_a_scan_finds() {
        let (_file, db) = new_db();
        // Times that go back and forth within a block and across blocks (as read leaves
        // join the log after later writes), in batches that straddle block boundaries.
        let time_of = |i: u64| (i as i64 * 7_919) % 10_007 + (i / 3_000) as i64 * 20_000;
        let total = 3 * LEAVES_PER_TIME_BLOCK + 200;
        let mut i = 0;
        while i < total {
            let batch = 300.min(total - i);
            write(&db, |txn| {
                let records: Vec<AuditRecord> = (i..i + batch)
                    .map(|j| AuditRecord {
                        time_micros: time_of(j),
                        ..record(j)
                    })
                    .collect();
                append_many(txn, &records, |_| {}).unwrap();
            });
            i += batch;
        }
        let scan = |times: &std::ops::RangeInclusive<i64>| -> Vec<u64> {
            (0..total)
                .filter(|&j| times.contains(&time_of(j)))
                .collect()
        };
        for times in [
            0..=i64::MAX,
            5_000..=5_100,
            20_000..=25_000,
            30_010..=30_010,
            -5..=-1,
        ] {
            for count in [1, 7, 1_000] {
                assert_eq!(all_in_time_range(&db, times.clone(), count), scan(&times));
            }
        }
        // Every block's range is exactly its leaves' (the last block, 200 leaves all at
        // 20,000 or later, is skipped for earlier times).
        let check_blocks = |db: &Database| {
            let txn = db.begin_read().unwrap();
            let blocks = txn.open_table(TIME_BLOCKS).unwrap();
            assert_eq!(blocks.len().unwrap(), 4);
            for block in 0..4 {
                let (earliest, latest, covered) =
                    decode_time_block(&blocks.get(block).unwrap().unwrap().value());
                let leaves =
                    block * LEAVES_PER_TIME_BLOCK..total.min((block + 1) * LEAVES_PER_TIME_BLOCK);
                assert_eq!(covered, leaves.end - leaves.start);
                assert_eq!(earliest, leaves.clone().map(time_of).min().unwrap());
                assert_eq!(latest, leaves.map(time_of).max().unwrap());
            }
        };
        check_blocks(&db);

        // A block whose range does not cover all its leaves (the table began mid-block, or
        // rows were lost) is read leaf by leaf: still every match, none missed.
        write(&db, |txn| {
            let mut blocks = txn.open_table(TIME_BLOCKS).unwrap();
            blocks.insert(1, encode_time_block((-10, -10, 5))).unwrap();
            blocks.remove(2).unwrap();
        });
        for times in [0..=i64::MAX, 5_000..=5_100, 20_000..=25_000] {
            assert_eq!(all_in_time_range(&db, times.clone(), 100), scan(&times));
        }
        // A log without the table at all (written before it existed) is still searched
        // whole; opening it builds the table from the leaves.
        write(&db, |txn| {
            txn.delete_table(TIME_BLOCKS).unwrap();
        });
        assert_eq!(
            all_in_time_range(&db, 5_000..=5_100, 3),
            scan(&(5_000..=5_100))
        );
        write(&db, |txn| initialize(txn).unwrap());
        check_blocks(&db);
        assert_eq!(verify_time_blocks(&db.begin_read().unwrap()).unwrap(), 4);
        // A damaged range is found by the check.
        write(&db, |txn| {
            let mut blocks = txn.open_table(TIME_BLOCKS).unwrap();
            let (earliest, latest, covered) =
                decode_time_block(&blocks.get(3).unwrap().unwrap().value());
            blocks
                .insert(3, encode_time_block((earliest + 1, latest, covered)))
                .unwrap();
        });
        assert!(verify_time_blocks(&db.begin_read().unwrap()).is_err());

        // A binary that did not know the table appended 1,000 more leaves (after a
        // downgrade): the next open finds the last blocks short and builds them again.
        write(&db, |txn| initialize(txn).unwrap());
        assert!(
            verify_time_blocks(&db.begin_read().unwrap()).is_err(),
            "a whole table is not rebuilt on open, even with a wrong range"
        );
        let before_downgrade: Vec<[u8; 24]> = {
            let txn = db.begin_read().unwrap();
            let blocks = txn.open_table(TIME_BLOCKS).unwrap();
            (0..4)
                .map(|b| blocks.get(b).unwrap().unwrap().value())
                .collect()
        };
        write(&db, |txn| {
            append_many(txn, (total..total + 1_000).map(record), |_| {}).unwrap();
            let mut blocks = txn.open_table(TIME_BLOCKS).unwrap();
            for (b, row) in before_downgrade.iter().enumerate() {
                blocks.insert(b as u64, row).unwrap();
            }
            blocks.remove(4).unwrap();
        });
        write(&db, |txn| initialize(txn).unwrap());
        assert_eq!(verify_time_blocks(&db.begin_read().unwrap()).unwrap(), 5);
        assert_eq!(
            all_in_time_range(&db, 5_000..=5_100, 3),
            scan(&(5_000..=5_100))
        );
    }

    #[test]
    fn empty_log() {
        let (_f, db) = new_db();
        let r = db.begin_read().unwrap();
        assert_eq!(size(&r).unwrap(), 0);
        assert_eq!(latest_head(&r).unwrap(), None);
        let report = verify_log(&r).unwrap();
        assert_eq!(report.leaves, 0);
        assert_eq!(report.root, empty_root());
        drop(r);
        let head = write(&db, |t| sign_head(t, 5).unwrap());
        assert_eq!(head.size, 0);
        assert_eq!(head.root, empty_root());
        head.verify().unwrap();
        let r = db.begin_read().unwrap();
        assert_eq!(verify_log(&r).unwrap().heads, 1);
    }

    #[test]
    fn initialize_is_idempotent_and_keeps_the_key() {
        let (_f, db) = new_db();
        let k1 = public_key(&db.begin_read().unwrap()).unwrap();
        write(&db, |t| initialize(t).unwrap());
        let k2 = public_key(&db.begin_read().unwrap()).unwrap();
        assert_eq!(k1, k2);
        let (_g, db2) = new_db();
        assert_ne!(k1, public_key(&db2.begin_read().unwrap()).unwrap());
    }

    #[test]
    fn uninitialized_read_is_an_error_not_a_panic() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let db = Database::create(file.path()).unwrap();
        let r = db.begin_read().unwrap();
        assert!(size(&r).is_err());
        assert!(verify_log(&r).is_err());
    }

    #[test]
    fn appends_proofs_and_heads_verify() {
        let (_f, db) = new_db();
        let heads = fill(&db, 77, 10);
        let r = db.begin_read().unwrap();
        assert_eq!(size(&r).unwrap(), 77);
        let report = verify_log(&r).unwrap();
        assert_eq!(report.leaves, 77);
        assert_eq!(report.heads, heads.len() as u64);
        assert_eq!(report.latest_head.as_ref(), heads.last());
        assert_eq!(report.root, root_at(&r, 77).unwrap());
        let pk = public_key(&r).unwrap();
        assert_eq!(latest_head(&r).unwrap().as_ref(), heads.last());
        for head in &heads {
            head.verify_with_key(&pk).unwrap();
            assert_eq!(head_at(&r, head.size).unwrap().as_ref(), Some(head));
            assert_eq!(root_at(&r, head.size).unwrap(), head.root);
            for seq in (0..head.size).step_by(3) {
                let p = prove_inclusion(&r, seq, head.size).unwrap();
                p.verify(head).unwrap();
                let l = leaf(&r, seq).unwrap().unwrap();
                assert_eq!(l.seq, seq);
                assert_eq!(l.hash(), p.leaf_hash);
                assert_eq!(l.record, record(seq));
            }
            verify_against_trusted_head(&r, head).unwrap();
        }
        for old in &heads {
            for new in &heads {
                if old.size <= new.size {
                    let c = prove_consistency(&r, old.size, new.size).unwrap();
                    c.verify(old, new).unwrap();
                    verify_consistency(old.size, new.size, &old.root, &new.root, &c.path).unwrap();
                } else {
                    assert!(prove_consistency(&r, old.size, new.size).is_err());
                }
            }
        }
        // Mismatched heads fail.
        let p = prove_inclusion(&r, 3, 20).unwrap();
        assert!(p.verify(&heads[2]).is_err());
        let c = prove_consistency(&r, 10, 30).unwrap();
        assert!(c.verify(&heads[0], &heads[3]).is_err());
        // Bad requests.
        assert!(matches!(
            prove_inclusion(&r, 0, 78),
            Err(Error::InvalidProofRequest(_))
        ));
        assert!(matches!(
            prove_inclusion(&r, 20, 20),
            Err(Error::InvalidProofRequest(_))
        ));
        assert!(matches!(
            prove_consistency(&r, 1, 78),
            Err(Error::InvalidProofRequest(_))
        ));
        assert!(matches!(
            root_at(&r, 78),
            Err(Error::InvalidProofRequest(_))
        ));
        assert_eq!(leaf(&r, 77).unwrap(), None);
        assert_eq!(head_at(&r, 5).unwrap(), None);
    }

    #[test]
    fn sign_head_twice_returns_the_stored_head() {
        let (_f, db) = new_db();
        fill(&db, 5, 5);
        let h1 = write(&db, |t| sign_head(t, 100).unwrap());
        let h2 = write(&db, |t| sign_head(t, 200).unwrap());
        assert_eq!(h1, h2);
        assert_eq!(h1.time_micros, 5);
        let r = db.begin_read().unwrap();
        assert_eq!(verify_log(&r).unwrap().heads, 1);
    }

    #[test]
    fn reads_work_inside_a_write_transaction() {
        let (_f, db) = new_db();
        fill(&db, 12, 12);
        write(&db, |t| {
            append(t, record(12)).unwrap();
            assert_eq!(size(t).unwrap(), 13);
            let h = sign_head(t, 1).unwrap();
            prove_inclusion(t, 12, 13).unwrap().verify(&h).unwrap();
            verify_log(t).unwrap();
        });
        // An aborted transaction leaves no leaf behind.
        let t = db.begin_write().unwrap();
        append(&t, record(13)).unwrap();
        t.abort().unwrap();
        assert_eq!(size(&db.begin_read().unwrap()).unwrap(), 13);
    }

    #[test]
    fn overlong_record_is_rejected() {
        let (_f, db) = new_db();
        let mut rec = record(0);
        rec.request_id = "x".repeat(crate::audit::leaf::MAX_FIELD_LEN + 1);
        let t = db.begin_write().unwrap();
        assert!(append(&t, rec).is_err());
    }

    fn expect_audit_failure(db: &Database, needle: &str) {
        let r = db.begin_read().unwrap();
        match verify_log(&r) {
            Err(Error::AuditVerification(msg)) => {
                assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}")
            }
            other => panic!("expected an audit failure, got {other:?}"),
        }
    }

    #[test]
    fn tamper_leaf_bytes() {
        let (_f, db) = new_db();
        let heads = fill(&db, 40, 10);
        write(&db, |t| {
            rewrite_leaves_for_tests(t, |leaves| {
                let mut l = AuditLeaf::decode(&leaves[17]).unwrap();
                l.record.outcome = AuditOutcome::Denied;
                leaves[17] = l.encode();
            });
        });
        // The first signed head after the edit no longer matches (levels below 4 are not
        // stored, so no stored node covers leaf 17 before it).
        expect_audit_failure(&db, "signed tree head of size 20");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[1]).is_err());
        assert!(verify_against_trusted_head(&r, &heads[3]).is_err());
        // A head below the edit still verifies.
        verify_against_trusted_head(&r, &heads[0]).unwrap();
    }

    #[test]
    fn only_levels_from_the_first_stored_one_are_stored_and_proofs_still_verify() {
        let (_f, db) = new_db();
        let heads = fill(&db, 100, 7);
        let r = db.begin_read().unwrap();
        let nodes = r.open_table(NODES).unwrap();
        let levels: Vec<u8> = nodes
            .range((0u8, 0u64)..)
            .unwrap()
            .map(|e| e.unwrap().0.value().0)
            .collect();
        // 100 leaves complete six level-4 nodes, three of level 5 and one of level 6.
        assert_eq!(levels.len(), 6 + 3 + 1, "{levels:?}");
        assert!(levels.iter().all(|&l| l >= FIRST_STORED_LEVEL));
        drop(nodes);
        let report = verify_log(&r).unwrap();
        assert_eq!(report.leaves, 100);
        let last = heads.last().unwrap();
        for seq in [0, 5, 17, 63, 64, 99] {
            prove_inclusion(&r, seq, last.size)
                .unwrap()
                .verify(last)
                .unwrap();
        }
        prove_consistency(&r, heads[3].size, last.size)
            .unwrap()
            .verify(&heads[3], last)
            .unwrap();
    }

    #[test]
    fn logs_that_stored_every_level_still_verify_and_grow() {
        // Logs written before `FIRST_STORED_LEVEL` hold the nodes of levels 1 to 3 too.
        let (_f, db) = new_db();
        fill(&db, 40, 10);
        assert_eq!(write(&db, |t| store_lower_levels(t).unwrap()), 20 + 10 + 5);
        let report = verify_log(&db.begin_read().unwrap()).unwrap();
        assert_eq!(report.nodes, 20 + 10 + 5 + 2 + 1);
        fill(&db, 70, 10);
        verify_log(&db.begin_read().unwrap()).unwrap();
    }

    #[test]
    fn tamper_leaf_and_nodes_consistently_is_caught_by_heads() {
        // An attacker who rewrites a leaf and recomputes every stored node is caught by the
        // signed heads (and by an auditor's earlier head).
        let (_f, db) = new_db();
        let heads = fill(&db, 40, 10);
        write(&db, |t| {
            rewrite_leaves_for_tests(t, |leaves| {
                let mut l = AuditLeaf::decode(&leaves[5]).unwrap();
                l.record.request_id = "forged".into();
                leaves[5] = l.encode();
            });
            t.delete_table(NODES).unwrap();
            let leaves = t.open_table(LEAVES).unwrap();
            let mut nodes = t.open_table(NODES).unwrap();
            for i in 0..40u64 {
                let h = leaf_hash(&leaf_bytes(&leaves, i).unwrap().unwrap());
                let source = TableNodes {
                    leaves: &leaves,
                    nodes: &nodes,
                };
                let produced = nodes_to_store_on_append(i, h, &source).unwrap();
                for (lv, ix, hh) in produced.into_iter().filter(|n| n.0 > 0) {
                    nodes.insert((lv, ix), hh).unwrap();
                }
            }
        });
        expect_audit_failure(&db, "signed tree head of size 10");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[0]).is_err());
    }

    #[test]
    fn tamper_delete_leaf() {
        // One leaf taken out: the leaves after it move down a place.
        let (_f, db) = new_db();
        let heads = fill(&db, 30, 10);
        write(&db, |t| {
            rewrite_leaves_for_tests(t, |leaves| {
                leaves.remove(12);
            });
        });
        expect_audit_failure(&db, "stored at 12 carries seq 13");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[1]).is_err());
        verify_against_trusted_head(&r, &heads[0]).unwrap();
        // A whole row taken out: a gap.
        let (_g, db) = new_db();
        let heads = fill(&db, 30, 10);
        write(&db, |t| {
            let row = 16 / LEAVES_PER_ROW;
            t.open_table(LEAVES).unwrap().remove(row).unwrap();
        });
        expect_audit_failure(&db, "leaf 16 is missing");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[1]).is_err());
        verify_against_trusted_head(&r, &heads[0]).unwrap();
        // A row cut short in the middle of the log.
        let (_h, db) = new_db();
        fill(&db, 30, 10);
        write(&db, |t| {
            let mut leaves = t.open_table(LEAVES).unwrap();
            let row = leaves.get(1).unwrap().unwrap().value().to_vec();
            let mut rows = RowWriter::resume(&leaves, LEAVES_PER_ROW).unwrap();
            for leaf in &row_leaves(1, &row).unwrap()[..2] {
                rows.push(&mut leaves, leaf).unwrap();
            }
            rows.finish(&mut leaves).unwrap();
        });
        expect_audit_failure(&db, &format!("leaf {} is missing", LEAVES_PER_ROW + 2));
    }

    #[test]
    fn tamper_truncate_log() {
        let (_f, db) = new_db();
        let heads = fill(&db, 30, 10);
        write(&db, |t| {
            rewrite_leaves_for_tests(t, |leaves| leaves.truncate(25));
        });
        // The head of size 30 is now beyond the log.
        expect_audit_failure(&db, "covers 30 leaves");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[2]).is_err());
    }

    #[test]
    fn tamper_swap_leaves() {
        let (_f, db) = new_db();
        let heads = fill(&db, 30, 10);
        write(&db, |t| {
            rewrite_leaves_for_tests(t, |leaves| leaves.swap(3, 8));
        });
        expect_audit_failure(&db, "stored at 3");
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &heads[0]).is_err());
    }

    #[test]
    fn tamper_stored_node() {
        let (_f, db) = new_db();
        fill(&db, 30, 10);
        write(&db, |t| {
            t.open_table(NODES)
                .unwrap()
                .insert((2, 3), [9u8; 32])
                .unwrap();
        });
        expect_audit_failure(&db, "(level 2, index 3)");
        // Extra nodes are reported too.
        let (_g, db2) = new_db();
        fill(&db2, 30, 10);
        write(&db2, |t| {
            t.open_table(NODES)
                .unwrap()
                .insert((9, 9), [9u8; 32])
                .unwrap();
        });
        expect_audit_failure(&db2, "stored audit nodes");
    }

    #[test]
    fn tamper_head() {
        let (_f, db) = new_db();
        fill(&db, 30, 10);
        // Altered root (signature no longer matches).
        write(&db, |t| {
            let mut heads = t.open_table(HEADS).unwrap();
            let mut h = SignedTreeHead::decode(heads.get(20).unwrap().unwrap().value()).unwrap();
            h.root[0] ^= 1;
            heads.insert(20, h.encode().as_slice()).unwrap();
        });
        expect_audit_failure(&db, "size 20");

        // A head re-signed with another key.
        let (_g, db2) = new_db();
        fill(&db2, 30, 10);
        write(&db2, |t| {
            let mut heads = t.open_table(HEADS).unwrap();
            let h = SignedTreeHead::decode(heads.get(20).unwrap().unwrap().value()).unwrap();
            let forged = SignedTreeHead::sign(&SigningKey::from_bytes(&[1; 32]), 20, h.root, 0);
            heads.insert(20, forged.encode().as_slice()).unwrap();
        });
        expect_audit_failure(&db2, "not the trusted key");

        // Damaged head bytes, and a head moved to another size.
        let (_h, db3) = new_db();
        fill(&db3, 30, 10);
        write(&db3, |t| {
            let mut heads = t.open_table(HEADS).unwrap();
            heads.insert(10, &[1u8, 2, 3][..]).unwrap();
        });
        expect_audit_failure(&db3, "size 10 is damaged");
        let (_i, db4) = new_db();
        fill(&db4, 30, 10);
        write(&db4, |t| {
            let mut heads = t.open_table(HEADS).unwrap();
            let v = heads.get(10).unwrap().unwrap().value().to_vec();
            heads.insert(11, v.as_slice()).unwrap();
        });
        expect_audit_failure(&db4, "claims size 10");
    }

    #[test]
    fn trusted_head_from_another_log_is_rejected() {
        let (_f, db) = new_db();
        fill(&db, 10, 10);
        let (_g, other) = new_db();
        let foreign = fill(&other, 10, 10);
        let r = db.begin_read().unwrap();
        assert!(verify_against_trusted_head(&r, &foreign[0]).is_err());
        // A trusted head beyond the log (rollback).
        let h = fill(&other, 30, 20).pop().unwrap();
        assert_eq!(h.size, 30);
        // Roll back `other` by removing leaves past 10: its trusted head of 30 no longer verifies.
        write(&other, |t| {
            rewrite_leaves_for_tests(t, |leaves| leaves.truncate(10));
        });
        let r3 = other.begin_read().unwrap();
        assert!(matches!(
            verify_against_trusted_head(&r3, &h),
            Err(Error::AuditVerification(m)) if m.contains("rolled back")
        ));
    }

    #[test]
    fn frontier_matches_stored_nodes() {
        let (_f, db) = new_db();
        fill(&db, 100, 33);
        let r = db.begin_read().unwrap();
        let leaves = r.leaves().unwrap();
        let nodes = r.nodes().unwrap();
        let src = TableNodes {
            leaves: &leaves,
            nodes: &nodes,
        };
        replay(&leaves, None, |fr, produced| {
            assert_eq!(fr.root(), root(fr.n, &src).unwrap());
            for &(l, i, h) in produced {
                assert_eq!(src.node(l, i).unwrap(), h);
            }
            Ok(())
        })
        .unwrap();
        let p = inclusion_proof(50, 100, &src).unwrap();
        let h = leaf_hash(&leaf_bytes(&leaves, 50).unwrap().unwrap());
        verify_inclusion(&h, 50, 100, &p, &root(100, &src).unwrap()).unwrap();
    }

    #[test]
    fn leaves_are_stored_in_rows_and_batches_fill_the_last_row() {
        let (_f, db) = new_db();
        // Batches of 5 end in the middle of rows: the next batch completes the stored row.
        let heads = fill(&db, 21, 5);
        let r = db.begin_read().unwrap();
        let leaves = r.leaves().unwrap();
        let rows: Vec<usize> = leaves
            .range(0u64..)
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                row_leaves(k.value(), v.value()).unwrap().len()
            })
            .collect();
        assert_eq!(rows, vec![4, 4, 4, 4, 4, 1]);
        assert_eq!(leaf_count(&leaves).unwrap(), 21);
        for seq in 0..21 {
            assert_eq!(leaf(&r, seq).unwrap().unwrap().seq, seq);
        }
        assert!(leaf(&r, 21).unwrap().is_none());
        let last = heads.last().unwrap();
        for seq in [0, 3, 4, 7, 8, 19, 20] {
            prove_inclusion(&r, seq, last.size)
                .unwrap()
                .verify(last)
                .unwrap();
        }
        assert_eq!(verify_log(&r).unwrap().leaves, 21);
    }

    #[test]
    fn a_log_written_one_leaf_to_a_row_is_moved_into_rows_and_still_verifies() {
        let (_f, db) = new_db();
        let heads = fill(&db, 30, 7);
        write(&db, legacy_layout_for_tests);
        write(&db, |t| initialize(t).unwrap());
        let r = db.begin_read().unwrap();
        assert!(
            !r.list_tables()
                .unwrap()
                .any(|t| redb::TableHandle::name(&t) == "audit_leaves"),
            "the old table is gone"
        );
        assert_eq!(verify_log(&r).unwrap().leaves, 30);
        let last = heads.last().unwrap();
        verify_against_trusted_head(&r, last).unwrap();
        prove_inclusion(&r, 17, last.size)
            .unwrap()
            .verify(last)
            .unwrap();
        drop(r);
        // The log keeps growing in rows.
        let more = fill(&db, 45, 7);
        let r = db.begin_read().unwrap();
        assert_eq!(verify_log(&r).unwrap().leaves, 45);
        prove_consistency(&r, last.size, 45)
            .unwrap()
            .verify(last, more.last().unwrap())
            .unwrap();
    }
}
