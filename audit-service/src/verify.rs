//! Offline verification of a log directory.

use crate::encoding::{self, EntryHeader, HASH_LEN, Hash};
use crate::merkle::{self, RootBuilder};
use crate::note::{Checkpoint, NoteVerifier};
use crate::storage::{self, FRAME_OVERHEAD, FrameError, SEGMENT_HEADER_LEN, SEGMENT_MAGIC};
use std::collections::VecDeque;
use std::path::Path;

/// A clean log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Entries in the log.
    pub entries: u64,
    /// Stored checkpoints (all verified).
    pub checkpoints: usize,
    /// RFC 6962 root of all entries.
    #[serde(serialize_with = "ser_hex")]
    pub root: Hash,
    /// Size of the latest stored checkpoint (entries after it are chained
    /// but not yet signed).
    pub last_checkpoint_size: u64,
    /// Size of the trusted checkpoint, when one was given.
    pub trusted_checkpoint_size: Option<u64>,
}

fn ser_hex<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// Which checkpoint an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CheckpointRef {
    /// The n-th (0-based) note of the checkpoint file.
    Stored(usize),
    /// The trusted checkpoint given by the caller.
    Trusted,
}

impl std::fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointRef::Stored(i) => write!(f, "checkpoint #{i}"),
            CheckpointRef::Trusted => f.write_str("trusted checkpoint"),
        }
    }
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum VerifyErrorKind {
    /// A file could not be read.
    Io(String),
    /// Segment files missing, misnamed or with a bad header.
    SegmentLayout(String),
    /// The frame of this entry is torn, oversized or fails its CRC.
    Frame(String),
    /// The entry bytes are not a canonical entry.
    Encoding(String),
    /// The entry claims another index (deleted or reordered entries).
    IndexMismatch {
        /// Index written in the entry.
        found: u64,
    },
    /// `prev_hash` is not the chain hash of the previous entry.
    ChainBroken,
    /// Sequencer time goes backwards.
    TimeWentBackwards,
    /// The checkpoint file is damaged at this note.
    CheckpointFile(String),
    /// Signature missing, invalid, or by a foreign key; or the note is malformed.
    CheckpointSignature {
        /// Which.
        checkpoint: CheckpointRef,
        /// Details.
        detail: String,
    },
    /// Origin differs from the first checkpoint's.
    CheckpointOrigin {
        /// Which.
        checkpoint: CheckpointRef,
    },
    /// Tree size smaller than an earlier checkpoint's.
    CheckpointShrinks {
        /// Which.
        checkpoint: CheckpointRef,
    },
    /// Signing time earlier than the previous checkpoint or than an entry it covers.
    CheckpointTime {
        /// Which.
        checkpoint: CheckpointRef,
    },
    /// Root hash differs from the log's root at that size.
    CheckpointRootMismatch {
        /// Which.
        checkpoint: CheckpointRef,
    },
    /// The log has fewer entries than the checkpoint covers.
    Truncated {
        /// Which.
        checkpoint: CheckpointRef,
        /// Entries the checkpoint covers.
        size: u64,
    },
}

/// Verification failure: `index` is the first entry whose integrity cannot be
/// established. For entry-level damage it is the damaged entry; for a
/// checkpoint failure it is the first entry not vouched for by an earlier,
/// valid checkpoint; for a truncation it is the first missing entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("first bad index {index}: {kind}")]
pub struct VerifyError {
    /// First bad index.
    pub index: u64,
    /// What.
    pub kind: VerifyErrorKind,
}

fn fail<T>(index: u64, kind: VerifyErrorKind) -> Result<T, VerifyError> {
    Err(VerifyError { index, kind })
}

struct PendingCp {
    which: CheckpointRef,
    cp: Result<Checkpoint, VerifyErrorKind>,
}

struct State {
    rb: RootBuilder,
    last_entry_time: u64,
    /// Entries vouched for by the last verified checkpoint.
    vouched: u64,
    prev_cp: Option<Checkpoint>,
    origin: Option<String>,
}

