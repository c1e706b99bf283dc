//! The data-plane gRPC services: `PolicyDecision` (Check, Watch) and
//! `ProcessContext` (Report, ReportAcked).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use secureops_proto::v1::policy_decision_server::PolicyDecision;
use secureops_proto::v1::process_context_server::ProcessContext;
use secureops_proto::v1::{
    CheckRequest, CheckResponse, EventAck, Invalidation, ProcessEvent, ReportSummary,
    Verdict as PbVerdict, WatchRequest, invalidation::Kind,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::context::ContextChange;
use crate::metrics::{DecisionLabels, ErrorLabels, EventLabels};
use crate::policy::{CacheScope, EvalRequest, Verdict};
use crate::state::Pdp;
use crate::validate::{self, Limits, ValidEvent};

/// Maximum ancestors added from the context store's exec ancestry when the
/// PEP sent a shorter chain.
const MAX_STORE_ANCESTORS: usize = 32;

/// `PolicyDecision` implementation.
#[derive(Debug, Clone)]
pub struct DecisionService {
    pdp: Arc<Pdp>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
}

impl DecisionService {
    /// New service over shared state; Watch streams end when `shutdown`
    /// becomes true.
    pub fn new(pdp: Arc<Pdp>, limits: Arc<Limits>, shutdown: watch::Receiver<bool>) -> Self {
        DecisionService {
            pdp,
            limits,
            shutdown,
        }
    }

    /// The Check logic, independent of tonic's request wrapper.
    pub fn decide(&self, r: &CheckRequest) -> Result<CheckResponse, Status> {
        let v = match validate::check_request(r, &self.limits) {
            Ok(v) => v,
            Err(s) => {
                self.pdp
                    .metrics
                    .check_errors
                    .get_or_create(&ErrorLabels {
                        code: "invalid_argument",
                    })
                    .inc();
                tracing::debug!(request_id = %r.request_id, error = %s.message(), "check refused");
                return Err(s);
            }
        };
        let active = self.pdp.active_guard();
        let policy = &active.policy;
        let mut ancestors = v.ancestors;
        if let Some(p) = v.process
            && policy.max_taint_window().is_some()
        {
            // Taint flows down the ancestor chain; complete a short chain
            // from exec ancestry the sensor reported.
            let start = ancestors.last().copied().unwrap_or(p);
            if ancestors.len() < MAX_STORE_ANCESTORS {
                for a in self.pdp.context.known_ancestors(
                    &r.workload_id,
                    start,
                    MAX_STORE_ANCESTORS - ancestors.len(),
                ) {
                    if a != p && !ancestors.contains(&a) {
                        ancestors.push(a);
                    }
                }
            }
        }
        let (dest_host, exe) = (
            r.destination.as_ref().map_or("", |d| d.host.as_str()),
            r.process.as_ref().map_or("", |p| p.exe.as_str()),
        );
        let req = EvalRequest {
            workload: &r.workload_id,
            exe,
            host: dest_host,
            port: v.port,
            ip: v.ip,
            resolved_ips: &v.resolved_ips,
            host_source: v.host_source,
            process: v.process,
            ancestors: &ancestors,
        };
        let ev = policy.evaluate(&req, &*self.pdp);
        let rule_id = ev.rule_id.clone().unwrap_or_default();
        let mut escalation_id = String::new();
        if ev.verdict == Verdict::Escalate {
            let host = ev.normalized_host.clone().unwrap_or_else(|| {
                if dest_host.is_empty() {
                    v.ip.map(|i| i.to_string()).unwrap_or_default()
                } else {
                    dest_host.to_ascii_lowercase()
                }
            });
            escalation_id = self.pdp.escalations.escalate(
                &r.workload_id,
                &host,
                v.port,
                &rule_id,
                r.process.as_ref(),
            );
        }
        let (decision, label) = match ev.verdict {
            Verdict::Allow => (PbVerdict::Allow, "allow"),
            Verdict::Deny => (PbVerdict::Deny, "deny"),
            Verdict::Escalate => (PbVerdict::Escalate, "escalate"),
        };
        self.pdp
            .metrics
            .decisions
            .get_or_create(&DecisionLabels {
                decision: label,
                rule: rule_id.clone(),
            })
            .inc();
        let (cache_scope, ttl) = match ev.cache_scope {
            CacheScope::None => (secureops_proto::v1::CacheScope::None, 0),
            CacheScope::Workload => (
                secureops_proto::v1::CacheScope::Workload,
                u32::try_from(ev.cache_ttl.as_millis()).unwrap_or(u32::MAX),
            ),
            CacheScope::Process => (
                secureops_proto::v1::CacheScope::Process,
                u32::try_from(ev.cache_ttl.as_millis()).unwrap_or(u32::MAX),
            ),
        };
        // An escalation is never cached: its resolution changes the answer.
        let (cache_scope, ttl) = if ev.verdict == Verdict::Escalate {
            (secureops_proto::v1::CacheScope::None, 0)
        } else {
            (cache_scope, ttl)
        };
        tracing::debug!(
            request_id = %r.request_id,
            workload = %r.workload_id,
            host = %dest_host,
            port = v.port,
            decision = label,
            reason = %ev.reason,
            rule = %rule_id,
            version = active.version,
            "check"
        );
        Ok(CheckResponse {
            decision: decision as i32,
            reason: ev.reason,
            rule_id,
            policy_version: active.version,
            escalation_id,
            cache_scope: cache_scope as i32,
            cache_ttl_ms: ttl,
            context_dependent: ev.context_dependent,
            would_deny: ev.would_deny,
        })
    }
}

/// Server stream type of Watch.
pub type InvalidationStream = Pin<Box<dyn Stream<Item = Result<Invalidation, Status>> + Send>>;

/// Keeps `secureops_pdp_watch_subscribers` accurate: decremented when the
/// forwarding task ends for any reason.
struct SubscriberGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn relevant(inv: &Invalidation, workload: &str) -> bool {
    workload.is_empty() || inv.workload_id.is_empty() || inv.workload_id == workload
}

/// Reads W3C trace-context headers (`traceparent`, `tracestate`) from gRPC
/// metadata for the OpenTelemetry propagator.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A span continuing the caller's trace when the request carries a
/// `traceparent`; `None` otherwise (keeps the untraced hot path free of span
/// overhead).
fn traced_span<T>(req: &Request<T>, name: &'static str) -> Option<tracing::Span> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    req.metadata().get("traceparent")?;
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&MetadataExtractor(req.metadata()))
    });
    let span = tracing::info_span!("pdp", rpc = name);
    // Err only when no OpenTelemetry layer is installed: nothing to link.
    let _ = span.set_parent(cx);
    Some(span)
}

