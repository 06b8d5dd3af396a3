//! The meshauth server's registry store: the CA journal, attested nodes, join tokens,
//! identities, pods, policies and registration entries, in one SQLite file or in etcd.
//!
//! # Layout
//! - [`model`]: the records as domain types (`NodeName`, `EntryId`, `Selector`, ...).
//! - [`Datastore`] (in `store.rs`): the trait the server uses, one atomic method per
//!   operation, with the contract of each; [`StoreError`], the errors of every backend.
//! - [`Store`]: the SQLite backend, one file for one server (`open`, `open_existing`, `check`;
//!   `in_memory` for tests).
//! - [`etcd`]: the etcd backend, [`EtcdStore`], for several server replicas: its key layout
//!   and optimistic concurrency scheme, the change feed [`EtcdStore::watch`], and leader
//!   election ([`EtcdStore::campaign`], [`Leadership`]).
//! - [`feed`]: what another writer changed ([`StoreChanges`], [`StoreChange`]), as the etcd
//!   change feed reports it ([`EtcdStore::take_changes`]), and what each etcd key means.
//!
//! The behaviour of every backend is tested by the same suite, `tests/conformance.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod etcd;
pub mod feed;
pub mod model;
mod sqlite;
mod store;

pub use etcd::{EtcdStore, Leadership};
pub use feed::{StoreChange, StoreChanges};
pub use model::{
    EntryFilter, EntryId, InvalidEntryId, InvalidNodeName, InvalidSelector, Ipv4Range,
    IssuedJoinToken, NewEntry, NodeAttestation, NodeName, NodeRecord, NodeSpec, PodRecord,
    PodRuntime, RegistrationEntry, Selector,
};
pub use sqlite::Store;
pub use store::{Datastore, StoreError};
