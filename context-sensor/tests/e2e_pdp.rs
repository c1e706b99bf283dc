//! End to end with the real PDP (`secureops-pdp`, built by `cargo build
//! --bins`): the sensor reports a real child's open of a `.env`, and the
//! PDP's `Check` for that process is denied by the taint rule — including
//! when the Check is issued the instant the open returned (ordering), for
//! descendants, but not for siblings nor a reused PID; and a killed sensor
//! fails the workload closed with `require_sensor: true`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::{
    CheckRequest, CheckResponse, Destination, HostSource, ProcessInfo, ProcessRef, Transport,
    Verdict,
};
use secureops_test_support::{PdpArgs, Service};
use tonic::transport::Channel;

const POLICY: &str = r#"version: 1
mode: enforce
default: deny
require_sensor: true
egress_allowlist:
  - github.com
rules:
  - id: tainted-after-credential-read
    action: deny
    when:
      process_or_ancestor_opened: ["**/.env", "**/.aws/credentials"]
      within: 10m
"#;

const TOKEN: &str = "sensor-e2e-admin-token-0123456789";

macro_rules! require_env {
    () => {{
        if let Err(why) = fanotify_available() {
            eprintln!("SKIPPED: {why}");
            return;
        }
        let bin = secureops_test_support::bin_path("secureops-pdp");
        if !bin.exists() {
            eprintln!(
                "SKIPPED: {} not built (run `cargo build --bins` first)",
                bin.display()
            );
            return;
        }
        bin
    }};
}

struct Stack {
    _dir: tempfile::TempDir,
    pdp: Service,
    marked: PathBuf,
}

