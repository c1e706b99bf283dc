//! Cross-network-namespace attribution (what `secureops run` needs): a
//! client inside its own netns, connected to ours by a veth pair, dials a
//! listener on the host side of the pair, directly and through an iptables
//! REDIRECT; UDP too. The Attributor must name the client process.
//!
//! Needs root, iproute2 and /usr/bin/python3 (the client); iptables for the
//! REDIRECT case. Otherwise prints `SKIPPED:`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use secureops_pep::{Attributor, ProcessIdentity, SocketKind};
use secureops_test_support::{NetNs, have_command, is_root};

const PYTHON: &str = "/usr/bin/python3";

/// The client: dial, report `pid local_addr`, hold the socket until stdin
/// closes.
const CLIENT: &str = r#"
import os, socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=5)
elif proto == "loop":
    srv = socket.create_server(("127.0.0.1", 0))
    s = socket.create_connection(srv.getsockname(), timeout=5)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"hello", (host, port))
l = s.getsockname()
r = s.getpeername() if proto != "udp" else ("0.0.0.0", 0)
print(os.getpid(), "%s:%d" % (l[0], l[1]), "%s:%d" % (r[0], r[1]), flush=True)
sys.stdin.read()
"#;

/// A veth pair between the test's netns and ours (198.19.x.0/30: inside
/// RFC 2544's 198.18.0.0/15 like `secureops run`, but the upper half so the
/// two never collide).
struct Link {
    ns: NetNs,
    host_if: String,
    host_ip: Ipv4Addr,
    rules: Vec<Vec<String>>,
}

impl Link {
    fn create() -> Result<Link, String> {
        let ns = NetNs::create("attr")?;
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = (std::process::id().wrapping_mul(8).wrapping_add(n)) % 16_384;
        let host_if = format!("soah{tag}");
        let ns_if = format!("soan{tag}");
        let (a, b) = ((tag / 64) as u8, ((tag % 64) * 4) as u8);
        let host_ip = Ipv4Addr::new(198, 19, a, b + 1);
        let ns_ip = Ipv4Addr::new(198, 19, a, b + 2);
        let link = Link {
            ns,
            host_if: host_if.clone(),
            host_ip,
            rules: Vec::new(),
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", link.ns.name()])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let ns_addr = format!("{ns_ip}/30");
        link.ns
            .run(&["ip", "addr", "add", &ns_addr, "dev", &ns_if])?;
        link.ns.run(&["ip", "link", "set", &ns_if, "up"])?;
        link.ns
            .run(&["ip", "route", "add", "default", "via", &host_ip.to_string()])?;
        Ok(link)
    }

    /// `iptables -w <args>`, deleted again on drop.
    fn rule(&mut self, args: &[&str]) -> Result<(), String> {
        let mut v = vec!["iptables", "-w"];
        v.extend_from_slice(args);
        sh(&v)?;
        self.rules
            .push(args.iter().map(|s| s.to_string()).collect());
        Ok(())
    }

    /// Start the client inside the namespace; returns it and its pid.
    fn client(&self, proto: &str, to: SocketAddr) -> Result<(KillOnDrop, u32), String> {
        self.client_report(proto, to).map(|(c, pid, _)| (c, pid))
    }

    /// Start the client; returns it, its pid and its socket's (local, remote).
    fn client_report(
        &self,
        proto: &str,
        to: SocketAddr,
    ) -> Result<(KillOnDrop, u32, (String, String)), String> {
        let child = self
            .ns
            .command(PYTHON)
            .args([
                "-c",
                CLIENT,
                proto,
                &to.ip().to_string(),
                &to.port().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn client: {e}"))?;
        let mut child = KillOnDrop(child);
        let out = child.0.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| format!("client report: {e}"))?;
        let mut f = line.split_whitespace();
        let pid = f
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("bad client report {line:?}"))?;
        let local = f.next().unwrap_or_default().to_string();
        let remote = f.next().unwrap_or_default().to_string();
        Ok((child, pid, (local, remote)))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for r in self.rules.iter().rev() {
            let mut v: Vec<&str> = vec!["iptables", "-w"];
            for a in r {
                v.push(if a == "-A" || a == "-I" { "-D" } else { a });
            }
            let _ = sh(&v);
        }
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut i) = self.0.stdin.take() {
            let _ = i.write_all(b"");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(argv: &[&str]) -> Result<(), String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("cross-netns attribution needs root".into());
    }
    if !have_command("ip") {
        return Some("`ip` (iproute2) is not installed".into());
    }
    if !std::path::Path::new(PYTHON).exists() {
        return Some(format!("{PYTHON} (the test client) is not installed"));
    }
    None
}

/// The identity must be exactly the client's, read independently via procfs.
fn assert_is(id: &ProcessIdentity, pid: u32) {
    assert_eq!(id.pid, pid, "{id:?}");
    let p = procfs::process::Process::new(pid as i32).expect("client alive");
    let exe = p.exe().expect("client exe");
    assert_eq!(id.exe, exe.to_string_lossy(), "{id:?}");
    assert!(id.exe.contains("python3"), "{id:?}");
    assert_eq!(id.start_time, p.stat().expect("stat").starttime, "{id:?}");
    assert_eq!(id.uid, p.status().expect("status").ruid);
    assert_eq!(id.argv.first().map(String::as_str), Some(PYTHON), "{id:?}");
    assert_eq!(
        id.ancestors.first().map(|a| a.0),
        Some(p.stat().expect("stat").ppid as u32),
        "{id:?}"
    );
}

#[test]
fn tcp_client_in_another_netns() {
    if let Some(r) = skip_reason() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    let link = Link::create().expect("netns + veth");
    let l = TcpListener::bind((link.host_ip, 0)).expect("bind host veth address");
    let (_client, pid) = link.client("tcp", l.local_addr().unwrap()).expect("client");
    let (acc, peer) = l.accept().unwrap();
    let local = acc.local_addr().unwrap();
    let a = Attributor::new();
    let t = Instant::now();
    let id = a.attribute_tcp(local, peer);
    let first = t.elapsed();
    assert_is(&id, pid);
    // Found in a foreign namespace, not ours.
    let (_, netns) = a
        .find_socket(SocketKind::Tcp, peer, Some(local))
        .expect("socket found");
    assert!(netns.is_some(), "reported as foreign");
    // Again, with the namespace map cached and this namespace preferred.
    let t = Instant::now();
    assert_is(&a.attribute_tcp(local, peer), pid);
    eprintln!(
        "cross-netns attribute_tcp: first {first:?}, second {:?}",
        t.elapsed()
    );
}

#[test]
fn redirected_tcp_client_in_another_netns() {
    if let Some(r) = skip_reason() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    if !have_command("iptables") {
        eprintln!("SKIPPED: iptables is not installed");
        return;
    }
    let mut link = Link::create().expect("netns + veth");
    let l = TcpListener::bind((link.host_ip, 0)).expect("bind host veth address");
    let port = l.local_addr().unwrap().port().to_string();
    let host_if = link.host_if.clone();
    // As `secureops run`: the namespace's TCP to anywhere lands on our
    // listener. The original destination (TEST-NET-3) is never reached.
    link.rule(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        &host_if,
        "-p",
        "tcp",
        "-d",
        "203.0.113.9",
        "--dport",
        "443",
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ])
    .expect("iptables REDIRECT");
    let (_client, pid) = link
        .client("tcp", "203.0.113.9:443".parse().unwrap())
        .expect("client");
    let (acc, peer) = l.accept().unwrap();
    // The client's remote is 203.0.113.9:443, not our address: the
    // lookup must match on its local address.
    let id = Attributor::new().attribute_tcp(acc.local_addr().unwrap(), peer);
    assert_is(&id, pid);
}

