//! Prometheus metrics of the sensor (served on `--metrics-listen`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label pair, e.g. `[("kind", "sensitive")]`.
pub type Label1 = [(&'static str, &'static str); 1];
/// Two label pairs.
pub type Label2 = [(&'static str, &'static str); 2];

/// Every metric the sensor exports. Cheap to clone (all handles are `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    /// `secureops_sensor_events_total{kind}`: fanotify events by kind
    /// (`sensitive`, `non_sensitive`, `self`, `unresolved`, `overflow`,
    /// `other`).
    pub events: Family<Label1, Counter>,
    /// `secureops_sensor_ignore_marks_total`: non-sensitive inodes cached
    /// in the kernel (`--cache-prefix`).
    pub ignore_marks: Counter,
    /// `secureops_sensor_sensitive_opens_total`.
    pub sensitive_opens: Counter,
    /// `secureops_sensor_responses_total{response,reason}`: every answer
    /// written to the kernel.
    pub responses: Family<Label2, Counter>,
    /// `secureops_sensor_response_errors_total`: writing a response failed.
    pub response_errors: Counter,
    /// `secureops_sensor_ack_latency_seconds`: submit → PDP ack, for acks
    /// that arrived within the bounded wait.
    pub ack_latency: Histogram,
    /// `secureops_sensor_ack_timeouts_total`: bounded wait expired (or the
    /// PDP rejected / was unreachable); `--on-timeout` applied.
    pub ack_timeouts: Family<Label1, Counter>,
    /// `secureops_sensor_late_acks_total`: acks that arrived after the
    /// open was already answered (the event was kept queued and delivered).
    pub late_acks: Counter,
    /// `secureops_sensor_queue_depth`: events sent/queued but not yet acked.
    pub queue_depth: Gauge,
    /// `secureops_sensor_dropped_events_total{reason}`: events that could
    /// not be kept (queue full).
    pub dropped: Family<Label1, Counter>,
    /// `secureops_sensor_reports_total{kind}`: events written to the PDP
    /// stream (`file_opened`, `heartbeat`, `resend`).
    pub reports: Family<Label1, Counter>,
    /// `secureops_sensor_pdp_connected`: 1 while the ReportAcked stream is up.
    pub pdp_connected: Gauge,
    /// `secureops_sensor_pdp_connects_total{result}`.
    pub pdp_connects: Family<Label1, Counter>,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            events: Family::default(),
            sensitive_opens: Counter::default(),
            ignore_marks: Counter::default(),
            responses: Family::default(),
            response_errors: Counter::default(),
            // 50 µs .. ~1.6 s
            ack_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            ack_timeouts: Family::default(),
            late_acks: Counter::default(),
            queue_depth: Gauge::default(),
            dropped: Family::default(),
            reports: Family::default(),
            pdp_connected: Gauge::default(),
            pdp_connects: Family::default(),
        };
        registry.register(
            "secureops_sensor_events",
            "fanotify events by kind",
            m.events.clone(),
        );
        registry.register(
            "secureops_sensor_ignore_marks",
            "non-sensitive inodes cached in the kernel as ignored",
            m.ignore_marks.clone(),
        );
        registry.register(
            "secureops_sensor_sensitive_opens",
            "opens of sensitive paths",
            m.sensitive_opens.clone(),
        );
        registry.register(
            "secureops_sensor_responses",
            "permission responses written to the kernel",
            m.responses.clone(),
        );
        registry.register(
            "secureops_sensor_response_errors",
            "failed writes of permission responses",
            m.response_errors.clone(),
        );
        registry.register(
            "secureops_sensor_ack_latency_seconds",
            "time from submitting a sensitive open to the PDP ack",
            m.ack_latency.clone(),
        );
        registry.register(
            "secureops_sensor_ack_timeouts",
            "sensitive opens answered without a timely PDP ack, by cause",
            m.ack_timeouts.clone(),
        );
        registry.register(
            "secureops_sensor_late_acks",
            "PDP acks that arrived after the open was answered",
            m.late_acks.clone(),
        );
        registry.register(
            "secureops_sensor_queue_depth",
            "events not yet acknowledged by the PDP",
            m.queue_depth.clone(),
        );
        registry.register(
            "secureops_sensor_dropped_events",
            "events dropped, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "secureops_sensor_reports",
            "events written to the PDP stream, by kind",
            m.reports.clone(),
        );
        registry.register(
            "secureops_sensor_pdp_connected",
            "1 while the ReportAcked stream to the PDP is up",
            m.pdp_connected.clone(),
        );
        registry.register(
            "secureops_sensor_pdp_connects",
            "attempts to open the ReportAcked stream, by result",
            m.pdp_connects.clone(),
        );
        m
    }
}
