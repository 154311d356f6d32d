//! Signed tree heads and the proof objects an auditor checks against them.
//!
//! A [`SignedTreeHead`] is an Ed25519 signature over the bytes
//!
//! ```text
//! "fhirkeep tree head v1\n"   22 ASCII bytes
//! size                        u64 little-endian (8 bytes)
//! root                        32 bytes
//! time_micros                 i64 little-endian (8 bytes)
//! ```
//!
//! (70 bytes in all), made with the database's audit signing key. Heads, inclusion proofs and
//! consistency proofs have a JSON form with hashes, keys and signatures as lowercase hex, so an
//! auditor can keep heads as files and check later proofs without the database.
//!
//! The stored (binary) form of a head, used in the `audit_heads` table, is 145 bytes: a version
//! byte `0x01`, then size (u64 LE), root (32), time (i64 LE), public key (32), signature (64).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::leaf::{hex32, hex32_vec, hex64};
use super::merkle::{Hash, verify_consistency, verify_inclusion};
use crate::{Error, Result};

/// Domain-separation prefix of the signed tree head message.
pub const TREE_HEAD_CONTEXT: &[u8] = b"fhirkeep tree head v1\n";

/// Version byte of the stored binary head encoding.
const HEAD_FORMAT_VERSION: u8 = 1;

/// Length of the stored binary head encoding.
const HEAD_ENCODED_LEN: usize = 1 + 8 + 32 + 8 + 32 + 64;

/// A signed statement of the log's size and root at a point in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    /// Number of leaves the head covers.
    pub size: u64,
    /// Merkle root of the first `size` leaves.
    #[serde(with = "hex32")]
    pub root: Hash,
    /// When the head was signed, in microseconds since the Unix epoch.
    pub time_micros: i64,
    /// The Ed25519 public key that signed it.
    #[serde(with = "hex32")]
    pub public_key: [u8; 32],
    /// The Ed25519 signature over [`SignedTreeHead::signed_bytes`].
    #[serde(with = "hex64")]
    pub signature: [u8; 64],
}

impl SignedTreeHead {
    /// The bytes the signature covers: context string ‖ size LE ‖ root ‖ time LE.
    pub fn signed_bytes(size: u64, root: &Hash, time_micros: i64) -> Vec<u8> {
        let mut m = Vec::with_capacity(TREE_HEAD_CONTEXT.len() + 48);
        m.extend_from_slice(TREE_HEAD_CONTEXT);
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(root);
        m.extend_from_slice(&time_micros.to_le_bytes());
        m
    }

    /// Signs `size`, `root` and `time_micros` with `key`.
    pub(crate) fn sign(key: &SigningKey, size: u64, root: Hash, time_micros: i64) -> Self {
        let sig = key.sign(&Self::signed_bytes(size, &root, time_micros));
        SignedTreeHead {
            size,
            root,
            time_micros,
            public_key: key.verifying_key().to_bytes(),
            signature: sig.to_bytes(),
        }
    }

    /// Checks the signature against the head's own public key.
    ///
    /// This shows the head is intact, not who made it: an auditor also checks the key, with
    /// [`SignedTreeHead::verify_with_key`].
    pub fn verify(&self) -> Result<()> {
        let key = VerifyingKey::from_bytes(&self.public_key).map_err(|_| {
            Error::AuditVerification(format!(
                "tree head of size {} has an invalid public key",
                self.size
            ))
        })?;
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(
            &Self::signed_bytes(self.size, &self.root, self.time_micros),
            &sig,
        )
        .map_err(|_| {
            Error::AuditVerification(format!(
                "tree head of size {} has a bad signature: the head was altered",
                self.size
            ))
        })
    }

    /// Checks that the head was signed by `trusted_public_key` and that the signature is valid.
    pub fn verify_with_key(&self, trusted_public_key: &[u8; 32]) -> Result<()> {
        if &self.public_key != trusted_public_key {
            return Err(Error::AuditVerification(format!(
                "tree head of size {} was signed by key {}, not the trusted key {}",
                self.size,
                hex::encode(self.public_key),
                hex::encode(trusted_public_key)
            )));
        }
        self.verify()
    }

    /// The head as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain integers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a head from JSON (does not check the signature).
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json)
            .map_err(|e| Error::AuditVerification(format!("tree head JSON is not valid: {e}")))
    }

    /// The stored binary form (see the module documentation).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_ENCODED_LEN);
        out.push(HEAD_FORMAT_VERSION);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(&self.time_micros.to_le_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses the stored binary form; [`Error::Corrupted`] if it is not one.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || Error::Corrupted("stored audit tree head is damaged".to_owned());
        if bytes.len() != HEAD_ENCODED_LEN || bytes.first() != Some(&HEAD_FORMAT_VERSION) {
            return Err(bad());
        }
        let field = |from: usize, to: usize| bytes.get(from..to).ok_or_else(bad);
        let arr8 = |from: usize| -> Result<[u8; 8]> {
            field(from, from + 8)?.try_into().map_err(|_| bad())
        };
        let arr32 = |from: usize| -> Result<[u8; 32]> {
            field(from, from + 32)?.try_into().map_err(|_| bad())
        };
        Ok(SignedTreeHead {
            size: u64::from_le_bytes(arr8(1)?),
            root: arr32(9)?,
            time_micros: i64::from_le_bytes(arr8(41)?),
            public_key: arr32(49)?,
            signature: field(81, 145)?.try_into().map_err(|_| bad())?,
        })
    }
}

