//! Fail closed end to end: kill the PDP (kill -9) → new connections through
//! the real proxy are denied promptly; restart it on the same address →
//! allowed again, without touching the proxy.

use std::time::{Duration, Instant};

use secureops_e2e::*;

#[test]
fn pdp_killed_then_restarted() {
    if !have_command("curl") {
        skip!("curl is not installed");
    }
    let tls = match TlsServer::start(&["allowed.test"]) {
        Ok(t) => t,
        Err(e) => skip!("no TLS server: {e}"),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let policy = write(
        tmp.path(),
        "p.yaml",
        &format!(
            "version: 1\ndefault: deny\nresolved_ip_allow: [127.0.0.0/8]\negress_allowlist:\n  - allowed.test:{}\n",
            tls.port
        ),
    );
    let pdp_args = |listen: &str| {
        PdpArgs::new(tmp.path().join("pdp"))
            .listen(listen)
            .policy(&policy)
            .build()
    };
    let mut pdp = Service::spawn(
        bin_path("secureops-pdp"),
        pdp_args("127.0.0.1:0"),
        &["grpc"],
    )
    .expect("pdp starts");
    let pdp_addr = pdp.addr("grpc");
    let proxy = Service::spawn(
        bin_path("secureops-proxy"),
        [
            "--listen",
            "127.0.0.1:0",
            "--pdp",
            &pdp.url("grpc"),
            "--spool-dir",
            &tmp.path().join("spool").display().to_string(),
            "--resolve",
            "allowed.test=127.0.0.1",
        ],
        &["proxy"],
    )
    .expect("proxy starts");
    let proxy_url = proxy.url("proxy");
    let ca = tls.ca_file.display().to_string();
    let url = format!("https://allowed.test:{}/", tls.port);
    let get = || curl(&["-x", &proxy_url, "--cacert", &ca, &url]);

    let ok = get();
    assert_eq!(
        ok.http,
        "200",
        "allowed while the PDP is up: {ok:?}\n{}",
        proxy.stderr_text()
    );

    pdp.kill9();
    let t = Instant::now();
    let denied = get();
    let took = t.elapsed();
    assert_ne!(denied.http, "200", "PDP down must deny: {denied:?}");
    assert!(
        denied.stderr.contains("403") || denied.http == "403",
        "PDP down answers 403: {denied:?}"
    );
    // The PDP client's connect timeout is 200 ms and its deadline 50 ms: the
    // deny must come promptly, not after curl's own timeout.
    assert!(took < Duration::from_secs(3), "deny took {took:?}");

    let _pdp2 = Service::spawn(
        bin_path("secureops-pdp"),
        pdp_args(&pdp_addr.to_string()),
        &["grpc"],
    )
    .expect("pdp restarts on the same address");
    let back = wait_for(Duration::from_secs(15), || {
        let c = get();
        (c.http == "200").then_some(c)
    });
    assert!(
        back.is_some(),
        "allowed again after the PDP came back:\n{}",
        proxy.stderr_text()
    );
}
