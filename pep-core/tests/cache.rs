//! Decision cache + Watch against a real loopback fake PDP: scope/TTL,
//! invalidation, Watch down ⇒ bypass, no stale allow.

mod common;

use std::time::Duration;

use common::*;
use secureops_pep::{
    CacheConfig, ConnectionRequest, Decision, GrpcPdp, GrpcPdpConfig, HostSource, PepMetrics,
    PolicyDecisionPoint, ProcessIdentity, Transport,
};
use secureops_proto::v1::invalidation::Kind;
use secureops_proto::v1::{CacheScope, CheckResponse, Verdict};

fn req(host: &str, pid: u32) -> ConnectionRequest {
    ConnectionRequest {
        request_id: "r".into(),
        workload_id: "agent-1".into(),
        process: ProcessIdentity {
            pid,
            start_time: 1000 + u64::from(pid),
            exe: "/usr/bin/curl".into(),
            ..Default::default()
        },
        host: host.into(),
        port: 443,
        ip: Some("93.184.216.34".parse().unwrap()),
        resolved_ips: vec!["93.184.216.34".parse().unwrap()],
        host_source: HostSource::Connect,
        transport: Transport::Tcp,
    }
}

fn deny_answer() -> CheckResponse {
    CheckResponse {
        decision: Verdict::Deny as i32,
        reason: "tainted:creds".into(),
        cache_scope: CacheScope::Workload as i32,
        cache_ttl_ms: 60_000,
        ..Default::default()
    }
}

async fn pdp_with_cache(url: String) -> GrpcPdp {
    let mut c = GrpcPdpConfig::new(url, "pep-cache");
    c.deadline = Duration::from_millis(500);
    c.cache = Some(CacheConfig {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..CacheConfig::default()
    });
    let pdp = GrpcPdp::new(c, PepMetrics::new()).unwrap();
    let cache = pdp.cache().unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(5), || cache.is_enabled()).await,
        "Watch HELLO enables the cache"
    );
    pdp
}

#[tokio::test]
async fn workload_scope_and_ttl_are_honoured() {
    let knobs = new_pdp_knobs();
    knobs.set_answer(allow_answer(CacheScope::Workload, 300));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = pdp_with_cache(srv.url()).await;
    assert_eq!(
        pdp.decide(&req("a.example", 1)).await.decision,
        Decision::Allow
    );
    // same workload/destination, other process: hit
    assert_eq!(
        pdp.decide(&req("a.example", 2)).await.decision,
        Decision::Allow
    );
    assert_eq!(
        pdp.decide(&req("A.example.", 3)).await.decision,
        Decision::Allow
    );
    assert_eq!(knobs.calls(), 1);
    // other destination, other port, other resolved IP: misses
    pdp.decide(&req("b.example", 1)).await;
    let mut r = req("a.example", 1);
    r.port = 8443;
    pdp.decide(&r).await;
    let mut r = req("a.example", 1);
    r.resolved_ips = vec!["10.0.0.1".parse().unwrap()];
    pdp.decide(&r).await;
    let mut r = req("a.example", 1);
    r.workload_id = "agent-2".into();
    pdp.decide(&r).await;
    assert_eq!(knobs.calls(), 5);
    // TTL
    tokio::time::sleep(Duration::from_millis(350)).await;
    pdp.decide(&req("a.example", 1)).await;
    assert_eq!(knobs.calls(), 6);
}

#[tokio::test]
async fn process_scope_and_uncacheable_answers() {
    let knobs = new_pdp_knobs();
    knobs.set_answer(allow_answer(CacheScope::Process, 60_000));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = pdp_with_cache(srv.url()).await;
    pdp.decide(&req("a.example", 7)).await;
    pdp.decide(&req("a.example", 7)).await;
    assert_eq!(knobs.calls(), 1);
    pdp.decide(&req("a.example", 8)).await;
    assert_eq!(knobs.calls(), 2, "other process misses");
    // same pid, other start time (pid reuse) misses
    let mut r = req("a.example", 7);
    r.process.start_time += 1;
    pdp.decide(&r).await;
    assert_eq!(knobs.calls(), 3);
    // unattributed processes are never process-cached
    pdp.decide(&req("a.example", 0)).await;
    pdp.decide(&req("a.example", 0)).await;
    assert_eq!(knobs.calls(), 5);
    // context-dependent workload answers are narrowed to the process
    knobs.set_answer(CheckResponse {
        context_dependent: true,
        ..allow_answer(CacheScope::Workload, 60_000)
    });
    pdp.decide(&req("c.example", 7)).await;
    pdp.decide(&req("c.example", 9)).await;
    assert_eq!(knobs.calls(), 7);
    // scope NONE / ttl 0: never cached
    knobs.set_answer(allow_answer(CacheScope::None, 60_000));
    pdp.decide(&req("d.example", 7)).await;
    pdp.decide(&req("d.example", 7)).await;
    knobs.set_answer(allow_answer(CacheScope::Workload, 0));
    pdp.decide(&req("e.example", 7)).await;
    pdp.decide(&req("e.example", 7)).await;
    assert_eq!(knobs.calls(), 11);
}

