//! The real binary against the real `dig` and a counting test upstream.

mod common;

use common::{Sinkhole, Upstream, dig};

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
    ];
    args.extend_from_slice(extra);
    Sinkhole::spawn(&args)
}

#[test]
fn allowed_name_returns_the_upstream_answer() {
    let up = Upstream::start();
    let s = start(&up, &[]);
    let d = dig(s.addr, "allowed.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers, vec!["192.0.2.1"], "{}", d.stdout);
    assert!(d.flags.contains("ra"), "{}", d.stdout);
    assert_eq!(up.total(), 1);
    // Case and the trailing dot do not matter; wildcard subdomains work.
    let d = dig(s.addr, "WWW.Wild.Test.", "AAAA", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers, vec!["2001:db8::1"], "{}", d.stdout);
    // Upstream NXDOMAIN is passed through as such.
    let d = dig(s.addr, "nxname.wild.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.stdout);
    assert_eq!(up.total(), 3);
    // Second lookup of a cached answer: same answer, no new upstream query.
    let d = dig(s.addr, "allowed.test", "A", &[]);
    assert_eq!(d.answers, vec!["192.0.2.1"], "{}", d.stdout);
    assert_eq!(up.total(), 3);
    // Over TCP too.
    let d = dig(s.addr, "tcp.wild.test", "A", &["+tcp"]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers, vec!["192.0.2.1"], "{}", d.stdout);
    assert!(d.stdout.contains("(TCP)"), "{}", d.stdout);
}

#[test]
fn denied_names_are_sinkholed_and_never_forwarded() {
    let up = Upstream::start();
    let s = start(&up, &[]);
    for name in [
        "evil.test",
        "wild.test",         // the apex is not matched by *.wild.test
        "allowed.test.evil", // suffix tricks
        "evilallowed.test",
        "x.evilwild.test",
        "127.0.0.1", // IP spellings are never host names
    ] {
        let d = dig(s.addr, name, "A", &[]);
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.stdout);
        assert!(d.answers.is_empty(), "{name}: {}", d.stdout);
        let d = dig(s.addr, name, "A", &["+tcp"]);
        assert_eq!(d.status, "NXDOMAIN", "{name} over tcp: {}", d.stdout);
    }
    assert_eq!(
        up.total(),
        0,
        "denied names reached the upstream: {:?}",
        up.names.lock().unwrap()
    );
}

#[test]
fn sinkhole_answer_flag() {
    let up = Upstream::start();
    let s = start(&up, &["--sinkhole-answer", "zero"]);
    let d = dig(s.addr, "evil.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers, vec!["0.0.0.0"], "{}", d.stdout);
    let d = dig(s.addr, "evil.test", "AAAA", &[]);
    assert_eq!(d.answers, vec!["::"], "{}", d.stdout);
    let d = dig(s.addr, "evil.test", "TXT", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert!(d.answers.is_empty(), "{}", d.stdout);
    drop(s);
    let s = start(&up, &["--sinkhole-answer", "refused"]);
    assert_eq!(dig(s.addr, "evil.test", "A", &[]).status, "REFUSED");
    drop(s);
    let s = start(&up, &["--sinkhole-answer", "nodata"]);
    let d = dig(s.addr, "evil.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert!(d.answers.is_empty(), "{}", d.stdout);
    assert_eq!(up.total(), 0);
}

#[test]
fn truncated_udp_answer_is_retried_over_tcp() {
    let up = Upstream::start();
    let s = start(&up, &[]);
    // 100 A records do not fit dig's 1232-byte EDNS buffer: the sinkhole
    // gets TC from the upstream over UDP, re-asks over TCP, answers dig with
    // TC over UDP, and dig (no +notcp) retries over TCP.
    let d = dig(s.addr, "big.wild.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers.len(), 100, "{}", d.stdout);
    assert!(
        d.stdout.contains("(TCP)"),
        "dig did not retry over TCP: {}",
        d.stdout
    );
    assert!(up.tcp_queries.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // Without EDNS the client only takes 512 bytes: truncated, then TCP.
    let d = dig(s.addr, "big2.wild.test", "A", &["+noedns"]);
    assert_eq!(d.answers.len(), 100, "{}", d.stdout);
    // +notcp: the client sees the truncation itself.
    let d = dig(s.addr, "big3.wild.test", "A", &["+notcp", "+ignore"]);
    assert!(d.flags.contains("tc"), "{}", d.stdout);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn ops_endpoint_serves_metrics_and_readiness() {
    let up = Upstream::start();
    let s = start(&up, &["--metrics-listen", "127.0.0.1:0"]);
    let m = s.metrics.expect("LISTENING metrics line");
    assert_eq!(dig(s.addr, "allowed.test", "A", &[]).status, "NOERROR");
    assert_eq!(dig(s.addr, "evil.test", "A", &[]).status, "NXDOMAIN");
    let body = http_get(m, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(
            r#"secureops_dns_queries_total{decision="deny",cause="policy",transport="udp"} 1"#
        ),
        "{body}"
    );
    assert!(
        body.contains(
            r#"secureops_dns_queries_total{decision="allow",cause="policy",transport="udp"} 1"#
        ),
        "{body}"
    );
    assert!(body.contains("secureops_dns_forwarded_total 1"), "{body}");
    assert!(http_get(m, "/readyz").starts_with("HTTP/1.1 200"));
    assert!(http_get(m, "/healthz").starts_with("HTTP/1.1 200"));
}
