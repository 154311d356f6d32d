//! The tamper-evident audit log: every engine operation appends one leaf to an RFC 6962 Merkle
//! log (BLAKE3) stored in the same encrypted redb database, with Ed25519-signed tree heads.
//!
//! * [`leaf`]: what a leaf records and its canonical binary encoding.
//! * [`merkle`]: pure tree math: roots, inclusion and consistency proofs, and their verification.
//! * [`head`]: signed tree heads and the JSON proof objects an auditor checks.
//! * `log` (crate-internal): the redb tables, appending, signing, proofs and full verification.

pub mod head;
pub mod leaf;
pub(crate) mod log;
pub mod merkle;

pub use head::{ConsistencyProof, InclusionProof, SignedTreeHead, TREE_HEAD_CONTEXT};
pub use leaf::{
    AuditAction, AuditActor, AuditLeaf, AuditOutcome, AuditRecord, LEAF_FORMAT_VERSION,
    MAX_FIELD_LEN,
};
pub use log::{AuditKey, VerifyReport};
pub use merkle::{
    Hash, NodeSource, empty_root, leaf_hash, node_hash, verify_consistency, verify_inclusion,
};