/// Proof that one leaf is in the tree of a given size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// Position of the leaf.
    pub leaf_index: u64,
    /// Size of the tree the proof is for.
    pub tree_size: u64,
    /// Hash of the leaf ([`super::AuditLeaf::hash`]).
    #[serde(with = "hex32")]
    pub leaf_hash: Hash,
    /// The RFC 6962 audit path, deepest sibling first.
    #[serde(with = "hex32_vec")]
    pub path: Vec<Hash>,
}

impl InclusionProof {
    /// Checks the proof against a signed head of the same size (and the head's signature).
    pub fn verify(&self, head: &SignedTreeHead) -> Result<()> {
        head.verify()?;
        if head.size != self.tree_size {
            return Err(Error::AuditVerification(format!(
                "inclusion proof is for a tree of {} leaves but the head has {}",
                self.tree_size, head.size
            )));
        }
        verify_inclusion(
            &self.leaf_hash,
            self.leaf_index,
            self.tree_size,
            &self.path,
            &head.root,
        )
    }

    /// The proof as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a proof from JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::AuditVerification(format!("inclusion proof JSON is not valid: {e}"))
        })
    }
}

/// Proof that the tree of `old_size` leaves is a prefix of the tree of `new_size` leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    /// Size of the earlier tree.
    pub old_size: u64,
    /// Size of the later tree.
    pub new_size: u64,
    /// The RFC 6962 consistency proof.
    #[serde(with = "hex32_vec")]
    pub path: Vec<Hash>,
}

impl ConsistencyProof {
    /// Checks the proof against two signed heads of the matching sizes, signed by the same key.
    pub fn verify(&self, old: &SignedTreeHead, new: &SignedTreeHead) -> Result<()> {
        if old.public_key != new.public_key {
            return Err(Error::AuditVerification(
                "the two tree heads were signed by different keys".to_owned(),
            ));
        }
        self.verify_rotated(old, new, &old.public_key)
    }

    /// Checks the proof across a rotation of the signing key: `old` signed by its own key,
    /// `new` by `new_key`, the key that a rotation leaf between them names (see
    /// `Store::rotate_audit_key`; check that leaf's inclusion first).
    pub fn verify_rotated(
        &self,
        old: &SignedTreeHead,
        new: &SignedTreeHead,
        new_key: &[u8; 32],
    ) -> Result<()> {
        old.verify()?;
        new.verify_with_key(new_key)?;
        if old.size != self.old_size || new.size != self.new_size {
            return Err(Error::AuditVerification(format!(
                "consistency proof is for sizes {} -> {} but the heads have sizes {} -> {}",
                self.old_size, self.new_size, old.size, new.size
            )));
        }
        verify_consistency(
            self.old_size,
            self.new_size,
            &old.root,
            &new.root,
            &self.path,
        )
    }

    /// The proof as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a proof from JSON.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| {
            Error::AuditVerification(format!("consistency proof JSON is not valid: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::empty_root;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn signed_bytes_layout() {
        let m = SignedTreeHead::signed_bytes(3, &[9; 32], -2);
        assert_eq!(m.len(), 70);
        assert_eq!(&m[..22], b"fhirkeep tree head v1\n");
        assert_eq!(&m[22..30], &3u64.to_le_bytes());
        assert_eq!(&m[30..62], &[9; 32]);
        assert_eq!(&m[62..70], &(-2i64).to_le_bytes());
    }

    #[test]
    fn sign_verify_and_tamper() {
        let k = key(1);
        let h = SignedTreeHead::sign(&k, 5, [3; 32], 1000);
        h.verify().unwrap();
        h.verify_with_key(&k.verifying_key().to_bytes()).unwrap();
        assert!(
            h.verify_with_key(&key(2).verifying_key().to_bytes())
                .is_err()
        );

        let mut bad = h.clone();
        bad.size = 6;
        assert!(matches!(bad.verify(), Err(Error::AuditVerification(_))));
        let mut bad = h.clone();
        bad.root[0] ^= 1;
        assert!(bad.verify().is_err());
        let mut bad = h.clone();
        bad.time_micros += 1;
        assert!(bad.verify().is_err());
        let mut bad = h.clone();
        bad.signature[10] ^= 1;
        assert!(bad.verify().is_err());
        let mut bad = h.clone();
        bad.public_key = [0xff; 32];
        assert!(bad.verify().is_err());
    }

    #[test]
    fn json_and_binary_roundtrip() {
        let h = SignedTreeHead::sign(&key(4), 0, empty_root(), 7);
        let json = h.to_json();
        assert!(json.contains(&hex::encode(h.root)));
        assert_eq!(SignedTreeHead::from_json(&json).unwrap(), h);
        assert_eq!(SignedTreeHead::decode(&h.encode()).unwrap(), h);
        assert!(SignedTreeHead::decode(&h.encode()[..100]).is_err());
        assert!(SignedTreeHead::from_json("{\"size\":1}").is_err());
        let p = InclusionProof {
            leaf_index: 1,
            tree_size: 2,
            leaf_hash: [1; 32],
            path: vec![[2; 32]],
        };
        assert_eq!(InclusionProof::from_json(&p.to_json()).unwrap(), p);
        let c = ConsistencyProof {
            old_size: 1,
            new_size: 2,
            path: vec![[2; 32], [3; 32]],
        };
        assert_eq!(ConsistencyProof::from_json(&c.to_json()).unwrap(), c);
    }
}
