//! A lean forwarder for allowed queries.
//!
//! Why not hickory-resolver's forwarder: it is a full stub resolver (its own
//! cache, connection pool with per-request stream setup, retries across name
//! servers with backoff) and is reported to lose queries under `dnsperf`
//! load. What a sinkhole needs is narrower: send one question to the
//! configured upstream, match the answer by (id, question), time out,
//! retry on the next upstream, and fall back to TCP when the UDP answer is
//! truncated. That fits in one file and has no shared per-request state but a
//! pending-id table, so it does not lose queries under load.
//!
//! Every upstream gets a small pool of connected UDP sockets (the kernel
//! drops datagrams from any other source), each with a receive task that
//! dispatches answers to waiting queries by message id; an answer whose
//! question does not match the one asked is ignored (spoofing / stale
//! answers). Ids are random per query.
//!
//! Upstreams can also be DNS over TLS or DNS over HTTPS ([`UpstreamSpec`]);
//! those live in [`crate::tls`] (one persistent, pipelined connection per
//! upstream). The plain UDP path does not pay for them: the upstream kind
//! is one enum match per attempt.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;

use crate::tls::{DohUpstream, DotUpstream};
pub use crate::upstream::{UpstreamParseError, UpstreamSpec};

/// Why forwarding failed; the caller answers SERVFAIL (the name was allowed,
/// the upstream is broken) and audits nothing extra.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream configured")]
    NoUpstream,
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    #[error("upstream {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {0} sent a malformed answer")]
    BadAnswer(SocketAddr),
    #[error("too many queries in flight to {0}")]
    Overloaded(SocketAddr),
    /// TLS handshake failure, including certificate verification.
    #[error("upstream {addr}: TLS: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {0}: connection lost")]
    ConnectionLost(SocketAddr),
    #[error("upstream {0}: server did not negotiate HTTP/2 (ALPN h2)")]
    NoHttp2(SocketAddr),
    #[error("upstream {addr}: HTTP/2: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("upstream {addr}: HTTP status {status}")]
    HttpStatus { addr: SocketAddr, status: u16 },
    #[error("upstream {addr}: content type {content_type:?} is not application/dns-message")]
    ContentType {
        addr: SocketAddr,
        content_type: String,
    },
    #[error("upstream {0}: no usable TLS server name")]
    NoTlsName(SocketAddr),
}

/// Tuning.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub upstreams: Vec<UpstreamSpec>,
    /// Per-attempt timeout (one upstream, UDP or TCP; for DoT / DoH it
    /// includes connecting and the TLS handshake).
    pub timeout: Duration,
    /// Connected UDP sockets per plain upstream.
    pub sockets_per_upstream: usize,
    /// EDNS payload size we advertise upstream.
    pub edns_payload: u16,
    /// Trust anchors for DoT / DoH certificates; `None`: the built-in
    /// Mozilla roots ([`crate::tls::default_roots`]).
    pub tls_roots: Option<Arc<rustls::RootCertStore>>,
    /// Queries in flight on one DoT / DoH upstream; more wait (within their
    /// timeout) for a slot.
    pub stream_max_in_flight: usize,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_millis(1500),
            sockets_per_upstream: 4,
            edns_payload: 1232,
            tls_roots: None,
            stream_max_in_flight: 1024,
        }
    }
}

struct Pending {
    tx: oneshot::Sender<Vec<u8>>,
    /// Lowercased wire form of the question we asked.
    question: Vec<u8>,
}

/// Waiting queries of one channel (UDP socket or DoT connection) by id, and
/// the id generator state.
pub(crate) struct PendingTable {
    inner: Mutex<PendingInner>,
    max: usize,
}

struct PendingInner {
    map: HashMap<u16, Pending>,
    rng: u64,
    /// Set when a stream connection died: nothing registers any more.
    closed: bool,
}

pub(crate) enum RegisterError {
    Full,
    Closed,
}

impl PendingTable {
    pub(crate) fn new(seed: u64, max: usize) -> Self {
        PendingTable {
            inner: Mutex::new(PendingInner {
                map: HashMap::new(),
                rng: seed | 1,
                closed: false,
            }),
            // Ids are 16 bits: leave room for the random probe to end.
            max: max.min(60_000),
        }
    }

