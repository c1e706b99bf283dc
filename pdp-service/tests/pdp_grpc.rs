//! End-to-end tests of `secureops-pdp` over real loopback gRPC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use secureops_proto::v1::invalidation::Kind;
use secureops_proto::v1::{
    CacheScope, EscalationState, GetRequest, HistoryRequest, HostSource, Invalidation,
    ListEscalationsRequest, PutRequest, ResolveEscalationRequest, RollbackRequest, ValidateRequest,
    Verdict, WatchRequest,
};
use tonic::Code;

fn allow(r: &secureops_proto::v1::CheckResponse) -> bool {
    r.decision == Verdict::Allow as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_allow_deny_escalate() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;

    let r = check(&mut c, req("agent-1", "github.com", 443)).await;
    assert_eq!(r.decision, Verdict::Allow as i32, "{r:?}");
    assert_eq!(r.policy_version, 1);
    assert_eq!(r.rule_id, "egress_allowlist");
    assert_ne!(r.cache_scope, CacheScope::None as i32, "{r:?}");
    assert!(r.cache_ttl_ms > 0);

    let r = check(&mut c, req("agent-1", "raw.githubusercontent.com", 443)).await;
    assert!(allow(&r), "{r:?}");

    // With a taint rule in force, an unattributed process fails closed.
    let r = check(&mut c, unattributed("agent-1", "github.com", 443)).await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    assert!(r.reason.starts_with("fail_closed:"), "{r:?}");

    for host in ["githubusercontent.com", "evil.example", "github.com.evil"] {
        let r = check(&mut c, req("agent-1", host, 443)).await;
        assert_eq!(r.decision, Verdict::Deny as i32, "{host}: {r:?}");
        assert_eq!(r.reason, "default_deny", "{host}");
    }

    let r1 = check(&mut c, req("agent-1", "ask.example.com", 443)).await;
    assert_eq!(r1.decision, Verdict::Escalate as i32, "{r1:?}");
    assert!(!r1.escalation_id.is_empty());
    assert_eq!(r1.rule_id, "ask-operator");
    assert_eq!(r1.cache_scope, CacheScope::None as i32);
    // Joined, not duplicated: same (workload, normalised host, port).
    let r2 = check(&mut c, req("agent-1", "ASK.example.com.", 443)).await;
    assert_eq!(r2.escalation_id, r1.escalation_id);
    let r3 = check(&mut c, req("agent-2", "ask.example.com", 443)).await;
    assert_ne!(r3.escalation_id, r1.escalation_id);

    let mut a = pdp.admin().await;
    let list = a
        .list_escalations(ListEscalationsRequest {
            include_resolved: false,
            workload_id: "agent-1".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .escalations;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].hits, 2);
    assert_eq!(list[0].host, "ask.example.com");
    assert_eq!(list[0].state, EscalationState::Pending as i32);

    let m = pdp.metrics();
    assert!(
        metric(
            &m,
            "secureops_pdp_decisions_total{decision=\"allow\",rule=\"egress_allowlist\"}"
        )
        .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert!(metric(&m, "secureops_pdp_escalations_pending").is_some_and(|v| v == 2.0));
    assert!(metric(&m, "secureops_pdp_policy_version").is_some_and(|v| v == 1.0));
    assert!(m.contains("secureops_pdp_check_duration_seconds_bucket"));
    assert!(http_get(pdp.svc.addr("metrics"), "/readyz").starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policy_serves_builtin_deny_all_version_0() {
    let d = data_dir();
    let pdp = spawn_in(d.path(), &[]);
    let mut c = pdp.decision().await;
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert_eq!(r.decision, Verdict::Deny as i32);
    assert_eq!(r.policy_version, 0);
    assert!(http_get(pdp.svc.addr("metrics"), "/readyz").starts_with("HTTP/1.1 200"));
    // The first real version is 1.
    let mut a = pdp.admin().await;
    let p = put(&mut a, POLICY).await;
    assert!(p.accepted, "{p:?}");
    assert_eq!(p.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requires_the_bearer_token() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    for tok in [None, Some("wrong"), Some("")] {
        let mut a = pdp.admin_with(tok).await;
        let e = a
            .get(GetRequest { version: 0 })
            .await
            .expect_err("must be refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{tok:?}: {e:?}");
        let e = a
            .put(PutRequest {
                yaml: POLICY_B.into(),
                ..PutRequest::default()
            })
            .await
            .expect_err("must be refused");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // Nothing changed.
    let mut c = pdp.decision().await;
    assert_eq!(
        check(&mut c, req("w", "github.com", 443))
            .await
            .policy_version,
        1
    );
    let mut a = pdp.admin().await;
    let v = a
        .get(GetRequest { version: 0 })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(v.version, 1);
    assert_eq!(v.yaml, POLICY);
    assert!(v.active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_token_file_is_0600() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    let svc = secureops_test_support::Service::spawn(
        bin(),
        secureops_test_support::PdpArgs::new(&data).build(),
        &["grpc", "admin"],
    )
    .expect("spawn");
    let tok_path = data.join("admin.token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&tok_path)
        .expect("token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let tok = std::fs::read_to_string(&tok_path).expect("read");
    assert_eq!(tok.trim().len(), 64);
    assert!(svc.stderr_text().contains("admin.token"), "path is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_refused_with_located_errors_old_keeps_serving() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut a = pdp.admin().await;
    let bad = "version: 1\ndefault: deny\nrules:\n  - id: r1\n    action: allow\n    destinations:\n      - host: \"*\"\n  - id: r2\n    action: maybe\n";
    let v = a
        .validate(ValidateRequest { yaml: bad.into() })
        .await
        .expect("validate")
        .into_inner();
    assert!(!v.ok);
    assert!(v.errors.len() >= 2, "{v:?}");
    let p = put(&mut a, bad).await;
    assert!(!p.accepted);
    assert_eq!(p.version, 1, "the running version is reported");
    assert!(p.errors.len() >= 2, "{p:?}");
    assert!(p.errors.iter().all(|e| e.line > 0 && e.column > 0), "{p:?}");
    assert!(p.errors.iter().any(|e| e.rule_id == "r1"), "{p:?}");
    assert!(
        p.errors.iter().any(|e| e.rule_id == "r2" && e.line == 9),
        "{p:?}"
    );

    let mut c = pdp.decision().await;
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert!(allow(&r));
    assert_eq!(r.policy_version, 1);

    // Validate of a good policy reports the rule count and changes nothing.
    let v = a
        .validate(ValidateRequest {
            yaml: POLICY_B.into(),
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.rule_count, 1);
    assert_eq!(
        check(&mut c, req("w", "github.com", 443))
            .await
            .policy_version,
        1
    );

    // Optimistic concurrency.
    let e = a
        .put(PutRequest {
            yaml: POLICY_B.into(),
            author: "t".into(),
            comment: String::new(),
            expected_version: 7,
        })
        .await
        .expect_err("conflict");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let ok = a
        .put(PutRequest {
            yaml: POLICY_B.into(),
            author: "t".into(),
            comment: String::new(),
            expected_version: 1,
        })
        .await
        .expect("put")
        .into_inner();
    assert!(ok.accepted);
    assert_eq!(ok.version, 2);
    assert!(
        pdp.metrics()
            .contains("secureops_pdp_policy_rejections_total 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_latest_version_and_rollback_works() {
    let d = data_dir();
    let mut pdp = spawn_with_policy(d.path(), POLICY);
    {
        let mut a = pdp.admin().await;
        let p = put(&mut a, POLICY_B).await;
        assert_eq!((p.accepted, p.version), (true, 2));
    }
    let st = pdp.svc.terminate(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "graceful exit: {st:?}");

    // Same data dir; --policy is ignored now that the store has versions.
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut a = pdp.admin().await;
    let v = a
        .get(GetRequest { version: 0 })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(v.version, 2);
    assert_eq!(v.yaml, POLICY_B);
    let mut c = pdp.decision().await;
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert_eq!(r.decision, Verdict::Deny as i32);
    assert_eq!(r.policy_version, 2);
    assert!(allow(&check(&mut c, req("w", "pypi.org", 443)).await));

    let h = a
        .history(HistoryRequest { limit: 0 })
        .await
        .expect("history")
        .into_inner()
        .versions;
    assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1]);
    assert!(h[0].active && !h[1].active);
    assert!(h.iter().all(|v| v.yaml.is_empty() && v.sha256.len() == 64));

    let p = a
        .rollback(RollbackRequest {
            to_version: 1,
            author: "ops".into(),
            comment: "back".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!((p.accepted, p.version), (true, 3));
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert!(allow(&r));
    assert_eq!(r.policy_version, 3);
    let v3 = a
        .get(GetRequest { version: 3 })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(v3.yaml, POLICY);
    assert!(v3.comment.contains("rollback to version 1"));
    let e = a
        .rollback(RollbackRequest {
            to_version: 99,
            ..RollbackRequest::default()
        })
        .await
        .expect_err("unknown version");
    assert_eq!(e.code(), Code::NotFound);
    let e = a
        .get(GetRequest { version: 42 })
        .await
        .expect_err("unknown version");
    assert_eq!(e.code(), Code::NotFound);
}

async fn next(s: &mut tonic::Streaming<Invalidation>) -> Invalidation {
    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        Ok(Ok(Some(m))) => m,
        other => panic!("no invalidation: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_an_invalidation_for_each_change() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let mut w = c
        .watch(WatchRequest {
            pep_id: "t".into(),
            workload_id: "agent-1".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let hello = next(&mut w).await;
    assert_eq!(hello.kind, Kind::Hello as i32);
    assert_eq!(hello.policy_version, 1);
    assert!(pdp.metrics().contains("secureops_pdp_watch_subscribers 1"));

    let mut a = pdp.admin().await;
    assert!(put(&mut a, POLICY_B).await.accepted);
    let m = next(&mut w).await;
    assert_eq!((m.kind, m.policy_version), (Kind::PolicyChanged as i32, 2));

    let p = a
        .rollback(RollbackRequest {
            to_version: 1,
            ..RollbackRequest::default()
        })
        .await
        .expect("rollback")
        .into_inner();
    assert!(p.accepted);
    let m = next(&mut w).await;
    assert_eq!((m.kind, m.policy_version), (Kind::PolicyChanged as i32, 3));

    // A refused put publishes nothing: the next message is the escalation.
    assert!(!put(&mut a, "version: 1\nbogus: 1\n").await.accepted);

    let r = check(&mut c, req("agent-1", "ask.example.com", 443)).await;
    assert_eq!(r.decision, Verdict::Escalate as i32);
    a.resolve_escalation(ResolveEscalationRequest {
        escalation_id: r.escalation_id.clone(),
        approve: true,
        ttl_seconds: 60,
        all_ports: false,
        comment: "ok".into(),
    })
    .await
    .expect("resolve");
    let m = next(&mut w).await;
    assert_eq!(m.kind, Kind::EscalationResolved as i32);
    assert_eq!(m.escalation_id, r.escalation_id);
    assert_eq!((m.host.as_str(), m.port), ("ask.example.com", 443));
    assert_eq!(m.workload_id, "agent-1");

    // Taint of another workload is filtered out; ours arrives.
    let mut ctx = pdp.context().await;
    let ev = vec![
        open_event("agent-other", 1, 50, 5, "/home/u/.env", 0),
        open_event("agent-1", 2, 51, 6, "/home/u/.env", 0),
    ];
    let s = ctx
        .report(tokio_stream::iter(ev))
        .await
        .expect("report")
        .into_inner();
    assert_eq!((s.accepted, s.rejected, s.last_seq), (2, 0, 2));
    let m = next(&mut w).await;
    assert_eq!(m.kind, Kind::WorkloadTainted as i32);
    assert_eq!(m.workload_id, "agent-1");
    assert_eq!(m.process.map(|p| (p.pid, p.start_time)), Some((51, 6)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_approve_deny_expiry_end_to_end() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let mut a = pdp.admin().await;

    // Approve for 2 s, this port only.
    let r = check(&mut c, req("w", "ask.example.com", 443)).await;
    assert_eq!(r.decision, Verdict::Escalate as i32);
    let e = a
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: r.escalation_id.clone(),
            approve: true,
            ttl_seconds: 2,
            all_ports: false,
            comment: "temporary".into(),
        })
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(e.state, EscalationState::Approved as i32);
    assert!(e.expires_unix_ms > 0);
    let ok = check(&mut c, req("w", "ask.example.com", 443)).await;
    assert!(allow(&ok), "{ok:?}");
    assert!(ok.context_dependent, "depends on escalation state: {ok:?}");
    // Other workloads are not covered.
    let other = check(&mut c, req("w2", "ask.example.com", 443)).await;
    assert_eq!(other.decision, Verdict::Escalate as i32);

    // Expiry: the approval lapses and a new escalation is created.
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let r2 = check(&mut c, req("w", "ask.example.com", 443)).await;
        if r2.decision != Verdict::Allow as i32 {
            break r2;
        }
        assert!(Instant::now() < deadline, "approval never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again.decision, Verdict::Escalate as i32);
    assert_ne!(again.escalation_id, r.escalation_id);
    let all = a
        .list_escalations(ListEscalationsRequest {
            include_resolved: true,
            workload_id: "w".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .escalations;
    let old = all
        .iter()
        .find(|x| x.id == r.escalation_id)
        .expect("old listed");
    // The sweeper marks it expired within its tick.
    let st = old.state;
    assert!(
        st == EscalationState::Expired as i32 || st == EscalationState::Approved as i32,
        "{old:?}"
    );
    let e = a
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: "esc-nope".into(),
            approve: true,
            ..ResolveEscalationRequest::default()
        })
        .await
        .expect_err("unknown id");
    assert_eq!(e.code(), Code::NotFound);

    // Deny (forever): stays denied, not escalated again.
    a.resolve_escalation(ResolveEscalationRequest {
        escalation_id: again.escalation_id.clone(),
        approve: false,
        ttl_seconds: 0,
        all_ports: false,
        comment: "no".into(),
    })
    .await
    .expect("deny");
    let r = check(&mut c, req("w", "ask.example.com", 443)).await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    assert!(r.escalation_id.is_empty());

    // Approve for every port of a host.
    let r = check(&mut c, req("w", "wide.example.com", 8443)).await;
    assert_eq!(r.decision, Verdict::Escalate as i32, "{r:?}");
    let e = a
        .resolve_escalation(ResolveEscalationRequest {
            escalation_id: r.escalation_id.clone(),
            approve: true,
            ttl_seconds: 0,
            all_ports: true,
            comment: String::new(),
        })
        .await
        .expect("approve all ports")
        .into_inner();
    assert_eq!(e.port, 0);
    assert!(allow(
        &check(&mut c, req("w", "wide.example.com", 9000)).await
    ));
    assert!(allow(
        &check(&mut c, req("w", "wide.example.com", 8443)).await
    ));
    let pending = a
        .list_escalations(ListEscalationsRequest {
            include_resolved: false,
            workload_id: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .escalations;
    assert!(pending.iter().all(|e| e.workload_id == "w2"), "{pending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_window_pid_reuse_and_ancestors() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let mut ctx = pdp.context().await;

    // Before any open: allowed.
    assert!(allow(
        &check(
            &mut c,
            with_process(req("w", "github.com", 443), 100, 1, &[])
        )
        .await
    ));

    // Acknowledged report: the ack means applied.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut acks = ctx
        .report_acked(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("report_acked")
        .into_inner();
    tx.send(open_event(
        "w",
        1,
        100,
        1,
        "/home/u/project/.env",
        now_nanos(),
    ))
    .await
    .expect("send");
    let ack = acks.message().await.expect("ack").expect("ack present");
    assert_eq!((ack.seq, ack.error.as_str()), (1, ""));

    let r = check(
        &mut c,
        with_process(req("w", "github.com", 443), 100, 1, &[]),
    )
    .await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    assert_eq!(r.rule_id, "tainted-after-credential-read");
    assert!(r.context_dependent);

    // Same PID, different start time (PID reuse): not tainted.
    let r = check(
        &mut c,
        with_process(req("w", "github.com", 443), 100, 2, &[]),
    )
    .await;
    assert!(allow(&r), "{r:?}");
    // Same PID in another workload: not tainted.
    let r = check(
        &mut c,
        with_process(req("w2", "github.com", 443), 100, 1, &[]),
    )
    .await;
    assert!(allow(&r), "{r:?}");
    // A child of the tainted process (ancestor chain): tainted.
    let r = check(
        &mut c,
        with_process(req("w", "github.com", 443), 200, 9, &[(150, 3), (100, 1)]),
    )
    .await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");

    // Outside the window (opened 11 minutes ago by the sensor's clock).
    tx.send(open_event(
        "w",
        2,
        300,
        1,
        "/root/.aws/credentials",
        now_nanos() - 11 * 60 * 1_000_000_000,
    ))
    .await
    .expect("send");
    assert_eq!(acks.message().await.expect("ack").map(|a| a.seq), Some(2));
    let r = check(
        &mut c,
        with_process(req("w", "github.com", 443), 300, 1, &[]),
    )
    .await;
    assert!(allow(&r), "outside the window: {r:?}");
    // Not a sensitive path: no taint.
    tx.send(open_event("w", 3, 400, 1, "/etc/hostname", now_nanos()))
        .await
        .expect("send");
    assert_eq!(acks.message().await.expect("ack").map(|a| a.seq), Some(3));
    assert!(allow(
        &check(
            &mut c,
            with_process(req("w", "github.com", 443), 400, 1, &[])
        )
        .await
    ));

    // A bad event is acked with an error, the stream continues.
    tx.send(open_event("w", 4, 0, 1, "/x/.env", 0))
        .await
        .expect("send");
    let a = acks.message().await.expect("ack").expect("ack present");
    assert_eq!(a.seq, 4);
    assert!(a.error.contains("pid"), "{a:?}");

    // Exec ancestry reported by the sensor completes a chain the PEP did
    // not send: 500 was exec'd by tainted 100.
    tx.send(secureops_proto::v1::ProcessEvent {
        workload_id: "w".into(),
        sensor_id: "s".into(),
        seq: 5,
        timestamp_unix_nanos: now_nanos(),
        event: Some(secureops_proto::v1::process_event::Event::Exec(
            secureops_proto::v1::ProcessExec {
                process: Some(secureops_proto::v1::ProcessRef {
                    pid: 500,
                    start_time: 5,
                    exe: "/usr/bin/curl".into(),
                }),
                parent: Some(secureops_proto::v1::ProcessRef {
                    pid: 100,
                    start_time: 1,
                    exe: "/bin/sh".into(),
                }),
                argv: vec!["curl".into()],
            },
        )),
    })
    .await
    .expect("send");
    assert_eq!(acks.message().await.expect("ack").map(|a| a.seq), Some(5));
    let r = check(
        &mut c,
        with_process(req("w", "github.com", 443), 500, 5, &[]),
    )
    .await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    drop(tx);
    assert!(acks.message().await.expect("end").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_flood_keeps_memory_bounded() {
    let d = data_dir();
    let p = d.path().join("bootstrap.yaml");
    std::fs::write(&p, POLICY).expect("policy");
    let pdp = spawn_in(
        d.path(),
        &[
            "--policy",
            &p.display().to_string(),
            "--max-processes",
            "1000",
        ],
    );
    let mut ctx = pdp.context().await;
    let n = 20_000u32;
    let events: Vec<_> = (0..n)
        .map(|i| open_event("flood", u64::from(i), i + 1, 1, "/home/u/.env", 0))
        .collect();
    let s = ctx
        .report(tokio_stream::iter(events))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(s.accepted, u64::from(n));
    let m = pdp.metrics();
    let procs = metric(&m, "secureops_pdp_context_processes").expect("gauge");
    let ev = metric(&m, "secureops_pdp_context_evictions_total").expect("counter");
    assert!(procs <= 1000.0, "{procs}");
    assert!(ev >= f64::from(n - 1000), "{ev}");
    // The newest taint survives, the oldest was evicted; the PDP answers.
    let mut c = pdp.decision().await;
    let r = check(
        &mut c,
        with_process(req("flood", "github.com", 443), n, 1, &[]),
    )
    .await;
    assert_eq!(r.decision, Verdict::Deny as i32);
    let r = check(
        &mut c,
        with_process(req("flood", "github.com", 443), 1, 1, &[]),
    )
    .await;
    assert!(allow(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_never_an_allow() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let base = || req("w", "github.com", 443);
    assert!(allow(&check(&mut c, base()).await));

    let mut cases: Vec<(&str, secureops_proto::v1::CheckRequest)> = Vec::new();
    let mut r = base();
    r.workload_id.clear();
    cases.push(("workload_id", r));
    let mut r = base();
    r.workload_id = "w".repeat(300);
    cases.push(("workload_id", r));
    let mut r = base();
    r.host_source = HostSource::Unspecified as i32;
    cases.push(("host_source", r));
    let mut r = base();
    r.host_source = 42;
    cases.push(("host_source", r));
    let mut r = base();
    r.transport = 9;
    cases.push(("transport", r));
    let mut r = base();
    r.destination = None;
    cases.push(("destination", r));
    for port in [0u32, 65_536, u32::MAX] {
        let mut r = base();
        if let Some(d) = r.destination.as_mut() {
            d.port = port;
        }
        cases.push(("destination.port", r));
    }
    for host in ["", "exa mple.com", "-bad-.com", "a..b", &"a".repeat(300)] {
        let mut r = base();
        if let Some(d) = r.destination.as_mut() {
            d.host = host.to_string();
        }
        cases.push(("destination.host", r));
    }
    let mut r = base();
    if let Some(d) = r.destination.as_mut() {
        d.ip = "300.1.1.1".into();
    }
    cases.push(("destination.ip", r));
    let mut r = with_process(base(), 10, 1, &[]);
    if let Some(p) = r.process.as_mut() {
        p.argv = vec!["x".repeat(1024); 64];
    }
    cases.push(("process.argv", r));
    let mut r = with_process(base(), 10, 1, &[]);
    if let Some(p) = r.process.as_mut() {
        p.ancestors = vec![Default::default(); 100];
    }
    cases.push(("process.ancestors", r));
    let r = with_process(base(), 10, 1, &[(0, 0)]);
    cases.push(("process.ancestors[0].pid", r));
    let mut r = base();
    r.host_source = HostSource::OriginalDst as i32;
    if let Some(d) = r.destination.as_mut() {
        d.host.clear();
    }
    cases.push(("destination", r));

    for (field, r) in cases {
        let e = c.check(r).await.expect_err("must be refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }

    // Larger than the transport limit: refused before decoding.
    let mut r = base();
    r.request_id = "x".repeat(512 * 1024);
    let e = c.check(r).await.expect_err("oversized");
    assert_ne!(e.code(), Code::Ok);

    // The server is still healthy and still allows good requests.
    assert!(allow(&check(&mut c, base()).await));
    let m = pdp.metrics();
    assert!(
        metric(
            &m,
            "secureops_pdp_check_errors_total{code=\"invalid_argument\"}"
        )
        .is_some_and(|v| v >= 15.0),
        "{m}"
    );
    assert!(!m.contains("decision=\"allow\",rule=\"\""));
}

fn heartbeat(workload: &str, seq: u64, interval_ms: u32) -> secureops_proto::v1::ProcessEvent {
    secureops_proto::v1::ProcessEvent {
        workload_id: workload.into(),
        sensor_id: "s".into(),
        seq,
        timestamp_unix_nanos: now_nanos(),
        event: Some(secureops_proto::v1::process_event::Event::Heartbeat(
            secureops_proto::v1::Heartbeat { interval_ms },
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sensor_fails_closed_and_invalidates() {
    let d = data_dir();
    let policy = format!("require_sensor: true\n{POLICY}");
    let pdp = spawn_with_policy(d.path(), &policy);
    let mut c = pdp.decision().await;
    let mut w = c
        .watch(WatchRequest {
            pep_id: "t".into(),
            workload_id: "w".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next(&mut w).await.kind, Kind::Hello as i32);

    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert_eq!(r.decision, Verdict::Deny as i32);
    assert_eq!(r.reason, "fail_closed:sensor_unavailable");

    let mut ctx = pdp.context().await;
    let s = ctx
        .report(tokio_stream::iter(vec![heartbeat("w", 1, 500)]))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(s.accepted, 1);
    // Sensor came alive: caches holding the fail-closed deny are flushed.
    let m = next(&mut w).await;
    assert_eq!(
        (m.kind, m.workload_id.as_str()),
        (Kind::ContextChanged as i32, "w")
    );
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert!(allow(&r), "{r:?}");
    assert!(r.context_dependent);

    // Silent for more than 3 intervals: denied again, and PEPs are told.
    let m = next(&mut w).await;
    assert_eq!(
        (m.kind, m.workload_id.as_str()),
        (Kind::ContextChanged as i32, "w")
    );
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert_eq!(r.reason, "fail_closed:sensor_unavailable", "{r:?}");

    // A bad heartbeat is rejected and counted.
    let s = ctx
        .report(tokio_stream::iter(vec![heartbeat("w", 2, 0)]))
        .await
        .expect("report")
        .into_inner();
    assert_eq!((s.accepted, s.rejected), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answer_lets_an_ip_only_connection_through() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let ip_only = || {
        let mut r = req("w", "", 443);
        r.host_source = HostSource::OriginalDst as i32;
        if let Some(d) = r.destination.as_mut() {
            d.ip = "140.82.112.3".into();
        }
        r
    };
    let r = check(&mut c, ip_only()).await;
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");

    let mut w = c
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next(&mut w).await.kind, Kind::Hello as i32);
    let mut ctx = pdp.context().await;
    let dns = |workload: &str, name: &str| secureops_proto::v1::ProcessEvent {
        workload_id: workload.into(),
        sensor_id: "dns".into(),
        seq: 1,
        timestamp_unix_nanos: 0,
        event: Some(secureops_proto::v1::process_event::Event::DnsAnswer(
            secureops_proto::v1::DnsAnswer {
                name: name.into(),
                ips: vec!["140.82.112.3".into()],
                ttl_seconds: 60,
            },
        )),
    };
    let s = ctx
        .report(tokio_stream::iter(vec![
            dns("other", "github.com"),
            dns("w", "evil.example"),
            dns("w", "GitHub.com."),
        ]))
        .await
        .expect("report")
        .into_inner();
    assert_eq!(s.accepted, 3);
    let m = next(&mut w).await;
    assert_eq!(m.kind, Kind::ContextChanged as i32);
    let r = check(&mut c, ip_only()).await;
    assert!(allow(&r), "{r:?}");
    assert!(r.reason.contains("github.com"), "{r:?}");
    // DNS context is per workload: one that never got the answer is denied.
    let mut r3 = ip_only();
    r3.workload_id = "third".into();
    assert_eq!(check(&mut c, r3).await.decision, Verdict::Deny as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_watch_exits_gracefully() {
    let d = data_dir();
    let mut pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let mut w = c
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next(&mut w).await.kind, Kind::Hello as i32);
    // A connected sensor (open ReportAcked stream) does not hold shutdown.
    let mut ctx = pdp.context().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = ctx
        .report_acked(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("report_acked")
        .into_inner();
    tx.send(heartbeat("w", 1, 1000)).await.expect("send");
    assert_eq!(acks.message().await.expect("ack").map(|a| a.seq), Some(1));
    let t = Instant::now();
    let st = pdp.svc.terminate(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?} after {:?}; stderr:\n{}",
        t.elapsed(),
        pdp.svc.stderr_text()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The watcher learns the stream is gone (and would flush its cache).
    // (after the CONTEXT_CHANGED the heartbeat caused).
    let mut end = None;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), w.message()).await {
            Ok(Ok(Some(m))) => assert_eq!(m.kind, Kind::ContextChanged as i32, "{m:?}"),
            other => {
                end = Some(other);
                break;
            }
        }
    }
    assert!(matches!(end, Some(Ok(Err(_)) | Ok(Ok(None)))), "{end:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), acks.message()).await;
    assert!(matches!(end, Ok(Err(_)) | Ok(Ok(None))), "{end:?}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_serve_health_and_reflection() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    for (listener, service) in [
        ("grpc", "secureops.v1.PolicyDecision"),
        ("grpc", "secureops.v1.ProcessContext"),
        ("admin", "secureops.v1.PolicyAdmin"),
    ] {
        // No token needed for health / reflection, even on the admin listener.
        let ch = tonic::transport::Channel::from_shared(pdp.svc.url(listener))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut h = HealthClient::new(ch.clone());
        let st = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(st.status, 1, "{listener} {service}: SERVING");

        let mut r = ServerReflectionClient::new(ch);
        let mut s = r
            .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .expect("reflection")
            .into_inner();
        let resp = s.message().await.expect("msg").expect("some");
        let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        assert!(
            l.service.iter().any(|x| x.name == service),
            "{listener}: {l:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_and_default_escalate() {
    let d = data_dir();
    let pdp = spawn_with_policy(
        d.path(),
        "version: 1\nmode: report\ndefault: deny\negress_allowlist:\n  - github.com\n",
    );
    let mut c = pdp.decision().await;
    let r = check(&mut c, req("w", "evil.example", 443)).await;
    assert!(allow(&r), "report mode allows: {r:?}");
    assert!(r.would_deny, "{r:?}");
    let r = check(&mut c, req("w", "github.com", 443)).await;
    assert!(allow(&r) && !r.would_deny, "{r:?}");

    let mut a = pdp.admin().await;
    let p = put(
        &mut a,
        "version: 1\nmode: enforce\ndefault: escalate\negress_allowlist:\n  - github.com\n",
    )
    .await;
    assert!(p.accepted, "{p:?}");
    let r = check(&mut c, req("w", "unknown.example", 8080)).await;
    assert_eq!(r.decision, Verdict::Escalate as i32, "{r:?}");
    assert!(r.rule_id.is_empty());
    assert!(!r.escalation_id.is_empty());
    let l = a
        .list_escalations(ListEscalationsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .escalations;
    assert_eq!(l.len(), 1);
    assert_eq!((l[0].host.as_str(), l[0].port), ("unknown.example", 8080));
    assert_eq!(l[0].first_process.as_ref().map(|p| p.pid), Some(4000));
}

/// Policy swaps under load: every answer is consistent with the version it
/// reports (github.com is allowed by the odd versions, denied by the even).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_answer_from_one_version() {
    let d = data_dir();
    let pdp = spawn_with_policy(d.path(), POLICY);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = pdp.decision().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let r = check(&mut c, req("w", "github.com", 443)).await;
                let expect_allow = r.policy_version % 2 == 1;
                assert_eq!(allow(&r), expect_allow, "{r:?}");
                seen.insert(r.policy_version);
            }
            seen
        }));
    }
    let mut a = pdp.admin().await;
    for i in 0..6 {
        let text = if i % 2 == 0 { POLICY_B } else { POLICY };
        assert!(put(&mut a, text).await.accepted);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for t in tasks {
        versions.extend(t.await.expect("task"));
    }
    assert!(versions.len() >= 2, "saw versions {versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_newest_version_fails_closed_on_restart() {
    let d = data_dir();
    let mut pdp = spawn_with_policy(d.path(), POLICY);
    {
        let mut a = pdp.admin().await;
        // v2 revokes github.com.
        assert!(put(&mut a, POLICY_B).await.accepted);
    }
    assert!(
        pdp.svc
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    std::fs::write(
        d.path().join("data/policies/2.yaml"),
        "version: 1\ndefault: allow-all\n",
    )
    .expect("tamper");
    let pdp = spawn_with_policy(d.path(), POLICY);
    let mut c = pdp.decision().await;
    let r = check(&mut c, req("w", "github.com", 443)).await;
    // Not v1 (which would re-grant github.com): deny-everything.
    assert_eq!(r.decision, Verdict::Deny as i32, "{r:?}");
    assert_eq!(r.policy_version, 0);
    assert!(
        pdp.svc
            .stderr_text()
            .contains("newest stored policy is unusable")
    );
    // The operator recovers with a rollback; numbering continues.
    let mut a = pdp.admin().await;
    let p = a
        .rollback(RollbackRequest {
            to_version: 1,
            ..RollbackRequest::default()
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!((p.accepted, p.version), (true, 3));
    assert!(allow(&check(&mut c, req("w", "github.com", 443)).await));
}
