//! `secureops-pep`: what both SecureOps policy enforcement points (the egress
//! proxy and the DNS sinkhole) share.
//!
//! The PEPs are thin: parse, attribute, ask, enforce, record. Every decision
//! comes from a [`PolicyDecisionPoint`]; the only one that lives in this crate
//! without a network dependency is [`AllowlistPdp`], used for tests and an
//! explicitly configured standalone mode.
//!
//! Modules:
//! * [`grpc`]: [`GrpcPdp`], the fail-closed gRPC PDP client (deadline →
//!   [`breaker`] → load shed → concurrency limit → tonic channel) and
//!   [`fail_closed_outcome`], the one place errors become denies;
//! * [`cache`]: [`DecisionCache`], valid only while the PDP `Watch` stream is
//!   up, flushed on every invalidation;
//! * [`attribution`]: [`Attributor`], client socket → process identity via
//!   `/proc` and `NETLINK_SOCK_DIAG`, across network namespaces (the clients
//!   of `secureops run` sit behind a veth pair);
//! * [`spool`] / [`shipper`]: [`AuditSpool`], the durable local audit spool,
//!   and [`Shipper`], which delivers it over `Audit.Append` exactly once;
//! * [`metrics`]: [`PepMetrics`], registered into the binary's registry;
//! * [`special_ip`]: [`classify_ip`], the special-purpose address classifier
//!   the PDP and the PEPs share.
//!
//! Invariant: **a PEP never allows on error.** Every failure to obtain a
//! definitive answer becomes [`Decision::Deny`] with a `fail_closed:<cause>`
//! reason (see [`PdpOutcome::fail_closed`]), unless the operator explicitly
//! chose [`FailMode::Open`], which is audited loudly.

mod allowlist;
pub mod attribution;
pub mod breaker;
pub mod cache;
mod decision;
pub mod grpc;
pub mod metrics;
mod netns;
pub mod shipper;
mod sockdiag;
pub mod special_ip;
pub mod spool;
pub mod telemetry;

pub use allowlist::{AllowlistError, AllowlistPdp, is_ip_spelling};
pub use decision::{
    CacheHint, ConnectionRequest, Decision, FailMode, PdpFuture, PdpOutcome, PolicyDecisionPoint,
    ProcessIdentity,
};
pub use secureops_proto::v1::{AuditFinding, HostSource, Transport};
pub use special_ip::{SpecialRange, classify_ip, rebinding_violation};

pub use attribution::{AttributionLimits, Attributor, SocketKind};
pub use breaker::{BreakerConfig, BreakerOpen, BreakerState};
pub use cache::{CacheConfig, DecisionCache};
pub use grpc::{
    GrpcPdp, GrpcPdpConfig, GrpcPdpError, current_trace_id, current_trace_parent,
    fail_closed_outcome, inject_trace_context,
};
pub use metrics::PepMetrics;
pub use shipper::{Shipper, ShipperConfig, ShipperError};
pub use spool::{AuditSpool, SpoolError, SpoolLimits, SpoolSync};
