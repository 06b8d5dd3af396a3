//! The node's WireGuard tunnel (encryption on): pod traffic between nodes goes through it,
//! keyed by the node-pair key exchange.
//!
//! - [`prepare`] makes the tunnel interface a *persistent* TUN (before anything else runs), so
//!   that it and the routes into it outlive the agent: while no agent reads it, the kernel
//!   drops what is routed there. Nothing between pods of two nodes ever leaves in the clear.
//! - [`run`]: the userspace WireGuard device (`meshauth-tunnel`) on it; the key exchange
//!   responder on TCP 4251; on every change of the cluster view, the plan
//!   ([`crate::tunnel_plan`]): routes (every other node's pod range into the tunnel), peers
//!   (allowed IPs = the peer's pods); as initiator, a key exchange with every peer that has no
//!   key, then a new one every `rotate_every` (or at two thirds of the key's remaining life,
//!   if sooner), each failure retried after 0.5 s doubling to 30 s.
//!
//! A new pre-shared key is mixed into the next WireGuard handshake, which the device starts at
//! once; the established session carries traffic until the new one is up, so rotation does
//! not interrupt flows.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use meshauth_auth::tunnel_key::{
    ExchangeReason, KeyExchange, KeyHook, PairKey, RekeyHook, TUNNEL_KEY_PORT, TunnelPeer,
    TunnelPeers,
};
use meshauth_policy::NodeId;
use meshauth_tunnel::{
    Backend, Device, DeviceConfig, KernelDevice, PeerConfig, PrivateKey, Psk, Tunnel, TunnelState,
};
use tokio::sync::watch;

use crate::manager::Manager;
use crate::metrics::{ExchangeResult, Metrics, Role};
use crate::tunnel_plan::{TunnelPlan, plan};

/// The tunnel interface.
pub const TUN_NAME: &str = "mawg0";
/// WireGuard's UDP port (Cilium's).
pub const TUNNEL_PORT: u16 = 51871;
/// The tunnel's MTU: 1500 less WireGuard's 80 bytes of IPv6-sized overhead.
pub const TUNNEL_MTU: u32 = 1420;
/// The node's WireGuard key file, in the data dir (0600).
pub const KEY_FILE: &str = "wireguard.key";

/// How the tunnel runs.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// The TUN interface.
    pub tun_name: String,
    /// WireGuard's UDP port (the same on every node).
    pub port: u16,
    /// The key exchange port (the same on every node).
    pub key_port: u16,
    /// A new pre-shared key this often.
    pub rotate_every: Duration,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            tun_name: TUN_NAME.into(),
            port: TUNNEL_PORT,
            key_port: TUNNEL_KEY_PORT,
            rotate_every: Duration::from_secs(600),
        }
    }
}

/// One peer's tunnel, for `meshauth status` and `auth list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTunnel {
    /// The peer node.
    pub name: String,
    /// Its id.
    pub node: NodeId,
    /// Where its WireGuard listens.
    pub endpoint: SocketAddr,
    /// How many pod addresses it may send from (and receives for).
    pub allowed: usize,
    /// No key yet, handshaking, or up.
    pub state: TunnelState,
    /// When its last WireGuard handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// WireGuard bytes sent and received.
    pub tx_bytes: u64,
    /// WireGuard bytes received.
    pub rx_bytes: u64,
    /// Pre-shared keys applied after the first.
    pub rotations: u64,
    /// When the current pre-shared key was derived, and until when it may be used.
    pub key: Option<(SystemTime, SystemTime)>,
    /// Why the last key exchange failed, if it did.
    pub last_error: Option<String>,
}

/// The tunnel's state, shared with the admin API (empty while encryption is off).
#[derive(Debug, Clone, Default)]
pub struct TunnelStatus(Arc<Mutex<Option<TunnelsNow>>>);

/// The device's backend and the peers' tunnels.
pub type TunnelsNow = (Backend, Vec<PeerTunnel>);

