//! Durable, bounded, append-only audit spool (DESIGN.md §7, PEP side).
//!
//! Contract: when [`AuditSpool::record`] (or [`AuditSpool::append_batch`])
//! returns `Ok(seq)` the record is written to the spool file, so it survives
//! a crash of the PEP process; the PEP forwards nothing upstream before
//! that. How soon it is also on the platter is the [`SpoolSync`] policy:
//! `always` makes `record` wait for the record's `fdatasync` (survives a
//! power loss too), the default `interval:5ms` lets a background thread
//! `fdatasync` at most 5 ms after the write (the same window the audit
//! service's own sequencer batches over). When a call returns `Err` (spool
//! full, disk error, failed sync) the PEP must deny with
//! `fail_closed:audit_spool`: an attempt we cannot audit does not happen.
//!
//! Threads: callers encode their record (the expensive part) and, when no
//! `fdatasync` and no other write is running (`try_lock` on both) and the
//! record does not open a new segment, write it on their own thread: a few
//! µs, and no thread hand-off. Otherwise they
//! queue it for the `audit-spool` writer thread, which gives it its
//! `source_seq`, writes everything queued with one `write(2)`, then
//! completes the callers. An append that lands while `fdatasync` runs on
//! the same file can block for a millisecond (measured: `perf trace` on the
//! proxy), and on an event loop that would stall every tunnel, not just the
//! new connection; the two hand-offs (wake the writer, wake the caller) on
//! every record were the largest share of the proxy's cost beyond relaying
//! (`pep-proxy/BENCH_NOTES.md`, session 6). The `audit-spool-sync` thread
//! owns every `fdatasync`; a per-connection `fdatasync` was the single
//! biggest cost of a proxied tunnel (`pep-proxy/BENCH_NOTES.md`).
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
//! One `append` lock serialises writers (seq assignment + the write; the
//! writer thread and [`AuditSpool::append_batch`] callers); the
//! `audit-spool-sync` thread publishes the highest synced seq. A failed `fdatasync` poisons the spool (the kernel
//! may already have dropped the dirty pages), so every later record is
//! refused and the PEP denies.
//!
//! Recovery: a torn or corrupt frame (crash mid-write, bad CRC) ends its
//! segment: the file is truncated there and the loss is logged. Records
//! after it in that segment were never acknowledged to a caller if it was
//! the tail (the only place a crash can tear).

use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use secureops_proto::v1::{AuditFinding, AuditRecord};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::PepMetrics;

/// Largest accepted frame payload; anything bigger is corruption.
const MAX_FRAME: usize = 1 << 20;
const FRAME_HEADER: usize = 8;

/// When a spooled record is forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolSync {
    /// `record` returns after the record's `fdatasync` (group commit:
    /// one sync covers every record written while the previous one ran).
    Always,
    /// `record` returns after the write; a background `fdatasync` follows
    /// within this window.
    Interval(Duration),
}

impl Default for SpoolSync {
    fn default() -> Self {
        SpoolSync::Interval(Duration::from_millis(5))
    }
}

impl std::fmt::Display for SpoolSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolSync::Always => f.write_str("always"),
            SpoolSync::Interval(d) => write!(f, "interval:{}ms", d.as_millis()),
        }
    }
}

impl std::str::FromStr for SpoolSync {
    type Err = String;
    /// `always` or `interval:<n>ms` (1..=1000).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "always" {
            return Ok(SpoolSync::Always);
        }
        let ms = s
            .strip_prefix("interval:")
            .and_then(|r| r.strip_suffix("ms"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| format!("{s:?}: expected `always` or `interval:<1..=1000>ms`"))?;
        Ok(SpoolSync::Interval(Duration::from_millis(ms)))
    }
}

/// Bounds and durability policy of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Maximum bytes of segment files on disk (acked segments are trimmed).
    pub max_bytes: u64,
    /// Maximum records spooled but not yet acknowledged.
    pub max_records: u64,
    /// Segment size that triggers a new segment.
    pub segment_bytes: u64,
    /// When records reach stable storage.
    pub sync: SpoolSync,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_bytes: 256 << 20,
            max_records: 1_000_000,
            segment_bytes: 8 << 20,
            sync: SpoolSync::default(),
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
    #[error("audit spool is unusable after an unrecoverable write or sync error")]
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

/// Where an unacked record's payload lies in its segment file. The records
/// themselves stay on disk (page cache): memory per unacked record is this
/// index entry, not the record, so a long audit outage costs 24 bytes per
/// attempt instead of a copy of every record.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seq: u64,
    /// Offset of the payload (after the frame header) in the segment.
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct State {
    /// Unacked records, ascending seq; the segment holding one is the first
    /// whose `last_seq` ≥ its seq.
    unacked: VecDeque<Loc>,
    /// Every record ≤ this was acknowledged.
    acked_through: u64,
    /// Watermark last written to the `acked` file.
    persisted_ack: u64,
    /// Acks above `acked_through + 1` (out of order).
    pending_acks: BTreeSet<u64>,
    segments: VecDeque<Segment>,
    disk_bytes: u64,
}

