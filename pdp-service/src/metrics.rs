//! Prometheus metrics of the PDP (DESIGN §9).
//!
//! Every metric handle is cheap to clone (an `Arc` inside), so the stores and
//! the gRPC services each keep the handles they update; the [`Registry`] is
//! built once and handed to the ops endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `secureops_pdp_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `escalate`.
    pub decision: &'static str,
    /// Deciding rule id, empty for the default / special-IP / fail-closed paths.
    pub rule: String,
}

/// Labels of `secureops_pdp_check_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// gRPC status code name, e.g. `invalid_argument`.
    pub code: &'static str,
}

/// Labels of `secureops_pdp_context_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `file_opened`, `exec`, `exit`, `dns_answer`, `heartbeat`, `invalid`.
    pub kind: &'static str,
    /// `accepted` or `rejected`.
    pub result: &'static str,
}

/// All PDP metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Decisions by verdict and rule.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Check requests refused before evaluation (bad input).
    pub check_errors: Family<ErrorLabels, Counter>,
    /// Check latency, from request decoded to response built.
    pub check_duration: Histogram,
    /// Active policy version.
    pub policy_version: Gauge,
    /// Process entries held by the context store.
    pub context_processes: Gauge,
    /// DNS (workload, ip) entries held by the context store.
    pub context_dns_entries: Gauge,
    /// Process entries evicted because the store was full.
    pub context_evictions: Counter,
    /// Context events by kind and result.
    pub context_events: Family<EventLabels, Counter>,
    /// Escalations waiting for an operator.
    pub escalations_pending: Gauge,
    /// Connected Watch streams.
    pub watch_subscribers: Gauge,
    /// Watch streams closed because the subscriber fell behind.
    pub watch_lagged: Counter,
    /// Invalidations published on the Watch bus.
    pub invalidations: Counter,
    /// Refused admin Put / Rollback attempts (bad policy, version conflict).
    pub policy_rejections: Counter,
}

impl Metrics {
    /// Create the metrics and register them in a new registry.
    pub fn new() -> (Self, Registry) {
        let m = Metrics {
            decisions: Family::default(),
            check_errors: Family::default(),
            // 10 µs .. ~5 s
            check_duration: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            policy_version: Gauge::default(),
            context_processes: Gauge::default(),
            context_dns_entries: Gauge::default(),
            context_evictions: Counter::default(),
            context_events: Family::default(),
            escalations_pending: Gauge::default(),
            watch_subscribers: Gauge::default(),
            watch_lagged: Counter::default(),
            invalidations: Counter::default(),
            policy_rejections: Counter::default(),
        };
        let mut r = Registry::default();
        r.register(
            "secureops_pdp_decisions",
            "Check decisions by verdict and deciding rule",
            m.decisions.clone(),
        );
        r.register(
            "secureops_pdp_check_errors",
            "Check requests refused before evaluation, by gRPC status code",
            m.check_errors.clone(),
        );
        r.register(
            "secureops_pdp_check_duration_seconds",
            "Check handling latency in seconds",
            m.check_duration.clone(),
        );
        r.register(
            "secureops_pdp_policy_version",
            "Active policy version",
            m.policy_version.clone(),
        );
        r.register(
            "secureops_pdp_context_processes",
            "Process entries in the context store",
            m.context_processes.clone(),
        );
        r.register(
            "secureops_pdp_context_dns_entries",
            "DNS (workload, ip) entries in the context store",
            m.context_dns_entries.clone(),
        );
        r.register(
            "secureops_pdp_context_evictions",
            "Context entries evicted because the store was full",
            m.context_evictions.clone(),
        );
        r.register(
            "secureops_pdp_context_events",
            "Process context events by kind and result",
            m.context_events.clone(),
        );
        r.register(
            "secureops_pdp_escalations_pending",
            "Escalations waiting for an operator decision",
            m.escalations_pending.clone(),
        );
        r.register(
            "secureops_pdp_watch_subscribers",
            "Connected Watch streams",
            m.watch_subscribers.clone(),
        );
        r.register(
            "secureops_pdp_watch_lagged",
            "Watch streams closed because the subscriber fell behind",
            m.watch_lagged.clone(),
        );
        r.register(
            "secureops_pdp_invalidations",
            "Invalidations published to Watch subscribers",
            m.invalidations.clone(),
        );
        r.register(
            "secureops_pdp_policy_rejections",
            "Refused policy Put / Rollback attempts",
            m.policy_rejections.clone(),
        );
        (m, r)
    }
}
