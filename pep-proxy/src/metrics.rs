//! Prometheus metrics of the proxy (served by `secureops_pep::telemetry`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
/// `{mode, decision}` from a fixed set of names: no allocation per count.
type DecisionLabels = [(&'static str, &'static str); 2];

/// Every metric the proxy exports. Cheap to clone (all `Arc`s inside).
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `secureops_proxy_decisions_total{mode,decision}`
    pub decisions: Family<DecisionLabels, Counter>,
    /// `secureops_proxy_fail_closed_total{cause}`
    pub fail_closed: Family<Labels, Counter>,
    /// `secureops_proxy_tunnels_active`
    pub tunnels_active: Gauge,
    /// `secureops_proxy_upstream_connect_errors_total`
    pub upstream_errors: Counter,
    /// `secureops_proxy_audit_errors_total`
    pub audit_errors: Counter,
    /// `secureops_proxy_enforcement_tier{tier}` = 1 for the active tier.
    pub tier: Family<Labels, Gauge>,
    /// `secureops_proxy_decision_duration_seconds`: PDP latency as seen by
    /// the proxy.
    pub decision_seconds: Histogram,
    /// `secureops_proxy_refused_before_lookup_total`: names refused on the
    /// name alone, so never looked up in DNS.
    pub dns_lookups_avoided: Counter,
    /// `secureops_proxy_answer_checks_skipped_total`: allowed names whose
    /// DNS answer held only ordinary addresses, so it could not change the
    /// decision and was not sent back to the PDP.
    pub answer_checks_skipped: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        ProxyMetrics {
            decisions: Family::default(),
            fail_closed: Family::default(),
            tunnels_active: Gauge::default(),
            upstream_errors: Counter::default(),
            audit_errors: Counter::default(),
            tier: Family::default(),
            decision_seconds: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
            dns_lookups_avoided: Counter::default(),
            answer_checks_skipped: Counter::default(),
        }
    }

    /// Register everything under `secureops_proxy_*`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("secureops_proxy");
        sub.register(
            "decisions",
            "Final decisions per connection attempt / plain-HTTP request",
            self.decisions.clone(),
        );
        sub.register(
            "fail_closed",
            "Attempts denied by a failure path, by cause",
            self.fail_closed.clone(),
        );
        sub.register(
            "tunnels_active",
            "Allowed tunnels currently open",
            self.tunnels_active.clone(),
        );
        sub.register(
            "upstream_connect_errors",
            "Allowed attempts whose upstream dial failed",
            self.upstream_errors.clone(),
        );
        sub.register(
            "audit_errors",
            "Audit records the sink refused (each denied the attempt)",
            self.audit_errors.clone(),
        );
        sub.register(
            "enforcement_tier",
            "Enforcement tier of this proxy (1 for the active tier)",
            self.tier.clone(),
        );
        sub.register(
            "decision_duration_seconds",
            "PDP decision latency seen by the proxy",
            self.decision_seconds.clone(),
        );
        sub.register(
            "refused_before_lookup",
            "Named destinations refused on the name alone (no DNS lookup made)",
            self.dns_lookups_avoided.clone(),
        );
        sub.register(
            "answer_checks_skipped",
            "Allowed names whose DNS answer held only ordinary addresses (no second PDP check)",
            self.answer_checks_skipped.clone(),
        );
    }

    pub fn count_decision(&self, mode: &'static str, decision: &'static str) {
        self.decisions
            .get_or_create(&[("mode", mode), ("decision", decision)])
            .inc();
    }

    pub fn count_fail_closed(&self, cause: &str) {
        self.fail_closed
            .get_or_create(&vec![("cause".to_string(), cause.to_string())])
            .inc();
    }
}
