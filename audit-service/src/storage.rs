//! The on-disk log: segment files, the checkpoint file, crash recovery, and
//! the writer used by the sequencer. See the crate docs for the format.

use crate::encoding::{self, HASH_LEN, Hash};
use crate::merkle::{self, MerkleTree};
use crate::note::{Checkpoint, NoteSigner, NoteVerifier};
use parking_lot::RwLock;
use secureops_proto::v1::AuditFinding;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Magic at the start of every segment file, followed by the `u64` BE index
/// of its first entry.
pub const SEGMENT_MAGIC: &[u8; 8] = b"SOAUDSG1";
/// Magic at the start of the checkpoint file.
pub const CHECKPOINTS_MAGIC: &[u8; 8] = b"SOAUDCP1";
/// Segment header length.
pub const SEGMENT_HEADER_LEN: usize = 16;
/// Per-frame overhead: `u32` length before, `u32` CRC-32 after.
pub const FRAME_OVERHEAD: usize = 8;
/// A segment is closed once it reaches this size (the last batch may overshoot).
pub const SEGMENT_TARGET_BYTES: u64 = 64 * 1024 * 1024;
/// Largest checkpoint note accepted in the checkpoint file.
pub const MAX_NOTE: usize = 64 * 1024;

/// Sub-directory holding segment files.
pub const SEGMENTS_DIR: &str = "segments";
/// Append-only file of every checkpoint note.
pub const CHECKPOINTS_FILE: &str = "checkpoints";
/// The latest checkpoint note as plain text (convenience copy).
pub const LATEST_CHECKPOINT_FILE: &str = "checkpoint";

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Damage that is not a torn tail: refusing to run on it (fail closed).
    #[error("log corrupt, refusing to start: {0}")]
    Corrupt(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Segment file name for a first index.
pub fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.seg")
}

/// Lists `<dir>/segments/*.seg`, sorted by first index.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let seg_dir = dir.join(SEGMENTS_DIR);
    let rd = match std::fs::read_dir(&seg_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&seg_dir)(e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(&seg_dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        let first: u64 = stem
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("unexpected segment name {name}")))?;
        out.push((first, ent.path()));
    }
    out.sort();
    Ok(out)
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the frame needs.
    Truncated,
    /// Length field over [`encoding::limits::ENTRY`].
    TooLarge,
    /// CRC mismatch.
    Crc,
}

/// Reads the frame at `pos`. `Ok(None)` exactly at the end of `buf`.
pub fn next_frame(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    next_frame_max(buf, pos, encoding::limits::ENTRY)
}

fn next_frame_max(
    buf: &[u8],
    pos: usize,
    max: usize,
) -> Result<Option<(&[u8], usize)>, FrameError> {
    if pos == buf.len() {
        return Ok(None);
    }
    if buf.len() - pos < 4 {
        return Err(FrameError::Truncated);
    }
    let len = u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge);
    }
    let end = pos + 4 + len + 4;
    if end > buf.len() {
        return Err(FrameError::Truncated);
    }
    let payload = &buf[pos + 4..pos + 4 + len];
    let crc = u32::from_be_bytes([buf[end - 4], buf[end - 3], buf[end - 2], buf[end - 1]]);
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::Crc);
    }
    Ok(Some((payload, end)))
}

fn put_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
}

/// Reads every checkpoint note of a checkpoint file's bytes. Returns the
/// notes with their frame offsets and, if the file does not end on a frame
/// boundary, the offset of the first bad frame.
pub fn parse_checkpoint_file(bytes: &[u8]) -> (Vec<(usize, String)>, Option<usize>) {
    let mut out = Vec::new();
    if bytes.len() < 8 || &bytes[..8] != CHECKPOINTS_MAGIC {
        return (out, Some(0));
    }
    let mut pos = 8;
    loop {
        match next_frame_max(bytes, pos, MAX_NOTE) {
            Ok(None) => return (out, None),
            Ok(Some((payload, next))) => match std::str::from_utf8(payload) {
                Ok(s) => {
                    out.push((pos, s.to_owned()));
                    pos = next;
                }
                Err(_) => return (out, Some(pos)),
            },
            Err(_) => return (out, Some(pos)),
        }
    }
}

