//! Helpers shared by the proxy's integration tests: the real binary, a
//! counting upstream, an `openssl s_server` TLS upstream with a certificate
//! the test makes, and the JSONL audit log.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_secureops-proxy");

/// A running `secureops-proxy`, killed on drop.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    pub transparent: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub audit_log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Start with `--listen 127.0.0.1:0 --dns-server none --audit-log <tmp>`
    /// plus `args` (which may name their own `--dns-server`).
    pub fn spawn(args: &[&str]) -> Proxy {
        Self::spawn_with(None, args)
    }

    /// Same, optionally prefixed by a wrapper command (e.g. `ip netns exec`).
    pub fn spawn_with(wrapper: Option<&[&str]>, args: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit_log = dir.path().join("audit.jsonl");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["--listen", "127.0.0.1:0"]);
        if !args.contains(&"--dns-server") {
            cmd.args(["--dns-server", "none"]);
        }
        if !args.contains(&"--audit-log") {
            cmd.arg("--audit-log").arg(&audit_log);
        }
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn secureops-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut transparent, mut metrics) = (None, None, None);
        let want_transparent = args.contains(&"--transparent-listen");
        let want_metrics = args.contains(&"--metrics-listen");
        let deadline = Instant::now() + Duration::from_secs(30);
        while addr.is_none()
            || (want_transparent && transparent.is_none())
            || (want_metrics && metrics.is_none())
        {
            assert!(
                Instant::now() < deadline,
                "proxy did not announce its listeners"
            );
            let Some(Ok(line)) = lines.next() else {
                panic!("proxy exited before announcing its listeners");
            };
            let mut it = line.split_whitespace();
            if it.next() != Some("LISTENING") {
                continue;
            }
            let (Some(name), Some(a)) = (it.next(), it.next()) else {
                continue;
            };
            let a: SocketAddr = a.parse().expect("LISTENING address");
            match name {
                "proxy" => addr = Some(a),
                "transparent" => transparent = Some(a),
                "metrics" => metrics = Some(a),
                _ => {}
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Proxy {
            child,
            addr: addr.expect("proxy addr"),
            transparent,
            metrics,
            audit_log,
            _dir: Some(dir),
        }
    }

    /// Every audit record written so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let Ok(text) = std::fs::read_to_string(&self.audit_log) else {
            return vec![];
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Wait (bounded) until at least `n` records exist, then return all.
    pub fn wait_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let recs = self.audit();
            if recs.len() >= n || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Assert that exactly `n` records exist after a short settling time.
    pub fn settled_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let recs = self.wait_audit(n);
        std::thread::sleep(Duration::from_millis(150));
        let recs2 = self.audit();
        assert_eq!(recs.len(), recs2.len(), "audit still growing: {recs2:#?}");
        assert_eq!(recs2.len(), n, "expected {n} audit records, got {recs2:#?}");
        recs2
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP listener that counts connections and bytes received, and answers
/// nothing (or a fixed HTTP response, for plain-HTTP tests).
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub conns: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl CountingUpstream {
    pub fn start(bind: &str) -> CountingUpstream {
        Self::start_inner(TcpListener::bind(bind).expect("bind upstream"), false)
    }

    /// Each connection: read HTTP/1.1 request heads and answer every one with
    /// `200 OK` + a body naming the request line (keep-alive).
    pub fn start_http(bind: &str) -> CountingUpstream {
        Self::start_inner(TcpListener::bind(bind).expect("bind upstream"), true)
    }

    pub fn from_listener(l: TcpListener, http: bool) -> CountingUpstream {
        Self::start_inner(l, http)
    }

    fn start_inner(l: TcpListener, http: bool) -> CountingUpstream {
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (c, b) = (conns.clone(), bytes.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                    let mut buf = [0u8; 4096];
                    let mut pending: Vec<u8> = Vec::new();
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                b.fetch_add(n as u64, Ordering::SeqCst);
                                if !http {
                                    continue;
                                }
                                pending.extend_from_slice(&buf[..n]);
                                while let Some(end) = find(&pending, b"\r\n\r\n") {
                                    let head = String::from_utf8_lossy(&pending[..end]).to_string();
                                    pending.drain(..end + 4);
                                    let line = head.lines().next().unwrap_or("").to_string();
                                    let body = format!("upstream saw: {line}\n");
                                    let resp = format!(
                                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                                        body.len()
                                    );
                                    if s.write_all(resp.as_bytes()).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        CountingUpstream { addr, conns, bytes }
    }

    pub fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A self-signed certificate for `names` (made by the openssl CLI) in a
/// temp dir: (dir, cert.pem, key.pem).
pub fn make_cert(names: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-subj",
            &format!("/CN={}", names[0]),
            "-addext",
            &format!("subjectAltName={san}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(st.success(), "openssl req failed");
    (dir, cert, key)
}

/// `openssl s_server -www` on `accept` (e.g. `127.0.0.1:0`), killed on drop.
pub struct TlsServer {
    child: Child,
    pub addr: SocketAddr,
}

impl TlsServer {
    pub fn start(wrapper: Option<&[&str]>, accept: &str, cert: &Path, key: &Path) -> TlsServer {
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg("openssl");
                c
            }
            None => Command::new("openssl"),
        };
        cmd.args(["s_server", "-accept", accept, "-www", "-naccept", "1000"])
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("openssl s_server");
        let stdout = child.stdout.take().expect("stdout");
        // Read on a helper thread so a silent s_server cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    // Receiver gone: keep draining.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("s_server did not start");
            };
            // `ACCEPT 127.0.0.1:PORT` for port 0, bare `ACCEPT` otherwise.
            if let Some(rest) = line.strip_prefix("ACCEPT") {
                let rest = rest.trim();
                break if rest.is_empty() {
                    accept.parse::<SocketAddr>().expect("accept addr")
                } else {
                    rest.parse::<SocketAddr>().expect("ACCEPT addr")
                };
            }
        };
        TlsServer { child, addr }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `CONNECT target` and return the stream and the response head.
pub fn connect_via(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").expect("write");
    let head = read_head(&mut s);
    (s, head)
}

/// Read until `\r\n\r\n` (bounded), byte by byte so nothing after the head
/// is consumed.
/// Send one HTTP/1.1 `request` on a keep-alive connection and read its whole
/// response (head and `Content-Length` body); the status must be `expect`.
pub fn exchange(s: &mut TcpStream, request: &str, expect: &str) -> String {
    use std::io::{Read, Write};
    s.write_all(request.as_bytes()).unwrap();
    let head = read_head(s);
    assert!(
        head.starts_with(&format!("HTTP/1.1 {expect}")),
        "{request:?}: {head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head
}

pub fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.len() < 65536 {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                out.push(b[0]);
                if out.ends_with(b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Read everything until EOF / reset / timeout: (bytes, reset?).
pub fn read_to_end_or_reset(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

/// Run curl with `args`; returns (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    curl_with(None, args)
}

pub fn curl_with(wrapper: Option<&[&str]>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = match wrapper {
        Some(w) => {
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "10", "--noproxy", ""])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Records whose `reason` equals `reason`.
pub fn with_reason<'a>(recs: &'a [serde_json::Value], reason: &str) -> Vec<&'a serde_json::Value> {
    recs.iter().filter(|r| r["reason"] == reason).collect()
}

/// A DNS server (UDP and TCP) that answers every A question with 127.0.0.1
/// and records each question name it was asked (`asked()`).
pub fn counting_dns() -> secureops_test_support::dns::FakeDns {
    secureops_test_support::dns::FakeDns::answering(std::net::Ipv4Addr::LOCALHOST)
}