impl TunnelStatus {
    /// The device's backend and the peers' tunnels, or `None` when encryption is off.
    pub fn get(&self) -> Option<TunnelsNow> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, backend: Backend, peers: Vec<PeerTunnel>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((backend, peers));
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the node's WireGuard device: the kernel's (a `wireguard` link named
/// `settings.tun_name`, configured over netlink) where the kernel has WireGuard, else the
/// userspace device on a persistent TUN of that name ([`prepare`]). Returns it with its
/// interface's ifindex. Either way the interface outlives the agent: the kernel's keeps
/// encrypting with the keys it holds; the TUN drops what is routed to it while nobody reads.
pub fn start(
    settings: &TunnelSettings,
    private_key: PrivateKey,
    metrics: meshauth_tunnel::TunnelMetrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Arc<dyn Tunnel>, u32)> {
    if meshauth_tunnel::kernel_available() {
        let k = KernelDevice::start(&settings.tun_name, settings.port, private_key, metrics)
            .context("cannot set up the kernel's WireGuard")?;
        tracing::info!(tun = %settings.tun_name, "encryption: the kernel's WireGuard");
        let index = k.index();
        return Ok((Arc::new(k), index));
    }
    let index = prepare(&settings.tun_name)?;
    let device = Device::start(
        DeviceConfig {
            tun_name: settings.tun_name.clone(),
            listen: SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), settings.port),
            private_key,
        },
        metrics,
        shutdown,
    )
    .context("cannot start the userspace WireGuard device")?;
    tracing::info!(tun = %settings.tun_name, "encryption: userspace WireGuard on a TUN (the kernel has none)");
    Ok((Arc::new(device), index))
}

/// The name shown for a backend.
pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Kernel => "kernel WireGuard",
        Backend::Userspace => "userspace WireGuard",
    }
}

/// Makes `name` a persistent TUN (IFF_TUN, no packet information), up, with the tunnel's MTU
/// and no IPv6, and returns its ifindex. Idempotent: an existing one is kept (with its routes).
pub fn prepare(name: &str) -> anyhow::Result<u32> {
    // By name in this network namespace (sysfs may be another namespace's: `nsenter --net`).
    if nix::net::if_::if_nametoindex(name).is_err() {
        ip(&["tuntap", "add", "dev", name, "mode", "tun"])
            .with_context(|| format!("cannot create the tunnel interface {name}"))?;
    }
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    ip(&[
        "link",
        "set",
        "dev",
        name,
        "mtu",
        &TUNNEL_MTU.to_string(),
        // A TUN's queue (500 packets by default) overflows under a fast sender before the
        // device reads; a longer one absorbs the bursts.
        "txqueuelen",
        "4096",
        "up",
    ])?;
    nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("the tunnel interface {name} is gone"))
}

/// Metric of the blackhole route kept under every tunnel route.
const BLACKHOLE_METRIC: &str = "4242";

/// Routes exactly `plan.routes` into `dev` (replacing routes of those prefixes elsewhere, such
/// as a plaintext route via the underlay), each over a blackhole route of the same prefix: if
/// the tunnel route goes (the interface taken down), what it carried is dropped rather than
/// sent by a broader route (a default route) in the clear. Routes into `dev`, and our
/// blackholes, no longer planned are removed. Idempotent.
fn apply_routes(dev: &str, plan: &TunnelPlan) -> anyhow::Result<()> {
    let wanted: std::collections::BTreeSet<String> =
        plan.routes.iter().map(ToString::to_string).collect();
    let current = ip(&["-4", "route", "show", "dev", dev])?;
    for line in current.lines() {
        let Some(prefix) = line.split_whitespace().next() else {
            continue;
        };
        if !wanted.contains(prefix) {
            ip(&["route", "del", prefix, "dev", dev])?;
        }
    }
    let blackholes = ip(&["-4", "route", "show", "type", "blackhole"])?;
    for line in blackholes.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ours = words.windows(2).any(|w| w == ["metric", BLACKHOLE_METRIC]);
        if let (true, Some(prefix)) = (ours, words.get(1))
            && !wanted.contains(*prefix)
        {
            ip(&[
                "route",
                "del",
                "blackhole",
                prefix,
                "metric",
                BLACKHOLE_METRIC,
            ])?;
        }
    }
    for prefix in &wanted {
        ip(&[
            "route",
            "replace",
            "blackhole",
            prefix,
            "metric",
            BLACKHOLE_METRIC,
        ])?;
        ip(&["route", "replace", prefix, "dev", dev])?;
    }
    Ok(())
}

