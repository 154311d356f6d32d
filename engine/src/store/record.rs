//! How one stored version of a resource is laid out in the `versions` and `bodies` tables.
//!
//! Value layout in `versions` (all integers little-endian):
//!
//! ```text
//! 0      1        2               10          18              50
//! | fmt  | kind   | last_updated  | change    | content hash  | body ... (format 2 only)
//! | u8   | u8     | i64 µs epoch  | seq u64   | blake3 [32]   | zstd(JSON) or empty
//! ```
//!
//! Record format 2 carries the body inline after the header. Record format 3 is the 50-byte
//! header alone; its compressed body is the value of its change seq in `bodies` (none for a
//! tombstone). Both are read everywhere; databases written before format 3 existed hold
//! format 2 only and need no rewrite.
//!
//! Which one a write takes depends on where its key lands (`txn.rs`, `WriteTxn::locate`): among
//! dense keys (an append, or an id sharing a long prefix with the next one) format 2, where
//! a read finds the body with one look-up; anywhere else format 3. Why: with random client
//! ids every insert lands in a random leaf of `versions`, and a leaf holding four or five
//! ~800-byte bodies is rewritten (copied, encrypted, written, synced) for each one, splitting
//! often. With 50-byte records a leaf holds ~40 of them, and the bodies are appended in
//! change-seq order to `bodies`, whose pages fill one after another (BENCHMARKS.md, "Latest:
//! 2026-11-30 (day), bodies of random-id writes out of the `versions` leaves").
//!
//! Bodies are zstd frames compressed with the built-in dictionary
//! `fhir-r4-v1.zdict` (64 KiB, trained on the official R4 examples by
//! `benches/src/bin/train_zstd_dictionary.rs`); FHIR resources share so many keys, system
//! URLs and codes that it halves the size of a typical 1 KiB resource. The dictionary is part
//! of the format: a new one needs a new format byte, and old records keep theirs.
//!
//! `kind` is 0 = created with a server id (POST), 1 = updated, 2 = deleted (tombstone, empty
//! body), 3 = created with the client's id (PUT).
//! The content hash is blake3 of the uncompressed JSON as returned to readers,
//! and is what the audit leaf of the write records.

use redb::{ReadableTable, TableDefinition};

use crate::{Error, Result};

/// `(resource type, id, version) -> encoded version record`.
pub(crate) const VERSIONS: TableDefinition<'_, (&str, &str, u64), &[u8]> =
    TableDefinition::new("versions");

/// `change seq -> compressed body` of record format 3 versions (not tombstones).
pub(crate) const BODIES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("bodies");

/// `change seq -> encoded change` (all writes in commit order; system history).
pub(crate) const CHANGES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("changes");

/// `(resource type, change seq) -> ()`: type history without scanning other types.
pub(crate) const TYPE_CHANGES: TableDefinition<'_, (&str, u64), ()> =
    TableDefinition::new("type_changes");

/// Small engine facts: format version and the engine clock (the next change seq is the
/// last key of `changes` plus one).
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

pub(crate) const META_FORMAT: &str = "format";
pub(crate) const META_CLOCK: &str = "clock";
/// The last change seq whose pending version (`pending.rs`) is in `versions`: every change
/// row that carries a record at or below it has been merged, none above it has.
pub(crate) const META_MERGED_THROUGH: &str = "merged_through";

/// The on-disk format version of the engine's tables. 2: audit leaves in rows
/// (`audit_leaf_chunks`). A build that knows only 1 refuses a database of format 2 rather
/// than starting an empty audit log beside its rows. 3: bodies of new versions in `bodies`
/// (record format 3); a build that knows only 2 would fail on every such record, so it
/// refuses the database at open instead. 4: versions written among random keys wait in
/// `changes` (rows that carry their record) until a merge moves them into `versions`; a
/// build that knows only 3 would not find them.
pub(crate) const FORMAT_VERSION: u32 = 4;
/// The oldest format that opening upgrades (1: one audit leaf per row in `audit_leaves`).
pub(crate) const OLDEST_UPGRADABLE_FORMAT: u32 = 1;