/// The append side: seq assignment and the active segment.
struct Appender {
    next_seq: u64,
    active: Option<Active>,
    poisoned: bool,
    /// Reused frame buffer.
    buf: Vec<u8>,
}

struct Active {
    file: Arc<File>,
    len: u64,
}

/// What the sync thread must make durable.
#[derive(Default)]
struct SyncWork {
    /// Highest seq written (to the page cache).
    written: u64,
    /// The active segment at that point.
    file: Option<Arc<File>>,
    /// Rotated-out segments not yet synced.
    retired: Vec<Arc<File>>,
    /// Written since the sync thread last took its snapshot: only the first
    /// write after a snapshot pays for the wake-up.
    dirty: bool,
    /// Last handle dropped: final sync, then exit.
    shutdown: bool,
}

/// Highest seq known durable, or the spool is poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Synced {
    through: u64,
    failed: bool,
}

struct Shared {
    dir: PathBuf,
    limits: SpoolLimits,
    state: Mutex<State>,
    appender: Mutex<Appender>,
    /// Held by the sync thread for the length of its `fdatasync`s. A
    /// record is appended on the caller's thread only when this and
    /// `appender` are both free at once (`try_lock`): then the write cannot
    /// land on a running sync, nor queue behind a writer-thread write that
    /// did, so it takes microseconds and never stalls the event loop.
    sync_gate: Mutex<()>,
    sync_work: Mutex<SyncWork>,
    sync_cv: Condvar,
    synced: watch::Sender<Synced>,
    /// Last written seq, for the shipper to wait on.
    last_seq: watch::Sender<u64>,
    metrics: PepMetrics,
    ok: Counter,
    full: Counter,
    error: Counter,
    /// Serialises watermark persistence + trimming.
    persist_lock: Mutex<()>,
    /// Exclusive `flock` on `<dir>/lock` for the spool's lifetime: two PEPs
    /// sharing a spool would hand out the same `source_seq` twice.
    _dir_lock: nix::fcntl::Flock<File>,
}

/// Dropped with the last [`AuditSpool`] handle: stops the sync thread after
/// a final sync (which releases the directory lock).
struct HandleGuard(Arc<Shared>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.sync_work.lock().shutdown = true;
        self.0.sync_cv.notify_one();
    }
}

/// Most queued records one writer-thread `write(2)` takes.
const WRITER_BATCH: usize = 1024;

/// A record queued for the writer thread: the encoded `AuditRecord`
/// without its `source_seq` ([`encode_body`]).
struct Request {
    /// One or more records, appended all or none.
    bodies: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<RangeInclusive<u64>, SpoolError>>,
}

/// Append to `out` the spool body of `f`: the protobuf `AuditRecord`
/// with only `finding` (field 3) set, exactly what prost encodes for
/// `AuditRecord { finding: Some(f.clone()), ..Default::default() }` (the
/// writer prepends `source_seq`; empty fields are not encoded), without
/// cloning the finding.
fn encode_finding_body(f: &AuditFinding, out: &mut Vec<u8>) {
    prost::encoding::message::encode(3, f, out);
}

/// `AuditRecord` minus `source_seq` (and minus `source_id`, which the
/// shipper stamps): fields 3 and 4, encoded on the caller's thread.
fn encode_body(finding: AuditFinding, trace_parent: String) -> Vec<u8> {
    AuditRecord {
        source_id: String::new(),
        source_seq: 0, // proto3 default: not encoded; the writer prepends it
        finding: Some(finding),
        trace_parent,
    }
    .encode_to_vec()
}

/// The spool body of `finding` inside the caller's span: an empty
/// `trace_id` is filled from the span and its W3C `traceparent` goes into
/// `AuditRecord.trace_parent`. Outside any OpenTelemetry span there is
/// nothing to add, and a borrowed finding is encoded without a clone.
fn body_with_trace(finding: Cow<'_, AuditFinding>) -> Vec<u8> {
    match crate::grpc::current_span_context() {
        Some(sc) => {
            let mut finding = finding.into_owned();
            if finding.trace_id.is_empty() {
                finding.trace_id = sc.trace_id().to_string();
            }
            encode_body(finding, crate::grpc::traceparent(&sc))
        }
        None => {
            let mut out = Vec::with_capacity(finding.encoded_len() + 4);
            encode_finding_body(&finding, &mut out);
            out
        }
    }
}

impl SpoolError {
    /// The same error for another caller of the batch (io::Error is not
    /// `Clone`).
    fn duplicate(&self) -> SpoolError {
        match self {
            SpoolError::Full { records, bytes } => SpoolError::Full {
                records: *records,
                bytes: *bytes,
            },
            SpoolError::Io(e) => SpoolError::Io(io::Error::new(e.kind(), e.to_string())),
            SpoolError::Poisoned => SpoolError::Poisoned,
            SpoolError::Closed => SpoolError::Closed,
            SpoolError::TooLarge(n) => SpoolError::TooLarge(*n),
            SpoolError::Locked(d) => SpoolError::Locked(d.clone()),
        }
    }
}