/// The core property: no stale allow after a policy change or a taint event.
#[tokio::test]
async fn invalidation_flushes_no_stale_allow() {
    for kind in [
        Kind::PolicyChanged,
        Kind::WorkloadTainted,
        Kind::EscalationResolved,
        Kind::ContextChanged,
    ] {
        let knobs = new_pdp_knobs();
        knobs.set_answer(allow_answer(CacheScope::Workload, 60_000));
        let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
        let pdp = pdp_with_cache(srv.url()).await;
        let cache = pdp.cache().unwrap().clone();
        assert_eq!(
            pdp.decide(&req("a.example", 1)).await.decision,
            Decision::Allow
        );
        assert_eq!(
            pdp.decide(&req("a.example", 1)).await.decision,
            Decision::Allow
        );
        assert_eq!(knobs.calls(), 1);
        // The PDP changes its mind and says so on Watch.
        knobs.set_answer(deny_answer());
        let epoch = cache.epoch();
        knobs.invalidate(kind);
        assert!(wait_until(Duration::from_secs(5), || cache.epoch() != epoch).await);
        assert!(cache.is_empty());
        let o = pdp.decide(&req("a.example", 1)).await;
        assert_eq!(o.decision, Decision::Deny, "{kind:?}: stale allow");
        assert_eq!(knobs.calls(), 2);
        assert!(cache.is_enabled(), "invalidations keep the stream up");
    }
}

/// An allow computed under the old policy must not land in the cache after
/// the invalidation that should have removed it.
#[tokio::test]
async fn answer_racing_an_invalidation_is_not_cached() {
    let knobs = new_pdp_knobs();
    knobs.set_answer(allow_answer(CacheScope::Workload, 60_000));
    knobs.set_mode(Mode::InvalidateThenAnswer(Duration::from_millis(100)));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = pdp_with_cache(srv.url()).await;
    let cache = pdp.cache().unwrap().clone();
    let epoch = cache.epoch();
    assert_eq!(
        pdp.decide(&req("a.example", 1)).await.decision,
        Decision::Allow
    );
    assert_ne!(cache.epoch(), epoch, "the invalidation arrived mid-call");
    assert!(cache.is_empty(), "answer of the old policy not cached");
    knobs.set_mode(Mode::Answer);
    pdp.decide(&req("a.example", 1)).await;
    assert_eq!(knobs.calls(), 2);
}

#[tokio::test]
async fn watch_down_flushes_and_bypasses_until_hello() {
    let knobs = new_pdp_knobs();
    knobs.set_answer(allow_answer(CacheScope::Workload, 60_000));
    let mut srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let addr = srv.addr;
    let pdp = pdp_with_cache(srv.url()).await;
    let cache = pdp.cache().unwrap().clone();
    assert_eq!(
        pdp.decide(&req("a.example", 1)).await.decision,
        Decision::Allow
    );
    assert_eq!(cache.len(), 1);
    // PDP crashes: stream down ⇒ flushed, disabled; the cached allow is gone
    // and the decision fails closed.
    srv.stop();
    assert!(wait_until(Duration::from_secs(5), || !cache.is_enabled()).await);
    assert!(cache.is_empty());
    let o = pdp.decide(&req("a.example", 1)).await;
    assert_eq!(o.decision, Decision::Deny, "{o:?}");
    assert!(o.reason.starts_with("fail_closed:"), "{o:?}");
    // PDP back with a different policy: reconnect with backoff, HELLO
    // re-enables, and the answer is the new one.
    let knobs2 = new_pdp_knobs();
    knobs2.set_answer(deny_answer());
    let _srv2 = start_pdp(addr, knobs2.clone());
    assert!(wait_until(Duration::from_secs(5), || cache.is_enabled()).await);
    assert_eq!(
        pdp.decide(&req("a.example", 1)).await.decision,
        Decision::Deny
    );
    assert_eq!(
        pdp.decide(&req("a.example", 1)).await.decision,
        Decision::Deny
    );
    assert_eq!(knobs2.calls(), 1, "deny cached under the new stream");
}

#[tokio::test]
async fn bounded_size() {
    let knobs = new_pdp_knobs();
    knobs.set_answer(allow_answer(CacheScope::Workload, 60_000));
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let mut c = GrpcPdpConfig::new(srv.url(), "pep-cache");
    c.deadline = Duration::from_millis(500);
    c.cache = Some(CacheConfig {
        max_entries: 4,
        ..CacheConfig::default()
    });
    let pdp = GrpcPdp::new(c, PepMetrics::new()).unwrap();
    let cache = pdp.cache().unwrap().clone();
    assert!(wait_until(Duration::from_secs(5), || cache.is_enabled()).await);
    for i in 0..10 {
        pdp.decide(&req(&format!("h{i}.example"), 1)).await;
    }
    assert_eq!(cache.len(), 4);
    // the cached ones still hit, the others still ask
    pdp.decide(&req("h0.example", 1)).await;
    pdp.decide(&req("h9.example", 1)).await;
    assert_eq!(knobs.calls(), 11);
}
