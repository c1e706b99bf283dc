//! Helpers shared by the PDP integration tests: start the real
//! `secureops-pdp` binary on loopback port 0 and talk to it with real tonic
//! clients.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secureops_proto::v1::policy_admin_client::PolicyAdminClient;
use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::process_context_client::ProcessContextClient;
use secureops_proto::v1::{
    CheckRequest, CheckResponse, Destination, FileOpened, HostSource, ProcessEvent, ProcessInfo,
    ProcessRef, PutRequest, PutResponse, Transport, process_event::Event,
};
use secureops_test_support::{PdpArgs, Service};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const TOKEN: &str = "test-admin-token-0123456789abcdef";

/// The policy most tests run: an allowlist, a taint rule, an escalation rule.
pub const POLICY: &str = r#"version: 1
mode: enforce
default: deny
egress_allowlist:
  - github.com
  - "*.githubusercontent.com"
rules:
  - id: tainted-after-credential-read
    action: deny
    when:
      process_or_ancestor_opened: ["**/.env", "**/.aws/credentials"]
      within: 10m
  - id: ask-operator
    action: escalate
    destinations:
      - host: ask.example.com
        ports: [443]
      - host: wide.example.com
"#;

/// A second, different valid policy.
pub const POLICY_B: &str = r#"version: 1
mode: enforce
default: deny
egress_allowlist:
  - pypi.org:443
"#;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_secureops-pdp")
}

/// A running PDP with its data dir.
pub struct Pdp {
    pub svc: Service,
    pub dir: PathBuf,
}

/// Temp data dir + token file; kept alive by the returned guard.
pub fn data_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::write(d.path().join("token"), format!("{TOKEN}\n")).expect("token file");
    d
}

pub fn spawn_in(dir: &Path, extra: &[&str]) -> Pdp {
    let args = extra.iter().fold(
        PdpArgs::new(dir.join("data")).admin_token_file(dir.join("token")),
        |a, x| a.arg(x),
    );
    let svc =
        Service::spawn(bin(), args.build(), &["grpc", "admin", "metrics"]).expect("spawn pdp");
    Pdp {
        svc,
        dir: dir.to_owned(),
    }
}

/// Start a PDP with `POLICY` as bootstrap.
pub fn spawn_with_policy(dir: &Path, policy: &str) -> Pdp {
    let p = dir.join("bootstrap.yaml");
    std::fs::write(&p, policy).expect("write policy");
    spawn_in(dir, &["--policy", &p.display().to_string()])
}

/// Client-side interceptor adding the bearer token.
pub type AuthFn = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

pub type Admin = PolicyAdminClient<InterceptedService<Channel, AuthFn>>;

impl Pdp {
    pub async fn decision(&self) -> PolicyDecisionClient<Channel> {
        PolicyDecisionClient::connect(self.svc.url("grpc"))
            .await
            .expect("connect grpc")
    }

    pub async fn context(&self) -> ProcessContextClient<Channel> {
        ProcessContextClient::connect(self.svc.url("grpc"))
            .await
            .expect("connect grpc")
    }

    pub async fn admin_with(&self, token: Option<&str>) -> Admin {
        let ch = Channel::from_shared(self.svc.url("admin"))
            .expect("url")
            .connect()
            .await
            .expect("connect admin");
        let header = token.map(|t| format!("Bearer {t}"));
        let f: AuthFn = Box::new(move |mut req: Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut()
                    .insert("authorization", h.parse().expect("ascii header"));
            }
            Ok(req)
        });
        PolicyAdminClient::with_interceptor(ch, f)
    }

    pub async fn admin(&self) -> Admin {
        self.admin_with(Some(TOKEN)).await
    }

    /// GET /metrics as text.
    pub fn metrics(&self) -> String {
        http_get(self.svc.addr("metrics"), "/metrics")
    }
}

pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect ops");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Value of the first sample line starting with `prefix` in metrics text.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn put(admin: &mut Admin, yaml: &str) -> PutResponse {
    admin
        .put(PutRequest {
            yaml: yaml.into(),
            author: "test".into(),
            comment: "test".into(),
            expected_version: 0,
        })
        .await
        .expect("put rpc")
        .into_inner()
}

/// A request from an attributed process (pid 4000, start time 1): with a
/// taint rule in the policy an unattributed request fails closed.
pub fn req(workload: &str, host: &str, port: u32) -> CheckRequest {
    with_process(unattributed(workload, host, port), 4000, 1, &[])
}

/// A request without process attribution.
pub fn unattributed(workload: &str, host: &str, port: u32) -> CheckRequest {
    CheckRequest {
        request_id: "t".into(),
        workload_id: workload.into(),
        process: None,
        destination: Some(Destination {
            host: host.into(),
            port,
            ip: String::new(),
            resolved_ips: Vec::new(),
        }),
        host_source: HostSource::Connect as i32,
        transport: Transport::Tcp as i32,
        pep_id: "test-pep".into(),
    }
}

pub fn with_process(
    mut r: CheckRequest,
    pid: u32,
    start: u64,
    ancestors: &[(u32, u64)],
) -> CheckRequest {
    r.process = Some(ProcessInfo {
        pid,
        start_time: start,
        exe: "/usr/bin/curl".into(),
        argv: vec!["curl".into()],
        uid: 1000,
        ancestors: ancestors
            .iter()
            .map(|&(pid, start_time)| ProcessRef {
                pid,
                start_time,
                exe: "/bin/sh".into(),
            })
            .collect(),
    });
    r
}

pub async fn check(c: &mut PolicyDecisionClient<Channel>, r: CheckRequest) -> CheckResponse {
    c.check(r).await.expect("check rpc").into_inner()
}

pub fn open_event(
    workload: &str,
    seq: u64,
    pid: u32,
    start: u64,
    path: &str,
    ts_nanos: i64,
) -> ProcessEvent {
    ProcessEvent {
        workload_id: workload.into(),
        sensor_id: "test-sensor".into(),
        seq,
        timestamp_unix_nanos: ts_nanos,
        event: Some(Event::FileOpened(FileOpened {
            process: Some(ProcessRef {
                pid,
                start_time: start,
                exe: "/bin/cat".into(),
            }),
            path: path.into(),
            ancestors: Vec::new(),
        })),
    }
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
