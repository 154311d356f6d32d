//! Fuzz target: the auditor-facing proof parsers (`SignedTreeHead`, `InclusionProof`,
//! `ConsistencyProof` `from_json`) and the RFC 9162 verifiers never panic on hostile input,
//! neither on raw JSON text nor on arbitrary sizes, indices and proof vectors; and a proof
//! that verifies against a tree the harness built itself must be the honest one.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use fhirkeep_engine::audit::merkle::{verify_consistency, verify_inclusion};
use fhirkeep_engine::audit::{
    ConsistencyProof, Hash, InclusionProof, SignedTreeHead, empty_root, leaf_hash, node_hash,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Input {
    /// Raw JSON text for each parser (and the cross-checks between them).
    Json {
        head: String,
        head2: String,
        inclusion: String,
        consistency: String,
    },
    /// Arbitrary numbers and hashes straight into the verifiers.
    Raw {
        leaf: Hash,
        index: u64,
        size: u64,
        old_size: u64,
        new_size: u64,
        root_a: Hash,
        root_b: Hash,
        proof: Vec<Hash>,
    },
    /// A real tree of `n` leaves built here, with proofs that may be tampered with.
    Tree {
        n: u8,
        index: u8,
        old: u8,
        tamper: Vec<(u8, u8, u8)>,
        truncate: Option<u8>,
        extra: Option<Hash>,
    },
}

/// RFC 9162 MTH over leaf hashes.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// Largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// RFC 9162 PATH(m, D[n]).
fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = path(m, &leaves[..k]);
        p.push(mth(&leaves[k..]));
        p
    } else {
        let mut p = path(m - k, &leaves[k..]);
        p.push(mth(&leaves[..k]));
        p
    }
}

/// RFC 9162 PROOF(m, D[n]).
fn consistency(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete { Vec::new() } else { vec![mth(leaves)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, &leaves[..k], complete);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }
    if m == 0 || m == leaves.len() {
        return Vec::new();
    }
    subproof(m, leaves, true)
}

fn tamper(proof: &mut Vec<Hash>, edits: &[(u8, u8, u8)], truncate: Option<u8>, extra: Option<Hash>) {
    for &(i, byte, xor) in edits {
        if proof.is_empty() {
            break;
        }
        let i = usize::from(i) % proof.len();
        proof[i][usize::from(byte) % 32] ^= xor;
    }
    if let Some(t) = truncate {
        proof.truncate(usize::from(t));
    }
    if let Some(h) = extra {
        proof.push(h);
    }
}

fn json_case(head: &str, head2: &str, inclusion: &str, consistency: &str) {
    let h1 = SignedTreeHead::from_json(head);
    let h2 = SignedTreeHead::from_json(head2);
    let inc = InclusionProof::from_json(inclusion);
    let con = ConsistencyProof::from_json(consistency);
    if let Ok(h) = &h1 {
        let _ = h.verify();
        let _ = h.verify_with_key(&h.public_key);
        // What we print we must parse back to the same value.
        let back = SignedTreeHead::from_json(&h.to_json()).expect("head JSON round trip");
        assert_eq!(&back, h);
    }
    if let Ok(p) = &inc {
        let back = InclusionProof::from_json(&p.to_json()).expect("inclusion JSON round trip");
        assert_eq!(&back, p);
        let _ = verify_inclusion(&p.leaf_hash, p.leaf_index, p.tree_size, &p.path, &p.leaf_hash);
        if let Ok(h) = &h1 {
            let _ = p.verify(h);
        }
    }
    if let Ok(p) = &con {
        let back = ConsistencyProof::from_json(&p.to_json()).expect("consistency JSON round trip");
        assert_eq!(&back, p);
        let _ = verify_consistency(p.old_size, p.new_size, &empty_root(), &empty_root(), &p.path);
        if let (Ok(a), Ok(b)) = (&h1, &h2) {
            let _ = p.verify(a, b);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary(&mut u) else {
        return;
    };
    match input {
        Input::Json {
            head,
            head2,
            inclusion,
            consistency,
        } => json_case(&head, &head2, &inclusion, &consistency),
        Input::Raw {
            leaf,
            index,
            size,
            old_size,
            new_size,
            root_a,
            root_b,
            proof,
        } => {
            let _ = verify_inclusion(&leaf, index, size, &proof, &root_a);
            let _ = verify_consistency(old_size, new_size, &root_a, &root_b, &proof);
            // Edge sizes that stress the bit loops.
            for s in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 63) + 1] {
                let _ = verify_inclusion(&leaf, index % s, s, &proof, &root_a);
                let _ = verify_consistency(old_size % s, s, &root_a, &root_b, &proof);
            }
        }
        Input::Tree {
            n,
            index,
            old,
            tamper: edits,
            truncate,
            extra,
        } => {
            let n = usize::from(n) + 1;
            let leaves: Vec<Hash> = (0..n as u64).map(|i| leaf_hash(&i.to_le_bytes())).collect();
            let root = mth(&leaves);
            let m = usize::from(index) % n;

            let honest = path(m, &leaves);
            verify_inclusion(&leaves[m], m as u64, n as u64, &honest, &root)
                .expect("honest inclusion proof must verify");
            let mut forged = honest.clone();
            tamper(&mut forged, &edits, truncate, extra);
            if verify_inclusion(&leaves[m], m as u64, n as u64, &forged, &root).is_ok() {
                assert_eq!(forged, honest, "a tampered inclusion proof verified");
            }

            let old = usize::from(old) % (n + 1);
            let old_root = mth(&leaves[..old]);
            let honest = consistency(old, &leaves);
            verify_consistency(old as u64, n as u64, &old_root, &root, &honest)
                .expect("honest consistency proof must verify");
            let mut forged = honest.clone();
            tamper(&mut forged, &edits, truncate, extra);
            if verify_consistency(old as u64, n as u64, &old_root, &root, &forged).is_ok() {
                // RFC 9162 verification ignores nothing: only the honest proof may pass. The
                // one exception is a power-of-two old size, whose proof omits the old root.
                assert_eq!(forged, honest, "a tampered consistency proof verified");
            }
            // A different old root must not be accepted for a non-empty old tree.
            if old > 0 {
                let mut wrong = old_root;
                wrong[0] ^= 1;
                assert!(
                    verify_consistency(old as u64, n as u64, &wrong, &root, &honest).is_err(),
                    "consistency accepted a wrong old root"
                );
            }
        }
    }
});
