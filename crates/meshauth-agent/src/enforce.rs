//! Enforcement: the agent's datapath, policy compilation, identity SVIDs, the auth manager and
//! the handshake server, wired together.
//!
//! - Local endpoints come from an [`EndpointSource`] (the lab's pods; a CNI plugin later). Each
//!   is registered with the server, which allocates its identity.
//! - On every change (a sync snapshot, the endpoint list, an SVID due for renewal), the
//!   [`crate::plan`]ner computes what the datapath should hold and the [`crate::driver`] writes
//!   the difference; entries of pairs that lost their justification are revoked at once. No
//!   timer reconciles: at rest the loop only ticks the auth manager.
//! - SVIDs of local identities (`spiffe://<td>/identity/<n>`) are obtained with keys made here.
//! - Auth-required events from the datapath go straight to the auth manager, whose handshakes
//!   dial the peer node's agent; the handshake server answers peers. Both write auth entries.
//! - Whether policy is enforced is published as [`EnforceStatus`]: the agent is not ready while
//!   the datapath cannot be loaded, the handshake port cannot be bound, a policy does not parse
//!   (the last good version stays enforced), or the plan could not be applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use meshauth_auth::{
    AuthManager, AuthTable, Authenticator, Handshaker, LocalSvid, LocalSvids, ManagerConfig,
    ManagerHooks, Outcome, Placement, Reason, TableError, Timeouts,
};
use meshauth_datapath::Datapath;
use meshauth_policy::{AuthKey, Compiler, IdentityId, NodeId, Policy, PolicyKey};
use meshauth_proto::node::{
    IdentityCsr, ReportPodRequest, SignIdentitySvidsRequest, WithdrawPodRequest,
};
use meshauth_tls::SharedCertifiedKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};

use crate::cache::{ClusterState, Snapshot};
use crate::driver::Driver;
use crate::manager::Manager;
use crate::metrics::{HandshakeResult, Role};
use crate::plan::BoundEndpoint;

pub use crate::endpoints::{EndpointList, EndpointSource, LocalEndpoint};

/// Whether policy is enforced: `Ok` while everything the plan asks for is in the datapath,
/// `Err` with what is wrong otherwise.
pub type EnforceStatus = Result<(), String>;

/// The auth entries this node holds, for the admin API: enforcement points it at its auth
/// manager, which is read only when asked (no copy is kept or refreshed on a timer).
#[derive(Debug, Clone, Default)]
pub struct AuthEntries(Arc<RwLock<Option<meshauth_auth::EntriesReader>>>);

impl AuthEntries {
    /// The entries, sorted (none while enforcement is not running).
    pub fn get(&self) -> Vec<(AuthKey, SystemTime)> {
        let reader = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut entries = reader.map(|r| r.read()).unwrap_or_default();
        entries.sort_unstable();
        entries
    }

    fn set(&self, reader: meshauth_auth::EntriesReader) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(reader);
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
    /// Where the admin API reads the auth entries from (pointed at the auth manager).
    pub published: AuthEntries,
    /// Where flows and auth events are recorded.
    pub flows: crate::flows::FlowLog,
    /// The agent's metrics.
    pub metrics: crate::metrics::Metrics,
    /// Where enforcement says whether it is in force.
    pub status: watch::Sender<EnforceStatus>,
    /// Hold packets of pairs being authenticated (instead of dropping them), with these bounds.
    pub hold: Option<crate::hold::HoldLimits>,
    /// Authenticate the pairs policy requires before their first packet, at most this many
    /// per change (`None`: only on demand).
    pub pre_authenticate: Option<usize>,
    /// A datapath loaded before the first sync (see [`Preloaded`]); taken by the first run.
    pub preloaded: Preloaded,
    /// Where enforcement says which pods it enforces on (after every pass), for the admin API
    /// to answer the CNI plugin once a container's interface is enforced on.
    pub enforced: watch::Sender<crate::cni::Enforced>,
    /// Encryption on: the tunnel interface's ifindex. Packets into a pod from another node's
    /// pod that did not come out of it are dropped as unencrypted.
    pub tunnel: Option<u32>,
}

