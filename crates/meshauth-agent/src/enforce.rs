//! Enforcement: the agent's datapath, policy compilation, identity SVIDs, the auth manager and
//! the handshake server, wired together.
//!
//! - Local endpoints come from an [`EndpointSource`] (the lab's state file; a CNI hook would be
//!   another source). Each is registered with the server, which allocates its identity, and the
//!   datapath is attached to its veth.
//! - Every sync snapshot (identities, endpoints, nodes, policies) is compiled into the local
//!   endpoints' policy entries and the ipcache; entries of pairs that lost their justification
//!   are revoked at once.
//! - SVIDs of local identities (`spiffe://<td>/identity/<n>`) are obtained with keys made here.
//! - Auth-required events from the datapath go to the auth manager, whose handshakes dial the
//!   peer node's agent; the handshake server answers peers. Both write auth entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use meshauth_auth::{
    AuthManager, AuthTable, Authenticator, Handshaker, LocalSvid, LocalSvids, ManagerConfig,
    Placement, Reason, Timeouts,
};
use meshauth_datapath::{Datapath, EndpointId, EndpointInfo};
use meshauth_policy::{AuthKey, Compiler, IdentityId, Labels, NodeId};
use meshauth_proto::node::{
    DeregisterEndpointRequest, IdentityCsr, RegisterEndpointRequest, SignIdentitySvidsRequest,
};
use meshauth_tls::SharedCertifiedKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use crate::cache::{ClusterState, Snapshot};
use crate::manager::Manager;
use crate::metrics::{HandshakeResult, Role};

/// A workload endpoint on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// Its address.
    pub ipv4: Ipv4Addr,
    /// The node side of its veth.
    pub host_veth: String,
    /// That veth's index.
    pub host_ifindex: u32,
}

/// Where local endpoints come from.
pub trait EndpointSource: Send + 'static {
    /// The endpoints on this node now.
    fn endpoints(&self) -> anyhow::Result<Vec<LocalEndpoint>>;
}

/// Endpoints of one node of a `meshauth lab`.
#[derive(Debug)]
pub struct LabEndpoints {
    lab: meshauth_lab::Lab,
    node: String,
}

impl LabEndpoints {
    /// The pods of lab `lab` on node `node` (e.g. `n1`).
    pub fn new(lab: &str, node: &str) -> anyhow::Result<Self> {
        Ok(LabEndpoints {
            lab: meshauth_lab::Lab::new(lab)?,
            node: node.to_owned(),
        })
    }
}

impl EndpointSource for LabEndpoints {
    fn endpoints(&self) -> anyhow::Result<Vec<LocalEndpoint>> {
        let Some(state) = self.lab.state()? else {
            return Ok(vec![]);
        };
        state
            .pods
            .into_iter()
            .filter(|p| p.node == self.node)
            .map(|p| {
                Ok(LocalEndpoint {
                    labels: Labels::from_pairs(
                        p.labels.iter().map(|(k, v)| (k.as_str(), v.clone())),
                    )?,
                    name: p.name,
                    ipv4: p.ip,
                    host_veth: p.host_veth,
                    host_ifindex: p.host_ifindex,
                })
            })
            .collect()
    }
}

/// The auth entries this node holds, published by enforcement for the admin API.
#[derive(Debug, Clone, Default)]
pub struct AuthEntries(Arc<RwLock<Vec<(AuthKey, SystemTime)>>>);

impl AuthEntries {
    /// The entries, sorted.
    pub fn get(&self) -> Vec<(AuthKey, SystemTime)> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, mut entries: Vec<(AuthKey, SystemTime)>) {
        entries.sort();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = entries;
    }
}

/// Settings of enforcement.
#[derive(Debug, Clone)]
pub struct EnforceConfig {
    /// This node's name, as the server knows it.
    pub node_name: String,
    /// Where the datapath pins its maps.
    pub pin_dir: std::path::PathBuf,
    /// The address peers reach this node's handshake port on (and the source of our dials).
    pub node_address: IpAddr,
    /// The handshake port (4250).
    pub handshake_port: u16,
    /// Auth manager sizes.
    pub manager: ManagerConfig,
    /// Where the current auth entries are published.
    pub published: AuthEntries,
    /// Where flows and auth events are recorded.
    pub flows: crate::flows::FlowLog,
    /// The agent's metrics.
    pub metrics: crate::metrics::Metrics,
}

