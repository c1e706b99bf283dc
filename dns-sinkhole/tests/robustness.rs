//! Malformed packets, the exfiltration guard, PDP outages and the audit
//! spool, against the real binary.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{Sinkhole, Upstream, dig, header, name_wire, random_label, udp_query, udp_raw};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

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
        "*.tunnel.test",
    ];
    args.extend_from_slice(extra);
    Sinkhole::spawn(&args)
}

fn question(name: &[&[u8]]) -> Vec<u8> {
    let mut q = name_wire(name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn rcode_of(raw: &[u8]) -> u8 {
    raw[3] & 0x0F
}

const FORMERR: u8 = 1;

#[test]
fn malformed_packets_get_formerr_and_are_never_forwarded() {
    let up = Upstream::start();
    let mut s = start(&up, &[]);
    let wait = Duration::from_secs(2);

    // qdcount 0.
    let r = udp_raw(s.addr, &header(1, 0x0100, 0, 0, 0, 0), wait).expect("answer to qdcount 0");
    assert_eq!(rcode_of(&r), FORMERR);
    // qdcount 2 (both names allowed: still never forwarded).
    let mut p = header(2, 0x0100, 2, 0, 0, 0);
    p.extend(question(&[b"allowed", b"test"]));
    p.extend(question(&[b"allowed", b"test"]));
    let r = udp_raw(s.addr, &p, wait).expect("answer to qdcount 2");
    assert_eq!(rcode_of(&r), FORMERR);
    // Compression loop: the question name points at itself.
    let mut p = header(3, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    let r = udp_raw(s.addr, &p, wait).expect("answer to compression loop");
    assert_eq!(rcode_of(&r), FORMERR);
    // Two pointers pointing at each other.
    let mut p = header(4, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[1, b'a', 0xC0, 14, 0xC0, 12, 0, 1, 0, 1]);
    let r = udp_raw(s.addr, &p, wait).expect("answer to pointer cycle");
    assert_eq!(rcode_of(&r), FORMERR);
    // Name longer than 255 bytes.
    let label = [b'a'; 63];
    let mut p = header(5, 0x0100, 1, 0, 0, 0);
    p.extend(question(&[&label, &label, &label, &label, &label, b"test"]));
    let r = udp_raw(s.addr, &p, wait).expect("answer to oversized name");
    assert_eq!(rcode_of(&r), FORMERR);
    // Reserved label type (0x40) in place of a label length.
    let mut p = header(6, 0x0100, 1, 0, 0, 0);
    p.extend_from_slice(&[0x41, b'a', 0, 0, 1, 0, 1]);
    let r = udp_raw(s.addr, &p, wait).expect("answer to bad label type");
    assert_eq!(rcode_of(&r), FORMERR);
    // Oversized datagram: a valid query followed by 60 kB of junk claiming
    // to be thousands of additional records.
    let mut p = header(7, 0x0100, 1, 0, 0, 0xFFFF);
    p.extend(question(&[b"allowed", b"test"]));
    p.extend(std::iter::repeat_n(0xAB, 60_000));
    let r = udp_raw(s.addr, &p, wait).expect("answer to oversized datagram");
    assert_eq!(rcode_of(&r), FORMERR);
    // A response (QR=1) is never answered (no reflection).
    let mut p = header(8, 0x8100, 1, 0, 0, 0);
    p.extend(question(&[b"allowed", b"test"]));
    assert!(udp_raw(s.addr, &p, Duration::from_millis(300)).is_none());
    // Shorter than a header: dropped.
    assert!(udp_raw(s.addr, &[1, 2, 3], Duration::from_millis(300)).is_none());
    // Unsupported opcode (UPDATE) ⇒ NOTIMP; zone transfer ⇒ REFUSED.
    let mut p = header(9, 0x2800, 1, 0, 0, 0);
    p.extend(question(&[b"allowed", b"test"]));
    let r = udp_raw(s.addr, &p, wait).expect("answer to UPDATE");
    assert_eq!(rcode_of(&r), 4);
    let mut p = header(10, 0x0100, 1, 0, 0, 0);
    let mut q = question(&[b"allowed", b"test"]);
    let n = q.len();
    q[n - 3] = 252; // AXFR
    p.extend(q);
    let r = udp_raw(s.addr, &p, wait).expect("answer to AXFR");
    assert_eq!(rcode_of(&r), 5);

    // TCP: garbage frame, then a length prefix promising more than is sent.
    let mut t = TcpStream::connect(s.addr).unwrap();
    t.write_all(&[0, 5, 1, 2, 3, 4, 5]).unwrap();
    t.write_all(&[0xFF, 0xFF, 1, 2]).unwrap();
    drop(t);

    // Fuzzed bytes: 400 random datagrams, some starting with a plausible
    // query header. None may crash the sinkhole or reach the upstream.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..700),
    );
    runner
        .run(&strategy, |(with_header, body)| {
            let mut pkt = if with_header {
                header(0x77, 0x0100, 1, 0, 0, 0)
            } else {
                Vec::new()
            };
            pkt.extend(body);
            sock.send_to(&pkt, s.addr)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok(())
        })
        .unwrap();

    // Still alive and still answering correctly.
    let m = udp_query(s.addr, "allowed.test.", RecordType::A).expect("alive after fuzzing");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(s.is_running());
    assert_eq!(
        up.total(),
        1,
        "only the final valid query may be forwarded: {:?}",
        up.names.lock().unwrap()
    );
}

#[test]
fn tunnelling_is_cut_after_the_budget_normal_names_unaffected() {
    let up = Upstream::start();
    let s = start(&up, &[]);
    // Normal traffic before the tunnel.
    for n in ["www", "api", "cdn"] {
        let m = udp_query(s.addr, &format!("{n}.tunnel.test."), RecordType::A).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    }
    let before = up.total();
    let mut allowed = 0;
    let mut denied = 0;
    for i in 0..60u64 {
        let name = format!(
            "{}.{}.tunnel.test.",
            random_label(i, 60),
            random_label(i + 500, 50)
        );
        let m = udp_query(s.addr, &name, RecordType::A).unwrap();
        match m.metadata.response_code {
            ResponseCode::NoError => {
                assert_eq!(denied, 0, "allowed again after being cut off");
                allowed += 1;
            }
            ResponseCode::NXDomain => denied += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (3..=25).contains(&allowed),
        "tunnel allowed {allowed} names"
    );
    assert_eq!(allowed + denied, 60);
    // Exactly the allowed tunnel names reached the upstream.
    assert_eq!(up.total() - before, allowed);
    // Normal names to the same domain: seen and new ones keep working.
    for n in ["www", "api", "mail", "static"] {
        let d = dig(s.addr, &format!("{n}.tunnel.test"), "A", &[]);
        assert_eq!(d.status, "NOERROR", "{n}: {}", d.stdout);
        assert_eq!(d.answers, vec!["192.0.2.1"]);
    }
}

#[test]
fn pdp_unreachable_or_hanging_sinkholes_promptly() {
    let up = Upstream::start();
    let upstream = up.addr.to_string();
    // Closed port: connection refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // A "PDP" that accepts TCP and never speaks HTTP/2.
    let hanging = TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hanging.incoming().take(64) {
            held.push(c);
        }
    });
    for pdp in [closed, hanging_addr] {
        let url = format!("http://{pdp}");
        let s = Sinkhole::spawn(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--pdp",
            &url,
            "--pdp-timeout-ms",
            "50",
        ]);
        for name in ["allowed.test", "anything.test", "big.tunnel.test"] {
            let t0 = Instant::now();
            let d = dig(s.addr, name, "A", &[]);
            let took = t0.elapsed();
            assert_eq!(d.status, "NXDOMAIN", "{pdp} {name}: {}", d.stdout);
            assert!(
                took < Duration::from_millis(1500),
                "{pdp}: answer took {took:?}"
            );
        }
        // Many in parallel: all sinkholed, none forwarded.
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let addr = s.addr;
                std::thread::spawn(move || {
                    udp_query(addr, &format!("h{i}.allowed.test."), RecordType::A)
                        .map(|m| m.metadata.response_code)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), Some(ResponseCode::NXDomain));
        }
    }
    assert_eq!(up.total(), 0);
}

