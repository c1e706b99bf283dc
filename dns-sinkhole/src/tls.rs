//! Encrypted upstreams: DNS over TLS (RFC 7858) and DNS over HTTPS
//! (RFC 8484), used by [`crate::forward::Forwarder`].
//!
//! * TLS is rustls 0.23 on the ring provider. Certificates are always
//!   verified, against `--upstream-ca` or the built-in Mozilla roots
//!   (`webpki-roots`: compiled in, so the sinkhole verifies the same way in
//!   a distroless container as on a full host, and a host trust store the
//!   workload can write to does not widen what the sinkhole trusts).
//! * DoT keeps one persistent TLS connection per upstream and pipelines
//!   queries over it (2-byte length framing, RFC 7766): a writer task
//!   coalesces queued frames, a reader task dispatches answers by id **and**
//!   question (the same pending table as the UDP path). When the connection
//!   fails every waiting query fails at once; the next query reconnects. A
//!   query that times out on a connection that has received nothing since
//!   the query was sent takes the connection down with it (a silently dead
//!   peer must not turn every later query into a timeout).
//! * DoH keeps one persistent HTTP/2 connection (hyper 1 client, ALPN `h2`
//!   required) and POSTs `application/dns-message` with id 0. A request that
//!   fails or times out retires the connection (requests still running on
//!   it finish; hyper's keep-alive pings close it if it is dead); the next
//!   query connects afresh.
//!   Status ≠ 200, another content type, an oversized or malformed body, or
//!   an answer to another question are all errors.
//! * A query that fails on a reused connection because the connection was
//!   lost is retried once on a fresh connection within the same per-attempt
//!   deadline; everything else fails the attempt and the forwarder moves on
//!   to the next upstream.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::forward::{
    ForwardError, PendingTable, QUERY_PAD_BLOCK, RegisterError, build_query_padded,
};

/// The DoH media type (RFC 8484 §6).
pub const DNS_MESSAGE: &str = "application/dns-message";

/// Why `--upstream-ca` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("CA bundle {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA bundle {path}: certificate not usable as a trust anchor: {source}")]
    BadCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA bundle {0}: no certificates found")]
    Empty(PathBuf),
}

/// Load a PEM bundle of trust anchors (`--upstream-ca`).
pub fn load_ca_bundle(path: &Path) -> Result<RootCertStore, CaBundleError> {
    let pem_err = |source| CaBundleError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(pem_err)? {
        let cert = cert.map_err(pem_err)?;
        roots.add(cert).map_err(|source| CaBundleError::BadCert {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(CaBundleError::Empty(path.to_path_buf()));
    }
    Ok(roots)
}

/// The built-in trust anchors (Mozilla's, via `webpki-roots`).
pub fn default_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// A rustls client config on the ring provider with `alpn` offered.
pub(crate) fn client_config(
    roots: Arc<RootCertStore>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

async fn connect_tls(
    addr: SocketAddr,
    name: &ServerName<'static>,
    connector: &TlsConnector,
) -> Result<TlsStream<TcpStream>, ForwardError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ForwardError::Io { addr, source })?;
    let _ = tcp.set_nodelay(true);
    connector
        .connect(name.clone(), tcp)
        .await
        .map_err(|source| ForwardError::Tls { addr, source })
}

/// Removes a registered id from the pending table unless disarmed (the
/// query was cancelled by its deadline or the caller went away).
struct CancelOnDrop<'a> {
    table: &'a PendingTable,
    id: u16,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.table.cancel(self.id);
        }
    }
}

// ---------------------------------------------------------------------------
// DNS over TLS
// ---------------------------------------------------------------------------

/// State shared by one DoT connection's reader and writer tasks.
struct DotShared {
    pending: PendingTable,
    /// Either task signals the other when it ends.
    done: Notify,
    born: Instant,
    /// Microseconds after `born` at which the last message arrived.
    last_rx_us: AtomicU64,
}

impl DotShared {
    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Fail everything in flight and stop both tasks.
    fn kill(&self) {
        self.pending.close();
        self.done.notify_one();
    }
}

struct DotConn {
    shared: Arc<DotShared>,
    /// Framed queries to the writer task.
    tx: mpsc::Sender<Vec<u8>>,
}

