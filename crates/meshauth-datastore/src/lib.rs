//! The meshauth server's registry store: the CA journal, attested nodes, join tokens and
//! registration entries, in one SQLite file.
//!
//! # Layout
//! - [`model`]: the records as domain types (`NodeName`, `EntryId`, `Selector`, ...).
//! - [`Store`]: the SQLite implementation. A second backend (etcd, for HA) would put a trait in
//!   front of it; until then the concrete type keeps the code direct.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod model;
mod sqlite;

pub use model::{
    EntryFilter, EntryId, InvalidEntryId, InvalidNodeName, InvalidSelector, Ipv4Range,
    IssuedJoinToken, NewEntry, NodeAttestation, NodeName, NodeRecord, NodeSpec, PodRecord,
    PodRuntime, RegistrationEntry, Selector,
};
pub use sqlite::{Store, StoreError};