/// A datapath loaded early, for the first enforcement run to take. Loading parses the kernel's
/// BTF (aya 0.14's loader does so whether or not the programs need it, and ours do not: about
/// 13 MB for a moment); done before the first sync, the memory it frees is what the cluster
/// view then fills, instead of a peak on top of it. Later runs (restarts) load their own.
#[derive(Clone, Default)]
pub struct Preloaded(Arc<Mutex<Option<Datapath>>>);

impl Preloaded {
    /// Loads the datapath pinned under `pin_dir`; on failure nothing is kept (the run loads
    /// it again and reports why it cannot).
    pub fn load(pin_dir: &std::path::Path) -> Self {
        match Datapath::load(pin_dir) {
            Ok(dp) => Preloaded(Arc::new(Mutex::new(Some(dp)))),
            Err(e) => {
                tracing::debug!(error = %e, "cannot preload the datapath");
                Preloaded::default()
            }
        }
    }

    fn take(&self) -> Option<Datapath> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for Preloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Preloaded")
    }
}

/// What the placement checks read: the cluster and the local endpoints, kept current.
#[derive(Default)]
struct View {
    /// The last sync's cluster, shared with the snapshot (not a copy).
    cluster: Arc<ClusterState>,
    local: BTreeMap<String, BoundEndpoint>,
    /// The identities of the CIDR prefixes the policies name (for the flow log's labels).
    cidrs: BTreeMap<IdentityId, meshauth_policy::Cidr>,
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
            .any(|b| b.identity == identity)
    }

    fn node_at(&self, addr: IpAddr) -> Option<NodeId> {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut at = v.cluster.nodes.values().filter(|(_, a)| *a == Some(addr));
        // Two nodes at one address (behind one NAT): the address proves neither (fail closed).
        match (at.next(), at.next()) {
            (Some((id, _)), None) => Some(*id),
            _ => None,
        }
    }

    fn hosted_on(&self, identity: IdentityId, node: NodeId) -> bool {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        v.cluster
            .endpoints
            .iter()
            .any(|e| e.identity == identity && e.node_id == node)
    }

    fn pod_at(&self, addr: Ipv4Addr) -> Option<(IdentityId, NodeId)> {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut at = v.cluster.endpoints.iter().filter(|e| e.ipv4 == Some(addr));
        // An address two pods claim proves neither (fail closed).
        match (at.next(), at.next()) {
            (Some(e), None) => Some((e.identity, e.node_id)),
            _ => None,
        }
    }

    fn local_pod_at(&self, addr: Ipv4Addr) -> Option<IdentityId> {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut at = v.local.values().filter(|b| b.endpoint.ipv4 == addr);
        match (at.next(), at.next()) {
            (Some(b), None) => Some(b.identity),
            _ => None,
        }
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
            .find(|e| e.ipv4 == Some(ip))
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let labels = match v.cluster.identities.get(&identity) {
            Some(l) => l
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            None => crate::explain::reserved_labels(identity, &v.cidrs).unwrap_or_default(),
        };
        (pod, labels)
    }

    /// The policies that decided a datapath verdict, by the view's policies and identities.
    fn decided(&self, e: &meshauth_datapath::FlowEvent) -> crate::explain::Decided {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        crate::explain::decided(
            &v.cluster.policies,
            &v.cluster.identities,
            &v.cidrs,
            &crate::explain::Event {
                src: (e.src, e.src_identity),
                dst: (e.dst, e.dst_identity),
                protocol: e.protocol,
                port: if e.protocol == 1 {
                    u16::from(e.icmp_type)
                } else {
                    e.dport
                },
                direction: e.direction,
            },
        )
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
    let decided = view.decided(e);
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
        verdict: if e.held {
            "HELD"
        } else if e.drop.is_some() {
            "DROPPED"
        } else {
            "FORWARDED"
        }
        .into(),
        reason: match e.drop {
            None if e.held => "authentication required".to_owned(),
            Some(r) if e.established => format!("{r} (established flow re-checked)"),
            Some(r) => r.to_string(),
            None => String::new(),
        },
        tcp_flags: u32::from(e.tcp_flags),
        latency_us: 0,
        sport: u32::from(e.sport),
        direction: match e.direction {
            meshauth_policy::Direction::Egress => "EGRESS",
            meshauth_policy::Direction::Ingress => "INGRESS",
        }
        .into(),
        allowed_by: decided.allowed_by,
        denied_by: decided.denied_by,
        default_deny_by: decided.default_deny_by,
        icmp_type: u32::from(e.icmp_type),
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

type SharedDriver = Arc<Mutex<Driver<Datapath>>>;

fn lock(d: &SharedDriver) -> std::sync::MutexGuard<'_, Driver<Datapath>> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// When each per-connection entry was written: it lives while its connection is tracked, and
/// for [`CONNECTION_GRACE`] after it was written (the responder writes it before the
/// connection's first packet reaches its node).
type Written = Arc<Mutex<std::collections::HashMap<AuthKey, std::time::Instant>>>;

/// How long a fresh per-connection entry lives without its connection being tracked.
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

struct DatapathTable(SharedDriver, Written);

impl AuthTable for DatapathTable {
    fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), TableError> {
        lock(&self.0).datapath().insert_auth(key, expires)?;
        if key.connection.is_some() {
            self.1
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, std::time::Instant::now());
        }
        Ok(())
    }

    fn remove(&mut self, key: AuthKey) -> Result<(), TableError> {
        Ok(lock(&self.0).datapath().remove_auth(key)?)
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
            .initiate_for(
                key.local,
                key.remote,
                key.remote_node,
                SocketAddr::new(addr, self.port),
                Some(self.source),
                key.connection,
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

/// How often the auth manager is ticked (re-authentication, retries, sweep) and the auth
/// gauges and datapath counters are exported.
const TICK: Duration = Duration::from_secs(1);
/// How often idle tracked flows are swept from the conntrack map.
const CT_SWEEP: Duration = Duration::from_secs(30);
/// Retry delays after a failed reconcile.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest a reconcile pass may take (its server calls: connecting, signing identity SVIDs); a
/// pass that takes longer is abandoned and retried like a failure, so a server that accepts
/// and stalls never wedges enforcement (or its shutdown).
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs enforcement until `shutdown`. Fails (and says so in `config.status`) when the datapath
/// cannot be loaded or the handshake port cannot be bound.
pub async fn run(
    config: EnforceConfig,
    manager: Manager,
    source: Box<dyn EndpointSource>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let status = config.status.clone();
    let result = run_inner(config, manager, source, shutdown).await;
    if let Err(e) = &result {
        let _ = status.send(Err(format!("{e:#}")));
    }
    result
}

async fn run_inner(
    config: EnforceConfig,
    manager: Manager,
    source: Box<dyn EndpointSource>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = config
        .status
        .send(Err("enforcement is starting: nothing applied yet".into()));
    let mut dp = match config.preloaded.take() {
        Some(dp) => dp,
        None => Datapath::load(&config.pin_dir).context("cannot load the datapath")?,
    };
    let mut events = dp.take_events()?;
    match config.hold {
        Some(_) => {
            crate::hold::install_rule().context("cannot install the hold queue's rule")?;
            dp.set_auth_miss_action(meshauth_datapath::AuthMissAction::Mark(
                crate::hold::HOLD_MARK,
            ))?;
        }
        None => dp.set_auth_miss_action(meshauth_datapath::AuthMissAction::Drop)?,
    }
    dp.set_tunnel(config.tunnel.map(|ifindex| {
        (
            ifindex,
            meshauth_policy::NodeId::new(manager.node_svid().node_id),
        )
    }))?;
    // Entries a previous run of this agent wrote are still in the pinned map: track them
    // (read one at a time below, once the manager exists).
    let inherited = dp.auth_map_reader()?;
    let driver: SharedDriver = Arc::new(Mutex::new(
        Driver::new(dp).context("cannot read the datapath's state")?,
    ));
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
    let (outcome_tx, mut outcome_rx) = mpsc::channel::<Outcome>(1024);
    let written: Written = Arc::default();
    let auth = AuthManager::start_with(
        config.manager,
        ManagerHooks {
            outcomes: Some(outcome_tx),
            ..ManagerHooks::default()
        },
        Dialer {
            handshaker: handshaker.clone(),
            view: view.clone(),
            port: config.handshake_port,
            source: config.node_address,
            flows: config.flows.clone(),
            node: config.node_name.clone(),
            metrics: config.metrics.clone(),
        },
        DatapathTable(Arc::clone(&driver), Arc::clone(&written)),
    );
    let now = SystemTime::now();
    auth.reserve(inherited.count());
    let read = inherited.for_each(|key, expires| {
        if expires > now {
            auth.adopt(key, expires);
        }
    });
    drop(inherited);
    tracing::info!(
        entries = read,
        tracked = auth.len(),
        "adopted the auth entries a previous run left"
    );
    config.published.set(auth.entries_reader());

    // Handshake server: entries written for the pairs peers authenticate with us.
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::new(config.node_address, config.handshake_port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}:{} for handshakes (is another agent running, or is the node address wrong?)",
                    config.node_address, config.handshake_port
                )
            })?;
    let (acc_tx, mut acc_rx) = mpsc::channel(256);
    let (fail_tx, mut fail_rx) = mpsc::channel(256);
    // The hold queue, on its own thread: it learns each handshake's outcome from here.
    let hold_tx = match config.hold {
        Some(limits) => Some(crate::hold::start(
            limits,
            Arc::clone(&driver),
            auth.clone(),
            config.flows.clone(),
            config.node_name.clone(),
            config.metrics.clone(),
            shutdown.clone(),
        )?),
        None => None,
    };
    let hold_for_events = hold_tx.clone();
    tokio::spawn(
        handshaker
            .clone()
            .with_accept_hook({
                // The responder's entry exists before the initiator hears "OK" (and releases
                // what it held toward us).
                let auth = auth.clone();
                Arc::new(move |a: &meshauth_auth::Authenticated| {
                    auth.record(a.key(), a.expires);
                })
            })
            .serve(listener, acc_tx, fail_tx, shutdown.clone()),
    );
    {
        let (flows, acc_view, node) =
            (config.flows.clone(), view.clone(), config.node_name.clone());
        let metrics = config.metrics.clone();
        tokio::spawn(async move {
            while let Some(a) = acc_rx.recv().await {
                let key = a.key();
                flows.push(auth_record(
                    &node,
                    &acc_view,
                    &key,
                    "SUCCEEDED",
                    "responder".into(),
                    0,
                ));
                // The entry itself was written by the accept hook, before the initiator heard.
                metrics.handshake(Role::Responder, HandshakeResult::Success, None);
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
        // Failures that never reach the dialer (test-always-fail) are shown and counted here.
        let (flows, view, node) = (config.flows.clone(), view.clone(), config.node_name.clone());
        let metrics = config.metrics.clone();
        tokio::spawn(async move {
            while let Some(o) = outcome_rx.recv().await {
                if let Some(hold) = &hold_tx {
                    // Dropped when full: the hold thread also polls the auth map for its pairs.
                    hold.outcome(o.key, o.result.is_ok());
                }
                if let Err(Reason::TestAlwaysFail) = o.result {
                    metrics.handshake(Role::Initiator, Reason::TestAlwaysFail.into(), None);
                    flows.push(auth_record(
                        &node,
                        &view,
                        &o.key,
                        "FAILED",
                        "TestAlwaysFail (authentication.mode: test-always-fail never succeeds)"
                            .into(),
                        0,
                    ));
                }
            }
        });
    }

    // Datapath events → flow log and straight to the auth manager (a blocking reader on its
    // own thread). The manager never blocks: a full queue drops the request and counts it.
    {
        let (flows, ev_view, ev_node) =
            (config.flows.clone(), view.clone(), config.node_name.clone());
        let auth = auth.clone();
        let stop = shutdown.clone();
        let hold = hold_for_events;
        std::thread::Builder::new()
            .name("meshauth-events".into())
            .spawn(move || {
                while !*stop.borrow() {
                    if let Some(e) = events.next_event(Duration::from_millis(500)) {
                        if e.held
                            && let Some(h) = &hold
                        {
                            h.marked();
                        }
                        // The handshake first: the record (labels, deciding policies) can wait.
                        if let Some(key) = e.auth_key {
                            auth.request(key, SystemTime::now());
                        }
                        flows.push(flow_record(&ev_node, &ev_view, &e));
                    }
                }
            })?;
    }

    let mut endpoints = source.watch();
    let mut snapshots = manager.subscribe();
    let mut state = LoopState::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = std::time::Instant::now();
    let mut dirty = true;
    let mut retry_delay = RETRY_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        // While a retry is pending, renewals that fell due wait for it: otherwise an SVID past
        // its renewal time would wake the loop at once, again and again, with the server down.
        let renew = state
            .renew_at
            .values()
            .min()
            .copied()
            .filter(|_| retry_at.is_none());
        let renew_in = renew
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        let retry =
            retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        if !dirty {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                changed = snapshots.changed() => {
                    if changed.is_err() { return Ok(()) }
                    dirty = true;
                }
                changed = endpoints.changed() => {
                    if changed.is_err() {
                        anyhow::bail!("the endpoint source stopped");
                    }
                    dirty = true;
                }
                _ = tokio::time::sleep(renew_in) => dirty = true,
                _ = tokio::time::sleep_until(retry) => dirty = true,
                _ = tick.tick() => {
                    let now = SystemTime::now();
                    sweep_connections(&auth, &driver, &written);
                    if let (Some(max), Some(j)) = (config.pre_authenticate, &state.justification) {
                        request_missing(&auth, j, max);
                    }
                    auth.tick(now);
                    let stats = auth.stats();
                    config
                        .metrics
                        .auth_state(auth.len(), auth.pending(), stats.overflow, stats.revoked);
                    let sweep = last_sweep.elapsed() >= CT_SWEEP;
                    let mut d = lock(&driver);
                    if let Ok(s) = d.datapath().stats() {
                        config.metrics.datapath(&s);
                    }
                    if sweep {
                        last_sweep = std::time::Instant::now();
                        if let Err(e) = d.datapath().sweep_conntrack(meshauth_datapath::boot_time_ns()) {
                            tracing::warn!(error = %e, "cannot sweep the conntrack map");
                        }
                    }
                }
            }
            continue;
        }
        dirty = false;
        let snapshot: Arc<Snapshot> = snapshots.borrow_and_update().clone();
        let list = endpoints.borrow_and_update().clone();
        let pass = tokio::time::timeout(
            RECONCILE_TIMEOUT,
            reconcile(
                &manager,
                &driver,
                &view,
                &svids,
                &auth,
                &mut state,
                &snapshot,
                list,
                &config.node_name,
                config.node_address,
                config.pre_authenticate,
                &config.enforced,
            ),
        );
        let outcome = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            r = pass => r.unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the reconcile pass took longer than {}s (a server call stalled)",
                    RECONCILE_TIMEOUT.as_secs()
                ))
            }),
        };
        match outcome {
            Ok(problems) => {
                // What compiling and planning freed goes back to the kernel (at scale several
                // MB that glibc would keep).
                meshauth_datapath::release_freed_heap();
                retry_at = None;
                retry_delay = RETRY_MIN;
                let _ = config.status.send(if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems.join("; "))
                });
                if !problems.is_empty() {
                    retry_at = Some(tokio::time::Instant::now() + RETRY_MAX);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, retry_in_ms = retry_delay.as_millis() as u64, "reconcile failed; retrying");
                let _ = config.status.send(Err(msg));
                retry_at = Some(tokio::time::Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// What the loop keeps between reconciles.
#[derive(Default)]
struct LoopState {
    compiler: Compiler,
    /// Remote identities that have auth entries, compiled as endpoints: their own policy may
    /// be what requires authentication with us.
    peers: Compiler,
    peer_names: BTreeSet<String>,
    applied_policies: BTreeSet<PolicyKey>,
    identities: BTreeSet<IdentityId>,
    renew_at: BTreeMap<IdentityId, SystemTime>,
    registered: BTreeMap<String, BoundEndpoint>,
    /// Endpoints running here that the control plane did not place here (logged once).
    unplaced: BTreeSet<String>,
    /// What justified auth entries at the last reconcile (kept for pre-authentication).
    justification: Option<crate::plan::Justification>,
}

fn peer_name(id: IdentityId) -> String {
    format!("identity/{id}")
}

/// `namespace/name`: how endpoints and pods are matched.
fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// One pass: register endpoints, compile, plan, apply, SVIDs, revoke. Returns the problems
/// that leave enforcement incomplete (applied as far as possible); `Err` when it could not run.
#[allow(
    clippy::too_many_arguments,
    reason = "the pieces one reconcile pass touches"
)]
async fn reconcile(
    manager: &Manager,
    driver: &SharedDriver,
    view: &SharedView,
    svids: &LocalSvids,
    auth: &AuthManager<DatapathTable>,
    st: &mut LoopState,
    snapshot: &Snapshot,
    list: EndpointList,
    node_name: &str,
    node_address: IpAddr,
    pre_authenticate: Option<usize>,
    enforced: &watch::Sender<crate::cni::Enforced>,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let Some(shared_cluster) = snapshot.cluster.clone() else {
        anyhow::bail!("waiting for the first sync with the server");
    };
    let cluster = &*shared_cluster;
    let wanted: BTreeMap<String, LocalEndpoint> = match list {
        Ok(l) => l
            .into_iter()
            .map(|e| (pod_key(&e.namespace, &e.name), e))
            .collect(),
        Err(e) => {
            // Keep enforcing what we have; say why the list is stale.
            problems.push(format!("the endpoint source failed: {e}"));
            st.registered
                .iter()
                .map(|(n, b)| (n.clone(), b.endpoint.clone()))
                .collect()
        }
    };
    for (name, err) in &cluster.policy_errors {
        problems.push(format!(
            "policy {name} does not parse ({err}); its last good version stays enforced"
        ));
    }
    let mut client = None;

    // Endpoints: bind each running endpoint to the pod the control plane placed here under
    // the same namespace and name (labels and identity come from there), and report its
    // runtime facts; an endpoint the control plane did not place here is not enforced.
    let placed: BTreeMap<String, &crate::cache::ClusterEndpoint> = cluster
        .endpoints
        .iter()
        .filter(|p| p.node == node_name)
        .map(|p| (pod_key(&p.namespace, &p.name), p))
        .collect();
    for (key, ep) in &wanted {
        let Some(pod) = placed.get(key) else {
            if !st.unplaced.contains(key) {
                tracing::info!(pod = %key, "running here, but not placed on this node by the control plane: not enforced");
            }
            continue;
        };
        // Policies select it by its labels in its namespace (its identity's labels).
        let labels = match pod.identity_labels(&cluster.identities) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("pod {key}: {e}: not enforced"));
                st.registered.remove(key);
                st.compiler.remove_endpoint(key);
                continue;
            }
        };
        let reported = pod.ipv4 == Some(ep.ipv4) && pod.interface == ep.host_veth;
        let bound = st
            .registered
            .get(key)
            .is_some_and(|b| b.endpoint == *ep && b.identity == pod.identity && b.labels == labels);
        if reported && bound {
            continue;
        }
        if !reported {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(manager.connect().await?),
            };
            if let Err(s) = c
                .report_pod(ReportPodRequest {
                    namespace: ep.namespace.clone(),
                    name: ep.name.clone(),
                    ipv4: ep.ipv4.to_string(),
                    interface: ep.host_veth.clone(),
                })
                .await
            {
                // Not enforced until the server accepts what we report (it says why).
                problems.push(format!(
                    "pod {key}: the server refused its report: {}",
                    s.message()
                ));
                st.registered.remove(key);
                st.compiler.remove_endpoint(key);
                continue;
            }
        }
        st.compiler.set_endpoint(key, labels.clone());
        st.registered.insert(
            key.clone(),
            BoundEndpoint {
                endpoint: ep.clone(),
                identity: pod.identity,
                labels,
            },
        );
        tracing::info!(pod = %key, identity = %pod.identity, ip = %ep.ipv4, "endpoint enforced");
    }
    st.unplaced = wanted
        .keys()
        .filter(|k| !placed.contains_key(*k))
        .cloned()
        .collect();
    let gone: Vec<String> = st
        .registered
        .keys()
        .filter(|k| !wanted.contains_key(*k) || !placed.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        let Some(b) = st.registered.remove(&key) else {
            continue;
        };
        st.compiler.remove_endpoint(&key);
        // Still placed here but no longer running: withdraw what we reported.
        if placed.contains_key(&key) {
            let c = match &mut client {
                Some(c) => c,
                None => client.insert(manager.connect().await?),
            };
            if let Err(s) = c
                .withdraw_pod(WithdrawPodRequest {
                    namespace: b.endpoint.namespace.clone(),
                    name: b.endpoint.name.clone(),
                })
                .await
            {
                problems.push(format!("withdrawing pod {key}: {}", s.message()));
            }
        }
        tracing::info!(pod = %key, "endpoint no longer enforced");
    }

    // Policy: the compilers recompile only what a change can affect.
    let ids: BTreeSet<IdentityId> = cluster.identities.keys().copied().collect();
    for stale in st.identities.difference(&ids) {
        st.compiler.remove_identity(*stale);
        st.peers.remove_identity(*stale);
    }
    for (id, labels) in &cluster.identities {
        st.compiler.set_identity(*id, labels.clone());
        st.peers.set_identity(*id, labels.clone());
    }
    st.identities = ids;
    // Policies are keyed by `namespace/name` (or `name` for a clusterwide policy): the same
    // name in two namespaces is two policies, and removing one leaves the other.
    let keys: BTreeSet<PolicyKey> = cluster.policies.iter().map(Policy::key).collect();
    for p in &cluster.policies {
        st.compiler.set_policy(p.clone());
        st.peers.set_policy(p.clone());
    }
    for stale in st.applied_policies.difference(&keys) {
        st.compiler.remove_policy_key(stale);
        st.peers.remove_policy_key(stale);
    }
    st.applied_policies = keys;

    // Plan and apply. The ipcache: pods, nodes (this one is the host), pod ranges (no
    // identity) and the CIDR prefixes the policies name (outside the cluster, with the world).
    let addressing = crate::plan::Addressing {
        node: node_name.to_owned(),
        host: match node_address {
            IpAddr::V4(a) => vec![a],
            IpAddr::V6(_) => vec![],
        },
        cidrs: st.compiler.cidr_identities().ipcache_entries(),
    };
    // Remote identities compiled as peers: those we hold auth entries with (their policies
    // justify entries too) and those whose own ingress may require authentication of our
    // pods' traffic (the datapath holds it for them, see `plan::peer_requirements`).
    let mut peer_ids: BTreeSet<IdentityId> = auth.remote_identities();
    peer_ids.extend(crate::plan::auth_requiring_peers(
        cluster,
        node_name,
        &cluster.policies,
    ));
    let peer_names: BTreeSet<String> = peer_ids.iter().map(|id| peer_name(*id)).collect();
    for stale in st.peer_names.difference(&peer_names) {
        st.peers.remove_endpoint(stale);
    }
    for id in &peer_ids {
        if let Some(labels) = cluster.identities.get(id) {
            st.peers.set_endpoint(&peer_name(*id), labels.clone());
        }
    }
    st.peer_names = peer_names;
    let peers: Vec<(IdentityId, &[meshauth_policy::PolicyEntry])> = peer_ids
        .iter()
        .filter_map(|id| Some((*id, st.peers.entries(&peer_name(*id))?)))
        .collect();
    let mut desired = crate::plan::plan(
        cluster,
        &st.registered,
        |n| st.compiler.entries(n),
        &addressing,
    );
    let local_ids: BTreeSet<IdentityId> = st.registered.values().map(|b| b.identity).collect();
    desired.peer_policy = crate::plan::peer_requirements(&local_ids, peers.iter().copied());
    for ip in &desired.conflicts {
        problems.push(format!(
            "address {ip} is claimed by endpoints of different identities: left out of the ipcache"
        ));
    }
    let (applied, errors) = {
        let mut d = lock(driver);
        let result = d.apply(&desired);
        // Enforced on: registered, its interface attached, and its policy written (a failed
        // write names the endpoint in its error).
        let pods = st
            .registered
            .iter()
            .filter(|(key, b)| {
                d.is_attached(&b.endpoint.host_veth)
                    && !result
                        .1
                        .iter()
                        .any(|e| e.to_string().contains(&format!("endpoint {key}")))
            })
            .map(|(key, b)| (key.clone(), b.endpoint.host_veth.clone()))
            .collect();
        enforced.send_replace(crate::cni::Enforced {
            pods,
            node_address: Some(node_address),
        });
        result
    };
    for e in errors {
        tracing::warn!(error = %e, "cannot apply part of the plan");
        problems.push(e.to_string());
    }
    if applied != crate::driver::Applied::default() {
        tracing::debug!(?applied, "datapath updated");
    }

    // The placement checks' view.
    {
        let mut v = view.0.write().unwrap_or_else(|p| p.into_inner());
        v.cluster = Arc::clone(&shared_cluster);
        v.local = st.registered.clone();
        v.cidrs = st
            .compiler
            .cidr_identities()
            .iter()
            .map(|(p, id)| (id, p))
            .collect();
    }

    // SVIDs of local identities: missing, or past their renewal time (about half-life).
    let now = SystemTime::now();
    let missing: Vec<IdentityId> = local_ids
        .iter()
        .copied()
        .filter(|id| svids.get(*id).is_none() || st.renew_at.get(id).is_none_or(|t| now >= *t))
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
                .checked_add(Duration::from_secs(
                    u64::try_from(s.expires_at_unix).unwrap_or(0),
                ))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            st.renew_at
                .insert(id, crate::manager::refresh_time(now, not_after));
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
    st.renew_at.retain(|id, _| local_ids.contains(id));

    // Revocation: entries whose local identity left this node, whose peer identity is no longer
    // where the entry says, or that no policy of either side requires any more.
    let justification = crate::plan::justification(cluster, &desired, peers);
    let revoked = auth.revoke(|k| !justification.justified(k));
    if revoked > 0 {
        tracing::info!(revoked, "auth entries revoked: no longer justified");
    }
    // Pre-authentication: pairs policy requires are authenticated before their first packet
    // (the auth manager's queue and workers bound the rate; its backoff bounds retries). The
    // tick asks again for the ones still missing, so a failed attempt is retried on schedule.
    if let Some(max) = pre_authenticate {
        request_missing(auth, &justification, max);
        st.justification = Some(justification);
    }
    Ok(problems)
}

