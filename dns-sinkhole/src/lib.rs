//! `secureops-dns`: the SecureOps DNS sinkhole (a policy enforcement point).
//!
//! Every query is normalised and decided by the PDP (pep-core's
//! [`PolicyDecisionPoint`](secureops_pep::PolicyDecisionPoint), host learned
//! from `DNS_QUERY`). Allowed names are forwarded to the configured
//! upstreams and their answer addresses are reported to the PDP as
//! DNS-learned context; denied, escalated, failed or timed-out decisions get
//! a sinkholed answer and the upstream is never queried. Exactly one audit
//! record per query is written before anything is forwarded. Allowed names
//! under a wildcard additionally spend an information budget
//! ([`exfil`]) so DNS cannot be used as a tunnel.

pub mod attribution;
pub mod audit;
pub mod cache;
pub mod context;
pub mod exfil;
pub mod forward;
pub mod metrics;
pub mod name;
pub mod server;
mod sinkhole;

pub use sinkhole::{DnsSinkhole, SinkholeAnswer, SinkholeConfig, SinkholeParts};
