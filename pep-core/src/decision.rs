//! Decisions and the PDP abstraction shared by both PEPs.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use secureops_proto::v1::{HostSource, Transport};

/// The PDP's verdict for a single egress attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The connection / query may proceed.
    Allow,
    /// The upstream is never contacted.
    Deny,
    /// Denied now; an operator may approve later.
    Escalate,
}

impl Decision {
    /// Only `Allow` lets bytes leave the box.
    pub fn is_allow(self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// Stable lowercase name, used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Escalate => "escalate",
        }
    }

    /// Wire form.
    pub fn to_proto(self) -> secureops_proto::v1::Verdict {
        match self {
            Decision::Allow => secureops_proto::v1::Verdict::Allow,
            Decision::Deny => secureops_proto::v1::Verdict::Deny,
            Decision::Escalate => secureops_proto::v1::Verdict::Escalate,
        }
    }

    /// From the wire: anything that is not explicitly ALLOW or ESCALATE
    /// (including unknown future values) is a deny.
    pub fn from_proto(v: i32) -> Decision {
        match secureops_proto::v1::Verdict::try_from(v) {
            Ok(secureops_proto::v1::Verdict::Allow) => Decision::Allow,
            Ok(secureops_proto::v1::Verdict::Escalate) => Decision::Escalate,
            _ => Decision::Deny,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the PEP behaves when it cannot get a definitive answer (PDP error,
/// timeout, open breaker, malformed handshake, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum FailMode {
    /// Deny / RST / sinkhole. The default, and the contract.
    #[default]
    Closed,
    /// Allow on PDP failure. Only as an explicit operator choice; every such
    /// allow is audited with its fail-closed cause and `fail_mode = "open"`.
    Open,
}

impl FailMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        }
    }
}

impl std::str::FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" => Ok(FailMode::Closed),
            "open" => Ok(FailMode::Open),
            other => Err(format!(
                "unknown fail mode {other:?} (expected closed|open)"
            )),
        }
    }
}

/// A process identity that survives PID reuse, plus what the PEP read about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// 0 when the socket could not be attributed.
    pub pid: u32,
    /// Clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    pub exe: String,
    pub argv: Vec<String>,
    pub uid: u32,
    /// Nearest first: (pid, start_time, exe).
    pub ancestors: Vec<(u32, u64, String)>,
}

impl ProcessIdentity {
    /// Wire form.
    pub fn to_proto(&self) -> secureops_proto::v1::ProcessInfo {
        secureops_proto::v1::ProcessInfo {
            pid: self.pid,
            start_time: self.start_time,
            exe: self.exe.clone(),
            argv: self.argv.clone(),
            uid: self.uid,
            ancestors: self
                .ancestors
                .iter()
                .map(|(pid, st, exe)| secureops_proto::v1::ProcessRef {
                    pid: *pid,
                    start_time: *st,
                    exe: exe.clone(),
                })
                .collect(),
        }
    }
}

/// The per-connection context handed to the PDP: who is asking, and for what.
#[derive(Debug, Clone)]
pub struct ConnectionRequest {
    /// Unique per attempt; echoed in the audit record.
    pub request_id: String,
    pub workload_id: String,
    pub process: ProcessIdentity,
    /// Host as seen on the wire (or an IP literal).
    pub host: String,
    pub port: u16,
    /// The IP the PEP will dial (or the original destination), when known.
    pub ip: Option<IpAddr>,
    /// Every address the PEP resolved the host to.
    pub resolved_ips: Vec<IpAddr>,
    pub host_source: HostSource,
    pub transport: Transport,
}

impl ConnectionRequest {
    /// Wire form of the request.
    pub fn to_proto(&self, pep_id: &str) -> secureops_proto::v1::CheckRequest {
        secureops_proto::v1::CheckRequest {
            request_id: self.request_id.clone(),
            workload_id: self.workload_id.clone(),
            process: Some(self.process.to_proto()),
            destination: Some(secureops_proto::v1::Destination {
                host: self.host.clone(),
                port: u32::from(self.port),
                ip: self.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                resolved_ips: self.resolved_ips.iter().map(|ip| ip.to_string()).collect(),
            }),
            host_source: self.host_source as i32,
            transport: self.transport as i32,
            pep_id: pep_id.to_string(),
        }
    }
}

/// How long and for whom a PEP may reuse a decision (DESIGN.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheHint {
    /// Ask again next time.
    #[default]
    None,
    /// Any process of the workload, for (host, port), for `ttl`.
    Workload { ttl: Duration },
    /// Only this (pid, start_time), for (host, port), for `ttl`.
    Process { ttl: Duration },
}

/// The full answer of a PDP for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdpOutcome {
    pub decision: Decision,
    /// Short machine-readable reason (`rule:x`, `default_deny`,
    /// `fail_closed:pdp_timeout`, ...).
    pub reason: String,
    pub rule_id: String,
    pub policy_version: u64,
    pub escalation_id: String,
    pub cache: CacheHint,
    /// Set when the outcome was produced by a failure path (e.g.
    /// `pdp_timeout`, `breaker_open`); the reason is then `fail_closed:<cause>`.
    pub fail_closed_cause: Option<String>,
    /// `mode: report`: allowed, but enforcement would have denied.
    pub would_deny: bool,
}

impl PdpOutcome {
    /// A deny produced by a failure path: reason `fail_closed:<cause>`, never
    /// cached.
    pub fn fail_closed(cause: impl Into<String>) -> Self {
        let cause = cause.into();
        PdpOutcome {
            decision: Decision::Deny,
            reason: format!("fail_closed:{cause}"),
            rule_id: String::new(),
            policy_version: 0,
            escalation_id: String::new(),
            cache: CacheHint::None,
            fail_closed_cause: Some(cause),
            would_deny: false,
        }
    }

    /// A plain decision with a reason, not cacheable.
    pub fn new(decision: Decision, reason: impl Into<String>) -> Self {
        PdpOutcome {
            decision,
            reason: reason.into(),
            rule_id: String::new(),
            policy_version: 0,
            escalation_id: String::new(),
            cache: CacheHint::None,
            fail_closed_cause: None,
            would_deny: false,
        }
    }

    /// Apply the operator's [`FailMode`]: with `Open`, a fail-closed deny
    /// becomes an allow that still carries its cause (and is audited as such).
    /// Policy denies are never changed.
    pub fn apply_fail_mode(mut self, mode: FailMode) -> Self {
        if mode == FailMode::Open && self.fail_closed_cause.is_some() {
            self.decision = Decision::Allow;
            self.reason = self.reason.replacen("fail_closed:", "fail_open:", 1);
        }
        self
    }
}

/// A boxed future returned by [`PolicyDecisionPoint::decide`].
pub type PdpFuture<'a> = Pin<Box<dyn Future<Output = PdpOutcome> + Send + 'a>>;

/// The slice of the PDP that a PEP requires.
///
/// Implementations must be infallible in the type system: every error is
/// already mapped to a fail-closed [`PdpOutcome`], so a PEP cannot forget to
/// handle one.
pub trait PolicyDecisionPoint: Send + Sync {
    /// Decide one attempt.
    fn decide<'a>(&'a self, req: &'a ConnectionRequest) -> PdpFuture<'a>;
}

impl<T: PolicyDecisionPoint + ?Sized> PolicyDecisionPoint for std::sync::Arc<T> {
    fn decide<'a>(&'a self, req: &'a ConnectionRequest) -> PdpFuture<'a> {
        (**self).decide(req)
    }
}
