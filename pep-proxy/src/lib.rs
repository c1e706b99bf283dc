//! # secureops-proxy — the egress PEP (Policy Enforcement Point)
//!
//! Every outbound TCP connection of the workload is funnelled into this
//! proxy (explicitly via `HTTPS_PROXY`, or transparently via an
//! iptables/nftables `REDIRECT`). The proxy identifies the destination
//! **without MITM** ([`PeekedHost`]: CONNECT authority, TLS ClientHello SNI,
//! HTTP `Host` / absolute URI, or only the original destination IP), asks
//! the [`PolicyDecisionPoint`], and either dials *the IP it checked* or
//! refuses without contacting the upstream: `403` with a machine-readable
//! reason in explicit mode, a TCP RST in transparent mode.
//!
//! **Fail closed is the contract.** Any error, PDP timeout, unreachable
//! PDP, malformed handshake, unparsable request, unresolvable name or
//! unwritable audit spool resolves to a deny (see [`EgressProxy::on_error`]).
//! [`FailMode::Open`] only exists as an explicit, audited operator choice and
//! only ever relaxes *PDP/resolver infrastructure* failures, never input
//! validation or audit failures.
//!
//! Exactly one audit record ([`egress_finding`]) is written per connection
//! attempt and per plain-HTTP request, before any byte goes upstream.

pub mod audit;
mod http;
pub mod metrics;
pub mod parse;
pub mod peek;
pub mod resolve;
pub mod tunnel;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BufMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use secureops_pep::rebinding_violation;
pub use secureops_pep::{
    AllowlistPdp, AuditFinding, ConnectionRequest, Decision, FailMode, HostSource, PdpOutcome,
    PolicyDecisionPoint, ProcessIdentity, Transport,
};

use crate::audit::AuditSink;
use crate::metrics::ProxyMetrics;
use crate::parse::{Authority, HeadParse, RequestHead, parse_authority, parse_request_head};
use crate::peek::{Peeked, classify};
use crate::resolve::{ResolveError, Resolver};

/// The platform's enforcement tier, so operators don't over-trust a weaker
/// setup. The proxy itself is the same everywhere; what differs is whether
/// the workload *can* bypass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnforcementTier {
    /// Explicit proxy only (`HTTPS_PROXY`): a process that ignores the
    /// variable bypasses the proxy. Observe-and-deny for cooperating clients.
    ProxyOnly,
    /// A transparent `REDIRECT` funnel feeds the proxy: every TCP connection
    /// of the namespace is seen, whatever the client does.
    TransparentRedirect,
    /// Transparent funnel plus kernel drop of everything not redirected
    /// (declared by the operator, who installed the rules).
    KernelBacked,
}

impl EnforcementTier {
    pub fn as_str(self) -> &'static str {
        match self {
            EnforcementTier::ProxyOnly => "proxy_only",
            EnforcementTier::TransparentRedirect => "transparent_redirect",
            EnforcementTier::KernelBacked => "kernel_backed",
        }
    }
}

impl fmt::Display for EnforcementTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EnforcementTier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace('-', "_").as_str() {
            "proxy_only" => Ok(EnforcementTier::ProxyOnly),
            "transparent_redirect" => Ok(EnforcementTier::TransparentRedirect),
            "kernel_backed" => Ok(EnforcementTier::KernelBacked),
            other => Err(format!("unknown enforcement tier {other:?}")),
        }
    }
}

/// What the proxy peeked off the wire to identify the destination, without
/// MITM: the name (or IP literal) as seen, where it came from, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedHost {
    /// Host as seen (lowercased); an IP literal's spelling or the original
    /// destination IP when nothing better was seen.
    pub host: String,
    pub port: u16,
    pub source: HostSource,
    /// The IP literal / original destination, when the host is an IP.
    pub ip: Option<IpAddr>,
}

impl PeekedHost {
    fn from_authority(a: &Authority, source: HostSource) -> Self {
        PeekedHost {
            host: a.host.clone(),
            port: a.port,
            source,
            ip: a.ip_literal,
        }
    }
}

/// Build the [`AuditFinding`] recorded for a single egress decision.
pub fn egress_finding(
    pep_id: &str,
    req: &ConnectionRequest,
    outcome: &PdpOutcome,
    dialled_ip: Option<IpAddr>,
    fail_mode: FailMode,
    detail: &str,
) -> AuditFinding {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut detail = detail.to_string();
    if detail.len() > 512 {
        let mut cut = 512;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    AuditFinding {
        timestamp_unix_nanos: nanos,
        pep_kind: "proxy".into(),
        pep_id: pep_id.to_string(),
        workload_id: req.workload_id.clone(),
        pid: req.process.pid,
        process_start_time: req.process.start_time,
        exe: req.process.exe.clone(),
        uid: req.process.uid,
        host: req.host.clone(),
        host_source: req.host_source as i32,
        port: u32::from(req.port),
        dialled_ip: dialled_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        transport: req.transport as i32,
        decision: outcome.decision.to_proto() as i32,
        reason: outcome.reason.clone(),
        rule_id: outcome.rule_id.clone(),
        policy_version: outcome.policy_version,
        fail_closed_cause: outcome.fail_closed_cause.clone().unwrap_or_default(),
        escalation_id: outcome.escalation_id.clone(),
        request_id: req.request_id.clone(),
        would_deny: outcome.would_deny,
        fail_mode: fail_mode.as_str().into(),
        trace_id: String::new(),
        detail,
    }
}

/// Tunables of the proxy. Defaults are production defaults.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Stable id of this PEP instance (audit `pep_id`).
    pub pep_id: String,
    pub workload_id: String,
    pub fail_mode: FailMode,
    pub tier: EnforcementTier,
    /// Maximum request-head size (explicit mode).
    pub max_header_bytes: usize,
    /// Time allowed for a complete request head (slowloris bound).
    pub header_timeout: Duration,
    /// Bytes / time the proxy waits for the client's first bytes (ClientHello).
    pub peek_bytes: usize,
    pub peek_timeout: Duration,
    pub connect_timeout: Duration,
    /// `SO_MARK` for upstream sockets, so a transparent `REDIRECT` rule can
    /// exclude the proxy's own traffic.
    pub upstream_mark: Option<u32>,
    /// Bytes a tunnel direction copies before switching to `splice(2)`
    /// (`0` = never splice).
    pub splice_after: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            pep_id: "secureops-proxy".into(),
            workload_id: "default".into(),
            fail_mode: FailMode::Closed,
            tier: EnforcementTier::ProxyOnly,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(5),
            peek_bytes: 16 * 1024,
            peek_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            upstream_mark: None,
            splice_after: tunnel::SPLICE_AFTER,
        }
    }
}

