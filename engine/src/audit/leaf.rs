//! Audit log leaves: what one engine operation records, and its canonical binary encoding.
//!
//! # Leaf encoding, version 1
//!
//! A leaf is encoded as the concatenation of the following fields, with no padding and nothing
//! after the last field. Integers are little-endian. A *string* is a `u32` LE byte length followed
//! by that many bytes of UTF-8. An *option* is a tag byte, `0x00` (absent, nothing follows) or
//! `0x01` (present, the value follows).
//!
//! | # | field                  | encoding                                     |
//! |---|------------------------|----------------------------------------------|
//! | 1 | format version         | 1 byte, `0x01`                               |
//! | 2 | `seq`                  | `u64` LE (8 bytes)                           |
//! | 3 | `time_micros`          | `i64` LE (8 bytes), microseconds since the Unix epoch |
//! | 4 | `actor.subject`        | string                                       |
//! | 5 | `actor.client`         | string                                       |
//! | 6 | `actor.source`         | string                                       |
//! | 7 | `request_id`           | string                                       |
//! | 8 | `action`               | string, the name from [`AuditAction::as_str`]  |
//! | 9 | `resource_type`        | option of string                             |
//! | 10| `id`                   | option of string                             |
//! | 11| `version`              | option of `u64` LE                           |
//! | 12| `outcome`              | string, the name from [`AuditOutcome::as_str`] |
//! | 13| `content_hash`         | option of 32 raw bytes                       |
//! | 14| `query_hash`           | option of 32 raw bytes                       |
//!
//! Decoding rejects (with [`Error::Corrupted`]) any other version byte, a length running past the
//! end, invalid UTF-8, a tag byte other than 0 or 1, an unknown outcome name, and trailing bytes,
//! so every valid byte string decodes to exactly one leaf and re-encodes to itself. Actions are
//! stored by name so that a name recorded as [`AuditAction::Other`] keeps its bytes (and hash) if a
//! later version gives it its own variant.
//!
//! The leaf hash is `BLAKE3(0x00 ‖ encoding)` ([`AuditLeaf::hash`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::merkle::{Hash, leaf_hash};
use crate::{Error, Result};

/// Version byte of the leaf encoding this module writes.
pub const LEAF_FORMAT_VERSION: u8 = 1;

/// The longest string field (in bytes) the log accepts in a record.
pub const MAX_FIELD_LEN: usize = 64 * 1024;

/// What kind of operation a leaf records.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditAction {
    /// A resource was created.
    Create,
    /// The current version of a resource was read.
    Read,
    /// A specific version of a resource was read.
    VRead,
    /// A resource was replaced.
    Update,
    /// A resource was patched.
    Patch,
    /// A resource was deleted.
    Delete,
    /// The history of one resource was read.
    HistoryInstance,
    /// The history of all resources of a type was read.
    HistoryType,
    /// The history of the whole database was read.
    HistorySystem,
    /// A search was run.
    Search,
    /// A resource was read as of a point in time.
    PointInTimeRead,
    /// Resources were imported.
    Import,
    /// Resources were exported.
    Export,
    /// An integrity check was run.
    Check,
    /// The database keys were changed.
    Rekey,
    /// A user or client authenticated.
    Login,
    /// The key that signs the audit log's tree heads was replaced; the leaf's content hash
    /// holds the new Ed25519 public key.
    AuditKeyRotation,
    /// Any other action, by name.
    Other(String),
}

impl AuditAction {
    /// Every named (non-`Other`) action.
    const KNOWN: [AuditAction; 17] = [
        AuditAction::Create,
        AuditAction::Read,
        AuditAction::VRead,
        AuditAction::Update,
        AuditAction::Patch,
        AuditAction::Delete,
        AuditAction::HistoryInstance,
        AuditAction::HistoryType,
        AuditAction::HistorySystem,
        AuditAction::Search,
        AuditAction::PointInTimeRead,
        AuditAction::Import,
        AuditAction::Export,
        AuditAction::Check,
        AuditAction::Rekey,
        AuditAction::Login,
        AuditAction::AuditKeyRotation,
    ];

