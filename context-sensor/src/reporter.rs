//! The PDP side of the sensor: one `ProcessContext.ReportAcked` stream that
//! carries file-open events and heartbeats, with reconnect + backoff and a
//! bounded queue of unacknowledged events.
//!
//! Why one owner task: the queue of unacked events, the sequence counter and
//! the current connection are touched only by [`run`], so there is no lock
//! on the hot path; the fanotify side talks to it through a bounded channel
//! ([`ReporterHandle::submit`]) and waits for its own `oneshot`.
//!
//! Guarantees:
//! * An event stays queued until the PDP acked it, even after the open it
//!   belongs to was answered (late ack): it is re-sent on every reconnect,
//!   oldest first, *before* the first heartbeat of the new stream. The PDP
//!   applies a stream in order, so a sensor that comes back (and is "live"
//!   again for `require_sensor`) has always delivered its backlog first.
//! * The queue is bounded (`max_queued`): past it the oldest event is
//!   dropped and counted (`secureops_sensor_dropped_events_total`).
//! * A stream that stops acking (PDP hung) is torn down after
//!   `3 × heartbeat + 1 s` without any ack and re-established.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use secureops_proto::v1::process_context_client::ProcessContextClient;
use secureops_proto::v1::{EventAck, Heartbeat, ProcessEvent, process_event};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::metrics::Metrics;

/// Settings of the PDP connection.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// PDP gRPC endpoint, e.g. `http://127.0.0.1:7400`.
    pub pdp: String,
    /// Workload id stamped on every event.
    pub workload: String,
    /// Identity of this sensor.
    pub sensor_id: String,
    /// Heartbeat interval (also promised to the PDP in each heartbeat).
    pub heartbeat: Duration,
    /// TCP/HTTP2 connect timeout.
    pub connect_timeout: Duration,
    /// Maximum unacknowledged events kept for re-delivery.
    pub max_queued: usize,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Cap of the reconnect delay.
    pub backoff_max: Duration,
}

/// What the PDP said about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Applied to the context store.
    Applied,
    /// Rejected, with the PDP's reason.
    Rejected(String),
}

/// One event handed to the reporter.
pub struct Submission {
    /// The payload (`FileOpened`, `ProcessExit`, ...).
    pub event: process_event::Event,
    /// Wall-clock time of the observation.
    pub observed_at: SystemTime,
    /// Monotonic time of the observation (ack-latency metric).
    pub observed_mono: Instant,
    /// Who waits for the ack (dropped receiver ⇒ the ack is counted late).
    pub waiter: Option<oneshot::Sender<AckOutcome>>,
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("reporter queue full")]
    Full,
    #[error("reporter stopped")]
    Closed,
}

/// Cheap, cloneable handle to the reporter task.
#[derive(Clone)]
pub struct ReporterHandle {
    tx: mpsc::Sender<Submission>,
}

impl ReporterHandle {
    /// Queue an event without blocking (callers run on the fanotify path).
    pub fn submit(&self, s: Submission) -> Result<(), SubmitError> {
        self.tx.try_send(s).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }
}

/// Start the reporter task on the current runtime.
pub fn spawn(
    cfg: ReporterConfig,
    metrics: Metrics,
) -> (ReporterHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(cfg.max_queued.clamp(16, 65_536));
    let task = tokio::spawn(run(cfg, rx, metrics));
    (ReporterHandle { tx }, task)
}

struct Pending {
    event: ProcessEvent,
    observed_mono: Instant,
    waiter: Option<oneshot::Sender<AckOutcome>>,
}

enum Internal {
    Connected(u64, mpsc::Sender<ProcessEvent>),
    ConnectFailed(u64, String),
    Ack(EventAck),
    StreamEnded(u64, String),
}

struct Conn {
    gen_id: u64,
    tx: mpsc::Sender<ProcessEvent>,
    last_ack: Instant,
}

