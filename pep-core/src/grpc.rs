//! [`GrpcPdp`]: the fail-closed gRPC client of the PDP (DESIGN.md §8).
//!
//! Every way a call can go wrong ends in [`fail_closed_outcome`], which is the
//! only place errors become decisions: `Decision::Deny` with reason
//! `fail_closed:<cause>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use secureops_proto::v1::policy_decision_client::PolicyDecisionClient;
use secureops_proto::v1::{CacheScope, CheckRequest, CheckResponse, Verdict};
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

use crate::breaker::{Breaker, BreakerConfig, BreakerLayer, BreakerOpen, BreakerState};
use crate::cache::{CacheConfig, DecisionCache, spawn_watch};
use crate::decision::{
    CacheHint, ConnectionRequest, Decision, PdpFuture, PdpOutcome, PolicyDecisionPoint,
};
use crate::metrics::PepMetrics;

/// Boxed error of the client stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The PDP answered with something a PEP cannot act on.
#[derive(Debug, thiserror::Error)]
#[error("bad PDP response: {0}")]
pub struct BadResponse(pub String);

/// Construction errors of [`GrpcPdp`].
#[derive(Debug, thiserror::Error)]
pub enum GrpcPdpError {
    #[error("invalid PDP endpoint {0:?}: {1}")]
    Endpoint(String, String),
}

/// Tuning of [`GrpcPdp`]; defaults follow DESIGN.md §8.
#[derive(Debug, Clone)]
pub struct GrpcPdpConfig {
    /// `http://host:port` of the PDP data listener.
    pub endpoint: String,
    /// This PEP instance (sent as `pep_id`).
    pub pep_id: String,
    /// Workload this PEP enforces for (Watch filter; empty = all).
    pub workload_id: String,
    /// Overall deadline of one decision, readiness included. Default 50 ms.
    pub deadline: Duration,
    /// TCP connect timeout to the PDP. Default 200 ms.
    pub connect_timeout: Duration,
    /// In-flight checks before new ones are shed. Default 512.
    pub max_in_flight: usize,
    pub breaker: BreakerConfig,
    /// HTTP/2 PING interval / timeout: detects a dead PDP (and a dead Watch
    /// stream) without traffic. Defaults 5 s / 2 s.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// `Some` enables the decision cache and the Watch stream.
    pub cache: Option<CacheConfig>,
}

impl GrpcPdpConfig {
    pub fn new(endpoint: impl Into<String>, pep_id: impl Into<String>) -> Self {
        GrpcPdpConfig {
            endpoint: endpoint.into(),
            pep_id: pep_id.into(),
            workload_id: String::new(),
            deadline: Duration::from_millis(50),
            connect_timeout: Duration::from_millis(200),
            max_in_flight: 512,
            breaker: BreakerConfig::default(),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(2),
            cache: Some(CacheConfig::default()),
        }
    }
}

type CheckStack = BoxCloneSyncService<CheckRequest, CheckResponse, BoxError>;

/// The gRPC PDP client. Cheap to share (`Arc` it); [`GrpcPdp::new`] never
/// blocks on the network: the channel connects lazily, so a PEP starts (and
/// denies, fail-closed) while the PDP is still down.
pub struct GrpcPdp {
    stack: CheckStack,
    pep_id: String,
    breaker: Breaker,
    cache: Option<Arc<DecisionCache>>,
    metrics: PepMetrics,
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for GrpcPdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPdp")
            .field("pep_id", &self.pep_id)
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

impl Drop for GrpcPdp {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
    }
}

/// The PDP client stack, outermost first. Readiness never blocks: the
/// breaker answers immediately while open and load shedding turns "no
/// capacity" into an immediate error, so the deadline only ever waits on the
/// network.
fn pdp_stack(channel: Channel, cfg: &GrpcPdpConfig, breaker: Breaker) -> CheckStack {
    let svc = ServiceBuilder::new()
        // 1. overall deadline of the decision
        .timeout(cfg.deadline)
        // 2. fail fast while the PDP is known to be down
        .layer(BreakerLayer::new(breaker, counts_as_pdp_failure))
        // 3. refuse instead of queueing when at capacity
        .load_shed()
        // 4. bound the in-flight checks
        .concurrency_limit(cfg.max_in_flight)
        // 5. the tonic channel (connect timeout, HTTP/2 keep-alive)
        .service(CheckCall {
            client: PolicyDecisionClient::new(channel),
            deadline: cfg.deadline,
        });
    BoxCloneSyncService::new(svc)
}

