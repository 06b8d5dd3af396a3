//! The meshauth node agent: the per-node half of identity.
//!
//! It attests to the server with a join token or an operator-issued node certificate (x509pop;
//! then renews with its node SVID, and attests again by itself if that expired), keeps a
//! workload SVID for every entry the server authorizes for this node (keys generated here),
//! rotates them at about half-life, and serves them to local workloads over the standard SPIFFE
//! Workload API, attesting callers by their peer credentials.
//!
//! # Layout
//! - [`identity`]: the node key, SVID and bundle on disk.
//! - [`server_client`]: dialing the server over mutual TLS; keys and CSRs.
//! - [`sync_state`]: the whole state the sync stream brings up to date with deltas.
//! - [`manager`]: bootstrap, sync stream, signing and rotation, reconnection.
//! - [`node_attestation`]: obtaining a node SVID (x509pop or join token), again after an
//!   outage outlived it.
//! - [`cache`]: the in-memory snapshot published to the APIs.
//! - [`attestor`]: selectors from the kernel's view of a caller.
//! - [`endpoints`]: [`endpoints::EndpointSource`], where the node's pods come from.
//! - [`cni`]: the endpoints the CNI plugin hands over, and their addresses (pure
//!   [`cni::assign`]).
//! - [`plan`]: what the datapath should hold and which auth entries are justified (pure);
//!   [`driver`]: makes the datapath so, through [`driver::DatapathOps`].
//! - [`hold`]: the node-side queue that holds packets of pairs being authenticated.
//! - [`enforce`]: the loop: datapath, policy, identity SVIDs, auth manager, handshake server.
//! - [`flows`]: the flow log behind `meshauth observe`; [`explain`]: what a verdict means in
//!   policy terms (the deciding policies, reserved labels).
//! - [`workload_api`]: the SPIFFE Workload API, behind [`authority_fix`] so that gRPC C-core
//!   clients work too; [`admin`]: the operator API
//!   (and the CNI plugin's calls).
//! - [`tunnel_plan`]: what the node's WireGuard tunnel should hold (pure); [`tunnel`]: the
//!   tunnel (encryption on): device, routes, the node-pair key exchange and its rotation.
//! - [`metrics`]; [`run`]: wiring.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod attestor;
pub mod authority_fix;
pub mod cache;
pub mod cni;
pub mod driver;
pub mod endpoints;
pub mod enforce;
pub mod explain;
pub mod flows;
pub mod hold;
pub mod identity;
pub mod manager;
pub mod metrics;
pub mod node_attestation;
pub mod plan;
pub mod run;
pub mod server_client;
pub mod sync_state;
pub mod tunnel;
pub mod tunnel_plan;
pub mod workload_api;

pub use run::{Agent, AgentConfig, EnforceSettings, defaults};