/// What the placement checks read: the cluster and the local endpoints, kept current.
#[derive(Default)]
struct View {
    cluster: ClusterState,
    local: BTreeMap<String, (LocalEndpoint, IdentityId)>,
}

#[derive(Clone, Default)]
struct SharedView(Arc<RwLock<View>>);

impl Placement for SharedView {
    fn hosted_here(&self, identity: IdentityId) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .local
            .values()
            .any(|(_, id)| *id == identity)
    }

    fn node_at(&self, addr: IpAddr) -> Option<NodeId> {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        v.cluster
            .nodes
            .values()
            .find(|(_, a)| *a == Some(addr))
            .map(|(id, _)| *id)
    }

    fn hosted_on(&self, identity: IdentityId, node: NodeId) -> bool {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        v.cluster
            .endpoints
            .iter()
            .any(|e| e.identity == identity && e.node_id == node)
    }
}

impl SharedView {
    /// The pod and labels behind an address, and its identity's labels.
    fn describe(
        &self,
        ip: Ipv4Addr,
        identity: IdentityId,
    ) -> (String, std::collections::HashMap<String, String>) {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        let pod = v
            .cluster
            .endpoints
            .iter()
            .find(|e| e.ipv4 == ip)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let labels = v
            .cluster
            .identities
            .get(&identity)
            .map(|l| {
                l.iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        (pod, labels)
    }

    fn identity_labels(&self, identity: IdentityId) -> std::collections::HashMap<String, String> {
        self.describe(Ipv4Addr::UNSPECIFIED, identity).1
    }
}

fn protocol_name(n: u8) -> String {
    match meshauth_policy::Protocol::from_number(n) {
        Some(p) => format!("{p:?}").to_uppercase(),
        None => n.to_string(),
    }
}

/// A flow record for a datapath event.
fn flow_record(
    node: &str,
    view: &SharedView,
    e: &meshauth_datapath::FlowEvent,
) -> meshauth_proto::agent::Flow {
    let (src_pod, src_labels) = view.describe(e.src, e.src_identity);
    let (dst_pod, dst_labels) = view.describe(e.dst, e.dst_identity);
    meshauth_proto::agent::Flow {
        time_unix_ms: crate::flows::now_ms(),
        node: node.to_owned(),
        kind: "flow".into(),
        src_ip: e.src.to_string(),
        src_pod,
        src_identity: e.src_identity.get(),
        src_labels,
        dst_ip: e.dst.to_string(),
        dst_pod,
        dst_identity: e.dst_identity.get(),
        dst_labels,
        dport: u32::from(e.dport),
        protocol: protocol_name(e.protocol),
        verdict: if e.drop.is_some() {
            "DROPPED"
        } else {
            "FORWARDED"
        }
        .into(),
        reason: e.drop.map(|r| r.to_string()).unwrap_or_default(),
        tcp_flags: u32::from(e.tcp_flags),
        latency_us: 0,
    }
}

/// A flow record for a handshake event of `key` (local → remote).
fn auth_record(
    node: &str,
    view: &SharedView,
    key: &AuthKey,
    verdict: &str,
    reason: String,
    latency_us: u64,
) -> meshauth_proto::agent::Flow {
    meshauth_proto::agent::Flow {
        time_unix_ms: crate::flows::now_ms(),
        node: node.to_owned(),
        kind: "auth".into(),
        src_identity: key.local.get(),
        src_labels: view.identity_labels(key.local),
        dst_identity: key.remote.get(),
        dst_labels: view.identity_labels(key.remote),
        verdict: verdict.into(),
        reason,
        latency_us,
        ..Default::default()
    }
}

struct DatapathTable(Arc<Mutex<Datapath>>);

impl AuthTable for DatapathTable {
    fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert_auth(key, expires)
            .map_err(|e| e.to_string())
    }

    fn remove(&mut self, key: AuthKey) -> Result<(), String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_auth(key)
            .map_err(|e| e.to_string())
    }
}

struct Dialer {
    handshaker: Handshaker,
    view: SharedView,
    port: u16,
    source: IpAddr,
    flows: crate::flows::FlowLog,
    node: String,
    metrics: crate::metrics::Metrics,
}

