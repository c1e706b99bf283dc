//! The transparent funnel (`deploy/funnel.sh`) exercised for real, inside two
//! network namespaces this test creates and joins with a veth pair:
//!
//! ```text
//!   so-w<pid><b>  ("workload")            so-i<pid><b>  ("internet")
//!   192.0.2.1/24  2001:db8:5ec::1/64 <==> 192.0.2.2/24  2001:db8:5ec::2/64
//!   127.0.0.1:7481 proxy stand-in          TCP :8080 / :53 "real" servers
//!   127.0.0.1:7453 sinkhole stand-in       nft counters on every probe
//! ```
//!
//! Addresses are TEST-NET-1 / the documentation IPv6 prefix and exist only
//! inside the two namespaces: nothing is routed to or from the host.
//!
//! Every probe is first shown to *arrive* at the internet namespace without the
//! funnel (positive control), then shown to be redirected or dropped with it.
//! Arrival is measured by nftables named counters on the internet side's input
//! hook, so "none arrive" is observed where it matters, not inferred from an
//! error on the sender.
//!
//! Needs root, `ip` and `nft` (and `iptables` for the fallback backend);
//! otherwise the tests print `SKIPPED: <reason>` and return.

use std::io::{Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
use socket2::{Domain, Protocol, Socket, Type};

const WS_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const INET_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const WS_V6: &str = "2001:db8:5ec::1";
const INET_V6: &str = "2001:db8:5ec::2";
const PROXY_PORT: u16 = 7481;
const DNS_PORT: u16 = 7453;
const EXEMPT_UID: u32 = 1337;
/// Distinct from the UID so that the GID rule is what lets it through.
const EXEMPT_GID: u32 = 4242;
const LOCAL_RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const IO_TIMEOUT: Duration = Duration::from_millis(1500);

fn inet_v6() -> Ipv6Addr {
    INET_V6.parse().unwrap_or(Ipv6Addr::LOCALHOST)
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/funnel.sh")
}

fn run(cmd: &str, args: &[&str]) -> Output {
    match Command::new(cmd).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("spawning {cmd} {args:?}: {e}"),
    }
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Why the test cannot run here, if it cannot.
fn skip_reason(backend: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: creating network namespaces needs CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "nft", "sh"] {
        if !have(tool) {
            return Some(format!("`{tool}` not found"));
        }
    }
    if backend == "iptables" && !(have("iptables") && have("ip6tables")) {
        return Some("iptables/ip6tables not found".into());
    }
    let probe = format!("so-probe{}{}", std::process::id(), backend.len());
    let o = run("ip", &["netns", "add", &probe]);
    if !o.status.success() {
        return Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let _ = run("ip", &["netns", "del", &probe]);
    None
}

/// A network namespace deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Netns {
        let _ = run("ip", &["netns", "del", &name]);
        run_ok("ip", &["netns", "add", &name]);
        Netns { name }
    }
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }
    fn exec_raw(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }
    /// Runs `f` on a thread that joined this namespace (setns is per thread);
    /// sockets created there stay in this namespace wherever they are used.
    fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A TCP server answering every connection with `banner`, followed by the
/// original destination when it was reached through a REDIRECT.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn tcp(listener: TcpListener, banner: &'static str) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let msg = format!("{banner} {}\n", original_dst(&s));
                        let _ = s.write_all(msg.as_bytes());
                        let _ = s.shutdown(Shutdown::Write);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    /// A UDP responder standing in for the DNS sinkhole.
    fn udp(sock: UdpSocket, banner: &'static str) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let _ = sock.set_read_timeout(Some(Duration::from_millis(20)));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(banner.as_bytes(), peer);
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SO_ORIGINAL_DST (v4) / IP6T_SO_ORIGINAL_DST (v6), as secureops-proxy reads
/// it on its transparent listener; "-" when conntrack has no entry (no NAT
/// loaded in that namespace). A tracked but not NATed connection reports its
/// own destination.
fn original_dst(s: &TcpStream) -> String {
    if let Ok(sin) = getsockopt(s, sockopt::OriginalDst) {
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        return SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).to_string();
    }
    if let Ok(sin6) = getsockopt(s, sockopt::Ip6tOriginalDst) {
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        return SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0).to_string();
    }
    "-".into()
}

