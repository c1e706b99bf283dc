//! The UDP fast path: batched receive (`recvmmsg`), per-batch policy and
//! audit, batched send (`sendmmsg`), answers from pre-encoded wire bytes.
//!
//! Per receive batch:
//! 1. every datagram is parsed by [`wire::parse_query`]; anything that is
//!    not a plain query (and every query whose name needs the full
//!    normaliser, or whose client socket is not yet attributed) goes to the
//!    hickory path ([`crate::server::spawn_slow`]), unchanged;
//! 2. each plain query is decided by the configured PDP (same
//!    [`DnsSinkhole::decide`]: deadline, fail mode, exfiltration budget).
//!    A decision that is not ready at once (a gRPC round trip) continues in
//!    its own task ([`DnsSinkhole::finish_pending`]);
//! 3. all audit records of the batch are written with one
//!    [`AuditSink::record_batch`] call — before any answer of the batch
//!    leaves (allowed answers wait for it; sinkholed answers only need it
//!    queued with `--audit-async-deny`). A failed write sinkholes every
//!    query of the batch (`fail_closed:audit_spool`). The records are
//!    recycled: written ones go back to a per-thread pool ([`recycle`])
//!    and the next queries' records are filled in place from it, every
//!    field overwritten, so a query allocates no audit strings;
//! 4. answers are built from wire bytes (sinkhole answers directly, allowed
//!    names from the wire form of the cached upstream answer with TTLs
//!    patched) and sent with one `sendmmsg`. An allowed name without a
//!    usable cached answer (cache miss, answer too big for the client)
//!    is served by the hickory code in its own task
//!    ([`DnsSinkhole::serve_allowed`]) — its decision and audit record are
//!    already done, so it is still exactly one record per query.
//!
//! [`AuditSink::record_batch`]: crate::audit::AuditSink::record_batch

use std::cell::RefCell;
use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::rr::{DNSClass, RecordType};
use hickory_server::server::Request;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use secureops_pep::{AuditFinding, ConnectionRequest, Decision, ProcessIdentity, Transport};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::audit::AuditError;
use crate::cache::write_cache_key;
use crate::server::{UdpResponder, spawn_slow};
use crate::sinkhole::{DnsSinkhole, Verdict, now_nanos};
use crate::wire::{self, ParseError, Query};

/// Datagrams per `recvmmsg` / `sendmmsg`.
pub const BATCH: usize = 32;
/// Receive buffer per datagram: the largest UDP payload.
const DGRAM: usize = 65536;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Poll `fut` once with a no-op waker.
fn poll_once<T>(fut: &mut BoxFuture<T>) -> Poll<T> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    fut.as_mut().poll(&mut cx)
}

/// Per-thread buffers reused across batches: at fast-path rates a few
/// kilobyte-sized allocations per batch cost more than the work they hold
/// (glibc consolidates its fast bins on every large request). Only used in
/// synchronous sections, never across an await.
#[derive(Default)]
struct Scratch {
    decided: Vec<Decided>,
    out: Vec<u8>,
    spans: Vec<(usize, usize, SocketAddr)>,
    key: Vec<u8>,
    addrs: Vec<Option<SockaddrStorage>>,
    send_headers: Option<MultiHeaders<SockaddrStorage>>,
    recv_headers: Option<MultiHeaders<SockaddrStorage>>,
    /// Audit records already written to the spool, kept so the next
    /// queries' records reuse their string buffers (see [`recycle`]).
    spent: Vec<AuditFinding>,
    /// The emptied container of the last written batch.
    findings: Vec<AuditFinding>,
}

/// Spent records kept per thread: a few batches' worth.
const SPENT_MAX: usize = 4 * BATCH;

/// Give written records back to this thread's pool. Called by the spool
/// sink right after the batch's `write(2)`; every field of a recycled
/// record is overwritten before it is used again
/// ([`DnsSinkhole::fill_finding`]).
pub(crate) fn recycle(mut written: Vec<AuditFinding>) {
    SCRATCH.with(|cell| {
        let Ok(mut s) = cell.try_borrow_mut() else {
            return; // (never borrowed here; dropping is always correct)
        };
        let room = SPENT_MAX.saturating_sub(s.spent.len());
        s.spent.extend(written.drain(..).take(room));
        written.clear();
        if written.capacity() > s.findings.capacity() {
            s.findings = written;
        }
    });
}

