//! Policy for meshauth: label sets, numeric identities, the `CiliumNetworkPolicy` model and the
//! compiler that turns policies into per-endpoint entries for the datapath.
//!
//! Pure: no I/O, no clocks, no global state, no panics on input. Every input is parsed into
//! domain types at the boundary of this crate.
//!
//! # Layout
//! - [`ids`]: the numeric identifiers shared by the control plane and the datapath.
//! - [`labels`]: [`Labels`] and [`Selector`].
//! - [`identity`]: [`IdentityAllocator`], a stable number per label set.
//! - [`policy`]: [`Policy`], its [`PolicyKey`] and [`parse_policies`] (YAML, with unsupported
//!   fields refused; namespaces as in Cilium).
//! - [`cidr`]: [`Cidr`], CIDR peers and the node-local identities of the prefixes policies name
//!   ([`CidrIdentities`], the ipcache's content for addresses outside the cluster).
//! - [`engine`]: Cilium's semantics: [`evaluate`], [`trace`], [`trace_peers`],
//!   [`compile_endpoint`], [`lookup`] and the incremental [`Compiler`].
//! - [`entry`]: [`PolicyEntry`], what the datapath enforces (ICMP types in the port field).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cidr;
pub mod engine;
pub mod entry;
pub mod identity;
pub mod ids;
pub mod labels;
pub mod policy;

pub use cidr::{Cidr, CidrChanges, CidrIdentities, CidrRule, cidr_prefixes};
pub use engine::{
    Compiler, DirectionVerdict, Peer, PeerSpec, RuleRef, Trace, compile_endpoint,
    compile_endpoint_with, evaluate, lookup, peer_of_identity, trace, trace_peers,
};
pub use entry::{
    AuthKey, AuthType, Connection, Direction, PolicyEntry, PortRange, Protocol, Verdict,
};
pub use identity::{IdentityAllocator, spiffe_id, spiffe_path};
pub use ids::{IdentityId, NodeId, TunnelKey};
pub use labels::{Labels, NAMESPACE_LABEL, Selector};
pub use policy::{Policy, PolicyError, PolicyKey, parse_policies, parse_policies_in};
