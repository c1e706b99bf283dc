//! W3C trace context from the PEP into the PDP: every Check carries the
//! current span's `traceparent` when OpenTelemetry tracing is on, and
//! nothing when it is off.

mod common;

use common::*;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use secureops_pep::{
    ConnectionRequest, GrpcPdp, GrpcPdpConfig, HostSource, PepMetrics, PolicyDecisionPoint,
    Transport,
};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

fn req(id: &str) -> ConnectionRequest {
    ConnectionRequest {
        request_id: id.into(),
        workload_id: "agent-1".into(),
        process: Default::default(),
        host: "github.com".into(),
        port: 443,
        ip: None,
        resolved_ips: vec![],
        host_source: HostSource::Connect,
        transport: Transport::Tcp,
    }
}

fn pdp(url: String) -> GrpcPdp {
    let mut c = GrpcPdpConfig::new(url, "pep-trace-test");
    c.cache = None;
    // Generous: the first call also connects (debug build, shared box).
    c.deadline = std::time::Duration::from_secs(2);
    GrpcPdp::new(c, PepMetrics::new()).unwrap()
}

/// With an OpenTelemetry layer (what `init_tracing` installs when an OTLP
/// endpoint is set), the PDP receives the span's trace id and span id.
#[tokio::test(flavor = "current_thread")]
async fn check_carries_traceparent_of_current_span() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("pep-test")));
    // Thread-local default: the current-thread runtime polls on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let knobs = new_pdp_knobs();
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = pdp(srv.url());

    let span = tracing::info_span!("connection", host = "github.com");
    let sc = span.context().span().span_context().clone();
    assert!(
        sc.is_valid(),
        "the OpenTelemetry layer gives the span a context"
    );
    let o = pdp.decide(&req("r1")).instrument(span).await;
    assert!(o.fail_closed_cause.is_none(), "{o:?}");
    let tp = knobs
        .last_traceparent
        .lock()
        .clone()
        .expect("traceparent sent");
    // version-traceid-spanid-flags
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], sc.trace_id().to_string(), "{tp}");
    assert_eq!(parts[2], sc.span_id().to_string(), "{tp}");

    // Outside any span: nothing to propagate.
    let o = pdp.decide(&req("r2")).await;
    assert!(o.fail_closed_cause.is_none(), "{o:?}");
    assert_eq!(knobs.calls(), 2);
    assert_eq!(*knobs.last_traceparent.lock(), None);
}

/// Without an OpenTelemetry layer (no OTLP exporter), spans have no valid
/// context and no header is sent, even inside a span.
#[tokio::test(flavor = "current_thread")]
async fn no_traceparent_without_opentelemetry() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
    let knobs = new_pdp_knobs();
    let srv = start_pdp("127.0.0.1:0".parse().unwrap(), knobs.clone());
    let pdp = pdp(srv.url());
    let span = tracing::info_span!("connection");
    let o = pdp.decide(&req("r1")).instrument(span).await;
    assert!(o.fail_closed_cause.is_none(), "{o:?}");
    assert_eq!(knobs.calls(), 1);
    assert_eq!(*knobs.last_traceparent.lock(), None);
}

/// The audit spool stamps `trace_id` from the current span when empty, and
/// leaves an explicit one and the untraced case alone.
#[tokio::test(flavor = "current_thread")]
async fn spool_stamps_trace_id_of_current_span() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("pep-test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let spool =
        secureops_pep::AuditSpool::open(dir.path(), secureops_pep::SpoolLimits::default()).unwrap();
    let f = |trace_id: &str| secureops_pep::AuditFinding {
        pep_kind: "proxy".into(),
        host: "github.com".into(),
        trace_id: trace_id.into(),
        ..Default::default()
    };
    let span = tracing::info_span!("connection");
    let tid = span.context().span().span_context().trace_id().to_string();
    spool.record(f("")).instrument(span.clone()).await.unwrap();
    spool
        .record(f("explicit"))
        .instrument(span.clone())
        .await
        .unwrap();
    spool.record(f("")).await.unwrap();
    // The borrowed form (what the proxy uses) stamps the same way.
    let borrowed = f("");
    spool.record_ref(&borrowed).instrument(span).await.unwrap();
    spool.record_ref(&borrowed).await.unwrap();
    let got: Vec<String> = spool
        .unacked_after(0, 10)
        .iter()
        .map(|r| r.finding.as_ref().unwrap().trace_id.clone())
        .collect();
    assert_eq!(
        got,
        vec![
            tid.clone(),
            "explicit".to_string(),
            String::new(),
            tid,
            String::new()
        ]
    );
}

/// The spool also records the span's W3C `traceparent` in
/// `AuditRecord.trace_parent` (what the audit service joins the trace
/// with), leaves it empty when untraced, and keeps it across a reopen (it is
/// part of the spooled record, not in-memory state).
#[tokio::test(flavor = "current_thread")]
async fn spool_records_traceparent_and_keeps_it_across_reopen() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("pep-test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let f = || secureops_pep::AuditFinding {
        pep_kind: "proxy".into(),
        host: "github.com".into(),
        ..Default::default()
    };
    let span = tracing::info_span!("connection");
    let sc = span.context().span().span_context().clone();
    assert!(sc.is_valid());
    let want = format!("00-{}-{}-01", sc.trace_id(), sc.span_id());
    {
        let spool =
            secureops_pep::AuditSpool::open(dir.path(), secureops_pep::SpoolLimits::default())
                .unwrap();
        spool.record(f()).instrument(span).await.unwrap();
        spool.record(f()).await.unwrap();
        let got: Vec<String> = spool
            .unacked_after(0, 10)
            .into_iter()
            .map(|r| r.trace_parent)
            .collect();
        assert_eq!(got, vec![want.clone(), String::new()]);
    }
    // The writer thread holds the directory lock until it has seen the
    // channel close; retry the reopen briefly.
    let mut reopened = None;
    for _ in 0..100 {
        match secureops_pep::AuditSpool::open(dir.path(), secureops_pep::SpoolLimits::default()) {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let spool = reopened.expect("spool reopens");
    let got: Vec<(u64, String)> = spool
        .unacked_after(0, 10)
        .into_iter()
        .map(|r| (r.source_seq, r.trace_parent))
        .collect();
    assert_eq!(got, vec![(1, want), (2, String::new())]);
}