/// Handle to the spool. Cheap to clone; the writer and sync threads stop
/// when the last handle is dropped.
#[derive(Clone)]
pub struct AuditSpool {
    tx: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
    _guard: Arc<HandleGuard>,
}

impl std::fmt::Debug for AuditSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSpool")
            .field("dir", &self.shared.dir)
            .field("sync", &self.shared.limits.sync)
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
fn read_segment(path: &Path) -> io::Result<(Vec<Loc>, u64)> {
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
            Ok(r) => out.push(Loc {
                seq: r.source_seq,
                offset: (off + FRAME_HEADER) as u64,
                len: len as u32,
            }),
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

/// Read the frames at `locs` (ascending, all in the segment at `path`) with
/// one `pread` of their span, check each frame's header and CRC, decode,
/// and append to `out`. A frame that fails a check is logged and skipped
/// (the file changed under us: it cannot be trusted, nor shipped).
fn read_frames(path: &Path, locs: &[Loc], out: &mut Vec<AuditRecord>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (Some(first), Some(last)) = (locs.first(), locs.last()) else {
        return Ok(());
    };
    let start = first.offset.saturating_sub(FRAME_HEADER as u64);
    let end = last.offset + u64::from(last.len);
    let span = usize::try_from(end.saturating_sub(start))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "span too large"))?;
    let mut buf = vec![0u8; span];
    File::open(path)?.read_exact_at(&mut buf, start)?;
    for l in locs {
        let Some(at) = l.offset.checked_sub(start + FRAME_HEADER as u64) else {
            continue;
        };
        let at = at as usize;
        let len = l.len as usize;
        let (Some(head), Some(payload)) = (
            buf.get(at..at + FRAME_HEADER),
            buf.get(at + FRAME_HEADER..at + FRAME_HEADER + len),
        ) else {
            tracing::error!(seq = l.seq, "audit spool: frame outside the read span");
            continue;
        };
        let hlen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if hlen != len || crc32fast::hash(payload) != crc {
            tracing::error!(seq = l.seq, path = %path.display(), "audit spool: frame changed on disk (length or CRC): not shipped");
            continue;
        }
        match AuditRecord::decode(payload) {
            Ok(r) if r.source_seq == l.seq => out.push(r),
            Ok(r) => tracing::error!(
                seq = l.seq,
                found = r.source_seq,
                "audit spool: frame holds another seq: not shipped"
            ),
            Err(e) => tracing::error!(seq = l.seq, error = %e, "audit spool: undecodable record"),
        }
    }
    Ok(())
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
    /// the sync thread. Opening is synchronous; [`AuditSpool::record`] needs
    /// a tokio runtime only to wait for a sync (`SpoolSync::Always`).
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
                .map(|l| l.seq)
                .unwrap_or(first.saturating_sub(1));
            for loc in records {
                let seq = loc.seq;
                if seq <= last_seq && seq <= watermark {
                    continue;
                }
                if seq <= last_seq {
                    // Not monotonic: corruption or a foreign file. Keep the
                    // first copy only.
                    tracing::error!(seq, "audit spool: duplicate seq skipped");
                    continue;
                }
                last_seq = seq;
                unacked.push_back(loc);
            }
            disk_bytes += bytes;
            segments.push_back(Segment {
                last_seq: seg_last.max(first.saturating_sub(1)),
                path,
                bytes,
            });
        }
        let (last_tx, _) = watch::channel(last_seq);
        let (synced_tx, _) = watch::channel(Synced {
            through: last_seq,
            failed: false,
        });
        let counter = |result: &str| {
            metrics
                .spool_appends
                .get_or_create(&[("result", result.to_string())])
                .clone()
        };
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
            appender: Mutex::new(Appender {
                next_seq: last_seq + 1,
                active: None,
                poisoned: false,
                buf: Vec::new(),
            }),
            sync_work: Mutex::new(SyncWork {
                written: last_seq,
                ..SyncWork::default()
            }),
            sync_cv: Condvar::new(),
            synced: synced_tx,
            last_seq: last_tx,
            ok: counter("ok"),
            full: counter("full"),
            error: counter("error"),
            metrics,
            persist_lock: Mutex::new(()),
            sync_gate: Mutex::new(()),
            _dir_lock: dir_lock,
        });
        shared.update_gauge();
        // Trim what an earlier run acked but did not get to delete.
        shared.trim()?;
        let syncer = shared.clone();
        std::thread::Builder::new()
            .name("audit-spool-sync".into())
            .spawn(move || syncer.sync_loop())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("audit-spool".into())
            .spawn(move || writer.writer_loop(rx))?;
        Ok(AuditSpool {
            tx,
            _guard: Arc::new(HandleGuard(shared.clone())),
            shared,
        })
    }

    /// Append `finding`; returns its `source_seq` once it is written (and,
    /// with [`SpoolSync::Always`], synced). Any `Err` ⇒ the caller denies
    /// with `fail_closed:audit_spool`.
    ///
    /// An empty `trace_id` is filled from the caller's current span when
    /// OpenTelemetry tracing is on (the PEP records inside the connection's
    /// span), so the audit record links to the decision's trace. The same
    /// span's W3C `traceparent` goes into `AuditRecord.trace_parent` (spooled
    /// with the record, so it survives a restart) for the audit service to
    /// join the trace.
    pub async fn record(&self, finding: AuditFinding) -> Result<u64, SpoolError> {
        self.record_body(body_with_trace(Cow::Owned(finding))).await
    }

    /// [`AuditSpool::record`] for a borrowed finding: without OpenTelemetry
    /// (nothing to stamp into it) the finding is encoded in place, not
    /// cloned first.
    pub async fn record_ref(&self, finding: &AuditFinding) -> Result<u64, SpoolError> {
        self.record_body(body_with_trace(Cow::Borrowed(finding)))
            .await
    }

    async fn record_body(&self, body: Vec<u8>) -> Result<u64, SpoolError> {
        if body.len() + FRAME_HEADER > MAX_FRAME {
            self.shared.error.inc();
            return Err(SpoolError::TooLarge(body.len()));
        }
        // Written here when that cannot block (module doc, "Threads").
        let seq = match self.shared.try_append_now(&body) {
            Some(res) => res?,
            None => {
                self.shared.metrics.spool_deferred.inc();
                *self.submit(vec![body]).await?.end()
            }
        };
        self.durable(seq).await?;
        Ok(seq)
    }

    /// With [`SpoolSync::Always`], wait until `seq` is on stable storage.
    async fn durable(&self, seq: u64) -> Result<(), SpoolError> {
        if self.shared.limits.sync == SpoolSync::Always {
            self.wait_synced(seq).await?;
        }
        Ok(())
    }

    /// Append every finding (all or none) on the writer thread, without
    /// blocking the caller's thread, and return their seqs once written
    /// (and, with [`SpoolSync::Always`], synced). For batching PEPs that
    /// run on an async runtime (the DNS sinkhole's `recvmmsg` loop); the
    /// batch shares one `write(2)` with whatever else is queued.
    pub async fn record_batch(
        &self,
        findings: Vec<AuditFinding>,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        if findings.is_empty() {
            return Err(SpoolError::TooLarge(0));
        }
        let mut bodies = Vec::with_capacity(findings.len());
        for f in findings {
            let body = encode_body(f, String::new());
            if body.len() + FRAME_HEADER > MAX_FRAME {
                self.shared.error.inc();
                return Err(SpoolError::TooLarge(body.len()));
            }
            bodies.push(body);
        }
        let range = self.submit(bodies).await?;
        self.durable(*range.end()).await?;
        Ok(range)
    }

    /// Hand `bodies` to the writer thread; their seqs once written (not
    /// yet synced: see [`Self::durable`]).
    async fn submit(&self, bodies: Vec<Vec<u8>>) -> Result<RangeInclusive<u64>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { bodies, reply })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Append every finding with one `write(2)` on the caller's thread (all
    /// or none) and return their seqs. For PEPs that decide in batches: the
    /// write is a few µs, but one racing the background `fdatasync` can
    /// block the calling thread for about a millisecond.
    /// [`AuditSpool::record_batch`] moves the write to the writer thread
    /// instead, at the price of a thread hand-off per batch; the DNS
    /// sinkhole measured both and keeps this one (better p50 and p99 at
    /// 10k QPS: `dns-sinkhole/BENCH_NOTES.md`). Per-connection async
    /// callers (the proxy) use [`AuditSpool::record`], which writes inline
    /// only when that cannot block. Never waits for a sync: with
    /// [`SpoolSync::Always`] the caller awaits [`AuditSpool::wait_synced`] on the last seq before it
    /// forwards anything. An empty batch is refused as `TooLarge(0)`: it
    /// has no seq range.
    ///
    /// The findings are borrowed, so a caller that appends at a high rate
    /// can keep its records (and their strings' buffers) for the next batch.
    pub fn append_batch(
        &self,
        findings: &[AuditFinding],
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        if findings.is_empty() {
            return Err(SpoolError::TooLarge(0));
        }
        // One buffer for the whole batch, not one allocation per record.
        let mut all = Vec::with_capacity(findings.len() * 192);
        let mut ends = Vec::with_capacity(findings.len());
        for f in findings {
            encode_finding_body(f, &mut all);
            ends.push(all.len());
        }
        let starts = std::iter::once(0).chain(ends.iter().copied());
        self.shared
            .append(starts.zip(ends.iter().copied()).map(|(a, b)| &all[a..b]))
    }

    /// Wait until every record ≤ `seq` is on stable storage.
    pub async fn wait_synced(&self, seq: u64) -> Result<(), SpoolError> {
        let mut rx = self.shared.synced.subscribe();
        let s = rx
            .wait_for(|s| s.failed || s.through >= seq)
            .await
            .map_err(|_| SpoolError::Closed)?;
        if s.failed {
            return Err(SpoolError::Poisoned);
        }
        Ok(())
    }

    /// Whether a record would be taken right now: not poisoned, below both
    /// limits. A hint for refusing early; `record` remains the authority.
    pub fn accepting(&self) -> bool {
        if self.shared.appender.lock().poisoned || self.shared.synced.borrow().failed {
            return false;
        }
        let st = self.shared.state.lock();
        (st.unacked.len() as u64) < self.shared.limits.max_records
            && st.disk_bytes < self.shared.limits.max_bytes
    }

    /// The durability policy this spool was opened with.
    pub fn sync_policy(&self) -> SpoolSync {
        self.shared.limits.sync
    }

    /// Highest seq known to be on stable storage.
    pub fn synced_through(&self) -> u64 {
        self.shared.synced.borrow().through
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
    ///
    /// Read back from the segment files (one `pread` per segment touched).
    /// A record that can no longer be read is left out and logged: trimmed
    /// meanwhile (then it was acknowledged), or a disk error (the shipper
    /// asks again on its next round).
    pub fn unacked_after(&self, after: u64, max: usize) -> Vec<AuditRecord> {
        let (picked, segments): (Vec<Loc>, Vec<Segment>) = {
            let st = self.shared.state.lock();
            let start = st.unacked.partition_point(|l| l.seq <= after);
            let picked: Vec<Loc> = st.unacked.iter().skip(start).take(max).copied().collect();
            let Some(first) = picked.first() else {
                return Vec::new();
            };
            let from = st.segments.partition_point(|s| s.last_seq < first.seq);
            (picked, st.segments.iter().skip(from).cloned().collect())
        };
        let mut out = Vec::with_capacity(picked.len());
        let mut rest = picked.as_slice();
        for seg in &segments {
            let n = rest.partition_point(|l| l.seq <= seg.last_seq);
            let (here, later) = rest.split_at(n);
            rest = later;
            if here.is_empty() {
                continue;
            }
            if let Err(e) = read_frames(&seg.path, here, &mut out) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::error!(path = %seg.path.display(), error = %e, "audit spool: cannot read back unacked records");
                }
                break;
            }
            if rest.is_empty() {
                break;
            }
        }
        out
    }

    /// Notified with the last written seq after every append.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.last_seq.subscribe()
    }

    /// The audit service acknowledged `seq` (durably appended). Acks may
    /// arrive out of order; the watermark advances over contiguous acks.
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
        while st.unacked.front().is_some_and(|l| l.seq <= through) {
            st.unacked.pop_front();
        }
        drop(st);
        self.shared.update_gauge();
    }

    /// Persist the ack watermark and delete fully acked segments.
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

    /// Frame, bound-check and write a batch (all or none), under the append
    /// lock. `bodies` are [`encode_body`] outputs. Returns the seq range.
    fn append<'a>(
        &self,
        bodies: impl Iterator<Item = &'a [u8]>,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        let mut ap = self.appender.lock();
        self.counted(self.append_locked(&mut ap, bodies))
    }

    /// Count an append's outcome in the spool's metrics.
    fn counted(
        &self,
        res: Result<RangeInclusive<u64>, SpoolError>,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        match &res {
            Ok(r) => self.ok.inc_by(r.end() - r.start() + 1),
            Err(SpoolError::Full { .. }) => self.full.inc(),
            Err(_) => self.error.inc(),
        };
        res
    }

    /// Append one encoded body on the calling thread if that cannot block
    /// (see `sync_gate`); `None` means "busy, hand it to the writer thread".
    fn try_append_now(&self, body: &[u8]) -> Option<Result<u64, SpoolError>> {
        let _gate = self.sync_gate.try_lock()?;
        let mut ap = self.appender.try_lock()?;
        // Opening a segment creates a file and syncs the directory: the
        // writer thread does that, never the event loop.
        match &ap.active {
            Some(a) if a.len < self.limits.segment_bytes => {}
            _ => return None,
        }
        let res = self.counted(self.append_locked(&mut ap, std::iter::once(body)));
        Some(res.map(|r| *r.end()))
    }

    fn append_locked<'a>(
        &self,
        ap: &mut Appender,
        bodies: impl Iterator<Item = &'a [u8]>,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        if ap.poisoned || self.synced.borrow().failed {
            return Err(SpoolError::Poisoned);
        }
        let first_seq = ap.next_seq;
        let mut buf = std::mem::take(&mut ap.buf);
        buf.clear();
        // (seq, start of payload, end of payload) in `buf`.
        let mut frames: Vec<(u64, usize, usize)> = Vec::new();
        for body in bodies {
            let seq = first_seq + frames.len() as u64;
            let at = buf.len();
            buf.extend_from_slice(&[0u8; FRAME_HEADER]);
            // `source_seq` (field 2) goes in front of the body: protobuf
            // fields may come in any order, so this is the same
            // `AuditRecord` prost would encode, without re-encoding the
            // finding here.
            prost::encoding::encode_key(2, prost::encoding::WireType::Varint, &mut buf);
            prost::encoding::encode_varint(seq, &mut buf);
            buf.extend_from_slice(body);
            let len = buf.len() - at - FRAME_HEADER;
            if len > MAX_FRAME {
                ap.buf = buf;
                return Err(SpoolError::TooLarge(len));
            }
            let crc = crc32fast::hash(&buf[at + FRAME_HEADER..]);
            buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
            buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
            frames.push((seq, at + FRAME_HEADER, buf.len()));
        }
        let Some(&(last_seq, _, _)) = frames.last() else {
            ap.buf = buf;
            return Err(SpoolError::TooLarge(0));
        };
        {
            let st = self.state.lock();
            let (records, bytes) = (st.unacked.len() as u64, st.disk_bytes);
            if records + frames.len() as u64 > self.limits.max_records
                || bytes + buf.len() as u64 > self.limits.max_bytes
            {
                ap.buf = buf;
                return Err(SpoolError::Full { records, bytes });
            }
        }
        let base = match self.write(ap, &buf, first_seq, last_seq) {
            Ok(base) => base,
            Err(e) => {
                ap.buf = buf;
                tracing::error!(error = %e, "audit spool write failed");
                return Err(SpoolError::Io(e));
            }
        };
        ap.next_seq = last_seq + 1;
        {
            let mut st = self.state.lock();
            for &(seq, a, b) in &frames {
                st.unacked.push_back(Loc {
                    seq,
                    offset: base + a as u64,
                    len: (b - a) as u32,
                });
            }
            self.metrics
                .spool_unacked
                .set(i64::try_from(st.unacked.len()).unwrap_or(i64::MAX));
        }
        ap.buf = buf;
        self.last_seq.send_replace(last_seq);
        // Hand the new high-water mark to the sync thread (under its lock,
        // so the wake-up cannot fall between its check and its wait).
        {
            let mut w = self.sync_work.lock();
            w.written = last_seq;
            if !w.dirty {
                w.dirty = true;
                self.sync_cv.notify_one();
            }
        }
        Ok(first_seq..=last_seq)
    }

    /// The `audit-spool` writer thread: takes every queued [`AuditSpool::record`]
    /// request, writes them with one `write(2)` and completes each caller.
    /// Records that no longer fit are refused one by one (`Full`), the rest
    /// still go in.
    fn writer_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut batch: Vec<Request> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < WRITER_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // Which requests fit, in order (a request's frames are its
            // bodies + header + at most 11 seq bytes each; all or none).
            let (records_now, bytes_now) = {
                let st = self.state.lock();
                (st.unacked.len() as u64, st.disk_bytes)
            };
            let (mut records, mut bytes) = (records_now, bytes_now);
            let mut accepted = Vec::with_capacity(batch.len());
            for r in batch.drain(..) {
                let n = r.bodies.len() as u64;
                let framed: u64 = r
                    .bodies
                    .iter()
                    .map(|b| (b.len() + FRAME_HEADER + 11) as u64)
                    .sum();
                if records + n > self.limits.max_records || bytes + framed > self.limits.max_bytes {
                    self.full.inc_by(n);
                    let _ = r.reply.send(Err(SpoolError::Full {
                        records: records_now,
                        bytes: bytes_now,
                    }));
                    continue;
                }
                records += n;
                bytes += framed;
                accepted.push(r);
            }
            if accepted.is_empty() {
                continue;
            }
            let bodies = accepted
                .iter()
                .flat_map(|r| r.bodies.iter().map(Vec::as_slice));
            match self.append(bodies) {
                Ok(range) => {
                    let mut next = *range.start();
                    for r in accepted {
                        let n = r.bodies.len() as u64;
                        let _ = r.reply.send(Ok(next..=next + n - 1));
                        next += n;
                    }
                }
                Err(e) => {
                    for r in accepted {
                        let _ = r.reply.send(Err(e.duplicate()));
                    }
                }
            }
        }
    }

    /// Write `buf` at the end of the active segment (rotating first if it is
    /// full); returns the segment offset `buf` starts at.
    fn write(
        &self,
        ap: &mut Appender,
        buf: &[u8],
        first_seq: u64,
        last_seq: u64,
    ) -> io::Result<u64> {
        let need_new = match &ap.active {
            None => true,
            Some(a) => a.len >= self.limits.segment_bytes,
        };
        if need_new {
            self.open_segment(ap, first_seq)?;
        }
        let Some(active) = ap.active.as_mut() else {
            return Err(io::Error::other("no active segment"));
        };
        let before = active.len;
        match (&*active.file).write_all(buf) {
            Ok(()) => {
                active.len += buf.len() as u64;
                let mut st = self.state.lock();
                st.disk_bytes += buf.len() as u64;
                if let Some(seg) = st.segments.back_mut() {
                    seg.bytes += buf.len() as u64;
                    seg.last_seq = last_seq;
                }
                Ok(before)
            }
            Err(e) => {
                // Cut the partial frame off so the next record starts on a
                // frame boundary; if even that fails the file is unusable.
                let rollback = active
                    .file
                    .set_len(before)
                    .and_then(|()| (&*active.file).seek(SeekFrom::Start(before)).map(|_| ()));
                if rollback.is_err() {
                    ap.poisoned = true;
                }
                Err(e)
            }
        }
    }

    fn open_segment(&self, ap: &mut Appender, first_seq: u64) -> io::Result<()> {
        // Reuse the last recovered segment if it is still small.
        if ap.active.is_none() {
            let last = self.state.lock().segments.back().cloned();
            if let Some(seg) = last
                && seg.bytes < self.limits.segment_bytes
            {
                let file = OpenOptions::new().append(true).open(&seg.path)?;
                let file = Arc::new(file);
                self.sync_work.lock().file = Some(file.clone());
                ap.active = Some(Active {
                    file,
                    len: seg.bytes,
                });
                return Ok(());
            }
        }
        let path = self.dir.join(seg_name(first_seq));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        fsync_dir(&self.dir)?;
        self.state.lock().segments.push_back(Segment {
            last_seq: first_seq.saturating_sub(1),
            path,
            bytes: 0,
        });
        let file = Arc::new(file);
        {
            // The rotated-out segment still needs its final sync.
            let mut w = self.sync_work.lock();
            if let Some(old) = w.file.replace(file.clone()) {
                w.retired.push(old);
            }
        }
        ap.active = Some(Active { file, len: 0 });
        Ok(())
    }

    /// The `audit-spool-sync` thread: waits for a write, lets the
    /// [`SpoolSync::Interval`] window fill, `fdatasync`s every file with
    /// unsynced data and publishes the synced seq. Exits after a final sync
    /// once the last handle is gone.
    /// `fdatasync`. This module's tests can make it fail for one spool
    /// directory: a real failure needs a failing block device.
    fn sync_data(&self, f: &File) -> io::Result<()> {
        #[cfg(test)]
        if tests::sync_fails_in(&self.dir) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        f.sync_data()
    }

    fn sync_loop(self: Arc<Self>) {
        loop {
            let shutdown = {
                let mut w = self.sync_work.lock();
                while !w.dirty && !w.shutdown {
                    self.sync_cv.wait(&mut w);
                }
                w.shutdown
            };
            if !shutdown && let SpoolSync::Interval(d) = self.limits.sync {
                std::thread::sleep(d);
            }
            // Everything written before this snapshot is covered by this sync.
            let (through, file, retired) = {
                let mut w = self.sync_work.lock();
                w.dirty = false;
                (w.written, w.file.clone(), std::mem::take(&mut w.retired))
            };
            let res = {
                let _gate = self.sync_gate.lock();
                retired
                    .iter()
                    .chain(file.iter())
                    .try_for_each(|f| self.sync_data(f))
            };
            match res {
                Ok(()) => {
                    self.synced
                        .send_modify(|s| s.through = s.through.max(through));
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit spool fdatasync failed: spool poisoned, every later attempt is denied");
                    self.synced.send_modify(|s| s.failed = true);
                    self.error.inc();
                }
            }
            if shutdown {
                return;
            }
        }
    }
}

