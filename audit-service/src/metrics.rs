//! Prometheus metrics and the ops HTTP endpoint (`/metrics`, `/healthz`,
//! `/readyz`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Service metrics.
#[derive(Debug)]
pub struct Metrics {
    /// New entries appended.
    pub appended: Counter,
    /// Records acked as duplicates.
    pub duplicates: Counter,
    /// Records rejected as malformed.
    pub rejected: Counter,
    /// Refused credentials / wrong-source records.
    pub auth_failures: Counter,
    /// Checkpoints signed.
    pub checkpoints: Counter,
    /// Entries in the log.
    pub entries: Gauge,
    /// Time to write + fdatasync one batch.
    pub fsync_seconds: Histogram,
    /// Records per batch.
    pub batch_records: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            appended: Counter::default(),
            duplicates: Counter::default(),
            rejected: Counter::default(),
            auth_failures: Counter::default(),
            checkpoints: Counter::default(),
            entries: Gauge::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
        };
        registry.register(
            "secureops_audit_appended",
            "New audit entries appended",
            m.appended.clone(),
        );
        registry.register(
            "secureops_audit_duplicates",
            "Records acked as duplicates of an existing entry",
            m.duplicates.clone(),
        );
        registry.register(
            "secureops_audit_rejected",
            "Records rejected as malformed",
            m.rejected.clone(),
        );
        registry.register(
            "secureops_audit_auth_failures",
            "Append calls or records refused for bad credentials or source",
            m.auth_failures.clone(),
        );
        registry.register(
            "secureops_audit_checkpoints",
            "Checkpoints signed",
            m.checkpoints.clone(),
        );
        registry.register(
            "secureops_audit_entries",
            "Entries in the log",
            m.entries.clone(),
        );
        registry.register(
            "secureops_audit_batch_commit_seconds",
            "Time to write and fdatasync one batch",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "secureops_audit_batch_records",
            "Records per committed batch",
            m.batch_records.clone(),
        );
        Arc::new(m)
    }
}

/// Readiness flag shared with the ops endpoint.
#[derive(Debug, Default, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Sets readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Reads readiness.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is
/// dropped.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let registry = registry.clone();
                    let ready = ready.clone();
                    async move {
                        let (status, ctype, body) = match req.uri().path() {
                            "/metrics" => {
                                let mut s = String::new();
                                match prometheus_client::encoding::text::encode(&mut s, &registry) {
                                    Ok(()) => (
                                        StatusCode::OK,
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                        s,
                                    ),
                                    Err(_) => (
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "text/plain",
                                        "encode error\n".into(),
                                    ),
                                }
                            }
                            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
                            "/readyz" if ready.get() => {
                                (StatusCode::OK, "text/plain", "ready\n".into())
                            }
                            "/readyz" => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                "not ready\n".into(),
                            ),
                            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                        };
                        Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
