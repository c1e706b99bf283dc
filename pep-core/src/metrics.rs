//! Prometheus metrics of the PDP client, decision cache and audit spool.
//!
//! The binary owns the [`Registry`]; this crate only creates metric handles
//! and registers them when asked ([`PepMetrics::register`]), so two PEPs in
//! one process (tests) never fight over a global registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::decision::PdpOutcome;

type Labels2 = [(&'static str, String); 2];
type Labels1 = [(&'static str, String); 1];

/// Metric handles shared by [`crate::GrpcPdp`], [`crate::DecisionCache`],
/// [`crate::AuditSpool`] and [`crate::Shipper`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PepMetrics {
    /// `secureops_pep_pdp_outcomes_total{decision, cause}`; cause is `none`
    /// for PDP answers and the fail-closed cause otherwise.
    pub pdp_outcomes: Family<Labels2, Counter>,
    /// `secureops_pep_pdp_check_duration_seconds` (calls that reached the
    /// stack, cache hits excluded).
    pub pdp_latency: Histogram,
    /// `secureops_pep_pdp_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Gauge,
    /// `secureops_pep_decision_cache_lookups_total{result=hit|miss|bypass}`.
    pub cache_lookups: Family<Labels1, Counter>,
    /// `secureops_pep_decision_cache_flushes_total`.
    pub cache_flushes: Counter,
    /// `secureops_pep_watch_connected`: 1 while the Watch stream is up.
    pub watch_connected: Gauge,
    /// `secureops_pep_audit_spool_appends_total{result=ok|full|error}`.
    pub spool_appends: Family<Labels1, Counter>,
    /// `secureops_pep_audit_spool_unacked_records`.
    pub spool_unacked: Gauge,
    /// `secureops_pep_audit_spool_deferred_total`: single records handed to
    /// the writer thread because a sync or another write was running, or
    /// because they open a new segment (the rest are written on the
    /// caller's thread).
    pub spool_deferred: Counter,
    /// `secureops_pep_audit_shipped_total` (acked by the audit service).
    pub shipped: Counter,
    /// `secureops_pep_audit_shipper_connected`.
    pub shipper_connected: Gauge,
}

impl Default for PepMetrics {
    fn default() -> Self {
        PepMetrics {
            pdp_outcomes: Family::default(),
            pdp_latency: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
            ]),
            breaker_state: Gauge::default(),
            cache_lookups: Family::default(),
            cache_flushes: Counter::default(),
            watch_connected: Gauge::default(),
            spool_appends: Family::default(),
            spool_unacked: Gauge::default(),
            spool_deferred: Counter::default(),
            shipped: Counter::default(),
            shipper_connected: Gauge::default(),
        }
    }
}

impl PepMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register every metric into the binary's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "secureops_pep_pdp_outcomes",
            "PDP client outcomes by decision and fail-closed cause",
            self.pdp_outcomes.clone(),
        );
        registry.register(
            "secureops_pep_pdp_check_duration_seconds",
            "Latency of PDP checks that reached the client stack",
            self.pdp_latency.clone(),
        );
        registry.register(
            "secureops_pep_pdp_breaker_state",
            "PDP circuit breaker state (0 closed, 1 open, 2 half-open)",
            self.breaker_state.clone(),
        );
        registry.register(
            "secureops_pep_decision_cache_lookups",
            "Decision cache lookups by result (hit, miss, bypass)",
            self.cache_lookups.clone(),
        );
        registry.register(
            "secureops_pep_decision_cache_flushes",
            "Decision cache flushes (invalidations, Watch up/down)",
            self.cache_flushes.clone(),
        );
        registry.register(
            "secureops_pep_watch_connected",
            "1 while the PDP Watch stream is connected",
            self.watch_connected.clone(),
        );
        registry.register(
            "secureops_pep_audit_spool_appends",
            "Audit spool appends by result (ok, full, error)",
            self.spool_appends.clone(),
        );
        registry.register(
            "secureops_pep_audit_spool_unacked_records",
            "Audit records spooled but not yet acknowledged",
            self.spool_unacked.clone(),
        );
        registry.register(
            "secureops_pep_audit_spool_deferred",
            "Records handed to the spool's writer thread (a sync or write was running, or a new segment was due)",
            self.spool_deferred.clone(),
        );
        registry.register(
            "secureops_pep_audit_shipped",
            "Audit records acknowledged by the audit service",
            self.shipped.clone(),
        );
        registry.register(
            "secureops_pep_audit_shipper_connected",
            "1 while the audit shipper stream is connected",
            self.shipper_connected.clone(),
        );
    }

    pub(crate) fn count_outcome(&self, o: &PdpOutcome) {
        let cause = o
            .fail_closed_cause
            .clone()
            .unwrap_or_else(|| "none".to_string());
        self.pdp_outcomes
            .get_or_create(&[
                ("decision", o.decision.as_str().to_string()),
                ("cause", cause),
            ])
            .inc();
    }

    pub(crate) fn count_cache(&self, result: &'static str) {
        self.cache_lookups
            .get_or_create(&[("result", result.to_string())])
            .inc();
    }
}