fn endpoint(cfg: &GrpcPdpConfig) -> Result<Endpoint, GrpcPdpError> {
    let ep = Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| GrpcPdpError::Endpoint(cfg.endpoint.clone(), e.to_string()))?;
    Ok(ep
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true))
}

impl GrpcPdp {
    /// Build the client. Must run inside a tokio runtime (the channel and the
    /// Watch task are spawned on it). Never waits for the PDP.
    pub fn new(cfg: GrpcPdpConfig, metrics: PepMetrics) -> Result<Self, GrpcPdpError> {
        let ep = endpoint(&cfg)?;
        let gauge = metrics.breaker_state.clone();
        gauge.set(BreakerState::Closed.as_gauge());
        // The deadline sits above the breaker and drops the call future when
        // it fires; a drop after 90% of the deadline is that timeout.
        let breaker = Breaker::new(BreakerConfig {
            abandon_counts_as_failure_after: cfg.deadline.mul_f64(0.9),
            ..cfg.breaker
        })
        .with_listener(move |s| {
            gauge.set(s.as_gauge());
        });
        let stack = pdp_stack(ep.connect_lazy(), &cfg, breaker.clone());
        let (cache, watch) = match cfg.cache {
            Some(cc) => {
                let cache = Arc::new(DecisionCache::new(cc, metrics.clone()));
                // A separate HTTP/2 connection: a long-lived stream must not
                // share fate (flow control, GOAWAY) with the hot path.
                let w = spawn_watch(
                    ep.connect_lazy(),
                    cache.clone(),
                    cfg.pep_id.clone(),
                    cfg.workload_id.clone(),
                );
                (Some(cache), Some(w))
            }
            None => (None, None),
        };
        Ok(GrpcPdp {
            stack,
            pep_id: cfg.pep_id,
            breaker,
            cache,
            metrics,
            watch,
        })
    }

    /// Current breaker state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The decision cache, when enabled.
    pub fn cache(&self) -> Option<&Arc<DecisionCache>> {
        self.cache.as_ref()
    }

    pub fn metrics(&self) -> &PepMetrics {
        &self.metrics
    }

    /// Ask the PDP (through the stack), without the cache.
    async fn ask(&self, req: CheckRequest) -> PdpOutcome {
        let started = Instant::now();
        let outcome = match self.stack.clone().oneshot(req).await {
            Ok(resp) => outcome_from_response(resp),
            Err(e) => fail_closed_outcome(&*e),
        };
        self.metrics
            .pdp_latency
            .observe(started.elapsed().as_secs_f64());
        outcome
    }
}

impl PolicyDecisionPoint for GrpcPdp {
    fn decide<'a>(&'a self, req: &'a ConnectionRequest) -> PdpFuture<'a> {
        Box::pin(async move {
            if let Some(cache) = &self.cache
                && let Some(hit) = cache.get(req)
            {
                self.metrics.count_outcome(&hit);
                return hit;
            }
            let epoch = self.cache.as_ref().map(|c| c.epoch());
            let outcome = self.ask(req.to_proto(&self.pep_id)).await;
            if let (Some(cache), Some(epoch)) = (&self.cache, epoch) {
                cache.insert(req, &outcome, epoch);
            }
            if let Some(cause) = &outcome.fail_closed_cause {
                tracing::debug!(request_id = %req.request_id, %cause, "pdp check failed closed");
            }
            self.metrics.count_outcome(&outcome);
            outcome
        })
    }
}

/// Innermost service: one unary `Check` on the channel.
#[derive(Clone)]
struct CheckCall {
    client: PolicyDecisionClient<Channel>,
    deadline: Duration,
}

impl Service<CheckRequest> for CheckCall {
    type Response = CheckResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<CheckResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The channel's own readiness is awaited inside the call, under the
        // deadline; the concurrency limit above bounds how many wait.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: CheckRequest) -> Self::Future {
        let mut client = self.client.clone();
        let deadline = self.deadline;
        Box::pin(async move {
            let mut r = tonic::Request::new(req);
            // Propagate the deadline (grpc-timeout) so the PDP stops working
            // on answers nobody waits for.
            r.set_timeout(deadline);
            inject_trace_context(r.metadata_mut());
            Ok(client.check(r).await?.into_inner())
        })
    }
}