    /// The stable lowercase name of the action (for `Other`, its own name).
    pub fn as_str(&self) -> &str {
        match self {
            AuditAction::Create => "create",
            AuditAction::Read => "read",
            AuditAction::VRead => "vread",
            AuditAction::Update => "update",
            AuditAction::Patch => "patch",
            AuditAction::Delete => "delete",
            AuditAction::HistoryInstance => "history-instance",
            AuditAction::HistoryType => "history-type",
            AuditAction::HistorySystem => "history-system",
            AuditAction::Search => "search",
            AuditAction::PointInTimeRead => "point-in-time-read",
            AuditAction::Import => "import",
            AuditAction::Export => "export",
            AuditAction::Check => "check",
            AuditAction::Rekey => "rekey",
            AuditAction::Login => "login",
            AuditAction::AuditKeyRotation => "audit-key-rotation",
            AuditAction::Other(name) => name,
        }
    }

    /// The action with this name: a named variant if one has it, otherwise `Other(name)`.
    /// Never fails.
    pub fn parse(name: &str) -> AuditAction {
        AuditAction::KNOWN
            .iter()
            .find(|a| a.as_str() == name)
            .cloned()
            .unwrap_or_else(|| AuditAction::Other(name.to_owned()))
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(AuditAction::parse(s))
    }
}

impl Serialize for AuditAction {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AuditAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(AuditAction::parse(&s))
    }
}

/// How an audited operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditOutcome {
    /// The operation succeeded.
    Success,
    /// The resource or version did not exist.
    NotFound,
    /// The resource was deleted.
    Gone,
    /// A version conflict.
    Conflict,
    /// The request or resource was invalid.
    Invalid,
    /// The caller was not allowed to do this.
    Denied,
    /// Any other failure.
    Error,
}

impl AuditOutcome {
    const ALL: [AuditOutcome; 7] = [
        AuditOutcome::Success,
        AuditOutcome::NotFound,
        AuditOutcome::Gone,
        AuditOutcome::Conflict,
        AuditOutcome::Invalid,
        AuditOutcome::Denied,
        AuditOutcome::Error,
    ];

    /// The stable lowercase name of the outcome.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::NotFound => "not-found",
            AuditOutcome::Gone => "gone",
            AuditOutcome::Conflict => "conflict",
            AuditOutcome::Invalid => "invalid",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Error => "error",
        }
    }

    /// The outcome with this name, or `None` if no outcome has it.
    pub fn parse(name: &str) -> Option<AuditOutcome> {
        AuditOutcome::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

impl fmt::Display for AuditOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditOutcome {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        AuditOutcome::parse(s)
            .ok_or_else(|| Error::Corrupted(format!("unknown audit outcome name {s:?}")))
    }
}

impl Serialize for AuditOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AuditOutcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AuditOutcome::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown audit outcome {s:?}")))
    }
}

/// Who performed an operation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuditActor {
    /// The authenticated user or service (empty if none).
    pub subject: String,
    /// The client application.
    pub client: String,
    /// The network address the request came from, or `"local"`.
    pub source: String,
}

/// What the store records about one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the operation happened, in microseconds since the Unix epoch.
    pub time_micros: i64,
    /// Who performed it.
    pub actor: AuditActor,
    /// The request's correlation id.
    pub request_id: String,
    /// What was done.
    pub action: AuditAction,
    /// The resource type acted on, if any.
    pub resource_type: Option<String>,
    /// The resource id acted on, if any.
    pub id: Option<String>,
    /// The resource version acted on or produced, if any.
    pub version: Option<u64>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// Hash of the resource content written or read, if any.
    #[serde(with = "hex_opt32")]
    pub content_hash: Option<[u8; 32]>,
    /// Hash of the search or history query, if any.
    #[serde(with = "hex_opt32")]
    pub query_hash: Option<[u8; 32]>,
}

