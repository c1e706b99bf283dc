//! Helpers for the end-to-end tests in `tests/tests/`: run the `secureops`
//! CLI, run `curl` through the proxy, and count what a fake upstream saw.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use secureops_test_support::{
    NetNs, PdpArgs, Service, TestCert, bin_path, have_command, is_root, skip, wait_for,
};

/// Run `secureops ARGS` with the given env; returns its output.
pub fn cli(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(bin_path("secureops"));
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    match c.output() {
        Ok(o) => o,
        Err(e) => panic!("running secureops {args:?}: {e}"),
    }
}

/// `curl` result: exit code, HTTP status (from `-w %{http_code}`), body.
#[derive(Debug)]
pub struct Curl {
    pub code: i32,
    pub http: String,
    pub stderr: String,
    pub stdout: String,
}

/// Run curl with `args`, adding `-sS -w '\n%{http_code}' --max-time 10`.
pub fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("running curl: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let http = stdout.lines().last().unwrap_or("").to_string();
    Curl {
        code: out.status.code().unwrap_or(-1),
        http,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout,
    }
}

/// A TCP listener that counts connections and bytes and never answers:
/// the "attacker". Proves that a denied destination saw nothing.
pub struct CountingListener {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl CountingListener {
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind counting listener");
        let addr = l.local_addr().expect("local addr");
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        CountingListener {
            addr,
            connections,
            bytes,
        }
    }

    pub fn seen(&self) -> (u64, u64) {
        (
            self.connections.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

/// A real TLS server (`openssl s_server -www`) for `names`, on 127.0.0.1.
pub struct TlsServer {
    pub port: u16,
    pub ca_file: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    pub fn start(names: &[&str]) -> Result<Self, String> {
        if !have_command("openssl") {
            return Err("openssl is not installed".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cert = TestCert::new(names);
        let (c, k) = cert.write_to(dir.path()).map_err(|e| e.to_string())?;
        // Pick a free port, then hand it to s_server.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&c)
            .arg("-key")
            .arg(&k)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("openssl s_server: {e}"))?;
        let up = wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        if up.is_none() {
            return Err("openssl s_server did not start".into());
        }
        Ok(TlsServer {
            port,
            ca_file: c,
            child,
            _dir: dir,
        })
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `text` to `dir/name` and return the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Err(e) = std::fs::write(&p, text) {
        panic!("writing {}: {e}", p.display());
    }
    p
}
