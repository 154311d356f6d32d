//! RFC 6962 Merkle tree math over BLAKE3: tree hashes, inclusion and consistency proofs, and their verification.
//!
//! The tree is the RFC 6962 §2.1 Merkle Tree Hash with BLAKE3 in place of SHA-256:
//!
//! * `MTH({})      = BLAKE3("")`
//! * `MTH({d0})    = BLAKE3(0x00 ‖ d0)` (a *leaf hash*)
//! * `MTH(D[n])    = BLAKE3(0x01 ‖ MTH(D[0:k]) ‖ MTH(D[k:n]))`, `k` the largest power of two `< n`.
//!
//! Hashes of complete, aligned subtrees are stored as in Go's `sumdb/tlog`: `node(level, i)` is the
//! root of leaves `[i·2^level, (i+1)·2^level)`. Appending leaf `n` stores `(0, n)` and then, while the
//! new node's index is odd, combines it with its left sibling and stores the parent. With those stored
//! nodes every tree root and proof is computed with `O(log n)` lookups through a [`NodeSource`].
//!
//! Verification ([`verify_inclusion`], [`verify_consistency`]) needs only the proof and the two roots,
//! as an auditor without the database has; it follows RFC 9162 §2.1.3.2 and §2.1.4.2.

use crate::{Error, Result};

/// A 32-byte BLAKE3 hash: a leaf hash, an interior node hash, or a tree root.
pub type Hash = [u8; 32];

/// Domain-separation prefix of a leaf hash.
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior node hash.
const NODE_PREFIX: u8 = 0x01;

/// The hash of a leaf whose encoding is `bytes`: `BLAKE3(0x00 ‖ bytes)`.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF_PREFIX]);
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// The hash of an interior node: `BLAKE3(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[NODE_PREFIX]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The root of the empty tree: `BLAKE3("")`.
pub fn empty_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// Stored hashes of complete subtrees.
pub trait NodeSource {
    /// The root of the complete subtree of leaves `[index·2^level, (index+1)·2^level)`.
    ///
    /// Implementations return an error (normally [`Error::Corrupted`]) if the node is not stored.
    fn node(&self, level: u8, index: u64) -> Result<Hash>;
}

impl<T: NodeSource + ?Sized> NodeSource for &T {
    fn node(&self, level: u8, index: u64) -> Result<Hash> {
        (**self).node(level, index)
    }
}

/// The nodes to store when leaf number `n` (0-based) with hash `leaf` is appended to a tree of `n`
/// leaves: `(0, n, leaf)` and then every complete parent the new leaf finishes, lowest first.
///
/// Reads the left siblings from `source`, which must hold the nodes of the first `n` leaves.
pub fn nodes_to_store_on_append(
    n: u64,
    leaf: Hash,
    source: &impl NodeSource,
) -> Result<Vec<(u8, u64, Hash)>> {
    let mut out = Vec::with_capacity(1 + (n.trailing_ones() as usize));
    out.push((0u8, n, leaf));
    let mut hash = leaf;
    let mut level = 0u8;
    let mut index = n;
    while index & 1 == 1 {
        let left = source.node(level, index - 1)?;
        hash = node_hash(&left, &hash);
        level += 1;
        index >>= 1;
        out.push((level, index, hash));
    }
    Ok(out)
}

/// The largest power of two strictly smaller than `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// `MTH(D[start:end])` for a non-empty range, using stored complete subtrees wherever the range
/// (or a part of its k-split) is one.
fn range_hash(start: u64, end: u64, source: &impl NodeSource) -> Result<Hash> {
    let len = end - start;
    if len.is_power_of_two() && start.is_multiple_of(len) {
        // `trailing_zeros` of a u64 is at most 63, so it always fits a u8.
        let level = len.trailing_zeros() as u8;
        return source.node(level, start >> level);
    }
    let k = split_point(len);
    let left = range_hash(start, start + k, source)?;
    let right = range_hash(start + k, end, source)?;
    Ok(node_hash(&left, &right))
}