/// Record format with the body inline, after the header (written before table format 3).
const RECORD_FORMAT_INLINE: u8 = 2;
/// Record format with the body in `bodies` under the record's change seq.
const RECORD_FORMAT_SPLIT: u8 = 3;

/// The zstd dictionary of record format 2. Never change these bytes: stored bodies need them.
static DICTIONARY_V1: &[u8] = include_bytes!("fhir-r4-v1.zdict");

fn encoder_dictionary() -> &'static zstd::dict::EncoderDictionary<'static> {
    static PREPARED: std::sync::OnceLock<zstd::dict::EncoderDictionary<'static>> =
        std::sync::OnceLock::new();
    PREPARED.get_or_init(|| zstd::dict::EncoderDictionary::copy(DICTIONARY_V1, ZSTD_LEVEL))
}

fn decoder_dictionary() -> &'static zstd::dict::DecoderDictionary<'static> {
    static PREPARED: std::sync::OnceLock<zstd::dict::DecoderDictionary<'static>> =
        std::sync::OnceLock::new();
    PREPARED.get_or_init(|| zstd::dict::DecoderDictionary::copy(DICTIONARY_V1))
}
const HEADER_LEN: usize = 50;

/// What a version is: how it came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionKind {
    /// Created with a server-assigned id (a FHIR create, POST).
    Created,
    /// Created with the caller's id (update-as-create, PUT), including re-creation after
    /// deletion.
    CreatedWithId,
    /// A later version.
    Updated,
    /// A deletion tombstone.
    Deleted,
}

impl VersionKind {
    fn to_byte(self) -> u8 {
        match self {
            VersionKind::Created => 0,
            VersionKind::Updated => 1,
            VersionKind::Deleted => 2,
            VersionKind::CreatedWithId => 3,
        }
    }

    fn from_byte(byte: u8) -> Result<Self> {
        match byte {
            0 => Ok(VersionKind::Created),
            1 => Ok(VersionKind::Updated),
            2 => Ok(VersionKind::Deleted),
            3 => Ok(VersionKind::CreatedWithId),
            other => Err(Error::Corrupted(format!("unknown version kind {other}"))),
        }
    }
}

/// A decoded version record header, and where its still-compressed body is.
#[derive(Debug, Clone)]
pub(crate) struct VersionRecord<'a> {
    pub(crate) kind: VersionKind,
    pub(crate) last_updated_micros: i64,
    pub(crate) change_seq: u64,
    pub(crate) content_hash: [u8; 32],
    body: RecordBody<'a>,
}

#[derive(Debug, Clone, Copy)]
enum RecordBody<'a> {
    /// Record format 2: after the header (empty for a tombstone).
    Inline(&'a [u8]),
    /// Record format 3: in `bodies` under the change seq (none for a tombstone).
    InBodies,
}

impl<'a> VersionRecord<'a> {
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self> {
        let malformed = || Error::Corrupted("version record header is malformed".into());
        if bytes.len() < HEADER_LEN {
            return Err(malformed());
        }
        let body = match bytes[0] {
            RECORD_FORMAT_INLINE => RecordBody::Inline(&bytes[HEADER_LEN..]),
            RECORD_FORMAT_SPLIT if bytes.len() == HEADER_LEN => RecordBody::InBodies,
            _ => return Err(malformed()),
        };
        let kind = VersionKind::from_byte(bytes[1])?;
        let last_updated_micros = i64::from_le_bytes(fixed(&bytes[2..10])?);
        let change_seq = u64::from_le_bytes(fixed(&bytes[10..18])?);
        let content_hash = fixed(&bytes[18..50])?;
        Ok(VersionRecord {
            kind,
            last_updated_micros,
            change_seq,
            content_hash,
            body,
        })
    }

