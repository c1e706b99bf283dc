//! The SecureOps policy language (DESIGN §4): YAML parsing with located
//! errors, compilation into an immutable matcher, and evaluation.
//!
//! The compiled [`Policy`] is immutable, `Send + Sync` and cheap to share in an
//! `Arc`; policy swaps are therefore a pointer swap and every in-flight check
//! sees exactly one version.
//!
//! # Evaluation order
//!
//! 1. `require_sensor: true` and a silent sensor ⇒ DENY
//!    `fail_closed:sensor_unavailable`.
//! 2. Malformed input ⇒ DENY `invalid_request:host_source`,
//!    `invalid_request:port` (port 0 outside DNS), `invalid_host`,
//!    `invalid_host:empty`, `invalid_host:ip_like` (a name ending in a
//!    number). `mode: report` never turns these into an allow.
//! 3. The host is an IP literal (any spelling) ⇒ SNI: DENY `sni_ip_literal`;
//!    a different dialled IP: DENY `ip_mismatch`; else the IP path (4b).
//! 4. Candidates = rules whose destination matches (a) for names: exact
//!    host, `*.` suffixes, plus destination-less deny / escalate rules;
//!    (b) for IPs: `cidr` destinations (the IPv4 form of a mapped address
//!    too), plus destination-less deny / escalate rules (an approved
//!    destination-less escalation still needs an applicable allow `cidr`).
//!    The first candidate in
//!    (deny, escalate, allow) × file order whose workload / exe / taint
//!    conditions hold decides: `rule:<id>`, `tainted:<id>` for a rule with
//!    `when`, `fail_closed:unattributed` when a deny / escalate rule's exe or
//!    taint condition could not be checked (no process) and was assumed.
//!    Escalations consult [`ContextView::escalation_resolution`]:
//!    approved ⇒ ALLOW `escalation_approved`, denied ⇒ DENY
//!    `escalation_denied`, else ESCALATE.
//! 5. Nothing matched: names ⇒ `default_deny` / `default_escalate`;
//!    IPs ⇒ DENY `special_ip`, `ip_literal_no_cidr`, or for a host-less
//!    `ORIGINAL_DST` the names the workload learned for the IP from DNS
//!    are evaluated (ALLOW `dns_learned:<name>:<reason>`), else DENY
//!    `original_dst_unmatched`.
//! 6. A non-deny outcome for a name is DENY `dns_rebinding` when the
//!    dialled IP or any resolved IP is special-purpose and not covered by
//!    `resolved_ip_allow`. A special IP reached as an IP needs an allow
//!    rule's `cidr` (an escalate rule is not enough: DENY `special_ip`).
//! 7. `mode: report`: DENY / ESCALATE become ALLOW with `would_deny`.
//!
//! `DNS_QUERY` requests ignore rule ports: a name may be resolved if it is
//! reachable on some port.
//!
//! # Caching (DESIGN §8)
//!
//! [`CacheScope::None`] (TTL 0) when the decision rests on state that
//! changes without a policy change and is not signalled per process:
//! escalation state, a matched taint (it ages out), an assumed condition,
//! DNS-learned names, sensor liveness (`require_sensor` policies) or a
//! report-mode override. Otherwise [`CacheScope::Process`] when an exe or
//! taint condition was evaluated (an un-tainted process becomes tainted via
//! a `Watch` invalidation), else [`CacheScope::Workload`]; TTL
//! [`DEFAULT_CACHE_TTL`] (30 s).

mod context;
mod eval;
mod fxhash;
mod host;
mod ip;
mod parse;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

pub use context::{ContextView, MemoryContext};
pub use host::{HostError, normalize_host, parse_ip_literal};
pub use secureops_pep::special_ip::{
    EmbeddedClass, Embedding, SpecialRange, V4Class, classify_ip, embedded_v4,
};
pub use secureops_proto::v1::HostSource;

pub use eval::ALLOWLIST_RULE_ID;
pub(crate) use eval::Compiled;

/// Enforcement mode of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deny / escalate verdicts are enforced.
    Enforce,
    /// Everything is allowed, but a verdict that would have denied or
    /// escalated is reported (`would_deny`) so operators can dry-run a policy.
    Report,
}

/// What happens when no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DefaultAction {
    /// Deny (the safe default).
    Deny,
    /// Escalate to an operator.
    Escalate,
}

