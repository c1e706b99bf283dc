//! Durable, bounded, append-only audit spool (DESIGN.md §7, PEP side).
//!
//! Contract: when [`AuditSpool::record`] returns `Ok(seq)` the record is on
//! disk (`fdatasync`ed); the PEP forwards nothing upstream before that. When
//! it returns `Err` (spool full, disk error) the PEP must deny with
//! `fail_closed:audit_spool`: an attempt we cannot audit does not happen.
//!
//! Layout of the spool directory:
//!
//! * `seg-<first_seq, 20 digits>.log`: segments of frames
//!   `[len: u32 LE][crc32(payload): u32 LE][payload]`, payload = the
//!   protobuf `AuditRecord` (`source_id` empty: the shipper stamps it).
//!   A new segment starts when the active one exceeds
//!   [`SpoolLimits::segment_bytes`].
//! * `acked`: the ack watermark (decimal `source_seq`, every record ≤ it was
//!   acknowledged by the audit service), replaced atomically (write, fsync,
//!   rename, fsync dir). Segments whose last record ≤ watermark are deleted.
//!
//! `source_seq` is monotonic across restarts: on open the next seq is one
//! past the maximum of the watermark and the last record on disk.
//!
//! Durability / fsync policy: **group commit**. One writer thread owns the
//! active segment; concurrent `record` calls queue, the writer takes every
//! queued request (up to [`SpoolLimits::max_batch`]), writes them in one
//! `write`, issues one `fdatasync`, and only then completes each caller.
//! Under load this amortises the sync; an isolated call pays exactly one
//! `fdatasync`. Figures: `pep-core/BENCH_NOTES.md`.
//!
//! Recovery: a torn or corrupt frame (crash mid-write, bad CRC) ends its
//! segment: the file is truncated there and the loss is logged. Records
//! after it in that segment were never acknowledged to a caller if it was
//! the tail (the only place a crash can tear).

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use secureops_proto::v1::{AuditFinding, AuditRecord};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::PepMetrics;

/// Largest accepted frame payload; anything bigger is corruption.
const MAX_FRAME: usize = 1 << 20;
const FRAME_HEADER: usize = 8;

/// Bounds of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Maximum bytes of segment files on disk (acked segments are trimmed).
    pub max_bytes: u64,
    /// Maximum records spooled but not yet acknowledged.
    pub max_records: u64,
    /// Segment size that triggers a new segment.
    pub segment_bytes: u64,
    /// Most records committed by one `fdatasync`.
    pub max_batch: usize,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_bytes: 256 << 20,
            max_records: 1_000_000,
            segment_bytes: 8 << 20,
            max_batch: 512,
        }
    }
}

/// Why a record could not be spooled. Every variant means: deny,
/// `fail_closed:audit_spool`.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool full ({records} unacked records, {bytes} bytes on disk)")]
    Full { records: u64, bytes: u64 },
    #[error("audit spool I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("audit spool is unusable after an unrecoverable write error")]
    Poisoned,
    #[error("audit spool writer has stopped")]
    Closed,
    #[error("audit record too large ({0} bytes)")]
    TooLarge(usize),
    #[error("audit spool {0} is in use by another process")]
    Locked(String),
}

impl SpoolError {
    /// The fail-closed cause a PEP reports for any spool error.
    pub const FAIL_CLOSED_CAUSE: &'static str = "audit_spool";
}

#[derive(Debug, Clone)]
struct Segment {
    last_seq: u64,
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug)]
struct State {
    /// Unacked records, ascending seq.
    unacked: VecDeque<AuditRecord>,
    /// Every record ≤ this was acknowledged.
    acked_through: u64,
    /// Watermark last written to the `acked` file.
    persisted_ack: u64,
    /// Acks above `acked_through + 1` (out of order).
    pending_acks: BTreeSet<u64>,
    segments: VecDeque<Segment>,
    disk_bytes: u64,
}

struct Request {
    finding: AuditFinding,
    /// W3C traceparent of the recording span (empty when untraced).
    trace_parent: String,
    reply: oneshot::Sender<Result<u64, SpoolError>>,
}

struct Shared {
    dir: PathBuf,
    limits: SpoolLimits,
    state: Mutex<State>,
    /// Last committed seq, for the shipper to wait on.
    last_seq: watch::Sender<u64>,
    metrics: PepMetrics,
    /// Serialises watermark persistence + trimming.
    persist_lock: Mutex<()>,
    /// Exclusive `flock` on `<dir>/lock` for the spool's lifetime: two PEPs
    /// sharing a spool would hand out the same `source_seq` twice.
    _dir_lock: nix::fcntl::Flock<File>,
}

