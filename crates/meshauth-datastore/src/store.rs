//! The [`Datastore`] trait: what the server needs of its registry store, whichever backend
//! keeps it, and the [`StoreError`] every backend reports.
//!
//! Two backends implement it: [`crate::Store`] (one SQLite file, one server) and
//! [`crate::EtcdStore`] (etcd, several server replicas writing at once). Both keep the same
//! invariants; where they report a broken one differently, the method's doc says so.
//!
//! The trait is synchronous and object safe: the server holds an `Arc<dyn Datastore>` and calls
//! it from blocking threads. Every method is one atomic operation: it sees a consistent state
//! and its writes land together or not at all, whatever other threads (or, with etcd, other
//! replicas) do at the same time.

use std::time::{Duration, SystemTime};

use meshauth_policy::{IdentityId, Labels, TunnelKey};

use crate::model::{
    EntryFilter, EntryId, IssuedJoinToken, NewEntry, NodeAttestation, NodeName, NodeRecord,
    NodeSpec, PodRecord, PodRuntime, RegistrationEntry,
};
use crate::sqlite::Store;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be created or opened.
    #[error(
        "cannot open the datastore at {path}: {source} (check that the data dir exists and is writable by this user)"
    )]
    Open {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// SQLite reported an error.
    #[error("datastore error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer meshauth.
    #[error(
        "the datastore has schema version {found}, newer than this binary's {supported}: upgrade meshauth"
    )]
    SchemaTooNew {
        /// In the file.
        found: i64,
        /// This binary's.
        supported: i64,
    },
    /// The database file of an initialized data dir is gone.
    #[error(
        "the datastore {path} is missing, but its data dir was initialized (it holds the trust domain's CA and registry): restore the file from a backup; to start a new trust domain instead (every agent must join again), remove the data dir"
    )]
    Missing {
        /// The file.
        path: String,
    },
    /// The database file is empty (truncated, or never written).
    #[error(
        "the datastore {path} is empty (0 bytes: truncated, or a copy that never finished): restore it from a backup; to start a new trust domain instead (every agent must join again), remove the data dir"
    )]
    Empty {
        /// The file.
        path: String,
    },
    /// The file is not a meshauth datastore (damaged, or another file).
    #[error(
        "{path} is not a readable meshauth datastore ({detail}): restore it from a backup, or check that --data-dir names the right directory"
    )]
    Damaged {
        /// The file.
        path: String,
        /// What SQLite or the schema check said.
        detail: String,
    },
    /// A stored row no longer parses (hand-edited or corrupted file).
    #[error("corrupt row in table {table}: {detail}")]
    Corrupt {
        /// Where.
        table: &'static str,
        /// What.
        detail: String,
    },
    /// A value stored in etcd no longer parses (written by hand or by another program).
    #[error(
        "corrupt record at etcd key {key}: {detail} (was it written by another program or by hand?)"
    )]
    CorruptKey {
        /// The etcd key.
        key: String,
        /// What did not parse.
        detail: String,
    },
    /// etcd did not answer (down, unreachable, or slower than the request timeout).
    #[error("cannot reach etcd at {endpoints}: is it running? check --datastore ({detail})")]
    Unavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What failed.
        detail: String,
    },
    /// etcd answered with an error other than being unreachable.
    #[error("etcd refused the request: {detail}")]
    Etcd {
        /// What etcd said.
        detail: String,
    },
    /// Other writers changed the store every time this operation tried to commit.
    #[error(
        "{op} conflicted with other servers' writes {attempts} times in a row: the datastore is too busy, try again"
    )]
    Conflict {
        /// The operation.
        op: &'static str,
        /// How many times it tried.
        attempts: u32,
    },
    /// The etcd datastore was configured with values it cannot use.
    #[error("invalid etcd datastore configuration: {0}")]
    InvalidConfig(String),
    /// An identity number is already allocated to other labels (etcd; SQLite reports a
    /// constraint error).
    #[error(
        "identity {id} is already allocated to the labels {labels}: another server allocated it first; reload the identities and allocate again"
    )]
    IdentityTaken {
        /// The number asked for.
        id: IdentityId,
        /// The labels that have it.
        labels: String,
    },
    /// A label set already has another identity (etcd; SQLite reports a constraint error).
    #[error(
        "the labels {labels} already have identity {existing}: another server allocated it first; reload the identities"
    )]
    LabelsTaken {
        /// The labels.
        labels: String,
        /// Their identity.
        existing: IdentityId,
    },
    /// Another pod already reported this address.
    #[error(
        "address {ipv4} is already reported for pod {pod}: every pod needs an address of its own"
    )]
    AddressInUse {
        /// The address.
        ipv4: std::net::Ipv4Addr,
        /// The pod that has it (`namespace/name`).
        pod: String,
    },
    /// The join token is unknown or already used.
    #[error(
        "join token is unknown or was already used: generate a new one with `meshauth token generate`"
    )]
    TokenUnknown,
    /// The join token expired.
    #[error("join token expired: generate a new one with `meshauth token generate`")]
    TokenExpired,
    /// The join token was issued for another node name.
    #[error("join token was issued for node {expected}, not {presented}")]
    TokenWrongNode {
        /// Whom it was for.
        expected: NodeName,
        /// Who presented it.
        presented: NodeName,
    },
    /// No such node.
    #[error("no agent named {0} (see `meshauth agent list`)")]
    NodeNotFound(NodeName),
    /// The node is banned.
    #[error("agent {0} is banned; evict it with `meshauth agent evict` before it may attest again")]
    NodeBanned(NodeName),
    /// Another node already published this WireGuard key.
    #[error(
        "agent {node} published the WireGuard key of agent {owner}: every node needs a key of its own (delete the agent's tunnel key file to make a new one)"
    )]
    DuplicateTunnelKey {
        /// The node that published it.
        node: NodeName,
        /// The node that has it.
        owner: String,
    },
    /// No such entry.
    #[error("no entry with id {0} (see `meshauth entry show`)")]
    EntryNotFound(EntryId),
    /// No policy has this key.
    #[error("no policy {0} (see `meshauth policy list`)")]
    PolicyNotFound(String),
    /// A lifetime that reaches past the latest time this system can represent.
    #[error(
        "a lifetime of {secs}s from now reaches past the latest time this system can represent: use a shorter one"
    )]
    LifetimeOutOfRange {
        /// The lifetime asked for, in whole seconds.
        secs: u64,
    },
    /// Another entry already has the same SPIFFE ID, parent ID and selectors.
    #[error(
        "entry {existing} already has this SPIFFE ID, parent ID and selector set: change that entry (`meshauth entry update --entry-id {existing}`) instead of adding a duplicate"
    )]
    DuplicateEntry {
        /// The entry that has them.
        existing: EntryId,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// The registry store the server runs on: CA journal, join tokens, nodes and what is bound to
/// them, identities, pods, policies and registration entries.
///
/// Every method is atomic (see the module doc). Errors common to every method: the backend's
/// own failures ([`StoreError::Sqlite`]; [`StoreError::Unavailable`], [`StoreError::Etcd`],
/// [`StoreError::Conflict`] with etcd, where a write that timed out may or may not have been
/// applied) and records that no longer parse ([`StoreError::Corrupt`],
/// [`StoreError::CorruptKey`]). Lists are sorted as each method says, by byte order of the text.
/// Times are kept to the second.
pub trait Datastore: Send + Sync + std::fmt::Debug {
    /// Which backend this is, for health output: `"sqlite"` or `"etcd"`.
    fn kind(&self) -> &'static str;

    // --- CA journal ---

    /// The CA journal (JSON written by the CA crate), if one was saved.
    fn load_ca_journal(&self) -> Result<Option<String>>;

    /// Replaces the CA journal as a whole.
    fn save_ca_journal(&self, journal: &str) -> Result<()>;

    // --- join tokens ---

    /// Creates a single-use join token for `node`, valid for `ttl` from `now`, and may drop
    /// tokens that expired before `now`. Only a SHA-256 hash of the token is stored.
    /// [`StoreError::LifetimeOutOfRange`] if `now + ttl` cannot be represented.
    fn create_join_token(
        &self,
        node: &NodeName,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJoinToken>;

    /// Consumes a join token presented by `node`. The token is deleted whatever the outcome, so
    /// of any number of concurrent calls at most one succeeds; then
    /// [`StoreError::TokenUnknown`] (no such token, or already consumed),
    /// [`StoreError::TokenExpired`] or [`StoreError::TokenWrongNode`].
    fn consume_join_token(&self, token: &str, node: &NodeName, now: SystemTime) -> Result<()>;

    // --- nodes ---

    /// Records a successful attestation with the node's new SVID: a new node gets a fresh node
    /// id (ids only grow and are never reused, not even after an eviction); a known node keeps
    /// its id, first attestation time, address and tunnel key, and forgets its previous serial.
    /// [`StoreError::NodeBanned`] for a banned node. Returns the stored record.
    fn record_attestation(
        &self,
        node: &NodeName,
        how: NodeAttestation,
        serial: &str,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<NodeRecord>;

    /// Records a renewed node SVID `serial`, keeping `proven` (the serial the node
    /// authenticated the renewal with) acceptable beside it. The check that the node exists and
    /// is not banned and the update are one step: [`StoreError::NodeNotFound`],
    /// [`StoreError::NodeBanned`]. Returns the updated record.
    fn record_renewal(
        &self,
        node: &NodeName,
        proven: &str,
        serial: &str,
        not_after: SystemTime,
    ) -> Result<NodeRecord>;

    /// The node, if it exists and is not banned; otherwise [`StoreError::NodeNotFound`] or
    /// [`StoreError::NodeBanned`].
    fn usable_node(&self, node: &NodeName) -> Result<NodeRecord>;

    /// One node, `None` if unknown.
    fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>>;

    /// Every node, by name.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;

    /// Bans a node: it keeps its record but is refused from now on.
    /// [`StoreError::NodeNotFound`] if unknown. Returns the updated record.
    fn ban_node(&self, node: &NodeName) -> Result<NodeRecord>;

    /// Deletes a node and, in the same step, what it reported about its pods (the pods stay
    /// placed on it) and its tunnel key. [`StoreError::NodeNotFound`] if unknown.
    fn evict_node(&self, node: &NodeName) -> Result<()>;

    /// What is bound to node `name`, if anything.
    fn node_spec(&self, name: &NodeName) -> Result<Option<NodeSpec>>;

    /// Every node spec, by name.
    fn node_specs(&self) -> Result<Vec<NodeSpec>>;

    /// Binds (or re-binds) a node's address and pod range.
    fn put_node_spec(&self, spec: &NodeSpec) -> Result<()>;

    /// Records the address other agents reach `node` on; nothing happens for an unknown node.
    fn set_node_address(&self, node: &NodeName, address: std::net::IpAddr) -> Result<()>;

    /// Records the WireGuard public key `node` published; `true` if the node's key changed
    /// (`false` for an unknown node or the same key). No two nodes ever hold the same key:
    /// [`StoreError::DuplicateTunnelKey`] when another node has it (checked and written in one
    /// step). A node may replace its own key.
    fn set_node_tunnel_key(&self, node: &NodeName, key: TunnelKey) -> Result<bool>;

    // --- identities, pods, policies ---

    /// Every allocated identity, by id.
    fn identities(&self) -> Result<Vec<(IdentityId, Labels)>>;

    /// Records an allocated identity. Ids and label sets are both unique: fails if `id` is
    /// stored with other labels or `labels` with another id (SQLite: a constraint error; etcd:
    /// [`StoreError::IdentityTaken`], [`StoreError::LabelsTaken`]). Exactly this pair stored
    /// already: SQLite refuses it, etcd accepts it (so that a retried write whose answer was
    /// lost succeeds); callers must not rely on either.
    fn insert_identity(&self, id: IdentityId, labels: &Labels) -> Result<()>;

    /// Places a pod (or replaces its labels, identity and node). A new pod is stored with
    /// `pod.runtime`; a known one keeps its stored runtime facts only if it stays on the same
    /// node (`pod.runtime` is then ignored). A runtime address another pod has fails as in
    /// [`Datastore::set_pod_runtime`].
    fn put_pod(&self, pod: &PodRecord) -> Result<()>;

    /// Records (or, with `None`, clears) what a pod's node reported; `false` if there is no
    /// such pod. Pod addresses are unique in the cluster: an address another pod has is
    /// [`StoreError::AddressInUse`] (checked and written in one step).
    fn set_pod_runtime(
        &self,
        namespace: &str,
        name: &str,
        runtime: Option<&PodRuntime>,
    ) -> Result<bool>;

    /// Removes a pod; `false` when there was none.
    fn delete_pod(&self, namespace: &str, name: &str) -> Result<bool>;

    /// Every pod, by namespace then name.
    fn pods(&self) -> Result<Vec<PodRecord>>;

    /// One pod, `None` if there is none.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>>;

    /// The pods placed on `node`, by namespace then name: work in proportion to those pods,
    /// not to every pod of the cluster.
    fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>>;

    /// Stores policies (key, YAML document) in one step, replacing those with the same key (of
    /// repeated keys, the last wins). The key is the policy's `namespace/name` or `name`.
    fn put_policies(&self, docs: &[(String, String)]) -> Result<()>;

    /// Moves stored policies to new keys (and documents) in one step: each
    /// `(old key, new key, YAML)`, in order, deletes the old one and stores the new one.
    fn rekey_policies(&self, moves: &[(String, String, String)]) -> Result<()>;

    /// Deletes the policy with key `key`; [`StoreError::PolicyNotFound`] if there is none.
    fn delete_policy(&self, key: &str) -> Result<()>;

    /// Every policy (key, YAML), by key.
    fn policies(&self) -> Result<Vec<(String, String)>>;

    // --- registration entries ---

    /// Creates an entry with a fresh random id and revision 1 (selectors sorted, repeats
    /// dropped). [`StoreError::DuplicateEntry`] if an entry has the same SPIFFE ID, parent ID
    /// and selector set (checked and written in one step).
    fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry>;

    /// Replaces the fields of entry `id`, its revision growing by one.
    /// [`StoreError::DuplicateEntry`] if that would duplicate another entry (checked first),
    /// then [`StoreError::EntryNotFound`].
    fn update_entry(&self, id: &EntryId, new: NewEntry) -> Result<RegistrationEntry>;

    /// Deletes entry `id`; [`StoreError::EntryNotFound`] if there is none.
    fn delete_entry(&self, id: &EntryId) -> Result<()>;

    /// One entry; [`StoreError::EntryNotFound`] if there is none.
    fn entry(&self, id: &EntryId) -> Result<RegistrationEntry>;

    /// The entries passing `filter`, by SPIFFE ID then id.
    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>>;

    /// How many entries exist.
    fn count_entries(&self) -> Result<u64>;
}

/// The SQLite store behind the trait: every method is the inherent one of the same name.
impl Datastore for Store {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn load_ca_journal(&self) -> Result<Option<String>> {
        Store::load_ca_journal(self)
    }

    fn save_ca_journal(&self, journal: &str) -> Result<()> {
        Store::save_ca_journal(self, journal)
    }

    fn create_join_token(
        &self,
        node: &NodeName,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJoinToken> {
        Store::create_join_token(self, node, ttl, now)
    }

    fn consume_join_token(&self, token: &str, node: &NodeName, now: SystemTime) -> Result<()> {
        Store::consume_join_token(self, token, node, now)
    }

    fn record_attestation(
        &self,
        node: &NodeName,
        how: NodeAttestation,
        serial: &str,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        Store::record_attestation(self, node, how, serial, not_after, now)
    }

    fn record_renewal(
        &self,
        node: &NodeName,
        proven: &str,
        serial: &str,
        not_after: SystemTime,
    ) -> Result<NodeRecord> {
        Store::record_renewal(self, node, proven, serial, not_after)
    }

    fn usable_node(&self, node: &NodeName) -> Result<NodeRecord> {
        Store::usable_node(self, node)
    }

    fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        Store::node(self, node)
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        Store::nodes(self)
    }

    fn ban_node(&self, node: &NodeName) -> Result<NodeRecord> {
        Store::ban_node(self, node)
    }

    fn evict_node(&self, node: &NodeName) -> Result<()> {
        Store::evict_node(self, node)
    }

    fn node_spec(&self, name: &NodeName) -> Result<Option<NodeSpec>> {
        Store::node_spec(self, name)
    }

    fn node_specs(&self) -> Result<Vec<NodeSpec>> {
        Store::node_specs(self)
    }

    fn put_node_spec(&self, spec: &NodeSpec) -> Result<()> {
        Store::put_node_spec(self, spec)
    }

    fn set_node_address(&self, node: &NodeName, address: std::net::IpAddr) -> Result<()> {
        Store::set_node_address(self, node, address)
    }

    fn set_node_tunnel_key(&self, node: &NodeName, key: TunnelKey) -> Result<bool> {
        Store::set_node_tunnel_key(self, node, key)
    }

    fn identities(&self) -> Result<Vec<(IdentityId, Labels)>> {
        Store::identities(self)
    }

    fn insert_identity(&self, id: IdentityId, labels: &Labels) -> Result<()> {
        Store::insert_identity(self, id, labels)
    }

    fn put_pod(&self, pod: &PodRecord) -> Result<()> {
        Store::put_pod(self, pod)
    }

    fn set_pod_runtime(
        &self,
        namespace: &str,
        name: &str,
        runtime: Option<&PodRuntime>,
    ) -> Result<bool> {
        Store::set_pod_runtime(self, namespace, name, runtime)
    }

    fn delete_pod(&self, namespace: &str, name: &str) -> Result<bool> {
        Store::delete_pod(self, namespace, name)
    }

    fn pods(&self) -> Result<Vec<PodRecord>> {
        Store::pods(self)
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>> {
        Store::pod(self, namespace, name)
    }

    fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>> {
        Store::pods_on_node(self, node)
    }

    fn put_policies(&self, docs: &[(String, String)]) -> Result<()> {
        Store::put_policies(self, docs)
    }

    fn rekey_policies(&self, moves: &[(String, String, String)]) -> Result<()> {
        Store::rekey_policies(self, moves)
    }

    fn delete_policy(&self, key: &str) -> Result<()> {
        Store::delete_policy(self, key)
    }

    fn policies(&self) -> Result<Vec<(String, String)>> {
        Store::policies(self)
    }

    fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry> {
        Store::create_entry(self, new)
    }

    fn update_entry(&self, id: &EntryId, new: NewEntry) -> Result<RegistrationEntry> {
        Store::update_entry(self, id, new)
    }

    fn delete_entry(&self, id: &EntryId) -> Result<()> {
        Store::delete_entry(self, id)
    }

    fn entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        Store::entry(self, id)
    }

    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        Store::list_entries(self, filter)
    }

    fn count_entries(&self) -> Result<u64> {
        Store::count_entries(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trait_is_object_safe_and_the_sqlite_store_says_what_it_is() {
        let store: std::sync::Arc<dyn Datastore> = std::sync::Arc::new(Store::in_memory().unwrap());
        assert_eq!(store.kind(), "sqlite");
        assert_eq!(store.count_entries().unwrap(), 0);
    }
}