impl DotConn {
    fn is_alive(&self) -> bool {
        !self.tx.is_closed() && !self.shared.pending.is_closed()
    }

    async fn ask(
        &self,
        addr: SocketAddr,
        question: &[u8],
        dnssec_ok: bool,
        payload: u16,
        deadline: Instant,
    ) -> Result<Vec<u8>, ForwardError> {
        let (id, rx) = match self.shared.pending.register(question) {
            Ok(r) => r,
            Err(RegisterError::Closed) => return Err(ForwardError::ConnectionLost(addr)),
            Err(RegisterError::Full) => return Err(ForwardError::Overloaded(addr)),
        };
        let mut guard = CancelOnDrop {
            table: &self.shared.pending,
            id,
            armed: true,
        };
        let query = build_query_padded(id, question, payload, dnssec_ok, Some(QUERY_PAD_BLOCK));
        let len = u16::try_from(query.len()).map_err(|_| ForwardError::BadAnswer(addr))?;
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&query);
        let sent_at = self.shared.now_us();
        let work = async {
            self.tx
                .send(frame)
                .await
                .map_err(|_| ForwardError::ConnectionLost(addr))?;
            rx.await.map_err(|_| ForwardError::ConnectionLost(addr))
        };
        match timeout_at(deadline, work).await {
            Ok(r) => {
                // The entry is gone (answered or drained with the table).
                guard.armed = false;
                r
            }
            Err(_) => {
                if self.shared.last_rx_us.load(Ordering::Relaxed) < sent_at {
                    // Nothing at all came back since we asked: treat the
                    // connection as dead so the next query reconnects.
                    tracing::debug!(upstream = %addr, "DoT connection silent past the deadline; dropping it");
                    self.shared.kill();
                }
                Err(ForwardError::Timeout(addr))
            }
        }
    }
}

async fn dot_read_loop(
    shared: Arc<DotShared>,
    mut rd: tokio::io::ReadHalf<TlsStream<TcpStream>>,
    addr: SocketAddr,
) {
    let reason: io::Result<()> = async {
        loop {
            let mut lenb = [0u8; 2];
            tokio::select! {
                r = rd.read_exact(&mut lenb) => { r?; }
                _ = shared.done.notified() => return Ok(()),
            }
            let n = usize::from(u16::from_be_bytes(lenb));
            if n < 12 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "runt DNS message on DoT stream",
                ));
            }
            let mut msg = vec![0u8; n];
            tokio::select! {
                r = rd.read_exact(&mut msg) => { r?; }
                _ = shared.done.notified() => return Ok(()),
            }
            shared.last_rx_us.store(shared.now_us(), Ordering::Relaxed);
            if msg[2] & 0x80 == 0 {
                continue; // not a response
            }
            if let Some(tx) = shared.pending.take_matching(&msg) {
                let _ = tx.send(msg);
            }
        }
    }
    .await;
    if let Err(e) = reason {
        tracing::debug!(upstream = %addr, error = %e, "DoT connection closed");
    }
    shared.kill();
}

async fn dot_write_loop(
    shared: Arc<DotShared>,
    mut wr: tokio::io::WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    addr: SocketAddr,
) {
    let mut batch = Vec::with_capacity(64);
    let mut buf = Vec::new();
    let reason: io::Result<()> = async {
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, 64) => n,
                _ = shared.done.notified() => return Ok(()),
            };
            if n == 0 {
                return Ok(()); // the connection was dropped
            }
            buf.clear();
            for frame in batch.drain(..) {
                buf.extend_from_slice(&frame);
            }
            tokio::select! {
                r = async { wr.write_all(&buf).await?; wr.flush().await } => r?,
                _ = shared.done.notified() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = reason {
        tracing::debug!(upstream = %addr, error = %e, "DoT write failed");
    }
    shared.kill();
}

/// A slot among an upstream's bounded in-flight queries, waited for until
/// the query's deadline (DoT and DoH alike).
async fn in_flight_permit(
    permits: &Semaphore,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<tokio::sync::SemaphorePermit<'_>, ForwardError> {
    timeout_at(deadline, permits.acquire())
        .await
        .map_err(|_| ForwardError::Timeout(addr))?
        .map_err(|_| ForwardError::Overloaded(addr))
}

