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
//!
//! Shape of the implementation:
//! * [`DnsSinkhole`] is a hickory-server 0.26 `RequestHandler`. TCP is served
//!   by hickory's `Server`. UDP is served by [`fastpath`]: `recvmmsg`
//!   batches, a hand-written parser for plain queries ([`wire`]), the same
//!   PDP / exfiltration / audit steps with one audit write per batch, and
//!   answers from pre-encoded wire bytes sent with `sendmmsg`; every
//!   unusual datagram goes to hickory's request parsing and the same
//!   handler as TCP ([`server::spawn_slow`]). UDP and TCP share one port
//!   (port 0 allowed).
//! * Malformed input never reaches the PDP or the upstream: undecodable
//!   messages get FORMERR, qdcount ≠ 1 FORMERR, non-QUERY opcodes NOTIMP,
//!   AXFR/IXFR/ANY/non-IN REFUSED, responses and runts are dropped.
//! * Allowed names go through [`forward::Forwarder`] (own lean UDP forwarder,
//!   id + question matching, per-attempt timeout, failover, TCP on TC; DNS
//!   over TLS and DNS over HTTPS upstreams in [`tls`], one persistent
//!   pipelined connection each, certificates always verified) and the
//!   TTL-respecting [`cache::AnswerCache`]; answer addresses are reported to
//!   the PDP ([`context::ContextReporter`]).
//! * Every query gets one audit record ([`audit::AuditSink`], the pep-core
//!   spool in production) before anything is answered or forwarded; a spool
//!   error sinkholes the query (`fail_closed:audit_spool`).
//! * Queries are attributed to their local process ([`attribution`]).

pub mod attribution;
pub mod audit;
pub mod cache;
pub mod context;
pub mod exfil;
pub mod fastpath;
pub mod forward;
pub mod metrics;
pub mod name;
pub mod server;
mod sinkhole;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use sinkhole::{DnsSinkhole, SinkholeAnswer, SinkholeConfig, SinkholeParts};