fn spent_finding() -> AuditFinding {
    SCRATCH
        .with(|cell| cell.try_borrow_mut().ok().and_then(|mut s| s.spent.pop()))
        .unwrap_or_default()
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A decided query waiting for its batch's audit write.
pub(crate) struct Decided {
    q: Query,
    src: SocketAddr,
    host: String,
    allow: bool,
    cause: &'static str,
}

/// What the policy step made of one datagram (moved once, never stored:
/// boxing the large variant would cost an allocation per query).
#[allow(clippy::large_enum_variant)]
enum Step {
    Slow,
    Pending,
    /// Decided; its audit record is in the slot the step was given.
    Decided(Decided),
}

impl DnsSinkhole {
    /// Policy step of one plain query (see the module documentation). A
    /// decided query's audit record is written into `slot` (a recycled
    /// record in the batch's vector: filled in place, never moved).
    fn fast_decide(
        self: &Arc<Self>,
        socket: &Arc<UdpSocket>,
        q: Query,
        src: SocketAddr,
        ts: i64,
        slot: &mut AuditFinding,
    ) -> Step {
        let mut host = std::mem::take(&mut slot.host);
        host.clear();
        if !q.normalized_name(&mut host) {
            return Step::Slow;
        }
        let mut exe = None;
        let process = match &self.attributor {
            Some(a) => match a.cached(src, false) {
                Some(p) if self.cfg.pdp_uses_process => ProcessIdentity::clone(&p),
                Some(p) => {
                    let slim = ProcessIdentity {
                        pid: p.pid,
                        start_time: p.start_time,
                        uid: p.uid,
                        ..ProcessIdentity::default()
                    };
                    exe = Some(p);
                    slim
                }
                None => return Step::Slow, // the hickory path scans /proc
            },
            None => ProcessIdentity::default(),
        };
        let req = self.dns_request_in(
            host,
            std::mem::take(&mut slot.request_id),
            std::mem::take(&mut slot.workload_id),
            process,
            Transport::Udp,
        );
        if !self.cfg.pdp_uses_process {
            // The standalone AllowlistPdp answers at once: decide on the
            // stack, no boxed future.
            let ready = {
                let waker = futures::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                // (Ready at once, so no deadline timer is needed.)
                let mut fut = self.pdp.decide(&req);
                fut.as_mut().poll(&mut cx)
            };
            if let Poll::Ready(outcome) = ready {
                let v = self.verdict(&req, outcome);
                let d = self.decided(slot, q, src, req, v, ts);
                if let Some(p) = exe {
                    slot.exe.clone_from(&p.exe);
                }
                return Step::Decided(d);
            }
            // Not ready after all (a PDP wrapper that waits): decide again
            // in a task of its own, below.
        }
        let this = self.clone();
        let mut fut: BoxFuture<(ConnectionRequest, Verdict)> = Box::pin(async move {
            let v = this.decide(&req).await;
            (req, v)
        });
        match poll_once(&mut fut) {
            Poll::Ready((req, v)) => {
                let d = self.decided(slot, q, src, req, v, ts);
                if let Some(p) = exe {
                    slot.exe.clone_from(&p.exe);
                }
                Step::Decided(d)
            }
            Poll::Pending => {
                let this = self.clone();
                let socket = socket.clone();
                tokio::spawn(async move {
                    let (req, v) = fut.await;
                    this.finish_pending(socket, q, src, req, v, exe).await;
                });
                Step::Pending
            }
        }
    }

    /// The decided query; its audit record is written into `f` (a
    /// recycled or new record; every field is overwritten).
    fn decided(
        &self,
        f: &mut AuditFinding,
        q: Query,
        src: SocketAddr,
        req: ConnectionRequest,
        v: Verdict,
        ts: i64,
    ) -> Decided {
        let allow = v.outcome.decision.is_allow();
        let cause = v.cause;
        // The name is only needed again to serve an allowed answer.
        let host = if allow {
            req.host.clone()
        } else {
            String::new()
        };
        if !allow {
            self.count(v.outcome.decision, cause, Protocol::Udp);
        }
        self.fill_finding(f, req, v, ts);
        Decided {
            q,
            src,
            host,
            allow,
            cause,
        }
    }

    /// A query whose decision was not ready at once: audit and answer it
    /// on its own.
    async fn finish_pending(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        q: Query,
        src: SocketAddr,
        req: ConnectionRequest,
        v: Verdict,
        exe: Option<Arc<ProcessIdentity>>,
    ) {
        let mut f = AuditFinding::default();
        let d = self.decided(&mut f, q, src, req, v, now_nanos());
        if let Some(p) = exe {
            f.exe.clone_from(&p.exe);
        }
        let async_ok = !d.allow && self.cfg.audit_async_deny;
        let mut fut: BoxFuture<Result<(), AuditError>> = {
            let this = self.clone();
            Box::pin(async move { this.audit.record_batch(vec![f]).await })
        };
        let res = match poll_once(&mut fut) {
            Poll::Ready(r) => r,
            Poll::Pending if async_ok => {
                self.spawn_audit_wait(fut, 1);
                Ok(())
            }
            Poll::Pending => fut.await,
        };
        self.respond(&socket, vec![d], res.is_ok());
    }

    /// Wait for a queued write of `n` records in the background, counting
    /// failures.
    fn spawn_audit_wait(&self, fut: BoxFuture<Result<(), AuditError>>, n: usize) {
        let failures = self.metrics.audit_failures.clone();
        tokio::spawn(async move {
            if fut.await.is_err() {
                failures.inc_by(n as u64);
            }
        });
    }

    /// Policy + audit + answers of one receive batch: datagram `i` is
    /// `bufs[i * DGRAM..][..len]` from `src` (`meta[i]`).
    fn handle_batch(
        self: &Arc<Self>,
        socket: &Arc<UdpSocket>,
        bufs: &[u8],
        meta: &[(usize, Option<SocketAddr>)],
    ) {
        let mut decided = SCRATCH.with(|s| std::mem::take(&mut s.borrow_mut().decided));
        let mut findings = SCRATCH.with(|s| std::mem::take(&mut s.borrow_mut().findings));
        findings.clear();
        findings.reserve(meta.len());
        // One receive time for the batch (it arrived with one recvmmsg).
        let ts = now_nanos();
        for (i, &(n, src)) in meta.iter().enumerate() {
            // A source we cannot answer: drop.
            let Some(src) = src.filter(|s| s.port() != 0) else {
                continue;
            };
            let Some(raw) = bufs.get(i * DGRAM..i * DGRAM + n.min(DGRAM)) else {
                continue;
            };
            let q = match wire::parse_query(raw) {
                Ok(q) => q,
                Err(ParseError::Drop) => continue,
                Err(ParseError::Slow) => {
                    spawn_slow(self.clone(), socket.clone(), raw.to_vec(), src);
                    continue;
                }
            };
            // The next record slot: a recycled record at the end of the
            // batch's vector, kept there once the query is decided (so
            // `findings[k]` stays the record of `decided[k]`).
            if findings.len() == decided.len() {
                findings.push(spent_finding());
            }
            let Some(slot) = findings.last_mut() else {
                continue;
            };
            match self.fast_decide(socket, q, src, ts, slot) {
                Step::Decided(d) => decided.push(d),
                Step::Pending => {}
                Step::Slow => spawn_slow(self.clone(), socket.clone(), raw.to_vec(), src),
            }
        }
        // An unused last slot is not a record.
        findings.truncate(decided.len());
        self.audit_and_respond(socket, &mut decided, findings);
        decided.clear();
        SCRATCH.with(|s| s.borrow_mut().decided = decided);
    }

    fn audit_and_respond(
        self: &Arc<Self>,
        socket: &Arc<UdpSocket>,
        decided: &mut Vec<Decided>,
        findings: Vec<AuditFinding>,
    ) {
        if decided.is_empty() {
            return;
        }
        let any_allow = decided.iter().any(|d| d.allow);
        let mut fut: BoxFuture<Result<(), AuditError>> = {
            let this = self.clone();
            Box::pin(async move { this.audit.record_batch(findings).await })
        };
        match poll_once(&mut fut) {
            Poll::Ready(res) => self.respond(socket, decided.drain(..), res.is_ok()),
            Poll::Pending if !any_allow && self.cfg.audit_async_deny => {
                // Written (the spool syncs in order): answer now.
                self.spawn_audit_wait(fut, decided.len());
                self.respond(socket, decided.drain(..), true);
            }
            Poll::Pending => {
                // Sinkholed answers may leave once written (with
                // --audit-async-deny); allowed answers wait for the sync.
                let later: Vec<Decided> = if self.cfg.audit_async_deny {
                    let (later, now): (Vec<Decided>, Vec<Decided>) =
                        decided.drain(..).partition(|d| d.allow);
                    let answered = now.len() as u64;
                    self.respond(socket, now, true);
                    let failures = self.metrics.audit_failures.clone();
                    let this = self.clone();
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        let res = fut.await;
                        if res.is_err() {
                            // The sinkholed answers already sent count too.
                            failures.inc_by(answered);
                        }
                        this.respond(&socket, later, res.is_ok());
                    });
                    return;
                } else {
                    std::mem::take(decided)
                };
                let this = self.clone();
                let socket = socket.clone();
                tokio::spawn(async move {
                    let res = fut.await;
                    this.respond(&socket, later, res.is_ok());
                });
            }
        }
    }

    /// Build and send the answers of `items` (`audit_ok`: their records
    /// were written). Allowed names without a usable cached answer are
    /// served by the hickory code in their own task.
    fn respond(
        self: &Arc<Self>,
        socket: &Arc<UdpSocket>,
        items: impl IntoIterator<Item = Decided>,
        audit_ok: bool,
    ) {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let Scratch {
                out,
                spans,
                key,
                addrs,
                send_headers,
                ..
            } = &mut *s;
            out.clear();
            spans.clear();
            self.build_answers(socket, items, audit_ok, out, spans, key);
            send_batch(socket, out, spans, addrs, send_headers);
        });
    }

    fn build_answers(
        self: &Arc<Self>,
        socket: &Arc<UdpSocket>,
        items: impl IntoIterator<Item = Decided>,
        audit_ok: bool,
        out: &mut Vec<u8>,
        spans: &mut Vec<(usize, usize, SocketAddr)>,
        key: &mut Vec<u8>,
    ) {
        let now = Instant::now();
        for d in items {
            let start = out.len();
            if !d.allow {
                if !audit_ok {
                    self.metrics.audit_failures.inc();
                }
                self.sinkhole_into(out, &d.q);
                spans.push((start, out.len(), d.src));
                continue;
            }
            if !audit_ok {
                tracing::warn!(host = %d.host, "audit spool failed: sinkholing");
                self.metrics.audit_failures.inc();
                self.count(Decision::Deny, "fail_closed", Protocol::Udp);
                self.sinkhole_into(out, &d.q);
                spans.push((start, out.len(), d.src));
                continue;
            }
            self.count(Decision::Allow, d.cause, Protocol::Udp);
            write_cache_key(key, &d.host, d.q.qtype, d.q.qclass, d.q.dnssec_ok());
            let served = match self.cache.get(key, now) {
                Some(hit) => match &hit.wire {
                    Some(sections) => {
                        let ok = wire::cached_response(
                            out,
                            &d.q,
                            hit.response_code.low(),
                            hit.authentic_data && d.q.ad,
                            sections,
                            hit.age_secs(now),
                            self.cfg.edns_payload,
                        );
                        if ok {
                            self.metrics.cache_hits.inc();
                        }
                        ok
                    }
                    None => false,
                },
                None => false,
            };
            if served {
                spans.push((start, out.len(), d.src));
            } else {
                self.spawn_allowed(socket, d);
            }
        }
    }

    fn sinkhole_into(&self, out: &mut Vec<u8>, q: &Query) {
        wire::sinkhole_response(
            out,
            q,
            self.cfg.sinkhole_answer,
            self.cfg.sinkhole_ttl,
            self.cfg.edns_payload,
        );
    }

    /// Serve an allowed, audited query with the hickory code (cache miss →
    /// upstream, or an answer that needs truncation).
    fn spawn_allowed(self: &Arc<Self>, socket: &Arc<UdpSocket>, d: Decided) {
        let this = self.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            let Ok(req) = Request::from_bytes(d.q.to_wire(), d.src, Protocol::Udp) else {
                return; // cannot happen: to_wire() is a plain query
            };
            let limit = crate::server::udp_limit(&req);
            let responder = UdpResponder {
                socket,
                dst: d.src,
                limit,
            };
            this.serve_allowed(
                &req,
                responder,
                &d.host,
                RecordType::from(d.q.qtype),
                DNSClass::from(d.q.qclass),
            )
            .await;
        });
    }
}

