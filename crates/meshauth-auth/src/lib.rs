//! Mutual authentication of identity pairs between node agents.
//!
//! # Layout
//! - [`handshake`]: the TLS 1.3 handshake on port 4250, both roles, with the checks both sides
//!   make and the low-cardinality [`handshake::Reason`] of every failure.
//!
//! - [`manager`]: the auth manager: de-duplicated requests, a bounded queue and worker pool,
//!   entries written with their expiry, retries with backoff, re-authentication before expiry,
//!   immediate revocation and a sweep of expired entries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod handshake;
pub mod manager;

pub use handshake::{
    AuthError, Authenticated, Handshaker, LocalSvid, LocalSvids, Placement, Reason, Timeouts,
};
pub use manager::{AuthManager, AuthTable, Authenticator, ManagerConfig, ManagerStats};