/// Local forward proxy that authorizes every outbound connection.
pub struct EgressProxy {
    cfg: ProxyConfig,
    pdp: Arc<dyn PolicyDecisionPoint>,
    audit: Arc<dyn AuditSink>,
    resolver: Resolver,
    metrics: ProxyMetrics,
    /// Client socket → process (DESIGN §6); `None` ⇒ pid 0 ("unattributed").
    attributor: Option<secureops_pep::Attributor>,
    next_id: AtomicU64,
    id_prefix: String,
}

/// The final word on one attempt, with what is needed to record it.
struct Verdict {
    req: ConnectionRequest,
    outcome: PdpOutcome,
    detail: String,
}

/// Errors that end a connection (already audited where it was an attempt).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EgressProxy {
    pub fn new(
        cfg: ProxyConfig,
        pdp: Arc<dyn PolicyDecisionPoint>,
        audit: Arc<dyn AuditSink>,
        resolver: Resolver,
        metrics: ProxyMetrics,
    ) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        metrics
            .tier
            .get_or_create(&vec![("tier".to_string(), cfg.tier.as_str().to_string())])
            .set(1);
        EgressProxy {
            cfg,
            pdp,
            audit,
            resolver,
            metrics,
            attributor: None,
            next_id: AtomicU64::new(1),
            id_prefix: format!("{start:x}"),
        }
    }

    /// Use `a` (pep-core's `/proc` attribution) to attribute client
    /// sockets to processes.
    pub fn with_attributor(mut self, a: secureops_pep::Attributor) -> Self {
        self.attributor = Some(a);
        self
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// The outcome for an infrastructure failure (`cause`: `pdp_timeout`,
    /// `dns_unavailable`, ...): a deny with reason `fail_closed:<cause>`,
    /// relaxed to an audited allow only under an explicit
    /// [`FailMode::Open`]. Input-validation and audit failures never go
    /// through here: they always deny.
    pub fn on_error(&self, cause: &str) -> PdpOutcome {
        PdpOutcome::fail_closed(cause).apply_fail_mode(self.cfg.fail_mode)
    }

    /// The client socket's local address, which only process attribution
    /// needs (its `/proc/net/tcp` key): without an attributor the
    /// `getsockname` is skipped, one syscall less per connection.
    fn local_for_attribution(&self, stream: &TcpStream) -> std::io::Result<Option<SocketAddr>> {
        match self.attributor {
            Some(_) => stream.local_addr().map(Some),
            None => Ok(None),
        }
    }

    fn request_id(&self) -> String {
        format!(
            "{}-{:x}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn new_request(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        ph: &PeekedHost,
    ) -> ConnectionRequest {
        let process = match (&self.attributor, local) {
            (Some(a), Some(local)) => a.attribute_tcp_async(local, peer).await,
            _ => ProcessIdentity::default(),
        };
        ConnectionRequest {
            request_id: self.request_id(),
            workload_id: self.cfg.workload_id.clone(),
            process,
            host: ph.host.clone(),
            port: ph.port,
            ip: ph.ip,
            resolved_ips: ph.ip.into_iter().collect(),
            host_source: ph.source,
            transport: Transport::Tcp,
        }
    }

    /// A request for an attempt that could not even be parsed: host is
    /// whatever was seen (bounded), source unspecified.
    async fn unparsed_request(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        seen: &str,
        source: HostSource,
    ) -> ConnectionRequest {
        let mut host: String = seen.chars().filter(|c| !c.is_control()).take(256).collect();
        if host.is_empty() {
            host = "-".into();
        }
        let ph = PeekedHost {
            host,
            port: 0,
            source,
            ip: None,
        };
        self.new_request(peer, local, &ph).await
    }

    /// Resolve (names only), fill `resolved_ips`/`ip`, ask the PDP.
    /// Returns the outcome after the fail mode is applied.
    async fn decide(&self, req: &mut ConnectionRequest, literal: Option<IpAddr>) -> PdpOutcome {
        if literal.is_none() && req.host_source != HostSource::OriginalDst {
            return self.decide_name(req, None).await.0;
        }
        self.ask_pdp(req).await
    }

    /// Decide a destination given by name: the name first, then its
    /// addresses. A name the policy refuses is never resolved, because the
    /// lookup itself would carry the name (and whatever an injected prompt
    /// encoded into it) to whoever serves that zone, and the audit record
    /// keeps the policy's reason instead of a resolver error. An allowed
    /// name is resolved once; in transparent mode (`orig` = the original
    /// destination) the answer must contain the address the client dialled
    /// (`host_ip_mismatch` otherwise, with the returned detail), in explicit
    /// mode the first IPv4 answer is dialled. The answer is then confirmed
    /// by [`EgressProxy::confirm_answer`].
    async fn decide_name(
        &self,
        req: &mut ConnectionRequest,
        orig: Option<IpAddr>,
    ) -> (PdpOutcome, Option<String>) {
        debug_assert!(req.resolved_ips.is_empty());
        let pre = self.ask_pdp(req).await;
        if !pre.decision.is_allow() {
            self.metrics.dns_lookups_avoided.inc();
            return (pre, None);
        }
        let ips = match self.resolver.resolve(&req.host).await {
            Ok(ips) => ips,
            Err(ResolveError::NoAddress(_)) => {
                return (PdpOutcome::new(Decision::Deny, "unresolvable_host"), None);
            }
            Err(
                ResolveError::Lookup { .. } | ResolveError::Timeout(_) | ResolveError::Setup(_),
            ) => {
                return (self.on_error("dns_unavailable"), None);
            }
        };
        match orig {
            Some(o) if !ips.contains(&o) => {
                let detail = format!("{} does not resolve to {o}", req.host);
                req.resolved_ips = ips;
                return (
                    PdpOutcome::new(Decision::Deny, "host_ip_mismatch"),
                    Some(detail),
                );
            }
            Some(_) => {}
            None => req.ip = pick_ip(&ips),
        }
        req.resolved_ips = ips;
        (self.confirm_answer(req, pre).await, None)
    }

    /// The second half of a name's decision, once its answer is known.
    ///
    /// For a name, the only part of a decision that depends on the DNS
    /// answer is the rebinding guard (DESIGN §4: host rules match names
    /// only; an allowed name resolving to a special-purpose address is
    /// denied unless `resolved_ip_allow` covers it). An answer made only of
    /// ordinary addresses therefore cannot change the name's allow, and
    /// asking again would cost a PDP round trip on every connection whose
    /// name rotates its answers (a cache key per answer set). Only an
    /// answer with a special-purpose address, by the classifier the PDP
    /// itself uses, goes back to the PDP with the addresses. The PDP's
    /// side of this contract is checked by its
    /// `ordinary_answers_never_change_a_name_decision` property test.
    async fn confirm_answer(&self, req: &ConnectionRequest, pre: PdpOutcome) -> PdpOutcome {
        // With nothing allowed: could this answer trip the guard at all?
        let special =
            rebinding_violation(req.ip.iter().chain(&req.resolved_ips).copied(), |_| false);
        if special {
            self.ask_pdp(req).await
        } else {
            self.metrics.answer_checks_skipped.inc();
            pre
        }
    }

    async fn ask_pdp(&self, req: &ConnectionRequest) -> PdpOutcome {
        let t0 = Instant::now();
        let outcome = self
            .pdp
            .decide(req)
            .await
            .apply_fail_mode(self.cfg.fail_mode);
        self.metrics
            .decision_seconds
            .observe(t0.elapsed().as_secs_f64());
        outcome
    }

    /// Record the verdict (exactly once per attempt). If the sink refuses,
    /// the verdict becomes a `fail_closed:audit_spool` deny (recorded
    /// nowhere: there is nowhere to record it, but it is counted and logged).
    async fn record(&self, mode: &'static str, v: &mut Verdict, dialled: Option<IpAddr>) {
        let finding = egress_finding(
            &self.cfg.pep_id,
            &v.req,
            &v.outcome,
            dialled,
            self.cfg.fail_mode,
            &v.detail,
        );
        if let Err(e) = self.audit.record(&finding).await {
            tracing::error!(error = %e, request_id = %v.req.request_id, "audit sink refused a record: denying");
            self.metrics.audit_errors.inc();
            v.outcome = PdpOutcome::fail_closed("audit_spool");
        }
        if let Some(cause) = &v.outcome.fail_closed_cause {
            self.metrics.count_fail_closed(cause);
        }
        self.metrics
            .count_decision(mode, v.outcome.decision.as_str());
        tracing::debug!(
            request_id = %v.req.request_id,
            host = %v.req.host,
            port = v.req.port,
            decision = %v.outcome.decision,
            reason = %v.outcome.reason,
            "decision"
        );
    }

    /// Dial the checked IP.
    async fn dial(&self, ip: IpAddr, port: u16) -> std::io::Result<TcpStream> {
        let addr = SocketAddr::new(ip, port);
        let sock = match ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(mark) = self.cfg.upstream_mark {
            socket2::SockRef::from(&sock).set_mark(mark)?;
        }
        sock.set_nodelay(true)?;
        match tokio::time::timeout(self.cfg.connect_timeout, sock.connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Dial, replay the peeked bytes, and hand both sockets to a tunnel
    /// task of their own (so this connection's setup state is freed).
    async fn open_tunnel(
        self: &Arc<Self>,
        mut client: TcpStream,
        ip: IpAddr,
        port: u16,
        first: Vec<u8>,
    ) {
        let mut upstream = match self.dial(ip, port).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%ip, port, error = %e, "upstream connect failed");
                self.metrics.upstream_errors.inc();
                rst(client);
                return;
            }
        };
        if !first.is_empty() && tunnel::write_all(&upstream, &first).await.is_err() {
            return;
        }
        drop(first);
        let metrics = self.metrics.clone();
        let splice_after = self.cfg.splice_after;
        tokio::spawn(async move {
            metrics.tunnels_active.inc();
            let _ = tunnel::tunnel(&mut client, &mut upstream, splice_after).await;
            metrics.tunnels_active.dec();
        });
    }
}