/// Connects (from the calling thread's namespace) and reads the banner;
/// `None` when the connection could not be made.
fn tcp_banner(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.trim().to_string())
}

fn udp_query(addr: SocketAddr, payload: &[u8]) -> Option<String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.send_to(payload, addr).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Fire-and-forget datagram; an EPERM from a local drop is expected, the
/// verdict is taken from the receiving side's counters.
fn udp_send(addr: SocketAddr, payload: &[u8]) {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.send_to(payload, addr);
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP (v4) or ICMPv6 echo request over a raw socket.
fn ping(dst: std::net::IpAddr) {
    let (domain, proto, kind) = match dst {
        std::net::IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8),
        std::net::IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8),
    };
    let Ok(sock) = Socket::new(domain, Type::RAW, Some(proto)) else {
        panic!("raw socket (root is required and was checked)");
    };
    let mut pkt = vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
    pkt.extend_from_slice(b"secureops-funnel-test");
    if kind == 8 {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    } // the kernel fills the ICMPv6 checksum for raw ICMPv6 sockets
    let _ = sock.send_to(&pkt, &SocketAddr::new(dst, 0).into());
}

/// A QUIC v1 long-header Initial-looking datagram (first byte 0xC0, version 1).
fn quic_initial() -> Vec<u8> {
    let mut p = vec![0xc0, 0, 0, 0, 1, 8];
    p.extend_from_slice(&[0xab; 8]);
    p.push(0);
    p.resize(1200, 0);
    p
}

/// The two namespaces, the stand-in servers and the counters.
struct Lab {
    ws: Netns,
    inet: Netns,
    _servers: Vec<Server>,
}

const COUNTERS: &[(&str, &str)] = &[
    ("tcp8080", "meta nfproto ipv4 tcp dport 8080"),
    ("tcp53", "meta nfproto ipv4 tcp dport 53"),
    ("udp53", "meta nfproto ipv4 udp dport 53"),
    ("udp9999", "meta nfproto ipv4 udp dport 9999"),
    ("udp443", "meta nfproto ipv4 udp dport 443"),
    ("icmp", "icmp type echo-request"),
    ("tcp6", "meta nfproto ipv6 tcp dport 8080"),
    ("udp6", "meta nfproto ipv6 udp dport 9999"),
    ("icmp6", "icmpv6 type echo-request"),
];

