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
//! - [`policy`]: [`Policy`] and [`parse_policies`] (YAML, with unsupported fields refused).
//! - [`engine`]: Cilium's semantics: [`evaluate`], [`trace`], [`compile_endpoint`], [`lookup`] and the
//!   incremental [`Compiler`].
//! - [`entry`]: [`PolicyEntry`], what the datapath enforces.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
pub mod entry;
pub mod identity;
pub mod ids;
pub mod labels;
pub mod policy;

pub use engine::{
    Compiler, DirectionVerdict, Peer, RuleRef, Trace, compile_endpoint, evaluate, lookup, trace,
};
pub use entry::{AuthKey, AuthType, Direction, PolicyEntry, PortRange, Protocol, Verdict};
pub use identity::{IdentityAllocator, spiffe_id, spiffe_path};
pub use ids::{IdentityId, NodeId};
pub use labels::{Labels, Selector};
pub use policy::{Policy, PolicyError, parse_policies};