#[tonic::async_trait]
impl PolicyDecision for DecisionService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let start = Instant::now();
        let span = traced_span(&request, "Check");
        let r = request.into_inner();
        let out = match span {
            Some(span) => span.in_scope(|| self.decide(&r)),
            None => self.decide(&r),
        };
        self.pdp
            .metrics
            .check_duration
            .observe(start.elapsed().as_secs_f64());
        out.map(Response::new)
    }

    type WatchStream = InvalidationStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let w = request.into_inner();
        if !w.workload_id.is_empty() {
            validate::check_workload("workload_id", &w.workload_id, &self.limits)?;
        }
        let mut rx = self.pdp.subscribe();
        let (tx, out) = mpsc::channel::<Result<Invalidation, Status>>(64);
        let hello = Invalidation {
            kind: Kind::Hello as i32,
            policy_version: self.pdp.active_guard().version,
            ..Invalidation::default()
        };
        // Subscribed before HELLO is queued: nothing published after the
        // HELLO can be missed.
        if tx.send(Ok(hello)).await.is_err() {
            return Err(Status::cancelled("watcher went away"));
        }
        let metrics = self.pdp.metrics.clone();
        metrics.watch_subscribers.inc();
        let guard = SubscriberGuard(metrics.watch_subscribers.clone());
        let mut shutdown = self.shutdown.clone();
        let pep = w.pep_id.clone();
        tracing::info!(pep_id = %pep, workload = %w.workload_id, "watch subscriber connected");
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                tokio::select! {
                    () = tx.closed() => break,
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(Status::unavailable("PDP shutting down"))).await;
                        break;
                    }
                    m = rx.recv() => match m {
                        Ok(inv) => {
                            if relevant(&inv, &w.workload_id) && tx.send(Ok(inv)).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            metrics.watch_lagged.inc();
                            tracing::warn!(pep_id = %pep, missed = n, "watch subscriber lagged; closing its stream");
                            let _ = tx
                                .send(Err(Status::data_loss(format!(
                                    "watch subscriber fell behind by {n} invalidations; flush the cache and reconnect"
                                ))))
                                .await;
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            tracing::info!(pep_id = %pep, "watch subscriber disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// `ProcessContext` implementation.
#[derive(Debug, Clone)]
pub struct ContextService {
    pdp: Arc<Pdp>,
    limits: Arc<Limits>,
    shutdown: watch::Receiver<bool>,
}

impl ContextService {
    /// New service over shared state; long-lived report streams end when
    /// `shutdown` becomes true (so a graceful shutdown is not held open by
    /// connected sensors).
    pub fn new(pdp: Arc<Pdp>, limits: Arc<Limits>, shutdown: watch::Receiver<bool>) -> Self {
        ContextService {
            pdp,
            limits,
            shutdown,
        }
    }

    /// Validate and apply one event; publish what it changed.
    pub fn apply(&self, e: &ProcessEvent) -> Result<(), Status> {
        let v = match validate::process_event(e, &self.limits) {
            Ok(v) => v,
            Err(s) => {
                self.pdp
                    .metrics
                    .context_events
                    .get_or_create(&EventLabels {
                        kind: "invalid",
                        result: "rejected",
                    })
                    .inc();
                return Err(s);
            }
        };
        let kind = v.kind();
        let w = e.workload_id.as_str();
        let ctx = &self.pdp.context;
        let change = match v {
            ValidEvent::FileOpened {
                process,
                parent,
                path,
            } => {
                // The sensor's clock and ours differ; the open happened no
                // later than now, which is the conservative (longest taint)
                // choice for an event with a future or missing timestamp.
                let at = opened_at(e.timestamp_unix_nanos);
                ctx.record_open(w, process, parent, &path, at)
            }
            ValidEvent::Exec { process, parent } => ctx.record_exec(w, process, parent),
            ValidEvent::Exit { process } => ctx.record_exit(w, process),
            ValidEvent::Dns { name, ips, ttl } => ctx.record_dns(w, &name, &ips, ttl),
            ValidEvent::Heartbeat { interval } => ctx.heartbeat(w, interval),
        };
        self.pdp
            .metrics
            .context_events
            .get_or_create(&EventLabels {
                kind,
                result: "accepted",
            })
            .inc();
        if change != ContextChange::None {
            self.pdp.publish_context_change(w, change);
        }
        Ok(())
    }
}

/// Map the sensor's wall-clock timestamp to an `Instant`, never later than
/// now (a future timestamp would shorten nothing but must not extend the
/// window beyond what happened).
fn opened_at(ts_nanos: i64) -> Instant {
    let now = Instant::now();
    if ts_nanos <= 0 {
        return now;
    }
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ts = u128::try_from(ts_nanos).unwrap_or(0);
    if ts >= now_wall {
        return now;
    }
    let age = std::time::Duration::from_nanos(u64::try_from(now_wall - ts).unwrap_or(u64::MAX));
    now.checked_sub(age).unwrap_or(now)
}

/// Server stream type of ReportAcked.
pub type AckStream = Pin<Box<dyn Stream<Item = Result<EventAck, Status>> + Send>>;

#[tonic::async_trait]
impl ProcessContext for ContextService {
    async fn report(
        &self,
        request: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let mut stream = request.into_inner();
        let mut summary = ReportSummary::default();
        let mut shutdown = self.shutdown.clone();
        loop {
            let ev = tokio::select! {
                m = stream.message() => match m? {
                    Some(ev) => ev,
                    None => break,
                },
                _ = shutdown.changed() => {
                    return Err(Status::unavailable("PDP shutting down"));
                }
            };
            summary.last_seq = ev.seq;
            match self.apply(&ev) {
                Ok(()) => summary.accepted += 1,
                Err(s) => {
                    summary.rejected += 1;
                    tracing::debug!(seq = ev.seq, error = %s.message(), "context event rejected");
                }
            }
        }
        Ok(Response::new(summary))
    }

    type ReportAckedStream = AckStream;

    async fn report_acked(
        &self,
        request: Request<Streaming<ProcessEvent>>,
    ) -> Result<Response<Self::ReportAckedStream>, Status> {
        let mut stream = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<EventAck, Status>>(256);
        let me = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = stream.message() => m,
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(Status::unavailable("PDP shutting down"))).await;
                        break;
                    }
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                };
                // Applied (and its invalidation published) before the ack.
                let error = match me.apply(&msg) {
                    Ok(()) => String::new(),
                    Err(s) => s.message().to_owned(),
                };
                if tx
                    .send(Ok(EventAck {
                        seq: msg.seq,
                        error,
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ContextConfig;
    use crate::escalation::EscalationConfig;
    use crate::metrics::Metrics;
    use futures::StreamExt;
    use secureops_proto::v1::invalidation::Kind;

    fn pdp(dir: &std::path::Path) -> Arc<Pdp> {
        let (m, _) = Metrics::new();
        match Pdp::open(
            dir,
            None,
            ContextConfig::default(),
            EscalationConfig::default(),
            m,
        ) {
            Ok(p) => Arc::new(p),
            Err(e) => panic!("open: {e}"),
        }
    }

    /// A subscriber that stops reading gets its stream closed with
    /// DATA_LOSS instead of silently missing invalidations.
    #[tokio::test]
    async fn lagging_watch_subscriber_is_disconnected() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let pdp = pdp(d.path());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let svc = DecisionService::new(Arc::clone(&pdp), Arc::new(Limits::default()), stop_rx);
        let mut s = svc
            .watch(Request::new(WatchRequest::default()))
            .await?
            .into_inner();
        let first = s.next().await.ok_or("no hello")??;
        assert_eq!(first.kind, Kind::Hello as i32);
        for _ in 0..(crate::state::BUS_CAPACITY + 200) {
            pdp.publish(Invalidation {
                kind: Kind::ContextChanged as i32,
                ..Invalidation::default()
            });
        }
        let mut delivered = 0;
        let status = loop {
            match tokio::time::timeout(std::time::Duration::from_secs(5), s.next()).await? {
                Some(Ok(_)) => delivered += 1,
                Some(Err(st)) => break st,
                None => return Err("stream ended without an error".into()),
            }
        };
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert!(delivered < crate::state::BUS_CAPACITY + 200);
        assert!(s.next().await.is_none(), "closed after the error");
        assert_eq!(pdp.metrics.watch_lagged.get(), 1);
        // The forwarding task ended and the gauge is back to 0.
        for _ in 0..100 {
            if pdp.metrics.watch_subscribers.get() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(pdp.metrics.watch_subscribers.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn watch_filters_by_workload() -> Result<(), Box<dyn std::error::Error>> {
        let d = tempfile::tempdir()?;
        let pdp = pdp(d.path());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let svc = DecisionService::new(Arc::clone(&pdp), Arc::new(Limits::default()), stop_rx);
        let mut s = svc
            .watch(Request::new(WatchRequest {
                pep_id: "p".into(),
                workload_id: "a".into(),
            }))
            .await?
            .into_inner();
        assert_eq!(s.next().await.ok_or("hello")??.kind, Kind::Hello as i32);
        for w in ["b", "a", ""] {
            pdp.publish(Invalidation {
                kind: Kind::WorkloadTainted as i32,
                workload_id: w.into(),
                ..Invalidation::default()
            });
        }
        assert_eq!(s.next().await.ok_or("a")??.workload_id, "a");
        assert_eq!(s.next().await.ok_or("global")??.workload_id, "");
        Ok(())
    }
}
