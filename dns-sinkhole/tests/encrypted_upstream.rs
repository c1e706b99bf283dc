//! DNS over TLS and DNS over HTTPS upstreams: the real binary, real `dig`,
//! real TLS (rcgen CA, rustls servers in the test) and an HTTP/2 DoH server.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Sinkhole, dig};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::{RData, Record, RecordType};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const TLS_NAME: &str = "test.upstream";

fn have_dig() -> bool {
    let ok = std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED: dig not installed");
    }
    ok
}

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `TLS_NAME` and 127.0.0.1.
    fn server_cert(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec![TLS_NAME.to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, TLS_NAME);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

fn server_config(ca: &Ca, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let (chain, key) = ca.server_cert();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A temp dir holding `ca.pem`.
struct CaFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_ca(ca: &Ca) -> CaFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    CaFile { _dir: dir, path }
}

// ---------------------------------------------------------------------------
// The answer table
// ---------------------------------------------------------------------------

/// `allowed.test` → 192.0.2.10, `nX.pipe.test` → 10.1.X/256.X%256, anything
/// else NXDOMAIN.
fn table(name: &str) -> Option<Ipv4Addr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "allowed.test" {
        return Some(Ipv4Addr::new(192, 0, 2, 10));
    }
    let i: u16 = name
        .strip_suffix(".pipe.test")?
        .strip_prefix('n')?
        .parse()
        .ok()?;
    let [hi, lo] = i.to_be_bytes();
    Some(Ipv4Addr::new(10, 1, hi, lo))
}

/// The answer to a wire query and its question name, or `None` if the
/// query does not parse.
fn answer(query: &[u8]) -> Option<(Vec<u8>, String)> {
    let req = Message::from_vec(query).ok()?;
    let q = req.queries.first()?.clone();
    let name = q.name().to_ascii();
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_query(q.clone());
    match table(&name) {
        Some(ip) if q.query_type() == RecordType::A => {
            resp.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(A(ip))));
        }
        Some(_) => {}
        None => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    Some((resp.to_vec().ok()?, name))
}

// ---------------------------------------------------------------------------
// Test servers
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    queries: AtomicUsize,
    /// Queries that were not a whole number of 128-byte blocks with an
    /// EDNS Padding option (RFC 7830 / 8467).
    unpadded: AtomicUsize,
    connections: AtomicUsize,
    /// Connections on which ALPN `dot` was negotiated.
    alpn_dot: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Counters {
    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    fn unpadded(&self) -> usize {
        self.unpadded.load(Ordering::SeqCst)
    }
    /// Count `query` as unpadded unless it is whole 128-byte blocks and
    /// carries the Padding option.
    fn check_padding(&self, query: &[u8]) {
        let padded = query.len().is_multiple_of(128)
            && Message::from_vec(query).is_ok_and(|m| {
                m.edns
                    .as_ref()
                    .is_some_and(|e| e.option(EdnsCode::Padding).is_some())
            });
        if !padded {
            self.unpadded.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[derive(Clone, Copy)]
enum DotMode {
    /// Answer everything, out of order (a per-name delay).
    Normal,
    /// On every connection: answer `n` queries, then read the next one and
    /// close the connection without answering it.
    CloseAfter(usize),
    /// Read queries, never answer.
    Silent,
}

struct Server {
    addr: SocketAddr,
    counters: Arc<Counters>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A TLS server on 127.0.0.1:0 with its own runtime: every handshake that
/// completes is counted as a connection and handed to `serve`.
fn start_tls_server<F, Fut>(tls: Arc<rustls::ServerConfig>, serve: F) -> Server
where
    F: Fn(ServerTls, Arc<Counters>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = runtime();
    let counters = Arc::new(Counters::default());
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(tls);
    let c = counters.clone();
    let serve = Arc::new(serve);
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let (c, serve) = (c.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                if stream.get_ref().1.alpn_protocol() == Some(b"dot") {
                    c.alpn_dot.fetch_add(1, Ordering::SeqCst);
                }
                serve(stream, c).await;
            });
        }
    });
    Server {
        addr,
        counters,
        rt: Some(rt),
    }
}

