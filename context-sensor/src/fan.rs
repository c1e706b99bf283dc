//! The fanotify side: a permission-event group, its marks, and the reader
//! loop that answers every event.
//!
//! Invariant (a violation would hang every opener on the box): **every
//! permission event gets exactly one response and its fd is closed**. That is
//! enforced by [`PermGuard`]: it owns the event, `respond` writes the answer,
//! and its `Drop` writes the fallback answer on any path that forgot to
//! (error, early return, panic, runtime shutdown). If the whole sensor dies
//! the kernel releases the group and allows every pending open.
//!
//! Hot path for non-sensitive files: one `readlink(/proc/self/fd/N)`, one
//! glob-set match, one `write` of `FAN_ALLOW` on the reader thread. Sensitive
//! opens are handed to a tokio task that reads `/proc`, submits the event
//! and waits (bounded) for the PDP ack, so one slow ack never delays other
//! opens.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};
use secureops_proto::v1::{FileOpened, process_event};
use tokio::sync::oneshot;

use crate::globs::SensitiveMatcher;
use crate::metrics::Metrics;
use crate::procinfo;
use crate::reporter::{AckOutcome, ReporterHandle, Submission, SubmitError};

/// What a sensitive open gets when the PDP did not ack within the bounded
/// wait (or is unreachable, or rejected the event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnTimeout {
    /// Fail closed: the open fails with `EPERM`. The event stays queued and
    /// is delivered when the PDP is back.
    #[default]
    Deny,
    /// Let the open proceed; the event stays queued, is delivered late and
    /// counted (`secureops_sensor_ack_timeouts_total`, late acks).
    Allow,
}

impl std::str::FromStr for OnTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(OnTimeout::Deny),
            "allow" => Ok(OnTimeout::Allow),
            other => Err(format!(
                "unknown --on-timeout {other:?} (expected allow|deny)"
            )),
        }
    }
}

impl OnTimeout {
    fn response(self) -> Response {
        match self {
            OnTimeout::Deny => Response::FAN_DENY,
            OnTimeout::Allow => Response::FAN_ALLOW,
        }
    }
}

/// Errors setting up fanotify, with the operator-facing explanation.
#[derive(Debug, thiserror::Error)]
pub enum FanError {
    #[error(
        "fanotify_init: {0} — the sensor needs CAP_SYS_ADMIN (run as root or grant the capability, e.g. `setcap cap_sys_admin+ep` / a pod securityContext adding SYS_ADMIN)"
    )]
    InitPermission(Errno),
    #[error(
        "fanotify_init: {0} — is fanotify with permission events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS) enabled in this kernel?"
    )]
    Init(Errno),
    #[error("opening {path} to mark it: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fanotify_mark {what} {path}: {errno}")]
    Mark {
        what: &'static str,
        path: PathBuf,
        errno: Errno,
    },
    #[error("reading fanotify events: {0}")]
    Read(Errno),
    #[error("fanotify event metadata version mismatch (kernel {kernel}, built for {built})")]
    Version { kernel: u8, built: u8 },
}

/// Whether this process has `CAP_SYS_ADMIN` in its effective set (read from
/// `/proc/self/status`, so it works without libcap). `None` when unknown.
pub fn has_cap_sys_admin() -> Option<bool> {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    let hex = line.trim_start_matches("CapEff:").trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Create the permission-event group.
///
/// `FAN_CLASS_CONTENT` is required for permission events;
/// `FAN_UNLIMITED_QUEUE` because only permission events are marked, so the
/// queue never holds more events than there are blocked openers.
pub fn init() -> Result<Fanotify, FanError> {
    let flags =
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_UNLIMITED_QUEUE;
    let ev_flags = EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC;
    Fanotify::init(flags, ev_flags).map_err(|e| match e {
        Errno::EPERM | Errno::EACCES => FanError::InitPermission(e),
        other => FanError::Init(other),
    })
}

/// What to mark.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    /// Whole mounts (`FAN_MARK_MOUNT`): every open on the mount is seen.
    pub mounts: Vec<PathBuf>,
    /// Single directories (inode mark + `FAN_EVENT_ON_CHILD`): opens of files
    /// directly inside (not recursive). Lower overhead, smaller blast radius.
    pub dirs: Vec<PathBuf>,
}

/// Place the marks. Call after the reader thread runs, so no marked open
/// waits for a reader that does not exist yet.
pub fn mark(fan: &Fanotify, marks: &Marks) -> Result<(), FanError> {
    for (what, paths, flags, mask) in [
        (
            "mount",
            &marks.mounts,
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_MOUNT,
            MaskFlags::FAN_OPEN_PERM,
        ),
        (
            "dir",
            &marks.dirs,
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_ONLYDIR,
            MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD,
        ),
    ] {
        for p in paths {
            fan.mark(flags, mask, nix::fcntl::AT_FDCWD, Some(p.as_path()))
                .map_err(|errno| FanError::Mark {
                    what,
                    path: p.clone(),
                    errno,
                })?;
            tracing::info!(what, path = %p.display(), "marked for FAN_OPEN_PERM");
        }
    }
    Ok(())
}

