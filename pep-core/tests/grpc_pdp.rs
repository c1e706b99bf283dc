//! GrpcPdp against a real loopback tonic server: every fail-closed path,
//! the circuit breaker and recovery.

mod common;

use std::time::{Duration, Instant};

use common::*;
use secureops_pep::{
    BreakerConfig, BreakerState, ConnectionRequest, Decision, FailMode, GrpcPdp, GrpcPdpConfig,
    HostSource, PepMetrics, PolicyDecisionPoint, ProcessIdentity, Transport,
};
use secureops_proto::v1::{CheckResponse, Verdict};

fn req(host: &str) -> ConnectionRequest {
    ConnectionRequest {
        request_id: "r1".into(),
        workload_id: "agent-1".into(),
        process: ProcessIdentity {
            pid: 4242,
            start_time: 99,
            exe: "/usr/bin/curl".into(),
            ..Default::default()
        },
        host: host.into(),
        port: 443,
        ip: None,
        resolved_ips: vec![],
        host_source: HostSource::Connect,
        transport: Transport::Tcp,
    }
}

fn cfg(url: String) -> GrpcPdpConfig {
    let mut c = GrpcPdpConfig::new(url, "pep-test");
    c.cache = None;
    c.breaker = BreakerConfig {
        failure_threshold: 3,
        base_cool_down: Duration::from_millis(300),
        max_cool_down: Duration::from_secs(2),
        ..BreakerConfig::default()
    };
    c
}

#[tokio::test]
async fn allow_and_deny_answers_pass_through() {
    let knobs = new_pdp_knobs();
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    let o = pdp.decide(&req("github.com")).await;
    assert_eq!(o.decision, Decision::Allow, "{o:?}");
    assert_eq!(o.reason, "rule:test");
    assert!(o.fail_closed_cause.is_none());
    knobs.set_answer(CheckResponse {
        decision: Verdict::Deny as i32,
        reason: "default_deny".into(),
        ..Default::default()
    });
    let o = pdp.decide(&req("evil.example")).await;
    assert_eq!(o.decision, Decision::Deny);
    assert_eq!(o.reason, "default_deny");
    knobs.set_answer(CheckResponse {
        decision: Verdict::Unspecified as i32,
        ..Default::default()
    });
    let o = pdp.decide(&req("x.example")).await;
    assert_eq!(o.decision, Decision::Deny);
    assert_eq!(o.reason, "fail_closed:pdp_bad_response");
    assert_eq!(knobs.calls(), 3);
}

#[tokio::test]
async fn pdp_down_denies_within_connect_timeout() {
    let pdp = GrpcPdp::new(cfg(format!("http://{}", dead_addr())), PepMetrics::new()).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let o = pdp.decide(&req("github.com")).await;
        let took = t.elapsed();
        assert_eq!(o.decision, Decision::Deny);
        assert_eq!(o.reason, "fail_closed:pdp_unavailable", "{o:?}");
        assert!(took < Duration::from_millis(200), "took {took:?}");
    }
}

#[tokio::test]
async fn pdp_hanging_denies_within_deadline() {
    let knobs = new_pdp_knobs();
    knobs.set_mode(Mode::Hang);
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    // warm the connection so the measurement is the deadline, not the connect
    let _ = pdp.decide(&req("warm.example")).await;
    let t = Instant::now();
    let o = pdp.decide(&req("github.com")).await;
    let took = t.elapsed();
    assert_eq!(o.decision, Decision::Deny);
    assert_eq!(o.reason, "fail_closed:pdp_timeout");
    assert!(took >= Duration::from_millis(45), "took {took:?}");
    // 50 ms deadline; generous scheduling slack for a loaded 2-core CI box
    assert!(took < Duration::from_millis(200), "took {took:?}");
    println!("hanging PDP denied after {took:?} (deadline 50 ms)");
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99) / 100 - 1]
}