/// Revokes the per-connection entries whose connection the datapath no longer tracks (a TCP
/// connection's close removes its entry at once in the kernel; this catches UDP and ICMP
/// flows that went idle, and what a close left in the manager).
fn sweep_connections(auth: &AuthManager<DatapathTable>, driver: &SharedDriver, written: &Written) {
    // Never hold `written` while taking the manager's lock: the table takes them the other way.
    let fresh: std::collections::HashMap<AuthKey, std::time::Instant> =
        written.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if fresh.is_empty() {
        return;
    }
    let gone = auth.revoke(|k| {
        let Some(c) = &k.connection else {
            return false;
        };
        if fresh.get(k).is_some_and(|t| t.elapsed() < CONNECTION_GRACE) {
            return false;
        }
        !lock(driver)
            .datapath()
            .connection_tracked(c)
            .unwrap_or(true)
    });
    if gone > 0 {
        tracing::debug!(
            gone,
            "per-connection entries revoked: their connections ended"
        );
    }
    // Forget what the manager no longer holds (revoked here or for any other reason).
    let stale: Vec<AuthKey> =
        auth.with_entries(|has| fresh.keys().filter(|k| !has(k)).copied().collect());
    let mut w = written.lock().unwrap_or_else(|p| p.into_inner());
    for k in stale {
        w.remove(&k);
    }
}

/// Asks the auth manager for the pairs policy requires that have no entry yet.
fn request_missing(
    auth: &AuthManager<DatapathTable>,
    justification: &crate::plan::Justification,
    max: usize,
) {
    let missing = auth.with_entries(|has| crate::plan::pre_authenticate(justification, has, max));
    let now = SystemTime::now();
    for key in missing {
        auth.request(key, now);
    }
}
