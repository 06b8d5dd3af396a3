//! Wire definitions of meshauth's gRPC APIs, generated from `proto/` at build time.
//!
//! - [`node`]: what agents call on the server over mutual TLS (attestation, SVID signing, the
//!   sync stream of bundle and authorized entries).
//! - [`admin`]: what the `meshauth` CLI calls on the server's local admin socket.
//! - [`agent`]: what the `meshauth` CLI calls on an agent's local admin socket.
//! - [`workload`]: the standard SPIFFE Workload API that agents serve to local workloads.
//!
//! - [`uds`]: channels to these services over Unix sockets.
//!
//! These types stay at the edge: handlers convert them to domain types once.

pub mod uds;

/// The agent-facing API (`meshauth.v1.Node`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::restriction,
    reason = "generated code"
)]
pub mod node {
    tonic::include_proto!("meshauth.v1.node");
}

/// The operator-facing API on the admin socket (`meshauth.v1.Admin`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::restriction,
    reason = "generated code"
)]
pub mod admin {
    tonic::include_proto!("meshauth.v1.admin");
}

/// The agent's operator API (`meshauth.v1.agent.AgentAdmin`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::restriction,
    reason = "generated code"
)]
pub mod agent {
    tonic::include_proto!("meshauth.v1.agent");
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, no package, as the specification defines it).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::restriction,
    reason = "generated code"
)]
pub mod workload {
    tonic::include_proto!("_");
}
