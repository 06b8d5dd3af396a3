//! Keeps the node's material fresh: node attestation at start, the sync stream with the server,
//! workload SVIDs for the entries it streams, and rotation of every SVID at about half-life.
//!
//! When the server is unreachable, the manager keeps what it has (the Workload API goes on
//! serving it until expiry) and moves to the next server of its list (any replica serves),
//! backing off exponentially per round of failures ([`servers::Failover`]); nothing needs a
//! restart or a new token once the node has attested.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use meshauth_proto::node::node_client::NodeClient;
use meshauth_proto::node::{
    Bundle, CsrForEntry, RenewNodeSvidRequest, SignWorkloadSvidsRequest, SignWorkloadSvidsResponse,
    SyncRequest, SyncResponse,
};
use meshauth_spiffe::{TrustDomain, X509Bundle};
use meshauth_tls::{SharedBundle, SharedCertifiedKey};
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::cache::{Entry, Snapshot, UnsignableEntry, WorkloadSvid};
use crate::identity::{DataDir, NodeSvid, private_key, read_bundle};
use crate::metrics::{AttestationResult, Metrics, SvidKind};
use crate::node_attestation::{AttestationError, NodeAttestor};
use crate::server_client::{connect, key_and_csr};
use crate::sync_state::SyncState;

pub mod servers;

pub use servers::{Failover, ServerAddr, ServerList, ServerListError, SessionOutcome};

/// First retry delay after losing the server.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long an entry the server refused waits before it is asked for again (with the next
/// sync message or renewal), unless the entry changes first: an update is the usual fix, and a
/// changed entry is asked for at once.
const UNSIGNABLE_RETRY: Duration = Duration::from_secs(60);

/// What the manager needs to know.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// The node's name.
    pub node_name: String,
    /// The servers (replicas: any serves the node API), in the order of preference.
    pub servers: ServerList,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// This node's WireGuard public key, published on every sync stream (encryption on).
    pub tunnel_key: Option<meshauth_policy::TunnelKey>,
}

/// The running manager's shared parts.
#[derive(Debug, Clone)]
pub struct Manager {
    config: ManagerConfig,
    data: DataDir,
    bundle: SharedBundle,
    node_key: SharedCertifiedKey,
    node: Arc<Mutex<NodeSvid>>,
    state: watch::Sender<Arc<Snapshot>>,
    metrics: Metrics,
    attestor: NodeAttestor,
    /// Set when the server refused the node SVID (evicted, re-attested elsewhere): the next
    /// attempt attests again instead of presenting it.
    refused: Arc<std::sync::atomic::AtomicBool>,
    /// Index in `config.servers` of the server of the current (or last) session.
    current: Arc<std::sync::atomic::AtomicUsize>,
}

/// A renewal time at about half of the lifetime, ±5 % jitter so that nodes spread out.
pub(crate) fn refresh_time(issued_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued_at).unwrap_or_default();
    let fraction = rand::rng().random_range(0.45..0.55);
    issued_at + life.mul_f64(fraction)
}