impl Lab {
    fn new(tag: &str) -> Lab {
        let pid = std::process::id();
        let ws = Netns::new(format!("so-w{pid}{tag}"));
        let inet = Netns::new(format!("so-i{pid}{tag}"));
        // The veth pair is created inside the workload namespace and its peer
        // moved straight into the internet namespace: the host never sees it.
        ws.exec(&[
            "ip", "link", "add", "vw", "type", "veth", "peer", "name", "vi", "netns", &inet.name,
        ]);
        for (ns, dev, v4, v6) in [(&ws, "vw", WS_V4, WS_V6), (&inet, "vi", INET_V4, INET_V6)] {
            ns.exec(&["ip", "link", "set", "lo", "up"]);
            ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
        }
        // Counters on the internet side, evaluated for every packet coming in
        // over the veth.
        let mut rules = String::from("table inet sotest {\n");
        for (name, _) in COUNTERS {
            rules.push_str(&format!("  counter c_{name} {{}}\n"));
        }
        rules.push_str("  chain in {\n    type filter hook input priority 0; policy accept;\n");
        for (name, m) in COUNTERS {
            rules.push_str(&format!(
                "    iifname \"vi\" {m} counter name \"c_{name}\"\n"
            ));
        }
        rules.push_str("  }\n}\n");
        let path = std::env::temp_dir().join(format!("so-funnel-counters-{pid}{tag}.nft"));
        std::fs::write(&path, rules).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
        inet.exec(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);

        let mut servers = Vec::new();
        // The "real" destinations.
        for (addr, banner) in [
            (SocketAddr::new(INET_V4.into(), 8080), "REAL"),
            (SocketAddr::new(INET_V4.into(), 53), "REALDNS"),
            (SocketAddr::new(inet_v6().into(), 8080), "REAL6"),
        ] {
            let l = inet.run_in(move || TcpListener::bind(addr));
            let l = l.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            servers.push(Server::tcp(l, banner));
        }
        let u = inet
            .run_in(|| UdpSocket::bind((INET_V4, 53)))
            .unwrap_or_else(|e| panic!("bind udp/53: {e}"));
        servers.push(Server::udp(u, "REALDNS"));
        // The local enforcement points' stand-ins in the workload namespace.
        for (addr, banner) in [
            (SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)), "PROXY"),
            (
                SocketAddr::from((Ipv6Addr::LOCALHOST, PROXY_PORT)),
                "PROXY6",
            ),
            (SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)), "SINK"),
        ] {
            let l = ws.run_in(move || TcpListener::bind(addr));
            let l = l.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            servers.push(Server::tcp(l, banner));
        }
        let u = ws
            .run_in(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, DNS_PORT)))
            .unwrap_or_else(|e| panic!("bind sinkhole udp: {e}"));
        servers.push(Server::udp(u, "SINK"));
        // A local resolver like Docker's 127.0.0.11 (UDP 53 plus a TCP port)
        // and an ordinary local service the workload may keep using.
        let u = ws
            .run_in(|| UdpSocket::bind((LOCAL_RESOLVER, 53)))
            .unwrap_or_else(|e| panic!("bind local resolver: {e}"));
        servers.push(Server::udp(u, "LOCALDNS"));
        for (addr, banner) in [
            (SocketAddr::from((LOCAL_RESOLVER, 5300)), "LOCALDNS"),
            (SocketAddr::from((Ipv4Addr::LOCALHOST, 3000)), "LOCALAPP"),
        ] {
            let l = ws.run_in(move || TcpListener::bind(addr));
            let l = l.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            servers.push(Server::tcp(l, banner));
        }
        Lab {
            ws,
            inet,
            _servers: servers,
        }
    }

    fn counter(&self, name: &str) -> u64 {
        let out = self.inet.exec(&[
            "nft",
            "list",
            "counter",
            "inet",
            "sotest",
            &format!("c_{name}"),
        ]);
        let mut words = out.split_whitespace();
        while let Some(w) = words.next() {
            if w == "packets"
                && let Some(n) = words.next().and_then(|n| n.parse().ok())
            {
                return n;
            }
        }
        panic!("no packet count in: {out}");
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        COUNTERS
            .iter()
            .map(|(n, _)| (*n, self.counter(n)))
            .collect()
    }

    fn funnel(&self, args: &[&str]) -> Output {
        let script = script();
        let mut all = vec!["sh", script.to_str().unwrap_or("deploy/funnel.sh")];
        all.extend_from_slice(args);
        self.ws.exec_raw(&all)
    }

    fn funnel_ok(&self, args: &[&str]) {
        let o = self.funnel(args);
        assert!(
            o.status.success(),
            "funnel.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Sends one of each probe from the workload namespace as an ordinary
    /// (non-exempt) process, returning the TCP/UDP answers seen.
    fn probe_all(&self) -> Probes {
        self.ws.run_in(|| {
            let v6 = inet_v6();
            let p = Probes {
                tcp: tcp_banner(SocketAddr::new(INET_V4.into(), 8080)),
                dns_udp: udp_query(SocketAddr::new(INET_V4.into(), 53), b"q"),
                dns_tcp: tcp_banner(SocketAddr::new(INET_V4.into(), 53)),
                tcp6: tcp_banner(SocketAddr::new(v6.into(), 8080)),
                local_dns_udp: udp_query(SocketAddr::new(LOCAL_RESOLVER.into(), 53), b"q"),
                local_dns_tcp: tcp_banner(SocketAddr::new(LOCAL_RESOLVER.into(), 5300)),
                local_app: tcp_banner(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 3000)),
            };
            udp_send(SocketAddr::new(INET_V4.into(), 9999), b"udp");
            udp_send(SocketAddr::new(INET_V4.into(), 443), &quic_initial());
            udp_send(SocketAddr::new(v6.into(), 9999), b"udp6");
            ping(INET_V4.into());
            ping(v6.into());
            p
        })
    }

    /// Waits (bounded) until the counters stop moving, so that a late packet
    /// cannot be missed by the comparison that follows.
    fn settled_counters(&self) -> Vec<(&'static str, u64)> {
        let mut last = self.counters();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.counters();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }
}