/// Handle to the spool. Cheap to clone; the writer thread stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct AuditSpool {
    tx: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSpool")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

fn seg_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.log")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Read every valid frame of a segment; truncate the file at the first bad
/// one. Returns the records and the valid length.
fn read_segment(path: &Path) -> io::Result<(Vec<AuditRecord>, u64)> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let mut off = 0usize;
    let mut out = Vec::new();
    let mut bad = None;
    while off < buf.len() {
        if buf.len() - off < FRAME_HEADER {
            bad = Some("torn frame header");
            break;
        }
        let len = u32::from_le_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let crc = u32::from_le_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
        if len > MAX_FRAME || buf.len() - off - FRAME_HEADER < len {
            bad = Some("torn or oversized frame");
            break;
        }
        let payload = &buf[off + FRAME_HEADER..off + FRAME_HEADER + len];
        if crc32fast::hash(payload) != crc {
            bad = Some("crc mismatch");
            break;
        }
        match AuditRecord::decode(payload) {
            Ok(r) => out.push(r),
            Err(_) => {
                bad = Some("undecodable record");
                break;
            }
        }
        off += FRAME_HEADER + len;
    }
    if let Some(why) = bad {
        tracing::error!(
            path = %path.display(),
            valid_bytes = off,
            lost_bytes = buf.len() - off,
            why,
            "audit spool: truncating segment at first bad frame"
        );
        f.set_len(off as u64)?;
        f.sync_all()?;
    }
    Ok((out, off as u64))
}

fn read_watermark(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join("acked")) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("acked file: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn write_watermark(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join("acked.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{seq}\n").as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join("acked"))?;
    fsync_dir(dir)
}

/// Take the exclusive spool lock. A previous handle in this process may
/// still be winding down (its writer thread releases the lock when it
/// exits), so wait a bounded time before reporting the spool as busy.
fn lock_dir(mut file: File, dir: &Path) -> Result<nix::fcntl::Flock<File>, SpoolError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, _)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return Err(SpoolError::Locked(dir.display().to_string())),
        }
    }
}

impl AuditSpool {
    /// Open (or create) the spool in `dir`, recover its segments and start
    /// the writer thread. Must run inside a tokio runtime only for the
    /// callers of [`AuditSpool::record`]; opening itself is synchronous.
    pub fn open(dir: impl AsRef<Path>, limits: SpoolLimits) -> Result<AuditSpool, SpoolError> {
        Self::open_with_metrics(dir, limits, PepMetrics::default())
    }