#[tokio::test]
async fn breaker_opens_fails_fast_without_calls_then_recovers() {
    let knobs = new_pdp_knobs();
    knobs.set_mode(Mode::Hang);
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let metrics = PepMetrics::new();
    let pdp = GrpcPdp::new(cfg(srv.url()), metrics.clone()).unwrap();
    for _ in 0..3 {
        let o = pdp.decide(&req("github.com")).await;
        assert_eq!(o.reason, "fail_closed:pdp_timeout");
    }
    assert_eq!(pdp.breaker_state(), BreakerState::Open);
    assert_eq!(metrics.breaker_state.get(), 1);
    let calls_when_opened = knobs.calls();
    assert_eq!(calls_when_opened, 3);

    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        let o = pdp.decide(&req("github.com")).await;
        lat.push(t.elapsed());
        assert_eq!(o.decision, Decision::Deny);
        assert_eq!(o.reason, "fail_closed:breaker_open");
    }
    assert_eq!(knobs.calls(), calls_when_opened, "no call reached the PDP");
    let p = p99(lat);
    println!("breaker-open deny p99 = {p:?} (bound 1 ms)");
    assert!(p <= Duration::from_millis(1), "p99 {p:?}");

    // PDP recovers; after the cool-down one probe goes through and closes.
    knobs.set_mode(Mode::Answer);
    tokio::time::sleep(Duration::from_millis(320)).await;
    let o = pdp.decide(&req("github.com")).await;
    assert_eq!(o.decision, Decision::Allow, "{o:?}");
    assert_eq!(pdp.breaker_state(), BreakerState::Closed);
    assert_eq!(metrics.breaker_state.get(), 0);
    assert_eq!(knobs.calls(), calls_when_opened + 1);
}