    /// Whether the body (if any) is in `bodies` rather than in the record.
    pub(crate) fn body_in_table(&self) -> bool {
        matches!(self.body, RecordBody::InBodies)
    }

    /// Decompresses the JSON body (empty for tombstones), taking it from `bodies` if the
    /// record does not hold it.
    pub(crate) fn body(&self, bodies: &impl ReadableTable<u64, &'static [u8]>) -> Result<Vec<u8>> {
        match self.body {
            RecordBody::Inline(compressed) => decompress(compressed),
            RecordBody::InBodies if self.kind == VersionKind::Deleted => Ok(Vec::new()),
            RecordBody::InBodies => match bodies.get(self.change_seq)? {
                Some(compressed) => decompress(compressed.value()),
                None => Err(Error::Corrupted("a version's body is missing".into())),
            },
        }
    }
}

/// Decompresses a stored body (empty stays empty).
fn decompress(compressed: &[u8]) -> Result<Vec<u8>> {
    if compressed.is_empty() {
        return Ok(Vec::new());
    }
    let corrupted = || Error::Corrupted("version body does not decompress".into());
    // The frame header states the exact size: allocate that, not the 64 MiB maximum.
    let size = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .filter(|&size| size <= MAX_BODY)
        .ok_or_else(corrupted)?;
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(decompressor) => decompressor,
            None => slot.insert(
                zstd::bulk::Decompressor::with_prepared_dictionary(decoder_dictionary())
                    .map_err(Error::Io)?,
            ),
        };
        let body = decompressor
            .decompress(compressed, size)
            .map_err(|_| corrupted())?;
        if body.len() == size {
            Ok(body)
        } else {
            Err(corrupted())
        }
    })
}

/// Resources larger than this are refused (and so never need decompressing).
pub(crate) const MAX_BODY: usize = 64 << 20;

/// zstd level for resource bodies: level 1 keeps ingest fast; FHIR JSON still shrinks ~3x.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    // zstd contexts are costly to create (a large share of a small resource's cost), so each
    // thread keeps one of each.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(body: &[u8]) -> Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(compressor) => compressor,
            None => slot.insert(
                zstd::bulk::Compressor::with_prepared_dictionary(encoder_dictionary())
                    .map_err(Error::Io)?,
            ),
        };
        compressor.compress(body).map_err(Error::Io)
    })
}

/// Sets the change seq field of an encoded record (known only when the insert order is final).
pub(crate) fn set_record_change_seq(record: &mut [u8], change_seq: u64) {
    if let Some(field) = record.get_mut(10..18) {
        field.copy_from_slice(&change_seq.to_le_bytes());
    }
}

/// A version encoded for storage: its record in format 3 and its compressed body.
#[derive(Debug)]
pub(crate) struct EncodedVersion {
    /// The `versions` value in format 3: the header alone.
    pub(crate) record: Vec<u8>,
    /// The `bodies` value (under the change seq); empty for a tombstone, which has none.
    pub(crate) body: Vec<u8>,
}

impl EncodedVersion {
    /// The same version as one record of format 2: the header with the body after it.
    pub(crate) fn into_inline_record(self) -> Vec<u8> {
        let mut record = self.record;
        record[0] = RECORD_FORMAT_INLINE;
        record.extend_from_slice(&self.body);
        record
    }
}

/// Encodes a version in record format 3.
pub(crate) fn encode_record(
    kind: VersionKind,
    last_updated_micros: i64,
    change_seq: u64,
    content_hash: &[u8; 32],
    body: &[u8],
) -> Result<EncodedVersion> {
    let compressed = if body.is_empty() {
        Vec::new()
    } else {
        compress(body)?
    };
    let mut record = Vec::with_capacity(HEADER_LEN);
    record.push(RECORD_FORMAT_SPLIT);
    record.push(kind.to_byte());
    record.extend_from_slice(&last_updated_micros.to_le_bytes());
    record.extend_from_slice(&change_seq.to_le_bytes());
    record.extend_from_slice(content_hash);
    Ok(EncodedVersion {
        record,
        body: compressed,
    })
}

