//! `secureops-policy`: the SecureOps Policy Decision Point.
//!
//! * [`policy`]: the policy language (DESIGN §4) — parse, validate, compile,
//!   evaluate.
//! * [`context`]: the bounded process-context store (taint, ancestry, DNS,
//!   sensor liveness) the evaluator consults.
//! * [`escalation`]: pending escalations and operator resolutions.
//! * [`store`] / [`state`]: durable, versioned policies and the atomically
//!   swapped active one.
//! * [`server`], [`admin`], [`auth`]: the gRPC services; [`app`]: the
//!   `secureops-pdp` process.

pub mod admin;
pub mod app;
pub mod auth;
pub mod context;
pub mod escalation;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod state;
pub mod store;
pub mod validate;
