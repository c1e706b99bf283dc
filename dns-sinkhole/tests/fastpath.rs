//! The UDP fast path against the hickory reference path: the same binary
//! started twice, once with the fast path (`--attribution false`, so every
//! plain query from any socket takes it) and once with
//! `--udp-fast-path false`; identical queries must get identical answers.
//! Plus real `dig` through the fast path, and its audit records.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Sinkhole, Upstream, dig, header, name_wire};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::Record;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn start(up: &Upstream, extra: &[&str]) -> Sinkhole {
    let upstream = up.addr.to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream.as_str(),
        "--allow",
        "allowed.test",
        "--allow",
        "*.wild.test",
        "--exfil-disable",
    ];
    args.extend_from_slice(extra);
    Sinkhole::spawn(&args)
}

/// Fast path (no attribution: no first-query /proc scan on the slow path)
/// and the hickory reference path, same upstream.
fn pair(up: &Upstream, extra: &[&str]) -> (Sinkhole, Sinkhole) {
    let mut f = vec!["--attribution", "false"];
    f.extend_from_slice(extra);
    let mut s = vec!["--attribution", "false", "--udp-fast-path", "false"];
    s.extend_from_slice(extra);
    (start(up, &f), start(up, &s))
}

/// One client socket; answers matched by id.
struct Client(UdpSocket);

impl Client {
    fn new() -> Client {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        Client(s)
    }

    fn ask(&self, server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        self.0.send_to(bytes, server).ok()?;
        let mut buf = [0u8; 65535];
        loop {
            let (n, from) = self.0.recv_from(&mut buf).ok()?;
            if from == server && n >= 2 && bytes.len() >= 2 && buf[..2] == bytes[..2] {
                return Some(buf[..n].to_vec());
            }
        }
    }

    /// Like `ask`, but a short wait: for datagrams that get no answer.
    fn ask_short(&self, server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        self.0
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let r = self.ask(server, bytes);
        self.0
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        r
    }
}

/// EDNS OPT record: payload, DO, raw options.
fn opt(payload: u16, dnssec_ok: bool, version: u8, options: &[u8]) -> Vec<u8> {
    let mut o = vec![0, 0, 41];
    o.extend_from_slice(&payload.to_be_bytes());
    o.extend_from_slice(&[0, version, if dnssec_ok { 0x80 } else { 0 }, 0]);
    o.extend_from_slice(&(options.len() as u16).to_be_bytes());
    o.extend_from_slice(options);
    o
}

/// What must agree between the two paths: everything but record TTLs,
/// which may differ by the cache age (±2 s).
fn comparable(raw: &[u8]) -> Result<(String, Vec<(String, u32)>), TestCaseError> {
    let m = Message::from_vec(raw).map_err(|e| TestCaseError::fail(format!("{e}: {raw:?}")))?;
    let rec = |r: &Record| {
        let mut r = r.clone();
        let ttl = r.ttl;
        r.ttl = 0;
        (r.to_string().to_ascii_lowercase(), ttl)
    };
    let mut records: Vec<(String, u32)> = m.answers.iter().map(rec).collect();
    records.push(("--".into(), 0));
    records.extend(m.authorities.iter().map(rec));
    records.push(("--".into(), 0));
    records.extend(m.additionals.iter().map(rec));
    let head = format!(
        "id={} flags={} rcode={:?} queries={:?} edns={:?}",
        m.metadata.id,
        m.metadata.flags(),
        m.metadata.response_code,
        m.queries
            .iter()
            .map(|q| format!("{} {:?} {:?}", q.name(), q.query_type(), q.query_class()))
            .collect::<Vec<_>>(),
        m.edns
            .as_ref()
            .map(|e| (e.max_payload(), e.version(), e.flags().dnssec_ok)),
    );
    Ok((head, records))
}