/// The root (`MTH`) of the first `size` leaves.
///
/// Performs at most `1 + log2(size)` lookups: one per set bit of `size`.
pub fn root(size: u64, source: &impl NodeSource) -> Result<Hash> {
    if size == 0 {
        return Ok(empty_root());
    }
    // Decompose `size` into complete aligned subtrees, largest (leftmost) first, and fold from the right.
    let mut parts: Vec<Hash> = Vec::with_capacity(size.count_ones() as usize);
    let mut start = 0u64;
    for level in (0..64u8).rev() {
        let width = 1u64 << level;
        if size & width != 0 {
            parts.push(source.node(level, start >> level)?);
            start += width;
        }
    }
    let mut acc: Option<Hash> = None;
    for part in parts.iter().rev() {
        acc = Some(match acc {
            None => *part,
            Some(right) => node_hash(part, &right),
        });
    }
    acc.ok_or_else(|| Error::Corrupted("audit tree root of a non-empty tree has no parts".into()))
}

/// The RFC 6962 §2.1.1 audit path `PATH(index, D[size])`, deepest sibling first.
///
/// Fails with [`Error::InvalidProofRequest`] unless `index < size`.
pub fn inclusion_proof(index: u64, size: u64, source: &impl NodeSource) -> Result<Vec<Hash>> {
    if index >= size {
        return Err(Error::InvalidProofRequest(format!(
            "leaf {index} is not in a tree of {size} leaves"
        )));
    }
    let mut proof = Vec::new();
    path(index, 0, size, source, &mut proof)?;
    Ok(proof)
}

/// `PATH(m, D[start:end])`, appended to `out` in RFC order (deepest first).
fn path(m: u64, start: u64, end: u64, source: &impl NodeSource, out: &mut Vec<Hash>) -> Result<()> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split_point(n);
    if m < k {
        path(m, start, start + k, source, out)?;
        out.push(range_hash(start + k, end, source)?);
    } else {
        path(m - k, start + k, end, source, out)?;
        out.push(range_hash(start, start + k, source)?);
    }
    Ok(())
}

/// The RFC 6962 §2.1.2 consistency proof `PROOF(old_size, D[new_size])`.
///
/// The proof is empty when `old_size` is 0 or equal to `new_size` (verification then compares the
/// roots directly). Fails with [`Error::InvalidProofRequest`] if `old_size > new_size`.
pub fn consistency_proof(
    old_size: u64,
    new_size: u64,
    source: &impl NodeSource,
) -> Result<Vec<Hash>> {
    if old_size > new_size {
        return Err(Error::InvalidProofRequest(format!(
            "old tree size {old_size} is larger than new tree size {new_size}"
        )));
    }
    let mut proof = Vec::new();
    if old_size == 0 || old_size == new_size {
        return Ok(proof);
    }
    subproof(old_size, 0, new_size, true, source, &mut proof)?;
    Ok(proof)
}

