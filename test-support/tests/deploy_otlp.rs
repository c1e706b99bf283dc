//! OTLP trace export, received by an OTLP/gRPC collector this test runs
//! (opentelemetry-proto's generated `TraceService` server).
//!
//! What is proven here: the real `secureops-pdp` binary, started with
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, exports its spans over OTLP/gRPC, and a
//! `Check` carrying W3C `traceparent` metadata produces a span that belongs to
//! the caller's trace (same trace id, parented on the caller's span): the
//! PDP hop of "one trace spanning proxy, PDP and audit".
//!
//! The whole chain (proxy → PDP → audit in one trace) is proven by
//! `deploy_otlp_chain.rs`.
//!
//! Needs the binary built (`cargo build -p secureops-policy --bins`);
//! otherwise prints `SKIPPED`.

use std::time::Duration;

use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::{CheckRequest, Destination, HostSource, ProcessInfo, Transport, Verdict};
use secureops_test_support::{Service, bin_path, skip};

mod otlp_common;
use otlp_common::{hex, start_collector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_otlp_pdp_exports_check_span_in_callers_trace() {
    let pdp_bin = bin_path("secureops-pdp");
    if !pdp_bin.exists() {
        skip!(
            "OTLP export test: {} not built (cargo build -p secureops-policy --bins)",
            pdp_bin.display()
        );
    }
    // 1. The collector.
    let (collector, otlp_addr, server) = start_collector().await;

    // 2. The real PDP, exporting to it (short batch delay: fast test).
    let dir = std::env::temp_dir().join(format!("secureops-otlp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let policy = secureops_test_support::workspace_root().join("deploy/policies/default.yaml");
    let endpoint = format!("http://{otlp_addr}");
    let args = secureops_test_support::PdpArgs::new(&dir)
        .policy(&policy)
        .build();
    let pdp = tokio::task::spawn_blocking(move || {
        Service::spawn_with(
            &pdp_bin,
            &args,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("RUST_LOG", "info"),
            ],
            &["grpc"],
        )
    })
    .await
    .unwrap_or_else(|e| panic!("spawn task: {e}"));
    let pdp = match pdp {
        Ok(p) => p,
        Err(e) => panic!("secureops-pdp did not start: {e}"),
    };

    // 3. A Check inside the caller's trace.
    let trace_id = "5ec0b5000000000000000000000c0de1";
    let parent_id = "00f067aa0ba902b7";
    let mut client = PolicyDecisionClient::connect(pdp.url("grpc"))
        .await
        .unwrap_or_else(|e| panic!("connect PDP: {e}"));
    let check = |host: &str, n: u32| {
        let mut req = tonic::Request::new(CheckRequest {
            request_id: format!("otlp-test-{n}"),
            workload_id: "otlp-test".into(),
            // Attributed: with the taint rule in force an unattributed
            // process is refused (`fail_closed:unattributed`).
            process: Some(ProcessInfo {
                pid: std::process::id(),
                start_time: 1,
                exe: "/usr/bin/curl".into(),
                argv: vec!["curl".into()],
                uid: 1000,
                ancestors: vec![],
            }),
            destination: Some(Destination {
                host: host.into(),
                port: 443,
                ip: String::new(),
                resolved_ips: vec![],
            }),
            host_source: HostSource::Sni as i32,
            transport: Transport::Tcp as i32,
            pep_id: "otlp-test".into(),
        });
        let tp = format!("00-{trace_id}-{parent_id}-01");
        if let Ok(v) = tp.parse() {
            req.metadata_mut().insert("traceparent", v);
        }
        req
    };
    let denied = client
        .check(check("attacker.example", 1))
        .await
        .unwrap_or_else(|e| panic!("Check: {e}"))
        .into_inner();
    assert_eq!(
        denied.decision,
        Verdict::Deny as i32,
        "default policy must deny an unlisted host: {denied:?}"
    );

    // The default policy's allowlist, through the real PDP.
    for (n, host) in [
        (2, "github.com"),
        (3, "files.pythonhosted.org"),
        (4, "raw.githubusercontent.com"),
    ] {
        let allowed = client
            .check(check(host, n))
            .await
            .unwrap_or_else(|e| panic!("Check: {e}"))
            .into_inner();
        assert_eq!(
            allowed.decision,
            Verdict::Allow as i32,
            "default policy must allow {host}:443: {allowed:?}"
        );
    }

    // 4. The span arrives at the collector, in the caller's trace.
    let want_trace = trace_id.to_owned();
    let mut found = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let spans = collector.snapshot();
        if let Some(s) = spans.iter().find(|s| hex(&s.trace_id) == want_trace) {
            found = Some((s.clone(), spans.len()));
            break;
        }
    }
    let Some((span, total)) = found else {
        let spans = collector.snapshot();
        panic!(
            "no span of trace {trace_id} exported within 10 s ({} spans received: {:?});\n\
             pdp stderr:\n{}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>(),
            pdp.stderr_text()
        );
    };
    eprintln!(
        "received {total} span(s); Check span `{}` from `{}`",
        span.name, span.service
    );
    assert_eq!(span.service, "secureops-pdp", "resource service.name");
    assert_eq!(
        hex(&span.parent_span_id),
        parent_id,
        "the PDP span must be a child of the caller's span (W3C traceparent)"
    );
    drop(pdp);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