/// Writes W3C trace-context headers into gRPC metadata for the
/// OpenTelemetry propagator.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Carry the current span's trace into the PDP (`traceparent`, plus
/// `tracestate` when set) so a decision shows up as one trace across PEP
/// and PDP. `call` runs inside the caller's poll, so `Span::current()` is
/// the PEP's connection span.
///
/// Cheap when tracing is off: a disabled span, or a span without a valid
/// OpenTelemetry context (no OTLP exporter, hence no OpenTelemetry layer),
/// returns before any formatting or propagator lookup.
pub fn inject_trace_context(md: &mut tonic::metadata::MetadataMap) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(md))
    });
}

/// Trace id (32 hex digits) of the current span, when it has a valid
/// OpenTelemetry context; `None` (and no formatting) otherwise. Used to
/// stamp `AuditFinding.trace_id` so an audit record leads to its trace.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) of the current
/// span, when it has a valid OpenTelemetry context; `None` (and no
/// formatting) otherwise. The spool puts it into `AuditRecord.trace_parent`
/// so the audit service can record its append as a child of the decision.
///
/// Formatted directly (the W3C format is fixed) rather than through the
/// global propagator, so it does not depend on which propagator is set.
pub fn current_trace_parent() -> Option<String> {
    current_span_context().map(|sc| traceparent(&sc))
}

/// The current span's OpenTelemetry context when valid (cheap early return
/// for a disabled span or no OpenTelemetry layer).
pub(crate) fn current_span_context() -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// W3C trace-context `traceparent` header value of `sc` (version 00).
pub(crate) fn traceparent(sc: &opentelemetry::trace::SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Errors that say "the PDP is not working" and count towards opening the
/// breaker: timeouts, transport failures, `Unavailable`, `DeadlineExceeded`
/// and the statuses a broken server produces (`Unknown`, `Internal`,
/// `ResourceExhausted`). An *answer* (`PermissionDenied`, `InvalidArgument`,
/// a malformed response) proves the PDP is alive and does not count; local
/// overload and an open breaker do not either.
pub fn counts_as_pdp_failure(e: &BoxError) -> bool {
    matches!(
        fail_closed_cause(&**e).as_str(),
        "pdp_timeout"
            | "pdp_unavailable"
            | "pdp_error:unknown"
            | "pdp_error:internal"
            | "pdp_error:resource_exhausted"
    )
}

/// The fail-closed cause of an error of the client stack. Walks the whole
/// source chain: tonic wraps its own client-side deadline
/// ([`tonic::TimeoutExpired`]) and connection failures in a `Status` whose
/// code alone would be misleading (`Cancelled`, `Unknown`).
pub fn fail_closed_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut status = None;
    let mut transport = false;
    while let Some(e) = cur {
        if e.is::<tower::timeout::error::Elapsed>()
            || e.is::<tokio::time::error::Elapsed>()
            || e.is::<tonic::TimeoutExpired>()
        {
            return "pdp_timeout".into();
        }
        if e.is::<BreakerOpen>() {
            return "breaker_open".into();
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return "pdp_overloaded".into();
        }
        if e.is::<BadResponse>() {
            return "pdp_bad_response".into();
        }
        if e.is::<tonic::ConnectError>()
            || e.is::<tonic::transport::Error>()
            || e.is::<std::io::Error>()
            || e.is::<hyper::Error>()
        {
            transport = true;
        }
        if status.is_none()
            && let Some(s) = e.downcast_ref::<tonic::Status>()
        {
            status = Some(s.code());
        }
        cur = e.source();
    }
    match status {
        Some(tonic::Code::DeadlineExceeded) => "pdp_timeout".into(),
        Some(tonic::Code::Unavailable) => "pdp_unavailable".into(),
        _ if transport => "pdp_unavailable".into(),
        Some(code) => format!("pdp_error:{}", code_name(code)),
        None => "pdp_error:unknown".into(),
    }
}