/// A compiled, validated policy.
pub struct Policy {
    pub(crate) inner: Compiled,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.rule_count())
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Parse, validate and compile a YAML policy. On failure every error
    /// found is returned, each located by line, column and rule id.
    pub fn compile(yaml: &str) -> Result<Policy, Vec<PolicyError>> {
        let doc = parse::parse(yaml)?;
        let inner = eval::compile(doc, yaml)?;
        Ok(Policy { inner })
    }

    /// Evaluate one connection attempt / DNS query against the policy and
    /// the process context.
    pub fn evaluate(&self, req: &EvalRequest<'_>, ctx: &dyn ContextView) -> Evaluation {
        self.inner.evaluate(req, ctx)
    }

    /// Number of rules (the `egress_allowlist` shorthand counts as one rule).
    pub fn rule_count(&self) -> usize {
        self.inner.rule_count()
    }

    /// `mode:` of the policy.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// `default:` of the policy.
    pub fn default_action(&self) -> DefaultAction {
        self.inner.default
    }

    /// Top-level `require_sensor: true`: deny with
    /// `fail_closed:sensor_unavailable` when the workload's sensor is silent.
    pub fn requires_sensor(&self) -> bool {
        self.inner.require_sensor
    }

    /// The longest `within` window of any taint condition: how long the
    /// context store must keep file-open events for this policy.
    pub fn max_taint_window(&self) -> Option<Duration> {
        self.inner.max_window
    }

    /// The YAML text this policy was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// True when some allow / escalate pattern of this policy could match
    /// `host` (already normalised) on `port`, ignoring workload, process and
    /// context: a PEP-side pre-filter may deny names for which this is false.
    pub fn host_may_match(&self, host: &str, port: u16) -> bool {
        self.inner.host_may_match(host, port)
    }
}

/// A located policy error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// 1-based line (0 when the error has no position, e.g. empty input).
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// Id of the rule the error belongs to, when known.
    pub rule_id: Option<String>,
    /// Path of the offending node, e.g. `rules[2].destinations[0].ports[1]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if let Some(id) = &self.rule_id {
            write!(f, "[rule {id}] ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Identity of a process, robust against PID reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    /// Process id.
    pub pid: u32,
    /// Start time (clock ticks since boot, /proc/PID/stat field 22).
    pub start_time: u64,
}

/// One evaluation input.
#[derive(Debug, Clone, Copy)]
pub struct EvalRequest<'a> {
    /// Workload id.
    pub workload: &'a str,
    /// Executable path of the process (empty when unattributed).
    pub exe: &'a str,
    /// Host as seen on the wire: may be an IP literal in any spelling, or
    /// empty for `ORIGINAL_DST`.
    pub host: &'a str,
    /// Destination port.
    pub port: u16,
    /// The IP the PEP will dial / the original destination.
    pub ip: Option<IpAddr>,
    /// Every IP the name resolved to (all are checked).
    pub resolved_ips: &'a [IpAddr],
    /// How the host was learned.
    pub host_source: HostSource,
    /// The process, `None` when unattributed.
    pub process: Option<ProcKey>,
    /// Ancestors of the process, nearest first.
    pub ancestors: &'a [ProcKey],
}

/// The verdict of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection is refused.
    Deny,
    /// The connection is refused pending an operator decision.
    Escalate,
}

/// How far a PEP may reuse a decision (DESIGN §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// Do not cache.
    None,
    /// Any process of the workload, same (host, port).
    Workload,
    /// Only this process (pid, start time), same (host, port).
    Process,
}

/// Cache lifetime of a cacheable decision. Short on purpose: invalidations
/// over `Watch` are the primary mechanism; the TTL bounds the damage of a
/// missed invalidation.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);

/// Result of an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The verdict.
    pub verdict: Verdict,
    /// Machine-readable reason: `rule:<id>`, `default_deny`,
    /// `default_escalate`, `special_ip`, `dns_rebinding`, `tainted:<id>`,
    /// `fail_closed:<cause>`, `invalid_host`, ...
    pub reason: String,
    /// The deciding rule, when a rule decided.
    pub rule_id: Option<String>,
    /// True when the decision depended on per-process context (taint,
    /// sensor liveness) or on escalation state.
    pub context_dependent: bool,
    /// How far the decision may be cached.
    pub cache_scope: CacheScope,
    /// Cache lifetime (zero when `cache_scope` is `None`).
    pub cache_ttl: Duration,
    /// `mode: report` turned a deny / escalate into an allow.
    pub would_deny: bool,
    /// Normalised host (or canonical IP text) for escalation dedupe.
    pub normalized_host: Option<String>,
}