pub(crate) fn chain_of(raw: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    raw.iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

pub(crate) fn bundle_of(msg: &Bundle, td: &TrustDomain) -> anyhow::Result<X509Bundle> {
    if msg.trust_domain != td.to_string() {
        bail!(
            "the server sent a bundle for trust domain {:?}, expected {td}",
            msg.trust_domain
        );
    }
    if msg.authorities.is_empty() {
        bail!("the server sent an empty bundle");
    }
    Ok(X509Bundle {
        trust_domain: td.clone(),
        authorities: chain_of(&msg.authorities),
        sequence: msg.sequence,
        refresh_hint: (msg.refresh_hint_seconds > 0)
            .then(|| Duration::from_secs(msg.refresh_hint_seconds as u64)),
    })
}

/// Turns the cluster part of a sync message into domain types. An identity or endpoint that
/// does not parse is logged and left out (it then matches nothing and gets no ipcache entry,
/// so its traffic is dropped). A policy that does not parse (version skew: the server
/// validated it) is never dropped silently: its last good version from `previous` stays, and
/// it is named in `policy_errors`, which makes the agent not ready.
fn cluster_of(
    identities: &[meshauth_proto::node::Identity],
    endpoints: &[meshauth_proto::node::Endpoint],
    nodes: &[meshauth_proto::node::ClusterNode],
    policies: &[meshauth_proto::node::PolicyDocument],
    previous: Option<&crate::cache::ClusterState>,
) -> crate::cache::ClusterState {
    use meshauth_policy::{IdentityId, Labels, NodeId};
    let mut out = crate::cache::ClusterState::default();
    for i in identities {
        match Labels::from_pairs(i.labels.iter().map(|(k, v)| (k.as_str(), v.clone()))) {
            Ok(l) => {
                out.identities.insert(IdentityId::new(i.id), l);
            }
            Err(e) => {
                tracing::warn!(identity = i.id, error = %e, "ignoring an identity with invalid labels")
            }
        }
    }
    for e in endpoints {
        let ipv4 = match e.ipv4.as_str() {
            "" => None,
            a => match a.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    tracing::warn!(pod = %e.name, "ignoring a pod with an invalid address");
                    continue;
                }
            },
        };
        // A pod's labels are its identity's (the server allocates identities by label set):
        // they are kept once, with the identity, not with each of thousands of pods.
        out.endpoints.push(crate::cache::ClusterEndpoint {
            node: e.node.clone(),
            node_id: NodeId::new(e.node_id),
            namespace: e.namespace.clone(),
            name: e.name.clone(),
            ipv4,
            interface: e.interface.clone(),
            identity: IdentityId::new(e.identity),
        });
    }
    for n in nodes {
        if !n.tunnel_key.is_empty() {
            match meshauth_policy::TunnelKey::from_slice(&n.tunnel_key) {
                Some(k) => {
                    out.tunnel_keys.insert(n.name.clone(), k);
                }
                None => {
                    tracing::warn!(node = %n.name, bytes = n.tunnel_key.len(), "ignoring a node's invalid tunnel key: no tunnel to it")
                }
            }
        }
        out.nodes.insert(
            n.name.clone(),
            (NodeId::new(n.node_id), n.address.parse().ok()),
        );
        if !n.pod_range.is_empty() {
            match meshauth_policy::Cidr::parse_prefix(&n.pod_range) {
                Ok(r) => {
                    out.pod_ranges.insert(n.name.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(node = %n.name, error = %e, "ignoring a node's invalid pod range")
                }
            }
        }
    }
    for p in policies {
        // `p.name` is the policy's key (`namespace/name`, or `name` for a clusterwide policy).
        match meshauth_policy::parse_policies(&p.yaml) {
            Ok(mut ps) => out.policies.append(&mut ps),
            Err(e) => {
                let last_good: Vec<meshauth_policy::Policy> = previous
                    .into_iter()
                    .flat_map(|c| &c.policies)
                    .filter(|old| old.key().to_string() == p.name)
                    .cloned()
                    .collect();
                tracing::error!(policy = %p.name, error = %e, kept_last_good = !last_good.is_empty(), "a policy does not parse: this agent is not ready");
                out.policies.extend(last_good);
                out.policy_errors.insert(p.name.clone(), e.to_string());
            }
        }
    }
    out
}

/// Loads the node identity from the data dir, or attests (x509pop, else the join token),
/// trying each server in turn. Also returns the index of the server to start with: the one
/// that attested the node, else the first.
pub async fn bootstrap(
    config: &ManagerConfig,
    data: &DataDir,
    trust_bundle: &std::path::Path,
    attestor: &NodeAttestor,
) -> anyhow::Result<(NodeSvid, X509Bundle, usize)> {
    let td = &config.trust_domain;
    let now = SystemTime::now();
    let bundle = match data.load_bundle(td)? {
        Some(b) => b,
        None => read_bundle(trust_bundle, td)?,
    };
    match data.load_node_svid(&bundle, now) {
        Ok(Some(svid)) => {
            tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, "re-using the node SVID from the data dir");
            return Ok((svid, bundle, 0));
        }
        Ok(None) => {}
        Err(e) if attestor.has_credential() => {
            tracing::warn!(error = %format!("{e:#}"), "saved node SVID unusable; attesting again");
        }
        Err(e) => return Err(e),
    }
    if !attestor.has_credential() {
        bail!(
            "this node has not attested yet: pass --join-token-file (from `meshauth token generate --node {}`) or an operator certificate (--x509pop-cert, --x509pop-key)",
            config.node_name
        );
    }
    let (svid, bundle, index) = attestor
        .attest_first_answering(&config.node_name, &config.servers, 0, td, &bundle, false)
        .await
        .map_err(anyhow::Error::new)?;
    data.save_node_svid(&svid)?;
    data.save_bundle(&bundle)?;
    let how = if attestor.can_reattest() {
        "the x509pop certificate"
    } else {
        "the join token"
    };
    tracing::info!(spiffe_id = %svid.spiffe_id, node.id = svid.node_id, server = %config.servers.get(index), "attested with {how}");
    Ok((svid, bundle, index))
}

