//! Shared helpers of the sinkhole's integration tests: the real binary, a
//! counting upstream DNS server, `dig`, and a raw DNS client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

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

/// A tiny authoritative-for-everything upstream that counts what it gets.
///
/// * `big*`  names: 100 A records (≈1.7 kB): over UDP the answer is
///   truncated (TC, no records) when it does not fit the asker's payload.
/// * `nx*`   names: NXDOMAIN with an SOA.
/// * anything else: A 192.0.2.1 / AAAA 2001:db8::1, TTL 300.
pub struct Upstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    pub names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn answer_for(req: &Message, max_payload: Option<u16>) -> Vec<u8> {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    let Some(q) = req.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp.to_vec().unwrap_or_default();
    };
    resp.add_query(q.clone());
    let name = q.name().clone();
    let first = name.to_ascii().to_ascii_lowercase();
    if first.starts_with("nx") {
        resp.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("admin.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            30,
        );
        resp.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            30,
            RData::SOA(soa),
        ));
    } else if first.starts_with("big") && q.query_type() == RecordType::A {
        for i in 0..100u8 {
            resp.add_answer(Record::from_rdata(
                name.clone(),
                300,
                RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
            ));
        }
    } else if q.query_type() == RecordType::A {
        resp.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
    } else if q.query_type() == RecordType::AAAA {
        resp.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        ));
    }
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        resp.set_edns(e);
    }
    let bytes = resp.to_vec().unwrap_or_default();
    if let Some(limit) = max_payload
        && bytes.len() > usize::from(limit)
    {
        let mut tc = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        tc.metadata.truncation = true;
        tc.metadata.recursion_available = true;
        tc.add_query(q.clone());
        return tc.to_vec().unwrap_or_default();
    }
    bytes
}

impl Upstream {
    pub fn start() -> Upstream {
        // UDP picks the port; TCP must get the same number, which another
        // test may hold: retry with a fresh UDP port.
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind upstream udp");
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr) {
                Ok(tcp) => return Self::start_on(udp, tcp),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind upstream tcp: {e}"),
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    /// Serve on already-bound sockets (e.g. bound inside a netns).
    pub fn start_on(udp: UdpSocket, tcp: TcpListener) -> Upstream {
        let addr = udp.local_addr().unwrap();
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        {
            let (count, names, stop) = (udp_queries.clone(), names.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, src)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(req) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Some(q) = req.queries.first() {
                        names.lock().unwrap().push(q.name().to_ascii());
                    }
                    let payload = req.edns.as_ref().map_or(512, |e| e.max_payload().max(512));
                    let _ = udp.send_to(&answer_for(&req, Some(payload)), src);
                }
            });
        }
        tcp.set_nonblocking(true).unwrap();
        {
            let (count, names, stop) = (tcp_queries.clone(), names.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut buf).is_err() {
                        continue;
                    }
                    let Ok(req) = Message::from_vec(&buf) else {
                        continue;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Some(q) = req.queries.first() {
                        names.lock().unwrap().push(q.name().to_ascii());
                    }
                    let out = answer_for(&req, None);
                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    let _ = s.write_all(&framed);
                }
            });
        }
        Upstream {
            addr,
            udp_queries,
            tcp_queries,
            names,
            stop,
        }
    }

    pub fn total(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
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
