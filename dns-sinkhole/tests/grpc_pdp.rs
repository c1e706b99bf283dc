//! The sinkhole against a (fake) gRPC PDP through pep-core's `GrpcPdp`:
//! decisions come from `Check`, and the answers of allowed names are
//! reported back as `DnsAnswer` process context.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Sinkhole, Upstream, dig};
use secureops_proto::v1::policy_decision_server::{PolicyDecision, PolicyDecisionServer};
use secureops_proto::v1::process_context_server::{ProcessContext, ProcessContextServer};
use secureops_proto::v1::{
    CheckRequest, CheckResponse, DnsAnswer, EventAck, Invalidation, ProcessEvent, ReportSummary,
    Verdict, WatchRequest, process_event,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default, Clone)]
struct FakePdp {
    checks: Arc<Mutex<Vec<CheckRequest>>>,
    answers: Arc<Mutex<Vec<(String, DnsAnswer)>>>,
}

type Pinned<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDecision for FakePdp {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let req = req.into_inner();
        let host = req
            .destination
            .as_ref()
            .map(|d| d.host.clone())
            .unwrap_or_default();
        self.checks.lock().unwrap().push(req);
        let (decision, reason) = if host == "ok.test" || host.ends_with(".ok.test") {
            (Verdict::Allow, "rule:ok")
        } else if host == "ask.test" {
            (Verdict::Escalate, "rule:ask")
        } else {
            (Verdict::Deny, "default_deny")
        };
        Ok(Response::new(CheckResponse {
            decision: decision as i32,
            reason: reason.into(),
            rule_id: reason.trim_start_matches("rule:").into(),
            policy_version: 7,
            ..CheckResponse::default()
        }))
    }

    type WatchStream = Pinned<Invalidation>;
    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }
}

#[tonic::async_trait]
impl ProcessContext for FakePdp {
    async fn report(
        &self,
        req: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let mut s = req.into_inner();
        let mut n = 0;
        while let Some(ev) = s.message().await? {
            n += 1;
            if let Some(process_event::Event::DnsAnswer(a)) = ev.event {
                self.answers.lock().unwrap().push((ev.workload_id, a));
            }
        }
        Ok(Response::new(ReportSummary {
            accepted: n,
            ..ReportSummary::default()
        }))
    }

    type ReportAckedStream = Pinned<EventAck>;
    async fn report_acked(
        &self,
        _: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<Self::ReportAckedStream>, Status> {
        Err(Status::unimplemented("not used by the sinkhole"))
    }
}

async fn serve(pdp: FakePdp) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PolicyDecisionServer::new(pdp.clone()))
            .add_service(ProcessContextServer::new(pdp))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_from_grpc_pdp_and_answers_reported_as_context() {
    let pdp = FakePdp::default();
    let pdp_addr = serve(pdp.clone()).await;
    let up = Upstream::start();
    let url = format!("http://{pdp_addr}");
    let upstream = up.addr.to_string();
    let s = Sinkhole::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--pdp",
        &url,
        "--workload",
        "agent-9",
        "--pdp-timeout-ms",
        "2000",
    ]);
    let addr = s.addr;
    let run = |name: &'static str| tokio::task::spawn_blocking(move || dig(addr, name, "A", &[]));

    let d = run("ok.test").await.unwrap();
    assert_eq!(d.status, "NOERROR", "{}", d.stdout);
    assert_eq!(d.answers, vec!["192.0.2.1"]);
    let d = run("www.OK.test").await.unwrap();
    assert_eq!(d.answers, vec!["192.0.2.1"], "{}", d.stdout);
    assert_eq!(up.total(), 2);
    for name in ["evil.test", "ask.test"] {
        let d = run(name).await.unwrap();
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.stdout);
    }
    assert_eq!(up.total(), 2, "denied/escalated names reached the upstream");

    {
        let checks = pdp.checks.lock().unwrap();
        let hosts: Vec<&str> = checks
            .iter()
            .map(|c| c.destination.as_ref().unwrap().host.as_str())
            .collect();
        assert_eq!(hosts, ["ok.test", "www.ok.test", "evil.test", "ask.test"]);
        for c in checks.iter() {
            assert_eq!(c.workload_id, "agent-9");
            assert_eq!(
                c.host_source,
                secureops_proto::v1::HostSource::DnsQuery as i32
            );
            assert_eq!(c.destination.as_ref().unwrap().port, 53);
            assert!(!c.request_id.is_empty());
        }
    }

    // The answers of the two allowed names arrive as DNS-learned context.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got: Vec<(String, DnsAnswer)> = pdp.answers.lock().unwrap().clone();
        if got.len() >= 2 {
            let names: Vec<&str> = got.iter().map(|(_, a)| a.name.as_str()).collect();
            assert_eq!(names, ["ok.test", "www.ok.test"]);
            for (workload, a) in &got {
                assert_eq!(workload, "agent-9");
                assert_eq!(a.ips, vec!["192.0.2.1".to_string()]);
                assert_eq!(a.ttl_seconds, 300);
            }
            break;
        }
        assert!(Instant::now() < deadline, "no DnsAnswer reported: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same through the UDP fast path (`--attribution false`: every plain
/// query takes it): gRPC decisions that are not ready at once continue in
/// their own task, allowed answers are forwarded and reported as context,
/// and each query is audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_with_grpc_pdp_decisions() {
    let pdp = FakePdp::default();
    let pdp_addr = serve(pdp.clone()).await;
    let up = Upstream::start();
    let url = format!("http://{pdp_addr}");
    let upstream = up.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_str().unwrap().to_string();
    let mut s = Sinkhole::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--pdp",
        &url,
        "--workload",
        "agent-9",
        "--pdp-timeout-ms",
        "2000",
        "--attribution",
        "false",
        "--spool-dir",
        &spool_s,
    ]);
    let addr = s.addr;
    let run = |name: &'static str| tokio::task::spawn_blocking(move || dig(addr, name, "A", &[]));
    let mut expect = Vec::new();
    for (name, status) in [
        ("ok.test", "NOERROR"),
        ("evil.test", "NXDOMAIN"),
        ("www.OK.test", "NOERROR"),
        ("ask.test", "NXDOMAIN"),
        ("ok.test", "NOERROR"),
    ] {
        let d = run(name).await.unwrap();
        assert_eq!(d.status, status, "{name}: {}", d.stdout);
        if status == "NOERROR" {
            assert_eq!(d.answers, vec!["192.0.2.1"], "{name}: {}", d.stdout);
        }
        expect.push(name.to_ascii_lowercase());
    }
    // ok.test the second time came from the answer cache.
    assert_eq!(up.total(), 2, "{:?}", up.names.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while pdp.answers.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no DnsAnswer reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = s.child.kill();
    let _ = s.child.wait();
    let sp = secureops_pep::AuditSpool::open(&spool, secureops_pep::SpoolLimits::default())
        .expect("open spool");
    let recs: Vec<_> = sp
        .unacked_after(0, 100)
        .into_iter()
        .map(|r| r.finding.unwrap())
        .collect();
    let hosts: Vec<&str> = recs.iter().map(|f| f.host.as_str()).collect();
    assert_eq!(hosts, expect, "one record per query, in order");
    assert_eq!(recs[0].reason, "rule:ok");
    assert_eq!(recs[0].policy_version, 7);
    assert_eq!(recs[1].reason, "default_deny");
    assert_eq!(recs[3].decision, Verdict::Escalate as i32);
}
