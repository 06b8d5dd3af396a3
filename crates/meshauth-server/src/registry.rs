//! The server's core: the CA and the store behind one API that node and admin handlers call.
//!
//! Every method takes `now`: the handlers read the clock, this module does not. Every change that
//! an agent may need to see (entries, nodes, the bundle) bumps the change counter that the sync
//! streams watch, so agents learn of it at once instead of by polling.

use std::sync::{Mutex, MutexGuard};

use serde::Deserialize;
use std::time::{Duration, SystemTime};

use meshauth_ca::{Ca, CaConfig, CaJournal, IssuedSvid};
use meshauth_datastore::{
    Datastore, EntryFilter, EntryId, Ipv4Range, IssuedJoinToken, NewEntry, NodeAttestation,
    NodeName, NodeRecord, NodeSpec, PodRecord, PodRuntime, RegistrationEntry, StoreChange,
    StoreChanges, StoreError,
};
use meshauth_policy::labels::check_namespace;
use meshauth_policy::policy::DEFAULT_NAMESPACE;
use meshauth_policy::{IdentityAllocator, IdentityId, Labels, Policy, PolicyKey};
use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use tokio::sync::watch;

use crate::metrics::{DenyReason, Metrics, SvidKind};
use crate::view::{Change, Changed, ViewSource};

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The trust domain served.
    pub trust_domain: TrustDomain,
    /// CA lifetime (rotation happens at 1/2 and 5/6 of it).
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime (node and workload).
    pub svid_ttl: Duration,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// Where nodes' pod ranges are allocated from (a /24 per node) when none was bound.
    pub pod_cidr: Ipv4Range,
    /// The operator's CAs whose node certificates attest by x509pop; `None`: join tokens only.
    pub x509pop: Option<meshauth_tls::x509pop::OperatorRoots>,
    /// The key-encryption key the CA journal is sealed under in the store (`--kek-file`);
    /// `None`: stored as it is (the embedded SQLite store in a 0700 data dir).
    pub kek: Option<std::sync::Arc<crate::kek::Kek>>,
    /// Whether other replicas share the store (etcd): then only the elected leader rotates the
    /// CA ([`Registry::set_leader`]), the others follow the journal it writes.
    pub replicated: bool,
}

/// The default `--pod-cidr`.
pub const DEFAULT_POD_CIDR: Ipv4Range = Ipv4Range {
    base: std::net::Ipv4Addr::new(10, 200, 0, 0),
    prefix: 16,
};

/// Why a request was refused. [`RegistryError::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA refused (bad CSR, ID outside the trust domain).
    #[error("cannot issue SVID: {0}")]
    Ca(#[from] meshauth_ca::CaError),
    /// The caller presented no node SVID.
    #[error("this call needs a node SVID as TLS client certificate")]
    Unauthenticated,
    /// The caller's SVID is not a node SVID of this trust domain.
    #[error(
        "{0} is not a node SPIFFE ID of this trust domain (expected spiffe://<td>/node/<name>)"
    )]
    NotANode(Box<SpiffeId>),
    /// The caller's SVID is not its current one (evicted and re-attested since).
    #[error(
        "node SVID serial {serial} of {node} is no longer current: the node was evicted or re-attested"
    )]
    StaleNodeSvid {
        /// The node.
        node: NodeName,
        /// The serial presented.
        serial: String,
    },
    /// A node asked for an entry that is not parented to it.
    #[error(
        "entry {entry} is parented to {parent}, not to {node}: a node only obtains its own workloads' SVIDs"
    )]
    EntryNotForNode {
        /// The entry.
        entry: EntryId,
        /// Its parent.
        parent: Box<SpiffeId>,
        /// The caller.
        node: Box<SpiffeId>,
    },
    /// A node asked for the SVID of an identity none of its endpoints has.
    #[error(
        "identity {identity} has no endpoint on node {node}: a node only obtains the SVIDs of identities it hosts"
    )]
    IdentityNotHosted {
        /// The identity.
        identity: IdentityId,
        /// The caller.
        node: NodeName,
    },
    /// A node reported a pod the control plane did not place on it.
    #[error(
        "pod {namespace}/{name} is not placed on node {node}: a node reports only pods the control plane placed on it"
    )]
    PodNotPlacedHere {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The caller.
        node: NodeName,
    },
    /// A node reported a pod address outside its pod range.
    #[error("address {ip} is outside node {node}'s pod range {range}")]
    AddressOutOfRange {
        /// The address.
        ip: std::net::Ipv4Addr,
        /// The caller.
        node: NodeName,
        /// Its range.
        range: Ipv4Range,
    },
    /// A node reported an address another pod (or node) has.
    #[error("address {ip} is already used by {by}")]
    AddressInUse {
        /// The address.
        ip: std::net::Ipv4Addr,
        /// Who has it.
        by: String,
    },
    /// A node claimed an address other than the one bound to it.
    #[error("node {node} claims address {claimed}, but {bound} is bound to it")]
    NodeAddressMismatch {
        /// The caller.
        node: NodeName,
        /// What it claimed.
        claimed: std::net::IpAddr,
        /// What is bound.
        bound: std::net::IpAddr,
    },
    /// An x509pop proof was refused.
    #[error("x509pop attestation refused: {0}")]
    X509Pop(#[from] meshauth_tls::x509pop::X509PopError),
    /// x509pop attestation is not configured on this server.
    #[error(
        "this server does not accept x509pop attestation: start it with --x509pop-ca (the operator CA that issues node certificates), or attest with a join token"
    )]
    X509PopDisabled,
    /// Bad input in a request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A node published the WireGuard key another node has.
    #[error("{0}")]
    DuplicateTunnelKey(String),
}