/// One DoT upstream: a persistent, pipelined TLS connection.
pub(crate) struct DotUpstream {
    pub(crate) addr: SocketAddr,
    name: ServerName<'static>,
    connector: TlsConnector,
    slot: tokio::sync::Mutex<Option<Arc<DotConn>>>,
    permits: Semaphore,
    max_in_flight: usize,
    seed: u64,
    generation: AtomicU64,
}

impl DotUpstream {
    pub(crate) fn new(
        addr: SocketAddr,
        name: ServerName<'static>,
        config: Arc<ClientConfig>,
        max_in_flight: usize,
        seed: u64,
    ) -> Self {
        let max_in_flight = max_in_flight.clamp(1, 10_000);
        DotUpstream {
            addr,
            name,
            connector: TlsConnector::from(config),
            slot: tokio::sync::Mutex::new(None),
            permits: Semaphore::new(max_in_flight),
            max_in_flight,
            seed,
            generation: AtomicU64::new(0),
        }
    }

    async fn connect(&self) -> Result<Arc<DotConn>, ForwardError> {
        let tls = connect_tls(self.addr, &self.name, &self.connector).await?;
        let (rd, wr) = tokio::io::split(tls);
        let (tx, rx) = mpsc::channel(self.max_in_flight);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(DotShared {
            pending: PendingTable::new(
                self.seed ^ (generation + 1).wrapping_mul(0x9E3779B97F4A7C15) | 1,
                self.max_in_flight,
            ),
            done: Notify::new(),
            born: Instant::now(),
            last_rx_us: AtomicU64::new(0),
        });
        tokio::spawn(dot_read_loop(shared.clone(), rd, self.addr));
        tokio::spawn(dot_write_loop(shared.clone(), wr, rx, self.addr));
        tracing::debug!(upstream = %self.addr, "DoT connection established");
        Ok(Arc::new(DotConn { shared, tx }))
    }

