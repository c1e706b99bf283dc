//! One OpenTelemetry trace spanning proxy → PDP → audit for one connection,
//! received by an OTLP/gRPC collector this test runs.
//!
//! The real `secureops-pdp`, `secureops-audit` and `secureops-proxy`
//! binaries are wired like `secureops dev` does (proxy spools and ships to
//! the audit service with a per-source token), all exporting over OTLP to
//! the collector. One `CONNECT` to a denied host goes through the proxy; the
//! proxy's connection span must then appear together with the PDP's Check
//! span (parented via the `traceparent` gRPC metadata) and the audit
//! service's `audit.append` span (parented via `AuditRecord.trace_parent`)
//! in one trace.
//!
//! Needs the binaries built (`cargo build -p secureops-policy -p
//! secureops-audit -p secureops-proxy --bins`); otherwise prints `SKIPPED`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use secureops_test_support::{Service, bin_path, skip};

mod otlp_common;
use otlp_common::{ReceivedSpan, hex, start_collector};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PROXY: &str = "secureops-proxy";
const PDP: &str = "secureops-pdp";
const AUDIT: &str = "secureops-audit";

/// A trace id holding spans of all three services, if any.
fn complete_trace(spans: &[ReceivedSpan]) -> Option<Vec<u8>> {
    let mut by_trace: HashMap<&[u8], HashSet<&str>> = HashMap::new();
    for s in spans {
        by_trace
            .entry(s.trace_id.as_slice())
            .or_default()
            .insert(s.service.as_str());
    }
    by_trace
        .into_iter()
        .find(|(_, svcs)| [PROXY, PDP, AUDIT].iter().all(|n| svcs.contains(n)))
        .map(|(t, _)| t.to_vec())
}

/// Environment of a service exporting to the collector at `addr`.
fn otel_env(addr: std::net::SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        // Short batch delay: spans arrive within a fraction of a second.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
        ("RUST_LOG", "info".to_string()),
    ]
}

