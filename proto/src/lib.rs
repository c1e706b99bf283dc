//! The SecureOps gRPC contract, package `secureops.v1` (DESIGN.md §3).
//!
//! Generated at build time from `proto/secureops/v1/*.proto` by protox and
//! tonic-prost-build, so building needs no system `protoc`.
//! [`FILE_DESCRIPTOR_SET`] lets every service serve gRPC reflection.

/// `secureops.v1`: messages, clients and servers.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("secureops.v1");
}

/// Encoded `FileDescriptorSet` of every SecureOps proto file, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/secureops_descriptor.bin"));

pub use v1::*;