impl AuditRecord {
    /// Checks that every string field fits the log's limit of [`MAX_FIELD_LEN`] bytes.
    ///
    /// The error names the field but not its content.
    pub fn check_limits(&self) -> Result<()> {
        let fields: [(&str, Option<&str>); 7] = [
            ("actor.subject", Some(&self.actor.subject)),
            ("actor.client", Some(&self.actor.client)),
            ("actor.source", Some(&self.actor.source)),
            ("request_id", Some(&self.request_id)),
            ("action", Some(self.action.as_str())),
            ("resource_type", self.resource_type.as_deref()),
            ("id", self.id.as_deref()),
        ];
        for (name, value) in fields {
            if let Some(v) = value
                && v.len() > MAX_FIELD_LEN
            {
                return Err(Error::Storage(format!(
                    "audit record field {name} is {} bytes, over the limit of {MAX_FIELD_LEN}",
                    v.len()
                )));
            }
        }
        Ok(())
    }
}

/// One entry of the audit log: its sequence number and the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLeaf {
    /// Position in the log, from 0.
    pub seq: u64,
    /// What was recorded.
    pub record: AuditRecord,
}

impl AuditLeaf {
    /// The canonical version-1 encoding (see the module documentation).
    ///
    /// Strings longer than `u32::MAX` bytes (never accepted by the log) are cut at a character
    /// boundary so that the output always decodes.
    pub fn encode(&self) -> Vec<u8> {
        encode_leaf(self.seq, &self.record)
    }

    /// Decodes a version-1 encoding; [`Error::Corrupted`] if `bytes` is not exactly one.
    pub fn decode(bytes: &[u8]) -> Result<AuditLeaf> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != LEAF_FORMAT_VERSION {
            return Err(corrupt(format!("unknown leaf format version {version}")));
        }
        let seq = r.u64()?;
        let time_micros = i64::from_le_bytes(r.array::<8>()?);
        let subject = r.string()?;
        let client = r.string()?;
        let source = r.string()?;
        let request_id = r.string()?;
        let action = AuditAction::parse(&r.string()?);
        let resource_type = r.opt(Reader::string)?;
        let id = r.opt(Reader::string)?;
        let version = r.opt(Reader::u64)?;
        let outcome_name = r.string()?;
        let outcome = AuditOutcome::parse(&outcome_name)
            .ok_or_else(|| corrupt("unknown outcome name".to_owned()))?;
        let content_hash = r.opt(Reader::array::<32>)?;
        let query_hash = r.opt(Reader::array::<32>)?;
        if r.pos != bytes.len() {
            return Err(corrupt(format!(
                "{} trailing bytes after the leaf",
                bytes.len() - r.pos
            )));
        }
        Ok(AuditLeaf {
            seq,
            record: AuditRecord {
                time_micros,
                actor: AuditActor {
                    subject,
                    client,
                    source,
                },
                request_id,
                action,
                resource_type,
                id,
                version,
                outcome,
                content_hash,
                query_hash,
            },
        })
    }

    /// The leaf's Merkle hash, `BLAKE3(0x00 ‖ encode())`.
    pub fn hash(&self) -> Hash {
        leaf_hash(&self.encode())
    }
}

/// The canonical version-1 encoding of leaf `seq` holding `r` (see [`AuditLeaf::encode`]).
pub(crate) fn encode_leaf(seq: u64, r: &AuditRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        128 + r.actor.subject.len()
            + r.actor.client.len()
            + r.actor.source.len()
            + r.request_id.len(),
    );
    out.push(LEAF_FORMAT_VERSION);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&r.time_micros.to_le_bytes());
    put_str(&mut out, &r.actor.subject);
    put_str(&mut out, &r.actor.client);
    put_str(&mut out, &r.actor.source);
    put_str(&mut out, &r.request_id);
    put_str(&mut out, r.action.as_str());
    put_opt(&mut out, r.resource_type.as_deref(), put_str);
    put_opt(&mut out, r.id.as_deref(), put_str);
    put_opt(&mut out, r.version, |o, v| {
        o.extend_from_slice(&v.to_le_bytes())
    });
    put_str(&mut out, r.outcome.as_str());
    put_opt(&mut out, r.content_hash.as_ref(), |o, h| {
        o.extend_from_slice(h)
    });
    put_opt(&mut out, r.query_hash.as_ref(), |o, h| {
        o.extend_from_slice(h)
    });
    out
}