impl Manager {
    /// Builds the manager around a bootstrapped identity.
    pub fn new(
        config: ManagerConfig,
        data: DataDir,
        node: NodeSvid,
        bundle: X509Bundle,
        metrics: Metrics,
        attestor: NodeAttestor,
    ) -> anyhow::Result<Manager> {
        let node_key = SharedCertifiedKey::new(node.chain.clone(), private_key(&node.key))?;
        let state = watch::Sender::new(Arc::new(Snapshot {
            bundle: Some(Arc::new(bundle.clone())),
            ..Snapshot::default()
        }));
        Ok(Manager {
            config,
            data,
            bundle: SharedBundle::new(bundle),
            node_key,
            node: Arc::new(Mutex::new(node)),
            state,
            metrics,
            attestor,
            refused: Arc::default(),
            current: Arc::default(),
        })
    }

    /// The same manager, starting its sessions at server `index` of the list (the one that
    /// attested the node, from [`bootstrap`]).
    pub fn with_current_server(self, index: usize) -> Manager {
        let index = index % self.config.servers.as_slice().len().max(1);
        self.current
            .store(index, std::sync::atomic::Ordering::Relaxed);
        self.metrics.set_server_index(index);
        self
    }

    /// Every server the manager may use, in the order of preference.
    pub fn servers(&self) -> &ServerList {
        &self.config.servers
    }