    /// [`AuditSpool::open`] reporting into `metrics`.
    pub fn open_with_metrics(
        dir: impl AsRef<Path>,
        limits: SpoolLimits,
        metrics: PepMetrics,
    ) -> Result<AuditSpool, SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        let dir_lock = lock_dir(lock_file, &dir)?;
        let watermark = read_watermark(&dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for ent in fs::read_dir(&dir)? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(num) = name
                .strip_prefix("seg-")
                .and_then(|n| n.strip_suffix(".log"))
                && let Ok(first) = num.parse::<u64>()
            {
                names.push((first, ent.path()));
            }
        }
        names.sort();
        let mut segments = VecDeque::new();
        let mut unacked = VecDeque::new();
        let mut last_seq = watermark;
        let mut disk_bytes = 0;
        for (first, path) in names {
            let (records, bytes) = read_segment(&path)?;
            let seg_last = records
                .last()
                .map(|r| r.source_seq)
                .unwrap_or(first.saturating_sub(1));
            for r in records {
                if r.source_seq <= last_seq && r.source_seq <= watermark {
                    continue;
                }
                if r.source_seq <= last_seq {
                    // Not monotonic: corruption or a foreign file. Keep the
                    // first copy only.
                    tracing::error!(seq = r.source_seq, "audit spool: duplicate seq skipped");
                    continue;
                }
                last_seq = r.source_seq;
                unacked.push_back(r);
            }
            disk_bytes += bytes;
            segments.push_back(Segment {
                last_seq: seg_last.max(first.saturating_sub(1)),
                path,
                bytes,
            });
        }
        let (last_tx, _) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            limits,
            state: Mutex::new(State {
                unacked,
                acked_through: watermark,
                persisted_ack: watermark,
                pending_acks: BTreeSet::new(),
                segments,
                disk_bytes,
            }),
            last_seq: last_tx,
            metrics,
            persist_lock: Mutex::new(()),
            _dir_lock: dir_lock,
        });
        shared.update_gauge();
        // Trim what an earlier run acked but did not get to delete.
        shared.trim()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let w = Writer {
            shared: shared.clone(),
            rx,
            next_seq: last_seq + 1,
            active: None,
            poisoned: false,
        };
        std::thread::Builder::new()
            .name("audit-spool".into())
            .spawn(move || w.run())?;
        Ok(AuditSpool { tx, shared })
    }

    /// Append `finding`; returns its `source_seq` once it is durable.
    /// Any `Err` ⇒ the caller denies with `fail_closed:audit_spool`.
    ///
    /// An empty `trace_id` is filled from the caller's current span when
    /// OpenTelemetry tracing is on (the PEP records inside the connection's
    /// span), so the audit record links to the decision's trace. The same
    /// span's W3C `traceparent` goes into `AuditRecord.trace_parent` (spooled
    /// with the record, so it survives a restart) for the audit service to
    /// join the trace.
    pub async fn record(&self, mut finding: AuditFinding) -> Result<u64, SpoolError> {
        let trace_parent = match crate::grpc::current_span_context() {
            Some(sc) => {
                if finding.trace_id.is_empty() {
                    finding.trace_id = sc.trace_id().to_string();
                }
                crate::grpc::traceparent(&sc)
            }
            None => String::new(),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                finding,
                trace_parent,
                reply,
            })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Metric handles this spool reports into.
    pub fn metrics(&self) -> &PepMetrics {
        &self.shared.metrics
    }

    /// Spool directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Highest committed seq (0 when nothing was ever spooled).
    pub fn last_seq(&self) -> u64 {
        *self.shared.last_seq.borrow()
    }

    /// Every record ≤ this has been acknowledged.
    pub fn acked_through(&self) -> u64 {
        self.shared.state.lock().acked_through
    }

    /// Number of records not yet acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.shared.state.lock().unacked.len()
    }

    /// Bytes of segment files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.state.lock().disk_bytes
    }

    /// Number of segment files on disk.
    pub fn segment_count(&self) -> usize {
        self.shared.state.lock().segments.len()
    }

    /// Up to `max` unacked records with seq > `after`, ascending.
    pub fn unacked_after(&self, after: u64, max: usize) -> Vec<AuditRecord> {
        let st = self.shared.state.lock();
        let start = st.unacked.partition_point(|r| r.source_seq <= after);
        st.unacked.iter().skip(start).take(max).cloned().collect()
    }

    /// Subscribe to "a new record was committed" (value: last seq).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.last_seq.subscribe()
    }

    /// The audit service acknowledged `seq` (durable there). Advances the
    /// in-memory watermark; [`AuditSpool::persist_acks`] makes it durable and
    /// trims segments.
    pub fn ack(&self, seq: u64) {
        let mut st = self.shared.state.lock();
        if seq <= st.acked_through || seq > self.last_seq() {
            return;
        }
        st.pending_acks.insert(seq);
        loop {
            let next = st.acked_through + 1;
            if !st.pending_acks.remove(&next) {
                break;
            }
            st.acked_through = next;
        }
        let through = st.acked_through;
        while st.unacked.front().is_some_and(|r| r.source_seq <= through) {
            st.unacked.pop_front();
        }
        drop(st);
        self.shared.update_gauge();
    }

    /// Write the ack watermark durably and delete fully-acked segments
    /// (blocking I/O: call from `spawn_blocking` in async code).
    pub fn persist_acks(&self) -> io::Result<()> {
        self.shared.trim()
    }
}