/// What the tunnel needs.
pub struct TunnelConfig {
    /// How it runs.
    pub settings: TunnelSettings,
    /// This node's name.
    pub node_name: String,
    /// The node's address: WireGuard and the key exchange listen there.
    pub node_address: IpAddr,
    /// The node's WireGuard device (the kernel's or the userspace one), started by [`start`].
    pub device: Arc<dyn Tunnel>,
    /// The agent's metrics.
    pub metrics: Metrics,
    /// Where the tunnel's state is published.
    pub status: TunnelStatus,
    /// The agent's `tunnel` readiness condition: not ready while the routes into the tunnel
    /// cannot be applied.
    pub ready: meshauth_telemetry::ReadyHandle,
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("settings", &self.settings)
            .field("node_name", &self.node_name)
            .field("node_address", &self.node_address)
            .field("backend", &self.device.backend())
            .finish_non_exhaustive()
    }
}

/// The responder's registry view: the latest plan.
struct PlannedPeers(Arc<RwLock<TunnelPlan>>);

impl TunnelPeers for PlannedPeers {
    fn peer_at(&self, addr: IpAddr) -> Option<TunnelPeer> {
        let plan = self.0.read().unwrap_or_else(|p| p.into_inner());
        plan.peer_at(addr).map(|p| TunnelPeer {
            name: p.name.clone(),
            node: p.node,
            address: p.address,
            key: p.key,
        })
    }
}