impl State {
    /// Checks every checkpoint due at the current size.
    fn settle(
        &mut self,
        pending: &mut VecDeque<PendingCp>,
        trusted: &mut Option<Checkpoint>,
    ) -> Result<(), VerifyError> {
        let n = self.rb.size();
        if let Some(t) = trusted.as_ref()
            && t.size == n
        {
            if t.root != self.rb.root() {
                return fail(
                    self.vouched.min(n),
                    VerifyErrorKind::CheckpointRootMismatch {
                        checkpoint: CheckpointRef::Trusted,
                    },
                );
            }
            *trusted = None;
        }
        while let Some(front) = pending.front() {
            let which = front.which;
            let cp = match &front.cp {
                Err(kind) => return fail(self.vouched, kind.clone()),
                Ok(cp) => cp,
            };
            if let Some(o) = &self.origin
                && *o != cp.origin
            {
                return fail(
                    self.vouched,
                    VerifyErrorKind::CheckpointOrigin { checkpoint: which },
                );
            }
            if let Some(p) = &self.prev_cp {
                if cp.size < p.size {
                    return fail(
                        self.vouched,
                        VerifyErrorKind::CheckpointShrinks { checkpoint: which },
                    );
                }
                if cp.time_unix_nanos < p.time_unix_nanos {
                    return fail(
                        self.vouched,
                        VerifyErrorKind::CheckpointTime { checkpoint: which },
                    );
                }
            }
            if cp.size > n {
                return Ok(()); // not reached yet
            }
            // cp.size == n here: sizes are non-decreasing and each is settled
            // as soon as it is reached.
            if cp.root != self.rb.root() {
                return fail(
                    self.vouched,
                    VerifyErrorKind::CheckpointRootMismatch { checkpoint: which },
                );
            }
            if n > 0 && cp.time_unix_nanos < self.last_entry_time {
                return fail(
                    self.vouched,
                    VerifyErrorKind::CheckpointTime { checkpoint: which },
                );
            }
            self.vouched = n;
            self.origin = Some(cp.origin.clone());
            self.prev_cp = Some(cp.clone());
            pending.pop_front();
        }
        Ok(())
    }
}

