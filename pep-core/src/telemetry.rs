//! Operations plumbing shared by every SecureOps binary: logs, traces and the
//! ops HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! Why one module: every service must look the same to an operator (same
//! flags, same endpoints, same log shape), and a tiny HTTP/1.1 server on
//! hyper is cheaper than pulling a web framework into each binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log output format, selected with `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, for terminals.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (expected text|json)")),
        }
    }
}

/// Errors of the telemetry setup.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(String),
    #[error("building the OTLP exporter: {0}")]
    Otlp(String),
    #[error("binding the ops listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Keeps the OpenTelemetry tracer provider alive; flushes spans on drop.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Install the global `tracing` subscriber: logs to stderr (stdout is
/// reserved for the `LISTENING` lines), filter from `RUST_LOG` (default
/// `info`), and an OpenTelemetry layer exporting over OTLP/gRPC when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Also installs the W3C trace-context
/// propagator so services can carry `traceparent` in gRPC metadata.
pub fn init_tracing(service: &str, format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(ep) if !ep.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build();
            Some(
                opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        _ => None,
    };
    let otel_layer = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string()))
    });
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let res = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    res.map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// Readiness flag served on `/readyz`: a service flips it once it can do
/// its job (policy loaded, listeners bound) and back when it cannot.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Print the line tests and `secureops dev` parse to learn where a listener
/// is bound: `LISTENING <name> <addr>` on stdout.
pub fn announce_listener(name: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LISTENING {name} {addr}");
    let _ = out.flush();
}

/// Bind the ops endpoint and serve `/metrics` (Prometheus text format from
/// `registry`), `/healthz` (the process is up) and `/readyz` (the readiness
/// flag). Prints `LISTENING metrics <addr>`. Returns the bound address and
/// the server task.
pub async fn serve_ops(
    listen: SocketAddr,
    registry: Arc<Registry>,
    readiness: Readiness,
) -> Result<(SocketAddr, JoinHandle<()>), TelemetryError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| TelemetryError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            addr: listen,
            source,
        })?;
    announce_listener("metrics", local);
    let handle = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "ops accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    let readiness = readiness.clone();
                    async move { Ok::<_, Infallible>(ops_response(&req, &registry, &readiness)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((local, handle))
}

fn ops_response(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        resp
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                    "text/plain",
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            if readiness.is_ready() {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready\n".into(),
                    "text/plain",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}