    pub(crate) fn register(
        &self,
        question: &[u8],
    ) -> Result<(u16, oneshot::Receiver<Vec<u8>>), RegisterError> {
        let (tx, rx) = oneshot::channel();
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        if inner.closed {
            return Err(RegisterError::Closed);
        }
        if inner.map.len() >= self.max {
            return Err(RegisterError::Full);
        }
        let rng = &mut inner.rng;
        loop {
            // xorshift64*: ids need to be unpredictable to an off-path
            // spoofer, not cryptographic (the question is matched too).
            *rng ^= *rng >> 12;
            *rng ^= *rng << 25;
            *rng ^= *rng >> 27;
            let id = (rng.wrapping_mul(0x2545F4914F6CDD1D) >> 48) as u16;
            if let std::collections::hash_map::Entry::Vacant(v) = inner.map.entry(id) {
                v.insert(Pending {
                    tx,
                    question: question.to_vec(),
                });
                return Ok((id, rx));
            }
        }
    }

    pub(crate) fn cancel(&self, id: u16) {
        self.inner.lock().map.remove(&id);
    }

    /// The waiter for `msg` (a response), removed from the table, if its id
    /// is pending and the question matches the one asked.
    pub(crate) fn take_matching(&self, msg: &[u8]) -> Option<oneshot::Sender<Vec<u8>>> {
        let id = u16::from_be_bytes([*msg.first()?, *msg.get(1)?]);
        let mut guard = self.inner.lock();
        let matches = guard
            .map
            .get(&id)
            .is_some_and(|p| answer_matches(msg, &p.question));
        if matches {
            guard.map.remove(&id).map(|p| p.tx)
        } else {
            None
        }
    }

    /// Fail every waiting query and refuse new ones.
    pub(crate) fn close(&self) {
        let mut guard = self.inner.lock();
        guard.closed = true;
        guard.map.clear();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }
}

struct UdpChannel {
    socket: Arc<UdpSocket>,
    pending: PendingTable,
}

struct PlainUpstream {
    addr: SocketAddr,
    channels: Vec<Arc<UdpChannel>>,
    rr: AtomicUsize,
}

enum Upstream {
    Plain(PlainUpstream),
    Tls(DotUpstream),
    Https(DohUpstream),
}

impl Upstream {
    fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Plain(p) => p.addr,
            Upstream::Tls(d) => d.addr,
            Upstream::Https(d) => d.addr,
        }
    }
}

/// See the module documentation.
pub struct Forwarder {
    upstreams: Vec<Upstream>,
    cfg: ForwarderConfig,
    start: AtomicUsize,
    /// Queries sent upstream (UDP + TCP), for metrics and tests.
    pub sent: AtomicU64,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstreams", &self.cfg.upstreams)
            .finish()
    }
}

const MAX_PENDING: usize = 50_000;

fn lower_question(q: &[u8]) -> Vec<u8> {
    q.iter().map(u8::to_ascii_lowercase).collect()
}

/// Byte length of the first question of a wire message (name + type +
/// class), or `None` if it does not parse (compression pointers are refused:
/// the first name of a message has nothing to point back to).
fn question_span(msg: &[u8]) -> Option<std::ops::Range<usize>> {
    let i = crate::wire::plain_name_end(msg, 12)?;
    let end = i.checked_add(4)?;
    (end <= msg.len()).then_some(12..end)
}

/// Build the upstream query: header (random id, RD), the client's question,
/// and an OPT record advertising `payload` with the client's DO bit.
pub(crate) fn build_query(id: u16, question: &[u8], payload: u16, dnssec_ok: bool) -> Vec<u8> {
    build_query_padded(id, question, payload, dnssec_ok, None)
}

/// Queries sent over TLS (DoT, DoH) are padded to a multiple of this many
/// bytes: the block-length strategy RFC 8467 recommends for queries, so the
/// length of the encrypted record no longer tells an on-path observer how
/// long the name is.
pub(crate) const QUERY_PAD_BLOCK: usize = 128;

