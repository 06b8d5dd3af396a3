//! Mutual authentication of identity pairs between node agents.
//!
//! # Layout
//! - [`handshake`]: the TLS 1.3 handshake on port 4250, both roles, with the checks both sides
//!   make and the low-cardinality [`handshake::Reason`] of every failure.
//!
//! - [`tunnel_key`]: the node-pair key exchange behind encryption (TLS 1.3 with node SVIDs on
//!   port 4251; its exporter is the pair's WireGuard pre-shared key).
//! - [`manager`]: the auth manager: de-duplicated requests, a bounded queue and a fixed worker
//!   pool, entries written with their expiry, retries on an exponential backoff schedule kept
//!   in its state (pairs nobody asks for are forgotten), `test-always-fail` pairs failed
//!   without a handshake, re-authentication before expiry, immediate revocation, a sweep of
//!   expired entries, typed counters and an optional non-blocking outcome channel. It reads
//!   time from an injected [`manager::Clock`] ([`manager::ManualClock`] in tests).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod handshake;
pub mod manager;
pub mod tunnel_key;

pub use handshake::{
    AcceptHook, AuthError, Authenticated, Handshaker, LocalSvid, LocalSvids, Placement, Reason,
    Timeouts,
};
pub use manager::{
    AuthManager, AuthTable, Authenticator, Clock, EntriesReader, ManagerConfig, ManagerHooks,
    ManagerStats, ManualClock, Outcome, RetryState, TableError,
};