#[tokio::test]
async fn failed_probe_reopens_with_longer_cool_down() {
    let knobs = new_pdp_knobs();
    knobs.set_mode(Mode::Error(tonic::Code::Unavailable));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    for _ in 0..3 {
        let o = pdp.decide(&req("a.example")).await;
        assert_eq!(o.reason, "fail_closed:pdp_unavailable");
    }
    assert_eq!(pdp.breaker_state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(320)).await;
    // The probe fails: re-open with 600 ms.
    let o = pdp.decide(&req("a.example")).await;
    assert_eq!(o.reason, "fail_closed:pdp_unavailable");
    assert_eq!(knobs.calls(), 4);
    assert_eq!(pdp.breaker_state(), BreakerState::Open);
    knobs.set_mode(Mode::Answer);
    tokio::time::sleep(Duration::from_millis(350)).await;
    // 350 ms > base but < doubled cool-down: still failing fast.
    let o = pdp.decide(&req("a.example")).await;
    assert_eq!(o.reason, "fail_closed:breaker_open");
    assert_eq!(knobs.calls(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let o = pdp.decide(&req("a.example")).await;
    assert_eq!(o.decision, Decision::Allow);
    assert_eq!(pdp.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn flapping_pdp_each_answer_is_honoured() {
    let knobs = new_pdp_knobs();
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    // fail, fail, answer, repeated: never 3 consecutive failures → closed.
    for round in 0..10 {
        for _ in 0..2 {
            knobs.set_mode(Mode::Error(tonic::Code::Unavailable));
            let o = pdp.decide(&req("a.example")).await;
            assert_eq!(o.reason, "fail_closed:pdp_unavailable", "round {round}");
        }
        knobs.set_mode(Mode::Answer);
        let o = pdp.decide(&req("a.example")).await;
        assert_eq!(o.decision, Decision::Allow, "round {round}");
        assert_eq!(pdp.breaker_state(), BreakerState::Closed);
    }
    assert_eq!(knobs.calls(), 30);
}

#[tokio::test]
async fn permission_denied_does_not_trip_the_breaker() {
    let knobs = new_pdp_knobs();
    knobs.set_mode(Mode::Error(tonic::Code::PermissionDenied));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    for _ in 0..20 {
        let o = pdp.decide(&req("a.example")).await;
        assert_eq!(o.decision, Decision::Deny);
        assert_eq!(o.reason, "fail_closed:pdp_error:permission_denied");
    }
    assert_eq!(pdp.breaker_state(), BreakerState::Closed);
    assert_eq!(knobs.calls(), 20, "every call reached the PDP");
    knobs.set_mode(Mode::Error(tonic::Code::InvalidArgument));
    for _ in 0..5 {
        let o = pdp.decide(&req("a.example")).await;
        assert_eq!(o.reason, "fail_closed:pdp_error:invalid_argument");
    }
    assert_eq!(pdp.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn overload_is_shed_not_queued() {
    let knobs = new_pdp_knobs();
    knobs.set_mode(Mode::Hang);
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let mut c = cfg(srv.url());
    c.max_in_flight = 2;
    c.deadline = Duration::from_millis(300);
    c.breaker.failure_threshold = 1000;
    let pdp = std::sync::Arc::new(GrpcPdp::new(c, PepMetrics::new()).unwrap());
    let mut hung = Vec::new();
    for _ in 0..2 {
        let p = pdp.clone();
        hung.push(tokio::spawn(
            async move { p.decide(&req("a.example")).await },
        ));
    }
    assert!(wait_until(Duration::from_secs(2), || knobs.calls() == 2).await);
    let t = Instant::now();
    let o = pdp.decide(&req("b.example")).await;
    assert_eq!(o.reason, "fail_closed:pdp_overloaded");
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    for h in hung {
        assert_eq!(h.await.unwrap().reason, "fail_closed:pdp_timeout");
    }
}

#[tokio::test]
async fn fail_mode_open_only_changes_fail_closed_denies() {
    let knobs = new_pdp_knobs();
    let mut srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    knobs.set_answer(CheckResponse {
        decision: Verdict::Deny as i32,
        reason: "default_deny".into(),
        ..Default::default()
    });
    let policy_deny = pdp.decide(&req("a.example")).await;
    let o = policy_deny.clone().apply_fail_mode(FailMode::Open);
    assert_eq!(o.decision, Decision::Deny, "a policy deny stays a deny");
    assert_eq!(o.reason, "default_deny");
    srv.stop();
    let fc = pdp.decide(&req("a.example")).await;
    assert_eq!(fc.decision, Decision::Deny);
    let closed = fc.clone().apply_fail_mode(FailMode::Closed);
    assert_eq!(closed, fc);
    let open = fc.apply_fail_mode(FailMode::Open);
    assert_eq!(open.decision, Decision::Allow);
    assert!(open.reason.starts_with("fail_open:"), "{}", open.reason);
    assert!(open.fail_closed_cause.is_some(), "cause kept for the audit");
}

#[tokio::test]
async fn metrics_count_outcomes_by_cause() {
    let metrics = PepMetrics::new();
    let pdp = GrpcPdp::new(cfg(format!("http://{}", dead_addr())), metrics.clone()).unwrap();
    let _ = pdp.decide(&req("a.example")).await;
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
    assert!(
        out.contains(
            "secureops_pep_pdp_outcomes_total{decision=\"deny\",cause=\"pdp_unavailable\"} 1"
        ),
        "{out}"
    );
    assert!(out.contains("secureops_pep_pdp_breaker_state 0"), "{out}");
}

/// Round trip of an uncached Check to a loopback PDP (figure for
/// BENCH_NOTES.md); asserts every answer is the PDP's allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_check_latency() {
    let knobs = new_pdp_knobs();
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = GrpcPdp::new(cfg(srv.url()), PepMetrics::new()).unwrap();
    let _ = pdp.decide(&req("warm.example")).await;
    let mut lat = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        let o = pdp.decide(&req("github.com")).await;
        lat.push(t.elapsed());
        assert_eq!(o.decision, Decision::Allow, "{o:?}");
    }
    lat.sort();
    println!(
        "loopback Check via GrpcPdp: p50 {:?} p99 {:?} (1000 sequential calls)",
        lat[500], lat[989]
    );
    assert_eq!(knobs.calls(), 1001);
}
