//! Transparent mode inside a network namespace the test creates, with an
//! iptables `REDIRECT` of every TCP connection to 10.77.0.0/24 except the
//! proxy's own (marked) upstream connections.
//!
//! Upstream servers and raw clients live in the namespace too: listeners
//! and client sockets are created by a helper thread that `setns`-es into it
//! (a socket stays in the namespace it was created in), curl and
//! `openssl s_server` run under `ip netns exec`.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use secureops_proxy::peek::build_client_hello;

const MARK: &str = "1516";
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace with 10.77.0.2 and 10.77.0.3 on its loopback,
/// deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// `Err(reason)` when the machine cannot do it (not root, no netns
    /// support): the caller prints `SKIPPED`.
    fn create() -> Result<Netns, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root for network namespaces".into());
        }
        if !have("ip") || !have("iptables") {
            return Err("needs `ip` and `iptables`".into());
        }
        let name = format!(
            "sops-px-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&["ip", "addr", "add", "10.77.0.2/32", "dev", "lo"])?;
        ns.exec(&["ip", "addr", "add", "10.77.0.3/32", "dev", "lo"])?;
        Ok(ns)
    }

    fn wrapper(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", self.name.as_str()]
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut full = self.wrapper();
        full.extend_from_slice(args);
        run(&full)
    }

    /// REDIRECT every unmarked TCP connection to 10.77.0.0/24 to `port`.
    fn redirect_to(&self, port: u16) -> Result<(), String> {
        let p = port.to_string();
        self.exec(&[
            "iptables",
            // The xtables lock is global across namespaces: wait for it
            // rather than fail when another test holds it.
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.77.0.0/24",
            "-m",
            "mark",
            "!",
            "--mark",
            MARK,
            "-j",
            "REDIRECT",
            "--to-ports",
            &p,
        ])
    }

    /// Run `f` on a thread that entered this namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    fn listen(&self, addr: &str) -> TcpListener {
        let addr = addr.to_string();
        self.within(move || TcpListener::bind(addr).expect("bind in netns"))
    }

    fn connect(&self, addr: &str) -> TcpStream {
        let addr: SocketAddr = addr.parse().expect("addr");
        let s = self
            .within(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .expect("connect in netns");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespace + redirect + proxy, or `None` (after printing SKIPPED).
fn setup(extra: &[&str]) -> Option<(Netns, Proxy)> {
    start_in(new_netns()?, extra)
}

/// A fresh namespace, or `None` (after printing SKIPPED).
fn new_netns() -> Option<Netns> {
    match Netns::create() {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Redirect + proxy inside `ns`, or `None` (after printing SKIPPED).
fn start_in(ns: Netns, extra: &[&str]) -> Option<(Netns, Proxy)> {
    let mut args = vec![
        "--transparent-listen",
        "127.0.0.1:0",
        "--upstream-mark",
        MARK,
        "--peek-timeout-ms",
        "300",
        "--resolved-ip-allow",
        "10.77.0.0/16",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=10.77.0.2",
        "--resolve",
        "denied.test=10.77.0.3",
    ];
    args.extend_from_slice(extra);
    let w = ns.wrapper();
    let proxy = Proxy::spawn_with(Some(&w), &args);
    let tport = proxy.transparent.expect("transparent addr").port();
    if let Err(why) = ns.redirect_to(tport) {
        eprintln!("SKIPPED: cannot install the REDIRECT rule: {why}");
        return None;
    }
    Some((ns, proxy))
}

/// Like [`setup`], with the proxy resolving through a counting DNS server
/// inside the namespace (which answers every A question with 127.0.0.1).
fn setup_with_counting_dns() -> Option<(Netns, Proxy, secureops_test_support::dns::FakeDns)> {
    let ns = new_netns()?;
    let dns = ns.within(counting_dns);
    let server = dns.addr.to_string();
    let (ns, proxy) = start_in(ns, &["--dns-server", &server])?;
    Some((ns, proxy, dns))
}

/// A ClientHello for `sni` sent to `dst` through the redirect is answered
/// with nothing but a TCP RST.
fn assert_hello_reset(ns: &Netns, dst: &str, sni: &str) {
    let mut s = ns.connect(dst);
    s.write_all(&build_client_hello(Some(sni), false, 1))
        .unwrap();
    let (data, reset) = read_to_end_or_reset(&mut s);
    assert!(data.is_empty(), "{sni}: got {} bytes", data.len());
    assert!(reset, "{sni}: expected a TCP RST");
}

#[test]
fn allowed_sni_passes_through_the_redirect() {
    let Some((ns, proxy)) = setup(&[]) else {
        return;
    };
    let (_d, cert, key) = make_cert(&["allowed.test"]);
    let w = ns.wrapper();
    let _tls = TlsServer::start(Some(&w), "10.77.0.2:443", &cert, &key);
    let (code, out, err) = curl_with(
        Some(&w),
        &[
            "--cacert",
            cert.to_str().unwrap(),
            "--resolve",
            "allowed.test:443:10.77.0.2",
            "https://allowed.test/",
        ],
    );
    assert_eq!(code, 0, "curl: {err}");
    assert!(out.contains("s_server"), "{out}");
    let recs = proxy.settled_audit(1);
    assert_eq!(recs[0]["decision"], "allow");
    assert_eq!(recs[0]["host"], "allowed.test");
    assert_eq!(recs[0]["host_source"], "HOST_SOURCE_SNI");
    assert_eq!(recs[0]["dialled_ip"], "10.77.0.2");
}

#[test]
fn denied_sni_gets_rst_and_the_upstream_sees_nothing() {
    let Some((ns, proxy)) = setup(&[]) else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.3:443"), false);
    let w = ns.wrapper();
    let (code, _o, err) = curl_with(
        Some(&w),
        &[
            "-k",
            "--resolve",
            "denied.test:443:10.77.0.3",
            "https://denied.test/",
        ],
    );
    assert_ne!(code, 0, "denied request succeeded");
    assert!(err.to_ascii_lowercase().contains("reset"), "curl: {err}");

    assert_hello_reset(&ns, "10.77.0.3:443", "denied.test");

    let recs = proxy.settled_audit(2);
    for r in &recs {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["host"], "denied.test");
        assert_eq!(r["reason"], "not_in_allowlist");
    }
    assert_eq!(up.conns(), 0);
    assert_eq!(up.bytes(), 0);
}

/// A denied SNI is refused on the name alone: resolving it to check it
/// against the original destination would leak it to DNS first.
#[test]
fn denied_sni_is_never_looked_up_in_dns() {
    let Some((ns, proxy, dns)) = setup_with_counting_dns() else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.3:443"), false);
    assert_hello_reset(&ns, "10.77.0.3:443", "c2VjcmV0.attacker.test");
    let recs = proxy.settled_audit(1);
    assert_eq!(recs[0]["decision"], "deny");
    assert_eq!(recs[0]["reason"], "not_in_allowlist", "{:#?}", recs[0]);
    assert_eq!(
        dns.asked(),
        Vec::<String>::new(),
        "a denied SNI reached DNS"
    );
    assert_eq!(up.conns(), 0);
}

#[test]
fn sni_not_resolving_to_the_original_destination_is_refused() {
    let Some((ns, proxy)) = setup(&[]) else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.3:443"), false);
    // allowed.test resolves to 10.77.0.2, the client went to 10.77.0.3.
    assert_hello_reset(&ns, "10.77.0.3:443", "allowed.test");
    let recs = proxy.settled_audit(1);
    assert_eq!(recs[0]["decision"], "deny");
    assert_eq!(recs[0]["reason"], "host_ip_mismatch");
    assert_eq!(up.conns(), 0);
}

#[test]
fn opaque_bytes_to_an_ip_without_cidr_rule_are_refused() {
    let Some((ns, proxy)) = setup(&[]) else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.3:5000"), false);
    let mut s = ns.connect("10.77.0.3:5000");
    s.write_all(b"\x00\x01hello, not TLS and not HTTP\n")
        .unwrap();
    let (data, reset) = read_to_end_or_reset(&mut s);
    assert!(data.is_empty());
    assert!(reset, "expected a TCP RST");
    // A server-first protocol (client silent) is decided on the IP too.
    let mut s = ns.connect("10.77.0.3:5000");
    let (data, _) = read_to_end_or_reset(&mut s);
    assert!(data.is_empty());
    // Connecting straight to the transparent port (no redirect) is refused.
    let tport = proxy.transparent.unwrap().port();
    let mut s = ns.connect(&format!("127.0.0.1:{tport}"));
    let _ = s.write_all(b"x");
    assert!(read_to_end_or_reset(&mut s).0.is_empty());

    let recs = proxy.settled_audit(3);
    assert_eq!(recs[0]["host_source"], "HOST_SOURCE_ORIGINAL_DST");
    assert_eq!(recs[0]["host"], "10.77.0.3");
    assert_eq!(recs[0]["reason"], "not_in_allowlist");
    assert_eq!(recs[1]["host_source"], "HOST_SOURCE_ORIGINAL_DST");
    assert_eq!(recs[2]["reason"], "no_original_dst");
    assert!(recs.iter().all(|r| r["decision"] == "deny"));
    assert_eq!(up.conns(), 0);
}

#[test]
fn transparent_plain_http_decides_every_request() {
    let Some((ns, proxy)) = setup(&[]) else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.2:80"), true);
    let mut s = ns.connect("10.77.0.2:80");
    for (host, expect) in [
        ("allowed.test", "200"),
        ("denied.test", "403"),
        ("allowed.test", "200"),
    ] {
        exchange(
            &mut s,
            &format!("GET /p HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            expect,
        );
    }
    // First request decided before hyper, the next two inside it: 3 records.
    let recs = proxy.settled_audit(3);
    assert_eq!(recs[0]["decision"], "allow");
    assert_eq!(recs[0]["host_source"], "HOST_SOURCE_HTTP_HOST");
    assert_eq!(recs[1]["decision"], "deny");
    // Refused on the name, before any lookup of it.
    assert_eq!(recs[1]["reason"], "not_in_allowlist");
    assert_eq!(recs[2]["decision"], "allow");
    assert_eq!(up.conns(), 1);
}

/// A later request of a transparent keep-alive connection naming a refused
/// Host is refused on the name: the proxy must not resolve it first (that
/// lookup would carry the name to DNS), even though the connection's first
/// request was allowed.
#[test]
fn denied_host_later_in_keep_alive_is_never_looked_up() {
    let Some((ns, proxy, dns)) = setup_with_counting_dns() else {
        return;
    };
    let up = CountingUpstream::from_listener(ns.listen("10.77.0.2:80"), true);
    let mut s = ns.connect("10.77.0.2:80");
    for (host, expect) in [("allowed.test", "200"), ("c2VjcmV0.attacker.test", "403")] {
        exchange(
            &mut s,
            &format!("GET /p HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            expect,
        );
    }
    let recs = proxy.settled_audit(2);
    assert_eq!(recs[0]["decision"], "allow");
    assert_eq!(recs[1]["decision"], "deny");
    assert_eq!(recs[1]["reason"], "not_in_allowlist", "{:#?}", recs[1]);
    assert_eq!(
        dns.asked(),
        Vec::<String>::new(),
        "a refused Host reached DNS"
    );
    assert_eq!(up.conns(), 1);
}