/// Encodes a version in record format 2 (body inline).
#[cfg(test)]
pub(crate) fn encode_inline_record(
    kind: VersionKind,
    last_updated_micros: i64,
    change_seq: u64,
    content_hash: &[u8; 32],
    body: &[u8],
) -> Result<Vec<u8>> {
    Ok(
        encode_record(kind, last_updated_micros, change_seq, content_hash, body)?
            .into_inline_record(),
    )
}

/// Rewrites every record of `versions` into record format 2 (body inline, `bodies` empty)
/// and marks the tables format 2: the layout of a database written by a build before table
/// format 3.
#[cfg(test)]
pub(crate) fn inline_layout_for_tests(txn: &redb::WriteTransaction) {
    // Format 2 had no pending versions, nor change rows that carry a record.
    super::pending::merge_into(txn).unwrap();
    txn.open_table(META)
        .unwrap()
        .remove(META_MERGED_THROUGH)
        .unwrap();
    let mut changes = txn.open_table(CHANGES).unwrap();
    let rows: Vec<(u64, Change)> = changes
        .iter()
        .unwrap()
        .map(|entry| {
            let (seq, bytes) = entry.unwrap();
            (seq.value(), Change::decode(bytes.value()).unwrap())
        })
        .collect();
    for (seq, mut change) in rows {
        change.pending = None;
        changes.insert(seq, change.encode().as_slice()).unwrap();
    }
    drop(changes);
    let mut versions = txn.open_table(VERSIONS).unwrap();
    let mut bodies = txn.open_table(BODIES).unwrap();
    let rows: Vec<((String, String, u64), Vec<u8>)> = versions
        .iter()
        .unwrap()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            let (t, i, v) = key.value();
            ((t.to_owned(), i.to_owned(), v), value.value().to_vec())
        })
        .collect();
    for ((t, i, v), bytes) in rows {
        let record = VersionRecord::decode(&bytes).unwrap();
        let body = record.body(&bodies).unwrap();
        let inline = encode_inline_record(
            record.kind,
            record.last_updated_micros,
            record.change_seq,
            &record.content_hash,
            &body,
        )
        .unwrap();
        versions
            .insert((t.as_str(), i.as_str(), v), inline.as_slice())
            .unwrap();
    }
    bodies.retain(|_, _| false).unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(META_FORMAT, &2u32.to_le_bytes()[..])
        .unwrap();
}

/// One row of the `changes` table: which version a change seq produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) resource_type: String,
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) last_updated_micros: i64,
    /// For a version written among random keys (`pending.rs`): the rest of its record, which
    /// `versions` gets only when the merge moves it there.
    pub(crate) pending: Option<PendingRecord>,
}

/// The part of a version record a pending change row carries beyond [`Change`]'s fields (its
/// body is in `bodies` under the change seq, as for record format 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingRecord {
    pub(crate) kind: VersionKind,
    pub(crate) content_hash: [u8; 32],
}

impl PendingRecord {
    /// The version record this is part of: a format-3 record (body in `bodies`).
    pub(crate) fn version_record(
        self,
        change_seq: u64,
        last_updated_micros: i64,
    ) -> VersionRecord<'static> {
        VersionRecord {
            kind: self.kind,
            last_updated_micros,
            change_seq,
            content_hash: self.content_hash,
            body: RecordBody::InBodies,
        }
    }
}

/// Set in the type length byte of a change row that carries its version's record. Type
/// names are at most 40 bytes, so the bit is never part of a length.
const CHANGE_CARRIES_RECORD: u8 = 0x80;