/// `SUBPROOF(m, D[start:end], b)`, appended to `out` in RFC order.
fn subproof(
    m: u64,
    start: u64,
    end: u64,
    b: bool,
    source: &impl NodeSource,
    out: &mut Vec<Hash>,
) -> Result<()> {
    let n = end - start;
    if m == n {
        if !b {
            out.push(range_hash(start, end, source)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, start, start + k, b, source, out)?;
        out.push(range_hash(start + k, end, source)?);
    } else {
        subproof(m - k, start + k, end, false, source, out)?;
        out.push(range_hash(start, start + k, source)?);
    }
    Ok(())
}

fn fail(msg: impl Into<String>) -> Error {
    Error::AuditVerification(msg.into())
}

/// Checks that `proof` shows the leaf with hash `leaf_hash` at position `index` in the tree of
/// `size` leaves whose root is `root` (RFC 9162 §2.1.3.2).
///
/// Fails with [`Error::AuditVerification`] saying why.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<()> {
    if index >= size {
        return Err(fail(format!(
            "inclusion proof names leaf {index}, which is not in a tree of {size} leaves"
        )));
    }
    let mut f = index;
    let mut s = size - 1;
    let mut r = *leaf_hash;
    for p in proof {
        if s == 0 {
            return Err(fail(format!(
                "inclusion proof for leaf {index} in a tree of {size} leaves is too long"
            )));
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(fail(format!(
            "inclusion proof for leaf {index} in a tree of {size} leaves is too short"
        )));
    }
    if &r != root {
        return Err(fail(format!(
            "inclusion proof for leaf {index} does not lead to the root of the tree of {size} leaves"
        )));
    }
    Ok(())
}

/// Checks that `proof` shows the tree of `old_size` leaves with root `old_root` is a prefix of the
/// tree of `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2).
///
/// An empty old tree is consistent with every tree (its root must be [`empty_root`] and the proof
/// empty); equal sizes need an empty proof and equal roots. Fails with
/// [`Error::AuditVerification`] saying why.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<()> {
    if old_size > new_size {
        return Err(fail(format!(
            "old tree size {old_size} is larger than new tree size {new_size}: the log shrank"
        )));
    }
    if old_size == 0 {
        if old_root != &empty_root() {
            return Err(fail(
                "the root given for the empty tree is not the empty root",
            ));
        }
        if !proof.is_empty() {
            return Err(fail("consistency proof from the empty tree must be empty"));
        }
        return Ok(());
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(fail(format!(
                "consistency proof between two trees of {old_size} leaves must be empty"
            )));
        }
        if old_root != new_root {
            return Err(fail(format!(
                "two heads of the same size {old_size} have different roots: the log was rewritten"
            )));
        }
        return Ok(());
    }
    let inconsistent = || {
        fail(format!(
            "consistency proof does not show the tree of {old_size} leaves is a prefix of the tree of {new_size} leaves"
        ))
    };
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(inconsistent());
    };
    let mut f = old_size - 1;
    let mut s = new_size - 1;
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut fr = *first;
    let mut sr = *first;
    for c in rest {
        if s == 0 {
            return Err(inconsistent());
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 || &fr != old_root || &sr != new_root {
        return Err(inconsistent());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// In-memory stored nodes, filled by `nodes_to_store_on_append`.
    #[derive(Default)]
    struct MemNodes {
        nodes: HashMap<(u8, u64), Hash>,
        leaves: Vec<Hash>,
    }

    impl NodeSource for MemNodes {
        fn node(&self, level: u8, index: u64) -> Result<Hash> {
            self.nodes
                .get(&(level, index))
                .copied()
                .ok_or_else(|| Error::Corrupted(format!("node ({level}, {index}) missing")))
        }
    }

    impl MemNodes {
        fn with_leaves(n: u64) -> Self {
            let mut m = MemNodes::default();
            for i in 0..n {
                m.push(leaf_hash(&i.to_le_bytes()));
            }
            m
        }
        fn push(&mut self, leaf: Hash) {
            let n = self.leaves.len() as u64;
            let new = nodes_to_store_on_append(n, leaf, &*self).unwrap();
            for (l, i, h) in new {
                self.nodes.insert((l, i), h);
            }
            self.leaves.push(leaf);
        }
    }

    /// The naive recursive RFC 6962 MTH.
    fn naive_mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&naive_mth(&leaves[..k]), &naive_mth(&leaves[k..]))
            }
        }
    }

    fn flip_bit(h: &mut Hash, bit: usize) {
        h[bit / 8] ^= 1 << (bit % 8);
    }

    #[test]
    fn empty_root_is_blake3_of_nothing() {
        assert_eq!(empty_root(), *blake3::hash(&[]).as_bytes());
        let m = MemNodes::default();
        assert_eq!(root(0, &m).unwrap(), empty_root());
    }

    #[test]
    fn single_leaf_root_is_leaf_hash() {
        let m = MemNodes::with_leaves(1);
        assert_eq!(root(1, &m).unwrap(), leaf_hash(&0u64.to_le_bytes()));
    }

    #[test]
    fn roots_match_naive_mth_for_all_sizes() {
        let m = MemNodes::with_leaves(70);
        for size in 0..=70usize {
            assert_eq!(
                root(size as u64, &m).unwrap(),
                naive_mth(&m.leaves[..size]),
                "size {size}"
            );
        }
    }

    #[test]
    fn stored_node_count_matches_tlog() {
        // Appending leaf n stores 1 + trailing_ones(n) nodes.
        let m = MemNodes::with_leaves(70);
        let expected: u64 = (0..70u64).map(|n| 1 + u64::from(n.trailing_ones())).sum();
        assert_eq!(m.nodes.len() as u64, expected);
    }

    #[test]
    fn inclusion_proofs_verify_and_reject_tampering() {
        let m = MemNodes::with_leaves(70);
        for size in 1..=70u64 {
            let r = naive_mth(&m.leaves[..size as usize]);
            for index in 0..size {
                let leaf = m.leaves[index as usize];
                let proof = inclusion_proof(index, size, &m).unwrap();
                verify_inclusion(&leaf, index, size, &proof, &r).unwrap();

                // Every single-bit change in a proof element fails (a sample of bits per element).
                for e in 0..proof.len() {
                    for bit in [0usize, 7, 100, 255] {
                        let mut bad = proof.clone();
                        flip_bit(&mut bad[e], bit);
                        assert!(verify_inclusion(&leaf, index, size, &bad, &r).is_err());
                    }
                }
                // Wrong index.
                for wrong in [index + 1, index.wrapping_sub(1), index ^ 1] {
                    if wrong != index && wrong < size {
                        assert!(
                            verify_inclusion(&leaf, wrong, size, &proof, &r).is_err(),
                            "index {index} accepted as {wrong} in size {size}"
                        );
                    }
                }
                assert!(verify_inclusion(&leaf, size, size, &proof, &r).is_err());
                // Wrong size: the proof does not lead to the root of the tree of that size.
                // (The size is bound to its root by the signed tree head.)
                for wrong in [size + 1, size - 1, size * 2] {
                    if wrong != size && wrong > index && wrong <= 70 {
                        let wrong_root = naive_mth(&m.leaves[..wrong as usize]);
                        assert!(
                            verify_inclusion(&leaf, index, wrong, &proof, &wrong_root).is_err(),
                            "size {size} accepted as {wrong} (index {index})"
                        );
                    }
                }
                // Wrong root, wrong leaf.
                let mut bad_root = r;
                flip_bit(&mut bad_root, 3);
                assert!(verify_inclusion(&leaf, index, size, &proof, &bad_root).is_err());
                let mut bad_leaf = leaf;
                flip_bit(&mut bad_leaf, 200);
                assert!(verify_inclusion(&bad_leaf, index, size, &proof, &r).is_err());
                // Truncated and extended proofs.
                if !proof.is_empty() {
                    assert!(
                        verify_inclusion(&leaf, index, size, &proof[..proof.len() - 1], &r)
                            .is_err()
                    );
                }
                let mut longer = proof.clone();
                longer.push([0u8; 32]);
                assert!(verify_inclusion(&leaf, index, size, &longer, &r).is_err());
            }
        }
    }

    #[test]
    fn inclusion_proof_rejects_bad_requests() {
        let m = MemNodes::with_leaves(5);
        assert!(matches!(
            inclusion_proof(5, 5, &m),
            Err(Error::InvalidProofRequest(_))
        ));
        assert!(matches!(
            inclusion_proof(0, 0, &m),
            Err(Error::InvalidProofRequest(_))
        ));
        // Beyond what is stored: missing nodes are reported, not a panic.
        assert!(inclusion_proof(3, 9, &m).is_err());
    }

    #[test]
    fn consistency_proofs_verify_and_reject_tampering() {
        let m = MemNodes::with_leaves(70);
        let roots: Vec<Hash> = (0..=70usize).map(|s| naive_mth(&m.leaves[..s])).collect();
        for new in 0..=70u64 {
            for old in 0..=new {
                let proof = consistency_proof(old, new, &m).unwrap();
                let (or, nr) = (roots[old as usize], roots[new as usize]);
                verify_consistency(old, new, &or, &nr, &proof).unwrap();

                for e in 0..proof.len() {
                    for bit in [0usize, 9, 128, 255] {
                        let mut bad = proof.clone();
                        flip_bit(&mut bad[e], bit);
                        assert!(
                            verify_consistency(old, new, &or, &nr, &bad).is_err(),
                            "flipped bit accepted ({old}, {new}) element {e}"
                        );
                    }
                }
                let mut bad_old = or;
                flip_bit(&mut bad_old, 1);
                assert!(verify_consistency(old, new, &bad_old, &nr, &proof).is_err());
                if old > 0 {
                    let mut bad_new = nr;
                    flip_bit(&mut bad_new, 1);
                    assert!(verify_consistency(old, new, &or, &bad_new, &proof).is_err());
                }
                // Wrong sizes, each with the true root of the tree of that size.
                if old > 0 && old < new {
                    for wrong_old in [old - 1, old + 1] {
                        if wrong_old > 0 && wrong_old != old && wrong_old <= new {
                            let wor = roots[wrong_old as usize];
                            assert!(
                                verify_consistency(wrong_old, new, &wor, &nr, &proof).is_err(),
                                "old size {old} accepted as {wrong_old} (new {new})"
                            );
                        }
                    }
                    for wrong_new in [new - 1, new + 1] {
                        if wrong_new > old && wrong_new != new && wrong_new <= 70 {
                            let wnr = roots[wrong_new as usize];
                            assert!(
                                verify_consistency(old, wrong_new, &or, &wnr, &proof).is_err(),
                                "new size {new} accepted as {wrong_new} (old {old})"
                            );
                        }
                    }
                }
                // A proof between different trees of the same sizes fails.
                if old > 0 && old < new {
                    let other = roots[(old as usize) - 1];
                    assert!(verify_consistency(old, new, &other, &nr, &proof).is_err());
                }
                // Truncated / extended proofs.
                if !proof.is_empty() {
                    assert!(
                        verify_consistency(old, new, &or, &nr, &proof[..proof.len() - 1]).is_err()
                    );
                }
                let mut longer = proof.clone();
                longer.push([7u8; 32]);
                assert!(verify_consistency(old, new, &or, &nr, &longer).is_err());
            }
        }
    }

    #[test]
    fn consistency_rejects_shrinking() {
        let m = MemNodes::with_leaves(8);
        assert!(matches!(
            consistency_proof(5, 4, &m),
            Err(Error::InvalidProofRequest(_))
        ));
        let r = root(4, &m).unwrap();
        assert!(verify_consistency(5, 4, &r, &r, &[]).is_err());
        // Same size, different roots.
        let r5 = root(5, &m).unwrap();
        assert!(verify_consistency(4, 4, &r, &r5, &[]).is_err());
        // Empty old tree with a non-empty root.
        assert!(verify_consistency(0, 4, &r, &r, &[]).is_err());
    }

    #[test]
    fn all_flipped_bits_of_one_proof_fail() {
        let m = MemNodes::with_leaves(37);
        let r = root(37, &m).unwrap();
        let proof = inclusion_proof(21, 37, &m).unwrap();
        let leaf = m.leaves[21];
        for e in 0..proof.len() {
            for bit in 0..256 {
                let mut bad = proof.clone();
                flip_bit(&mut bad[e], bit);
                assert!(verify_inclusion(&leaf, 21, 37, &bad, &r).is_err());
            }
        }
        let r13 = root(13, &m).unwrap();
        let cproof = consistency_proof(13, 37, &m).unwrap();
        for e in 0..cproof.len() {
            for bit in 0..256 {
                let mut bad = cproof.clone();
                flip_bit(&mut bad[e], bit);
                assert!(verify_consistency(13, 37, &r13, &r, &bad).is_err());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_large_trees(size in 1u64..3000, a in any::<u64>(), b in any::<u64>()) {
            let m = MemNodes::with_leaves(size);
            let r = naive_mth(&m.leaves);
            prop_assert_eq!(root(size, &m).unwrap(), r);
            let index = a % size;
            let proof = inclusion_proof(index, size, &m).unwrap();
            prop_assert!(verify_inclusion(&m.leaves[index as usize], index, size, &proof, &r).is_ok());
            if index + 1 < size {
                prop_assert!(verify_inclusion(&m.leaves[index as usize], index + 1, size, &proof, &r).is_err());
            }
            let old = b % (size + 1);
            let or = root(old, &m).unwrap();
            prop_assert_eq!(or, naive_mth(&m.leaves[..old as usize]));
            let cproof = consistency_proof(old, size, &m).unwrap();
            prop_assert!(verify_consistency(old, size, &or, &r, &cproof).is_ok());
            if !cproof.is_empty() {
                let mut bad = cproof.clone();
                bad[0][0] ^= 1;
                prop_assert!(verify_consistency(old, size, &or, &r, &bad).is_err());
            }
        }

        #[test]
        fn verification_never_panics(
            leaf in any::<[u8; 32]>(),
            index in any::<u64>(),
            size in any::<u64>(),
            new_size in any::<u64>(),
            proof in proptest::collection::vec(any::<[u8; 32]>(), 0..70),
            r in any::<[u8; 32]>(),
        ) {
            let _ = verify_inclusion(&leaf, index, size, &proof, &r);
            let _ = verify_consistency(index, new_size, &leaf, &r, &proof);
            let _ = verify_consistency(size, size.saturating_add(index % 5), &leaf, &r, &proof);
        }
    }
}