fn pick_ip(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| ips.first())
        .copied()
}

/// Abortive close: `SO_LINGER 0` then drop ⇒ the peer sees a TCP RST.
fn rst(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Only `[a-z0-9_:.-]`: PDP reasons end up in a response header.
fn header_safe(s: &str) -> String {
    let out: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'))
        .take(128)
        .collect();
    if out.is_empty() {
        "unspecified".into()
    } else {
        out
    }
}

/// The `X-SecureOps-Decision` header value.
pub(crate) fn decision_header(outcome: &PdpOutcome) -> String {
    format!(
        "{}; reason={}; retry=no",
        outcome.decision.as_str(),
        header_safe(&outcome.reason)
    )
}

/// JSON body of a refusal: short, machine-readable, tells an agent not to
/// retry through another path.
pub(crate) fn deny_body(outcome: &PdpOutcome, request_id: &str) -> String {
    let mut v = serde_json::json!({
        "decision": outcome.decision.as_str(),
        "reason": outcome.reason,
        "request_id": request_id,
        "retry": false,
        "message": "egress refused by SecureOps policy; do not retry through another path",
    });
    if !outcome.escalation_id.is_empty() {
        v["escalation_id"] = serde_json::Value::String(outcome.escalation_id.clone());
    }
    v.to_string()
}

fn refusal(status: u16, outcome: &PdpOutcome, request_id: &str) -> Vec<u8> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let body = deny_body(outcome, request_id);
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\nX-SecureOps-Decision: {}\r\nX-SecureOps-Request-Id: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        decision_header(outcome),
        header_safe(request_id),
        body.len()
    )
    .into_bytes()
}