impl Change {
    /// `version u64 | last_updated i64 | type len u8 | type | id`, or for a pending version
    /// `version u64 | last_updated i64 | 0x80 + type len u8 | type | id len u8 | id | kind
    /// u8 | content hash [32]`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.resource_type.len() + self.id.len() + 34);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.last_updated_micros.to_le_bytes());
        // Resource type names are at most 40 bytes, ids at most 64: both fit in 7 bits.
        let type_len = u8::try_from(self.resource_type.len()).unwrap_or(u8::MAX) & 0x7f;
        match &self.pending {
            None => {
                out.push(type_len);
                out.extend_from_slice(self.resource_type.as_bytes());
                out.extend_from_slice(self.id.as_bytes());
            }
            Some(record) => {
                out.push(type_len | CHANGE_CARRIES_RECORD);
                out.extend_from_slice(self.resource_type.as_bytes());
                out.push(u8::try_from(self.id.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(self.id.as_bytes());
                out.push(record.kind.to_byte());
                out.extend_from_slice(&record.content_hash);
            }
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::Corrupted("change record is malformed".into());
        if bytes.len() < 17 {
            return Err(bad());
        }
        let version = u64::from_le_bytes(fixed(&bytes[0..8])?);
        let last_updated_micros = i64::from_le_bytes(fixed(&bytes[8..16])?);
        let carries_record = bytes[16] & CHANGE_CARRIES_RECORD != 0;
        let type_len = usize::from(bytes[16] & !CHANGE_CARRIES_RECORD);
        let rest = &bytes[17..];
        let (resource_type, rest) = rest.split_at_checked(type_len).ok_or_else(bad)?;
        let (id, pending) = if carries_record {
            let (&id_len, rest) = rest.split_first().ok_or_else(bad)?;
            let (id, rest) = rest.split_at_checked(usize::from(id_len)).ok_or_else(bad)?;
            let (&kind, hash) = rest.split_first().ok_or_else(bad)?;
            let record = PendingRecord {
                kind: VersionKind::from_byte(kind)?,
                content_hash: fixed(hash)?,
            };
            (id, Some(record))
        } else {
            (rest, None)
        };
        Ok(Change {
            resource_type: String::from_utf8(resource_type.to_vec()).map_err(|_| bad())?,
            id: String::from_utf8(id.to_vec()).map_err(|_| bad())?,
            version,
            last_updated_micros,
            pending,
        })
    }

    /// The version record of a pending change row at `change_seq`, if it carries one.
    pub(crate) fn pending_record(&self, change_seq: u64) -> Option<VersionRecord<'static>> {
        self.pending
            .map(|record| record.version_record(change_seq, self.last_updated_micros))
    }
}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| Error::Corrupted("record field has the wrong length".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `bodies` table for decoding records in memory.
    fn with_bodies<T>(
        rows: &[(u64, &[u8])],
        f: impl FnOnce(&redb::Table<'_, u64, &[u8]>) -> T,
    ) -> T {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let txn = db.begin_write().unwrap();
        let mut table = txn.open_table(BODIES).unwrap();
        for (seq, body) in rows {
            table.insert(seq, body).unwrap();
        }
        f(&table)
    }

    #[test]
    fn record_roundtrips_in_both_formats() {
        let hash = [7u8; 32];
        let body = br#"{"resourceType":"Patient","id":"x"}"#;
        let encoded = encode_record(VersionKind::Updated, -5, 42, &hash, body).unwrap();
        assert_eq!(
            encoded.record.len(),
            HEADER_LEN,
            "format 3 records hold no body"
        );
        let record = VersionRecord::decode(&encoded.record).unwrap();
        assert_eq!(record.kind, VersionKind::Updated);
        assert_eq!(record.last_updated_micros, -5);
        assert_eq!(record.change_seq, 42);
        assert_eq!(record.content_hash, hash);
        with_bodies(&[(42, &encoded.body)], |bodies| {
            assert_eq!(record.body(bodies).unwrap(), body);
        });
        // Its body missing from `bodies` is corruption, not an empty resource.
        with_bodies(&[(41, &encoded.body)], |bodies| {
            assert!(matches!(record.body(bodies), Err(Error::Corrupted(_))));
        });
        // Format 2 carries its body and needs no table.
        let inline = encode_inline_record(VersionKind::Updated, -5, 42, &hash, body).unwrap();
        let record = VersionRecord::decode(&inline).unwrap();
        assert_eq!(record.change_seq, 42);
        with_bodies(&[], |bodies| assert_eq!(record.body(bodies).unwrap(), body));
    }

    #[test]
    fn dictionary_shrinks_a_typical_resource() {
        let body = br#"{"resourceType":"Observation","id":"0193c2f0-aaaa-7bbb-8ccc-123456789abc","meta":{"versionId":"1","lastUpdated":"2026-11-22T10:11:12.123456Z"},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital Signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"Heart rate"},"subject":{"reference":"Patient/0193c2f0-aaaa-7bbb-8ccc-123456789abd"},"effectiveDateTime":"2019-03-04T10:11:12+01:00","valueQuantity":{"value":72,"unit":"beats/minute","system":"http://unitsofmeasure.org","code":"/min"}}"#;
        let with_dictionary = compress(body).unwrap();
        let without = zstd::bulk::compress(body, ZSTD_LEVEL).unwrap();
        assert!(
            with_dictionary.len() * 4 < without.len() * 3,
            "dictionary: {} bytes, plain zstd: {} bytes",
            with_dictionary.len(),
            without.len()
        );
        assert_eq!(decompress(&with_dictionary).unwrap(), body);
    }

    #[test]
    fn tombstone_has_empty_body_and_no_body_row() {
        let encoded = encode_record(VersionKind::Deleted, 1, 2, &[0; 32], b"").unwrap();
        assert!(encoded.body.is_empty());
        let record = VersionRecord::decode(&encoded.record).unwrap();
        with_bodies(&[], |bodies| {
            assert!(record.body(bodies).unwrap().is_empty())
        });
        let inline = encode_inline_record(VersionKind::Deleted, 1, 2, &[0; 32], b"").unwrap();
        let record = VersionRecord::decode(&inline).unwrap();
        with_bodies(&[], |bodies| {
            assert!(record.body(bodies).unwrap().is_empty())
        });
    }

    #[test]
    fn malformed_records_are_errors() {
        with_bodies(&[(1, &[1u8; 30])], |bodies| {
            for len in 0..60 {
                for format in [1u8, 2, 3, 9] {
                    let mut junk = vec![1u8; len];
                    if let Some(first) = junk.first_mut() {
                        *first = format;
                    }
                    let _ = VersionRecord::decode(&junk).and_then(|r| r.body(bodies));
                    let _ = Change::decode(&junk);
                }
            }
        });
        assert!(VersionRecord::decode(&[9; 60]).is_err());
        // A format 3 record never has bytes after its header.
        let mut long = encode_record(VersionKind::Created, 1, 1, &[0; 32], b"{}")
            .unwrap()
            .record;
        long.push(0);
        assert!(VersionRecord::decode(&long).is_err());
    }

    #[test]
    fn change_roundtrips() {
        let mut change = Change {
            resource_type: "Observation".into(),
            id: "a.b-c".into(),
            version: 3,
            last_updated_micros: 99,
            pending: None,
        };
        assert_eq!(Change::decode(&change.encode()).unwrap(), change);
        change.pending = Some(PendingRecord {
            kind: VersionKind::CreatedWithId,
            content_hash: [9; 32],
        });
        let encoded = change.encode();
        assert_eq!(Change::decode(&encoded).unwrap(), change);
        let record = change.pending_record(12).unwrap();
        assert_eq!(
            (record.kind, record.change_seq, record.last_updated_micros),
            (VersionKind::CreatedWithId, 12, 99)
        );
        assert!(record.body_in_table());
        // Cut anywhere, a row that carries a record is an error, never a shorter id.
        for len in 0..encoded.len() {
            assert!(Change::decode(&encoded[..len]).is_err(), "cut at {len}");
        }
    }
}