fn start_dot(tls: Arc<rustls::ServerConfig>, mode: DotMode) -> Server {
    start_tls_server(tls, move |stream, c| serve_dot(stream, c, mode))
}

async fn serve_dot(stream: ServerTls, c: Arc<Counters>, mode: DotMode) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    });
    let mut answered = 0usize;
    loop {
        let mut len = [0u8; 2];
        if rd.read_exact(&mut len).await.is_err() {
            break;
        }
        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if rd.read_exact(&mut q).await.is_err() {
            break;
        }
        if let DotMode::CloseAfter(n) = mode
            && answered >= n
        {
            break; // mid-stream: a query read, never answered
        }
        if let DotMode::Silent = mode {
            continue;
        }
        answered += 1;
        c.check_padding(&q);
        let Some((resp, name)) = answer(&q) else {
            break;
        };
        c.queries.fetch_add(1, Ordering::SeqCst);
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // Out-of-order answers: a delay derived from the name.
        let delay = Duration::from_millis(u64::from(name.bytes().map(u32::from).sum::<u32>() % 20));
        let tx = tx.clone();
        let c = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut frame = (resp.len() as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(&resp);
            let _ = tx.send(frame).await;
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(tx);
    if matches!(mode, DotMode::CloseAfter(_)) {
        writer.abort(); // close now, pending or not
    } else {
        let _ = writer.await;
    }
}

fn start_doh(tls: Arc<rustls::ServerConfig>) -> Server {
    start_tls_server(tls, |stream, c| async move {
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let c = c.clone();
            async move { Ok::<_, std::convert::Infallible>(doh_handle(req, &c).await) }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
}

async fn doh_handle(
    req: http::Request<hyper::body::Incoming>,
    c: &Counters,
) -> http::Response<Full<Bytes>> {
    let status = |s: u16| {
        http::Response::builder()
            .status(s)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // /dns-query answers properly; /wrong-type answers with another media
    // type; /other-question answers a question that was not asked; /silent
    // never answers.
    let path = req.uri().path().to_string();
    if path == "/silent" {
        return std::future::pending().await;
    }
    if !["/dns-query", "/wrong-type", "/other-question"].contains(&path.as_str()) {
        return status(404);
    }
    let ct_ok = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/dns-message");
    if req.method() != http::Method::POST || !ct_ok {
        return status(415);
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(400);
    };
    let mut query = body.to_bytes().to_vec();
    c.check_padding(&query);
    if path == "/other-question" {
        query = common::query_bytes(0, "allowed.test", RecordType::A);
    }
    let Some((resp, _)) = answer(&query) else {
        return status(400);
    };
    c.queries.fetch_add(1, Ordering::SeqCst);
    let media = if path == "/wrong-type" {
        "text/plain"
    } else {
        "application/dns-message"
    };
    http::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, media)
        .body(Full::new(Bytes::from(resp)))
        .unwrap()
}

fn sinkhole(upstreams: &[String], ca: &CaFile, extra: &[&str]) -> Sinkhole {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    for u in upstreams {
        args.extend_from_slice(&["--upstream", u.as_str()]);
    }
    let ca = ca.path.to_str().unwrap();
    args.extend_from_slice(&[
        "--upstream-ca",
        ca,
        "--allow",
        "allowed.test",
        "--allow",
        "*.pipe.test",
    ]);
    args.extend_from_slice(extra);
    Sinkhole::spawn(&args)
}

fn dot_url(s: &Server, name: &str) -> String {
    format!("tls://{}#{name}", s.addr)
}

fn doh_url(s: &Server, path: &str, name: &str) -> String {
    format!("https://{}{path}#{name}", s.addr)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// `dig NAME A` through the sinkhole must answer NOERROR with exactly `want`.
fn expect_a(addr: SocketAddr, name: &str, flags: &[&str], want: &[&str]) {
    let d = dig(addr, name, "A", flags);
    assert_eq!(d.status, "NOERROR", "{name}: {}", d.stdout);
    assert_eq!(d.answers, want, "{name}: {}", d.stdout);
}

#[test]
fn dot_allowed_name_is_answered_and_denied_name_never_sent() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let up = start_dot(server_config(&ca, &[b"dot"]), DotMode::Normal);
    let s = sinkhole(&[dot_url(&up, TLS_NAME)], &ca_file, &[]);

    // Denied first: nothing may reach (or even connect to) the upstream.
    for name in ["evil.test", "allowed.test.evil", "pipe.test"] {
        let d = dig(s.addr, name, "A", &[]);
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.stdout);
        assert!(d.answers.is_empty(), "{}", d.stdout);
    }
    assert_eq!(up.counters.queries(), 0);
    assert_eq!(up.counters.connections(), 0);

    expect_a(s.addr, "allowed.test", &[], &["192.0.2.10"]);
    expect_a(s.addr, "n7.pipe.test", &["+tcp"], &["10.1.0.7"]);
    // Upstream NXDOMAIN passes through.
    let d = dig(s.addr, "nope.pipe.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.stdout);
    assert_eq!(up.counters.queries(), 3);
    // One persistent connection for all of them, ALPN "dot" (RFC 7858),
    // every query padded to whole 128-byte blocks (RFC 8467).
    assert_eq!(up.counters.connections(), 1);
    assert_eq!(up.counters.alpn_dot.load(Ordering::SeqCst), 1);
    assert_eq!(up.counters.unpadded(), 0);

    // Verification against the IP (no #name): the cert has IP SAN 127.0.0.1.
    drop(s);
    let s = sinkhole(&[format!("tls://{}", up.addr)], &ca_file, &[]);
    let d = dig(s.addr, "n8.pipe.test", "A", &[]);
    assert_eq!(d.answers, vec!["10.1.0.8"], "{}", d.stdout);
}

#[test]
fn doh_allowed_name_is_answered_and_denied_name_never_sent() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let up = start_doh(server_config(&ca, &[b"h2"]));
    let s = sinkhole(&[doh_url(&up, "/dns-query", TLS_NAME)], &ca_file, &[]);

    let d = dig(s.addr, "evil.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.stdout);
    assert_eq!(up.counters.queries(), 0);
    assert_eq!(up.counters.connections(), 0);

    expect_a(s.addr, "allowed.test", &[], &["192.0.2.10"]);
    expect_a(s.addr, "n300.pipe.test", &["+tcp"], &["10.1.1.44"]);
    let d = dig(s.addr, "nope.pipe.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.stdout);
    assert_eq!(up.counters.queries(), 3);
    assert_eq!(up.counters.connections(), 1);
    assert_eq!(up.counters.unpadded(), 0);

    // The default path (/dns-query) when none is given.
    drop(s);
    let s = sinkhole(&[format!("https://{}#{TLS_NAME}", up.addr)], &ca_file, &[]);
    let d = dig(s.addr, "n9.pipe.test", "A", &[]);
    assert_eq!(d.answers, vec!["10.1.0.9"], "{}", d.stdout);

    // HTTP 404, another content type, an answer to another question:
    // SERVFAIL, nothing leaks.
    drop(s);
    for path in ["/wrong", "/wrong-type", "/other-question"] {
        let s = sinkhole(&[doh_url(&up, path, TLS_NAME)], &ca_file, &[]);
        let d = dig(s.addr, "n10.pipe.test", "A", &[]);
        assert_eq!(d.status, "SERVFAIL", "{path}: {}", d.stdout);
        assert!(d.answers.is_empty(), "{path}: {}", d.stdout);
    }
}

#[test]
fn untrusted_or_misnamed_certificates_give_servfail() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let rogue = Ca::new("rogue ca");
    let rogue_dot = start_dot(server_config(&rogue, &[]), DotMode::Normal);
    let rogue_doh = start_doh(server_config(&rogue, &[b"h2"]));
    let good_dot = start_dot(server_config(&ca, &[]), DotMode::Normal);

    let cases = [
        ("DoT, cert from another CA", dot_url(&rogue_dot, TLS_NAME)),
        (
            "DoH, cert from another CA",
            doh_url(&rogue_doh, "/dns-query", TLS_NAME),
        ),
        ("DoT, wrong name", dot_url(&good_dot, "other.upstream")),
    ];
    for (what, url) in cases {
        let s = sinkhole(&[url], &ca_file, &[]);
        for qname in ["allowed.test", "n1.pipe.test"] {
            let d = dig(s.addr, qname, "A", &[]);
            assert_eq!(d.status, "SERVFAIL", "{what}: {}", d.stdout);
            assert!(d.answers.is_empty(), "{what}: {}", d.stdout);
            let d = dig(s.addr, qname, "A", &["+tcp"]);
            assert_eq!(d.status, "SERVFAIL", "{what} (tcp): {}", d.stdout);
        }
    }
    // The handshakes failed, so not a single query was read.
    assert_eq!(rogue_dot.counters.queries(), 0);
    assert_eq!(rogue_doh.counters.queries(), 0);
    assert_eq!(good_dot.counters.queries(), 0);
    assert_eq!(rogue_dot.counters.connections(), 0);
    assert_eq!(good_dot.counters.connections(), 0);
}

#[test]
fn failing_encrypted_upstream_fails_over_to_the_next() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let rogue = Ca::new("rogue ca");
    let bad = start_dot(server_config(&rogue, &[]), DotMode::Normal);
    let good = start_doh(server_config(&ca, &[b"h2"]));
    let s = sinkhole(
        &[
            dot_url(&bad, TLS_NAME),
            doh_url(&good, "/dns-query", TLS_NAME),
        ],
        &ca_file,
        &[],
    );
    // Round-robin start: half of these try the bad upstream first.
    for i in 0..6 {
        let name = format!("n{i}.pipe.test");
        let d = dig(s.addr, &name, "A", &[]);
        assert_eq!(d.status, "NOERROR", "{name}: {}", d.stdout);
        assert_eq!(d.answers, vec![format!("10.1.0.{i}")], "{}", d.stdout);
    }
    assert_eq!(good.counters.queries(), 6);
    assert_eq!(bad.counters.queries(), 0);
}

#[test]
fn dot_connection_closed_mid_stream_reconnects() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    // Every connection answers one query, then reads the next and closes
    // without answering it.
    let up = start_dot(server_config(&ca, &[]), DotMode::CloseAfter(1));
    let s = sinkhole(&[dot_url(&up, TLS_NAME)], &ca_file, &[]);
    for i in 0..5 {
        let name = format!("n{i}.pipe.test");
        let d = dig(s.addr, &name, "A", &[]);
        assert_eq!(d.status, "NOERROR", "{name}: {}", d.stdout);
        assert_eq!(d.answers, vec![format!("10.1.0.{i}")], "{}", d.stdout);
    }
    assert_eq!(up.counters.queries(), 5);
    assert!(
        up.counters.connections() >= 3,
        "expected reconnects, saw {} connections",
        up.counters.connections()
    );
}

#[test]
fn silent_upstream_times_out_and_is_reconnected() {
    if !have_dig() {
        return;
    }
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let up = start_dot(server_config(&ca, &[]), DotMode::Silent);
    let s = sinkhole(
        &[dot_url(&up, TLS_NAME)],
        &ca_file,
        &["--upstream-timeout-ms", "300"],
    );
    for name in ["n1.pipe.test", "n2.pipe.test"] {
        let t = Instant::now();
        let d = dig(s.addr, name, "A", &[]);
        assert_eq!(d.status, "SERVFAIL", "{name}: {}", d.stdout);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    // A connection that stayed silent past a deadline is not reused.
    assert_eq!(up.counters.connections(), 2);

    // Same for DoH: a request past its deadline retires the connection.
    let up = start_doh(server_config(&ca, &[b"h2"]));
    let s = sinkhole(
        &[doh_url(&up, "/silent", TLS_NAME)],
        &ca_file,
        &["--upstream-timeout-ms", "300"],
    );
    for name in ["n1.pipe.test", "n2.pipe.test"] {
        let t = Instant::now();
        let d = dig(s.addr, name, "A", &[]);
        assert_eq!(d.status, "SERVFAIL", "{name}: {}", d.stdout);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    assert_eq!(up.counters.connections(), 2);
}

#[test]
fn dot_pipelines_many_concurrent_queries_on_one_connection() {
    if !have_dig() {
        return;
    }
    const N: u16 = 200;
    let ca = Ca::new("test ca");
    let ca_file = write_ca(&ca);
    let up = start_dot(server_config(&ca, &[]), DotMode::Normal);
    let s = sinkhole(
        &[dot_url(&up, TLS_NAME)],
        &ca_file,
        &["--exfil-disable", "--upstream-timeout-ms", "5000"],
    );
    // Warm the connection so every query below shares it.
    let d = dig(s.addr, "allowed.test", "A", &[]);
    assert_eq!(d.answers, vec!["192.0.2.10"], "{}", d.stdout);

    // 200 distinct names at once from one socket.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    for i in 0..N {
        let q = common::query_bytes(i, &format!("n{i}.pipe.test"), RecordType::A);
        sock.send_to(&q, s.addr).unwrap();
    }
    let mut got: HashMap<u16, Ipv4Addr> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while got.len() < usize::from(N) && Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let msg = Message::from_vec(&buf[..n]).expect("answer parses");
        let id = msg.metadata.id;
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{msg:?}");
        let qname = msg.queries[0].name().to_ascii();
        assert_eq!(qname.trim_end_matches('.'), format!("n{id}.pipe.test"));
        let ips: Vec<Ipv4Addr> = msg
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(ips.len(), 1, "{msg:?}");
        assert!(got.insert(id, ips[0]).is_none(), "duplicate answer {id}");
    }
    assert_eq!(got.len(), usize::from(N), "missing answers");
    for (id, ip) in &got {
        assert_eq!(Some(*ip), table(&format!("n{id}.pipe.test")), "id {id}");
    }
    assert_eq!(up.counters.queries(), usize::from(N) + 1);
    assert_eq!(up.counters.connections(), 1, "one pipelined connection");
    let max = up.counters.max_in_flight.load(Ordering::SeqCst);
    assert!(max > 1, "queries were not pipelined (max in flight {max})");
    println!("max in flight at the DoT server: {max}");
}

#[test]
fn bad_upstream_arguments_are_refused_at_startup() {
    let bin = env!("CARGO_BIN_EXE_secureops-dns");
    for (args, needle) in [
        (vec!["--upstream", "tls://dns.google"], "IP address"),
        (
            vec!["--upstream", "https://dns.google/dns-query"],
            "IP address",
        ),
        (vec!["--upstream", "http://1.1.1.1/dns-query"], "scheme"),
        (
            vec!["--upstream", "tls://1.1.1.1#bad name"],
            "TLS server name",
        ),
        (
            vec![
                "--upstream",
                "tls://1.1.1.1",
                "--upstream-ca",
                "/nonexistent/ca.pem",
            ],
            "CA bundle",
        ),
    ] {
        let out = std::process::Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // An empty CA file is an error too.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let out = std::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--upstream", "tls://1.1.1.1"])
        .arg("--upstream-ca")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no certificates"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