/// Outcome of appending one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Log index (of the original entry for a duplicate).
    pub index: u64,
    /// Already in the log.
    pub duplicate: bool,
}

/// Per-source `(seq, index)` pairs sorted by seq: 16 bytes per entry.
#[derive(Debug, Default)]
struct SourceSeqs(Vec<(u64, u64)>);

impl SourceSeqs {
    fn get(&self, seq: u64) -> Option<u64> {
        // Fast path: the common case is a seq above every known one.
        if self.0.last().is_none_or(|l| l.0 < seq) {
            return None;
        }
        self.0
            .binary_search_by_key(&seq, |p| p.0)
            .ok()
            .map(|i| self.0[i].1)
    }
    fn insert(&mut self, seq: u64, index: u64) {
        match self.0.last() {
            Some(l) if l.0 >= seq => {
                if let Err(i) = self.0.binary_search_by_key(&seq, |p| p.0) {
                    self.0.insert(i, (seq, index));
                }
            }
            _ => self.0.push((seq, index)),
        }
    }
}

/// Dedupe index keyed by `(source_id, source_seq)`. It is derived state: the
/// log itself is its persistent form (every entry carries both fields), and it
/// is rebuilt by the startup scan, so it can never disagree with the log.
#[derive(Debug, Default)]
pub struct DedupeIndex {
    map: HashMap<Box<str>, SourceSeqs>,
}

impl DedupeIndex {
    /// Index of the entry for `(source, seq)`, if any.
    pub fn get(&self, source: &str, seq: u64) -> Option<u64> {
        self.map.get(source)?.get(seq)
    }
    /// Records an entry.
    pub fn insert(&mut self, source: &str, seq: u64, index: u64) {
        if let Some(s) = self.map.get_mut(source) {
            s.insert(seq, index);
        } else {
            let mut s = SourceSeqs::default();
            s.insert(seq, index);
            self.map.insert(source.into(), s);
        }
    }
    /// Number of sources.
    pub fn sources(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug, Clone)]
struct SegMeta {
    first_index: u64,
    path: PathBuf,
    /// Bytes of the segment that are durable (readers never read past it).
    durable_len: u64,
}

/// State shared between the writer and readers (Prove, Tail, Checkpoint).
#[derive(Debug, Default)]
pub struct LogState {
    tree: MerkleTree,
    /// Frame offset of each entry within its segment.
    locs: Vec<u64>,
    segments: Vec<SegMeta>,
    /// Every checkpoint, oldest first.
    checkpoints: Vec<(Checkpoint, Arc<str>)>,
}

impl LogState {
    /// Durable entries.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }
    /// The Merkle tree of durable entries.
    pub fn tree(&self) -> &MerkleTree {
        &self.tree
    }
    /// Latest checkpoint and its note.
    pub fn latest_checkpoint(&self) -> Option<(Checkpoint, Arc<str>)> {
        self.checkpoints.last().cloned()
    }
    /// Checkpoint signed for exactly `size`, the latest one if several.
    pub fn checkpoint_for_size(&self, size: u64) -> Option<(Checkpoint, Arc<str>)> {
        let i = self.checkpoints.partition_point(|c| c.0.size <= size);
        let c = self.checkpoints.get(i.checked_sub(1)?)?;
        (c.0.size == size).then(|| c.clone())
    }
    /// Number of checkpoints.
    pub fn checkpoint_count(&self) -> usize {
        self.checkpoints.len()
    }