/// Per-peer key bookkeeping.
#[derive(Debug, Default, Clone)]
struct KeyState {
    /// The peer's WireGuard key the pre-shared key was derived for.
    for_key: Option<meshauth_policy::TunnelKey>,
    /// Derived at, usable until.
    derived: Option<(SystemTime, SystemTime)>,
    /// When the next exchange is due (initiator).
    due: Option<Instant>,
    /// Retry delay after a failure.
    backoff: Option<Duration>,
    in_flight: bool,
    last_error: Option<String>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the routes and the interface are checked and put back.
const ROUTE_CHECK: Duration = Duration::from_secs(5);
/// How long the node that does not initiate waits for a key before it asks for one.
const ASK_AFTER: Duration = Duration::from_secs(1);
/// Key exchanges an initiator runs at once.
const MAX_EXCHANGES: usize = 16;

/// When a key derived now, usable until `expires`, is due for rotation.
fn rotation_due(now: SystemTime, expires: SystemTime, every: Duration) -> Duration {
    let left = expires.duration_since(now).unwrap_or_default();
    every
        .min(left.mul_f64(2.0 / 3.0))
        .max(Duration::from_secs(1))
}

/// Runs the tunnel until `shutdown`.
pub async fn run(
    cfg: TunnelConfig,
    manager: Manager,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let TunnelConfig {
        settings,
        node_name,
        node_address,
        device,
        metrics,
        status,
        ready,
    } = cfg;
    let own_key: meshauth_policy::TunnelKey = device.public_key().into();
    let planned = Arc::new(RwLock::new(TunnelPlan::default()));
    let keys: Arc<Mutex<BTreeMap<String, KeyState>>> = Arc::default();
    let exchange = {
        let m = manager.clone();
        KeyExchange::new(
            manager.trust_domain(),
            manager.shared_bundle(),
            manager.node_key(),
            Arc::new(move || m.node_svid().not_after),
            node_name.clone(),
            own_key,
            Arc::new(PlannedPeers(Arc::clone(&planned))),
            meshauth_auth::Timeouts::default(),
        )
    };
    let listen = SocketAddr::new(node_address, settings.key_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for key exchanges on {listen}"))?;
    let install: KeyHook = {
        let (device, keys, metrics) = (Arc::clone(&device), Arc::clone(&keys), metrics.clone());
        Arc::new(move |k: &PairKey| {
            let ok = device.set_psk(k.peer.node, Psk::from_bytes(k.psk));
            if ok {
                let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                let st = keys.entry(k.peer.name.clone()).or_default();
                st.for_key = Some(k.peer.key);
                st.derived = Some((SystemTime::now(), k.expires));
                st.last_error = None;
                metrics.tunnel_exchange(Role::Responder, ExchangeResult::Success);
                tracing::info!(peer.node = %k.peer.name, "tunnel key installed (responder)");
            }
            ok
        })
    };
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<ExchangeReason>(64);
    let rekey: RekeyHook = {
        let keys = Arc::clone(&keys);
        Arc::new(move |peer: &TunnelPeer| {
            let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = keys.get_mut(&peer.name)
                && !st.in_flight
            {
                tracing::info!(peer.node = %peer.name, "the peer holds no tunnel key: deriving one now");
                st.due = Some(Instant::now());
            }
        })
    };
    let responder =
        tokio::spawn(
            exchange
                .clone()
                .serve(listener, install, rekey, failed_tx, shutdown.clone()),
        );
    let _abort_responder = AbortOnDrop(responder);
    let mut snapshots = manager.subscribe();
    // The view already there counts as a change.
    snapshots.mark_changed();
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::channel::<(String, Result<Option<PairKey>, String>)>(MAX_EXCHANGES);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut route_error: Option<String> = None;
    let mut next_route_check = Instant::now() + ROUTE_CHECK;
    tracing::info!(node = %node_name, tun = %settings.tun_name, port = settings.port, "tunnel running");
    let stopped = {
        let mut s = shutdown.clone();
        async move {
            let _ = s.wait_for(|v| *v).await;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let cluster = snapshots.borrow_and_update().cluster.clone();
                let Some(cluster) = cluster else { continue };
                let next = plan(&cluster, &node_name);
                if *planned.read().unwrap_or_else(|p| p.into_inner()) == next {
                    continue;
                }
                let routes = settings.tun_name.clone();
                let for_routes = next.clone();
                match tokio::task::spawn_blocking(move || apply_routes(&routes, &for_routes)).await {
                    Ok(Ok(())) => route_error = None,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot route pod ranges into the tunnel (their traffic is not sent in the clear: it has no route)");
                        route_error = Some(e.to_string());
                    }
                    Err(e) => route_error = Some(e.to_string()),
                }
                device.set_peers(
                    next.peers
                        .values()
                        .map(|p| PeerConfig {
                            node: p.node,
                            public_key: p.key.into(),
                            endpoint: SocketAddr::new(p.address, settings.port),
                            allowed: p.allowed.clone(),
                        })
                        .collect(),
                );
                {
                    let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                    keys.retain(|name, _| next.peers.contains_key(name));
                    for p in next.peers.values() {
                        let st = keys.entry(p.name.clone()).or_default();
                        if st.for_key != Some(p.key) {
                            // A new peer, or a new key: the device starts it over unkeyed.
                            *st = KeyState {
                                // The initiator derives a key at once; the other node asks
                                // for one if none came within a second (it restarted).
                                due: Some(if p.initiator {
                                    Instant::now()
                                } else {
                                    Instant::now() + ASK_AFTER
                                }),
                                ..KeyState::default()
                            };
                        }
                    }
                }
                *planned.write().unwrap_or_else(|p| p.into_inner()) = next;
            }
            Some((name, result)) = done_rx.recv() => {
                let now = Instant::now();
                let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                let Some(st) = keys.get_mut(&name) else { continue };
                st.in_flight = false;
                match result {
                    Ok(None) => {
                        // Asked: the initiator's exchange brings the key; ask again if not.
                        st.due = Some(now + ASK_AFTER * 5);
                        st.backoff = None;
                    }
                    Ok(Some(k)) => {
                        let at = SystemTime::now();
                        st.for_key = Some(k.peer.key);
                        st.derived = Some((at, k.expires));
                        st.due = Some(now + rotation_due(at, k.expires, settings.rotate_every));
                        st.backoff = None;
                        st.last_error = None;
                    }
                    Err(e) => {
                        let delay = st.backoff.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
                        st.backoff = Some(delay);
                        st.due = Some(now + delay);
                        st.last_error = Some(e);
                    }
                }
            }
            Some(reason) = failed_rx.recv() => {
                metrics.tunnel_exchange(Role::Responder, reason.into());
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= next_route_check {
                    // Routes (and the interface) put back if something removed them.
                    next_route_check = now + ROUTE_CHECK;
                    let dev = settings.tun_name.clone();
                    let current = planned.read().unwrap_or_else(|p| p.into_inner()).clone();
                    route_error = match tokio::task::spawn_blocking(move || {
                        ip(&["link", "set", "dev", &dev, "up"])?;
                        apply_routes(&dev, &current)
                    })
                    .await
                    {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                }
                let plan = planned.read().unwrap_or_else(|p| p.into_inner()).clone();
                let mut keys = keys.lock().unwrap_or_else(|p| p.into_inner());
                let mut running = keys.values().filter(|k| k.in_flight).count();
                for p in plan.peers.values() {
                    if running >= MAX_EXCHANGES {
                        break;
                    }
                    let Some(st) = keys.get_mut(&p.name) else { continue };
                    // The other node only asks, and only while it holds no key.
                    let asks = !p.initiator && st.derived.is_none();
                    if st.in_flight || st.due.is_none_or(|d| d > now) || !(p.initiator || asks) {
                        continue;
                    }
                    st.in_flight = true;
                    running += 1;
                    let (exchange, device, metrics, done) =
                        (exchange.clone(), Arc::clone(&device), metrics.clone(), done_tx.clone());
                    let peer = TunnelPeer {
                        name: p.name.clone(),
                        node: p.node,
                        address: p.address,
                        key: p.key,
                    };
                    let key_port = settings.key_port;
                    tokio::spawn(async move {
                        if asks {
                            let result = exchange
                                .request_rekey(&peer, key_port, Some(node_address))
                                .await
                                .map(|()| None)
                                .map_err(|e| {
                                    tracing::warn!(peer.node = %peer.name, reason = e.reason.as_str(), error = %e.detail, "cannot ask for a tunnel key; retrying");
                                    e.to_string()
                                });
                            let _ = done.send((peer.name.clone(), result)).await;
                            return;
                        }
                        let result = match exchange.initiate(&peer, key_port, Some(node_address)).await {
                            Ok(k) => {
                                if device.set_psk(k.peer.node, Psk::from_bytes(k.psk)) {
                                    metrics.tunnel_exchange(Role::Initiator, ExchangeResult::Success);
                                    tracing::info!(peer.node = %peer.name, "tunnel key installed (initiator)");
                                    Ok(Some(k))
                                } else {
                                    Err("the peer left the tunnel meanwhile".to_owned())
                                }
                            }
                            Err(e) => {
                                metrics.tunnel_exchange(Role::Initiator, e.reason.into());
                                tracing::warn!(peer.node = %peer.name, reason = e.reason.as_str(), error = %e.detail, "tunnel key exchange failed; retrying");
                                Err(e.to_string())
                            }
                        };
                        let _ = done.send((peer.name.clone(), result)).await;
                    });
                }
                match &route_error {
                    None => ready.set_ready(),
                    Some(e) => ready.set_not_ready(format!("cannot route pod ranges into the tunnel: {e}")),
                }
                let device_status = device.status();
                let wall = SystemTime::now();
                let peers = plan
                    .peers
                    .values()
                    .map(|p| {
                        let d = device_status.iter().find(|s| s.node == p.node);
                        let k = keys.get(&p.name);
                        PeerTunnel {
                            name: p.name.clone(),
                            node: p.node,
                            endpoint: SocketAddr::new(p.address, settings.port),
                            allowed: p.allowed.len(),
                            state: d.map_or(TunnelState::NoKey, |d| d.state),
                            last_handshake: d
                                .and_then(|d| d.last_handshake)
                                .and_then(|ago| wall.checked_sub(ago)),
                            tx_bytes: d.map_or(0, |d| d.tx_bytes),
                            rx_bytes: d.map_or(0, |d| d.rx_bytes),
                            rotations: d.map_or(0, |d| d.rotations),
                            key: k.and_then(|k| k.derived),
                            last_error: k
                                .and_then(|k| k.last_error.clone())
                                .or_else(|| route_error.clone()),
                        }
                    })
                    .collect();
                status.set(device.backend(), peers);
            }
            () = &mut stopped => return Ok(()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_comes_before_two_thirds_of_the_remaining_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let every = Duration::from_secs(600);
        assert_eq!(
            rotation_due(now, now + Duration::from_secs(3600), every),
            every
        );
        assert_eq!(
            rotation_due(now, now + Duration::from_secs(300), every),
            Duration::from_secs(200)
        );
        // Expired (or a clock step): soon, never a busy loop.
        assert_eq!(
            rotation_due(now, now - Duration::from_secs(5), every),
            Duration::from_secs(1)
        );
    }
}
