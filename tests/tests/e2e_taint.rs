//! Process context end to end (issue 6): real sensor (fanotify), real PDP,
//! real proxy, real curl. A shell reads a `.env` and then spawns curl to an
//! ALLOWED host: denied by the taint rule. A sibling curl that read nothing:
//! allowed. The same pattern after the `within` window: allowed.

use std::process::Command;
use std::time::Duration;

use secureops_e2e::*;

fn sh(script: &str) -> (i32, String, String) {
    match Command::new("sh").args(["-c", script]).output() {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => panic!("sh: {e}"),
    }
}

#[test]
fn credential_read_taints_the_reader_and_its_children() {
    if !is_root() {
        skip!("the fanotify sensor needs CAP_SYS_ADMIN (run as root)");
    }
    if !have_command("curl") {
        skip!("curl is not installed");
    }
    if !std::path::Path::new("/proc/sys/fs/fanotify").exists() {
        skip!("this kernel has no fanotify");
    }
    let tls = match TlsServer::start(&["allowed.test"]) {
        Ok(t) => t,
        Err(e) => skip!("no TLS server: {e}"),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let secrets = tmp.path().join("project");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    let env_file = write(&secrets, ".env", "AWS_SECRET_ACCESS_KEY=hunter2\n");
    let policy = write(
        tmp.path(),
        "p.yaml",
        &format!(
            "version: 1\ndefault: deny\nresolved_ip_allow: [127.0.0.0/8]\n\
             egress_allowlist:\n  - allowed.test:{}\n\
             rules:\n  - id: tainted-after-credential-read\n    action: deny\n    when:\n      \
             process_or_ancestor_opened: [\"**/.env*\"]\n      within: 3s\n",
            tls.port
        ),
    );
    let pdp = Service::spawn(
        bin_path("secureops-pdp"),
        PdpArgs::new(tmp.path().join("pdp")).policy(&policy).build(),
        &["grpc"],
    )
    .expect("pdp starts");
    let _sensor = match Service::spawn(
        bin_path("secureops-sensor"),
        [
            "--pdp",
            &pdp.url("grpc"),
            "--workload",
            "agent-1",
            "--mark-dir",
            &secrets.display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &["metrics"],
    ) {
        Ok(s) => s,
        Err(e) => skip!("the sensor could not start here: {e}"),
    };
    let proxy = Service::spawn(
        bin_path("secureops-proxy"),
        [
            "--listen",
            "127.0.0.1:0",
            "--pdp",
            &pdp.url("grpc"),
            "--workload",
            "agent-1",
            "--spool-dir",
            &tmp.path().join("spool").display().to_string(),
            "--resolve",
            "allowed.test=127.0.0.1",
        ],
        &["proxy"],
    )
    .expect("proxy starts");
    // The sensor holds sensitive opens until the PDP acked them and fails
    // them (EPERM) when it cannot: a successful read means it is connected.
    let env = env_file.display().to_string();
    let ready = wait_for(Duration::from_secs(10), || {
        (sh(&format!("cat {env} >/dev/null")).0 == 0).then_some(())
    });
    assert!(
        ready.is_some(),
        "the sensor never let a sensitive open through"
    );

    let curl_cmd = format!(
        "curl -sS -m 10 -o /dev/null -w '%{{http_code}}' -x {} --cacert {} https://allowed.test:{}/",
        proxy.url("proxy"),
        tls.ca_file.display(),
        tls.port
    );
    // The shell itself opens .env (redirection), then forks curl: curl's
    // parent is tainted, so curl is denied although the host is allowed.
    let (_, out, err) = sh(&format!("read x < {env}; {curl_cmd}; true"));
    assert!(
        !out.ends_with("200"),
        "tainted process reached an allowed host: {out} {err}"
    );
    assert!(
        err.contains("403") || out.contains("403"),
        "denied with 403: {out} {err}"
    );

    // A sibling that read nothing is allowed.
    let (_, out, err) = sh(&format!("{curl_cmd}; true"));
    assert!(
        out.ends_with("200"),
        "untainted sibling allowed: {out} {err}\n{}",
        proxy.stderr_text()
    );

    // After the window the same pattern is allowed again.
    let (_, out, err) = sh(&format!("read x < {env}; sleep 3.5; {curl_cmd}; true"));
    assert!(out.ends_with("200"), "allowed after `within`: {out} {err}");
}