/// Write a refusal, then close gracefully: half-close and drain (bounded in
/// bytes and time) what the client is still sending, so the kernel does not
/// answer unread data with an RST that would destroy the response.
async fn send_refusal(stream: TcpStream, response: Vec<u8>) {
    if tunnel::write_all(&stream, &response).await.is_err() {
        return;
    }
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let mut stream = stream;
    let mut sink = [0u8; 1024];
    let mut drained = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while drained < 256 * 1024 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// How reading the first request head ended.
enum HeadRead {
    Head(RequestHead, Vec<u8>),
    /// Closed before sending anything: not an attempt, nothing to audit.
    Silent,
    Fail {
        status: u16,
        reason: &'static str,
        seen: String,
    },
}

async fn read_head(stream: &mut TcpStream, max: usize, timeout: Duration) -> HeadRead {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match parse_request_head(&buf) {
            HeadParse::Complete(h) => return HeadRead::Head(h, buf),
            HeadParse::Invalid(_) => {
                return HeadRead::Fail {
                    status: 400,
                    reason: "malformed_request",
                    seen: printable_prefix(&buf),
                };
            }
            HeadParse::Partial => {}
        }
        if buf.len() >= max {
            return HeadRead::Fail {
                status: 431,
                reason: "header_too_large",
                seen: printable_prefix(&buf),
            };
        }
        let want = (max - buf.len()).min(4096);
        buf.reserve_exact(want);
        let read = tokio::time::timeout_at(
            deadline,
            (&mut *stream).take(want as u64).read_buf(&mut buf),
        )
        .await;
        match read {
            Err(_) if buf.is_empty() => return HeadRead::Silent,
            Err(_) => {
                return HeadRead::Fail {
                    status: 408,
                    reason: "header_timeout",
                    seen: printable_prefix(&buf),
                };
            }
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return HeadRead::Silent,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return HeadRead::Fail {
                    status: 400,
                    reason: "truncated_request",
                    seen: printable_prefix(&buf),
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn printable_prefix(buf: &[u8]) -> String {
    buf.iter()
        .take(64)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

/// How the peek window ended.
enum PeekEnd {
    /// Classified (anything but NeedMore).
    Done(Peeked),
    /// Window over (time) with whatever was classified so far.
    TimedOut(Peeked),
    /// Client closed / errored.
    Closed(Peeked),
    /// Byte bound reached while still NeedMore.
    Full,
}

async fn peek_window(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    window: Duration,
) -> PeekEnd {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match classify(buf) {
            Peeked::NeedMore => {}
            other => return PeekEnd::Done(other),
        }
        if buf.len() >= max {
            return PeekEnd::Full;
        }
        // Wait for bytes *before* reserving buffer space: a silent
        // (server-first) client costs no buffer during the window.
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Err(_) => return PeekEnd::TimedOut(classify(buf)),
            Ok(Err(_)) => return PeekEnd::Closed(classify(buf)),
            Ok(Ok(())) => {}
        }
        let want = (max - buf.len()).min(4096);
        buf.reserve_exact(want);
        let mut limited = (&mut *buf).limit(want);
        // `read_buf` (not `try_read_buf`): after a short read tokio marks
        // the socket drained, so the tunnel's first read waits for epoll
        // instead of spending a `recv` on EAGAIN. The socket is readable,
        // so this normally completes at once (and arms no timer).
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut limited)).await {
            Err(_) => return PeekEnd::TimedOut(classify(buf)),
            Ok(Ok(0)) | Ok(Err(_)) => return PeekEnd::Closed(classify(buf)),
            Ok(Ok(_)) => {}
        }
    }
}

/// Handle one explicit-mode connection: read the first request head; a
/// `CONNECT` is decided, answered `200`, its first client bytes are peeked
/// (SNI must match the authority; ECH only with an allowed outer name) and
/// only then the checked IP is dialled. Absolute-form plain HTTP is served
/// by hyper with a per-request decision. Everything else is refused with
/// one audit record. Deny/Escalate ⇒ `403` (or RST after the `200`), and the
/// upstream is never contacted.
pub async fn handle_connection(
    proxy: Arc<EgressProxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let local = proxy.local_for_attribution(&stream)?;
    let _ = stream.set_nodelay(true);
    let (head, buf) = match read_head(
        &mut stream,
        proxy.cfg.max_header_bytes,
        proxy.cfg.header_timeout,
    )
    .await
    {
        HeadRead::Head(h, b) => (h, b),
        HeadRead::Silent => return Ok(()),
        HeadRead::Fail {
            status,
            reason,
            seen,
        } => {
            let req = proxy
                .unparsed_request(peer, local, &seen, HostSource::Unspecified)
                .await;
            let mut v = Verdict {
                req,
                outcome: PdpOutcome::new(Decision::Deny, reason),
                detail: format!("first bytes: {seen}"),
            };
            proxy.record("explicit", &mut v, None).await;
            send_refusal(stream, refusal(status, &v.outcome, &v.req.request_id)).await;
            return Ok(());
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let leftover = buf[head.head_len..].to_vec();
        drop(buf);
        return handle_connect(proxy, stream, peer, local, head, leftover).await;
    }
    // Refuse a bad first target with its precise reason before hyper (which
    // would only say "parse error") sees it.
    if let Err(e) = parse::parse_absolute_uri(&head.target) {
        let reason = if head.target.starts_with('/') {
            "not_absolute_form"
        } else {
            e.reason()
        };
        let req = proxy
            .unparsed_request(peer, local, &head.target, HostSource::HttpHost)
            .await;
        let mut v = Verdict {
            req,
            outcome: PdpOutcome::new(Decision::Deny, reason),
            detail: e.to_string(),
        };
        proxy.record("explicit", &mut v, None).await;
        let status = if reason == "not_absolute_form" {
            400
        } else {
            403
        };
        send_refusal(stream, refusal(status, &v.outcome, &v.req.request_id)).await;
        return Ok(());
    }
    http::serve_explicit(proxy, stream, peer, local, buf).await
}

async fn handle_connect(
    proxy: Arc<EgressProxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    head: RequestHead,
    mut first: Vec<u8>,
) -> Result<(), ProxyError> {
    let authority = match parse_authority(&head.target, None) {
        Ok(a) => a,
        Err(e) => {
            let req = proxy
                .unparsed_request(peer, local, &head.target, HostSource::Connect)
                .await;
            let mut v = Verdict {
                req,
                outcome: PdpOutcome::new(Decision::Deny, e.reason()),
                detail: e.to_string(),
            };
            proxy.record("explicit", &mut v, None).await;
            let status = if matches!(e, parse::AuthorityError::Userinfo) {
                403
            } else {
                400
            };
            send_refusal(stream, refusal(status, &v.outcome, &v.req.request_id)).await;
            return Ok(());
        }
    };
    let ph = PeekedHost::from_authority(&authority, HostSource::Connect);
    let mut req = proxy.new_request(peer, local, &ph).await;
    let outcome = proxy.decide(&mut req, authority.ip_literal).await;
    if !outcome.decision.is_allow() {
        let mut v = Verdict {
            req,
            outcome,
            detail: String::new(),
        };
        proxy.record("explicit", &mut v, None).await;
        send_refusal(stream, refusal(403, &v.outcome, &v.req.request_id)).await;
        return Ok(());
    }
    let Some(ip) = req.ip else {
        let mut v = Verdict {
            req,
            outcome: PdpOutcome::new(Decision::Deny, "no_address"),
            detail: String::new(),
        };
        proxy.record("explicit", &mut v, None).await;
        send_refusal(stream, refusal(403, &v.outcome, &v.req.request_id)).await;
        return Ok(());
    };
    // The record is written after the peek (it carries the SNI); refuse
    // now, with a proper 403, if the spool is known not to take it.
    if !proxy.audit.accepting() {
        let mut v = Verdict {
            req,
            outcome: PdpOutcome::fail_closed("audit_spool"),
            detail: "audit spool not accepting records".into(),
        };
        proxy.record("explicit", &mut v, None).await;
        send_refusal(stream, refusal(403, &v.outcome, &v.req.request_id)).await;
        return Ok(());
    }
    tunnel::write_all(&stream, b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    // Peek the client's first bytes before any upstream contact.
    let end = peek_window(
        &mut stream,
        &mut first,
        proxy.cfg.peek_bytes,
        proxy.cfg.peek_timeout,
    )
    .await;
    let mut v = Verdict {
        req,
        outcome,
        detail: String::new(),
    };
    let mut client_gone = false;
    let check = match end {
        PeekEnd::Done(p) | PeekEnd::TimedOut(p) => p,
        PeekEnd::Closed(p) => {
            client_gone = true;
            p
        }
        PeekEnd::Full => Peeked::BadTls("ClientHello larger than the peek window"),
    };
    match check {
        Peeked::Tls(info) => match &info.sni {
            Some(sni) => {
                let sni_auth = parse_authority(sni, Some(authority.port));
                let same = sni_auth
                    .as_ref()
                    .is_ok_and(|s| s.same_destination(&authority));
                if !same {
                    v.outcome = PdpOutcome::new(Decision::Deny, "sni_mismatch");
                    v.detail = format!("sni={sni} connect={}", authority.host);
                } else if info.ech {
                    // ECH with an outer name equal to the allowed authority:
                    // the outer name is what the PDP allowed.
                    v.detail = "ech_outer_allowed".into();
                }
            }
            None if info.ech => {
                v.outcome = PdpOutcome::new(Decision::Deny, "ech");
                v.detail = "ECH without an outer SNI".into();
            }
            None => v.detail = "no_sni".into(),
        },
        Peeked::BadTls(why) => {
            v.outcome = PdpOutcome::new(Decision::Deny, "malformed_client_hello");
            v.detail = why.into();
        }
        Peeked::NeedMore if first.first() == Some(&0x16) => {
            v.outcome = PdpOutcome::new(Decision::Deny, "truncated_client_hello");
            v.detail = format!("{} bytes", first.len());
        }
        // Plain HTTP inside the tunnel: its Host must name the CONNECT
        // destination too (same fronting check as SNI).
        Peeked::Http(h) => {
            let ok = h.hosts.iter().all(|one| {
                parse_authority(one, Some(authority.port))
                    .is_ok_and(|a| a.same_destination(&authority))
            });
            if !ok {
                v.outcome = PdpOutcome::new(Decision::Deny, "host_mismatch");
                v.detail = format!("tunnelled Host {:?} vs CONNECT {}", h.hosts, authority.host);
            }
        }
        // Server-first protocol (no bytes) or other client-first bytes
        // inside the tunnel: the CONNECT decision applies.
        _ => {}
    }
    let dial = v.outcome.decision.is_allow() && !client_gone;
    proxy
        .record("explicit", &mut v, if dial { Some(ip) } else { None })
        .await;
    if !v.outcome.decision.is_allow() {
        rst(stream);
        return Ok(());
    }
    if client_gone {
        return Ok(());
    }
    proxy.open_tunnel(stream, ip, authority.port, first).await;
    Ok(())
}

/// Handle one transparently redirected connection: original destination
/// from `SO_ORIGINAL_DST`, first bytes peeked (ClientHello ⇒ SNI, HTTP ⇒
/// Host, else IP only), the name must resolve to the original destination
/// IP, the PDP decides, deny ⇒ RST. TLS is never terminated.
pub async fn handle_transparent(
    proxy: Arc<EgressProxy>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let local = stream.local_addr()?;
    let _ = stream.set_nodelay(true);
    let orig = original_dst(&stream);
    let orig = match orig {
        Some(o) if o != local => o,
        _ => {
            // Connected straight to the transparent port (no redirect): there
            // is no destination to decide, and dialling ourselves would loop.
            let req = proxy
                .unparsed_request(peer, Some(local), "-", HostSource::OriginalDst)
                .await;
            let mut v = Verdict {
                req,
                outcome: PdpOutcome::new(Decision::Deny, "no_original_dst"),
                detail: String::new(),
            };
            proxy.record("transparent", &mut v, None).await;
            rst(stream);
            return Ok(());
        }
    };
    let mut first = Vec::new();
    let end = peek_window(
        &mut stream,
        &mut first,
        proxy.cfg.peek_bytes,
        proxy.cfg.peek_timeout,
    )
    .await;
    let (peeked, client_gone) = match end {
        PeekEnd::Done(p) | PeekEnd::TimedOut(p) => (p, false),
        PeekEnd::Closed(p) => (p, true),
        PeekEnd::Full => (
            Peeked::BadTls("ClientHello larger than the peek window"),
            false,
        ),
    };
    let ip_only = PeekedHost {
        host: orig.ip().to_string(),
        port: orig.port(),
        source: HostSource::OriginalDst,
        ip: Some(orig.ip()),
    };
    let mut detail = String::new();
    // (peeked host, early deny reason)
    let (ph, early): (PeekedHost, Option<&'static str>) = match &peeked {
        Peeked::Tls(info) => match &info.sni {
            Some(sni) => match parse_authority(sni, Some(orig.port())) {
                Ok(a) => (PeekedHost::from_authority(&a, HostSource::Sni), None),
                Err(_) => (ip_only.clone(), Some("malformed_client_hello")),
            },
            None if info.ech => (ip_only.clone(), Some("ech")),
            None => (ip_only.clone(), None),
        },
        Peeked::BadTls(why) => {
            detail = (*why).into();
            (ip_only.clone(), Some("malformed_client_hello"))
        }
        Peeked::NeedMore if first.first() == Some(&0x16) => {
            (ip_only.clone(), Some("truncated_client_hello"))
        }
        Peeked::Http(h) => match h.hosts.as_slice() {
            [one] => match parse_authority(one, Some(orig.port())) {
                Ok(a) if a.port == orig.port() => {
                    (PeekedHost::from_authority(&a, HostSource::HttpHost), None)
                }
                Ok(_) => (ip_only.clone(), Some("host_port_mismatch")),
                Err(e) => (ip_only.clone(), Some(e.reason())),
            },
            [] => (ip_only.clone(), None),
            _ => (ip_only.clone(), Some("host_mismatch")),
        },
        Peeked::BadHttp(why) => {
            detail = (*why).into();
            (ip_only.clone(), Some("malformed_request"))
        }
        _ => (ip_only.clone(), None),
    };
    let literal = ph.ip;
    // Attribution looks the client socket up by (peer → original dst).
    let mut req = proxy.new_request(peer, Some(orig), &ph).await;
    req.ip = Some(orig.ip());
    let outcome = if let Some(reason) = early {
        PdpOutcome::new(Decision::Deny, reason)
    } else if ph.source == HostSource::OriginalDst {
        req.resolved_ips = vec![orig.ip()];
        proxy.ask_pdp(&req).await
    } else if let Some(lit) = literal {
        // IP literal in SNI/Host: it must be the original destination.
        req.resolved_ips = vec![lit];
        if lit != orig.ip() {
            PdpOutcome::new(Decision::Deny, "host_ip_mismatch")
        } else {
            proxy.ask_pdp(&req).await
        }
    } else {
        let (outcome, why) = proxy.decide_name(&mut req, Some(orig.ip())).await;
        if let Some(why) = why {
            detail = why;
        }
        outcome
    };
    // Host-less HTTP requests (HTTP/1.0) fall back to the IP decision; a
    // named HTTP request is served request by request by hyper.
    let mut v = Verdict {
        req,
        outcome,
        detail,
    };
    let dial = v.outcome.decision.is_allow() && !client_gone;
    proxy
        .record(
            "transparent",
            &mut v,
            if dial { Some(orig.ip()) } else { None },
        )
        .await;
    if !v.outcome.decision.is_allow() {
        rst(stream);
        return Ok(());
    }
    if client_gone {
        return Ok(());
    }
    if matches!(peeked, Peeked::Http(_)) && ph.source == HostSource::HttpHost {
        let first_key = http::PreApproved {
            host: ph.host.clone(),
            port: ph.port,
        };
        return http::serve_transparent(proxy, stream, peer, orig, orig, first, first_key).await;
    }
    proxy
        .open_tunnel(stream, orig.ip(), orig.port(), first)
        .await;
    Ok(())
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4().ok()?
    } else {
        sock.original_dst_v6().ok()?
    };
    addr.as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;
    use secureops_pep::classify_ip;

    #[test]
    fn header_values_are_sanitised() {
        let o = PdpOutcome::new(Decision::Deny, "rule:x\r\nSet-Cookie: a");
        assert_eq!(
            decision_header(&o),
            "deny; reason=rule:xSet-Cookie:a; retry=no"
        );
        let o = PdpOutcome::new(Decision::Escalate, "");
        assert_eq!(
            decision_header(&o),
            "escalate; reason=unspecified; retry=no"
        );
    }

    #[test]
    fn finding_carries_the_decision() {
        let req = ConnectionRequest {
            request_id: "r1".into(),
            workload_id: "w".into(),
            process: ProcessIdentity::default(),
            host: "a.test".into(),
            port: 443,
            ip: None,
            resolved_ips: vec![],
            host_source: HostSource::Connect,
            transport: Transport::Tcp,
        };
        let f = egress_finding(
            "p",
            &req,
            &PdpOutcome::fail_closed("pdp_timeout"),
            None,
            FailMode::Closed,
            &"x".repeat(2000),
        );
        assert_eq!(f.reason, "fail_closed:pdp_timeout");
        assert_eq!(f.fail_closed_cause, "pdp_timeout");
        assert_eq!(f.decision, secureops_proto::v1::Verdict::Deny as i32);
        assert_eq!(f.detail.len(), 512);
        assert_eq!(f.pep_kind, "proxy");
    }

    /// A PDP that allows `*.allowed.test`, denies names answered with a
    /// special-purpose address as the real PDP's rebinding guard does, and
    /// keeps every request it was asked.
    #[derive(Default)]
    struct RecordingPdp(std::sync::Mutex<Vec<ConnectionRequest>>);

    impl PolicyDecisionPoint for RecordingPdp {
        fn decide<'a>(&'a self, req: &'a ConnectionRequest) -> secureops_pep::PdpFuture<'a> {
            self.0.lock().unwrap().push(req.clone());
            let outcome = if !req.host.ends_with(".allowed.test") {
                PdpOutcome::new(Decision::Deny, "default_deny")
            } else if req.resolved_ips.iter().any(|&ip| classify_ip(ip).is_some()) {
                PdpOutcome::new(Decision::Deny, "dns_rebinding")
            } else {
                PdpOutcome::new(Decision::Allow, "rule:web")
            };
            Box::pin(std::future::ready(outcome))
        }
    }

    fn proxy_with(pdp: Arc<RecordingPdp>, answers: &[(&str, &str)]) -> EgressProxy {
        let overrides: Vec<(String, IpAddr)> = answers
            .iter()
            .map(|(h, ip)| (h.to_string(), ip.parse().unwrap()))
            .collect();
        let resolver = Resolver::new(&overrides, None, false, Duration::from_secs(1)).unwrap();
        proxy_on(pdp, resolver)
    }

    fn proxy_on(pdp: Arc<RecordingPdp>, resolver: Resolver) -> EgressProxy {
        EgressProxy::new(
            ProxyConfig::default(),
            pdp,
            Arc::new(audit::TracingAuditLog::new()),
            resolver,
            ProxyMetrics::new(),
        )
    }

    fn named(host: &str) -> ConnectionRequest {
        ConnectionRequest {
            request_id: "r".into(),
            workload_id: "w".into(),
            process: ProcessIdentity::default(),
            host: host.into(),
            port: 443,
            ip: None,
            resolved_ips: vec![],
            host_source: HostSource::Connect,
            transport: Transport::Tcp,
        }
    }

    /// An allowed name is asked about once when its answer is all ordinary
    /// addresses, and a second time, with the addresses, as soon as one of
    /// them is special-purpose (in any spelling the classifier knows); a
    /// refused name is asked about once and never resolved.
    #[tokio::test]
    async fn a_name_goes_back_to_the_pdp_only_with_a_special_answer() {
        let pdp = Arc::new(RecordingPdp::default());
        let proxy = proxy_with(
            pdp.clone(),
            &[
                ("public.allowed.test", "93.184.216.34"),
                ("public.allowed.test", "2606:2800:220:1::1"),
                ("mixed.allowed.test", "93.184.216.34"),
                ("mixed.allowed.test", "10.1.2.3"),
                ("meta.allowed.test", "::ffff:169.254.169.254"),
                ("loop.allowed.test", "127.0.0.1"),
                ("evil.test", "93.184.216.35"),
            ],
        );
        let cases = [
            ("public.allowed.test", true, "rule:web", 1),
            ("mixed.allowed.test", false, "dns_rebinding", 2),
            ("meta.allowed.test", false, "dns_rebinding", 2),
            ("loop.allowed.test", false, "dns_rebinding", 2),
            ("evil.test", false, "default_deny", 1),
        ];
        for (host, allow, reason, asked) in cases {
            pdp.0.lock().unwrap().clear();
            let mut req = named(host);
            let out = proxy.decide(&mut req, None).await;
            assert_eq!(out.decision.is_allow(), allow, "{host}: {out:?}");
            assert_eq!(out.reason, reason, "{host}");
            let seen = pdp.0.lock().unwrap().clone();
            assert_eq!(seen.len(), asked, "{host}: {seen:#?}");
            assert!(seen[0].resolved_ips.is_empty(), "{host}: name asked first");
            if asked == 2 {
                assert_eq!(seen[1].resolved_ips, req.resolved_ips, "{host}");
                assert!(!seen[1].resolved_ips.is_empty());
            }
            if host == "evil.test" {
                assert!(req.resolved_ips.is_empty(), "a refused name was resolved");
            } else {
                // The audit record still carries the whole answer.
                assert!(!req.resolved_ips.is_empty(), "{host}");
            }
        }
        assert_eq!(proxy.metrics.answer_checks_skipped.get(), 1);
        assert_eq!(proxy.metrics.dns_lookups_avoided.get(), 1);
    }

    /// An allowed name that does not resolve, or whose DNS server is silent,
    /// is denied after one check, in both modes; nothing is dialled.
    #[tokio::test]
    async fn resolver_failures_deny() {
        let pdp = Arc::new(RecordingPdp::default());
        let proxy = proxy_with(pdp.clone(), &[]);
        let mut req = named("gone.allowed.test");
        let out = proxy.decide(&mut req, None).await;
        assert!(!out.decision.is_allow());
        assert_eq!(out.reason, "unresolvable_host");
        assert_eq!(req.ip, None);

        // A DNS server that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = Resolver::new(
            &[],
            Some(silent.local_addr().unwrap()),
            true,
            Duration::from_millis(200),
        )
        .unwrap();
        let proxy = proxy_on(pdp.clone(), resolver);
        for orig in [None, Some("93.184.216.34".parse().unwrap())] {
            pdp.0.lock().unwrap().clear();
            let mut req = named("slow.allowed.test");
            req.ip = orig;
            let (out, _) = proxy.decide_name(&mut req, orig).await;
            assert!(!out.decision.is_allow(), "{orig:?}: {out:?}");
            assert_eq!(out.reason, "fail_closed:dns_unavailable", "{orig:?}");
            assert!(req.resolved_ips.is_empty());
            assert_eq!(
                pdp.0.lock().unwrap().len(),
                1,
                "no confirmation without an answer"
            );
        }
    }

    /// The reason names whose fault it was: a name the DNS says does not
    /// exist is `unresolvable_host`; a DNS server that fails (SERVFAIL,
    /// REFUSED) is the fail-closed `dns_unavailable`. Both deny.
    #[tokio::test]
    async fn dns_failures_are_told_apart_from_missing_names() {
        // The shared fake upstream answers by the name's first label.
        let server = secureops_test_support::dns::FakeDns::start();
        let resolver = Resolver::new(&[], Some(server.addr), true, Duration::from_secs(2)).unwrap();
        let proxy = proxy_on(Arc::new(RecordingPdp::default()), resolver);
        for (host, reason) in [
            ("nx.allowed.test", "unresolvable_host"),
            ("nodata.allowed.test", "unresolvable_host"),
            ("servfail.allowed.test", "fail_closed:dns_unavailable"),
            ("refused.allowed.test", "fail_closed:dns_unavailable"),
        ] {
            let mut req = named(host);
            let out = proxy.decide(&mut req, None).await;
            assert!(!out.decision.is_allow(), "{host}: {out:?}");
            assert_eq!(out.reason, reason, "{host}");
            assert_eq!(req.ip, None, "{host}");
        }
    }

    /// Transparent mode: the answer must contain the original destination
    /// before anything else, and a special original destination is itself
    /// part of the answer check.
    #[tokio::test]
    async fn transparent_names_check_the_original_destination() {
        let pdp = Arc::new(RecordingPdp::default());
        let proxy = proxy_with(
            pdp.clone(),
            &[
                ("public.allowed.test", "93.184.216.34"),
                ("public.allowed.test", "93.184.216.35"),
            ],
        );
        let mut req = named("public.allowed.test");
        let orig: IpAddr = "93.184.216.35".parse().unwrap();
        req.ip = Some(orig);
        let (out, why) = proxy.decide_name(&mut req, Some(orig)).await;
        assert!(out.decision.is_allow(), "{out:?}");
        assert!(why.is_none());
        assert_eq!(
            req.ip,
            Some(orig),
            "the dialled address is the original one"
        );
        assert_eq!(pdp.0.lock().unwrap().len(), 1);

        let mut req = named("public.allowed.test");
        let orig: IpAddr = "93.184.216.36".parse().unwrap();
        req.ip = Some(orig);
        let (out, why) = proxy.decide_name(&mut req, Some(orig)).await;
        assert_eq!(out.reason, "host_ip_mismatch");
        assert!(why.unwrap().contains("93.184.216.36"));
        assert_eq!(
            pdp.0.lock().unwrap().len(),
            2,
            "no confirmation of a mismatch"
        );
    }
}