fn start_pdp(bin: &Path) -> Stack {
    let dir = tempfile::Builder::new()
        .prefix("sensor-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let marked = dir.path().join("work");
    std::fs::create_dir(&marked).unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let p = |n: &str| dir.path().join(n);
    let pdp = Service::spawn(
        bin,
        PdpArgs::new(p("data"))
            .admin_token_file(p("token"))
            .policy(p("policy.yaml"))
            .build(),
        &["grpc", "admin", "metrics"],
    )
    .expect("spawn pdp");
    Stack {
        _dir: dir,
        pdp,
        marked,
    }
}

fn start_sensor(stack: &Stack) -> Sensor {
    Sensor::start(&[
        "--pdp",
        &stack.pdp.url("grpc"),
        "--workload",
        "w",
        "--mark-dir",
        stack.marked.to_str().unwrap(),
        "--heartbeat-ms",
        "100",
        "--ack-timeout-ms",
        "2000",
    ])
}

fn check_req(pid: u32, start_time: u64, ancestors: &[(u32, u64)]) -> CheckRequest {
    CheckRequest {
        request_id: format!("e2e-{pid}"),
        workload_id: "w".into(),
        process: Some(ProcessInfo {
            pid,
            start_time,
            exe: "/usr/bin/curl".into(),
            argv: vec!["curl".into()],
            uid: 0,
            ancestors: ancestors
                .iter()
                .map(|&(pid, start_time)| ProcessRef {
                    pid,
                    start_time,
                    exe: String::new(),
                })
                .collect(),
        }),
        destination: Some(Destination {
            host: "github.com".into(),
            port: 443,
            ip: String::new(),
            resolved_ips: Vec::new(),
        }),
        host_source: HostSource::Connect as i32,
        transport: Transport::Tcp as i32,
        pep_id: "sensor-e2e".into(),
    }
}

async fn check(c: &mut PolicyDecisionClient<Channel>, r: CheckRequest) -> CheckResponse {
    c.check(r).await.expect("check rpc").into_inner()
}

fn is_allow(r: &CheckResponse) -> bool {
    r.decision == Verdict::Allow as i32
}

fn start_time_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A shell that opens `path` (fd 3), prints its pid once `open()` returned,
/// and stays alive until its stdin closes.
struct Opener {
    child: std::process::Child,
    pid: u32,
    start_time: u64,
}

impl Opener {
    fn spawn(path: &Path) -> Opener {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "exec 3< \"$1\" || exit 1; echo $$; read x", "sh"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line.trim().parse().expect("opener failed to open");
        let start_time = start_time_of(pid);
        Opener {
            child,
            pid,
            start_time,
        }
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_sensor_connected(s: &Sensor) {
    eventually(Duration::from_secs(10), || {
        (s.metric("secureops_sensor_pdp_connected") == Some(1.0)).then_some(())
    })
    .await
    .expect("sensor never connected to the PDP");
}

/// Taint from a real open reaches Check: the opener and its descendants are
/// denied; a sibling, and the same PID with another start time, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_open_taints_the_process_for_the_pdp() {
    let bin = require_env!();
    let stack = start_pdp(&bin);
    let sensor = start_sensor(&stack);
    wait_sensor_connected(&sensor).await;
    let mut c = PolicyDecisionClient::connect(stack.pdp.url("grpc"))
        .await
        .unwrap();
    let env = stack.marked.join(".env");
    let plain = stack.marked.join("README");
    std::fs::write(&env, "TOKEN=x\n").unwrap();
    std::fs::write(&plain, "hi\n").unwrap();

    let tainted = Opener::spawn(&env);
    let sibling = Opener::spawn(&plain);
    let r = check(&mut c, check_req(tainted.pid, tainted.start_time, &[])).await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    assert_eq!(r.rule_id, "tainted-after-credential-read", "{r:?}");
    let r = check(&mut c, check_req(sibling.pid, sibling.start_time, &[])).await;
    assert!(is_allow(&r), "sibling: {r:?}");
    // PID reuse: same pid, different start time.
    let r = check(&mut c, check_req(tainted.pid, tainted.start_time + 1, &[])).await;
    assert!(is_allow(&r), "reused pid: {r:?}");
    // A descendant (e.g. the curl the tainted shell spawns).
    let r = check(
        &mut c,
        check_req(4_000_000, 1, &[(tainted.pid, tainted.start_time)]),
    )
    .await;
    assert_eq!(r.decision, Verdict::Deny as i32, "descendant: {r:?}");
}

/// The race of DESIGN.md §6: a Check issued the instant `open()` returned
/// must see the taint. 1,000 fresh processes, never allowed; an untainted
/// control process every 100 iterations is allowed (the denials are the
/// taint, not a dead sensor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_then_check_immediately_is_never_allowed() {
    let bin = require_env!();
    let stack = start_pdp(&bin);
    let sensor = start_sensor(&stack);
    wait_sensor_connected(&sensor).await;
    let mut c = PolicyDecisionClient::connect(stack.pdp.url("grpc"))
        .await
        .unwrap();
    let env = stack.marked.join(".env");
    let plain = stack.marked.join("notes.txt");
    std::fs::write(&env, "TOKEN=x\n").unwrap();
    std::fs::write(&plain, "hi\n").unwrap();
    for i in 0..1000 {
        let o = Opener::spawn(&env);
        let r = check(&mut c, check_req(o.pid, o.start_time, &[])).await;
        assert_eq!(
            (r.decision, r.rule_id.as_str()),
            (Verdict::Deny as i32, "tainted-after-credential-read"),
            "iteration {i}: {r:?}"
        );
        if i % 100 == 0 {
            let ctl = Opener::spawn(&plain);
            let r = check(&mut c, check_req(ctl.pid, ctl.start_time, &[])).await;
            assert!(is_allow(&r), "control at iteration {i}: {r:?}");
        }
    }
}

/// `require_sensor: true`: a killed sensor fails the workload closed with
/// `fail_closed:sensor_unavailable`; a restarted sensor brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sensor_fails_the_workload_closed() {
    let bin = require_env!();
    let stack = start_pdp(&bin);
    let mut sensor = start_sensor(&stack);
    wait_sensor_connected(&sensor).await;
    let mut c = PolicyDecisionClient::connect(stack.pdp.url("grpc"))
        .await
        .unwrap();
    let me = (std::process::id(), start_time_of(std::process::id()));
    let r = check(&mut c, check_req(me.0, me.1, &[])).await;
    assert!(is_allow(&r), "live sensor: {r:?}");

    sensor.svc.kill9();
    let mut last = None;
    for _ in 0..100 {
        let r = check(&mut c, check_req(me.0, me.1, &[])).await;
        if r.reason == "fail_closed:sensor_unavailable" {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = last.expect("workload still allowed 2 s after the sensor died");
    assert_eq!(r.decision, Verdict::Deny as i32);

    let sensor = start_sensor(&stack);
    wait_sensor_connected(&sensor).await;
    let r = eventually_check(&mut c, me).await;
    assert!(is_allow(&r), "sensor back: {r:?}");
}

async fn eventually_check(c: &mut PolicyDecisionClient<Channel>, me: (u32, u64)) -> CheckResponse {
    let mut r = check(c, check_req(me.0, me.1, &[])).await;
    for _ in 0..100 {
        if is_allow(&r) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = check(c, check_req(me.0, me.1, &[])).await;
    }
    r
}