/// The owner loop (see module docs). Returns when every handle is dropped.
pub async fn run(cfg: ReporterConfig, mut rx: mpsc::Receiver<Submission>, metrics: Metrics) {
    let (int_tx, mut int_rx) = mpsc::unbounded_channel::<Internal>();
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut next_seq: u64 = 1;
    let mut conn: Option<Conn> = None;
    let mut gen_id: u64 = 0;
    let mut attempting = false;
    let mut pump: Option<tokio::task::JoinHandle<()>> = None;
    let mut next_attempt = tokio::time::Instant::now();
    let mut backoff = cfg.backoff_min;
    let mut failures: u64 = 0;
    let mut hb = tokio::time::interval(cfg.heartbeat);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stall_after = cfg.heartbeat * 3 + Duration::from_secs(1);
    let stream_cap = cfg.max_queued + 1024;

    loop {
        if conn.is_none() && !attempting && tokio::time::Instant::now() >= next_attempt {
            gen_id += 1;
            attempting = true;
            // A previous stream's pump may still wait on a hung PDP.
            if let Some(old) = pump.take() {
                old.abort();
            }
            pump = Some(tokio::spawn(connect_and_pump(
                cfg.clone(),
                gen_id,
                int_tx.clone(),
                stream_cap,
            )));
        }
        tokio::select! {
            sub = rx.recv() => {
                let Some(sub) = sub else { break };
                let seq = next_seq;
                next_seq += 1;
                let event = ProcessEvent {
                    workload_id: cfg.workload.clone(),
                    sensor_id: cfg.sensor_id.clone(),
                    seq,
                    timestamp_unix_nanos: unix_nanos(sub.observed_at),
                    event: Some(sub.event),
                };
                if pending.len() >= cfg.max_queued
                    && let Some((old, _)) = pending.pop_first()
                {
                    metrics.dropped.get_or_create(&[("reason", "queue_full")]).inc();
                    tracing::warn!(seq = old, "unacked queue full: dropped the oldest event");
                }
                if let Some(c) = &conn {
                    if c.tx.try_send(event.clone()).is_ok() {
                        metrics.reports.get_or_create(&[("kind", kind_of(&event))]).inc();
                    } else {
                        tracing::warn!("PDP stream not writable; reconnecting");
                        conn = None;
                        metrics.pdp_connected.set(0);
                        next_attempt = tokio::time::Instant::now();
                    }
                }
                pending.insert(seq, Pending { event, observed_mono: sub.observed_mono, waiter: sub.waiter });
                metrics.queue_depth.set(pending.len() as i64);
            }
            msg = int_rx.recv() => {
                // int_tx lives in this scope: recv never yields None.
                let Some(msg) = msg else { continue };
                match msg {
                    Internal::Connected(g, tx) if g == gen_id => {
                        attempting = false;
                        if failures > 0 {
                            tracing::info!(pdp = %cfg.pdp, after_failures = failures, "PDP stream re-established");
                        } else {
                            tracing::info!(pdp = %cfg.pdp, "PDP stream established");
                        }
                        failures = 0;
                        backoff = cfg.backoff_min;
                        metrics.pdp_connects.get_or_create(&[("result", "ok")]).inc();
                        // Backlog first (oldest first), then a heartbeat.
                        let mut ok = true;
                        for p in pending.values() {
                            if tx.try_send(p.event.clone()).is_err() {
                                ok = false;
                                break;
                            }
                            metrics.reports.get_or_create(&[("kind", "resend")]).inc();
                        }
                        let hb_event = heartbeat_event(&cfg, next_seq);
                        next_seq += 1;
                        if ok && tx.try_send(hb_event).is_ok() {
                            metrics.reports.get_or_create(&[("kind", "heartbeat")]).inc();
                            conn = Some(Conn { gen_id: g, tx, last_ack: Instant::now() });
                            metrics.pdp_connected.set(1);
                        } else {
                            next_attempt = tokio::time::Instant::now() + backoff;
                        }
                    }
                    Internal::Connected(..) => {}
                    Internal::ConnectFailed(g, err) if g == gen_id => {
                        attempting = false;
                        failures += 1;
                        metrics.pdp_connects.get_or_create(&[("result", "error")]).inc();
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(pdp = %cfg.pdp, error = %err, failures, retry_in_ms = backoff.as_millis() as u64, "PDP unreachable");
                        }
                        next_attempt = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(cfg.backoff_max);
                    }
                    Internal::ConnectFailed(..) => {}
                    Internal::Ack(ack) => {
                        if let Some(c) = conn.as_mut() {
                            c.last_ack = Instant::now();
                        }
                        if let Some(p) = pending.remove(&ack.seq) {
                            metrics.queue_depth.set(pending.len() as i64);
                            let outcome = if ack.error.is_empty() {
                                AckOutcome::Applied
                            } else {
                                tracing::warn!(seq = ack.seq, error = %ack.error, "PDP rejected event");
                                AckOutcome::Rejected(ack.error)
                            };
                            match p.waiter {
                                Some(w) => {
                                    if w.send(outcome).is_ok() {
                                        metrics.ack_latency.observe(p.observed_mono.elapsed().as_secs_f64());
                                    } else {
                                        metrics.late_acks.inc();
                                        tracing::info!(seq = ack.seq, late_ms = p.observed_mono.elapsed().as_millis() as u64, "late ack: event applied after the open was answered");
                                    }
                                }
                                None => {
                                    metrics.late_acks.inc();
                                }
                            }
                        }
                    }
                    Internal::StreamEnded(g, why) => {
                        if conn.as_ref().is_some_and(|c| c.gen_id == g) {
                            tracing::warn!(error = %why, "PDP stream ended; reconnecting");
                            conn = None;
                            metrics.pdp_connected.set(0);
                            next_attempt = tokio::time::Instant::now() + backoff;
                        }
                    }
                }
            }
            _ = hb.tick() => {
                if let Some(c) = &conn {
                    if c.last_ack.elapsed() > stall_after {
                        tracing::warn!(silent_ms = c.last_ack.elapsed().as_millis() as u64, "PDP stream stalled (no ack); reconnecting");
                        conn = None;
                        metrics.pdp_connected.set(0);
                        next_attempt = tokio::time::Instant::now();
                    } else {
                        let ev = heartbeat_event(&cfg, next_seq);
                        next_seq += 1;
                        if c.tx.try_send(ev).is_ok() {
                            metrics.reports.get_or_create(&[("kind", "heartbeat")]).inc();
                        } else {
                            conn = None;
                            metrics.pdp_connected.set(0);
                            next_attempt = tokio::time::Instant::now();
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next_attempt), if conn.is_none() && !attempting => {}
        }
    }
}

fn heartbeat_event(cfg: &ReporterConfig, seq: u64) -> ProcessEvent {
    ProcessEvent {
        workload_id: cfg.workload.clone(),
        sensor_id: cfg.sensor_id.clone(),
        seq,
        timestamp_unix_nanos: unix_nanos(SystemTime::now()),
        event: Some(process_event::Event::Heartbeat(Heartbeat {
            interval_ms: u32::try_from(cfg.heartbeat.as_millis()).unwrap_or(u32::MAX),
        })),
    }
}

fn kind_of(e: &ProcessEvent) -> &'static str {
    match &e.event {
        Some(process_event::Event::FileOpened(_)) => "file_opened",
        Some(process_event::Event::Exec(_)) => "exec",
        Some(process_event::Event::Exit(_)) => "exit",
        Some(process_event::Event::DnsAnswer(_)) => "dns_answer",
        Some(process_event::Event::Heartbeat(_)) => "heartbeat",
        None => "empty",
    }
}

/// Nanoseconds since the Unix epoch (0 for clocks before 1970).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn connect_and_pump(
    cfg: ReporterConfig,
    gen_id: u64,
    int_tx: mpsc::UnboundedSender<Internal>,
    cap: usize,
) {
    let setup = async {
        let endpoint = Endpoint::from_shared(cfg.pdp.clone())
            .map_err(|e| format!("invalid --pdp {:?}: {e}", cfg.pdp))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = ProcessContextClient::new(channel);
        let (tx, rx) = mpsc::channel(cap);
        let resp = client
            .report_acked(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("ReportAcked: {s}"))?;
        Ok::<_, String>((tx, resp.into_inner()))
    };
    let (tx, mut acks) =
        match tokio::time::timeout(cfg.connect_timeout * 2 + Duration::from_millis(100), setup)
            .await
        {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let _ = int_tx.send(Internal::ConnectFailed(gen_id, e));
                return;
            }
            Err(_) => {
                let _ = int_tx.send(Internal::ConnectFailed(gen_id, "timed out".into()));
                return;
            }
        };
    if int_tx.send(Internal::Connected(gen_id, tx)).is_err() {
        return;
    }
    let why = loop {
        match acks.message().await {
            Ok(Some(ack)) => {
                if int_tx.send(Internal::Ack(ack)).is_err() {
                    return;
                }
            }
            Ok(None) => break "closed by the PDP".to_string(),
            Err(s) => break s.to_string(),
        }
    };
    let _ = int_tx.send(Internal::StreamEnded(gen_id, why));
}
