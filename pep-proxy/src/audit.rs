//! Where the proxy's audit records go.
//!
//! Every connection attempt (and every plain-HTTP request) produces exactly
//! one [`AuditFinding`], written *before* any byte is forwarded upstream. If
//! a sink cannot take the record the attempt is denied with
//! `fail_closed:audit_spool`: an unrecorded allow is not allowed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use secureops_pep::{AuditFinding, AuditSpool};

/// Why a record could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit sink I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit sink unavailable: {0}")]
    Unavailable(String),
}

/// Future returned by [`AuditSink::record`].
pub type AuditFuture<'a> = Pin<Box<dyn Future<Output = Result<u64, AuditError>> + Send + 'a>>;

/// A destination for audit records. `record` must be durable-enough for
/// the sink's purpose when it resolves to `Ok` (the spool: `fdatasync`ed;
/// the JSONL log: written to the file).
pub trait AuditSink: Send + Sync {
    /// Record one finding; returns its sequence number in this sink.
    fn record<'a>(&'a self, finding: &'a AuditFinding) -> AuditFuture<'a>;

    /// Best-effort "would a record be taken right now" (not full, not
    /// broken). Lets the proxy refuse a CONNECT with a `403` before it
    /// answers `200 Connection established`, instead of an RST after it.
    /// `record` stays the authority: `true` here does not promise success.
    fn accepting(&self) -> bool {
        true
    }
}

/// pep-core's durable spool (shipped to the audit service by its
/// `Shipper`): `Ok` only once the record is on disk.
pub struct SpoolAuditSink(pub AuditSpool);

impl AuditSink for SpoolAuditSink {
    fn record<'a>(&'a self, finding: &'a AuditFinding) -> AuditFuture<'a> {
        Box::pin(async move {
            self.0
                .record_ref(finding)
                .await
                .map_err(|e| AuditError::Unavailable(e.to_string()))
        })
    }

    fn accepting(&self) -> bool {
        self.0.accepting()
    }
}

/// Append-only JSON-lines file, one object per finding (`--audit-log`).
/// A local, greppable mirror for standalone mode and tests.
pub struct JsonlAuditLog {
    file: Mutex<File>,
    seq: AtomicU64,
}

impl JsonlAuditLog {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonlAuditLog {
            file: Mutex::new(file),
            seq: AtomicU64::new(0),
        })
    }
}

impl JsonlAuditLog {
    fn write(&self, finding: &AuditFinding) -> Result<u64, AuditError> {
        let mut line = finding_to_json(finding).to_string();
        line.push('\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| AuditError::Unavailable("poisoned".into()))?;
        // One write(2) on an O_APPEND file: lines never interleave.
        f.write_all(line.as_bytes())?;
        Ok(self.seq.fetch_add(1, Ordering::Relaxed))
    }
}

impl AuditSink for JsonlAuditLog {
    fn record<'a>(&'a self, finding: &'a AuditFinding) -> AuditFuture<'a> {
        Box::pin(std::future::ready(self.write(finding)))
    }
}

/// Emit each record as a structured `tracing` event (target
/// `secureops_audit`). Used when no spool / log is configured, loudly
/// warned at start: it is not a tamper-evident log.
pub struct TracingAuditLog {
    seq: AtomicU64,
}

impl TracingAuditLog {
    pub fn new() -> Self {
        TracingAuditLog {
            seq: AtomicU64::new(0),
        }
    }
}

impl Default for TracingAuditLog {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditSink for TracingAuditLog {
    fn record<'a>(&'a self, finding: &'a AuditFinding) -> AuditFuture<'a> {
        tracing::info!(target: "secureops_audit", record = %finding_to_json(finding), "audit");
        Box::pin(std::future::ready(Ok(self
            .seq
            .fetch_add(1, Ordering::Relaxed))))
    }
}

/// Several sinks; the record counts as taken only if every sink took it.
pub struct TeeAuditSink(pub Vec<Box<dyn AuditSink>>);

impl AuditSink for TeeAuditSink {
    fn record<'a>(&'a self, finding: &'a AuditFinding) -> AuditFuture<'a> {
        Box::pin(async move {
            let mut first = None;
            for s in &self.0 {
                let seq = s.record(finding).await?;
                first.get_or_insert(seq);
            }
            first.ok_or_else(|| AuditError::Unavailable("no sink configured".into()))
        })
    }

    fn accepting(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|s| s.accepting())
    }
}

/// A sink that always fails: `--audit-log` pointing to an unwritable place
/// must not silently turn into "no audit"; tests also use it to prove the
/// fail-closed path.
pub struct BrokenAuditSink(pub String);

impl AuditSink for BrokenAuditSink {
    fn record<'a>(&'a self, _finding: &'a AuditFinding) -> AuditFuture<'a> {
        Box::pin(std::future::ready(Err(AuditError::Unavailable(
            self.0.clone(),
        ))))
    }

    fn accepting(&self) -> bool {
        false
    }
}

/// JSON form of a finding (field names as in the proto).
pub fn finding_to_json(f: &AuditFinding) -> serde_json::Value {
    use secureops_pep::{HostSource, Transport};
    let verdict = secureops_pep::Decision::from_proto(f.decision).as_str();
    serde_json::json!({
        "timestamp_unix_nanos": f.timestamp_unix_nanos,
        "pep_kind": f.pep_kind,
        "pep_id": f.pep_id,
        "workload_id": f.workload_id,
        "pid": f.pid,
        "process_start_time": f.process_start_time,
        "exe": f.exe,
        "uid": f.uid,
        "host": f.host,
        "host_source": HostSource::try_from(f.host_source).map(|h| h.as_str_name()).unwrap_or("HOST_SOURCE_UNSPECIFIED"),
        "port": f.port,
        "dialled_ip": f.dialled_ip,
        "transport": Transport::try_from(f.transport).map(|t| t.as_str_name()).unwrap_or("TRANSPORT_UNSPECIFIED"),
        "decision": verdict,
        "reason": f.reason,
        "rule_id": f.rule_id,
        "policy_version": f.policy_version,
        "fail_closed_cause": f.fail_closed_cause,
        "escalation_id": f.escalation_id,
        "request_id": f.request_id,
        "would_deny": f.would_deny,
        "fail_mode": f.fail_mode,
        "trace_id": f.trace_id,
        "detail": f.detail,
    })
}
