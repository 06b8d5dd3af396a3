//! What the agent holds in memory: the bundle, the entries the server authorized for this node,
//! and one workload SVID (with its locally generated key) per entry.
//!
//! The cache is published as an immutable snapshot through a `watch` channel; the Workload API
//! streams wake on every new snapshot and send a caller the subset it is entitled to.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use meshauth_spiffe::{SpiffeId, X509Bundle};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// A registration entry as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The server's entry id.
    pub id: String,
    /// The identity it grants.
    pub spiffe_id: SpiffeId,
    /// `type:value` selectors; a caller must have all of them.
    pub selectors: BTreeSet<String>,
    /// Changes on every update of the entry.
    pub revision: u64,
}

/// A workload SVID held for an entry.
pub struct WorkloadSvid {
    /// The entry it was issued for (revision included: a new revision needs a new SVID).
    pub entry: Entry,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER; never logged, only served over the Workload API to entitled callers.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Serial (hex).
    pub serial: String,
    /// When it was obtained.
    pub issued_at: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// When to renew it (about half-life, with jitter).
    pub refresh_at: SystemTime,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("spiffe_id", &self.entry.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An entry the server refused to sign (or to renew) for this node, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignableEntry {
    /// The entry as the server streamed it when it refused.
    pub entry: Entry,
    /// Low-cardinality reason: the server's denial label (e.g. `InvalidRequest`), or
    /// `InvalidSvid` when this agent rejected what the server sent, or `NotAnswered`.
    pub reason: String,
    /// One sentence.
    pub message: String,
    /// When it was last refused.
    pub refused_at: SystemTime,
}

/// One consistent view of the agent's material.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The trust bundle (from the server, or the bootstrap file until the first sync).
    pub bundle: Option<Arc<X509Bundle>>,
    /// Entries by id.
    pub entries: BTreeMap<String, Entry>,
    /// SVIDs by entry id.
    pub svids: BTreeMap<String, Arc<WorkloadSvid>>,
    /// Entries the server refused to sign, by entry id. They have no SVID (or, when a renewal
    /// was refused, keep theirs until it expires); the other entries are unaffected.
    pub unsignable: BTreeMap<String, UnsignableEntry>,
    /// Whether a sync with the server has completed since start (before that, callers are told
    /// to retry rather than that they have no identity).
    pub synced: bool,
    /// Whether the sync stream is up right now.
    pub connected: bool,
    /// The cluster state from the last sync (identities, endpoints, nodes, policies).
    pub cluster: Option<Arc<ClusterState>>,
}

/// What every agent needs to enforce policy, as the server last sent it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClusterState {
    /// Every identity and its labels.
    pub identities: BTreeMap<meshauth_policy::IdentityId, meshauth_policy::Labels>,
    /// Every endpoint: (node name, node id, endpoint name, address, identity).
    pub endpoints: Vec<ClusterEndpoint>,
    /// Every node: name → (id, handshake address).
    pub nodes: BTreeMap<String, (meshauth_policy::NodeId, Option<std::net::IpAddr>)>,
    /// The pod range bound to each node (name → range), for the nodes that have one.
    pub pod_ranges: BTreeMap<String, meshauth_policy::Cidr>,
    /// The WireGuard public key each node published (name → key), for those that did.
    pub tunnel_keys: BTreeMap<String, meshauth_policy::TunnelKey>,
    /// Every policy, parsed.
    pub policies: Vec<meshauth_policy::Policy>,
    /// Policies this agent could not parse (key, `namespace/name` or `name`, → why): their
    /// last good version, if any, is in `policies`, and enforcement reports not-ready naming
    /// them.
    pub policy_errors: BTreeMap<String, String>,
}

/// A pod somewhere in the cluster, as the control plane placed it, with its address once its
/// node reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEndpoint {
    /// The node the control plane placed it on.
    pub node: String,
    /// Its node's id.
    pub node_id: meshauth_policy::NodeId,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its address, once its node reported it.
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// The node-side interface its node reported.
    pub interface: String,
    /// Its identity.
    pub identity: meshauth_policy::IdentityId,
}

impl ClusterEndpoint {
    /// The labels policies select it by: its identity's labels as the server allocated them
    /// (its labels in its namespace). A pod's labels are kept only there, once per identity,
    /// not with each of thousands of pods. `Err` says the identity is not in the view.
    pub fn identity_labels(
        &self,
        identities: &BTreeMap<meshauth_policy::IdentityId, meshauth_policy::Labels>,
    ) -> Result<meshauth_policy::Labels, String> {
        identities.get(&self.identity).cloned().ok_or_else(|| {
            format!(
                "its identity {} is not in the cluster view yet",
                self.identity
            )
        })
    }
}

impl Snapshot {
    /// The SVIDs a caller with `selectors` may have: entries whose selectors are all among the
    /// caller's, in SPIFFE ID order (the first is the default identity).
    pub fn svids_for(&self, selectors: &BTreeSet<String>) -> Vec<Arc<WorkloadSvid>> {
        let mut out: Vec<_> = self
            .svids
            .values()
            .filter(|s| s.entry.selectors.is_subset(selectors))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            (a.entry.spiffe_id.to_string(), &a.entry.id)
                .cmp(&(b.entry.spiffe_id.to_string(), &b.entry.id))
        });
        out
    }

    /// Whether any entry (with or without an SVID yet) matches the caller.
    pub fn has_entry_for(&self, selectors: &BTreeSet<String>) -> bool {
        self.entries
            .values()
            .any(|e| e.selectors.is_subset(selectors))
    }

    /// The earliest expiry among held SVIDs.
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        self.svids.values().map(|s| s.not_after).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn svid(id: &str, spiffe: &str, selectors: &[&str]) -> Arc<WorkloadSvid> {
        let now = SystemTime::now();
        Arc::new(WorkloadSvid {
            entry: Entry {
                id: id.into(),
                spiffe_id: spiffe.parse().unwrap(),
                selectors: selectors.iter().map(|s| s.to_string()).collect(),
                revision: 1,
            },
            chain: vec![],
            key: PrivatePkcs8KeyDer::from(vec![1, 2, 3]),
            serial: "01".into(),
            issued_at: now,
            not_after: now + Duration::from_secs(60),
            refresh_at: now + Duration::from_secs(30),
        })
    }

    #[test]
    fn callers_get_entries_whose_selectors_they_all_have() {
        let mut snap = Snapshot::default();
        for s in [
            svid("a", "spiffe://td/web", &["unix:uid:1000"]),
            svid("b", "spiffe://td/admin", &["unix:uid:1000", "unix:gid:0"]),
            svid("c", "spiffe://td/db", &["unix:uid:2000"]),
        ] {
            snap.entries.insert(s.entry.id.clone(), s.entry.clone());
            snap.svids.insert(s.entry.id.clone(), s);
        }
        let caller =
            |sels: &[&str]| -> BTreeSet<String> { sels.iter().map(|s| s.to_string()).collect() };
        let ids =
            |v: Vec<Arc<WorkloadSvid>>| v.iter().map(|s| s.entry.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(snap.svids_for(&caller(&["unix:uid:1000", "unix:gid:5"]))),
            vec!["a"]
        );
        // Sorted by SPIFFE ID: admin before web.
        assert_eq!(
            ids(snap.svids_for(&caller(&["unix:uid:1000", "unix:gid:0"]))),
            vec!["b", "a"]
        );
        assert!(snap.svids_for(&caller(&["unix:uid:3000"])).is_empty());
        assert!(!snap.has_entry_for(&caller(&["unix:gid:0"])));
    }
}