/// THE mapping of every PDP client error to a decision: `Decision::Deny`,
/// reason `fail_closed:<cause>` (see [`fail_closed_cause`]).
pub fn fail_closed_outcome(err: &(dyn std::error::Error + 'static)) -> PdpOutcome {
    PdpOutcome::fail_closed(fail_closed_cause(err))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Longest reason / id accepted from the PDP (they end up in logs, metrics
/// and audit records).
const MAX_FIELD: usize = 256;

fn bounded(s: String) -> String {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Map a `CheckResponse` to an outcome. `VERDICT_UNSPECIFIED` and unknown
/// verdicts are a bad response (fail-closed deny). A context-dependent
/// decision is never cached beyond its process.
pub fn outcome_from_response(resp: CheckResponse) -> PdpOutcome {
    let decision = match Verdict::try_from(resp.decision) {
        Ok(Verdict::Allow) => Decision::Allow,
        Ok(Verdict::Deny) => Decision::Deny,
        Ok(Verdict::Escalate) => Decision::Escalate,
        Ok(Verdict::Unspecified) | Err(_) => {
            return fail_closed_outcome(&BadResponse(format!("verdict {}", resp.decision)));
        }
    };
    let ttl = Duration::from_millis(u64::from(resp.cache_ttl_ms));
    let cache = match CacheScope::try_from(resp.cache_scope) {
        _ if ttl.is_zero() => CacheHint::None,
        Ok(CacheScope::Workload) if resp.context_dependent => CacheHint::Process { ttl },
        Ok(CacheScope::Workload) => CacheHint::Workload { ttl },
        Ok(CacheScope::Process) => CacheHint::Process { ttl },
        Ok(CacheScope::None) | Err(_) => CacheHint::None,
    };
    PdpOutcome {
        decision,
        reason: bounded(resp.reason),
        rule_id: bounded(resp.rule_id),
        policy_version: resp.policy_version,
        escalation_id: bounded(resp.escalation_id),
        cache,
        fail_closed_cause: None,
        would_deny: resp.would_deny,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cause_mapping() {
        let t = tower::timeout::error::Elapsed::new();
        assert_eq!(fail_closed_outcome(&t).reason, "fail_closed:pdp_timeout");
        assert_eq!(
            fail_closed_outcome(&BreakerOpen).reason,
            "fail_closed:breaker_open"
        );
        assert_eq!(
            fail_closed_outcome(&tower::load_shed::error::Overloaded::new()).reason,
            "fail_closed:pdp_overloaded"
        );
        assert_eq!(
            fail_closed_outcome(&tonic::Status::unavailable("x")).reason,
            "fail_closed:pdp_unavailable"
        );
        assert_eq!(
            fail_closed_outcome(&tonic::Status::deadline_exceeded("x")).reason,
            "fail_closed:pdp_timeout"
        );
        let o = fail_closed_outcome(&tonic::Status::permission_denied("x"));
        assert_eq!(o.reason, "fail_closed:pdp_error:permission_denied");
        assert_eq!(o.decision, Decision::Deny);
        assert_eq!(
            o.fail_closed_cause.as_deref(),
            Some("pdp_error:permission_denied")
        );
        let boxed: BoxError = Box::new(BreakerOpen);
        assert_eq!(
            fail_closed_outcome(&*boxed).reason,
            "fail_closed:breaker_open"
        );
    }

    #[test]
    fn breaker_classification() {
        let f = |e: BoxError| counts_as_pdp_failure(&e);
        assert!(f(Box::new(tonic::Status::unavailable(""))));
        assert!(f(Box::new(tonic::Status::deadline_exceeded(""))));
        assert!(!f(Box::new(tonic::Status::permission_denied(""))));
        assert!(!f(Box::new(tonic::Status::invalid_argument(""))));
        assert!(!f(Box::new(tower::load_shed::error::Overloaded::new())));
    }

    #[test]
    fn response_mapping() {
        let base = CheckResponse {
            decision: Verdict::Allow as i32,
            reason: "rule:x".into(),
            rule_id: "x".into(),
            policy_version: 7,
            cache_scope: CacheScope::Workload as i32,
            cache_ttl_ms: 1000,
            ..Default::default()
        };
        let o = outcome_from_response(base.clone());
        assert_eq!(o.decision, Decision::Allow);
        assert_eq!(o.policy_version, 7);
        assert_eq!(
            o.cache,
            CacheHint::Workload {
                ttl: Duration::from_secs(1)
            }
        );
        let o = outcome_from_response(CheckResponse {
            context_dependent: true,
            ..base.clone()
        });
        assert!(matches!(o.cache, CacheHint::Process { .. }));
        let o = outcome_from_response(CheckResponse {
            cache_ttl_ms: 0,
            ..base.clone()
        });
        assert_eq!(o.cache, CacheHint::None);
        for v in [Verdict::Unspecified as i32, 99, -1] {
            let o = outcome_from_response(CheckResponse {
                decision: v,
                ..base.clone()
            });
            assert_eq!(o.decision, Decision::Deny);
            assert_eq!(o.reason, "fail_closed:pdp_bad_response");
            assert_eq!(o.cache, CacheHint::None);
        }
        let o = outcome_from_response(CheckResponse {
            reason: "é".repeat(1000),
            ..base
        });
        assert!(o.reason.len() <= MAX_FIELD);
    }
}