/// Verifies the log in `dir` against the verifier key `key` and, optionally,
/// a trusted checkpoint note (e.g. one saved earlier or fetched from a
/// witness), which must be signed by `key` and be a prefix of the log.
///
/// Checks, in log order: segment layout and headers, frame CRCs, canonical
/// encoding, consecutive indexes, hash-chain continuity, non-decreasing
/// sequencer time; every stored checkpoint's signature, origin, monotonic
/// size and time, and root against the recomputed Merkle root at its size;
/// the trusted checkpoint's root; and that no checkpoint covers more entries
/// than the log holds (truncation).
pub fn verify_dir(
    dir: &Path,
    key: &NoteVerifier,
    trusted_checkpoint: Option<&str>,
) -> Result<Summary, VerifyError> {
    let io = |e: std::io::Error, p: &Path| VerifyError {
        index: 0,
        kind: VerifyErrorKind::Io(format!("{}: {e}", p.display())),
    };
    let mut trusted = match trusted_checkpoint {
        None => None,
        Some(note) => Some(Checkpoint::open(note, key).map_err(|e| VerifyError {
            index: 0,
            kind: VerifyErrorKind::CheckpointSignature {
                checkpoint: CheckpointRef::Trusted,
                detail: e.to_string(),
            },
        })?),
    };
    let trusted_size = trusted.as_ref().map(|t| t.size);

    // Checkpoints (verified lazily, in order, as the log reaches them).
    let cp_path = dir.join(storage::CHECKPOINTS_FILE);
    let cp_bytes = std::fs::read(&cp_path).map_err(|e| io(e, &cp_path))?;
    let (notes, bad) = storage::parse_checkpoint_file(&cp_bytes);
    let mut pending: VecDeque<PendingCp> = notes
        .iter()
        .enumerate()
        .map(|(i, (_, note))| PendingCp {
            which: CheckpointRef::Stored(i),
            cp: Checkpoint::open(note, key).map_err(|e| VerifyErrorKind::CheckpointSignature {
                checkpoint: CheckpointRef::Stored(i),
                detail: e.to_string(),
            }),
        })
        .collect();
    let ncheckpoints = pending.len();
    if let Some(off) = bad {
        // Everything after the damaged note is unreadable: report it when the
        // verification reaches it (after the notes before it).
        pending.push_back(PendingCp {
            which: CheckpointRef::Stored(ncheckpoints),
            cp: Err(VerifyErrorKind::CheckpointFile(format!(
                "note #{ncheckpoints} damaged at byte {off}"
            ))),
        });
    }

    let mut st = State {
        rb: RootBuilder::new(),
        last_entry_time: 0,
        vouched: 0,
        prev_cp: None,
        origin: None,
    };
    st.settle(&mut pending, &mut trusted)?;

    let segs = storage::list_segments(dir).map_err(|e| VerifyError {
        index: 0,
        kind: VerifyErrorKind::SegmentLayout(e.to_string()),
    })?;
    let mut prev_hash = [0u8; HASH_LEN];
    let mut next: u64 = 0;
    let mut buf: Vec<u8> = Vec::new();
    for (first, path) in &segs {
        // One buffer reused for every segment: no fresh page faults per file.
        buf.clear();
        std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut buf))
            .map_err(|e| VerifyError {
                index: next,
                kind: VerifyErrorKind::Io(format!("{}: {e}", path.display())),
            })?;
        let bytes = &buf[..];
        check_segment_header(bytes, *first, next, path)?;
        // Phase 0 (sequential, cheap): frame boundaries from the length fields.
        let (spans, framing_error) = frame_spans(bytes);
        // Phase 1 (parallel): CRC, canonical encoding, leaf hash per frame.
        let checked = check_frames_parallel(bytes, &spans, path);
        // Phase 2 (sequential, in log order): indexes, chain, time, roots.
        for r in checked {
            let (h, leaf) = r.map_err(|kind| VerifyError { index: next, kind })?;
            if h.index != next {
                return fail(next, VerifyErrorKind::IndexMismatch { found: h.index });
            }
            if h.prev_hash != prev_hash {
                return fail(next, VerifyErrorKind::ChainBroken);
            }
            if h.log_time_unix_nanos < st.last_entry_time {
                return fail(next, VerifyErrorKind::TimeWentBackwards);
            }
            st.last_entry_time = h.log_time_unix_nanos;
            prev_hash = leaf;
            st.rb.push(leaf);
            next += 1;
            if pending.front().is_some() || trusted.is_some() {
                st.settle(&mut pending, &mut trusted)?;
            }
        }
        if let Some((pos, e)) = framing_error {
            return fail(
                next,
                VerifyErrorKind::Frame(format!("{e:?} at byte {pos} of {}", path.display())),
            );
        }
    }
    // Anything still pending covers entries the log does not have.
    if let Some(front) = pending.front() {
        match &front.cp {
            Ok(cp) => {
                return fail(
                    next,
                    VerifyErrorKind::Truncated {
                        checkpoint: front.which,
                        size: cp.size,
                    },
                );
            }
            Err(kind) => return fail(st.vouched, kind.clone()),
        }
    }
    if let Some(t) = trusted {
        return fail(
            next,
            VerifyErrorKind::Truncated {
                checkpoint: CheckpointRef::Trusted,
                size: t.size,
            },
        );
    }
    Ok(Summary {
        entries: next,
        checkpoints: ncheckpoints,
        root: st.rb.root(),
        last_checkpoint_size: st.prev_cp.map_or(0, |c| c.size),
        trusted_checkpoint_size: trusted_size,
    })
}

/// `(frame start, payload length)`.
type Span = (usize, usize);

/// Walks the length fields of a segment's frames: `(frame start, payload
/// length)` of each, and where and why the walk stopped early, if it did.
fn frame_spans(bytes: &[u8]) -> (Vec<Span>, Option<(usize, FrameError)>) {
    let mut out = Vec::with_capacity(bytes.len() / 256);
    let mut pos = SEGMENT_HEADER_LEN;
    while pos < bytes.len() {
        if bytes.len() - pos < 4 {
            return (out, Some((pos, FrameError::Truncated)));
        }
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        if len > encoding::limits::ENTRY {
            return (out, Some((pos, FrameError::TooLarge)));
        }
        let end = pos + FRAME_OVERHEAD + len;
        if end > bytes.len() {
            return (out, Some((pos, FrameError::Truncated)));
        }
        out.push((pos, len));
        pos = end;
    }
    (out, None)
}

type Checked = Result<(EntryHeader, Hash), VerifyErrorKind>;

