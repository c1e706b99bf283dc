//! Reports the addresses of forwarded answers to the PDP as DNS-learned
//! process context (`ProcessContext.Report`, `DnsAnswer` events), so the
//! proxy can allow an IP-only connection to an address the workload resolved
//! from an allowed name.
//!
//! Best effort by design, and safe in that direction: a lost report only
//! means the PDP does not know the IP, so an IP-only connection to it is
//! denied (fail closed). The queue is bounded; when it is full reports are
//! dropped and counted rather than slowing down DNS answers.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secureops_proto::v1::process_context_client::ProcessContextClient;
use secureops_proto::v1::{DnsAnswer, ProcessEvent, process_event};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::DnsMetrics;

/// Handle used by the request path.
#[derive(Debug, Clone)]
pub struct ContextReporter {
    tx: mpsc::Sender<(String, Vec<IpAddr>, u32)>,
    metrics: DnsMetrics,
}

const QUEUE: usize = 4096;

impl ContextReporter {
    /// Start the reporting task towards `endpoint` (`http://host:port` of
    /// the PDP). Reconnects with a bounded backoff.
    pub fn spawn(
        endpoint: String,
        workload_id: String,
        sensor_id: String,
        metrics: DnsMetrics,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint)?
            .connect_timeout(Duration::from_millis(200))
            .connect_lazy();
        let (tx, mut rx) = mpsc::channel::<(String, Vec<IpAddr>, u32)>(QUEUE);
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut backoff = Duration::from_millis(100);
            loop {
                // Wait for something to report before (re)opening a stream.
                let Some(first) = rx.recv().await else {
                    return;
                };
                let (stx, srx) = mpsc::channel::<ProcessEvent>(QUEUE);
                let mut client = ProcessContextClient::new(channel.clone());
                let call =
                    tokio::spawn(async move { client.report(ReceiverStream::new(srx)).await });
                let mut next = Some(first);
                while let Some((name, ips, ttl)) = next.take() {
                    seq += 1;
                    let ev = ProcessEvent {
                        workload_id: workload_id.clone(),
                        sensor_id: sensor_id.clone(),
                        seq,
                        timestamp_unix_nanos: now_nanos(),
                        event: Some(process_event::Event::DnsAnswer(DnsAnswer {
                            name,
                            ips: ips.iter().map(ToString::to_string).collect(),
                            ttl_seconds: ttl,
                        })),
                    };
                    if stx.send(ev).await.is_err() {
                        break; // the call ended: reconnect
                    }
                    backoff = Duration::from_millis(100);
                    next = rx.recv().await;
                    if next.is_none() {
                        drop(stx);
                        let _ = call.await;
                        return;
                    }
                }
                drop(stx);
                match call.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(status)) => tracing::debug!(%status, "context report stream ended"),
                    Err(e) => tracing::debug!(error = %e, "context report task"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Ok(ContextReporter { tx, metrics })
    }

    /// Queue one answer; never blocks.
    pub fn report(&self, name: &str, ips: Vec<IpAddr>, ttl: u32) {
        if ips.is_empty() {
            return;
        }
        match self.tx.try_send((name.to_string(), ips, ttl)) {
            Ok(()) => self.metrics.context_reports.inc(),
            Err(_) => self.metrics.context_reports_dropped.inc(),
        };
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
