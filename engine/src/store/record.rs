//! How one stored version of a resource is laid out in the `versions` table.
//!
//! Value layout (all integers little-endian):
//!
//! ```text
//! 0      1        2               10          18              50
//! | fmt  | kind   | last_updated  | change    | content hash  | body ...
//! | u8=2 | u8     | i64 µs epoch  | seq u64   | blake3 [32]   | zstd(JSON) or empty
//! ```
//!
//! Format 2 bodies are zstd frames compressed with the built-in dictionary
//! `fhir-r4-v1.zdict` (64 KiB, trained on the official R4 examples by
//! `benches/src/bin/train_zstd_dictionary.rs`); FHIR resources share so many keys, system
//! URLs and codes that it halves the size of a typical 1 KiB resource. The dictionary is part
//! of the format: a new one needs a new format byte, and old records keep theirs.
//!
//! `kind` is 0 = created with a server id (POST), 1 = updated, 2 = deleted (tombstone, empty
//! body), 3 = created with the client's id (PUT).
//! The content hash is blake3 of the uncompressed JSON as returned to readers,
//! and is what the audit leaf of the write records.

use redb::TableDefinition;

use crate::{Error, Result};

/// `(resource type, id, version) -> encoded version record`.
pub(crate) const VERSIONS: TableDefinition<'_, (&str, &str, u64), &[u8]> =
    TableDefinition::new("versions");

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

/// The on-disk format version of the engine's tables. 2: audit leaves in rows
/// (`audit_leaf_chunks`). A build that knows only 1 refuses a database of format 2 rather
/// than starting an empty audit log beside its rows.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The oldest format that opening upgrades (1: one audit leaf per row in `audit_leaves`).
pub(crate) const OLDEST_UPGRADABLE_FORMAT: u32 = 1;

const RECORD_FORMAT: u8 = 2;

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

/// A decoded version record header plus its still-compressed body.
#[derive(Debug, Clone)]
pub(crate) struct VersionRecord<'a> {
    pub(crate) kind: VersionKind,
    pub(crate) last_updated_micros: i64,
    pub(crate) content_hash: [u8; 32],
    pub(crate) compressed_body: &'a [u8],
}

impl<'a> VersionRecord<'a> {
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN || bytes[0] != RECORD_FORMAT {
            return Err(Error::Corrupted(
                "version record header is malformed".into(),
            ));
        }
        let kind = VersionKind::from_byte(bytes[1])?;
        let last_updated_micros = i64::from_le_bytes(fixed(&bytes[2..10])?);
        let content_hash = fixed(&bytes[18..50])?;
        Ok(VersionRecord {
            kind,
            last_updated_micros,
            content_hash,
            compressed_body: &bytes[HEADER_LEN..],
        })
    }

    /// Decompresses the JSON body (empty for tombstones).
    pub(crate) fn body(&self) -> Result<Vec<u8>> {
        if self.compressed_body.is_empty() {
            return Ok(Vec::new());
        }
        let corrupted = || Error::Corrupted("version body does not decompress".into());
        // The frame header states the exact size: allocate that, not the 64 MiB maximum.
        let size = zstd::zstd_safe::get_frame_content_size(self.compressed_body)
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
                .decompress(self.compressed_body, size)
                .map_err(|_| corrupted())?;
            if body.len() == size {
                Ok(body)
            } else {
                Err(corrupted())
            }
        })
    }
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

pub(crate) fn encode_record(
    kind: VersionKind,
    last_updated_micros: i64,
    change_seq: u64,
    content_hash: &[u8; 32],
    body: &[u8],
) -> Result<Vec<u8>> {
    let compressed = if body.is_empty() {
        Vec::new()
    } else {
        compress(body)?
    };
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
    out.push(RECORD_FORMAT);
    out.push(kind.to_byte());
    out.extend_from_slice(&last_updated_micros.to_le_bytes());
    out.extend_from_slice(&change_seq.to_le_bytes());
    out.extend_from_slice(content_hash);
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// One row of the `changes` table: which version a change seq produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) resource_type: String,
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) last_updated_micros: i64,
}

impl Change {
    /// `version u64 | last_updated i64 | type len u8 | type | id`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.resource_type.len() + self.id.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.last_updated_micros.to_le_bytes());
        // Resource type names are at most 40 bytes, ids at most 64: both fit a u8 length.
        out.push(u8::try_from(self.resource_type.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.resource_type.as_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::Corrupted("change record is malformed".into());
        if bytes.len() < 17 {
            return Err(bad());
        }
        let version = u64::from_le_bytes(fixed(&bytes[0..8])?);
        let last_updated_micros = i64::from_le_bytes(fixed(&bytes[8..16])?);
        let type_len = usize::from(bytes[16]);
        let rest = &bytes[17..];
        if rest.len() < type_len {
            return Err(bad());
        }
        let (resource_type, id) = rest.split_at(type_len);
        Ok(Change {
            resource_type: String::from_utf8(resource_type.to_vec()).map_err(|_| bad())?,
            id: String::from_utf8(id.to_vec()).map_err(|_| bad())?,
            version,
            last_updated_micros,
        })
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

    #[test]
    fn record_roundtrips() {
        let hash = [7u8; 32];
        let body = br#"{"resourceType":"Patient","id":"x"}"#;
        let bytes = encode_record(VersionKind::Updated, -5, 42, &hash, body).unwrap();
        let record = VersionRecord::decode(&bytes).unwrap();
        assert_eq!(record.kind, VersionKind::Updated);
        assert_eq!(record.last_updated_micros, -5);
        assert_eq!(record.content_hash, hash);
        assert_eq!(record.body().unwrap(), body);
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
        let record = encode_record(VersionKind::Created, 1, 1, &[0; 32], body).unwrap();
        assert_eq!(
            VersionRecord::decode(&record).unwrap().body().unwrap(),
            body
        );
    }

    #[test]
    fn tombstone_has_empty_body() {
        let bytes = encode_record(VersionKind::Deleted, 1, 2, &[0; 32], b"").unwrap();
        assert!(
            VersionRecord::decode(&bytes)
                .unwrap()
                .body()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        for len in 0..60 {
            let junk = vec![1u8; len];
            let _ = VersionRecord::decode(&junk).and_then(|r| r.body());
            let _ = Change::decode(&junk);
        }
        assert!(VersionRecord::decode(&[9; 60]).is_err());
    }

    #[test]
    fn change_roundtrips() {
        let change = Change {
            resource_type: "Observation".into(),
            id: "a.b-c".into(),
            version: 3,
            last_updated_micros: 99,
        };
        assert_eq!(Change::decode(&change.encode()).unwrap(), change);
    }
}