    /// Plans a read of the raw entries `[from, to)`, clamped to the durable
    /// size and to one segment (so it may cover fewer entries). The I/O is
    /// done by [`ReadPlan::read`] without holding the state lock.
    pub fn plan_read(&self, from: u64, to: u64) -> Option<ReadPlan> {
        let to = to.min(self.size());
        if from >= to {
            return None;
        }
        let si = self
            .segments
            .partition_point(|s| s.first_index <= from)
            .checked_sub(1)?;
        let seg = &self.segments[si];
        let seg_end_index = self
            .segments
            .get(si + 1)
            .map_or(self.size(), |s| s.first_index);
        let to = to.min(seg_end_index);
        let start = self.locs[from as usize];
        let end = if to < seg_end_index {
            self.locs[to as usize]
        } else {
            seg.durable_len
        };
        Some(ReadPlan {
            path: seg.path.clone(),
            start,
            end,
            from,
            to,
        })
    }
}

/// A planned read of consecutive entries in one segment.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    path: PathBuf,
    start: u64,
    end: u64,
    from: u64,
    to: u64,
}

impl ReadPlan {
    /// Reads and unframes the entries; returns `(index, entry bytes)`.
    pub fn read(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let f = File::open(&self.path).map_err(io_err(&self.path))?;
        let mut buf = vec![0u8; (self.end - self.start) as usize];
        f.read_exact_at(&mut buf, self.start)
            .map_err(io_err(&self.path))?;
        let mut out = Vec::with_capacity((self.to - self.from) as usize);
        let mut pos = 0;
        for i in self.from..self.to {
            match next_frame(&buf, pos) {
                Ok(Some((e, next))) => {
                    out.push((i, e.to_vec()));
                    pos = next;
                }
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "entry {i} unreadable in {}",
                        self.path.display()
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// Shared handle for readers.
#[derive(Debug)]
pub struct SharedLog {
    /// The state; the writer holds the write lock only to publish a batch.
    pub state: RwLock<LogState>,
    /// Durable size, for followers (Tail).
    pub size_tx: tokio::sync::watch::Sender<u64>,
}

/// What recovery did at startup.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Entries found.
    pub entries: u64,
    /// Bytes cut from a torn segment tail.
    pub truncated_segment_bytes: u64,
    /// Bytes cut from a torn checkpoint-file tail.
    pub truncated_checkpoint_bytes: u64,
    /// Checkpoints found.
    pub checkpoints: usize,
}

/// The writer side of the log (owned by the sequencer thread).
pub struct LogWriter {
    dir: PathBuf,
    origin: String,
    signer: NoteSigner,
    shared: Arc<SharedLog>,
    cur: File,
    cur_path: PathBuf,
    cur_len: u64,
    cp_file: File,
    next_index: u64,
    prev_hash: Hash,
    last_time: u64,
    dedupe: DedupeIndex,
    buf: Vec<u8>,
    pending_leaves: Vec<(Hash, u64)>,
    segment_target: u64,
}

/// Nanoseconds since the Unix epoch.
pub fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn create_segment(seg_dir: &Path, first_index: u64) -> Result<(File, PathBuf), StoreError> {
    let path = seg_dir.join(segment_name(first_index));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut hdr = SEGMENT_MAGIC.to_vec();
    hdr.extend_from_slice(&first_index.to_be_bytes());
    f.write_all(&hdr)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&path))?;
    fsync_dir(seg_dir)?;
    Ok((f, path))
}

impl LogWriter {
    /// Opens (creating if needed) the log in `dir`, repairing a torn tail.
    /// Refuses (fail closed) a log whose damage is not a torn tail, whose
    /// checkpoints were not signed by `signer`, or whose repair would drop an
    /// entry covered by a checkpoint.
    pub fn open(
        dir: &Path,
        origin: &str,
        signer: NoteSigner,
    ) -> Result<(Self, Arc<SharedLog>, Recovery), StoreError> {
        let seg_dir = dir.join(SEGMENTS_DIR);
        std::fs::create_dir_all(&seg_dir).map_err(io_err(&seg_dir))?;
        let mut rec = Recovery::default();
        let verifier: NoteVerifier = signer.verifier();

        // Checkpoints.
        let cp_path = dir.join(CHECKPOINTS_FILE);
        let mut cp_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cp_path)
            .map_err(io_err(&cp_path))?;
        let mut cp_bytes = Vec::new();
        cp_file
            .read_to_end(&mut cp_bytes)
            .map_err(io_err(&cp_path))?;
        if cp_bytes.is_empty() {
            cp_file
                .write_all(CHECKPOINTS_MAGIC)
                .and_then(|()| cp_file.sync_all())
                .map_err(io_err(&cp_path))?;
            fsync_dir(dir)?;
            cp_bytes = CHECKPOINTS_MAGIC.to_vec();
        }
        let (notes, bad) = parse_checkpoint_file(&cp_bytes);
        if let Some(off) = bad {
            if off < 8 {
                return Err(StoreError::Corrupt(format!(
                    "{} has no valid header",
                    cp_path.display()
                )));
            }
            rec.truncated_checkpoint_bytes = (cp_bytes.len() - off) as u64;
            cp_file
                .set_len(off as u64)
                .and_then(|()| cp_file.sync_all())
                .map_err(io_err(&cp_path))?;
        }
        cp_file.seek(SeekFrom::End(0)).map_err(io_err(&cp_path))?;
        let mut checkpoints = Vec::with_capacity(notes.len());
        for (i, (_, note)) in notes.into_iter().enumerate() {
            let cp = Checkpoint::open(&note, &verifier).map_err(|e| {
                StoreError::Corrupt(format!(
                    "checkpoint #{i} does not verify with the signing key: {e}"
                ))
            })?;
            if cp.origin != origin {
                return Err(StoreError::Corrupt(format!(
                    "checkpoint #{i} has origin {:?}, expected {origin:?}",
                    cp.origin
                )));
            }
            checkpoints.push((cp, Arc::<str>::from(note)));
        }
        let last_cp_size = checkpoints.last().map_or(0, |c| c.0.size);