/// Owns one permission event until it is answered (see module docs).
struct PermGuard {
    fan: Arc<Fanotify>,
    event: Option<FanotifyEvent>,
    fallback: Response,
    metrics: Metrics,
}

impl PermGuard {
    fn event_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.event.as_ref().and_then(|e| e.fd())
    }

    fn respond(mut self, response: Response, reason: &'static str) {
        if let Some(ev) = self.event.take() {
            write_response(&self.fan, &ev, response, reason, &self.metrics);
            // `ev` dropped here: its fd is closed.
        }
    }
}

impl Drop for PermGuard {
    fn drop(&mut self) {
        if let Some(ev) = self.event.take() {
            write_response(&self.fan, &ev, self.fallback, "fallback", &self.metrics);
        }
    }
}

fn write_response(
    fan: &Fanotify,
    ev: &FanotifyEvent,
    response: Response,
    reason: &'static str,
    metrics: &Metrics,
) {
    let Some(fd) = ev.fd() else { return };
    let verdict = if response == Response::FAN_DENY {
        "deny"
    } else {
        "allow"
    };
    loop {
        match fan.write_response(FanotifyResponse::new(fd, response)) {
            Ok(()) => {
                metrics
                    .responses
                    .get_or_create(&[("response", verdict), ("reason", reason)])
                    .inc();
                return;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                // ENOENT: the kernel no longer waits for this event (the
                // opener was killed). Nothing else can be done.
                metrics.response_errors.inc();
                tracing::warn!(error = %e, pid = ev.pid(), "writing fanotify response failed");
                return;
            }
        }
    }
}

/// Everything the reader needs.
pub struct SensorCtx {
    pub matcher: SensitiveMatcher,
    pub reporter: ReporterHandle,
    pub metrics: Metrics,
    pub ack_timeout: Duration,
    pub on_timeout: OnTimeout,
    pub runtime: tokio::runtime::Handle,
    /// Non-sensitive files under these prefixes get an evictable kernel
    /// ignore mark after their first open (see [`SensorCtx::cacheable`]).
    pub cache_prefixes: Vec<String>,
    /// Cleared when the kernel refuses ignore marks (old kernels).
    pub cache_enabled: std::sync::atomic::AtomicBool,
}

impl SensorCtx {
    /// Whether a non-sensitive path may be cached in the kernel as "ignore".
    ///
    /// Why only prefixes: an ignore mark sits on the *inode*, so a file that
    /// is later renamed or hard-linked to a sensitive name would stay
    /// ignored. Under root-owned system directories (`/usr/`, `/lib/`, ...)
    /// an unprivileged workload can neither rename nor (with
    /// `fs.protected_hardlinks`) link those inodes, so caching them is safe
    /// and removes the bulk of mount-mode overhead (shared libraries,
    /// binaries). Operators must list only such directories.
    pub fn cacheable(&self, path: &str) -> bool {
        self.cache_enabled
            .load(std::sync::atomic::Ordering::Relaxed)
            && self
                .cache_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
    }
}

/// The blocking reader loop; returns only on a fatal error. Run it on a
/// dedicated thread. It never opens a file (only `readlink`), so it can
/// never block on its own mark.
pub fn run_reader(fan: Arc<Fanotify>, ctx: Arc<SensorCtx>) -> Result<(), FanError> {
    let own_pid = std::process::id() as i32;
    loop {
        let events = match fan.read_events() {
            Ok(evs) => evs,
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => continue,
            Err(e) => return Err(FanError::Read(e)),
        };
        for ev in events {
            if !ev.check_version() {
                // The layout is not the one we were built for: answering may
                // be impossible. Dying releases the group (kernel allows all).
                return Err(FanError::Version {
                    kernel: ev.version(),
                    built: nix::sys::fanotify::FANOTIFY_METADATA_VERSION,
                });
            }
            handle_event(&fan, &ctx, ev, own_pid);
        }
    }
}

fn count(ctx: &SensorCtx, kind: &'static str) {
    ctx.metrics.events.get_or_create(&[("kind", kind)]).inc();
}

