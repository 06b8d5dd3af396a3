//! Policy for meshauth: label sets, numeric identities, the `CiliumNetworkPolicy` model and the
//! compiler that turns policies into per-endpoint entries for the datapath.
//!
//! Pure: no I/O, no clocks, no global state. Every input is parsed into domain types at the
//! boundary of this crate.
//!
//! # Layout
//! - [`ids`]: the numeric identifiers shared by the control plane and the datapath.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ids;

pub use ids::{IdentityId, NodeId};
