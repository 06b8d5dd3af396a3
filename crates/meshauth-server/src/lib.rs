//! The meshauth server: the root of trust and the registry of one trust domain.
//!
//! It issues X.509-SVIDs from its CA, attests nodes with join tokens, keeps registration entries
//! in SQLite, and streams to each agent the bundle and the entries that agent may serve.
//!
//! # Layout
//! - [`registry`]: the core (CA + store + change feed); takes time as a parameter.
//! - [`view`]: the in-memory cluster view, rebuilt once per change, and the per-stream deltas.
//! - [`node_api`]: the agent-facing gRPC service, behind mutual TLS (`tls_incoming`).
//! - [`admin_api`]: the operator gRPC service on the admin socket; [`admin_client`] dials it.
//! - [`datastore_url`]: `--datastore` (SQLite, or etcd for several replicas).
//! - [`kek`]: the key-encryption key that seals the CA journal in the store.
//! - [`metrics`]: Prometheus metrics, served with health endpoints by `meshauth-telemetry`.
//! - [`run`]: configuration and wiring of the listeners and background tasks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_api;
pub mod admin_client;
pub mod datastore_url;
pub mod kek;
pub mod metrics;
pub mod node_api;
pub mod registry;
pub mod run;
mod tls_incoming;
pub mod view;

pub use run::{
    DATASTORE_FILE, Server, ServerConfig, TRUST_DOMAIN_FILE, defaults, open_store, server_spiffe_id,
};
pub use tls_incoming::PeerInfo;