#[derive(Debug)]
struct Probes {
    tcp: Option<String>,
    dns_udp: Option<String>,
    dns_tcp: Option<String>,
    tcp6: Option<String>,
    local_dns_udp: Option<String>,
    local_dns_tcp: Option<String>,
    local_app: Option<String>,
}

fn delta(before: &[(&'static str, u64)], after: &[(&'static str, u64)], name: &str) -> u64 {
    let get = |v: &[(&'static str, u64)]| v.iter().find(|(n, _)| *n == name).map(|(_, c)| *c);
    get(after).unwrap_or(0) - get(before).unwrap_or(0)
}

fn scenario(backend: &str, tag: &str) {
    if let Some(reason) = skip_reason(backend) {
        eprintln!("SKIPPED: funnel ({backend}) test: {reason}");
        return;
    }
    let lab = Lab::new(tag);
    let backend_flag = format!("--backend={backend}");

    // 1. Positive control: without the funnel every probe reaches the peer.
    let c0 = lab.settled_counters();
    let p = lab.probe_all();
    let c1 = lab.settled_counters();
    assert_eq!(p.tcp.as_deref(), Some("REAL -"), "control: direct TCP");
    assert_eq!(p.dns_udp.as_deref(), Some("REALDNS"), "control: UDP 53");
    assert_eq!(p.dns_tcp.as_deref(), Some("REALDNS -"), "control: TCP 53");
    assert_eq!(p.tcp6.as_deref(), Some("REAL6 -"), "control: IPv6 TCP");
    assert_eq!(
        p.local_dns_udp.as_deref(),
        Some("LOCALDNS"),
        "control: local resolver"
    );
    assert_eq!(
        p.local_dns_tcp.as_deref(),
        Some("LOCALDNS -"),
        "control: local resolver TCP"
    );
    assert_eq!(
        p.local_app.as_deref(),
        Some("LOCALAPP -"),
        "control: local service"
    );
    for (name, _) in COUNTERS {
        assert!(
            delta(&c0, &c1, name) >= 1,
            "control: probe {name} did not arrive without the funnel: {c0:?} -> {c1:?}"
        );
    }

    // 2. Funnel installed (twice: install is idempotent).
    let deny_local = format!("--deny-local={LOCAL_RESOLVER}");
    let exempt_gid = format!("--exempt-gid={EXEMPT_GID}");
    lab.funnel_ok(&["install", &backend_flag, &deny_local, &exempt_gid]);
    lab.funnel_ok(&["install", &backend_flag, &deny_local, &exempt_gid]);
    let p = lab.probe_all();
    let c2 = lab.settled_counters();
    assert_eq!(
        p.tcp.as_deref(),
        Some("PROXY 192.0.2.2:8080"),
        "direct TCP must land on the proxy's transparent port with its original destination"
    );
    assert_eq!(
        p.dns_udp.as_deref(),
        Some("SINK"),
        "UDP 53 must reach the sinkhole"
    );
    assert_eq!(
        p.dns_tcp.as_deref(),
        Some("SINK 192.0.2.2:53"),
        "TCP 53 must reach the sinkhole"
    );
    assert_eq!(p.tcp6, None, "IPv6 TCP must be dropped by default");
    assert_eq!(
        p.local_dns_udp.as_deref(),
        Some("SINK"),
        "DNS to a local resolver must reach the sinkhole, not the resolver"
    );
    assert_eq!(
        p.local_dns_tcp, None,
        "--deny-local address must be unreachable"
    );
    assert_eq!(
        p.local_app.as_deref(),
        Some("LOCALAPP 127.0.0.1:3000"),
        "local services stay reachable, not redirected"
    );
    for (name, _) in COUNTERS {
        assert_eq!(
            delta(&c1, &c2, name),
            0,
            "probe {name} left the workload namespace through the funnel: {c1:?} -> {c2:?}"
        );
    }

    // 3. The exempt UID (the sidecars' identity) reaches the real upstreams.
    // The socket's owner is the creating thread's fsuid; set on this thread only.
    let (tcp, udp_sent) = lab.ws.run_in(|| {
        let old = setfsuid(Uid::from_raw(EXEMPT_UID));
        let tcp = tcp_banner(SocketAddr::new(INET_V4.into(), 8080));
        let udp = UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(b"exempt", (INET_V4, 9999)))
            .is_ok();
        setfsuid(old);
        (tcp, udp)
    });
    let c3 = lab.settled_counters();
    assert_eq!(
        tcp.as_deref(),
        Some("REAL -"),
        "exempt UID TCP must pass untouched"
    );
    assert!(udp_sent, "exempt UID UDP send failed");
    assert_eq!(delta(&c2, &c3, "udp9999"), 1, "exempt UID UDP must arrive");
    // The exempt GID (a root sensor or PEP holding SYS_PTRACE) passes too.
    let tcp = lab.ws.run_in(|| {
        let old = setfsgid(Gid::from_raw(EXEMPT_GID));
        let tcp = tcp_banner(SocketAddr::new(INET_V4.into(), 8080));
        setfsgid(old);
        tcp
    });
    assert_eq!(
        tcp.as_deref(),
        Some("REAL -"),
        "exempt GID TCP must pass untouched"
    );
    // The same identity check did not open the door for the workload: its
    // sockets are still owned by root here.
    let p = lab.probe_all();
    assert_eq!(p.tcp.as_deref(), Some("PROXY 192.0.2.2:8080"));

    // 4. Optional IPv6 redirect: v6 TCP goes to the proxy's [::1] listener.
    lab.funnel_ok(&["install", &backend_flag, "--ipv6", "redirect"]);
    let c4 = lab.settled_counters();
    let v6 = lab
        .ws
        .run_in(|| tcp_banner(SocketAddr::new(inet_v6().into(), 8080)));
    let c5 = lab.settled_counters();
    assert_eq!(
        v6.as_deref(),
        Some("PROXY6 [2001:db8:5ec::2]:8080"),
        "--ipv6 redirect must send IPv6 TCP to the proxy"
    );
    assert_eq!(delta(&c4, &c5, "tcp6"), 0);

    // 5. Remove (twice: idempotent) restores direct connectivity.
    lab.funnel_ok(&["remove", &backend_flag]);
    lab.funnel_ok(&["remove", &backend_flag]);
    let p = lab.probe_all();
    assert_eq!(p.tcp.as_deref(), Some("REAL -"), "after remove: direct TCP");
    let status = lab.funnel(&["status", &backend_flag]);
    assert!(!status.status.success(), "status must fail once removed");
}

#[test]
fn deploy_funnel_nftables_redirects_and_drops() {
    scenario("nft", "n");
}

#[test]
fn deploy_funnel_iptables_backend_redirects_and_drops() {
    scenario("iptables", "x");
}

/// Invalid options are refused before anything is touched (no root needed).
#[test]
fn deploy_funnel_rejects_bad_options() {
    if !have("sh") {
        eprintln!("SKIPPED: funnel option test: no sh");
        return;
    }
    let s = script();
    let s = s.to_string_lossy();
    for bad in [
        vec!["print", "--proxy-port", "0"],
        vec!["print", "--proxy-port", "70000"],
        vec!["print", "--dns-port", "x"],
        vec!["print", "--proxy-port", "7453"],
        vec!["print", "--exempt-uid", "13a7"],
        vec!["print", "--exempt-uid", ""],
        vec!["print", "--ipv6", "allow"],
        vec!["print", "--deny-local", "127.0.0.1;true"],
        vec!["print", "--deny-local", "1.2.3.4,,5.6.7.8"],
        vec!["print", "--backend", "pf"],
        vec!["frobnicate"],
    ] {
        let mut args = vec![s.as_ref()];
        args.extend(bad.iter().copied());
        let o = run("sh", &args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "funnel.sh {bad:?} must be refused"
        );
    }
    // `print` renders the ruleset without root: check the load-bearing parts.
    let out = run_ok(
        "sh",
        &[
            &s,
            "print",
            "--proxy-port",
            "9001",
            "--exempt-uid",
            "1337",
            "--exempt-uid",
            "1338",
        ],
    );
    for needle in [
        "policy drop;",
        "meta skuid { 1337, 1338 } accept",
        "tcp redirect to :9001",
        "udp dport 53 redirect to :7453",
        "fib daddr type local accept",
    ] {
        assert!(out.contains(needle), "missing `{needle}` in:\n{out}");
    }
    assert!(
        !out.contains("nfproto ipv6"),
        "IPv6 must not be redirected by default"
    );
}