fn agree(fast: &[u8], slow: &[u8]) -> Result<(), TestCaseError> {
    let (fh, fr) = comparable(fast)?;
    let (sh, sr) = comparable(slow)?;
    prop_assert_eq!(&fh, &sh);
    prop_assert_eq!(fr.len(), sr.len(), "{:?} vs {:?}", fr, sr);
    for ((fs, ft), (ss, st)) in fr.iter().zip(sr.iter()) {
        prop_assert_eq!(fs, ss);
        prop_assert!(ft.abs_diff(*st) <= 2, "ttl {} vs {}", ft, st);
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Case {
    id: u16,
    labels: Vec<String>,
    zone: usize,
    qtype: u16,
    rd: bool,
    cd: bool,
    ad: bool,
    edns: Option<(u16, bool, bool)>,
}

const ZONES: [&[&str]; 6] = [
    &["wild", "test"],
    &["allowed", "test"],
    &["evil", "test"],
    &["test"],
    &["WILD", "Test"],
    &["nx", "wild", "test"],
];

fn case_bytes(c: &Case) -> Vec<u8> {
    let mut flags = 0u16;
    if c.rd {
        flags |= 0x0100;
    }
    if c.ad {
        flags |= 0x0020;
    }
    if c.cd {
        flags |= 0x0010;
    }
    let mut p = header(c.id, flags, 1, 0, 0, u16::from(c.edns.is_some()));
    let mut labels: Vec<&[u8]> = c.labels.iter().map(|l| l.as_bytes()).collect();
    if ZONES[c.zone] == ["allowed", "test"] {
        labels.clear(); // exact entry: no subdomains
    }
    labels.extend(ZONES[c.zone].iter().map(|l| l.as_bytes()));
    p.extend(name_wire(&labels));
    p.extend_from_slice(&c.qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if let Some((payload, dnssec_ok, cookie)) = c.edns {
        let options: &[u8] = if cookie {
            &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]
        } else {
            &[]
        };
        p.extend(opt(payload, dnssec_ok, 0, options));
    }
    p
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        any::<u16>(),
        proptest::collection::vec("[a-zA-Z0-9_-]{1,12}|nx[a-z]{1,4}|big", 0..3),
        0..ZONES.len(),
        prop_oneof![Just(1u16), Just(28), Just(16), Just(15), Just(5), Just(65)],
        any::<(bool, bool, bool)>(),
        proptest::option::of((
            prop_oneof![Just(0u16), Just(512), Just(1232), Just(4096), Just(65535)],
            any::<bool>(),
            any::<bool>(),
        )),
    )
        .prop_map(|(id, labels, zone, qtype, (rd, cd, ad), edns)| Case {
            id,
            labels,
            zone,
            qtype,
            rd,
            cd,
            ad,
            edns,
        })
}

#[test]
fn fast_path_and_hickory_path_agree_on_random_queries() {
    let up = Upstream::start();
    let (fast, slow) = pair(&up, &[]);
    let client = Client::new();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case_strategy(), |c| {
            let bytes = case_bytes(&c);
            // Twice: the second answer of an allowed name comes from the
            // answer cache (the fast path's wire form).
            for _ in 0..2 {
                let f = client
                    .ask(fast.addr, &bytes)
                    .ok_or_else(|| TestCaseError::fail(format!("no fast answer: {c:?}")))?;
                let s = client
                    .ask(slow.addr, &bytes)
                    .ok_or_else(|| TestCaseError::fail(format!("no slow answer: {c:?}")))?;
                agree(&f, &s).map_err(|e| TestCaseError::fail(format!("{c:?}: {e}")))?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn sinkhole_answer_modes_agree() {
    for mode in ["nxdomain", "refused", "nodata", "zero"] {
        let up = Upstream::start();
        let (fast, slow) = pair(&up, &["--sinkhole-answer", mode]);
        let client = Client::new();
        for (i, qtype) in [1u16, 28, 16].into_iter().enumerate() {
            for edns in [None, Some(opt(1232, true, 0, &[]))] {
                let mut p = header(100 + i as u16, 0x0100, 1, 0, 0, u16::from(edns.is_some()));
                p.extend(name_wire(&[b"Denied", b"example"]));
                p.extend_from_slice(&qtype.to_be_bytes());
                p.extend_from_slice(&[0, 1]);
                p.extend(edns.unwrap_or_default());
                let f = client.ask(fast.addr, &p).expect("fast answer");
                let s = client.ask(slow.addr, &p).expect("slow answer");
                agree(&f, &s).unwrap_or_else(|e| panic!("{mode} qtype {qtype}: {e}"));
            }
        }
        assert_eq!(
            up.total(),
            0,
            "{mode}: a sinkholed name reached the upstream"
        );
    }
}

/// Malformed or unusual datagrams: the fast path hands them to the hickory
/// path, so the answer (or the silence) is exactly the reference's.
#[test]
fn malformed_and_unusual_packets_get_the_reference_answer() {
    let up = Upstream::start();
    let (mut fast, slow) = pair(&up, &[]);
    let client = Client::new();
    let allowed = name_wire(&[b"allowed", b"test"]);
    let q = |id: u16, flags: u16, qd: u16, ar: u16, body: &[u8]| {
        let mut p = header(id, flags, qd, 0, 0, ar);
        p.extend_from_slice(body);
        p
    };
    let with_type = |name: &[u8], t: u16| {
        let mut b = name.to_vec();
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(&[0, 1]);
        b
    };
    let a_allowed = with_type(&allowed, 1);
    let l63 = [b'a'; 63];
    let long_name = name_wire(&[&l63, &l63, &l63, &l63, b"test"]);
    let mut label_overflow = vec![40u8, b'a', b'b'];
    label_overflow.extend_from_slice(&[0, 1, 0, 1]);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated header", vec![0x12, 0x34, 1, 0, 0, 1, 0]),
        ("header only, qdcount 1", header(1, 0x0100, 1, 0, 0, 0)),
        ("qdcount 0", header(2, 0x0100, 0, 0, 0, 0)),
        ("qdcount 2", {
            let mut b = a_allowed.clone();
            b.extend_from_slice(&a_allowed);
            q(3, 0x0100, 2, 0, &b)
        }),
        ("label length overflow", q(4, 0x0100, 1, 0, &label_overflow)),
        (
            "compression pointer in the question",
            q(5, 0x0100, 1, 0, &[0xC0, 12, 0, 1, 0, 1]),
        ),
        (
            "pointer after a label",
            q(6, 0x0100, 1, 0, &[1, b'a', 0xC0, 12, 0, 1, 0, 1]),
        ),
        (
            "reserved label type",
            q(7, 0x0100, 1, 0, &[0x41, b'a', 0, 0, 1, 0, 1]),
        ),
        (
            "name longer than 255 bytes",
            q(8, 0x0100, 1, 0, &with_type(&long_name, 1)),
        ),
        ("root name", q(9, 0x0100, 1, 0, &with_type(&[0], 1))),
        ("UPDATE opcode", q(10, 0x2800, 1, 0, &a_allowed)),
        ("AXFR", q(11, 0x0100, 1, 0, &with_type(&allowed, 252))),
        ("ANY", q(12, 0x0100, 1, 0, &with_type(&allowed, 255))),
        ("response bit", q(13, 0x8100, 1, 0, &a_allowed)),
        ("trailing junk", {
            let mut b = a_allowed.clone();
            b.extend_from_slice(&[0xAB; 7]);
            q(14, 0x0100, 1, 0, &b)
        }),
        ("EDNS version 1", {
            let mut b = a_allowed.clone();
            b.extend(opt(1232, false, 1, &[]));
            q(15, 0x0100, 1, 1, &b)
        }),
        ("EDNS NSID option", {
            let mut b = a_allowed.clone();
            b.extend(opt(1232, false, 0, &[0, 3, 0, 0]));
            q(16, 0x0100, 1, 1, &b)
        }),
        ("EDNS option overrunning rdata", {
            let mut b = a_allowed.clone();
            b.extend(opt(1232, false, 0, &[0, 10, 0, 20, 1, 2]));
            q(17, 0x0100, 1, 1, &b)
        }),
        ("arcount 2", {
            let mut b = a_allowed.clone();
            b.extend(opt(1232, false, 0, &[]));
            b.extend(opt(1232, false, 0, &[]));
            q(18, 0x0100, 1, 2, &b)
        }),
        ("IDNA name", {
            let n = name_wire(&[b"xn--bcher-kva", b"example"]);
            q(19, 0x0100, 1, 0, &with_type(&n, 1))
        }),
        ("IP spelling", {
            let n = name_wire(&[b"127", b"0", b"0", b"1"]);
            q(20, 0x0100, 1, 0, &with_type(&n, 1))
        }),
        ("odd bytes in a label", {
            let n = name_wire(&[b"a b", b"wild", b"test"]);
            q(21, 0x0100, 1, 0, &with_type(&n, 1))
        }),
        ("CHAOS class", {
            let mut b = allowed.clone();
            b.extend_from_slice(&[0, 16, 0, 3]);
            q(22, 0x0100, 1, 0, &b)
        }),
        ("ancount 1", {
            let mut p = header(23, 0x0100, 1, 1, 0, 0);
            p.extend_from_slice(&a_allowed);
            p
        }),
    ];
    // Huge datagram (valid question + 60 kB of junk "additionals").
    let mut huge = header(24, 0x0100, 1, 0, 0, 0xFFFF);
    huge.extend_from_slice(&a_allowed);
    huge.extend(std::iter::repeat_n(0xAB, 60_000));
    cases.push(("oversized datagram", huge));

    for (what, bytes) in &cases {
        let f = client.ask_short(fast.addr, bytes);
        let s = client.ask_short(slow.addr, bytes);
        match (&f, &s) {
            (None, None) => {}
            (Some(f), Some(s)) => match (Message::from_vec(f), Message::from_vec(s)) {
                (Ok(_), Ok(_)) => agree(f, s).unwrap_or_else(|e| panic!("{what}: {e}")),
                _ => assert_eq!(f, s, "{what}: raw answers differ"),
            },
            _ => panic!("{what}: fast {f:?} vs slow {s:?}"),
        }
    }
    assert!(fast.is_running());
    // Only a plain allowed name can ever reach the upstream.
    let names = up.names.lock().unwrap().clone();
    assert!(
        names
            .iter()
            .all(|n| n.eq_ignore_ascii_case("allowed.test.")),
        "{names:?}"
    );
}

#[test]
fn dig_through_the_fast_path() {
    let up = Upstream::start();
    let s = start(
        &up,
        &["--attribution", "false", "--metrics-listen", "127.0.0.1:0"],
    );
    // dig sends EDNS with a COOKIE option: plain for the fast path.
    for extra in [&[][..], &["+nocookie"], &["+dnssec"], &["+noedns"]] {
        let d = dig(s.addr, "allowed.test", "A", extra);
        assert_eq!(d.status, "NOERROR", "{}", d.stdout);
        assert_eq!(d.answers, vec!["192.0.2.1"], "{}", d.stdout);
        assert!(d.flags.contains("ra"), "{}", d.stdout);
        let d = dig(s.addr, "Www.Wild.Test", "AAAA", extra);
        assert_eq!(d.answers, vec!["2001:db8::1"], "{}", d.stdout);
        let d = dig(s.addr, "evil.test", "A", extra);
        assert_eq!(d.status, "NXDOMAIN", "{}", d.stdout);
        assert!(d.answers.is_empty(), "{}", d.stdout);
    }
    // Cached answers came from the wire cache of the fast path; the
    // upstream saw each (name, type, DO) once and never the denied name.
    let names = up.names.lock().unwrap().clone();
    assert!(!names.iter().any(|n| n.contains("evil")), "{names:?}");
    assert!(up.total() <= 4, "{names:?}");
    let metrics = s.metrics.expect("metrics");
    let body = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(metrics).unwrap();
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let hits: f64 = body
        .lines()
        .find(|l| l.starts_with("secureops_dns_cache_hits_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("cache hits metric");
    assert!(hits >= 4.0, "{body}");
    assert!(body.contains(r#"decision="deny",cause="policy",transport="udp""#));
}

/// Fast-path queries are audited exactly once each, attributed through the
/// per-socket memo (the first query of the socket takes the hickory path and
/// its /proc scan; the rest take the fast path).
#[test]
fn fast_path_audits_every_query_once_with_its_process() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_string();
    let mut s = start(&up, &["--spool-dir", &spool_s, "--workload", "agent-9"]);
    let client = Client::new();
    let mut expect = Vec::new();
    for i in 0..60u16 {
        let (labels, rc): (&[&[u8]], _) = match i % 3 {
            0 => (&[b"allowed", b"test"], ResponseCode::NoError),
            1 => (&[b"evil", b"test"], ResponseCode::NXDomain),
            _ => (&[b"x", b"wild", b"test"], ResponseCode::NoError),
        };
        let mut p = header(1000 + i, 0x0100, 1, 0, 0, 0);
        p.extend(name_wire(labels));
        p.extend_from_slice(&[0, 1, 0, 1]);
        let r = client.ask(s.addr, &p).expect("answer");
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.response_code, rc, "query {i}");
        let host: Vec<String> = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        expect.push(host.join("."));
    }
    let _ = s.child.kill();
    let _ = s.child.wait();
    let sp = secureops_pep::AuditSpool::open(&spool, secureops_pep::SpoolLimits::default())
        .expect("open spool");
    let recs: Vec<_> = sp
        .unacked_after(0, 10_000)
        .into_iter()
        .map(|r| r.finding.unwrap())
        .collect();
    let hosts: Vec<String> = recs.iter().map(|f| f.host.clone()).collect();
    assert_eq!(hosts, expect, "one record per query, in order");
    for f in &recs {
        assert_eq!(f.pid, std::process::id(), "{f:?}");
        assert!(!f.exe.is_empty(), "{f:?}");
        assert!(f.process_start_time > 0);
        assert_eq!(f.workload_id, "agent-9");
        assert_eq!(f.pep_kind, "dns");
        assert_eq!(f.port, 53);
    }
    let mut ids: Vec<&str> = recs.iter().map(|f| f.request_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), recs.len());
    // Records are recycled between batches (their string buffers reused):
    // allowed and denied queries alternate, so a field left over from the
    // previous query's record would show here.
    for (i, f) in recs.iter().enumerate() {
        let (reason, decision) = if i % 3 == 1 {
            ("not_in_allowlist", secureops_pep::Decision::Deny)
        } else {
            ("allowlist", secureops_pep::Decision::Allow)
        };
        assert_eq!(f.reason, reason, "record {i}: {f:?}");
        assert_eq!(f.decision, decision.to_proto() as i32, "record {i}: {f:?}");
        assert!(
            f.rule_id.is_empty() && f.fail_closed_cause.is_empty(),
            "{f:?}"
        );
        assert!(f.dialled_ip.is_empty() && f.trace_id.is_empty(), "{f:?}");
        assert!(f.request_id.starts_with("dns-"), "{f:?}");
    }
}

/// A full spool on the fast path: the batch write fails, so every query of
/// the batch is sinkholed (allowed ones included, counted as fail_closed)
/// and nothing is forwarded.
#[test]
fn full_spool_sinkholes_fast_path_queries() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_string();
    let s = start(
        &up,
        &[
            "--attribution",
            "false",
            "--spool-dir",
            &spool_s,
            "--spool-max-records",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let client = Client::new();
    let ask = |id: u16, labels: &[&[u8]]| {
        let mut p = header(id, 0x0100, 1, 0, 0, 0);
        p.extend(name_wire(labels));
        p.extend_from_slice(&[0, 1, 0, 1]);
        let r = client.ask(s.addr, &p).expect("answer");
        Message::from_vec(&r).unwrap().metadata.response_code
    };
    for id in 0..2 {
        assert_eq!(ask(id, &[b"allowed", b"test"]), ResponseCode::NoError);
    }
    let forwarded = up.total();
    for (id, labels) in [
        (10, &[&b"allowed"[..], b"test"][..]),
        (11, &[b"new", b"wild", b"test"]),
        (12, &[b"evil", b"test"]),
    ] {
        assert_eq!(ask(id, labels), ResponseCode::NXDomain, "{labels:?}");
    }
    assert_eq!(up.total(), forwarded, "forwarded without an audit record");
    let body = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(s.metrics.expect("metrics")).unwrap();
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let failures: f64 = body
        .lines()
        .find(|l| l.starts_with("secureops_dns_audit_failures_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("audit failures metric");
    assert_eq!(failures, 3.0, "{body}");
    assert!(
        body.contains(r#"decision="deny",cause="fail_closed",transport="udp"} 2"#),
        "{body}"
    );
}