    /// The live connection (`false`) or a new one (`true`).
    async fn connection(&self) -> Result<(Arc<DotConn>, bool), ForwardError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = slot.as_ref()
            && c.is_alive()
        {
            return Ok((c.clone(), false));
        }
        *slot = None;
        let c = self.connect().await?;
        *slot = Some(c.clone());
        Ok((c, true))
    }

    pub(crate) async fn ask(
        &self,
        question: &[u8],
        dnssec_ok: bool,
        payload: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, ForwardError> {
        let deadline = Instant::now() + timeout;
        let timed_out = |_| ForwardError::Timeout(self.addr);
        let _permit = in_flight_permit(&self.permits, self.addr, deadline).await?;
        let mut retried = false;
        loop {
            let (conn, fresh) = timeout_at(deadline, self.connection())
                .await
                .map_err(timed_out)??;
            match conn
                .ask(self.addr, question, dnssec_ok, payload, deadline)
                .await
            {
                Err(ForwardError::ConnectionLost(_)) if !fresh && !retried => {
                    // The idle connection died under us (server closed it):
                    // once more on a fresh one.
                    retried = true;
                }
                r => return r,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DNS over HTTPS
// ---------------------------------------------------------------------------

/// Largest DoH answer body accepted (a DNS message cannot be larger).
const MAX_DOH_BODY: usize = 65_535;

/// One DoH upstream: a persistent HTTP/2 connection.
pub(crate) struct DohUpstream {
    pub(crate) addr: SocketAddr,
    name: ServerName<'static>,
    connector: TlsConnector,
    uri: http::Uri,
    keepalive: Duration,
    slot: tokio::sync::Mutex<Option<(u64, SendRequest<Full<Bytes>>)>>,
    generation: AtomicU64,
    permits: Semaphore,
}

impl DohUpstream {
    pub(crate) fn new(
        addr: SocketAddr,
        path: &str,
        name: ServerName<'static>,
        config: Arc<ClientConfig>,
        max_in_flight: usize,
        keepalive: Duration,
    ) -> io::Result<Self> {
        let host = match &name {
            ServerName::DnsName(n) => n.as_ref().to_string(),
            _ => match addr.ip() {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            },
        };
        let authority = if addr.port() == 443 {
            host
        } else {
            format!("{host}:{}", addr.port())
        };
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(DohUpstream {
            addr,
            name,
            connector: TlsConnector::from(config),
            uri,
            keepalive,
            slot: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            permits: Semaphore::new(max_in_flight.clamp(1, 10_000)),
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ForwardError> {
        let addr = self.addr;
        let tls = connect_tls(addr, &self.name, &self.connector).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ForwardError::NoHttp2(addr));
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive)
            .keep_alive_while_idle(false)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ForwardError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "DoH connection closed");
            }
        });
        tracing::debug!(upstream = %addr, "DoH connection established");
        Ok(sender)
    }

    async fn connection(&self) -> Result<(u64, SendRequest<Full<Bytes>>, bool), ForwardError> {
        let mut slot = self.slot.lock().await;
        if let Some((generation, s)) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok((*generation, s.clone(), false));
        }
        *slot = None;
        let s = self.connect().await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *slot = Some((generation, s.clone()));
        Ok((generation, s, true))
    }

    /// Stop handing out connection `generation` (it failed or went
    /// silent). Requests still running on it finish; hyper closes it when
    /// the last of them drops its handle.
    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    pub(crate) async fn ask(
        &self,
        question: &[u8],
        dnssec_ok: bool,
        payload: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, ForwardError> {
        let addr = self.addr;
        let deadline = Instant::now() + timeout;
        let timed_out = |_| ForwardError::Timeout(addr);
        let _permit = in_flight_permit(&self.permits, addr, deadline).await?;
        // RFC 8484 §4.1: id 0 (cache friendly); the question is still
        // matched.
        let query = Bytes::from(build_query_padded(
            0,
            question,
            payload,
            dnssec_ok,
            Some(QUERY_PAD_BLOCK),
        ));
        let mut retried = false;
        loop {
            let (generation, mut sender, fresh) = timeout_at(deadline, self.connection())
                .await
                .map_err(timed_out)??;
            let req = http::Request::post(self.uri.clone())
                .header(http::header::CONTENT_TYPE, DNS_MESSAGE)
                .header(http::header::ACCEPT, DNS_MESSAGE)
                .body(Full::new(query.clone()))
                .map_err(|e| ForwardError::Io {
                    addr,
                    source: io::Error::other(e),
                })?;
            let sent = match timeout_at(deadline, async {
                sender.ready().await?;
                sender.send_request(req).await
            })
            .await
            {
                Ok(sent) => sent,
                Err(_) => {
                    self.discard(generation).await;
                    return Err(ForwardError::Timeout(addr));
                }
            };
            let resp = match sent {
                Ok(resp) => resp,
                Err(source) => {
                    self.discard(generation).await;
                    if !fresh && !retried {
                        // A reused connection went away (GOAWAY, reset):
                        // once more on a fresh one.
                        retried = true;
                        continue;
                    }
                    return Err(ForwardError::Http { addr, source });
                }
            };
            return match timeout_at(deadline, read_doh_answer(addr, resp, question)).await {
                Ok(r) => r,
                Err(_) => {
                    self.discard(generation).await;
                    Err(ForwardError::Timeout(addr))
                }
            };
        }
    }
}

async fn read_doh_answer(
    addr: SocketAddr,
    resp: http::Response<hyper::body::Incoming>,
    question: &[u8],
) -> Result<Vec<u8>, ForwardError> {
    let status = resp.status();
    if status != http::StatusCode::OK {
        return Err(ForwardError::HttpStatus {
            addr,
            status: status.as_u16(),
        });
    }
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case(DNS_MESSAGE) {
        return Err(ForwardError::ContentType { addr, content_type });
    }
    let body = Limited::new(resp.into_body(), MAX_DOH_BODY)
        .collect()
        .await
        .map_err(|_| ForwardError::BadAnswer(addr))?
        .to_bytes();
    if body.len() < 12
        || body[2] & 0x80 == 0
        || u16::from_be_bytes([body[0], body[1]]) != 0
        || !crate::forward::answer_matches(&body, question)
    {
        return Err(ForwardError::BadAnswer(addr));
    }
    Ok(body.to_vec())
}