fn handle_event(fan: &Arc<Fanotify>, ctx: &Arc<SensorCtx>, ev: FanotifyEvent, own_pid: i32) {
    let Some(fd) = ev.fd() else {
        // FAN_Q_OVERFLOW: no fd, nothing to answer (cannot happen with an
        // unlimited queue, counted anyway).
        count(ctx, "overflow");
        return;
    };
    let raw_fd = fd.as_raw_fd();
    let mask = ev.mask();
    let pid = ev.pid();
    if !mask.intersects(
        MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_ACCESS_PERM | MaskFlags::FAN_OPEN_EXEC_PERM,
    ) {
        count(ctx, "other");
        return; // dropping `ev` closes its fd
    }
    let guard = PermGuard {
        fan: fan.clone(),
        event: Some(ev),
        fallback: Response::FAN_ALLOW,
        metrics: ctx.metrics.clone(),
    };
    if pid == own_pid {
        count(ctx, "self");
        guard.respond(Response::FAN_ALLOW, "self");
        return;
    }
    let path = match std::fs::read_link(format!("/proc/self/fd/{raw_fd}")) {
        Ok(p) => p,
        Err(e) => {
            count(ctx, "unresolved");
            tracing::debug!(error = %e, pid, "cannot resolve event path");
            guard.respond(Response::FAN_ALLOW, "unresolved");
            return;
        }
    };
    let path = path.to_string_lossy();
    if !ctx.matcher.is_sensitive(&path) {
        count(ctx, "non_sensitive");
        if ctx.cacheable(&path)
            && let Some(fd) = guard.event_fd()
        {
            ignore_inode(fan, ctx, fd);
        }
        guard.respond(Response::FAN_ALLOW, "non_sensitive");
        return;
    }
    count(ctx, "sensitive");
    ctx.metrics.sensitive_opens.inc();
    let path = path.into_owned();
    let observed_at = SystemTime::now();
    let observed_mono = Instant::now();
    let mut guard = guard;
    guard.fallback = ctx.on_timeout.response();
    let task_ctx = ctx.clone();
    // If the runtime is gone the closure is dropped: the guard answers with
    // the fallback.
    ctx.runtime.spawn(async move {
        sensitive_open(
            task_ctx,
            guard,
            pid as u32,
            path,
            observed_at,
            observed_mono,
        )
        .await;
    });
}

/// Put an evictable ignore mark for `FAN_OPEN_PERM` on the inode behind
/// `fd`: later opens of it are not reported to us at all (the kernel may
/// evict the mark under memory pressure; the next open then re-adds it).
fn ignore_inode(fan: &Fanotify, ctx: &SensorCtx, fd: std::os::fd::BorrowedFd<'_>) {
    let flags = MarkFlags::FAN_MARK_ADD
        | MarkFlags::FAN_MARK_IGNORED_MASK
        | MarkFlags::FAN_MARK_IGNORED_SURV_MODIFY
        | MarkFlags::FAN_MARK_EVICTABLE;
    match fan.mark(flags, MaskFlags::FAN_OPEN_PERM, fd, None::<&Path>) {
        Ok(()) => {
            ctx.metrics.ignore_marks.inc();
        }
        Err(e) => {
            ctx.cache_enabled
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "kernel refused an ignore mark; inode caching disabled");
        }
    }
}

async fn sensitive_open(
    ctx: Arc<SensorCtx>,
    guard: PermGuard,
    pid: u32,
    path: String,
    observed_at: SystemTime,
    observed_mono: Instant,
) {
    let deadline = tokio::time::Instant::from_std(observed_mono + ctx.ack_timeout);
    let (process, ancestors) = procinfo::describe(pid);
    tracing::debug!(pid, start_time = process.start_time, exe = %process.exe, path = %path, "sensitive open");
    let (tx, rx) = oneshot::channel();
    let sub = Submission {
        event: process_event::Event::FileOpened(FileOpened {
            process: Some(process),
            path: path.clone(),
            ancestors,
        }),
        observed_at,
        observed_mono,
        waiter: Some(tx),
    };
    let cause = match ctx.reporter.submit(sub) {
        Err(SubmitError::Full) => "queue_full",
        Err(SubmitError::Closed) => "reporter_stopped",
        Ok(()) => match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(AckOutcome::Applied)) => {
                guard.respond(Response::FAN_ALLOW, "acked");
                return;
            }
            Ok(Ok(AckOutcome::Rejected(_))) => "rejected",
            Ok(Err(_)) => "dropped",
            Err(_) => "timeout",
        },
    };
    ctx.metrics
        .ack_timeouts
        .get_or_create(&[("cause", cause)])
        .inc();
    let (response, reason) = match ctx.on_timeout {
        OnTimeout::Deny => (Response::FAN_DENY, cause),
        OnTimeout::Allow => (Response::FAN_ALLOW, cause),
    };
    tracing::warn!(
        pid,
        path = %path,
        cause,
        waited_ms = observed_mono.elapsed().as_millis() as u64,
        on_timeout = ?ctx.on_timeout,
        "no timely PDP ack for a sensitive open; applying --on-timeout (event stays queued)"
    );
    guard.respond(response, reason);
}

/// Validate a path for marking: it must exist (a clear error beats EINVAL).
pub fn check_markable(p: &Path) -> Result<(), FanError> {
    std::fs::metadata(p)
        .map(|_| ())
        .map_err(|source| FanError::Open {
            path: p.to_path_buf(),
            source,
        })
}
