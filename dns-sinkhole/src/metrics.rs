//! Prometheus metrics of the sinkhole.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// allow | deny | escalate
    pub decision: &'static str,
    /// policy | fail_closed | exfil_budget | invalid_name | malformed | refused
    pub cause: &'static str,
    /// udp | tcp
    pub transport: &'static str,
}

/// Counters; cheap to clone (all `Arc` inside).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    pub queries: Family<QueryLabels, Counter>,
    pub forwarded: Counter,
    pub upstream_errors: Counter,
    pub cache_hits: Counter,
    pub audit_failures: Counter,
    pub context_reports: Counter,
    pub context_reports_dropped: Counter,
}

impl DnsMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "secureops_dns_queries",
            "DNS queries by decision, cause and transport",
            self.queries.clone(),
        );
        reg.register(
            "secureops_dns_forwarded",
            "Allowed queries answered by an upstream (cache misses)",
            self.forwarded.clone(),
        );
        reg.register(
            "secureops_dns_upstream_errors",
            "Allowed queries answered SERVFAIL because every upstream failed",
            self.upstream_errors.clone(),
        );
        reg.register(
            "secureops_dns_cache_hits",
            "Allowed queries answered from the answer cache",
            self.cache_hits.clone(),
        );
        reg.register(
            "secureops_dns_audit_failures",
            "Queries sinkholed because the audit record could not be spooled",
            self.audit_failures.clone(),
        );
        reg.register(
            "secureops_dns_context_reports",
            "DNS answers reported to the PDP as process context",
            self.context_reports.clone(),
        );
        reg.register(
            "secureops_dns_context_reports_dropped",
            "DNS answers not reported because the report queue was full",
            self.context_reports_dropped.clone(),
        );
    }
}