/// [`build_query`], with an EDNS(0) Padding option (RFC 7830) that makes
/// the whole message a multiple of `pad_block` bytes when one is given.
pub(crate) fn build_query_padded(
    id: u16,
    question: &[u8],
    payload: u16,
    dnssec_ok: bool,
    pad_block: Option<usize>,
) -> Vec<u8> {
    const PADDING: u16 = 12; // EDNS option code (RFC 7830)
    let unpadded = 12 + question.len() + 11;
    let pad = pad_block.map(|b| (b - (unpadded + 4) % b) % b);
    let mut q = Vec::with_capacity(unpadded + pad.map_or(0, |p| 4 + p));
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]); // QD=1 AN=0 NS=0 AR=1
    q.extend_from_slice(question);
    q.push(0); // root owner
    q.extend_from_slice(&41u16.to_be_bytes()); // OPT
    q.extend_from_slice(&payload.to_be_bytes());
    q.extend_from_slice(&[0, 0]); // extended rcode, version
    q.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
    match pad {
        // (A question is at most 259 bytes and the block 128: both fit u16.)
        Some(p) => {
            let p16 = u16::try_from(p).unwrap_or(0);
            q.extend_from_slice(&(4 + p16).to_be_bytes()); // rdlen
            q.extend_from_slice(&PADDING.to_be_bytes());
            q.extend_from_slice(&p16.to_be_bytes());
            q.resize(q.len() + usize::from(p16), 0);
        }
        None => q.extend_from_slice(&[0, 0]), // rdlen
    }
    q
}

pub(crate) fn answer_matches(answer: &[u8], question: &[u8]) -> bool {
    match question_span(answer) {
        Some(span) => {
            let got = &answer[span];
            got.len() == question.len()
                && got
                    .iter()
                    .zip(question)
                    .all(|(a, b)| a.to_ascii_lowercase() == *b)
        }
        None => false,
    }
}

impl UdpChannel {
    async fn recv_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 65535];
        loop {
            let n = match self.socket.recv(&mut buf).await {
                Ok(n) => n,
                // ECONNREFUSED from an ICMP unreachable and friends: the
                // waiting query times out and moves to the next upstream.
                Err(e) => {
                    tracing::debug!(error = %e, "upstream udp recv");
                    continue;
                }
            };
            let msg = &buf[..n];
            if n < 12 || msg[2] & 0x80 == 0 {
                continue; // not a response
            }
            if let Some(tx) = self.pending.take_matching(msg) {
                let _ = tx.send(msg.to_vec());
            }
        }
    }
}