fn check_frame(bytes: &[u8], (pos, len): (usize, usize), path: &Path) -> Checked {
    let payload = &bytes[pos + 4..pos + 4 + len];
    let crc_at = pos + 4 + len;
    let crc = u32::from_be_bytes([
        bytes[crc_at],
        bytes[crc_at + 1],
        bytes[crc_at + 2],
        bytes[crc_at + 3],
    ]);
    if crc32fast::hash(payload) != crc {
        return Err(VerifyErrorKind::Frame(format!(
            "Crc at byte {pos} of {}",
            path.display()
        )));
    }
    let h = encoding::check_entry(payload).map_err(|e| VerifyErrorKind::Encoding(e.to_string()))?;
    Ok((h, merkle::leaf_hash(payload)))
}

/// Phase 1 of verification on all cores: the per-entry work that does not
/// depend on other entries (CRC, encoding, leaf hash, about 90% of the cost).
fn check_frames_parallel(bytes: &[u8], spans: &[(usize, usize)], path: &Path) -> Vec<Checked> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if threads <= 1 || spans.len() < 4096 {
        return spans.iter().map(|s| check_frame(bytes, *s, path)).collect();
    }
    let chunk = spans.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = spans
            .chunks(chunk)
            .map(|c| {
                scope.spawn(move || {
                    c.iter()
                        .map(|s| check_frame(bytes, *s, path))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(spans.len());
        for (h, c) in handles.into_iter().zip(spans.chunks(chunk)) {
            match h.join() {
                Ok(v) => out.extend(v),
                // A panicking worker cannot happen on this code path; fall
                // back to checking its chunk on this thread.
                Err(_) => out.extend(c.iter().map(|s| check_frame(bytes, *s, path))),
            }
        }
        out
    })
}

fn check_segment_header(
    bytes: &[u8],
    first: u64,
    next: u64,
    path: &Path,
) -> Result<(), VerifyError> {
    if first != next {
        return fail(
            next,
            VerifyErrorKind::SegmentLayout(format!(
                "{} starts at {first}, expected {next}",
                path.display()
            )),
        );
    }
    if bytes.len() < SEGMENT_HEADER_LEN
        || &bytes[..8] != SEGMENT_MAGIC
        || bytes[8..16] != first.to_be_bytes()
    {
        return fail(
            next,
            VerifyErrorKind::SegmentLayout(format!("{} has a bad header", path.display())),
        );
    }
    Ok(())
}

impl std::fmt::Display for VerifyErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VerifyErrorKind::Io(s) => write!(f, "I/O error: {s}"),
            VerifyErrorKind::SegmentLayout(s) => write!(f, "segment layout: {s}"),
            VerifyErrorKind::Frame(s) => write!(f, "damaged frame: {s}"),
            VerifyErrorKind::Encoding(s) => write!(f, "not a canonical entry: {s}"),
            VerifyErrorKind::IndexMismatch { found } => {
                write!(
                    f,
                    "entry claims index {found} (deleted or reordered entries)"
                )
            }
            VerifyErrorKind::ChainBroken => {
                f.write_str("prev_hash does not match the previous entry (chain broken)")
            }
            VerifyErrorKind::TimeWentBackwards => f.write_str("sequencer time goes backwards"),
            VerifyErrorKind::CheckpointFile(s) => write!(f, "checkpoint file: {s}"),
            VerifyErrorKind::CheckpointSignature { checkpoint, detail } => {
                write!(f, "{checkpoint}: signature: {detail}")
            }
            VerifyErrorKind::CheckpointOrigin { checkpoint } => {
                write!(f, "{checkpoint}: origin differs")
            }
            VerifyErrorKind::CheckpointShrinks { checkpoint } => {
                write!(f, "{checkpoint}: tree size shrinks")
            }
            VerifyErrorKind::CheckpointTime { checkpoint } => {
                write!(f, "{checkpoint}: time goes backwards")
            }
            VerifyErrorKind::CheckpointRootMismatch { checkpoint } => {
                write!(f, "{checkpoint}: root hash does not match the log")
            }
            VerifyErrorKind::Truncated { checkpoint, size } => {
                write!(f, "log truncated: {checkpoint} covers {size} entries")
            }
        }
    }
}