    /// The index in [`Manager::servers`] of the server of the current (or last) session.
    pub fn current_index(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server of the current (or last) session.
    pub fn current_server(&self) -> ServerAddr {
        self.config.servers.get(self.current_index()).clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> meshauth_spiffe::TrustDomain {
        self.config.trust_domain.clone()
    }

    /// The live trust bundle (follows CA rotation).
    pub fn shared_bundle(&self) -> SharedBundle {
        self.bundle.clone()
    }

    /// A new connection to the current server, authenticated by the node SVID.
    pub async fn connect(&self) -> anyhow::Result<NodeClient<Channel>> {
        connect(
            &self.current_server().to_string(),
            &self.config.trust_domain,
            self.bundle.clone(),
            Some(self.node_key.clone()),
        )
        .await
    }

    /// Snapshots of the cache, for the Workload API and the admin API.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.subscribe()
    }

    /// The node SVID with its key, as TLS presents it (swapped on renewal).
    pub fn node_key(&self) -> SharedCertifiedKey {
        self.node_key.clone()
    }

    /// The current node SVID (without its key).
    pub fn node_svid(&self) -> NodeSvid {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Soonest expiry of anything held (node SVID included).
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        let node = self.node_svid().not_after;
        Some(
            self.state
                .borrow()
                .soonest_expiry()
                .map_or(node, |w| w.min(node)),
        )
    }

    fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.state.send_modify(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            *s = Arc::new(next);
        });
        let state = self.state.borrow();
        self.metrics.set_svids_held(state.svids.len());
        self.metrics.set_unsignable_entries(state.unsignable.len());
    }

    /// Runs until `shutdown` completes: sync sessions, each ended one followed by the next
    /// server of the list after the [`Failover`] schedule's delay. Everything held (SVIDs,
    /// bundle, cluster state) is kept from one session to the next, whichever server.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failover = Failover::new(
            self.config.servers.as_slice().len(),
            BACKOFF_MIN,
            BACKOFF_MAX,
        )
        .starting_at(self.current_index());
        loop {
            let index = failover.current();
            self.current
                .store(index, std::sync::atomic::Ordering::Relaxed);
            self.metrics.set_server_index(index);
            let server = self.config.servers.get(index).clone();
            let served = std::sync::atomic::AtomicBool::new(false);
            let outcome = tokio::select! {
                r = self.session(&server, &served) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            self.metrics.set_connected(false);
            self.publish(|s| s.connected = false);
            // A session that got service (a sync message) resets the backoff; one that did not
            // (refused, dropped at once) backs off like a failure, so a server that accepts and
            // drops us is never redialed in a tight loop.
            let served = served.load(std::sync::atomic::Ordering::Relaxed);
            let step = match (&outcome, served) {
                (Ok(SessionEnd::Renewed), _) => failover.next(SessionOutcome::Renewed { served }),
                (_, true) => failover.next(SessionOutcome::Served),
                (_, false) => failover.next(SessionOutcome::Failed),
            };
            let next = self.config.servers.get(step.index);
            // ±20 % jitter, so that nodes cut off together do not return together.
            let delay = step.delay.mul_f64(rand::rng().random_range(0.8..1.2));
            let retry_in_ms = delay.as_millis() as u64;
            match outcome {
                // The node SVID was renewed: the new one is presented on a new connection now.
                Ok(SessionEnd::Renewed) => {
                    tracing::debug!(server = %server, "reconnecting with the renewed node SVID");
                    continue;
                }
                Ok(SessionEnd::ServerEnded) => {
                    tracing::info!(
                        server = %server,
                        next_server = %next,
                        retry_in_ms,
                        "the server ended the sync stream; reconnecting"
                    );
                }
                Err(e) => {
                    tracing::warn!(server = %server, next_server = %next, retry_in_ms, error = %format!("{e:#}"), "lost the server; serving cached SVIDs");
                }
            }
            if step.failed_over {
                self.metrics.server_failover();
                tracing::info!(
                    from = %server,
                    server = %next,
                    failures = failover.failures(),
                    retry_in_ms,
                    "failing over to the next server"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Attests again at `server` if the node SVID expired (a server outage longer than its
    /// lifetime) or the server refused it. The new SVID is saved before it replaces the old one.
    /// When `server` cannot attest the node, the session fails and the next one tries the next
    /// server: re-attestation goes through the list as sessions do.
    async fn attest_if_needed(&self, server: &ServerAddr) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        let expired = self.node_svid().not_after <= SystemTime::now();
        let refused = self.refused.load(Ordering::Relaxed);
        if !expired && !refused {
            return Ok(());
        }
        let why = if expired {
            "the node SVID expired"
        } else {
            "the server refused the node SVID"
        };
        let bundle = self.bundle.get();
        let (svid, bundle) = match self
            .attestor
            .attest(
                &self.config.node_name,
                &server.to_string(),
                &self.config.trust_domain,
                &bundle,
                true,
            )
            .await
        {
            Ok(issued) => issued,
            Err(e) => {
                self.metrics.attested_again(match e {
                    AttestationError::Refused(_) => AttestationResult::Refused,
                    _ => AttestationResult::Failed,
                });
                return Err(anyhow::Error::new(e).context(format!("{why}; attesting again failed")));
            }
        };
        self.data.save_node_svid(&svid)?;
        self.data.save_bundle(&bundle)?;
        self.node_key
            .set(svid.chain.clone(), private_key(&svid.key))?;
        self.bundle.set(bundle);
        tracing::info!(reason = why, server = %server, serial = %svid.serial, x509pop = self.attestor.can_reattest(), "attested again");
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = svid;
        self.refused.store(false, Ordering::Relaxed);
        self.metrics.attested_again(AttestationResult::Ok);
        Ok(())
    }

    /// Marks the node SVID refused when the server says so (evicted, re-attested elsewhere,
    /// unknown): the next attempt attests again.
    fn note_refusal(&self, s: &tonic::Status) {
        if s.code() == tonic::Code::Unauthenticated {
            self.refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// One connection to `server`: sync, sign, rotate. `served` turns true once a sync message
    /// arrived.
    async fn session(
        &self,
        server: &ServerAddr,
        served: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<SessionEnd> {
        self.attest_if_needed(server).await?;
        let td = &self.config.trust_domain;
        let mut client = connect(
            &server.to_string(),
            td,
            self.bundle.clone(),
            Some(self.node_key.clone()),
        )
        .await?;
        // Rotations that fell due while disconnected happen first.
        if self.rotate_node_if_due(&mut client).await? {
            return Ok(SessionEnd::Renewed);
        }
        // The whole state, brought up to date by each delta of this stream.
        let mut sync = SyncState::default();
        let mut stream = client
            .sync(SyncRequest {
                tunnel_key: self
                    .config
                    .tunnel_key
                    .map(|k| k.as_bytes().to_vec())
                    .unwrap_or_default(),
                ..SyncRequest::default()
            })
            .await
            .map_err(|s| {
                self.note_refusal(&s);
                anyhow::anyhow!("sync refused: {}", s.message())
            })?
            .into_inner();
        self.metrics.set_connected(true);
        self.publish(|s| s.connected = true);
        tracing::info!(server = %server, "sync stream up");
        loop {
            let wake = self.next_refresh();
            let sleep = wake.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                msg = stream.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(SessionEnd::ServerEnded),
                        Err(s) => {
                            self.note_refusal(&s);
                            return Err(anyhow::anyhow!("sync stream: {}", s.message()));
                        }
                    };
                    // None: a page of a whole state that has not arrived in full.
                    let Some(msg) = sync.absorb(msg)?.cloned() else {
                        continue;
                    };
                    self.apply(&mut client, msg).await?;
                    served.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                () = tokio::time::sleep(sleep) => {
                    if self.rotate_node_if_due(&mut client).await? {
                        return Ok(SessionEnd::Renewed);
                    }
                    self.rotate_workloads_if_due(&mut client).await?;
                }
            }
        }
    }

    fn next_refresh(&self) -> SystemTime {
        let node = {
            let n = self.node.lock().unwrap_or_else(|p| p.into_inner());
            refresh_deadline(&n)
        };
        let workloads = self
            .state
            .borrow()
            .svids
            .values()
            .map(|s| s.refresh_at)
            .min();
        workloads.map_or(node, |w| w.min(node))
    }

    async fn apply(
        &self,
        client: &mut NodeClient<Channel>,
        msg: SyncResponse,
    ) -> anyhow::Result<()> {
        let td = &self.config.trust_domain;
        let bundle = bundle_of(
            msg.bundle.as_ref().context("sync message without bundle")?,
            td,
        )?;
        if bundle.sequence != self.bundle.get().sequence
            || bundle.authorities != self.bundle.get().authorities
        {
            tracing::info!(
                sequence = bundle.sequence,
                authorities = bundle.authorities.len(),
                "trust bundle updated"
            );
            self.data.save_bundle(&bundle)?;
            self.bundle.set(bundle.clone());
        }
        let mut entries = BTreeMap::new();
        for e in msg.entries {
            let spiffe_id = match e.spiffe_id.parse() {
                Ok(id) => id,
                Err(err) => {
                    tracing::warn!(entry.id = %e.id, error = %err, "ignoring an entry with an invalid SPIFFE ID from the server");
                    continue;
                }
            };
            let selectors: BTreeSet<String> = e
                .selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect();
            entries.insert(
                e.id.clone(),
                Entry {
                    id: e.id,
                    spiffe_id,
                    selectors,
                    revision: e.revision,
                },
            );
        }
        let current = self.state.borrow().clone();
        let cluster = cluster_of(
            &msg.identities,
            &msg.endpoints,
            &msg.nodes,
            &msg.policies,
            current.cluster.as_deref(),
        );
        let now = SystemTime::now();
        let needed: Vec<Entry> = entries
            .values()
            .filter(|e| current.svids.get(&e.id).is_none_or(|s| s.entry != **e))
            .filter(|e| {
                current
                    .unsignable
                    .get(&e.id)
                    .is_none_or(|u| u.entry != **e || retry_due(u, now))
            })
            .cloned()
            .collect();
        let signed = self.sign(client, &needed, &bundle).await?;
        self.publish(|s| {
            s.bundle = Some(Arc::new(bundle));
            // An SVID or refusal of an entry that is gone or changed is no longer that entry's.
            s.svids
                .retain(|id, svid| entries.get(id) == Some(&svid.entry));
            s.unsignable
                .retain(|id, u| entries.get(id) == Some(&u.entry));
            for svid in signed.svids {
                s.unsignable.remove(&svid.entry.id);
                s.svids.insert(svid.entry.id.clone(), Arc::new(svid));
            }
            for refused in signed.unsignable {
                s.unsignable.insert(refused.entry.id.clone(), refused);
            }
            s.entries = entries;
            if s.cluster.as_deref() != Some(&cluster) {
                s.cluster = Some(Arc::new(cluster));
            }
            s.synced = true;
        });
        Ok(())
    }

    /// Obtains SVIDs for `entries` with keys generated here. Each entry is answered on its own
    /// ([`accept_signed`]): the SVIDs that were signed and validate come back with the entries
    /// that were not, and why. Only a failed call (server unreachable, node refused) is an error.
    async fn sign(
        &self,
        client: &mut NodeClient<Channel>,
        entries: &[Entry],
        bundle: &X509Bundle,
    ) -> anyhow::Result<Signed> {
        if entries.is_empty() {
            return Ok(Signed::default());
        }
        let mut keys = BTreeMap::new();
        let mut csrs = Vec::with_capacity(entries.len());
        for e in entries {
            let (key, csr) = key_and_csr()?;
            keys.insert(e.id.clone(), key);
            csrs.push(CsrForEntry {
                entry_id: e.id.clone(),
                csr,
            });
        }
        let resp = client
            .sign_workload_svids(SignWorkloadSvidsRequest { csrs })
            .await
            .map_err(|s| anyhow::anyhow!("workload SVID signing refused: {}", s.message()))?
            .into_inner();
        Ok(accept_signed(
            entries,
            keys,
            resp,
            bundle,
            SystemTime::now(),
        ))
    }

    async fn rotate_workloads_if_due(
        &self,
        client: &mut NodeClient<Channel>,
    ) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let due: Vec<Entry> = self
            .state
            .borrow()
            .svids
            .values()
            .filter(|s| s.refresh_at <= now)
            .map(|s| s.entry.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let bundle = self.bundle.get();
        match self.sign(client, &due, &bundle).await {
            Ok(signed) => {
                for _ in &signed.svids {
                    self.metrics.rotated(SvidKind::Workload);
                }
                for _ in &signed.unsignable {
                    self.metrics.rotation_failed(SvidKind::Workload);
                }
                let retry_at = now.checked_add(UNSIGNABLE_RETRY);
                self.publish(|s| {
                    for svid in signed.svids {
                        // The entry may have gone or changed meanwhile.
                        if s.entries.get(&svid.entry.id) == Some(&svid.entry) {
                            s.unsignable.remove(&svid.entry.id);
                            s.svids.insert(svid.entry.id.clone(), Arc::new(svid));
                        }
                    }
                    for refused in signed.unsignable {
                        let id = refused.entry.id.clone();
                        if s.entries.get(&id) != Some(&refused.entry) {
                            continue;
                        }
                        // The current SVID is served until it expires; its renewal is asked
                        // for again later, not at once (that would loop).
                        if let Some(held) = s.svids.get(&id) {
                            let later = retry_at.unwrap_or(held.not_after);
                            s.svids
                                .insert(id.clone(), Arc::new(renew_later(held, later)));
                        }
                        s.unsignable.insert(id, refused);
                    }
                });
                Ok(())
            }
            Err(e) => {
                self.metrics.rotation_failed(SvidKind::Workload);
                Err(e.context("workload SVID rotation failed; keeping the current SVIDs"))
            }
        }
    }

    /// Renews the node SVID when due. Returns whether it did (the caller then reconnects so
    /// that the server sees the new SVID).
    async fn rotate_node_if_due(&self, client: &mut NodeClient<Channel>) -> anyhow::Result<bool> {
        let deadline = refresh_deadline(&self.node_svid());
        if SystemTime::now() < deadline {
            return Ok(false);
        }
        match self.renew_node(client).await {
            Ok(()) => {
                self.metrics.rotated(SvidKind::Node);
                Ok(true)
            }
            Err(e) => {
                self.metrics.rotation_failed(SvidKind::Node);
                Err(e.context("node SVID renewal failed; keeping the current one"))
            }
        }
    }

    async fn renew_node(&self, client: &mut NodeClient<Channel>) -> anyhow::Result<()> {
        let (key, csr) = key_and_csr()?;
        let resp = client
            .renew_node_svid(RenewNodeSvidRequest { csr })
            .await
            .map_err(|s| {
                self.note_refusal(&s);
                anyhow::anyhow!("renewal refused: {}", s.message())
            })?
            .into_inner();
        let (svid, _) = node_svid_of(resp, key, &self.config.trust_domain, &self.bundle.get())?;
        self.data.save_node_svid(&svid)?;
        self.node_key
            .set(svid.chain.clone(), private_key(&svid.key))?;
        tracing::info!(serial = %svid.serial, "node SVID renewed");
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = svid;
        Ok(())
    }
}

/// A node SVID the server issued (attestation or renewal), checked: the bundle it came with is
/// of our trust domain (`current` if it sent none) and the SVID validates under it. Returns the
/// SVID with `key` and that bundle.
pub(crate) fn node_svid_of(
    resp: meshauth_proto::node::NodeSvidResponse,
    key: PrivatePkcs8KeyDer<'static>,
    td: &TrustDomain,
    current: &X509Bundle,
) -> anyhow::Result<(NodeSvid, X509Bundle)> {
    let now = SystemTime::now();
    let bundle = match &resp.bundle {
        Some(b) => bundle_of(b, td)?,
        None => current.clone(),
    };
    let chain = chain_of(&resp.svid_chain);
    let verified = meshauth_spiffe::validate_x509_svid(&chain, &bundle, now)
        .context("the server issued a node SVID that does not validate")?;
    Ok((
        NodeSvid {
            chain,
            key,
            spiffe_id: verified.spiffe_id,
            serial: verified.serial,
            issued_at: now,
            not_after: verified.not_after,
            node_id: resp.node_id,
        },
        bundle,
    ))
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The node SVID was renewed: reconnect at once, presenting the new one.
    Renewed,
    /// The server closed the sync stream.
    ServerEnded,
}

/// What one signing call gave: SVIDs for some entries, refusals for the others.
#[derive(Debug, Default)]
struct Signed {
    svids: Vec<WorkloadSvid>,
    unsignable: Vec<UnsignableEntry>,
}

/// Sorts the server's answer to a signing call for `entries` (whose keys are in `keys`) into
/// SVIDs and refusals. An SVID that does not validate against `bundle` or names another ID is
/// a refusal too (`InvalidSvid`), an entry the server did not answer one (`NotAnswered`), and
/// an SVID for an entry not asked for is ignored: one bad answer never costs the others.
fn accept_signed(
    entries: &[Entry],
    mut keys: BTreeMap<String, PrivatePkcs8KeyDer<'static>>,
    resp: SignWorkloadSvidsResponse,
    bundle: &X509Bundle,
    now: SystemTime,
) -> Signed {
    let mut out = Signed::default();
    let refusal = |entry: &Entry, reason: &str, message: String| UnsignableEntry {
        entry: entry.clone(),
        reason: reason.to_owned(),
        message,
        refused_at: now,
    };
    for signed in resp.svids {
        let (Some(entry), Some(key)) = (
            entries.iter().find(|e| e.id == signed.entry_id),
            keys.remove(&signed.entry_id),
        ) else {
            tracing::warn!(entry.id = %signed.entry_id, "ignoring an SVID the server signed for an entry not asked for");
            continue;
        };
        let chain = chain_of(&signed.svid_chain);
        match meshauth_spiffe::validate_x509_svid(&chain, bundle, now) {
            Ok(verified) if verified.spiffe_id == entry.spiffe_id => {
                tracing::info!(spiffe_id = %entry.spiffe_id, serial = %verified.serial, "workload SVID obtained");
                out.svids.push(WorkloadSvid {
                    entry: entry.clone(),
                    chain,
                    key,
                    serial: verified.serial,
                    issued_at: now,
                    not_after: verified.not_after,
                    refresh_at: refresh_time(now, verified.not_after),
                });
            }
            Ok(verified) => out.unsignable.push(refusal(
                entry,
                "InvalidSvid",
                format!(
                    "the server's SVID names {}, not {}",
                    verified.spiffe_id, entry.spiffe_id
                ),
            )),
            Err(e) => out.unsignable.push(refusal(
                entry,
                "InvalidSvid",
                format!("the server's SVID does not validate: {e}"),
            )),
        }
    }
    for refused in resp.refused {
        if let Some(entry) = entries.iter().find(|e| e.id == refused.entry_id)
            && keys.remove(&refused.entry_id).is_some()
        {
            out.unsignable
                .push(refusal(entry, &refused.reason, refused.message));
        }
    }
    for entry in entries {
        if keys.remove(&entry.id).is_some() {
            out.unsignable.push(refusal(
                entry,
                "NotAnswered",
                "the server neither signed nor refused it".into(),
            ));
        }
    }
    for u in &out.unsignable {
        tracing::warn!(entry.id = %u.entry.id, spiffe_id = %u.entry.spiffe_id, reason = %u.reason, error = %u.message, "no SVID for this entry; the node's other SVIDs are unaffected");
    }
    out
}

/// Whether an entry refused at `u.refused_at` is due to be asked for again (also when the
/// clock went back).
fn retry_due(u: &UnsignableEntry, now: SystemTime) -> bool {
    now.duration_since(u.refused_at)
        .map_or(true, |waited| waited >= UNSIGNABLE_RETRY)
}

/// `held`, to be renewed at `at` instead.
fn renew_later(held: &WorkloadSvid, at: SystemTime) -> WorkloadSvid {
    WorkloadSvid {
        entry: held.entry.clone(),
        chain: held.chain.clone(),
        key: held.key.clone_key(),
        serial: held.serial.clone(),
        issued_at: held.issued_at,
        not_after: held.not_after,
        refresh_at: at,
    }
}

/// When the node SVID should be renewed: half-life from when it was obtained.
fn refresh_deadline(node: &NodeSvid) -> SystemTime {
    let life = node
        .not_after
        .duration_since(node.issued_at)
        .unwrap_or_default();
    node.issued_at + life / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA of `td.test` and SVIDs from it, as the server would sign them.
    struct TestCa {
        cert: CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            params.subject_alt_names =
                vec![rcgen::SanType::URI("spiffe://td.test".try_into().unwrap())];
            let cert = params.self_signed(&key).unwrap().der().clone();
            TestCa {
                cert,
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        fn bundle(&self) -> X509Bundle {
            X509Bundle {
                trust_domain: "td.test".parse().unwrap(),
                authorities: vec![self.cert.clone()],
                sequence: 1,
                refresh_hint: None,
            }
        }

        fn svid(&self, entry_id: &str, spiffe_id: &str) -> meshauth_proto::node::SignedSvid {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().unwrap())];
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            meshauth_proto::node::SignedSvid {
                entry_id: entry_id.into(),
                spiffe_id: spiffe_id.into(),
                svid_chain: vec![cert.der().to_vec()],
                expires_at_unix: 0,
            }
        }
    }

    fn entry(id: &str, spiffe_id: &str) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: spiffe_id.parse().unwrap(),
            selectors: ["unix:uid:1000".to_string()].into(),
            revision: 1,
        }
    }

    #[test]
    fn each_entry_is_signed_or_refused_on_its_own() {
        let ca = TestCa::new();
        let entries = vec![
            entry("good", "spiffe://td.test/web"),
            entry("refused", "spiffe://td.test/endless"),
            entry("silent", "spiffe://td.test/quiet"),
            entry("renamed", "spiffe://td.test/db"),
            entry("garbled", "spiffe://td.test/cache"),
        ];
        let keys = entries
            .iter()
            .map(|e| (e.id.clone(), key_and_csr().unwrap().0))
            .collect();
        let mut garbled = ca.svid("garbled", "spiffe://td.test/cache");
        garbled.svid_chain = vec![vec![0x30, 0x03, 0x01, 0x01, 0xff]];
        let resp = SignWorkloadSvidsResponse {
            svids: vec![
                ca.svid("good", "spiffe://td.test/web"),
                // Names another ID than the entry's.
                ca.svid("renamed", "spiffe://td.test/admin"),
                garbled,
                // Not asked for: ignored.
                ca.svid("stranger", "spiffe://td.test/stranger"),
            ],
            refused: vec![
                meshauth_proto::node::UnsignedEntry {
                    entry_id: "refused".into(),
                    reason: "InvalidRequest".into(),
                    message: "entry refused cannot be signed: its TTL".into(),
                },
                // Not asked for: ignored.
                meshauth_proto::node::UnsignedEntry {
                    entry_id: "stranger".into(),
                    reason: "EntryUnknown".into(),
                    message: "no entry".into(),
                },
            ],
        };
        let now = SystemTime::now();
        let out = accept_signed(&entries, keys, resp, &ca.bundle(), now);
        let held: Vec<&str> = out.svids.iter().map(|s| s.entry.id.as_str()).collect();
        assert_eq!(held, ["good"], "the good SVID is kept");
        assert_eq!(out.svids[0].entry, entries[0]);
        let refused: BTreeMap<&str, (&str, &str)> = out
            .unsignable
            .iter()
            .map(|u| (u.entry.id.as_str(), (u.reason.as_str(), u.message.as_str())))
            .collect();
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert_eq!(
            refused["refused"],
            ("InvalidRequest", "entry refused cannot be signed: its TTL")
        );
        assert_eq!(refused["silent"].0, "NotAnswered");
        assert_eq!(refused["renamed"].0, "InvalidSvid");
        assert!(
            refused["renamed"]
                .1
                .contains("names spiffe://td.test/admin")
        );
        assert_eq!(refused["garbled"].0, "InvalidSvid");
        assert!(out.unsignable.iter().all(|u| u.refused_at == now));
    }

    #[test]
    fn refused_entries_are_asked_for_again_after_a_while() {
        let now = SystemTime::now();
        let refused = |ago: Duration| UnsignableEntry {
            entry: entry("e", "spiffe://td.test/web"),
            reason: "InvalidRequest".into(),
            message: "no".into(),
            refused_at: now - ago,
        };
        assert!(!retry_due(&refused(Duration::from_secs(5)), now));
        assert!(retry_due(&refused(UNSIGNABLE_RETRY), now));
        // A clock that went back does not postpone the retry.
        let ahead = UnsignableEntry {
            refused_at: now + Duration::from_secs(3600),
            ..refused(Duration::ZERO)
        };
        assert!(retry_due(&ahead, now));
    }

    #[test]
    fn a_policy_that_does_not_parse_keeps_its_last_good_version_by_key() {
        let doc = |ns: &str, extra: &str| meshauth_proto::node::PolicyDocument {
            name: format!("{ns}/allow"),
            yaml: format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: allow, namespace: {ns}}}\nspec:\n  endpointSelector: {{}}\n  ingress: [{{fromEndpoints: [{{}}]{extra}}}]\n"
            ),
            namespace: ns.into(),
        };
        let first = cluster_of(&[], &[], &[], &[doc("a", ""), doc("b", "")], None);
        assert_eq!(first.policies.len(), 2);
        assert!(first.policy_errors.is_empty());
        // b/allow now has a field this agent does not know (version skew): a/allow is
        // unaffected, b/allow keeps its last good version and is named by its key.
        let second = cluster_of(
            &[],
            &[],
            &[],
            &[doc("a", ""), doc("b", ", toFQDNs: []")],
            Some(&first),
        );
        let keys: Vec<String> = second
            .policies
            .iter()
            .map(|p| p.key().to_string())
            .collect();
        assert_eq!(keys, ["a/allow", "b/allow"]);
        assert_eq!(second.policy_errors.keys().collect::<Vec<_>>(), ["b/allow"]);
    }

    #[test]
    fn refresh_is_near_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(3600);
        for _ in 0..100 {
            let r = refresh_time(t0, end).duration_since(t0).unwrap().as_secs();
            assert!((1620..=1980).contains(&r), "{r}");
        }
    }
}