impl Forwarder {
    /// Bind the upstream sockets and start their receive tasks (needs a
    /// tokio runtime).
    pub async fn new(cfg: ForwarderConfig) -> io::Result<Arc<Self>> {
        let seed = RandomState::new().hash_one(std::process::id());
        let mut upstreams = Vec::new();
        // Built on first use: plain-only configurations never touch rustls.
        let mut dot_config = None;
        let mut doh_config = None;
        let roots = || {
            cfg.tls_roots
                .clone()
                .unwrap_or_else(|| Arc::new(crate::tls::default_roots()))
        };
        // One client config per ALPN set, shared by the upstreams that use it.
        let config = |slot: &mut Option<Arc<rustls::ClientConfig>>, alpn: &[&[u8]]| {
            if let Some(c) = slot {
                return Ok(Arc::clone(c));
            }
            let c = crate::tls::client_config(roots(), alpn)
                .map_err(|e| io::Error::other(format!("TLS client setup: {e}")))?;
            *slot = Some(Arc::clone(&c));
            Ok::<_, io::Error>(c)
        };
        let tls_name = |spec: &UpstreamSpec, addr: SocketAddr| {
            spec.server_name().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, ForwardError::NoTlsName(addr))
            })
        };
        for (ui, spec) in cfg.upstreams.iter().enumerate() {
            let useed = seed ^ ((ui as u64) << 32);
            let upstream = match spec {
                UpstreamSpec::Plain(addr) => {
                    Upstream::Plain(Self::plain_upstream(*addr, &cfg, useed)?)
                }
                UpstreamSpec::Tls { addr, .. } => Upstream::Tls(DotUpstream::new(
                    *addr,
                    tls_name(spec, *addr)?,
                    config(&mut dot_config, &[b"dot"])?,
                    cfg.stream_max_in_flight,
                    useed,
                )),
                UpstreamSpec::Https { addr, path, .. } => Upstream::Https(DohUpstream::new(
                    *addr,
                    path,
                    tls_name(spec, *addr)?,
                    config(&mut doh_config, &[b"h2"])?,
                    cfg.stream_max_in_flight,
                    cfg.timeout.max(Duration::from_secs(1)),
                )?),
            };
            upstreams.push(upstream);
        }
        Ok(Arc::new(Forwarder {
            upstreams,
            cfg,
            start: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
        }))
    }

    fn plain_upstream(
        addr: SocketAddr,
        cfg: &ForwarderConfig,
        useed: u64,
    ) -> io::Result<PlainUpstream> {
        let mut channels = Vec::new();
        for ci in 0..cfg.sockets_per_upstream.max(1) {
            let domain = socket2::Domain::for_address(addr);
            let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
            // Generous receive buffer: bursts of answers must not be
            // dropped by the kernel before the receive task runs.
            let _ = s.set_recv_buffer_size(4 << 20);
            s.set_nonblocking(true)?;
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().map_err(io::Error::other)?
            } else {
                "[::]:0".parse().map_err(io::Error::other)?
            };
            s.bind(&bind.into())?;
            s.connect(&addr.into())?;
            let socket = UdpSocket::from_std(s.into())?;
            let ch = Arc::new(UdpChannel {
                socket: Arc::new(socket),
                pending: PendingTable::new(
                    useed ^ (ci as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15),
                    MAX_PENDING,
                ),
            });
            tokio::spawn(ch.clone().recv_loop());
            channels.push(ch);
        }
        Ok(PlainUpstream {
            addr,
            channels,
            rr: AtomicUsize::new(0),
        })
    }

    pub fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// Ask the upstreams `question` (wire form of one question: name, type,
    /// class). Tries each upstream once, starting round-robin; a truncated
    /// UDP answer is retried over TCP on the same upstream. Returns the raw
    /// answer (its id is the upstream id, not the client's).
    pub async fn forward(&self, question: &[u8], dnssec_ok: bool) -> Result<Vec<u8>, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let question = lower_question(question);
        let first = self.start.fetch_add(1, Ordering::Relaxed);
        let mut last_err = ForwardError::NoUpstream;
        for k in 0..self.upstreams.len() {
            let up = &self.upstreams[(first + k) % self.upstreams.len()];
            let (edns, timeout) = (self.cfg.edns_payload, self.cfg.timeout);
            let res = match up {
                Upstream::Plain(up) => match self.ask_udp(up, &question, dnssec_ok).await {
                    Ok(answer) if answer[2] & 0x02 != 0 => {
                        self.ask_tcp(up.addr, &question, dnssec_ok).await
                    }
                    other => other,
                },
                Upstream::Tls(dot) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    dot.ask(&question, dnssec_ok, edns, timeout).await
                }
                Upstream::Https(doh) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    doh.ask(&question, dnssec_ok, edns, timeout).await
                }
            };
            match res {
                Ok(answer) => return Ok(answer),
                Err(e) => last_err = e,
            }
            tracing::debug!(upstream = %up.addr(), error = %last_err, "upstream attempt failed");
        }
        Err(last_err)
    }

    async fn ask_udp(
        &self,
        up: &PlainUpstream,
        question: &[u8],
        dnssec_ok: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let ch = &up.channels[up.rr.fetch_add(1, Ordering::Relaxed) % up.channels.len()];
        let (id, rx) = ch
            .pending
            .register(question)
            .map_err(|_| ForwardError::Overloaded(up.addr))?;
        let query = build_query(id, question, self.cfg.edns_payload, dnssec_ok);
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Err(source) = ch.socket.send(&query).await {
            ch.pending.cancel(id);
            return Err(ForwardError::Io {
                addr: up.addr,
                source,
            });
        }
        match tokio::time::timeout(self.cfg.timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(ForwardError::BadAnswer(up.addr)),
            Err(_) => {
                ch.pending.cancel(id);
                Err(ForwardError::Timeout(up.addr))
            }
        }
    }

    async fn ask_tcp(
        &self,
        addr: SocketAddr,
        question: &[u8],
        dnssec_ok: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let id = (RandomState::new().hash_one(question) >> 48) as u16;
        let query = build_query(id, question, self.cfg.edns_payload, dnssec_ok);
        self.sent.fetch_add(1, Ordering::Relaxed);
        let io_err = |source| ForwardError::Io { addr, source };
        let work = async {
            let mut s = TcpStream::connect(addr).await.map_err(io_err)?;
            let _ = s.set_nodelay(true);
            let len = u16::try_from(query.len()).map_err(|_| ForwardError::BadAnswer(addr))?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&query);
            s.write_all(&framed).await.map_err(io_err)?;
            let mut lenb = [0u8; 2];
            s.read_exact(&mut lenb).await.map_err(io_err)?;
            let n = usize::from(u16::from_be_bytes(lenb));
            let mut answer = vec![0u8; n];
            s.read_exact(&mut answer).await.map_err(io_err)?;
            if n < 12
                || u16::from_be_bytes([answer[0], answer[1]]) != id
                || !answer_matches(&answer, question)
            {
                return Err(ForwardError::BadAnswer(addr));
            }
            Ok(answer)
        };
        tokio::time::timeout(self.cfg.timeout, work)
            .await
            .map_err(|_| ForwardError::Timeout(addr))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded queries are whole blocks, still parse as one question with
    /// an OPT record (payload, DO bit kept) and carry the Padding option.
    #[test]
    fn padded_queries_fill_whole_blocks() {
        use hickory_server::proto::op::{Edns, Message};
        use hickory_server::proto::rr::rdata::opt::EdnsCode;
        for label_len in 1..=63usize {
            for labels in 1..=3usize {
                let mut q = Vec::new();
                for _ in 0..labels {
                    q.push(label_len as u8);
                    q.extend(std::iter::repeat_n(b'a', label_len));
                }
                q.extend_from_slice(&[0, 0, 1, 0, 1]);
                let msg = build_query_padded(9, &q, 1232, true, Some(QUERY_PAD_BLOCK));
                assert!(
                    msg.len().is_multiple_of(QUERY_PAD_BLOCK),
                    "{label_len}x{labels}"
                );
                assert_eq!(question_span(&msg), Some(12..12 + q.len()));
                let parsed = Message::from_vec(&msg).expect("padded query parses");
                assert_eq!(parsed.queries.len(), 1);
                let edns: &Edns = parsed.edns.as_ref().expect("OPT record");
                assert_eq!(edns.max_payload(), 1232);
                assert!(edns.flags().dnssec_ok);
                assert!(edns.option(EdnsCode::Padding).is_some());
            }
        }
        // Unpadded (plain UDP/TCP upstreams): no option at all.
        let plain = build_query(9, &[1, b'a', 0, 0, 1, 0, 1], 1232, false);
        assert_eq!(plain.len(), 12 + 7 + 11);
    }

    #[test]
    fn question_span_and_match() {
        let q = [3, b'w', b'w', b'w', 1, b'x', 0, 0, 1, 0, 1];
        let msg = build_query(7, &q, 1232, false);
        assert_eq!(question_span(&msg), Some(12..23));
        assert!(answer_matches(&msg, &q));
        let mut upper = msg.clone();
        upper[13] = b'W';
        assert!(answer_matches(&upper, &q));
        let mut other = msg.clone();
        other[14] = b'z';
        assert!(!answer_matches(&other, &q));
        // Compression pointer / truncated question.
        assert_eq!(question_span(&[0u8; 12]), None);
        let mut ptr = vec![0u8; 12];
        ptr.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(question_span(&ptr), None);
    }
}
