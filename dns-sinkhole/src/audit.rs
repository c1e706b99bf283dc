//! Where the sinkhole writes its one audit record per query.
//!
//! The record is written (durably, with the pep-core [`AuditSpool`]) *before*
//! the answer is sent and before anything is forwarded upstream
//! (DESIGN.md §7); if it cannot be written the query is sinkholed with
//! `fail_closed:audit_spool`.

use std::future::Future;
use std::pin::Pin;

use secureops_pep::{AuditFinding, AuditSpool};

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit: {0}")]
pub struct AuditError(pub String);

pub type AuditFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AuditError>> + Send + 'a>>;

/// A durable (or at least ordered) destination for audit records.
pub trait AuditSink: Send + Sync {
    fn record(&self, finding: AuditFinding) -> AuditFuture<'_>;
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
