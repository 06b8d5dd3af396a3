//! Mutual authentication of identity pairs between node agents.
//!
//! # Layout
//! - [`handshake`]: the TLS 1.3 handshake on port 4250, both roles, with the checks both sides
//!   make and the low-cardinality [`handshake::Reason`] of every failure.
//!
//! The auth manager (events from the datapath → de-duplicated, bounded handshake queue → auth
//! map entries, re-authentication on rotation, revocation) builds on this.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod handshake;

pub use handshake::{
    AuthError, Authenticated, Handshaker, LocalSvid, LocalSvids, Placement, Reason, Timeouts,
};