/// Send `spans` of `out` with `sendmmsg`; whatever the kernel does not
/// take at once (full socket buffer) is sent by a task that waits.
fn send_batch(
    socket: &Arc<UdpSocket>,
    out: &[u8],
    spans: &[(usize, usize, SocketAddr)],
    addrs: &mut Vec<Option<SockaddrStorage>>,
    headers: &mut Option<MultiHeaders<SockaddrStorage>>,
) {
    let headers = headers.get_or_insert_with(|| MultiHeaders::preallocate(BATCH, None));
    let mut done = 0;
    while done < spans.len() {
        let chunk = &spans[done..spans.len().min(done + BATCH)];
        let slices: Vec<[IoSlice<'_>; 1]> = chunk
            .iter()
            .map(|&(s, e, _)| [IoSlice::new(&out[s..e])])
            .collect();
        addrs.clear();
        addrs.extend(
            chunk
                .iter()
                .map(|&(_, _, dst)| Some(SockaddrStorage::from(dst))),
        );
        let sent = match sendmmsg(
            socket.as_raw_fd(),
            headers,
            &slices,
            &addrs[..],
            [],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(r) => r.count(),
            Err(e) => {
                tracing::debug!(error = %e, "sendmmsg");
                0
            }
        };
        if sent == 0 {
            break;
        }
        done += sent;
    }
    if done < spans.len() {
        let rest: Vec<(Vec<u8>, SocketAddr)> = spans[done..]
            .iter()
            .map(|&(s, e, dst)| (out[s..e].to_vec(), dst))
            .collect();
        let socket = socket.clone();
        tokio::spawn(async move {
            for (bytes, dst) in rest {
                if let Err(e) = socket.send_to(&bytes, dst).await {
                    tracing::debug!(error = %e, %dst, "udp send");
                }
            }
        });
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Serve UDP on `socket`: `recvmmsg` batches through the fast path.
pub async fn serve_udp_fast(sinkhole: Arc<DnsSinkhole>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut bufs = vec![0u8; BATCH * DGRAM];
    let mut meta: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    loop {
        if let Err(e) = socket.readable().await {
            tracing::debug!(error = %e, "udp readable");
            continue;
        }
        meta.clear();
        let res = socket.try_io(Interest::READABLE, || {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                // Not `Send` (raw pointers): kept per thread, never held
                // across an await.
                let headers = s
                    .recv_headers
                    .get_or_insert_with(|| MultiHeaders::preallocate(BATCH, None));
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                    .chunks_exact_mut(DGRAM)
                    .map(|c| [IoSliceMut::new(c)])
                    .collect();
                let results = recvmmsg(
                    socket.as_raw_fd(),
                    headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(std::io::Error::from)?;
                for r in results {
                    meta.push((r.bytes, r.address.as_ref().and_then(to_std)));
                }
                Ok(())
            })
        });
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Readiness stays set on an error: let other tasks run
                // before trying again.
                tracing::debug!(error = %e, "udp recvmmsg");
                tokio::task::yield_now().await;
                continue;
            }
        }
        sinkhole.handle_batch(&socket, &bufs, &meta);
    }
}