#[test]
fn one_audit_record_per_query_in_the_spool() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_string();
    let mut s = start(&up, &["--spool-dir", &spool_s, "--workload", "agent-7"]);
    let mut expect = Vec::new();
    for (name, rc) in [
        ("allowed.test.", ResponseCode::NoError),
        ("evil.test.", ResponseCode::NXDomain),
        ("allowed.test.", ResponseCode::NoError),
        ("x.tunnel.test.", ResponseCode::NoError),
    ] {
        let m = udp_query(s.addr, name, RecordType::A).unwrap();
        assert_eq!(m.metadata.response_code, rc, "{name}");
        expect.push(name.trim_end_matches('.').to_string());
    }
    // A tunnel until the guard bites, to see the exfil reason audited.
    let mut cut = false;
    for i in 0..40u64 {
        let name = format!(
            "{}.{}.tunnel.test",
            random_label(i, 60),
            random_label(i + 99, 60)
        );
        let m = udp_query(s.addr, &format!("{name}."), RecordType::A).unwrap();
        expect.push(name);
        if m.metadata.response_code == ResponseCode::NXDomain {
            cut = true;
            break;
        }
    }
    assert!(cut);
    // qdcount 0 is audited too (malformed_request).
    let r = udp_raw(
        s.addr,
        &header(1, 0x0100, 0, 0, 0, 0),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(rcode_of(&r), FORMERR);
    expect.push(String::new());
    let _ = s.child.kill();
    let _ = s.child.wait();

    let sp = secureops_pep::AuditSpool::open(&spool, secureops_pep::SpoolLimits::default())
        .expect("open spool");
    let recs = sp.unacked_after(0, 10_000);
    let hosts: Vec<String> = recs
        .iter()
        .map(|r| {
            r.finding
                .as_ref()
                .map(|f| f.host.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(hosts, expect, "one record per query, in order");
    let f = |i: usize| recs[i].finding.clone().unwrap();
    assert_eq!(f(0).pep_kind, "dns");
    assert_eq!(f(0).workload_id, "agent-7");
    assert_eq!(f(0).port, 53);
    // Attributed to the process that sent the query: this test.
    assert_eq!(f(0).pid, std::process::id());
    assert!(f(0).process_start_time > 0);
    assert!(!f(0).exe.is_empty());
    assert_eq!(f(0).host_source, secureops_pep::HostSource::DnsQuery as i32);
    assert_eq!(f(0).decision, secureops_proto::v1::Verdict::Allow as i32);
    assert_eq!(f(1).decision, secureops_proto::v1::Verdict::Deny as i32);
    assert_eq!(f(1).reason, "not_in_allowlist");
    let last_tunnel = f(recs.len() - 2);
    assert_eq!(last_tunnel.reason, "dns_exfil_budget");
    assert_eq!(
        last_tunnel.decision,
        secureops_proto::v1::Verdict::Deny as i32
    );
    assert_eq!(f(recs.len() - 1).fail_closed_cause, "malformed_request");
    // Request ids are unique.
    let mut ids: Vec<String> = recs
        .iter()
        .map(|r| r.finding.clone().unwrap().request_id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), recs.len());
}

#[test]
fn full_audit_spool_sinkholes_even_allowed_names() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let s = start(
        &up,
        &[
            "--spool-dir",
            spool.to_str().unwrap(),
            "--spool-max-records",
            "2",
        ],
    );
    for _ in 0..2 {
        let d = dig(s.addr, "allowed.test", "A", &[]);
        assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    }
    let forwarded = up.total();
    // No audit service acks: the spool is full, nothing can be recorded, so
    // nothing may be forwarded.
    for name in ["allowed.test", "new.tunnel.test"] {
        let d = dig(s.addr, name, "A", &[]);
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.stdout);
    }
    assert_eq!(up.total(), forwarded);
}

#[test]
fn unusable_spool_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    // The spool path is a regular file: the spool cannot be opened.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secureops-dns"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--spool-dir",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "must refuse to start without a usable spool"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("LISTENING"));
}

#[test]
fn async_deny_audit_still_records_every_query() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let mut s = start(
        &up,
        &["--spool-dir", spool.to_str().unwrap(), "--audit-async-deny"],
    );
    let names = ["evil1.test.", "evil2.test.", "evil3.test.", "allowed.test."];
    for name in names {
        udp_query(s.addr, name, RecordType::A).unwrap();
    }
    // The allowed query's record is durable before it was answered; the
    // spool commits in order, so the earlier deny records are too.
    let _ = s.child.kill();
    let _ = s.child.wait();
    let sp = secureops_pep::AuditSpool::open(&spool, secureops_pep::SpoolLimits::default())
        .expect("open spool");
    let hosts: Vec<String> = sp
        .unacked_after(0, 100)
        .iter()
        .map(|r| {
            r.finding
                .as_ref()
                .map(|f| f.host.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        hosts,
        ["evil1.test", "evil2.test", "evil3.test", "allowed.test"]
    );
    assert_eq!(up.total(), 1);
}