/// How long the shipper waits between watermark persists (bounded replay).
pub(crate) const PERSIST_INTERVAL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    /// Spool directories whose `fdatasync`s fail (EIO).
    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(super) fn sync_fails_in(dir: &Path) -> bool {
        FAILING.lock().iter().any(|d| d == dir)
    }

    fn finding(host: &str) -> AuditFinding {
        AuditFinding {
            pep_kind: "proxy".into(),
            host: host.into(),
            port: 443,
            ..AuditFinding::default()
        }
    }

    /// Lock `which` on another thread, as the sync or writer thread would;
    /// calling the returned closure releases it.
    fn held_elsewhere<T: Send + 'static>(
        shared: Arc<Shared>,
        which: fn(&Shared) -> &Mutex<T>,
    ) -> impl FnOnce() {
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _g = which(&shared).lock();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        move || {
            drop(release_tx);
            t.join().unwrap();
        }
    }

    /// A record is written on the caller's thread only while no sync runs:
    /// with the sync gate held (as during `fdatasync`) it goes through the
    /// writer thread and still succeeds, without waiting for the gate.
    #[tokio::test]
    async fn a_record_never_waits_for_a_running_sync() {
        let dir = tempfile::tempdir().unwrap();
        // No background sync during the test (it would defer records too).
        let limits = SpoolLimits {
            sync: SpoolSync::Interval(Duration::from_secs(60)),
            ..SpoolLimits::default()
        };
        let spool = AuditSpool::open(dir.path(), limits).unwrap();
        let deferred = || spool.metrics().spool_deferred.get();
        assert_eq!(spool.record(finding("a.test")).await.unwrap(), 1);
        assert_eq!(deferred(), 1, "the first record opens the segment");
        assert_eq!(spool.record(finding("a2.test")).await.unwrap(), 2);
        assert_eq!(deferred(), 1, "inline when nothing runs");
        let sync_running = held_elsewhere(spool.shared.clone(), |s| &s.sync_gate);
        let seq = tokio::time::timeout(Duration::from_secs(5), spool.record(finding("b.test")))
            .await
            .expect("record must not wait for the sync")
            .unwrap();
        assert_eq!(seq, 3);
        assert_eq!(deferred(), 2, "handed to the writer thread");
        sync_running();
        // A writer-thread write in progress defers too.
        let writing = held_elsewhere(spool.shared.clone(), |s| &s.appender);
        let late = spool.record(finding("c.test"));
        tokio::pin!(late);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut late)
                .await
                .is_err(),
            "queued behind the busy appender, not written inline"
        );
        assert_eq!(deferred(), 3);
        writing();
        assert_eq!(late.await.unwrap(), 4);
        assert_eq!(spool.record(finding("d.test")).await.unwrap(), 5);
        assert_eq!(deferred(), 3, "inline again");
        let hosts: Vec<String> = spool
            .unacked_after(0, 10)
            .into_iter()
            .filter_map(|r| r.finding.map(|f| f.host))
            .collect();
        assert_eq!(hosts, ["a.test", "a2.test", "b.test", "c.test", "d.test"]);
    }

    /// A record that must open a new segment (file create + directory
    /// sync) goes through the writer thread; the records between
    /// rotations are written inline.
    #[tokio::test]
    async fn segment_rotation_is_left_to_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            segment_bytes: 200,
            sync: SpoolSync::Interval(Duration::from_secs(60)),
            ..SpoolLimits::default()
        };
        let spool = AuditSpool::open(dir.path(), limits).unwrap();
        let mut inline = 0;
        for i in 0..40 {
            let (segs, deferred) = (spool.segment_count(), spool.metrics().spool_deferred.get());
            spool.record(finding(&format!("h{i}.test"))).await.unwrap();
            let opened = spool.segment_count() > segs;
            let handed_off = spool.metrics().spool_deferred.get() > deferred;
            // (A record may also be handed off because a sync was running.)
            assert!(handed_off || !opened, "record {i} opened a segment inline");
            inline += usize::from(!handed_off);
        }
        assert!(spool.segment_count() > 5, "{}", spool.segment_count());
        assert!(inline > 20, "{inline} of 40 inline");
    }

    /// The borrowed encoding is byte for byte the owned one, for an empty
    /// finding and for one with every kind of field set.
    #[test]
    fn borrowed_body_encoding_matches_prost() {
        let full = AuditFinding {
            timestamp_unix_nanos: 1_700_000_000_123,
            pep_kind: "dns".into(),
            pep_id: "pep-1".into(),
            workload_id: "w".into(),
            pid: 42,
            process_start_time: 7,
            exe: "/usr/bin/curl".into(),
            uid: 1000,
            host: "example.com".into(),
            host_source: 3,
            port: 53,
            dialled_ip: "192.0.2.1".into(),
            transport: 2,
            decision: 2,
            reason: "not_in_allowlist".into(),
            rule_id: "r".into(),
            policy_version: 9,
            fail_closed_cause: "c".into(),
            escalation_id: "e".into(),
            request_id: "id-1".into(),
            would_deny: true,
            fail_mode: "closed".into(),
            trace_id: "t".into(),
            detail: "d".into(),
        };
        for f in [AuditFinding::default(), finding("x"), full] {
            let mut borrowed = Vec::new();
            encode_finding_body(&f, &mut borrowed);
            assert_eq!(borrowed, encode_body(f, String::new()));
        }
    }

    async fn fail_syncs_and_check(sync: SpoolSync) {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSpool::open(
            dir.path(),
            SpoolLimits {
                sync,
                ..SpoolLimits::default()
            },
        )
        .unwrap();
        let first = s.record(finding("before")).await.unwrap();
        s.wait_synced(first).await.unwrap();
        assert!(s.accepting());

        FAILING.lock().push(s.shared.dir.clone());
        let r = s.record(finding("during")).await;
        match sync {
            // The answer would wait for the sync, which failed.
            SpoolSync::Always => assert!(matches!(r, Err(SpoolError::Poisoned)), "{r:?}"),
            // Written before the failing background sync: the caller learns
            // it from wait_synced, and every later attempt is refused.
            SpoolSync::Interval(_) => {
                let seq = r.unwrap();
                let w = tokio::time::timeout(Duration::from_secs(5), s.wait_synced(seq))
                    .await
                    .expect("sync attempted");
                assert!(matches!(w, Err(SpoolError::Poisoned)), "{w:?}");
            }
        }
        assert!(!s.accepting(), "a poisoned spool still accepts");
        assert!(s.synced_through() < first + 1);
        // Poisoned for good: the device is no longer trusted, even once
        // fdatasync works again.
        FAILING.lock().retain(|d| d != &s.shared.dir);
        let again = s.record(finding("after")).await;
        assert!(matches!(again, Err(SpoolError::Poisoned)), "{again:?}");
        let batch = s.append_batch(&[finding("after-batch")]);
        assert!(matches!(batch, Err(SpoolError::Poisoned)), "{batch:?}");
        assert!(!s.accepting());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fdatasync_poisons_an_always_spool() {
        fail_syncs_and_check(SpoolSync::Always).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fdatasync_poisons_an_interval_spool() {
        fail_syncs_and_check(SpoolSync::Interval(Duration::from_millis(2))).await;
    }
}