fn corrupt(msg: String) -> Error {
    Error::Corrupted(format!("audit leaf: {msg}"))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = if s.len() > u32::MAX as usize {
        &s[..s.floor_char_boundary(u32::MAX as usize)]
    } else {
        s
    };
    // The cut above guarantees the length fits.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt<T>(out: &mut Vec<u8>, value: Option<T>, put: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put(out, v);
        }
    }
}

/// A bounds-checked cursor over the bytes being decoded.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| corrupt(format!("truncated at byte {}", self.pos)))?;
        let s = self.bytes.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| corrupt("truncated".to_owned()))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array::<8>()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = u32::from_le_bytes(self.array::<4>()?) as usize;
        let at = self.pos;
        let s = self.take(len)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| corrupt(format!("invalid UTF-8 in string at byte {at}")))
    }

    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            t => Err(corrupt(format!(
                "option tag {t} at byte {} is not 0 or 1",
                self.pos - 1
            ))),
        }
    }
}

/// Serde helpers: 32-byte hashes as lowercase hex strings.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes a 32-byte array as hex.
    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Deserializes a 32-byte array from hex.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|e| serde::de::Error::custom(format!("expected 64 hex characters: {e}")))?;
        Ok(out)
    }
}

/// Serde helpers: 64-byte signatures as lowercase hex strings.
pub(crate) mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes a 64-byte array as hex.
    pub(crate) fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Deserializes a 64-byte array from hex.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 64];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|e| serde::de::Error::custom(format!("expected 128 hex characters: {e}")))?;
        Ok(out)
    }
}

/// Serde helpers: optional 32-byte hashes as hex strings or null.
pub(crate) mod hex_opt32 {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes an optional 32-byte array as hex or null.
    pub(crate) fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(h) => s.serialize_some(&hex::encode(h)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes an optional 32-byte array from hex or null.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s {
            None => Ok(None),
            Some(s) => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(&s, &mut out).map_err(|e| {
                    serde::de::Error::custom(format!("expected 64 hex characters: {e}"))
                })?;
                Ok(Some(out))
            }
        }
    }
}

/// Serde helpers: lists of 32-byte hashes as hex strings.
pub(crate) mod hex32_vec {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    /// Serializes a list of 32-byte arrays as hex strings.
    pub(crate) fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    /// Deserializes a list of 32-byte arrays from hex strings.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map(|()| out)
                    .map_err(|e| {
                        serde::de::Error::custom(format!("expected 64 hex characters: {e}"))
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(seq: u64) -> AuditLeaf {
        AuditLeaf {
            seq,
            record: AuditRecord {
                time_micros: 1_700_000_000_000_000,
                actor: AuditActor {
                    subject: "dr-x".into(),
                    client: "cli".into(),
                    source: "local".into(),
                },
                request_id: "req-1".into(),
                action: AuditAction::Update,
                resource_type: Some("Patient".into()),
                id: Some("p1".into()),
                version: Some(3),
                outcome: AuditOutcome::Success,
                content_hash: Some([0xab; 32]),
                query_hash: None,
            },
        }
    }

    #[test]
    fn encoding_is_documented_layout() {
        let leaf = AuditLeaf {
            seq: 2,
            record: AuditRecord {
                time_micros: -1,
                actor: AuditActor {
                    subject: "s".into(),
                    client: "".into(),
                    source: "local".into(),
                },
                request_id: "r".into(),
                action: AuditAction::Read,
                resource_type: None,
                id: Some("x".into()),
                version: None,
                outcome: AuditOutcome::NotFound,
                content_hash: None,
                query_hash: Some([7; 32]),
            },
        };
        let mut want = vec![1u8];
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&[0xff; 8]);
        want.extend_from_slice(&[1, 0, 0, 0, b's']);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[5, 0, 0, 0]);
        want.extend_from_slice(b"local");
        want.extend_from_slice(&[1, 0, 0, 0, b'r']);
        want.extend_from_slice(&[4, 0, 0, 0]);
        want.extend_from_slice(b"read");
        want.push(0);
        want.extend_from_slice(&[1, 1, 0, 0, 0, b'x']);
        want.push(0);
        want.extend_from_slice(&[9, 0, 0, 0]);
        want.extend_from_slice(b"not-found");
        want.push(0);
        want.push(1);
        want.extend_from_slice(&[7; 32]);
        assert_eq!(leaf.encode(), want);
        assert_eq!(AuditLeaf::decode(&want).unwrap(), leaf);
        assert_eq!(leaf.hash(), leaf_hash(&want));
    }

