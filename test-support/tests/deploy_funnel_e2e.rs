//! The funnel with the real enforcement points: `deploy/funnel.sh` installed
//! in a workload network namespace where the real `secureops-proxy`
//! (transparent listener) and `secureops-dns` run as the exempt UID 1337,
//! exactly as in the Kubernetes pod. The "internet" is a second namespace
//! joined by a veth pair (TEST-NET-1 addresses, never routed to the host).
//!
//! Shown: a workload's plain TCP connection to an allowed name reaches the
//! real server *through* the proxy (which dials it as UID 1337); one to a
//! name that is not allowed is reset and never reaches the server; a DNS
//! query aimed at an outside resolver is answered by the sinkhole and never
//! leaves the namespace.
//!
//! The proxy and sinkhole run standalone (`--allow`, no PDP): the funnel and
//! its exemption are what is under test here, not the policy.
//!
//! Needs root, `ip`, `nft`, `setpriv` and the two binaries
//! (`cargo build -p secureops-proxy -p secureops-dns --bins`); otherwise
//! prints `SKIPPED`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use secureops_test_support::{Service, bin_path, have_command, is_root, skip};

const INET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

struct Ns(String);

impl Ns {
    fn new(name: String) -> Ns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        Ns(name)
    }
    fn exec(&self, argv: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(argv);
        run(&all);
    }
    /// Runs `f` on a thread that joined this namespace.
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        let h = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns: {e}"));
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A background server counting what reaches it; stopped on drop.
struct Counter {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Counter {
    fn http(l: TcpListener) -> Counter {
        let (hits, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (h, st) = (hits.clone(), stop.clone());
        let _ = l.set_nonblocking(true);
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        h.fetch_add(1, Ordering::SeqCst);
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                        let mut buf = [0u8; 2048];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nREAL",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Counter {
            hits,
            stop,
            thread: Some(thread),
        }
    }
    fn udp(s: UdpSocket) -> Counter {
        let (hits, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (h, st) = (hits.clone(), stop.clone());
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                if s.recv_from(&mut buf).is_ok() {
                    h.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Counter {
            hits,
            stop,
            thread: Some(thread),
        }
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn http_get(host: &'static str) -> String {
    let mut out = String::new();
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((INET, 80)), IO_TIMEOUT) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_ok() {
        let _ = s.read_to_string(&mut out);
    }
    out
}

/// A DNS A query for `name` (id 0x5ec0), sent to the outside resolver address.
fn dns_query(name: &str) -> Option<Vec<u8>> {
    let mut q = vec![0x5e, 0xc0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.send_to(&q, (INET, 53)).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

fn spawn_exempt(ws: &Ns, bin: &str, args: &[&str], expect: &[&str]) -> Service {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ws.0,
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
    ])
    .arg("--clear-groups")
    .arg(bin_path(bin))
    .args(args);
    match Service::spawn_command(cmd, expect) {
        Ok(s) => s,
        Err(e) => panic!("{bin} did not start in {}: {e}", ws.0),
    }
}

#[test]
fn deploy_funnel_with_real_proxy_and_sinkhole() {
    if !is_root() {
        skip!("funnel e2e: not root (network namespaces)");
    }
    for tool in ["ip", "nft", "setpriv"] {
        if !have_command(tool) {
            skip!("funnel e2e: `{tool}` not found");
        }
    }
    for bin in ["secureops-proxy", "secureops-dns"] {
        if !bin_path(bin).exists() {
            skip!(
                "funnel e2e: {} not built (cargo build -p {bin} --bins)",
                bin_path(bin).display()
            );
        }
    }
    let pid = std::process::id();
    let ws = Ns::new(format!("so-ew{pid}"));
    let inet = Ns::new(format!("so-ei{pid}"));
    ws.exec(&[
        "ip", "link", "add", "vw", "type", "veth", "peer", "name", "vi", "netns", &inet.0,
    ]);
    for (ns, dev, addr) in [(&ws, "vw", "192.0.2.1/24"), (&inet, "vi", "192.0.2.2/24")] {
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", addr, "dev", dev]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
    let web = inet
        .run_in(|| TcpListener::bind((INET, 80)))
        .unwrap_or_else(|e| panic!("bind :80: {e}"));
    let web = Counter::http(web);
    let resolver = inet
        .run_in(|| UdpSocket::bind((INET, 53)))
        .unwrap_or_else(|e| panic!("bind :53: {e}"));
    let resolver = Counter::udp(resolver);

    let _proxy = spawn_exempt(
        &ws,
        "secureops-proxy",
        &[
            "--listen=127.0.0.1:0",
            "--transparent-listen=127.0.0.1:7481",
            "--allow=allowed.test",
            "--resolve=allowed.test=192.0.2.2",
            // 192.0.2.0/24 is special-purpose (documentation): the
            // rebinding guard needs it named.
            "--resolved-ip-allow=192.0.2.0/24",
            "--dns-server=none",
        ],
        &["transparent"],
    );
    let _dns = spawn_exempt(
        &ws,
        "secureops-dns",
        &["--listen=127.0.0.1:7453", "--allow=allowed.test"],
        &["dns"],
    );
    let script = secureops_test_support::workspace_root().join("deploy/funnel.sh");
    ws.exec(&["sh", &script.to_string_lossy(), "install"]);

    // Allowed: through the proxy, which dials the validated IP as UID 1337.
    let body = ws.run_in(|| http_get("allowed.test"));
    assert!(
        body.ends_with("REAL"),
        "allowed request not proxied: {body:?}"
    );
    assert_eq!(web.hits(), 1, "exactly the proxy's upstream connection");

    // Denied: reset, and not a single connection reached the server.
    let body = ws.run_in(|| http_get("evil.test"));
    assert!(
        !body.contains("REAL"),
        "denied request reached the server: {body:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(web.hits(), 1, "a denied connection reached the server");

    // DNS to an outside resolver: answered by the sinkhole (same id,
    // NXDOMAIN), the resolver never sees it.
    let answer = ws.run_in(|| dns_query("evil.test"));
    let answer = answer.unwrap_or_else(|| panic!("no DNS answer from the sinkhole"));
    assert_eq!(&answer[..2], &[0x5e, 0xc0], "answer id");
    assert!(answer[2] & 0x80 != 0, "QR bit: a response");
    assert_eq!(answer[3] & 0x0f, 3, "NXDOMAIN from the sinkhole");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(resolver.hits(), 0, "the query left the workload namespace");
}