async fn spawn(
    bin: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    expect: &'static [&'static str],
) -> Service {
    let name = bin.display().to_string();
    let r = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Service::spawn_with(&bin, &args, &env, expect)
    })
    .await
    .unwrap_or_else(|e| panic!("spawn task: {e}"));
    r.unwrap_or_else(|e| panic!("{name} did not start: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_otlp_one_trace_spans_proxy_pdp_and_audit() {
    let (pdp_bin, audit_bin, proxy_bin) = (bin_path(PDP), bin_path(AUDIT), bin_path(PROXY));
    for b in [&pdp_bin, &audit_bin, &proxy_bin] {
        if !b.exists() {
            skip!(
                "OTLP chain test: {} not built (cargo build -p secureops-policy -p secureops-audit -p secureops-proxy --bins)",
                b.display()
            );
        }
    }

    // 1. The collector.
    let (collector, otlp_addr, server) = start_collector().await;
    let env = || otel_env(otlp_addr);

    // 2. PDP, audit (per-source token), proxy: wired like `secureops dev`.
    let dir = std::env::temp_dir().join(format!("secureops-otlp-chain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["pdp", "audit", "spool"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap_or_else(|e| panic!("mkdir: {e}"));
    }
    let token = format!(
        "otlp-chain-token-{:016x}",
        std::process::id() as u64 * 0x9e37_79b9
    );
    let tokens_file = dir.join("audit-tokens");
    let token_file = dir.join("proxy.token");
    std::fs::write(&tokens_file, format!("proxy {token}\n"))
        .unwrap_or_else(|e| panic!("write tokens: {e}"));
    std::fs::write(&token_file, &token).unwrap_or_else(|e| panic!("write token: {e}"));
    let p = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let policy = secureops_test_support::workspace_root().join("deploy/policies/default.yaml");

    let pdp = spawn(
        pdp_bin,
        secureops_test_support::PdpArgs::new(dir.join("pdp"))
            .policy(&policy)
            .build(),
        env(),
        &["grpc"],
    )
    .await;
    let audit = spawn(
        audit_bin,
        vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            p(&dir.join("audit")),
            "--tokens-file".into(),
            p(&tokens_file),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        env(),
        &["grpc"],
    )
    .await;
    let proxy = spawn(
        proxy_bin,
        vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--pdp".into(),
            pdp.url("grpc"),
            // Generous: the first Check also connects (debug build, shared box).
            "--pdp-timeout-ms".into(),
            "5000".into(),
            "--audit".into(),
            audit.url("grpc"),
            "--audit-token-file".into(),
            p(&token_file),
            "--pep-id".into(),
            "proxy".into(),
            "--spool-dir".into(),
            p(&dir.join("spool")),
            "--workload".into(),
            "otlp-chain".into(),
            // The host must resolve for the PDP to be asked at all.
            "--dns-server".into(),
            "none".into(),
            "--resolve".into(),
            "denied.test=127.0.0.1".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        env(),
        &["proxy"],
    )
    .await;

    // 3. One CONNECT to a host the default policy denies.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr("proxy"))
        .await
        .unwrap_or_else(|e| panic!("connect proxy: {e}"));
    conn.write_all(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("write CONNECT: {e}"));
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    assert!(
        resp.starts_with("HTTP/1.1 403"),
        "denied.test must be refused with 403, got {resp:?};\nproxy stderr:\n{}",
        proxy.stderr_text()
    );
    drop(conn);

    // 4. Wait (bounded) until one trace holds spans of all three services.
    let deadline = Instant::now() + Duration::from_secs(15);
    let trace = loop {
        let spans = collector.snapshot();
        if let Some(t) = complete_trace(&spans) {
            break t;
        }
        if Instant::now() >= deadline {
            panic!(
                "no trace with spans of {PROXY}, {PDP} and {AUDIT} within 15 s; received: {:?}\n\
                 proxy stderr:\n{}\naudit stderr:\n{}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name, hex(&s.trace_id)))
                    .collect::<Vec<_>>(),
                proxy.stderr_text(),
                audit.stderr_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spans: Vec<ReceivedSpan> = collector
        .snapshot()
        .into_iter()
        .filter(|s| s.trace_id == trace)
        .collect();
    eprintln!(
        "trace {}: {:?}",
        hex(&trace),
        spans
            .iter()
            .map(|s| (&s.service, &s.name))
            .collect::<Vec<_>>()
    );
    // The PDP and audit spans hang off spans of the proxy (propagated
    // context), not merely share an id by accident.
    let proxy_ids: HashSet<&[u8]> = spans
        .iter()
        .filter(|s| s.service == PROXY)
        .map(|s| s.span_id.as_slice())
        .collect();
    let pdp_span = spans
        .iter()
        .find(|s| s.service == PDP && proxy_ids.contains(s.parent_span_id.as_slice()));
    assert!(
        pdp_span.is_some(),
        "a PDP span must be a child of a proxy span: {spans:?}"
    );
    let audit_span = spans.iter().find(|s| s.service == AUDIT);
    let Some(audit_span) = audit_span else {
        panic!("no audit span in {spans:?}");
    };
    assert_eq!(audit_span.name, "audit.append");
    assert!(
        proxy_ids.contains(audit_span.parent_span_id.as_slice()),
        "the audit span must be a child of the proxy span that recorded the decision: {spans:?}"
    );

    drop(proxy);
    drop(audit);
    drop(pdp);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The audit hop alone: a record whose `trace_parent` carries a W3C
/// traceparent yields an `audit.append` span in that trace, parented on the
/// given span; a record without one (or with garbage) yields no span and is
/// appended all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_otlp_audit_append_joins_the_records_trace() {
    use secureops_proto::v1::audit_client::AuditClient;
    use secureops_proto::v1::{AuditFinding, AuditRecord};
    let audit_bin = bin_path(AUDIT);
    if !audit_bin.exists() {
        skip!(
            "OTLP audit test: {} not built (cargo build -p secureops-audit --bins)",
            audit_bin.display()
        );
    }
    let (collector, otlp_addr, server) = start_collector().await;
    let dir = std::env::temp_dir().join(format!("secureops-otlp-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("audit")).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let token = "otlp-audit-test-token-0123456789";
    let tokens_file = dir.join("audit-tokens");
    std::fs::write(&tokens_file, format!("pep-otlp {token}\n"))
        .unwrap_or_else(|e| panic!("write tokens: {e}"));
    let audit = spawn(
        audit_bin,
        vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.join("audit").to_string_lossy().into_owned(),
            "--tokens-file".into(),
            tokens_file.to_string_lossy().into_owned(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        otel_env(otlp_addr),
        &["grpc"],
    )
    .await;

    let trace_id = "5ec0b5000000000000000000000a0d17";
    let parent_id = "00f067aa0ba902b7";
    let rec = |seq: u64, trace_parent: &str| AuditRecord {
        source_id: "pep-otlp".into(),
        source_seq: seq,
        finding: Some(AuditFinding {
            pep_kind: "proxy".into(),
            pep_id: "pep-otlp".into(),
            host: format!("h{seq}.test"),
            request_id: format!("r{seq}"),
            ..Default::default()
        }),
        trace_parent: trace_parent.into(),
    };
    let records = vec![
        rec(1, ""),
        rec(2, "not-a-traceparent"),
        rec(3, &format!("00-{trace_id}-{parent_id}-01")),
    ];
    let mut client = AuditClient::connect(audit.url("grpc"))
        .await
        .unwrap_or_else(|e| panic!("connect audit: {e}"));
    let mut req = tonic::Request::new(tokio_stream::iter(records));
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    let mut acks = client
        .append(req)
        .await
        .unwrap_or_else(|e| panic!("Append: {e}"))
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), acks.message()).await {
            Ok(Ok(Some(a))) => got.push(a),
            other => panic!("ack {}: {other:?}", got.len() + 1),
        }
    }
    for (i, a) in got.iter().enumerate() {
        assert!(a.error.is_empty(), "record {} rejected: {a:?}", i + 1);
    }
    let index3 = got[2].index;

    let deadline = Instant::now() + Duration::from_secs(15);
    let span = loop {
        let spans = collector.snapshot();
        if let Some(s) = spans.iter().find(|s| s.service == AUDIT) {
            break s.clone();
        }
        if Instant::now() >= deadline {
            panic!(
                "no audit span within 15 s (index {index3});\naudit stderr:\n{}",
                audit.stderr_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(span.name, "audit.append");
    assert_eq!(
        (hex(&span.trace_id), hex(&span.parent_span_id)),
        (trace_id.to_string(), parent_id.to_string()),
        "joins the record's trace as a child of the PEP span: {span:?} (all: {:?})",
        collector.snapshot()
    );
    assert_eq!(span.span_id.len(), 8, "a span id of its own: {span:?}");
    // Give a straggler batch a moment: the untraced records made no span.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let audit_spans = collector
        .snapshot()
        .into_iter()
        .filter(|s| s.service == AUDIT)
        .count();
    assert_eq!(audit_spans, 1, "only the traced record makes a span");
    drop(audit);
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