    #[test]
    fn decode_rejects_bad_input() {
        let good = sample(5).encode();
        assert!(AuditLeaf::decode(&good).is_ok());
        assert!(AuditLeaf::decode(&[]).is_err());
        let mut v = good.clone();
        v[0] = 2;
        assert!(matches!(AuditLeaf::decode(&v), Err(Error::Corrupted(_))));
        let mut v = good.clone();
        v.push(0);
        assert!(AuditLeaf::decode(&v).is_err());
        for cut in 0..good.len() {
            assert!(AuditLeaf::decode(&good[..cut]).is_err());
        }
        // A huge length does not allocate or panic.
        let mut v = good[..17].to_vec();
        v.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(AuditLeaf::decode(&v).is_err());
    }

    #[test]
    fn action_names_roundtrip() {
        for a in AuditAction::KNOWN {
            assert_eq!(AuditAction::parse(a.as_str()), a);
        }
        assert_eq!(
            AuditAction::parse("custom-op"),
            AuditAction::Other("custom-op".into())
        );
        for o in AuditOutcome::ALL {
            assert_eq!(AuditOutcome::parse(o.as_str()), Some(o));
        }
    }

    #[test]
    fn json_uses_hex_and_names() {
        let leaf = sample(9);
        let json = serde_json::to_string(&leaf).unwrap();
        assert!(json.contains(&"ab".repeat(32)));
        assert!(json.contains("\"update\""));
        assert!(json.contains("\"success\""));
        let back: AuditLeaf = serde_json::from_str(&json).unwrap();
        assert_eq!(back, leaf);
    }

    #[test]
    fn check_limits_rejects_long_fields() {
        let mut leaf = sample(0);
        assert!(leaf.record.check_limits().is_ok());
        leaf.record.request_id = "x".repeat(MAX_FIELD_LEN + 1);
        assert!(leaf.record.check_limits().is_err());
    }

    fn arb_action() -> impl Strategy<Value = AuditAction> {
        prop_oneof![
            (0usize..16).prop_map(|i| AuditAction::KNOWN[i].clone()),
            ".{0,12}".prop_map(|s| AuditAction::parse(&s)),
        ]
    }

    prop_compose! {
        fn arb_leaf()(
            seq in any::<u64>(),
            time_micros in any::<i64>(),
            subject in ".{0,20}",
            client in ".{0,8}",
            source in ".{0,8}",
            request_id in ".{0,8}",
            action in arb_action(),
            resource_type in proptest::option::of(".{0,8}"),
            id in proptest::option::of(".{0,8}"),
            version in proptest::option::of(any::<u64>()),
            outcome in (0usize..7).prop_map(|i| AuditOutcome::ALL[i]),
            content_hash in proptest::option::of(any::<[u8; 32]>()),
            query_hash in proptest::option::of(any::<[u8; 32]>()),
        ) -> AuditLeaf {
            AuditLeaf { seq, record: AuditRecord {
                time_micros, actor: AuditActor { subject, client, source }, request_id, action,
                resource_type, id, version, outcome, content_hash, query_hash,
            }}
        }
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrips(leaf in arb_leaf()) {
            let bytes = leaf.encode();
            let back = AuditLeaf::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &leaf);
            prop_assert_eq!(back.encode(), bytes);
            let json = serde_json::to_string(&leaf).unwrap();
            let from_json: AuditLeaf = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(from_json, leaf);
        }

        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(leaf) = AuditLeaf::decode(&bytes) {
                // Canonical: whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(leaf.encode(), bytes);
            }
        }

        #[test]
        fn decode_mutated_leaf_never_panics(leaf in arb_leaf(), pos in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = leaf.encode();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(l) = AuditLeaf::decode(&bytes) {
                prop_assert_eq!(l.encode(), bytes);
            }
        }
    }
}
