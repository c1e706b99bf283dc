//! Shared helpers of the sinkhole's integration tests: the real binary, a
//! counting upstream DNS server, `dig`, and a raw DNS client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// The counting upstream DNS server (shared with the proxy's tests).
#[allow(unused_imports)]
pub use secureops_test_support::dns::FakeDns as Upstream;

/// The sinkhole binary, killed on drop.
pub struct Sinkhole {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

impl Drop for Sinkhole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sinkhole {
    pub fn spawn(args: &[&str]) -> Sinkhole {
        Self::spawn_cmd(Command::new(env!("CARGO_BIN_EXE_secureops-dns")), args)
    }

    /// Start `cmd args...` (e.g. `ip netns exec NS <binary>`) and wait for
    /// its `LISTENING dns` line.
    pub fn spawn_cmd(mut cmd: Command, args: &[&str]) -> Sinkhole {
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn secureops-dns");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut addr = None;
        let mut metrics = None;
        while addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!("secureops-dns did not print LISTENING dns");
                }
            };
            let mut parts = line.split_whitespace();
            if parts.next() == Some("LISTENING") {
                match (parts.next(), parts.next()) {
                    (Some("dns"), Some(a)) => addr = a.parse().ok(),
                    (Some("metrics"), Some(a)) => metrics = a.parse().ok(),
                    _ => {}
                }
            }
        }
        Sinkhole {
            child,
            addr: addr.expect("addr"),
            metrics,
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Result of one `dig` run.
#[derive(Debug)]
pub struct Dig {
    pub status: String,
    pub answers: Vec<String>,
    pub flags: String,
    pub stdout: String,
}

/// Run the real `dig` (UDP with TCP retry on TC unless `extra` says
/// otherwise).
pub fn dig(server: SocketAddr, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .arg(name)
        .arg(qtype)
        .args(["+tries=1", "+time=3"])
        .args(extra)
        .output()
        .expect("run dig (dnsutils installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let status = stdout
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO_ANSWER")
        .to_string();
    let flags = stdout
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .to_string();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in stdout.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if line.trim().is_empty() {
                break;
            }
            if let Some(last) = line.split_whitespace().last() {
                answers.push(last.to_string());
            }
        }
    }
    Dig {
        status,
        answers,
        flags,
        stdout,
    }
}

/// Build a query message.
pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

/// Send raw bytes over UDP; return the raw answer, if any within `wait`.
pub fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(bytes, server).ok()?;
    let mut buf = [0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// One UDP query, parsed answer.
pub fn udp_query(server: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let raw = udp_raw(
        server,
        &query_bytes(0x4242, name, qtype),
        Duration::from_secs(3),
    )?;
    Message::from_vec(&raw).ok()
}

/// Deterministic pseudo-random base32 label (tunnel payload look-alike).
pub fn random_label(seed: u64, len: usize) -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHA[(x % 32) as usize] as char
        })
        .collect()
}

/// A DNS header: id, flags and the four section counts, big-endian.
pub fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    for v in [id, flags, qd, an, ns, ar] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

/// An uncompressed wire name from raw labels (lengths not checked: tests
/// build invalid names on purpose).
pub fn name_wire(labels: &[&[u8]]) -> Vec<u8> {
    let mut q = Vec::new();
    for l in labels {
        q.push(l.len() as u8);
        q.extend_from_slice(l);
    }
    q.push(0);
    q
}