#[test]
fn udp_client_in_another_netns() {
    if let Some(r) = skip_reason() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    let link = Link::create().expect("netns + veth");
    let s = UdpSocket::bind((link.host_ip, 0)).expect("bind host veth address");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_client, pid) = link.client("udp", s.local_addr().unwrap()).expect("client");
    let mut buf = [0u8; 16];
    let (n, from) = s.recv_from(&mut buf).expect("datagram");
    assert_eq!(&buf[..n], b"hello");
    let a = Attributor::new();
    assert_is(&a.attribute_udp(from, s.local_addr().unwrap()), pid);
    // A wildcard listener does not know its address as the client saw it.
    assert_is(&a.attribute_socket(SocketKind::Udp, from, None), pid);
}

#[test]
fn loopback_peer_is_never_searched_elsewhere() {
    if let Some(r) = skip_reason() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    // Inside the namespace, a loopback connection between two of the
    // client's own sockets: the exact 4-tuple exists there. The same
    // loopback addresses seen here can only be a socket of *our* netns, so
    // the foreign search must not be attempted (it would misattribute).
    let link = Link::create().expect("netns + veth");
    let (_client, pid, (local, remote)) = link
        .client_report("loop", "127.0.0.1:9".parse().unwrap())
        .expect("client");
    let local: SocketAddr = local.parse().expect("client local");
    let remote: SocketAddr = remote.parse().expect("client remote");
    assert!(local.ip().is_loopback());
    let id = Attributor::new().attribute_tcp(remote, local);
    assert_eq!(
        id.pid, 0,
        "loopback socket of pid {pid} in another netns: {id:?}"
    );
}