impl Shared {
    fn update_gauge(&self) {
        let n = self.state.lock().unacked.len();
        self.metrics
            .spool_unacked
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn trim(&self) -> io::Result<()> {
        let _g = self.persist_lock.lock();
        let (through, persisted) = {
            let st = self.state.lock();
            (st.acked_through, st.persisted_ack)
        };
        if through > persisted {
            write_watermark(&self.dir, through)?;
            self.state.lock().persisted_ack = through;
        }
        // Delete every non-active segment whose records are all acked.
        let mut doomed = Vec::new();
        {
            let mut st = self.state.lock();
            while st.segments.len() > 1
                && st.segments.front().is_some_and(|s| s.last_seq <= through)
            {
                if let Some(s) = st.segments.pop_front() {
                    st.disk_bytes = st.disk_bytes.saturating_sub(s.bytes);
                    doomed.push(s.path);
                }
            }
        }
        for p in &doomed {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !doomed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}

struct Active {
    file: File,
    len: u64,
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Request>,
    next_seq: u64,
    active: Option<Active>,
    poisoned: bool,
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < self.shared.limits.max_batch {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Request>) {
        if self.poisoned {
            for r in batch {
                let _ = r.reply.send(Err(SpoolError::Poisoned));
            }
            self.shared.metrics.count_spool("error");
            return;
        }
        let limits = self.shared.limits;
        let (mut records_now, mut bytes_now) = {
            let st = self.shared.state.lock();
            (st.unacked.len() as u64, st.disk_bytes)
        };
        let mut buf = Vec::new();
        let mut accepted: Vec<(AuditRecord, oneshot::Sender<Result<u64, SpoolError>>)> = Vec::new();
        for req in batch {
            let rec = AuditRecord {
                source_id: String::new(),
                source_seq: self.next_seq + accepted.len() as u64,
                finding: Some(req.finding),
                trace_parent: req.trace_parent,
            };
            let payload = rec.encode_to_vec();
            if payload.len() > MAX_FRAME {
                self.shared.metrics.count_spool("error");
                let _ = req.reply.send(Err(SpoolError::TooLarge(payload.len())));
                continue;
            }
            let framed = (FRAME_HEADER + payload.len()) as u64;
            if records_now + 1 > limits.max_records || bytes_now + framed > limits.max_bytes {
                self.shared.metrics.count_spool("full");
                let _ = req.reply.send(Err(SpoolError::Full {
                    records: records_now,
                    bytes: bytes_now,
                }));
                continue;
            }
            records_now += 1;
            bytes_now += framed;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            accepted.push((rec, req.reply));
        }
        if accepted.is_empty() {
            return;
        }
        let first_seq = self.next_seq;
        let last_seq = first_seq + accepted.len() as u64 - 1;
        match self.write_batch(&buf, first_seq, last_seq) {
            Ok(()) => {
                self.next_seq = last_seq + 1;
                {
                    let mut st = self.shared.state.lock();
                    for (rec, _) in &accepted {
                        st.unacked.push_back(rec.clone());
                    }
                }
                self.shared.update_gauge();
                self.shared.last_seq.send_replace(last_seq);
                for (rec, reply) in accepted {
                    self.shared.metrics.count_spool("ok");
                    let _ = reply.send(Ok(rec.source_seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit spool write failed");
                let kind = e.kind();
                let msg = e.to_string();
                for (_, reply) in accepted {
                    self.shared.metrics.count_spool("error");
                    let _ = reply.send(Err(SpoolError::Io(io::Error::new(kind, msg.clone()))));
                }
            }
        }
    }

    /// Write + fdatasync one batch; on failure roll the file back so no
    /// half-acknowledged frame stays behind (or poison the spool).
    fn write_batch(&mut self, buf: &[u8], first_seq: u64, last_seq: u64) -> io::Result<()> {
        let need_new = match &self.active {
            None => true,
            Some(a) => a.len >= self.shared.limits.segment_bytes,
        };
        if need_new {
            self.open_segment(first_seq)?;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let before = active.len;
        let res = active
            .file
            .write_all(buf)
            .and_then(|()| active.file.sync_data());
        match res {
            Ok(()) => {
                active.len += buf.len() as u64;
                let mut st = self.shared.state.lock();
                st.disk_bytes += buf.len() as u64;
                if let Some(seg) = st.segments.back_mut() {
                    seg.bytes += buf.len() as u64;
                    seg.last_seq = last_seq;
                }
                Ok(())
            }
            Err(e) => {
                let rollback = active
                    .file
                    .set_len(before)
                    .and_then(|()| active.file.seek(SeekFrom::Start(before)).map(|_| ()))
                    .and_then(|()| active.file.sync_data());
                if rollback.is_err() {
                    self.poisoned = true;
                }
                Err(e)
            }
        }
    }

    fn open_segment(&mut self, first_seq: u64) -> io::Result<()> {
        // Reuse the last recovered segment if it is still small.
        if self.active.is_none() {
            let last = self.shared.state.lock().segments.back().cloned();
            if let Some(seg) = last
                && seg.bytes < self.shared.limits.segment_bytes
            {
                let mut file = OpenOptions::new().append(true).open(&seg.path)?;
                file.seek(SeekFrom::End(0))?;
                self.active = Some(Active {
                    file,
                    len: seg.bytes,
                });
                return Ok(());
            }
        }
        let path = self.shared.dir.join(seg_name(first_seq));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        fsync_dir(&self.shared.dir)?;
        self.shared.state.lock().segments.push_back(Segment {
            last_seq: first_seq.saturating_sub(1),
            path,
            bytes: 0,
        });
        self.active = Some(Active { file, len: 0 });
        Ok(())
    }
}

/// How long the shipper waits between watermark persists (bounded replay).
pub(crate) const PERSIST_INTERVAL: Duration = Duration::from_millis(200);