impl RegistryError {
    /// The low-cardinality reason, for metrics and logs.
    pub fn reason(&self) -> DenyReason {
        match self {
            RegistryError::Store(StoreError::TokenUnknown) => DenyReason::TokenUnknown,
            RegistryError::Store(StoreError::TokenExpired) => DenyReason::TokenExpired,
            RegistryError::Store(StoreError::TokenWrongNode { .. }) => DenyReason::TokenWrongNode,
            RegistryError::Store(StoreError::NodeBanned(_)) => DenyReason::NodeBanned,
            RegistryError::Store(StoreError::NodeNotFound(_)) => DenyReason::NodeUnknown,
            RegistryError::Store(StoreError::EntryNotFound(_)) => DenyReason::EntryUnknown,
            RegistryError::Store(StoreError::PolicyNotFound(_)) => DenyReason::InvalidRequest,
            RegistryError::Store(_) => DenyReason::Internal,
            RegistryError::Ca(_) => DenyReason::BadCsr,
            RegistryError::Unauthenticated => DenyReason::Unauthenticated,
            RegistryError::NotANode(_) => DenyReason::NotANode,
            RegistryError::StaleNodeSvid { .. } => DenyReason::StaleNodeSvid,
            RegistryError::EntryNotForNode { .. } => DenyReason::EntryNotForNode,
            RegistryError::IdentityNotHosted { .. } => DenyReason::IdentityNotHosted,
            RegistryError::PodNotPlacedHere { .. } => DenyReason::PodNotPlacedHere,
            RegistryError::AddressOutOfRange { .. } => DenyReason::AddressOutOfRange,
            RegistryError::AddressInUse { .. } => DenyReason::AddressInUse,
            RegistryError::NodeAddressMismatch { .. } => DenyReason::NodeAddressMismatch,
            RegistryError::X509Pop(_) | RegistryError::X509PopDisabled => {
                DenyReason::X509PopRefused
            }
            RegistryError::Invalid(_) => DenyReason::InvalidRequest,
            RegistryError::DuplicateTunnelKey(_) => DenyReason::DuplicateTunnelKey,
        }
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

/// The answer to one CSR of [`Registry::sign_workload_svids`]: its entry and SVID, or why not.
pub type WorkloadSigning = Result<(RegistrationEntry, IssuedSvid)>;

/// An authenticated node caller: who it is and which SVID it presented.
#[derive(Debug, Clone)]
pub struct NodeCaller {
    /// The SPIFFE ID of the client certificate.
    pub spiffe_id: SpiffeId,
    /// Its serial (hex).
    pub serial: String,
}

/// A node SVID just issued.
#[derive(Debug, Clone)]
pub struct NodeSvid {
    /// The node's record after the issue.
    pub node: NodeRecord,
    /// The SVID.
    pub svid: IssuedSvid,
    /// The bundle to trust.
    pub bundle: X509Bundle,
}

/// Everything agents may see, read from the store in one pass: the bundle, every entry, and
/// the cluster state every agent needs to enforce policy. [`crate::view`] turns it into the
/// cluster view each sync stream serves its node from.
#[derive(Debug, Clone)]
pub struct ClusterState {
    /// The trust bundle.
    pub bundle: X509Bundle,
    /// Every registration entry (each stream serves those parented to its node).
    pub entries: Vec<RegistrationEntry>,
    /// Every identity.
    pub identities: Vec<(IdentityId, Labels)>,
    /// Every pod of a node not banned: where the control plane placed it, and what its node
    /// reported.
    pub pods: Vec<PodRecord>,
    /// Every node, banned ones included (their streams end; agents do not see them).
    pub nodes: Vec<NodeRecord>,
    /// The address and pod range bound to each node.
    pub node_specs: Vec<NodeSpec>,
    /// Every policy document (key, YAML).
    pub policies: Vec<(String, String)>,
}

/// The CA and the store, with the change feed.
#[derive(Debug)]
pub struct Registry {
    config: RegistryConfig,
    store: std::sync::Arc<dyn Datastore>,
    ca: Mutex<Ca>,
    /// The journal as last read or written here: another replica's write differs from it.
    journal_seen: Mutex<Option<String>>,
    allocator: Mutex<IdentityAllocator>,
    changes: watch::Sender<u64>,
    /// What changed since the cluster view last took it (recorded before `changes` counts it;
    /// everything at the start, after a failed view or a change of unknown extent).
    pending: Mutex<Changed>,
    /// Whether this replica rotates the CA (always, with one server).
    leader: std::sync::atomic::AtomicBool,
    metrics: Metrics,
}

/// Reads what changed for the cluster view, from the registry's store.
#[derive(Debug)]
pub struct LiveSource<'a> {
    registry: &'a Registry,
    now: SystemTime,
}

impl ViewSource for LiveSource<'_> {
    fn state(&self) -> Result<ClusterState> {
        self.registry.cluster_state(self.now)
    }

    fn bundle(&self) -> X509Bundle {
        self.registry.bundle(self.now)
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>> {
        Ok(self.registry.store.pod(namespace, name)?)
    }

    fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>> {
        Ok(self.registry.store.pods_on_node(node)?)
    }

    fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        Ok(self.registry.store.node(node)?)
    }

    fn node_spec(&self, node: &NodeName) -> Result<Option<NodeSpec>> {
        Ok(self.registry.store.node_spec(node)?)
    }

