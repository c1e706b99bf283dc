//! Where the sinkhole writes its one audit record per query.
//!
//! The record is written (to the pep-core [`AuditSpool`]: into the spool
//! file, so it survives a crash of the process; `fdatasync` per the spool's
//! [`SpoolSync`] policy) *before* the answer is sent and before anything is
//! forwarded upstream (DESIGN.md §7); if it cannot be written the query is
//! sinkholed with `fail_closed:audit_spool`. The UDP fast path writes one
//! batch per `recvmmsg` ([`AuditSink::record_batch`]).

use std::future::Future;
use std::pin::Pin;

use secureops_pep::{AuditFinding, AuditSpool, SpoolSync};

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit: {0}")]
pub struct AuditError(pub String);

pub type AuditFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AuditError>> + Send + 'a>>;

/// A durable (or at least ordered) destination for audit records.
pub trait AuditSink: Send + Sync {
    fn record(&self, finding: AuditFinding) -> AuditFuture<'_>;

    /// Record a batch (one receive batch of the UDP fast path), in order.
    /// All records are queued by the first poll of the returned future;
    /// it resolves once every record is written (`Err` if any failed: the
    /// caller then sinkholes every query of the batch).
    fn record_batch(&self, findings: Vec<AuditFinding>) -> AuditFuture<'_> {
        let futs: Vec<_> = findings.into_iter().map(|f| self.record(f)).collect();
        Box::pin(async move {
            let mut res = Ok(());
            for r in futures::future::join_all(futs).await {
                if r.is_err() {
                    res = r;
                }
            }
            res
        })
    }
}

impl AuditSink for AuditSpool {
    fn record(&self, finding: AuditFinding) -> AuditFuture<'_> {
        Box::pin(async move {
            AuditSpool::record(self, finding)
                .await
                .map(|_| ())
                .map_err(|e| AuditError(e.to_string()))
        })
    }

    /// One `write(2)` for the whole batch, done by this call (before the
    /// future is even polled); with `--spool-sync always` the future then
    /// waits for the batch's `fdatasync`.
    ///
    /// Inline on the receive loop on purpose, although pep-core suggests
    /// `AuditSpool::record_batch` (writer thread) for async callers: on the
    /// one pinned core the cross-thread reply cost ~20 µs at p50 and did not
    /// improve p99 (`BENCH_NOTES.md`, "Inline `append_batch` vs ...").
    fn record_batch(&self, findings: Vec<AuditFinding>) -> AuditFuture<'_> {
        if findings.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let written = self.append_batch(&findings);
        // Written (or refused): the records' buffers serve the next batch.
        crate::fastpath::recycle(findings);
        Box::pin(async move {
            let seqs = written.map_err(|e| AuditError(e.to_string()))?;
            if self.sync_policy() == SpoolSync::Always {
                self.wait_synced(*seqs.end())
                    .await
                    .map_err(|e| AuditError(e.to_string()))?;
            }
            Ok(())
        })
    }
}

/// Standalone mode without `--spool-dir`: each record becomes one structured
/// log line on target `secureops_audit` (JSON with `--log-format json`). Not
/// durable and not shipped; `--spool-dir` is the production setting.
#[derive(Debug, Default)]
pub struct LogAuditSink;

impl AuditSink for LogAuditSink {
    fn record(&self, f: AuditFinding) -> AuditFuture<'_> {
        tracing::info!(
            target: "secureops_audit",
            request_id = %f.request_id,
            workload = %f.workload_id,
            pid = f.pid,
            host = %f.host,
            decision = f.decision,
            reason = %f.reason,
            rule_id = %f.rule_id,
            policy_version = f.policy_version,
            fail_closed_cause = %f.fail_closed_cause,
            detail = %f.detail,
            "dns query"
        );
        Box::pin(std::future::ready(Ok(())))
    }
}
