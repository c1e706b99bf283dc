//! Ships the audit spool to the audit service over `Audit.Append`.
//!
//! Exactly-once delivery is the combination of at-least-once here and
//! deduplication by `(source_id, source_seq)` in the audit service: every
//! (re)connection resends every record above the ack watermark, acks advance
//! the watermark, the watermark is persisted (at most every
//! [`ShipperConfig::persist_interval`] and on disconnect) and fully-acked
//! segments are deleted. After a crash the records acked since the last
//! persisted watermark are resent and deduplicated by the service.
//!
//! Authentication: `authorization: Bearer <token>`, the token read from
//! `token_file` at every connection (so it can be rotated without restart).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use secureops_proto::v1::AuditRecord;
use secureops_proto::v1::audit_client::AuditClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use crate::spool::AuditSpool;

/// Shipper settings.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// `http://host:port` of the audit service.
    pub endpoint: String,
    /// This PEP's source id (must match its credential).
    pub source_id: String,
    /// File holding the bearer token (whitespace trimmed).
    pub token_file: PathBuf,
    /// Records sent but not yet acked, at most.
    pub window: usize,
    pub connect_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest delay between ack-watermark persists while acks arrive.
    pub persist_interval: Duration,
}

impl ShipperConfig {
    pub fn new(
        endpoint: impl Into<String>,
        source_id: impl Into<String>,
        token_file: impl Into<PathBuf>,
    ) -> Self {
        ShipperConfig {
            endpoint: endpoint.into(),
            source_id: source_id.into(),
            token_file: token_file.into(),
            window: 1024,
            connect_timeout: Duration::from_millis(500),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            persist_interval: crate::spool::PERSIST_INTERVAL,
        }
    }
}

/// Construction errors.
#[derive(Debug, thiserror::Error)]
pub enum ShipperError {
    #[error("invalid audit endpoint {0:?}: {1}")]
    Endpoint(String, String),
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("reading token file: {0}")]
    Token(std::io::Error),
    #[error("token is not a valid header value")]
    BadToken,
    #[error("connect: {0}")]
    Connect(tonic::transport::Error),
    #[error("append: {0}")]
    Status(#[from] tonic::Status),
    #[error("ack stream closed by the audit service")]
    Closed,
}

/// The background shipper task. Dropping it stops shipping (the spool keeps
/// the records).
#[derive(Debug)]
pub struct Shipper {
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Shipper {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

impl Shipper {
    /// Start shipping `spool` (must run inside a tokio runtime).
    pub fn spawn(spool: AuditSpool, cfg: ShipperConfig) -> Result<Shipper, ShipperError> {
        let ep = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| ShipperError::Endpoint(cfg.endpoint.clone(), e.to_string()))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let handle = tokio::spawn(run(spool, cfg, ep));
        Ok(Shipper {
            handle: Some(handle),
        })
    }

    /// Stop the task (also done on drop). Unacked records stay spooled.
    pub fn abort(&self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }

    /// Stop the task and wait until it is gone (its spool handle released,
    /// so the spool can be reopened in this process).
    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }
}

async fn persist(spool: &AuditSpool) {
    let s = spool.clone();
    match tokio::task::spawn_blocking(move || s.persist_acks()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "audit spool: persisting ack watermark failed"),
        Err(e) => tracing::error!(error = %e, "audit spool: persist task failed"),
    }
}

async fn run(spool: AuditSpool, cfg: ShipperConfig, ep: Endpoint) {
    let metrics = spool.metrics().clone();
    let mut backoff = cfg.min_backoff;
    loop {
        let before = spool.acked_through();
        let res = session(&spool, &cfg, &ep).await;
        metrics.shipper_connected.set(0);
        persist(&spool).await;
        if let Err(e) = res {
            tracing::warn!(error = %e, unacked = spool.unacked_len(), "audit shipper disconnected");
        }
        if spool.acked_through() > before {
            backoff = cfg.min_backoff;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// One connection: resend everything above the watermark, then follow.
async fn session(
    spool: &AuditSpool,
    cfg: &ShipperConfig,
    ep: &Endpoint,
) -> Result<(), SessionError> {
    let token = tokio::fs::read_to_string(&cfg.token_file)
        .await
        .map_err(SessionError::Token)?;
    let auth: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| SessionError::BadToken)?;
    let channel = ep.connect().await.map_err(SessionError::Connect)?;
    let mut client = AuditClient::new(channel);
    let (tx, rx) = mpsc::channel::<AuditRecord>(cfg.window.max(1));
    let mut sent_through = spool.acked_through();
    // Queue the backlog before opening the call: a server that waits for the
    // first record before answering headers must not deadlock us.
    send_more(spool, cfg, &tx, &mut sent_through);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", auth);
    let mut acks = client.append(req).await?.into_inner();
    spool.metrics().shipper_connected.set(1);
    let mut new_records = spool.subscribe();
    let mut last_persist = Instant::now();
    loop {
        send_more(spool, cfg, &tx, &mut sent_through);
        tokio::select! {
            msg = acks.message() => {
                let Some(ack) = msg? else { return Err(SessionError::Closed) };
                if ack.source_id != cfg.source_id || ack.source_seq == 0 || ack.source_seq > sent_through {
                    tracing::warn!(source_id = %ack.source_id, seq = ack.source_seq, "audit shipper: ignoring unexpected ack");
                    continue;
                }
                if !ack.error.is_empty() {
                    // Rejected as malformed: resending cannot help; it stays
                    // in the local spool files until trimmed.
                    tracing::error!(seq = ack.source_seq, error = %ack.error, "audit service rejected record");
                }
                spool.ack(ack.source_seq);
                spool.metrics().shipped.inc();
                if last_persist.elapsed() >= cfg.persist_interval {
                    persist(spool).await;
                    last_persist = Instant::now();
                }
            }
            changed = new_records.changed() => {
                if changed.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            // Persist a trailing watermark when acks stop arriving.
            _ = tokio::time::sleep(cfg.persist_interval), if spool.acked_through() > 0 => {
                persist(spool).await;
                last_persist = Instant::now();
            }
        }
    }
}

/// Push records above `sent_through` into the stream while the window has
/// room (never blocks).
fn send_more(
    spool: &AuditSpool,
    cfg: &ShipperConfig,
    tx: &mpsc::Sender<AuditRecord>,
    sent_through: &mut u64,
) {
    let in_flight = sent_through.saturating_sub(spool.acked_through()) as usize;
    let room = cfg.window.saturating_sub(in_flight).min(tx.capacity());
    if room == 0 {
        return;
    }
    for mut rec in spool.unacked_after(*sent_through, room) {
        rec.source_id = cfg.source_id.clone();
        let seq = rec.source_seq;
        if tx.try_send(rec).is_err() {
            break;
        }
        *sent_through = seq;
    }
}