impl Authenticator for Dialer {
    async fn authenticate(&self, key: AuthKey) -> Result<SystemTime, Reason> {
        let addr = {
            let v = self.view.0.read().unwrap_or_else(|p| p.into_inner());
            v.cluster
                .nodes
                .values()
                .find(|(id, _)| *id == key.remote_node)
                .and_then(|(_, a)| *a)
        };
        let Some(addr) = addr else {
            return Err(Reason::Unreachable);
        };
        self.flows.push(auth_record(
            &self.node,
            &self.view,
            &key,
            "STARTED",
            String::new(),
            0,
        ));
        let t = std::time::Instant::now();
        let result = self
            .handshaker
            .initiate(
                key.local,
                key.remote,
                key.remote_node,
                SocketAddr::new(addr, self.port),
                Some(self.source),
            )
            .await;
        let us = t.elapsed().as_micros() as u64;
        match result {
            Ok(a) => {
                self.flows.push(auth_record(
                    &self.node,
                    &self.view,
                    &key,
                    "SUCCEEDED",
                    String::new(),
                    us,
                ));
                self.metrics.handshake(
                    Role::Initiator,
                    HandshakeResult::Success,
                    Some(us as f64 / 1e6),
                );
                Ok(a.expires)
            }
            Err(e) => {
                self.flows.push(auth_record(
                    &self.node,
                    &self.view,
                    &key,
                    "FAILED",
                    format!("{:?}", e.reason),
                    us,
                ));
                self.metrics
                    .handshake(Role::Initiator, e.reason.into(), Some(us as f64 / 1e6));
                Err(e.reason)
            }
        }
    }
}

