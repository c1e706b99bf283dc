//! RFC 6962 / RFC 9162 Merkle tree: hashing, an append-only in-memory tree
//! that serves inclusion and consistency proofs, a streaming root builder, and
//! proof verification.
//!
//! * leaf hash `SHA-256(0x00 ‖ entry)`, node hash `SHA-256(0x01 ‖ left ‖ right)`;
//! * the root of zero leaves is `SHA-256("")`;
//! * proofs are audit paths in the RFC 6962 §2.1.1 / §2.1.2 order (bottom-up),
//!   verified with the RFC 9162 §2.1.3.2 / §2.1.4.2 algorithms.

use crate::encoding::Hash;
use sha2::{Digest, Sha256};

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Largest power of two strictly smaller than `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Why a proof cannot be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// Index or sizes outside the tree.
    #[error("out of range: {0}")]
    OutOfRange(String),
}

/// Append-only Merkle tree keeping every complete subtree hash (2·n hashes),
/// so proofs for any tree size up to the current one are O(log n).
#[derive(Debug, Default, Clone)]
pub struct MerkleTree {
    /// `levels[k][j]` = hash of leaves `[j·2^k, (j+1)·2^k)`.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut level = 0;
        let mut idx = self.levels[0].len() - 1;
        while idx % 2 == 1 {
            let parent = node_hash(&self.levels[level][idx - 1], &self.levels[level][idx]);
            if self.levels.len() <= level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
            idx /= 2;
        }
    }

    /// Leaf hash at `index`.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// MTH of leaves `[a, b)`; `a` must be a multiple of the largest power of
    /// two below `b - a` (always true inside the RFC 6962 recursion) and
    /// `b <= size`.
    fn mth(&self, a: u64, b: u64) -> Hash {
        let n = b - a;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && a.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][(a >> k) as usize];
        }
        let k = split(n);
        node_hash(&self.mth(a, a + k), &self.mth(a + k, b))
    }

    /// Root hash of the first `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, ProofError> {
        if size > self.size() {
            return Err(ProofError::OutOfRange(format!(
                "tree size {size} > {}",
                self.size()
            )));
        }
        Ok(self.mth(0, size))
    }

    /// RFC 6962 `PATH(index, D[0:size])`.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        if size > self.size() || index >= size {
            return Err(ProofError::OutOfRange(format!(
                "index {index} not in tree of size {size} (log has {})",
                self.size()
            )));
        }
        let mut out = Vec::new();
        self.path(index, 0, size, &mut out);
        Ok(out)
    }

    fn path(&self, m: u64, a: u64, b: u64, out: &mut Vec<Hash>) {
        let n = b - a;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < k {
            self.path(m, a, a + k, out);
            out.push(self.mth(a + k, b));
        } else {
            self.path(m - k, a + k, b, out);
            out.push(self.mth(a, a + k));
        }
    }

    /// RFC 6962 `PROOF(from, D[0:to])`.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
        if to > self.size() || from > to {
            return Err(ProofError::OutOfRange(format!(
                "consistency {from} -> {to} (log has {})",
                self.size()
            )));
        }
        let mut out = Vec::new();
        if from > 0 && from < to {
            self.subproof(from, 0, to, true, &mut out);
        }
        Ok(out)
    }

    fn subproof(&self, m: u64, a: u64, b: u64, first: bool, out: &mut Vec<Hash>) {
        let n = b - a;
        if m == n {
            if !first {
                out.push(self.mth(a, b));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, a, a + k, first, out);
            out.push(self.mth(a + k, b));
        } else {
            self.subproof(m - k, a + k, b, false, out);
            out.push(self.mth(a, a + k));
        }
    }
}

/// Streaming root computation (a "compact range" from 0): O(log n) memory,
/// amortised one node hash per leaf. Used by the offline verifier.
#[derive(Debug, Default, Clone)]
pub struct RootBuilder {
    /// (subtree hash, number of leaves), sizes strictly decreasing.
    stack: Vec<(Hash, u64)>,
    size: u64,
}

impl RootBuilder {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }
    /// Leaves pushed so far.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Adds a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut cur = (leaf, 1u64);
        while let Some(&(h, n)) = self.stack.last() {
            if n != cur.1 {
                break;
            }
            self.stack.pop();
            cur = (node_hash(&h, &cur.0), n * 2);
        }
        self.stack.push(cur);
        self.size += 1;
    }
    /// Root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(&(mut r, _)) = it.next() else {
            return empty_root();
        };
        for (h, _) in it {
            r = node_hash(h, &r);
        }
        r
    }
}

/// RFC 9162 §2.1.3.2: does `path` prove `leaf` at `index` in the tree of
/// `size` leaves with root `root`?
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s == 0 {
            return false;
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
    s == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: does `path` prove that the tree of `from` leaves with
/// root `from_root` is a prefix of the tree of `to` leaves with root `to_root`?
pub fn verify_consistency(
    from: u64,
    to: u64,
    from_root: &Hash,
    to_root: &Hash,
    path: &[Hash],
) -> bool {
    if from > to {
        return false;
    }
    if from == to {
        return path.is_empty() && from_root == to_root;
    }
    if from == 0 {
        // The empty tree is a prefix of every tree.
        return path.is_empty();
    }
    if path.is_empty() {
        return false;
    }
    let mut nodes: Vec<Hash> = Vec::with_capacity(path.len() + 1);
    if from.is_power_of_two() {
        nodes.push(*from_root);
    }
    nodes.extend_from_slice(path);
    let (mut f, mut s) = (from - 1, to - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut fr = nodes[0];
    let mut sr = nodes[0];
    for c in &nodes[1..] {
        if s == 0 {
            return false;
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
    fr == *from_root && sr == *to_root && s == 0
}