        // Segments.
        let segs = list_segments(dir)?;
        let mut state = LogState::default();
        let mut dedupe = DedupeIndex::default();
        let mut prev_hash = [0u8; HASH_LEN];
        let mut last_time = 0u64;
        let mut next_index = 0u64;
        let nsegs = segs.len();
        let mut cur: Option<(File, PathBuf, u64)> = None;
        for (si, (first, path)) in segs.into_iter().enumerate() {
            let is_last = si + 1 == nsegs;
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(io_err(&path))?;
            if first != next_index {
                return Err(StoreError::Corrupt(format!(
                    "segment {} starts at {first}, expected {next_index}",
                    path.display()
                )));
            }
            let header_ok = bytes.len() >= SEGMENT_HEADER_LEN
                && &bytes[..8] == SEGMENT_MAGIC
                && bytes[8..16] == first.to_be_bytes();
            if !header_ok {
                if is_last && bytes.len() < SEGMENT_HEADER_LEN {
                    // Torn creation of a new segment: rewrite it.
                    rec.truncated_segment_bytes += bytes.len() as u64;
                    drop(f);
                    let (nf, np) = create_segment(&seg_dir, first)?;
                    state.segments.push(SegMeta {
                        first_index: first,
                        path: np.clone(),
                        durable_len: SEGMENT_HEADER_LEN as u64,
                    });
                    cur = Some((nf, np, SEGMENT_HEADER_LEN as u64));
                    continue;
                }
                return Err(StoreError::Corrupt(format!(
                    "segment {} has a bad header",
                    path.display()
                )));
            }
            let mut pos = SEGMENT_HEADER_LEN;
            let mut torn_at = None;
            loop {
                let (entry, next) = match next_frame(&bytes, pos) {
                    Ok(None) => break,
                    Ok(Some(x)) => x,
                    Err(e) => {
                        torn_at = Some((pos, format!("{e:?}")));
                        break;
                    }
                };
                let ok = encoding::check_entry(entry)
                    .map_err(|e| e.to_string())
                    .and_then(|h| {
                        if h.index != next_index {
                            Err(format!("index {} != {next_index}", h.index))
                        } else if h.prev_hash != prev_hash {
                            Err("chain broken".into())
                        } else if h.log_time_unix_nanos < last_time {
                            Err("time goes backwards".into())
                        } else {
                            Ok(h)
                        }
                    });
                let h = match ok {
                    Ok(h) => h,
                    Err(e) => {
                        torn_at = Some((pos, e));
                        break;
                    }
                };
                let leaf = merkle::leaf_hash(entry);
                state.tree.push(leaf);
                state.locs.push(pos as u64);
                if let Ok((sid, seq)) = encoding::entry_source(entry) {
                    dedupe.insert(sid, seq, next_index);
                }
                prev_hash = leaf;
                last_time = h.log_time_unix_nanos;
                next_index += 1;
                pos = next;
            }
            if let Some((off, why)) = torn_at {
                if !is_last {
                    return Err(StoreError::Corrupt(format!(
                        "entry {next_index} in {} (not the tail): {why}",
                        path.display()
                    )));
                }
                if next_index < last_cp_size {
                    return Err(StoreError::Corrupt(format!(
                        "entry {next_index} damaged ({why}) but checkpoint covers {last_cp_size} entries"
                    )));
                }
                rec.truncated_segment_bytes += (bytes.len() - off) as u64;
                f.set_len(off as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(&path))?;
                pos = off;
            }
            f.seek(SeekFrom::Start(pos as u64)).map_err(io_err(&path))?;
            state.segments.push(SegMeta {
                first_index: first,
                path: path.clone(),
                durable_len: pos as u64,
            });
            if is_last {
                cur = Some((f, path, pos as u64));
            }
        }
        let (cur, cur_path, cur_len) = match cur {
            Some(c) => c,
            None => {
                let (f, p) = create_segment(&seg_dir, 0)?;
                state.segments.push(SegMeta {
                    first_index: 0,
                    path: p.clone(),
                    durable_len: SEGMENT_HEADER_LEN as u64,
                });
                (f, p, SEGMENT_HEADER_LEN as u64)
            }
        };
        // Every checkpoint must match the recovered log.
        let mut prev_size = 0;
        for (i, (cp, _)) in checkpoints.iter().enumerate() {
            if cp.size < prev_size {
                return Err(StoreError::Corrupt(format!(
                    "checkpoint #{i} shrinks the tree"
                )));
            }
            prev_size = cp.size;
            match state.tree.root(cp.size) {
                Ok(r) if r == cp.root => {}
                Ok(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "checkpoint #{i} root does not match the log"
                    )));
                }
                Err(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "checkpoint #{i} covers {} entries, log has {next_index}",
                        cp.size
                    )));
                }
            }
        }
        rec.entries = next_index;
        rec.checkpoints = checkpoints.len();
        state.checkpoints = checkpoints;
        let (size_tx, _) = tokio::sync::watch::channel(next_index);
        let shared = Arc::new(SharedLog {
            state: RwLock::new(state),
            size_tx,
        });
        let w = LogWriter {
            dir: dir.to_owned(),
            origin: origin.to_owned(),
            signer,
            shared: shared.clone(),
            cur,
            cur_path,
            cur_len,
            cp_file,
            next_index,
            prev_hash,
            last_time,
            dedupe,
            buf: Vec::with_capacity(1 << 20),
            pending_leaves: Vec::new(),
            segment_target: SEGMENT_TARGET_BYTES,
        };
        Ok((w, shared, rec))
    }

    /// Sets the size at which a new segment is begun (default
    /// [`SEGMENT_TARGET_BYTES`]); small values exercise rotation in tests.
    pub fn set_segment_target(&mut self, bytes: u64) {
        self.segment_target = bytes.max(SEGMENT_HEADER_LEN as u64 + 1);
    }

    /// Entries appended (durable after the last `append_batch`).
    pub fn size(&self) -> u64 {
        self.next_index
    }

    /// Number of distinct sources in the dedupe index.
    pub fn dedupe_sources(&self) -> usize {
        self.dedupe.sources()
    }

    /// Appends a batch: assigns indexes (duplicates get the original index),
    /// writes every new entry, `fdatasync`s once, then publishes the entries
    /// to readers. Only after this returns `Ok` may the records be acked.
    ///
    /// On an I/O error the writer's in-memory state may be ahead of the disk;
    /// the caller must stop using it (the sequencer fails closed and exits,
    /// and the next start recovers from disk).
    pub fn append_batch<'a, I>(&mut self, records: I) -> Result<Vec<Appended>, StoreError>
    where
        I: IntoIterator<Item = (&'a str, u64, &'a AuditFinding)>,
    {
        if self.cur_len >= self.segment_target {
            self.rotate()?;
        }
        let time = now_unix_nanos().max(self.last_time);
        self.buf.clear();
        self.pending_leaves.clear();
        let mut out = Vec::new();
        let mut entry = Vec::with_capacity(512);
        for (sid, seq, finding) in records {
            if let Some(index) = self.dedupe.get(sid, seq) {
                out.push(Appended {
                    index,
                    duplicate: true,
                });
                continue;
            }
            let index = self.next_index;
            entry.clear();
            encoding::encode_entry(&mut entry, index, time, sid, seq, finding, &self.prev_hash);
            let off = self.cur_len + self.buf.len() as u64;
            put_frame(&mut self.buf, &entry);
            let leaf = merkle::leaf_hash(&entry);
            self.pending_leaves.push((leaf, off));
            self.prev_hash = leaf;
            self.dedupe.insert(sid, seq, index);
            self.next_index += 1;
            out.push(Appended {
                index,
                duplicate: false,
            });
        }
        if !self.buf.is_empty() {
            self.cur
                .write_all(&self.buf)
                .and_then(|()| self.cur.sync_data())
                .map_err(io_err(&self.cur_path))?;
            self.cur_len += self.buf.len() as u64;
            self.last_time = time;
            {
                let mut st = self.shared.state.write();
                for (leaf, off) in &self.pending_leaves {
                    st.tree.push(*leaf);
                    st.locs.push(*off);
                }
                if let Some(s) = st.segments.last_mut() {
                    s.durable_len = self.cur_len;
                }
            }
            self.shared.size_tx.send_replace(self.next_index);
        }
        Ok(out)
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        let seg_dir = self.dir.join(SEGMENTS_DIR);
        let (f, p) = create_segment(&seg_dir, self.next_index)?;
        self.cur = f;
        self.cur_path = p.clone();
        self.cur_len = SEGMENT_HEADER_LEN as u64;
        self.shared.state.write().segments.push(SegMeta {
            first_index: self.next_index,
            path: p,
            durable_len: SEGMENT_HEADER_LEN as u64,
        });
        Ok(())
    }

    /// Signs and durably stores a checkpoint of the current size unless the
    /// latest checkpoint already covers it (`force` signs anyway, e.g. the
    /// first start). Returns the new checkpoint, if any.
    pub fn checkpoint(&mut self, force: bool) -> Result<Option<Checkpoint>, StoreError> {
        let (size, root, last) = {
            let st = self.shared.state.read();
            let size = st.size();
            let root = st
                .tree
                .root(size)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            (size, root, st.checkpoints.last().map(|c| c.0.clone()))
        };
        if !force && last.as_ref().is_some_and(|c| c.size == size) {
            return Ok(None);
        }
        let time = now_unix_nanos()
            .max(self.last_time)
            .max(last.map_or(0, |c| c.time_unix_nanos));
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
            time_unix_nanos: time,
        };
        let note = cp.sign(&self.signer);
        let mut frame = Vec::with_capacity(note.len() + FRAME_OVERHEAD);
        put_frame(&mut frame, note.as_bytes());
        let cp_path = self.dir.join(CHECKPOINTS_FILE);
        self.cp_file
            .write_all(&frame)
            .and_then(|()| self.cp_file.sync_data())
            .map_err(io_err(&cp_path))?;
        // Convenience copy of the latest note, replaced atomically.
        let latest = self.dir.join(LATEST_CHECKPOINT_FILE);
        let tmp = self.dir.join(".checkpoint.tmp");
        std::fs::write(&tmp, note.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &latest))
            .map_err(io_err(&latest))?;
        self.shared
            .state
            .write()
            .checkpoints
            .push((cp.clone(), Arc::from(note)));
        Ok(Some(cp))
    }
}