/// Runs enforcement until `shutdown`.
pub async fn run(
    config: EnforceConfig,
    manager: Manager,
    source: Box<dyn EndpointSource>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut dp = Datapath::load(&config.pin_dir).context("loading the datapath")?;
    let mut events = dp.take_events()?;
    let dp = Arc::new(Mutex::new(dp));
    let view = SharedView::default();
    let svids = LocalSvids::default();
    let td = manager.trust_domain();
    let handshaker = Handshaker::new(
        td.clone(),
        manager.shared_bundle(),
        svids.clone(),
        Arc::new(view.clone()),
        Timeouts::default(),
    );
    let auth = AuthManager::start(
        config.manager,
        Dialer {
            handshaker: handshaker.clone(),
            view: view.clone(),
            port: config.handshake_port,
            source: config.node_address,
            flows: config.flows.clone(),
            node: config.node_name.clone(),
            metrics: config.metrics.clone(),
        },
        DatapathTable(Arc::clone(&dp)),
    );

    // Entries a previous run of this agent wrote are still in the pinned map: track them.
    let inherited = dp
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .auth_entries()?;
    let now = SystemTime::now();
    for (key, expires) in inherited.into_iter().filter(|(_, e)| *e > now) {
        auth.adopt(key, expires);
    }

    // Handshake server: entries written for the pairs peers authenticate with us.
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::new(config.node_address, config.handshake_port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{}",
                    config.node_address, config.handshake_port
                )
            })?;
    let (acc_tx, mut acc_rx) = mpsc::channel(256);
    let (fail_tx, mut fail_rx) = mpsc::channel(256);
    tokio::spawn(
        handshaker
            .clone()
            .serve(listener, acc_tx, fail_tx, shutdown.clone()),
    );
    {
        let auth = auth.clone();
        let (flows, view, node) = (config.flows.clone(), view.clone(), config.node_name.clone());
        let metrics = config.metrics.clone();
        tokio::spawn(async move {
            while let Some(a) = acc_rx.recv().await {
                let key = AuthKey {
                    local: a.local,
                    remote: a.remote,
                    remote_node: a.remote_node,
                    auth_type: meshauth_policy::AuthType::Required,
                };
                flows.push(auth_record(
                    &node,
                    &view,
                    &key,
                    "SUCCEEDED",
                    "responder".into(),
                    0,
                ));
                metrics.handshake(Role::Responder, HandshakeResult::Success, None);
                auth.record(key, a.expires);
            }
        });
        let (flows, node) = (config.flows.clone(), config.node_name.clone());
        let metrics = config.metrics.clone();
        tokio::spawn(async move {
            while let Some(reason) = fail_rx.recv().await {
                metrics.handshake(Role::Responder, reason.into(), None);
                flows.push(meshauth_proto::agent::Flow {
                    time_unix_ms: crate::flows::now_ms(),
                    node: node.clone(),
                    kind: "auth".into(),
                    verdict: "FAILED".into(),
                    reason: format!("{reason:?} (responder)"),
                    ..Default::default()
                });
            }
        });
    }

    // Datapath events → auth requests (a blocking reader on its own thread).
    let (ev_tx, mut ev_rx) = mpsc::channel::<AuthKey>(1024);
    let (flows, ev_view, ev_node) = (config.flows.clone(), view.clone(), config.node_name.clone());
    std::thread::Builder::new()
        .name("meshauth-events".into())
        .spawn(move || {
            loop {
                match events.next_event(Duration::from_millis(500)) {
                    Some(e) => {
                        flows.push(flow_record(&ev_node, &ev_view, &e));
                        // A full channel drops the signal: the datapath signals again.
                        if let Some(key) = e.auth_key
                            && ev_tx.try_send(key).is_err()
                            && ev_tx.is_closed()
                        {
                            return;
                        }
                    }
                    None if ev_tx.is_closed() => return,
                    None => {}
                }
            }
        })?;

    let mut snapshots = manager.subscribe();
    let mut compiler = Compiler::new();
    let mut applied = BTreeSet::new();
    let mut renew_at = BTreeMap::new();
    let mut registered: BTreeMap<String, (LocalEndpoint, IdentityId)> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            Some(key) = ev_rx.recv() => auth.request(key, SystemTime::now()),
            _ = tick.tick() => {}
            changed = snapshots.changed() => if changed.is_err() { return Ok(()) },
        }
        let snapshot: Arc<Snapshot> = snapshots.borrow_and_update().clone();
        if let Err(e) = reconcile(
            &manager,
            &*source,
            &dp,
            &view,
            &svids,
            &auth,
            &mut compiler,
            &mut applied,
            &mut renew_at,
            &mut registered,
            &snapshot,
        )
        .await
        {
            tracing::warn!(error = %format!("{e:#}"), "reconcile failed; retrying");
        }
        auth.tick(SystemTime::now());
        let entries = auth.entries();
        let stats = auth.stats();
        config
            .metrics
            .auth_state(entries.len(), auth.pending(), stats.overflow, stats.revoked);
        config.published.set(entries);
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the pieces one reconcile pass touches"
)]
async fn reconcile(
    manager: &Manager,
    source: &dyn EndpointSource,
    dp: &Arc<Mutex<Datapath>>,
    view: &SharedView,
    svids: &LocalSvids,
    auth: &AuthManager<DatapathTable>,
    compiler: &mut Compiler,
    applied: &mut BTreeSet<String>,
    renew_at: &mut BTreeMap<IdentityId, SystemTime>,
    registered: &mut BTreeMap<String, (LocalEndpoint, IdentityId)>,
    snapshot: &Snapshot,
) -> anyhow::Result<()> {
    let Some(cluster) = snapshot.cluster.as_deref() else {
        return Ok(());
    };
    let wanted: BTreeMap<String, LocalEndpoint> = source
        .endpoints()?
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    let mut client = None;

    // Endpoints: register new or changed ones, attach the datapath; deregister gone ones.
    for (name, ep) in &wanted {
        if registered.get(name).is_some_and(|(old, _)| old == ep) {
            continue;
        }
        let c = match &mut client {
            Some(c) => c,
            None => client.insert(manager.connect().await?),
        };
        let identity = c
            .register_endpoint(RegisterEndpointRequest {
                name: name.clone(),
                labels: ep
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ipv4: ep.ipv4.to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("registering endpoint {name}: {}", s.message()))?
            .into_inner()
            .identity;
        let identity = IdentityId::new(identity);
        let mut d = dp.lock().unwrap_or_else(|p| p.into_inner());
        d.attach(&ep.host_veth)?;
        d.set_endpoint(
            ep.host_ifindex,
            &EndpointInfo {
                id: EndpointId(ep.host_ifindex),
                identity,
                ipv4: ep.ipv4,
            },
        )?;
        drop(d);
        compiler.set_endpoint(name, ep.labels.clone());
        registered.insert(name.clone(), (ep.clone(), identity));
        tracing::info!(endpoint = %name, identity = %identity, "endpoint enforced");
    }
    let gone: Vec<String> = registered
        .keys()
        .filter(|n| !wanted.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        if let Some((ep, _)) = registered.remove(&name) {
            compiler.remove_endpoint(&name);
            let _ = dp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_endpoint(ep.host_ifindex);
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(manager.connect().await?),
            };
            let _ = c
                .deregister_endpoint(DeregisterEndpointRequest { name: name.clone() })
                .await;
        }
    }

    // Cluster view for placement checks and the ipcache.
    {
        let mut v = view.0.write().unwrap_or_else(|p| p.into_inner());
        v.cluster = cluster.clone();
        v.local = registered.clone();
    }
    {
        let mut d = dp.lock().unwrap_or_else(|p| p.into_inner());
        for e in &cluster.endpoints {
            d.set_ipcache(e.ipv4, 32, e.identity, e.node_id)?;
        }
    }

    // Policy: the compiler recompiles only what changed.
    for (id, labels) in &cluster.identities {
        compiler.set_identity(*id, labels.clone());
    }
    let names: BTreeSet<String> = cluster.policies.iter().map(|p| p.name.clone()).collect();
    for p in &cluster.policies {
        compiler.set_policy(p.clone());
    }
    for stale in applied.iter().filter(|n| !names.contains(*n)) {
        compiler.remove_policy(stale);
    }
    *applied = names;
    for (name, (ep, _)) in registered.iter() {
        if let Some(entries) = compiler.entries(name) {
            dp.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_policy(EndpointId(ep.host_ifindex), entries)?;
        }
    }

    // SVIDs of local identities.
    let local_ids: BTreeSet<IdentityId> = registered.values().map(|(_, id)| *id).collect();
    // Missing, or past its renewal time (about half-life): (re)sign.
    let now = SystemTime::now();
    let missing: Vec<IdentityId> = local_ids
        .iter()
        .copied()
        .filter(|id| svids.get(*id).is_none() || renew_at.get(id).is_none_or(|t| now >= *t))
        .collect();
    if !missing.is_empty() {
        let mut keys = BTreeMap::new();
        let mut csrs = Vec::new();
        for id in &missing {
            let (key, csr) = crate::server_client::key_and_csr()?;
            keys.insert(*id, key);
            csrs.push(IdentityCsr {
                identity: id.get(),
                csr,
            });
        }
        let c = match &mut client {
            Some(c) => c,
            None => client.insert(manager.connect().await?),
        };
        let signed = c
            .sign_identity_svids(SignIdentitySvidsRequest { csrs })
            .await
            .map_err(|s| anyhow::anyhow!("identity SVIDs: {}", s.message()))?
            .into_inner();
        for s in signed.svids {
            let id = IdentityId::new(s.identity);
            let Some(key) = keys.remove(&id) else {
                continue;
            };
            let chain: Vec<CertificateDer<'static>> =
                s.svid_chain.into_iter().map(CertificateDer::from).collect();
            let not_after = SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(s.expires_at_unix).unwrap_or(0));
            renew_at.insert(id, crate::manager::refresh_time(now, not_after));
            svids.set(
                id,
                LocalSvid {
                    key: SharedCertifiedKey::new(chain, PrivateKeyDer::Pkcs8(key))?,
                    not_after,
                },
            );
        }
    }
    for id in svids.identities() {
        if !local_ids.contains(&id) {
            svids.remove(id);
        }
    }
    renew_at.retain(|id, _| local_ids.contains(id));

    // Revocation: entries whose local identity left this node, whose peer identity is no longer
    // where the entry says, or that no policy requires any more.
    let hosted = |id: IdentityId, node: NodeId| {
        cluster
            .endpoints
            .iter()
            .any(|e| e.identity == id && e.node_id == node)
    };
    let required: BTreeSet<(IdentityId, IdentityId)> = registered
        .iter()
        .flat_map(|(name, (_, local))| {
            compiler
                .entries(name)
                .unwrap_or_default()
                .iter()
                .filter(|e| e.auth != meshauth_policy::AuthType::None)
                .filter_map(move |e| e.remote.map(|r| (*local, r)))
        })
        .collect();
    // The requirement may come from the peer's side (its ingress or egress rules).
    let peer_requires = |k: &AuthKey| {
        cluster.identities.get(&k.remote).is_some_and(|labels| {
            meshauth_policy::compile_endpoint(&cluster.policies, &cluster.identities, labels)
                .iter()
                .any(|e| e.auth != meshauth_policy::AuthType::None && e.remote == Some(k.local))
        })
    };
    auth.revoke(|k| {
        !local_ids.contains(&k.local)
            || !hosted(k.remote, k.remote_node)
            || (!required.contains(&(k.local, k.remote)) && !peer_requires(k))
    });
    Ok(())
}