    fn entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>> {
        match self.registry.store.entry(id) {
            Ok(e) => Ok(Some(e)),
            Err(StoreError::EntryNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn policies(&self) -> Result<Vec<(String, String)>> {
        Ok(self.registry.store.policies()?)
    }
}

// === impl Registry ===

impl Registry {
    /// Loads the CA from the store's journal, or creates one and saves it.
    pub fn open(
        config: RegistryConfig,
        store: std::sync::Arc<dyn Datastore>,
        metrics: Metrics,
        now: SystemTime,
    ) -> anyhow::Result<Self> {
        let ca_config = CaConfig::new(config.trust_domain.clone())
            .with_ca_ttl(config.ca_ttl)
            .with_svid_ttl(config.svid_ttl);
        let stored = store.load_ca_journal()?;
        // Written back only when new, or not sealed yet: a replica never overwrites a journal
        // another one may have just rotated.
        let save = stored
            .as_ref()
            .is_none_or(|s| config.kek.is_some() && !crate::kek::Kek::is_sealed(s));
        let ca = match stored.clone() {
            Some(stored) => {
                let json = Self::unseal(&config, stored)?;
                let journal: CaJournal = serde_json::from_str(&json).map_err(|e| {
                    anyhow::anyhow!("the CA journal in the datastore does not parse: {e}")
                })?;
                let ca = Ca::from_journal(ca_config, journal)?;
                tracing::info!(trust_domain = %config.trust_domain, "CA loaded from the datastore");
                ca
            }
            None => {
                let ca = Ca::new(ca_config, now)?;
                tracing::info!(trust_domain = %config.trust_domain, "new CA created");
                ca
            }
        };
        let allocator =
            IdentityAllocator::restore(store.identities()?.into_iter().map(|(id, l)| (l, id)))
                .map_err(|e| {
                    anyhow::anyhow!("the identities in the datastore are inconsistent: {e}")
                })?;
        let leader = !config.replicated;
        let registry = Registry {
            config,
            store,
            ca: Mutex::new(ca),
            journal_seen: Mutex::new(stored),
            allocator: Mutex::new(allocator),
            changes: watch::Sender::new(0),
            pending: Mutex::new(Changed::Everything),
            leader: std::sync::atomic::AtomicBool::new(leader),
            metrics,
        };
        registry.metrics.set_leader(leader);
        if save {
            registry.save_ca()?;
        }
        registry.upgrade_to_namespaces()?;
        registry.tick(now)?;
        Ok(registry)
    }

    /// The settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn ca(&self) -> MutexGuard<'_, Ca> {
        self.ca.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save_ca(&self) -> anyhow::Result<()> {
        let journal = self.ca().to_journal();
        let json = serde_json::to_string(&journal)?;
        let stored = match &self.config.kek {
            Some(kek) => kek.seal(&json, self.config.trust_domain.as_str())?,
            None => json,
        };
        self.store.save_ca_journal(&stored)?;
        *self.journal_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        Ok(())
    }

    /// Makes this replica the one that rotates the CA, or a follower of the one that does.
    pub fn set_leader(&self, leader: bool) {
        let was = self
            .leader
            .swap(leader, std::sync::atomic::Ordering::SeqCst);
        if was != leader {
            tracing::info!(leader, "CA rotation role changed");
            self.metrics.set_leader(leader);
        }
    }

    /// The kind of store this registry is kept in ("sqlite", "etcd").
    pub fn datastore_kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Whether this replica rotates the CA.
    pub fn is_leader(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes in what another replica changed in the shared store, as the store's change feed
    /// reports it: the CA journal if it was rotated, and what the cluster view reads again for
    /// every sync stream, as for a change made here (the parts touched: a node, a pod, an
    /// identity with its labels read from the store, an entry, the policies, the bundle), or
    /// the whole store for [`StoreChanges::Everything`] or an identity the store does not
    /// hold. Returns whether the CA changed. The parts other than the CA journal are recorded
    /// even when the journal cannot be read (the error is returned). (Identities another
    /// replica allocated are not added to this replica's allocator: they are read when an
    /// allocation here collides with one, see `allocate`.)
    pub fn store_changed(&self, changes: StoreChanges) -> anyhow::Result<bool> {
        let parts = match changes {
            StoreChanges::Everything => {
                let rotated = self.follow_ca();
                self.changed_everything();
                return rotated;
            }
            StoreChanges::Parts(parts) => parts,
        };
        let rotated = if parts.contains(&StoreChange::CaJournal) {
            self.follow_ca()
        } else {
            Ok(false)
        };
        let identities = if parts.iter().any(|p| matches!(p, StoreChange::Identity(_))) {
            match self.store.identities() {
                Ok(all) => all.into_iter().collect(),
                Err(e) => {
                    self.changed_everything();
                    return Err(e.into());
                }
            }
        } else {
            std::collections::BTreeMap::new()
        };
        let mut touched = Vec::with_capacity(parts.len() + 1);
        if matches!(rotated, Ok(true)) {
            touched.push(Change::Bundle);
        }
        for part in parts {
            touched.push(match part {
                StoreChange::CaJournal => continue,
                StoreChange::Node(node) => Change::Node(node),
                StoreChange::Pod { namespace, name } => Change::Pod { namespace, name },
                StoreChange::Policies => Change::Policies,
                StoreChange::Entry(id) => Change::Entry(id),
                StoreChange::Identity(id) => match identities.get(&id) {
                    Some(labels) => Change::Identity(id, labels.clone()),
                    None => {
                        tracing::warn!(identity = %id, "another replica's identity is not in the datastore: reading the whole store");
                        self.changed_everything();
                        return rotated;
                    }
                },
            });
        }
        self.changed_all(touched);
        rotated
    }

    /// Loads the CA from the journal if another replica wrote a new one.
    fn follow_ca(&self) -> anyhow::Result<bool> {
        let stored = self.store.load_ca_journal()?;
        let mut seen = self.journal_seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == stored {
            return Ok(false);
        }
        let Some(text) = stored.clone() else {
            anyhow::bail!("the CA journal vanished from the datastore: restore it from a backup");
        };
        let json = Self::unseal(&self.config, text)?;
        let journal: CaJournal = serde_json::from_str(&json)
            .map_err(|e| anyhow::anyhow!("the CA journal in the datastore does not parse: {e}"))?;
        let ca_config = CaConfig::new(self.config.trust_domain.clone())
            .with_ca_ttl(self.config.ca_ttl)
            .with_svid_ttl(self.config.svid_ttl);
        *self.ca() = Ca::from_journal(ca_config, journal)?;
        *seen = stored;
        tracing::info!("CA journal rotated by another replica: loaded");
        Ok(true)
    }

    /// The allocator of the identities the store holds now.
    fn restored_allocator(&self) -> Result<IdentityAllocator> {
        IdentityAllocator::restore(self.store.identities()?.into_iter().map(|(id, l)| (l, id)))
            .map_err(|e| {
                RegistryError::Invalid(format!(
                    "the identities in the datastore are inconsistent: {e}"
                ))
            })
    }

    /// The journal as stored, opened with the key-encryption key if it is sealed. A journal
    /// from before `--kek-file` is read as it is (and sealed when next saved).
    fn unseal(config: &RegistryConfig, stored: String) -> anyhow::Result<String> {
        match (&config.kek, crate::kek::Kek::is_sealed(&stored)) {
            (Some(kek), true) => Ok(kek.open(&stored, config.trust_domain.as_str())?),
            (None, true) => anyhow::bail!(
                "the CA journal in the datastore is sealed under a key-encryption key: start the server with the --kek-file it was sealed with"
            ),
            (Some(_), false) => {
                tracing::info!(
                    "the CA journal in the datastore is not sealed yet: sealing it under --kek-file"
                );
                Ok(stored)
            }
            (None, false) => Ok(stored),
        }
    }

    /// Records what a change touched, then counts it.
    fn changed(&self, change: Change) {
        self.changed_all([change]);
    }

    /// Records what several changes touched, then counts them as one (nothing for none).
    fn changed_all(&self, changes: impl IntoIterator<Item = Change>) {
        let mut any = false;
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for change in changes {
                any = true;
                p.record(change);
            }
        }
        if any {
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Counts a change of unknown extent: the next view reads the whole store.
    fn changed_everything(&self) {
        self.view_failed();
        self.changes.send_modify(|v| *v += 1);
    }

    /// What changed since the last call (the cluster view's builder takes it).
    pub fn take_changes(&self) -> Changed {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *p, Changed::nothing())
    }

    /// The builder could not apply what it took: the next view reads the whole store.
    pub fn view_failed(&self) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Changed::Everything;
    }

    /// Where the cluster view reads what changed, at `now` (for the bundle).
    pub fn view_source(&self, now: SystemTime) -> LiveSource<'_> {
        LiveSource {
            registry: self,
            now,
        }
    }

    /// A receiver that is notified on every change visible to agents.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Advances CA rotation; persists and announces any change. Returns whether one happened.
    /// A replica that is not the leader follows the journal the leader writes instead.
    pub fn tick(&self, now: SystemTime) -> anyhow::Result<bool> {
        if !self.is_leader() {
            let rotated = self.follow_ca()?;
            if rotated {
                self.metrics.observe_bundle(&self.bundle(now));
                self.changed(Change::Bundle);
            }
            return Ok(rotated);
        }
        // The leader, too, reads the journal first: a leader before it may have rotated.
        if self.config.replicated && self.follow_ca()? {
            self.changed(Change::Bundle);
        }
        let events = self.ca().tick(now)?;
        if events.is_empty() {
            let b = self.bundle(now);
            self.metrics.observe_bundle(&b);
            return Ok(false);
        }
        for event in &events {
            match event {
                meshauth_ca::RotationEvent::Restarted {
                    serial,
                    cross_signed_by,
                } => {
                    self.metrics.ca_restarted();
                    tracing::error!(
                        new_authority = %serial,
                        cross_signed_by = %cross_signed_by,
                        "every CA authority had expired: the server was down longer than the CA lifetime (--ca-ttl). \
                         A new CA signs from now on, cross-signed by the last one, so agents that hold the old \
                         bundle still verify this server and take the new bundle; x509pop nodes attest again by \
                         themselves, join-token nodes need a new token (meshauth token generate)"
                    );
                }
                other => tracing::info!(event = ?other, "CA rotation"),
            }
        }
        self.save_ca()?;
        self.metrics.observe_bundle(&self.bundle(now));
        self.changed(Change::Bundle);
        Ok(true)
    }

    /// The current trust bundle.
    pub fn bundle(&self, now: SystemTime) -> X509Bundle {
        self.ca().bundle(now)
    }

    /// The CA's authorities, for health output.
    pub fn authorities(&self) -> Vec<meshauth_ca::AuthorityInfo> {
        self.ca().authorities()
    }

    /// Issues an SVID for the server itself from a CSR of a key the server generated.
    pub fn issue_own_svid(&self, id: &SpiffeId, csr: &[u8], now: SystemTime) -> Result<IssuedSvid> {
        let ca = self.ca();
        let mut svid = ca.sign_csr(csr, id, None, &[], now)?;
        // After a CA restart: the cross-certificate, so that agents holding only the bundle
        // from before the outage verify the server (and can attest again).
        svid.chain.extend(ca.continuity_chain());
        drop(ca);
        self.metrics.svid_issued(SvidKind::Server);
        Ok(svid)
    }

    // --- node API ---

    /// First attestation with a join token.
    /// `peer` is the address the node connects from: it is bound to the node unless an address
    /// was bound already (with the token or `RegisterNode`).
    pub fn attest_join_token(
        &self,
        token: &str,
        node: &NodeName,
        csr: &[u8],
        peer: Option<std::net::IpAddr>,
        now: SystemTime,
    ) -> Result<NodeSvid> {
        let attested = self.attest_inner(token, node, csr, peer, now)?;
        // Refusals are counted where they are answered (`NodeApi::refuse`), as for every call.
        self.metrics.attestation_succeeded();
        Ok(attested)
    }

    fn attest_inner(
        &self,
        token: &str,
        node: &NodeName,
        csr: &[u8],
        peer: Option<std::net::IpAddr>,
        now: SystemTime,
    ) -> Result<NodeSvid> {
        // Refuse banned nodes before burning their token.
        if self.store.node(node)?.is_some_and(|r| r.banned) {
            return Err(StoreError::NodeBanned(node.clone()).into());
        }
        self.store.consume_join_token(token, node, now)?;
        self.issue_attested(node, NodeAttestation::JoinToken, csr, peer, now)
    }

    /// Attestation by proof of possession of an operator-issued node certificate (see
    /// [`meshauth_tls::x509pop`]), as often as the node needs: at its first start, and whenever
    /// its SVID expired (a long outage) or it was evicted. `exporter` is the TLS exporter value
    /// of the connection the proof came on.
    #[allow(clippy::too_many_arguments, reason = "each is one part of the proof")]
    pub fn attest_x509pop(
        &self,
        node: &NodeName,
        chain: &[rustls::pki_types::CertificateDer<'_>],
        csr: &[u8],
        proof: (rustls::SignatureScheme, &[u8]),
        exporter: Option<&[u8]>,
        peer: Option<std::net::IpAddr>,
        now: SystemTime,
    ) -> Result<NodeSvid> {
        let roots = self
            .config
            .x509pop
            .as_ref()
            .ok_or(RegistryError::X509PopDisabled)?;
        let verified = roots.verify(chain, node.as_str(), csr, exporter, proof.0, proof.1, now)?;
        if self.store.node(node)?.is_some_and(|r| r.banned) {
            return Err(StoreError::NodeBanned(node.clone()).into());
        }
        tracing::debug!(node = %node, fingerprint = %verified.fingerprint, "x509pop proof verified");
        let attested = self.issue_attested(node, NodeAttestation::X509Pop, csr, peer, now)?;
        self.metrics.attestation_succeeded();
        Ok(attested)
    }

    /// Issues the node SVID of a node that just proved who it is, binds its address and pod
    /// range, and records how it attested.
    fn issue_attested(
        &self,
        node: &NodeName,
        how: NodeAttestation,
        csr: &[u8],
        peer: Option<std::net::IpAddr>,
        now: SystemTime,
    ) -> Result<NodeSvid> {
        let id = self.node_spiffe_id(node)?;
        let svid = self.ca().sign_csr(csr, &id, None, &[], now)?;
        let spec = self.bind_node(node, peer)?;
        let mut record =
            self.store
                .record_attestation(node, how, &svid.serial, svid.not_after, now)?;
        if let Some(address) = spec.address {
            self.store.set_node_address(node, address)?;
            record.address = Some(address);
        }
        self.metrics.svid_issued(SvidKind::Node);
        tracing::info!(node = %node, node.id = %record.node_id, serial = %svid.serial, address = ?spec.address, pod_range = %spec.pod_range, attestation = how.as_str(), "node attested");
        self.changed(Change::Node(node.clone()));
        Ok(NodeSvid {
            node: record,
            svid,
            bundle: self.bundle(now),
        })
    }

    /// Checks that a TLS client is a current, non-banned node of this trust domain.
    pub fn authenticate_node(&self, caller: Option<&NodeCaller>) -> Result<NodeRecord> {
        let caller = caller.ok_or(RegistryError::Unauthenticated)?;
        let node = self.node_name_of(&caller.spiffe_id)?;
        let record = self.store.usable_node(&node)?;
        if !record.accepts_serial(&caller.serial) {
            return Err(RegistryError::StaleNodeSvid {
                node,
                serial: caller.serial.clone(),
            });
        }
        Ok(record)
    }

    /// Renews the caller's node SVID.
    pub fn renew_node(
        &self,
        caller: Option<&NodeCaller>,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<NodeSvid> {
        let record = self.authenticate_node(caller)?;
        let proven = caller.map(|c| c.serial.clone()).unwrap_or_default();
        let id = self.node_spiffe_id(&record.name)?;
        let svid = self.ca().sign_csr(csr, &id, None, &[], now)?;
        let record =
            self.store
                .record_renewal(&record.name, &proven, &svid.serial, svid.not_after)?;
        self.metrics.svid_issued(SvidKind::Node);
        tracing::info!(node = %record.name, serial = %svid.serial, "node SVID renewed");
        Ok(NodeSvid {
            node: record,
            svid,
            bundle: self.bundle(now),
        })
    }

    /// Signs workload SVIDs for the caller, only for entries parented to it.
    ///
    /// Each CSR is answered on its own, in request order: an entry that is unknown, parented to
    /// another node, in a reserved namespace (stored before such entries were refused), or that
    /// the CA will not sign (bad CSR, a stored TTL or DNS name it cannot put in a certificate)
    /// gets its error and never keeps the node from its other SVIDs. The call as a whole fails
    /// only when the caller is not a usable node. Refusals are the caller's to count and log.
    pub fn sign_workload_svids(
        &self,
        caller: Option<&NodeCaller>,
        csrs: &[(EntryId, Vec<u8>)],
        now: SystemTime,
    ) -> Result<Vec<(EntryId, WorkloadSigning)>> {
        let record = self.authenticate_node(caller)?;
        let node_id = self.node_spiffe_id(&record.name)?;
        Ok(csrs
            .iter()
            .map(|(entry_id, csr)| {
                let signed = self.sign_workload_svid(&record.name, &node_id, entry_id, csr, now);
                (entry_id.clone(), signed)
            })
            .collect())
    }

    /// One entry of [`Registry::sign_workload_svids`].
    fn sign_workload_svid(
        &self,
        node: &NodeName,
        node_id: &SpiffeId,
        entry_id: &EntryId,
        csr: &[u8],
        now: SystemTime,
    ) -> WorkloadSigning {
        let entry = self.store.entry(entry_id)?;
        if entry.parent_id != *node_id {
            return Err(RegistryError::EntryNotForNode {
                entry: entry.id,
                parent: Box::new(entry.parent_id),
                node: Box::new(node_id.clone()),
            });
        }
        if let Some(why) = self.reserved_id(&entry.spiffe_id) {
            return Err(RegistryError::Invalid(format!(
                "entry {} cannot be signed: {why}; delete the entry",
                entry.id
            )));
        }
        let ttl = entry.x509_svid_ttl.unwrap_or(self.config.svid_ttl);
        let svid = self
            .ca()
            .sign_csr(csr, &entry.spiffe_id, Some(ttl), &entry.dns_names, now)
            .map_err(|e| match e {
                // Faults of the stored entry, not of the node's CSR.
                meshauth_ca::CaError::InvalidTtl { .. }
                | meshauth_ca::CaError::InvalidDnsName(_) => RegistryError::Invalid(format!(
                    "entry {} cannot be signed: {e}; fix it with `meshauth entry update`",
                    entry.id
                )),
                e => e.into(),
            })?;
        self.metrics.svid_issued(SvidKind::Workload);
        tracing::debug!(node = %node, spiffe_id = %entry.spiffe_id, serial = %svid.serial, "workload SVID issued");
        Ok((entry, svid))
    }

    /// Everything agents may see now (see [`ClusterState`]). Read after [`Registry::revision`]:
    /// a change after that read bumps the revision again, so a view built from this is never
    /// newer than it says.
    pub fn cluster_state(&self, now: SystemTime) -> Result<ClusterState> {
        let entries = self.store.list_entries(&EntryFilter::default())?;
        let nodes = self.store.nodes()?;
        // A banned node and its pods vanish from every agent's view: their addresses lose
        // their identity (traffic from and to them drops) and every auth entry toward them is
        // no longer justified (revoked at once).
        let banned: std::collections::BTreeSet<&NodeName> =
            nodes.iter().filter(|n| n.banned).map(|n| &n.name).collect();
        let pods = self
            .store
            .pods()?
            .into_iter()
            .filter(|p| !banned.contains(&p.node))
            .collect();
        Ok(ClusterState {
            bundle: self.bundle(now),
            entries,
            identities: self.store.identities()?,
            pods,
            node_specs: self.store.node_specs()?,
            policies: self.store.policies()?,
            nodes,
        })
    }

    /// The number of changes visible to agents so far (the revision of the cluster view).
    pub fn revision(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Checks the address a node claims for itself (or, with `claimed: false`, the address it
    /// connects from) against the one bound to it. A node cannot move itself to another
    /// address, least of all another node's.
    pub fn check_node_address(
        &self,
        node: &NodeName,
        address: std::net::IpAddr,
        claimed: bool,
    ) -> Result<()> {
        let spec = self.bind_node(node, Some(address))?;
        if !claimed {
            if self.store.node(node)?.and_then(|n| n.address) != spec.address
                && let Some(bound) = spec.address
            {
                self.store.set_node_address(node, bound)?;
                self.changed(Change::Node(node.clone()));
            }
            return Ok(());
        }
        let claimed = address;
        match spec.address {
            Some(bound) if bound != claimed => Err(RegistryError::NodeAddressMismatch {
                node: node.clone(),
                claimed,
                bound,
            }),
            _ => {
                if self.store.node(node)?.and_then(|n| n.address) != Some(claimed) {
                    self.store.set_node_address(node, claimed)?;
                    self.changed(Change::Node(node.clone()));
                }
                Ok(())
            }
        }
    }

    /// Records the WireGuard public key `node` publishes on its authenticated sync stream: a
    /// node publishes only its own key (the stream is bound to its node SVID), and never one
    /// another node published.
    pub fn publish_tunnel_key(
        &self,
        node: &NodeName,
        key: meshauth_policy::TunnelKey,
    ) -> Result<()> {
        match self.store.set_node_tunnel_key(node, key) {
            Ok(true) => {
                tracing::info!(node = %node, tunnel_key = %key, "tunnel key published");
                self.changed(Change::Node(node.clone()));
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e @ StoreError::DuplicateTunnelKey { .. }) => {
                Err(RegistryError::DuplicateTunnelKey(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The spec bound to `node`, completing it: a pod range allocated from the pod CIDR if
    /// none was bound, and `peer` as its address if none was bound yet.
    fn bind_node(&self, node: &NodeName, peer: Option<std::net::IpAddr>) -> Result<NodeSpec> {
        // Bound already, with an address or none to add (every sync stream and pod report):
        // its own row is enough, not every node's.
        if let Some(spec) = self.store.node_spec(node)?
            && (spec.address.is_some() || peer.is_none())
        {
            return Ok(spec);
        }
        let specs = self.store.node_specs()?;
        let mut spec = match specs.iter().find(|s| s.name == *node) {
            Some(s) => s.clone(),
            None => NodeSpec {
                name: node.clone(),
                address: None,
                pod_range: self.allocate_pod_range(&specs)?,
            },
        };
        let before = specs.iter().find(|s| s.name == *node).cloned();
        // The address it connects from, when none was bound explicitly. Nodes behind one NAT
        // (or on one loopback) share it; agents then cannot tell them apart by address and
        // refuse to place a handshake from it (fail closed). Bind addresses explicitly for that.
        if spec.address.is_none() {
            spec.address = peer;
        }
        if before.as_ref() != Some(&spec) {
            self.store.put_node_spec(&spec)?;
            tracing::info!(node = %node, address = ?spec.address, pod_range = %spec.pod_range, "node bound");
        }
        Ok(spec)
    }

    fn allocate_pod_range(&self, specs: &[NodeSpec]) -> Result<Ipv4Range> {
        let cidr = self.config.pod_cidr;
        if cidr.prefix > 24 {
            return Err(RegistryError::Invalid(format!(
                "the pod CIDR {cidr} is too small for /24 node ranges"
            )));
        }
        let count = 1u32 << (24 - u32::from(cidr.prefix));
        (0..count)
            .map(|i| Ipv4Range {
                base: std::net::Ipv4Addr::from(u32::from(cidr.base) + (i << 8)),
                prefix: 24,
            })
            .find(|r| !specs.iter().any(|s| s.pod_range.overlaps(*r)))
            .ok_or_else(|| {
                RegistryError::Invalid(format!("the pod CIDR {cidr} has no free /24 left"))
            })
    }

    /// Binds a node's address and pod range (admin; before it attests, or to change them).
    pub fn register_node(
        &self,
        node: &NodeName,
        address: Option<std::net::IpAddr>,
        pod_range: Option<Ipv4Range>,
    ) -> Result<NodeSpec> {
        let specs = self.store.node_specs()?;
        let existing = specs.iter().find(|s| s.name == *node).cloned();
        let pod_range = match (pod_range, &existing) {
            (Some(r), _) => r,
            (None, Some(e)) => e.pod_range,
            (None, None) => self.allocate_pod_range(&specs)?,
        };
        if let Some(other) = specs
            .iter()
            .find(|s| s.name != *node && s.pod_range.overlaps(pod_range))
        {
            return Err(RegistryError::Invalid(format!(
                "pod range {pod_range} overlaps node {}'s {}",
                other.name, other.pod_range
            )));
        }
        if let Some(ip) = address
            && let Some(other) = specs
                .iter()
                .find(|s| s.name != *node && s.address == Some(ip))
        {
            return Err(RegistryError::Invalid(format!(
                "address {ip} is bound to node {}",
                other.name
            )));
        }
        let spec = NodeSpec {
            name: node.clone(),
            address: address.or(existing.and_then(|e| e.address)),
            pod_range,
        };
        self.store.put_node_spec(&spec)?;
        if let Some(ip) = spec.address
            && self.store.node(node)?.is_some()
        {
            self.store.set_node_address(node, ip)?;
        }
        tracing::info!(node = %node, address = ?spec.address, pod_range = %spec.pod_range, "node registered");
        self.changed(Change::Node(node.clone()));
        Ok(spec)
    }

    // --- pods (the orchestrator side) and what nodes report of them ---

    fn check_pod_name(what: &str, name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if ok {
            Ok(())
        } else {
            Err(RegistryError::Invalid(format!(
                "invalid pod {what} {name:?}: use lowercase letters, digits, '-' and '.' (at most 253)"
            )))
        }
    }

    /// The identity of `labels` (a label set with its namespace), allocated and stored if new.
    ///
    /// The allocator's lock is held from the allocation to the store's answer, so this
    /// replica never hands one id out twice. With replicas, the store refuses an id or a label
    /// set another replica stored first; the identities are then read again, under the same
    /// lock, and the allocation retried (a bounded number of times).
    fn allocate(&self, labels: &Labels) -> Result<IdentityId> {
        const ATTEMPTS: usize = 8;
        let mut alloc = self.allocator.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 1;
        loop {
            let (id, new) = alloc
                .allocate(labels)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            if !new {
                return Ok(id);
            }
            match self.store.insert_identity(id, labels) {
                Ok(()) => {
                    tracing::info!(identity = %id, labels = %labels, "identity allocated");
                    self.changed(Change::Identity(id, labels.clone()));
                    return Ok(id);
                }
                Err(e) if self.config.replicated && attempt < ATTEMPTS => {
                    tracing::debug!(identity = %id, error = %e, attempt, "identity allocation raced another replica; reading the identities again");
                    *alloc = self.restored_allocator()?;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Places a pod on a node (or re-places it). Its identity is that of its labels **in its
    /// namespace** (the labels plus `io.kubernetes.pod.namespace=<namespace>`, replacing any
    /// value the pod gave that label), so the same labels in two namespaces are two identities;
    /// the stored pod keeps the labels it was given.
    pub fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: Labels,
        node: &NodeName,
    ) -> Result<PodRecord> {
        check_namespace(namespace).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        Self::check_pod_name("name", name)?;
        let identity_labels = labels
            .clone()
            .with_namespace(namespace)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let identity = self.allocate(&identity_labels)?;
        let pod = PodRecord {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels,
            node: node.clone(),
            identity,
            runtime: None,
        };
        self.store.put_pod(&pod)?;
        tracing::info!(pod = %format!("{namespace}/{name}"), node = %node, identity = %identity, "pod placed");
        self.changed(Change::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
        Ok(self.store.pod(namespace, name)?.unwrap_or(pod))
    }

    /// Removes a pod from the control plane.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        if !self.store.delete_pod(namespace, name)? {
            return Err(RegistryError::Invalid(format!("no pod {namespace}/{name}")));
        }
        tracing::info!(pod = %format!("{namespace}/{name}"), "pod deleted");
        self.changed(Change::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
        Ok(())
    }

    /// Records what the calling node reports of one of its pods: only for a pod the control
    /// plane placed on it, with an address inside its pod range that no other pod or node has.
    pub fn report_pod(
        &self,
        caller: Option<&NodeCaller>,
        namespace: &str,
        name: &str,
        ipv4: std::net::Ipv4Addr,
        interface: &str,
    ) -> Result<IdentityId> {
        let node = self.authenticate_node(caller)?;
        if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
            return Err(RegistryError::Invalid(format!(
                "invalid interface name {interface:?}"
            )));
        }
        let pod = self
            .store
            .pod(namespace, name)?
            .filter(|p| p.node == node.name)
            .ok_or_else(|| RegistryError::PodNotPlacedHere {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                node: node.name.clone(),
            })?;
        let spec = self.bind_node(&node.name, None)?;
        if !spec.pod_range.contains(ipv4) {
            return Err(RegistryError::AddressOutOfRange {
                ip: ipv4,
                node: node.name.clone(),
                range: spec.pod_range,
            });
        }
        if let Some(n) = self
            .store
            .node_specs()?
            .into_iter()
            .find(|s| s.address == Some(std::net::IpAddr::V4(ipv4)))
        {
            return Err(RegistryError::AddressInUse {
                ip: ipv4,
                by: format!("node {}", n.name),
            });
        }
        let runtime = PodRuntime {
            ipv4,
            interface: interface.to_owned(),
        };
        if pod.runtime.as_ref() != Some(&runtime) {
            // The store refuses an address another pod holds.
            match self.store.set_pod_runtime(namespace, name, Some(&runtime)) {
                Ok(_) => {}
                Err(StoreError::AddressInUse { pod, .. }) => {
                    return Err(RegistryError::AddressInUse {
                        ip: ipv4,
                        by: format!("pod {pod}"),
                    });
                }
                Err(e) => return Err(e.into()),
            }
            tracing::info!(node = %node.name, pod = %format!("{namespace}/{name}"), ip = %ipv4, interface, "pod reported");
            self.changed(Change::Pod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        Ok(pod.identity)
    }

    /// Forgets what the calling node reported of one of its pods.
    pub fn withdraw_pod(
        &self,
        caller: Option<&NodeCaller>,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        let node = self.authenticate_node(caller)?;
        let placed_here = self
            .store
            .pod(namespace, name)?
            .is_some_and(|p| p.node == node.name);
        if !placed_here {
            return Err(RegistryError::PodNotPlacedHere {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                node: node.name.clone(),
            });
        }
        self.store.set_pod_runtime(namespace, name, None)?;
        tracing::info!(node = %node.name, pod = %format!("{namespace}/{name}"), "pod withdrawn");
        self.changed(Change::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
        Ok(())
    }

    /// Signs identity SVIDs for the caller, only for identities of pods the control plane placed
    /// on its node.
    pub fn sign_identity_svids(
        &self,
        caller: Option<&NodeCaller>,
        csrs: &[(IdentityId, Vec<u8>)],
        now: SystemTime,
    ) -> Result<Vec<(IdentityId, IssuedSvid)>> {
        let node = self.authenticate_node(caller)?;
        let hosted: std::collections::BTreeSet<IdentityId> = self
            .store
            .pods_on_node(&node.name)?
            .into_iter()
            .map(|p| p.identity)
            .collect();
        let mut out = Vec::with_capacity(csrs.len());
        for (identity, csr) in csrs {
            if !hosted.contains(identity) {
                return Err(RegistryError::IdentityNotHosted {
                    identity: *identity,
                    node: node.name.clone(),
                });
            }
            let id = meshauth_spiffe::identity_spiffe_id(&self.config.trust_domain, identity.get());
            let svid = self
                .ca()
                .sign_csr(csr, &id, Some(self.config.svid_ttl), &[], now)?;
            self.metrics.svid_issued(SvidKind::Workload);
            out.push((*identity, svid));
        }
        Ok(out)
    }

    /// Every identity.
    pub fn identities(&self) -> Result<Vec<(IdentityId, Labels)>> {
        Ok(self.store.identities()?)
    }

    /// Every pod.
    pub fn pods(&self) -> Result<Vec<PodRecord>> {
        Ok(self.store.pods()?)
    }

    /// Every node spec (address and pod range bound to each node).
    pub fn node_specs(&self) -> Result<Vec<NodeSpec>> {
        Ok(self.store.node_specs()?)
    }

    // --- policies ---

    /// Validates every document of `yaml` and stores them all, or none, each under its
    /// [`PolicyKey`] (`namespace/name` for a `CiliumNetworkPolicy`, `name` for a clusterwide
    /// policy). A `CiliumNetworkPolicy` without `metadata.namespace` is in `namespace`
    /// (`default` when `None`, as `kubectl apply -n`); the stored document names its namespace,
    /// so that every agent reads it the same way. Returns the keys, in document order.
    pub fn apply_policies(&self, yaml: &str, namespace: Option<&str>) -> Result<Vec<PolicyKey>> {
        let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
        check_namespace(namespace).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let parsed = meshauth_policy::parse_policies_in(yaml, namespace)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let mut values = Vec::new();
        for de in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(de)
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            if !value.is_null() {
                values.push(value);
            }
        }
        if values.len() != parsed.len() {
            return Err(RegistryError::Invalid(format!(
                "{} documents parsed as {} policies: send one policy per document",
                values.len(),
                parsed.len()
            )));
        }
        let mut docs = Vec::new();
        for (mut value, policy) in values.into_iter().zip(&parsed) {
            let text = policy_document(&mut value, policy)?;
            docs.push((policy.key().to_string(), text));
        }
        self.store.put_policies(&docs)?;
        let keys: Vec<PolicyKey> = parsed.iter().map(Policy::key).collect();
        tracing::info!(policies = ?docs.iter().map(|(k, _)| k).collect::<Vec<_>>(), "policies applied");
        self.changed(Change::Policies);
        Ok(keys)
    }

    /// Deletes the policy `key`: `namespace/name`, or `name`, which is the clusterwide policy
    /// of that name or, when there is none, `default/name`. Returns the key deleted.
    pub fn delete_policy(&self, key: &str) -> Result<PolicyKey> {
        let parsed: PolicyKey = key.parse().map_err(RegistryError::Invalid)?;
        let stored = self.store.policies()?;
        let has = |k: &PolicyKey| stored.iter().any(|(s, _)| *s == k.to_string());
        let target = match &parsed.namespace {
            None if !has(&parsed) => PolicyKey::namespaced(DEFAULT_NAMESPACE, &parsed.name),
            _ => parsed.clone(),
        };
        if !has(&target) {
            let elsewhere: Vec<&str> = stored
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| k.rsplit('/').next() == Some(parsed.name.as_str()))
                .collect();
            return Err(RegistryError::Invalid(if elsewhere.is_empty() {
                format!("no policy {key} (see `meshauth policy list`)")
            } else {
                format!(
                    "no policy {key}; policies named {} are {}: give the key",
                    parsed.name,
                    elsewhere.join(", ")
                )
            }));
        }
        self.store.delete_policy(&target.to_string())?;
        tracing::info!(policy = %target, "policy deleted");
        self.changed(Change::Policies);
        Ok(target)
    }

    /// Every policy (key, YAML), by key.
    pub fn policies(&self) -> Result<Vec<(String, String)>> {
        Ok(self.store.policies()?)
    }

    /// Brings what a store of an earlier version holds up to namespaces: policies stored under
    /// their bare name move to their key (`default/name` for a `CiliumNetworkPolicy` without
    /// `metadata.namespace`, whose document then names it), and pods whose identity was
    /// allocated from their labels alone get the identity of their labels in their namespace.
    /// What cannot be brought up (a document that no longer parses, a namespace that is not a
    /// DNS-1123 label) is logged and left as it is.
    fn upgrade_to_namespaces(&self) -> anyhow::Result<()> {
        let mut moves = Vec::new();
        for (stored, yaml) in self.store.policies()? {
            let policy = match meshauth_policy::parse_policies(&yaml) {
                Ok(mut ps) if ps.len() == 1 => ps.remove(0),
                Ok(_) => {
                    tracing::warn!(policy = %stored, "a stored policy document holds more or less than one policy; left as it is");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(policy = %stored, error = %e, "a stored policy does not parse; left as it is");
                    continue;
                }
            };
            let mut value: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
            let text = policy_document(&mut value, &policy)?;
            let key = policy.key().to_string();
            if key != stored || text != yaml {
                tracing::info!(from = %stored, to = %key, "policy stored under its key");
                moves.push((stored, key, text));
            }
        }
        if !moves.is_empty() {
            self.store.rekey_policies(&moves)?;
        }
        let identities: std::collections::BTreeMap<IdentityId, Labels> =
            self.store.identities()?.into_iter().collect();
        for mut pod in self.store.pods()? {
            let Ok(want) = pod.labels.clone().with_namespace(&pod.namespace) else {
                tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), "the pod's namespace is not a DNS-1123 label: its identity is left as it is");
                continue;
            };
            if identities.get(&pod.identity) == Some(&want) {
                continue;
            }
            let id = self.allocate(&want)?;
            tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), from = %pod.identity, to = %id, "pod identity now includes its namespace");
            pod.identity = id;
            self.store.put_pod(&pod)?;
        }
        Ok(())
    }

    // --- admin API ---

    /// Creates a join token for `node`.
    pub fn create_join_token(
        &self,
        node: &NodeName,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedJoinToken> {
        let ttl = ttl.unwrap_or(self.config.join_token_ttl);
        let token = self.store.create_join_token(node, ttl, now)?;
        tracing::info!(node = %node, expires_in_s = ttl.as_secs(), "join token created");
        Ok(token)
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        Ok(self.store.nodes()?)
    }

    /// One node.
    pub fn node(&self, node: &NodeName) -> Result<NodeRecord> {
        self.store
            .node(node)?
            .ok_or_else(|| StoreError::NodeNotFound(node.clone()).into())
    }

    /// Bans a node; its streams end and its calls are refused.
    pub fn ban_node(&self, node: &NodeName) -> Result<NodeRecord> {
        let record = self.store.ban_node(node)?;
        tracing::warn!(node = %node, "node banned");
        self.changed(Change::Node(node.clone()));
        Ok(record)
    }

    /// Evicts a node; it must attest again with a new token.
    pub fn evict_node(&self, node: &NodeName) -> Result<()> {
        self.store.evict_node(node)?;
        tracing::warn!(node = %node, "node evicted");
        self.changed(Change::Node(node.clone()));
        Ok(())
    }

    /// Checks an entry before it is stored, at creation and at update. Whatever the server would
    /// refuse to sign, or no workload could ever match, is refused here with one sentence:
    ///
    /// - both IDs are in this trust domain, and the SPIFFE ID has a path outside the namespaces
    ///   meshauth issues itself: `/meshauth/` (the server is `/meshauth/server`), `/node/` and
    ///   `/identity/` ([`meshauth_spiffe::reserved_namespace`]);
    /// - the parent is a node ID, `spiffe://<td>/node/<name>` with a valid node name. The node
    ///   need not have attested yet: entries may be registered ahead of a node's first
    ///   attestation (as in SPIRE), since only that node can ever obtain them;
    /// - 1 to 32 selectors, each of a kind the agent's attestor produces and with a value it
    ///   can produce ([`Registry::check_selector`]), and no two of the same kind (a process
    ///   has one uid, one gid, one executable and one network namespace);
    /// - at most 32 DNS names, each an RFC 1123 host name ([`meshauth_ca::is_dns_name`]);
    /// - a TTL, when given, of at least one second and at most the CA lifetime (an SVID never
    ///   outlives its CA, so a longer one would only be cut short).
    ///
    /// Duplicates (same SPIFFE ID, parent and selector set) are refused by the store, in the
    /// same transaction as the write.
    fn check_entry(&self, new: &NewEntry) -> Result<()> {
        const MAX_SELECTORS: usize = 32;
        const MAX_DNS_NAMES: usize = 32;
        let invalid = |msg: String| Err(RegistryError::Invalid(msg));
        let td = &self.config.trust_domain;
        for (what, id) in [("spiffe ID", &new.spiffe_id), ("parent ID", &new.parent_id)] {
            if id.trust_domain() != td {
                return invalid(format!("{what} {id} is not in trust domain {td}"));
            }
        }
        if new.spiffe_id.path().is_empty() {
            return invalid(format!(
                "spiffe ID {} has no path: SVIDs need one",
                new.spiffe_id
            ));
        }
        if let Some(why) = self.reserved_id(&new.spiffe_id) {
            return invalid(why);
        }
        if self.node_name_of(&new.parent_id).is_err() {
            return invalid(format!(
                "parent ID {} is not a node ID: an entry's parent is the node whose agent may obtain its SVID, spiffe://{td}/node/<name>",
                new.parent_id
            ));
        }
        if new.selectors.is_empty() {
            return invalid(
                "an entry needs at least one selector (e.g. --selector unix:uid:1000)".into(),
            );
        }
        if new.selectors.len() > MAX_SELECTORS {
            return invalid(format!(
                "an entry has at most {MAX_SELECTORS} selectors, not {}",
                new.selectors.len()
            ));
        }
        let mut kinds = std::collections::BTreeMap::new();
        for selector in &new.selectors {
            let kind = Self::check_selector(selector).map_err(RegistryError::Invalid)?;
            match kinds.insert(kind, selector) {
                Some(other) if other != selector => {
                    return invalid(format!(
                        "selectors {other} and {selector} can never both match: a process has only one {kind}"
                    ));
                }
                _ => {}
            }
        }
        if new.dns_names.len() > MAX_DNS_NAMES {
            return invalid(format!(
                "an entry has at most {MAX_DNS_NAMES} DNS names, not {}",
                new.dns_names.len()
            ));
        }
        if let Some(name) = new.dns_names.iter().find(|n| !meshauth_ca::is_dns_name(n)) {
            return invalid(format!(
                "DNS name {:?} is not a host name: use dot-separated labels of letters, digits and hyphens (1 to 63 characters each, 253 in all, the last not all digits), optionally after `*.`",
                name.chars().take(300).collect::<String>()
            ));
        }
        if let Some(ttl) = new.x509_svid_ttl {
            let max = self.config.ca_ttl;
            if ttl.as_secs() == 0 || ttl > max {
                return invalid(format!(
                    "X509-SVID TTL of {}s is out of range: it must be at least 1s and at most the CA lifetime of {}s",
                    ttl.as_secs(),
                    max.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// Why `id` may not be a registration entry's SPIFFE ID, if it is in a reserved namespace.
    fn reserved_id(&self, id: &SpiffeId) -> Option<String> {
        meshauth_spiffe::reserved_namespace(id).map(|ns| {
            format!(
                "spiffe ID {id} is reserved: IDs under spiffe://{}{}/ belong to {}, so no registration entry may claim one",
                self.config.trust_domain, ns.prefix, ns.owner
            )
        })
    }

    /// A duplicate entry is the operator's mistake, not the server's: say so as a refusal.
    fn entry_store_error(e: StoreError) -> RegistryError {
        match e {
            e @ StoreError::DuplicateEntry { .. } => RegistryError::Invalid(e.to_string()),
            e => e.into(),
        }
    }

    /// Checks one selector against what the agent's attestor produces for a caller
    /// (`meshauth-agent/src/attestor.rs`), so that an entry never waits for a selector no
    /// workload can have. Returns the kind a process has only one of, or why the selector is
    /// refused:
    ///
    /// - `unix:uid:<u32>`, `unix:gid:<u32>`: decimal, as the kernel reports them (no sign, no
    ///   leading zeros);
    /// - `unix:path:<path>`: the executable's absolute path as `/proc/<pid>/exe` names it (no
    ///   empty, `.` or `..` segments, no trailing `/`);
    /// - `netns:<u64>`: the inode of the caller's network namespace, decimal.
    ///
    /// `unix:pid` is refused: pids are reused, so a pid does not name a workload.
    fn check_selector(
        s: &meshauth_datastore::Selector,
    ) -> std::result::Result<&'static str, String> {
        let value = s.value.as_str();
        let refuse = |why: &str| Err(format!("selector {s}: {why}"));
        match (s.kind.as_str(), value.split_once(':')) {
            ("unix", Some(("uid", v))) if Self::is_decimal::<u32>(v) => Ok("uid"),
            ("unix", Some(("uid", _))) => {
                refuse("a uid is a decimal number from 0 to 4294967295, e.g. unix:uid:1000")
            }
            ("unix", Some(("gid", v))) if Self::is_decimal::<u32>(v) => Ok("gid"),
            ("unix", Some(("gid", _))) => {
                refuse("a gid is a decimal number from 0 to 4294967295, e.g. unix:gid:1000")
            }
            ("unix", Some(("path", v))) if Self::is_absolute_path(v) => Ok("executable path"),
            ("unix", Some(("path", _))) => refuse(
                "give the executable's absolute path as /proc/<pid>/exe shows it, e.g. unix:path:/usr/bin/curl",
            ),
            ("unix", Some(("pid", _))) => refuse(
                "unix:pid is not supported, because pids are reused and do not identify a workload: select by unix:uid, unix:gid, unix:path or netns",
            ),
            ("unix", _) => refuse(
                "the unix selectors are unix:uid:<uid>, unix:gid:<gid> and unix:path:<absolute path>",
            ),
            ("netns", _) if Self::is_decimal::<u64>(value) => Ok("network namespace"),
            ("netns", _) => refuse(
                "netns takes the decimal inode number of a network namespace, e.g. netns:4026531840 (stat -L -c %i /proc/<pid>/ns/net)",
            ),
            _ => Err(format!(
                "selector {s} has unknown type {:?}: agents produce only unix:uid, unix:gid, unix:path and netns selectors",
                s.kind
            )),
        }
    }

    /// Whether `v` is a number of type `T` written as the kernel writes it: decimal digits only,
    /// no leading zero (except `0` itself).
    fn is_decimal<T: std::str::FromStr>(v: &str) -> bool {
        !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_digit())
            && (v == "0" || !v.starts_with('0'))
            && v.parse::<T>().is_ok()
    }

    /// Whether `v` is an absolute, normalized path of something other than `/` itself.
    fn is_absolute_path(v: &str) -> bool {
        v.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        })
    }

    /// Creates an entry, after `check_entry`.
    pub fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry> {
        self.check_entry(&new).inspect_err(|e| {
            tracing::info!(spiffe_id = %new.spiffe_id, error = %e, "entry refused");
        })?;
        let entry = self
            .store
            .create_entry(new)
            .map_err(Self::entry_store_error)?;
        tracing::info!(entry.id = %entry.id, spiffe_id = %entry.spiffe_id, parent_id = %entry.parent_id, "entry created");
        self.changed(Change::Entry(entry.id.clone()));
        Ok(entry)
    }

    /// Replaces an entry's fields, after the checks of [`Registry::create_entry`].
    pub fn update_entry(&self, id: &EntryId, new: NewEntry) -> Result<RegistrationEntry> {
        self.check_entry(&new).inspect_err(|e| {
            tracing::info!(entry.id = %id, spiffe_id = %new.spiffe_id, error = %e, "entry update refused");
        })?;
        let entry = self
            .store
            .update_entry(id, new)
            .map_err(Self::entry_store_error)?;
        tracing::info!(entry.id = %entry.id, revision = entry.revision, "entry updated");
        self.changed(Change::Entry(entry.id.clone()));
        Ok(entry)
    }

    /// Deletes an entry.
    pub fn delete_entry(&self, id: &EntryId) -> Result<()> {
        self.store.delete_entry(id)?;
        tracing::info!(entry.id = %id, "entry deleted");
        self.changed(Change::Entry(id.clone()));
        Ok(())
    }

    /// One entry.
    pub fn entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        Ok(self.store.entry(id)?)
    }

    /// Entries passing `filter`.
    pub fn entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        Ok(self.store.list_entries(filter)?)
    }

    /// How many entries exist.
    pub fn count_entries(&self) -> Result<u64> {
        Ok(self.store.count_entries()?)
    }

    // --- helpers ---

    pub(crate) fn node_spiffe_id(&self, node: &NodeName) -> Result<SpiffeId> {
        meshauth_spiffe::node_spiffe_id(&self.config.trust_domain, node.as_str())
            .map_err(|e| RegistryError::Invalid(e.to_string()))
    }

    /// The node name of a node SPIFFE ID of this trust domain.
    pub fn node_name_of(&self, id: &SpiffeId) -> Result<NodeName> {
        let name = (id.trust_domain() == &self.config.trust_domain)
            .then(|| id.path().strip_prefix("/node/"))
            .flatten()
            .ok_or_else(|| RegistryError::NotANode(Box::new(id.clone())))?;
        name.parse()
            .map_err(|_| RegistryError::NotANode(Box::new(id.clone())))
    }
}

/// The document stored for `policy`, parsed from `value`: a `CiliumNetworkPolicy` names its
/// namespace in `metadata.namespace` (filled in when the document had none).
fn policy_document(value: &mut serde_yaml::Value, policy: &Policy) -> Result<String> {
    if let (Some(ns), Some(meta)) = (
        &policy.namespace,
        value
            .get_mut("metadata")
            .and_then(serde_yaml::Value::as_mapping_mut),
    ) {
        meta.insert("namespace".into(), ns.as_str().into());
    }
    serde_yaml::to_string(value).map_err(|e| RegistryError::Invalid(e.to_string()))
}
