//! A fake upstream DNS server for the PEPs' integration tests: UDP and TCP
//! on one port, canned answers, and a record of every question, so a test
//! can prove what did (and did not) reach DNS.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// What A queries get unless the server was started with another address.
pub const DEFAULT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A tiny authoritative-for-everything upstream that counts what it gets.
///
/// * `big*`  names: 100 A records (≈1.7 kB): over UDP the answer is
///   truncated (TC, no records) when it does not fit the asker's payload.
/// * `nx*`   names: NXDOMAIN with an SOA.
/// * `nodata*` names: NOERROR with no records.
/// * `servfail*` / `refused*` names: SERVFAIL / REFUSED (a failing server).
/// * anything else: A 192.0.2.1 (or the address given to
///   [`FakeDns::answering`]) / AAAA 2001:db8::1, TTL 300.
///
/// Stops on drop.
pub struct FakeDns {
    pub addr: SocketAddr,
    /// Queries answered over UDP / TCP.
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    pub names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The answer to `req`: names starting with `nx` get NXDOMAIN (with an
/// SOA), `nodata` NOERROR without records, `servfail` / `refused` that
/// rcode, `big*` A queries 100 records (for truncation), other A queries
/// `v4`, AAAA queries `2001:db8::1`; `max_payload` set ⇒ a truncated (TC)
/// answer when it would not fit.
pub fn answer_for(req: &Message, max_payload: Option<u16>, v4: Ipv4Addr) -> Vec<u8> {
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
    } else if first.starts_with("nodata") {
        // NOERROR, no records.
    } else if first.starts_with("servfail") {
        resp.metadata.response_code = ResponseCode::ServFail;
    } else if first.starts_with("refused") {
        resp.metadata.response_code = ResponseCode::Refused;
    } else if first.starts_with("big") && q.query_type() == RecordType::A {
        for i in 0..100u8 {
            resp.add_answer(Record::from_rdata(
                name.clone(),
                300,
                RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
            ));
        }
    } else if q.query_type() == RecordType::A {
        resp.add_answer(Record::from_rdata(name.clone(), 300, RData::A(A(v4))));
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

impl FakeDns {
    /// On 127.0.0.1 (UDP and TCP, same port), answering A queries with
    /// `192.0.2.1`.
    pub fn start() -> FakeDns {
        Self::answering(DEFAULT_V4)
    }

    /// On 127.0.0.1, answering A queries with `v4` (e.g. a test server's
    /// loopback address, for a PEP that then dials the answer).
    pub fn answering(v4: Ipv4Addr) -> FakeDns {
        // UDP picks the port; TCP must get the same number, which another
        // test may hold: retry with a fresh UDP port.
        for _ in 0..50 {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("bind upstream udp");
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr) {
                Ok(tcp) => return Self::serve(udp, tcp, v4),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind upstream tcp: {e}"),
            }
        }
        panic!("no port free for both UDP and TCP");
    }

    /// Serve on already-bound sockets (e.g. bound inside a netns).
    pub fn start_on(udp: UdpSocket, tcp: TcpListener) -> FakeDns {
        Self::serve(udp, tcp, DEFAULT_V4)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener, v4: Ipv4Addr) -> FakeDns {
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
                    let _ = udp.send_to(&answer_for(&req, Some(payload), v4), src);
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
                    let out = answer_for(&req, None, v4);
                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    let _ = s.write_all(&framed);
                }
            });
        }
        FakeDns {
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

    /// Every question name asked so far, in order, without the root dot.
    pub fn asked(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.trim_end_matches('.').to_string())
            .collect()
    }
}
