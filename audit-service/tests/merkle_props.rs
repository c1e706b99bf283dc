//! Property tests: the tree's roots and proofs equal a straightforward
//! recursive RFC 6962 reference (MTH, PATH, PROOF), and the RFC 9162
//! verifiers accept exactly the honest proofs.

use proptest::prelude::*;
use secureops_audit::encoding::Hash;
use secureops_audit::merkle::{
    MerkleTree, RootBuilder, empty_root, leaf_hash, node_hash, verify_consistency, verify_inclusion,
};

fn k_of(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// RFC 6962 §2.1 MTH.
fn mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => empty_root(),
        1 => d[0],
        n => {
            let k = k_of(n);
            node_hash(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

/// RFC 6962 §2.1.1 PATH(m, D[n]).
fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    let n = d.len();
    if n <= 1 {
        return vec![];
    }
    let k = k_of(n);
    if m < k {
        let mut p = path(m, &d[..k]);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = path(m - k, &d[k..]);
        p.push(mth(&d[..k]));
        p
    }
}

/// RFC 6962 §2.1.2 SUBPROOF(m, D[n], b).
fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { vec![] } else { vec![mth(d)] };
    }
    let k = k_of(n);
    if m <= k {
        let mut p = subproof(m, &d[..k], b);
        p.push(mth(&d[k..]));
        p
    } else {
        let mut p = subproof(m - k, &d[k..], false);
        p.push(mth(&d[..k]));
        p
    }
}

fn leaves(n: usize, salt: u8) -> Vec<Hash> {
    (0..n)
        .map(|i| leaf_hash(format!("entry-{salt}-{i}").as_bytes()))
        .collect()
}

fn tree_of(d: &[Hash]) -> MerkleTree {
    let mut t = MerkleTree::new();
    for h in d {
        t.push(*h);
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn roots_match_reference(n in 0usize..300, salt in any::<u8>(), s_frac in 0.0f64..=1.0) {
        let d = leaves(n, salt);
        let t = tree_of(&d);
        let s = ((n as f64) * s_frac) as usize;
        prop_assert_eq!(t.root(s as u64).unwrap(), mth(&d[..s]));
        prop_assert_eq!(t.root(n as u64).unwrap(), mth(&d));
        let mut rb = RootBuilder::new();
        for h in &d[..s] { rb.push(*h); }
        prop_assert_eq!(rb.root(), mth(&d[..s]));
        prop_assert!(t.root(n as u64 + 1).is_err());
    }

    #[test]
    fn inclusion_matches_reference(n in 1usize..300, salt in any::<u8>(), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
        let d = leaves(n, salt);
        let t = tree_of(&d);
        // tree size s in 1..=n, index m < s
        let s = b.index(n) + 1;
        let m = a.index(s);
        let p = t.inclusion_proof(m as u64, s as u64).unwrap();
        prop_assert_eq!(&p, &path(m, &d[..s]));
        let root = mth(&d[..s]);
        prop_assert!(verify_inclusion(&d[m], m as u64, s as u64, &p, &root));
        // Wrong leaf, wrong index, wrong size, tampered path: rejected.
        let other = leaf_hash(b"other");
        prop_assert!(!verify_inclusion(&other, m as u64, s as u64, &p, &root));
        if s > 1 {
            let m2 = (m + 1) % s;
            if d[m2] != d[m] {
                prop_assert!(!verify_inclusion(&d[m], m2 as u64, s as u64, &p, &root));
            }
            let mut bad = p.clone();
            let i = flip.index(bad.len());
            bad[i][0] ^= 1;
            prop_assert!(!verify_inclusion(&d[m], m as u64, s as u64, &bad, &root));
            let mut short = p.clone();
            short.pop();
            prop_assert!(!verify_inclusion(&d[m], m as u64, s as u64, &short, &root));
        }
        // (The same path may legitimately fit another size with the same
        // shape, so only structurally impossible sizes are rejected.)
        prop_assert!(!verify_inclusion(&d[m], s as u64, s as u64, &p, &root));
        prop_assert!(t.inclusion_proof(s as u64, s as u64).is_err());
    }

    #[test]
    fn consistency_matches_reference(n in 1usize..300, salt in any::<u8>(), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>()) {
        let d = leaves(n, salt);
        let t = tree_of(&d);
        let to = b.index(n) + 1;
        let from = a.index(to) + 1; // 1..=to
        let p = t.consistency_proof(from as u64, to as u64).unwrap();
        let expected = if from == to { vec![] } else { subproof(from, &d[..to], true) };
        prop_assert_eq!(&p, &expected);
        let r1 = mth(&d[..from]);
        let r2 = mth(&d[..to]);
        prop_assert!(verify_consistency(from as u64, to as u64, &r1, &r2, &p));
        // A different old tree (one leaf changed) is not consistent.
        let mut d2 = d.clone();
        d2[from - 1] = leaf_hash(b"forged");
        let r1_forged = mth(&d2[..from]);
        prop_assert!(!verify_consistency(from as u64, to as u64, &r1_forged, &r2, &p));
        if from < to {
            prop_assert!(!verify_consistency(from as u64, to as u64, &r1, &r1_forged, &p));
            let mut bad = p.clone();
            let i = flip.index(bad.len());
            bad[i][31] ^= 0x80;
            prop_assert!(!verify_consistency(from as u64, to as u64, &r1, &r2, &bad));
            prop_assert!(!verify_consistency(from as u64, to as u64, &r1, &r2, &[]));
        }
        prop_assert!(t.consistency_proof(to as u64 + 1, to as u64).is_err());
    }
}

#[test]
fn empty_and_zero_size_edges() {
    let t = MerkleTree::new();
    assert_eq!(t.root(0).unwrap(), empty_root());
    assert!(t.inclusion_proof(0, 0).is_err());
    let d = leaves(5, 1);
    let t = tree_of(&d);
    assert!(t.consistency_proof(0, 5).unwrap().is_empty());
    assert!(verify_consistency(0, 5, &empty_root(), &mth(&d), &[]));
    assert!(!verify_inclusion(&d[0], 0, 0, &[], &empty_root()));
}
