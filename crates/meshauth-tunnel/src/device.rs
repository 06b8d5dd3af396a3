//! The userspace WireGuard device: one per node, one peer per other node.
//!
//! # Why this drives `gotatun::noise::Tunn` itself
//!
//! gotatun has a complete `device` module, and this does not use it: that device drops packets
//! that violate cryptokey routing (a decrypted packet whose source address belongs to another
//! peer, or an outgoing packet routed to no peer) silently, without a counter, and keeps no
//! per-peer state we can report. Here the security property of the node tunnel is exactly that
//! check (a node must not send, through its tunnel, packets claiming another node's pods), so
//! every such drop must be counted and visible. This module therefore owns the dispatch:
//! incoming datagrams are matched to a peer by the handshake's static key or the receiver
//! index, handed to that peer's `Tunn`, and what it decrypts is checked against that very
//! peer's allowed set before it reaches the TUN.
//!
//! # Data flow
//!
//! Three tasks, each in a tracing span named `tunnel` with a `task` field:
//! - `tun_to_udp`: reads a packet from the [`PacketIo`], routes it by destination address to a
//!   peer and encrypts it (or holds it, at most [`MAX_HELD`] per peer, while a handshake runs);
//! - `udp_to_tun`: reads a datagram, verifies its MACs (and answers with a cookie when under
//!   load), finds the peer, decrypts, checks the source address and writes to the IO;
//! - `timers`: every 250 ms runs each peer's WireGuard timers (retries, rekeying, keepalives)
//!   and sends what they ask for.
//!
//! A peer gets a `Tunn` only with its first pre-shared key: before it, there is no state that
//! could handshake, and packets toward it are dropped as `no_key`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gotatun::noise::errors::WireGuardError;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::x25519;
use meshauth_policy::NodeId;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::TunnelError;
use crate::io::{PacketIo, TunIo};
use crate::keys::{PrivateKey, Psk, PublicKey};
use crate::metrics::{Direction, DropReason, TunnelMetrics};

/// Packets held per peer while its handshake runs (the same bound as `Tunn`'s own queue,
/// which this device does not use so that it can count what it drops).
pub const MAX_HELD: usize = 256;
/// How often the WireGuard timers run.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second from one source address before cookies are required.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Unconfirmed responder sessions remembered per peer (`Tunn` keeps 8 sessions).
const MAX_UNCONFIRMED: usize = 16;
/// A session is unusable this long after its handshake (WireGuard's REJECT_AFTER_TIME).
const REJECT_AFTER: Duration = Duration::from_secs(180);
/// At most one warning per reason in this period.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The UDP socket's receive and send buffers asked for, bytes.
const SOCKET_BUFFER: usize = 7 << 20;
/// Large enough for any UDP datagram and any IPv4 packet.
const BUF_LEN: usize = 65_536;

/// What the device needs to run on a TUN interface.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The persistent TUN interface, created and configured by the caller.
    pub tun_name: String,
    /// The UDP address WireGuard listens on.
    pub listen: SocketAddr,
    /// The node's WireGuard private key.
    pub private_key: PrivateKey,
}

/// One other node, as the agent decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The node.
    pub node: NodeId,
    /// Its WireGuard public key.
    pub public_key: PublicKey,
    /// Its WireGuard UDP address (where packets to it are sent; this device does not roam).
    pub endpoint: SocketAddr,
    /// Its pods' addresses: packets to them go to this peer, and packets from this peer are
    /// accepted only from them.
    pub allowed: BTreeSet<Ipv4Addr>,
}

/// A peer's tunnel state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelState {
    /// No pre-shared key yet: no tunnel can come up.
    NoKey,
    /// Keyed, but no session confirmed by both sides (a handshake is running or not needed
    /// yet).
    Handshaking,
    /// A session that both sides have confirmed is active.
    Up,
}

/// What [`Device::status`] reports per peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The node.
    pub node: NodeId,
    /// Its public key.
    pub public_key: PublicKey,
    /// Its UDP endpoint.
    pub endpoint: SocketAddr,
    /// Tunnel state.
    pub state: TunnelState,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    /// WireGuard bytes sent to it (since its public key last changed).
    pub tx_bytes: u64,
    /// WireGuard bytes received from it.
    pub rx_bytes: u64,
    /// Handshakes completed (confirmed by both sides).
    pub handshakes: u64,
    /// Pre-shared key rotations applied.
    pub rotations: u64,
}

/// The running device. A cheap handle: clones share the device.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", &self.inner.public_key)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

struct Inner {
    state: Mutex<State>,
    udp: UdpSocket,
    local_addr: SocketAddr,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    public_key: PublicKey,
    index_table: IndexTable,
    rate_limiter: Arc<RateLimiter>,
    metrics: TunnelMetrics,
    drops: DropLog,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    peers: BTreeMap<NodeId, Peer>,
    by_key: HashMap<[u8; 32], NodeId>,
    by_addr: HashMap<Ipv4Addr, NodeId>,
    /// Our session and handshake indices (the receiver index of what peers send us).
    by_idx: HashMap<u32, NodeId>,
}

struct Peer {
    public_key: PublicKey,
    endpoint: SocketAddr,
    /// The allowed set in force (the configured one less addresses two peers claimed).
    allowed: BTreeSet<Ipv4Addr>,
    tunn: Option<Box<Tunn>>,
    psk: Option<Psk>,
    held: VecDeque<Packet>,
    /// Sessions we answered as responder and have not yet seen a packet in.
    unconfirmed: VecDeque<u32>,
    confirmed_at: Option<Instant>,
    handshakes: u64,
    rotations: u64,
    tx_bytes: u64,
    rx_bytes: u64,
    seen_tx: usize,
    seen_rx: usize,
}

/// Datagrams to send: packet, destination, the peer (none for a cookie reply).
type Outgoing = Vec<(Packet, SocketAddr, Option<NodeId>)>;

impl Peer {
    fn new(config: &PeerConfig, allowed: BTreeSet<Ipv4Addr>) -> Peer {
        Peer {
            public_key: config.public_key,
            endpoint: config.endpoint,
            allowed,
            tunn: None,
            psk: None,
            held: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            confirmed_at: None,
            handshakes: 0,
            rotations: 0,
            tx_bytes: 0,
            rx_bytes: 0,
            seen_tx: 0,
            seen_rx: 0,
        }
    }

    /// Moves `Tunn`'s byte counts into ours and the metrics.
    fn sync_bytes(&mut self, metrics: &TunnelMetrics) {
        if let Some(tunn) = &self.tunn {
            let (_, tx, rx, _, _) = tunn.stats();
            let dtx = tx.saturating_sub(self.seen_tx) as u64;
            let drx = rx.saturating_sub(self.seen_rx) as u64;
            self.seen_tx = tx;
            self.seen_rx = rx;
            self.tx_bytes += dtx;
            self.rx_bytes += drx;
            metrics.add_bytes(Direction::Tx, dtx);
            metrics.add_bytes(Direction::Rx, drx);
        }
    }

    fn confirm(&mut self, node: NodeId, metrics: &TunnelMetrics, role: &'static str) {
        self.handshakes += 1;
        self.confirmed_at = Some(Instant::now());
        metrics.count_handshake();
        tracing::debug!(peer.node = %node, handshake.role = role, "tunnel handshake completed");
    }

    /// Encrypts held packets while there is a session.
    fn flush_held(&mut self, node: NodeId, out: &mut Outgoing) {
        let Some(tunn) = self.tunn.as_mut() else {
            return;
        };
        while let Some(packet) = self.held.pop_front() {
            match tunn.encapsulate_with_session(packet) {
                Ok(data) => out.push((data.into(), self.endpoint, Some(node))),
                Err(packet) => {
                    self.held.push_front(packet);
                    break;
                }
            }
        }
    }

    fn state(&self) -> TunnelState {
        match &self.tunn {
            None => TunnelState::NoKey,
            Some(tunn) => {
                let confirmed = self
                    .confirmed_at
                    .is_some_and(|t| t.elapsed() < REJECT_AFTER);
                if confirmed && tunn.time_since_last_handshake().is_some() {
                    TunnelState::Up
                } else {
                    TunnelState::Handshaking
                }
            }
        }
    }
}

/// Records our own index from an outgoing handshake message, so that the answer (and the data
/// of the session) finds this peer.
fn register_idx(by_idx: &mut HashMap<u32, NodeId>, packet: &WgKind, node: NodeId) {
    let idx = match packet {
        WgKind::HandshakeInit(p) => p.sender_idx.get(),
        WgKind::HandshakeResp(p) => p.sender_idx.get(),
        _ => return,
    };
    by_idx.insert(idx, node);
}

struct Incoming {
    to_udp: Outgoing,
    to_io: Option<(Packet, NodeId)>,
}

impl Device {
    /// Attaches to the persistent TUN `config.tun_name` (created and configured by the
    /// caller), binds `config.listen` and starts the device's tasks. Must be called inside a
    /// Tokio runtime. The device stops when `shutdown` turns true (or its sender is dropped).
    pub fn start(
        config: DeviceConfig,
        metrics: TunnelMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Device, TunnelError> {
        tokio::runtime::Handle::try_current().map_err(|_| TunnelError::NoRuntime)?;
        let io = TunIo::attach(&config.tun_name)?;
        let device =
            Device::start_with_io(io, config.listen, config.private_key, metrics, shutdown)?;
        tracing::info!(tun.name = %config.tun_name, udp.listen = %device.local_addr(),
            key.public = %device.public_key(), "tunnel device started");
        Ok(device)
    }

    /// Like [`Device::start`], with any [`PacketIo`] in place of the TUN (an in-memory one in
    /// tests).
    pub fn start_with_io<I: PacketIo>(
        io: I,
        listen: SocketAddr,
        private_key: PrivateKey,
        metrics: TunnelMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Device, TunnelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TunnelError::NoRuntime)?;
        let bind_err = |source| TunnelError::Bind {
            addr: listen,
            source,
        };
        let std_udp = std::net::UdpSocket::bind(listen).map_err(bind_err)?;
        std_udp.set_nonblocking(true).map_err(bind_err)?;
        // A burst of a fast sender outruns one receiving task: with the default ~208 KiB
        // buffer the kernel drops datagrams and TCP inside the tunnel backs off. As wireguard-go
        // does, ask for 7 MiB (beyond rmem_max as root; else what the limit allows).
        use rustix::net::sockopt as so;
        if so::set_socket_recv_buffer_size_force(&std_udp, SOCKET_BUFFER).is_err() {
            let _ = so::set_socket_recv_buffer_size(&std_udp, SOCKET_BUFFER);
        }
        if so::set_socket_send_buffer_size_force(&std_udp, SOCKET_BUFFER).is_err() {
            let _ = so::set_socket_send_buffer_size(&std_udp, SOCKET_BUFFER);
        }
        let udp = {
            let _guard = runtime.enter();
            UdpSocket::from_std(std_udp).map_err(bind_err)?
        };
        let local_addr = udp.local_addr().map_err(bind_err)?;

        let secret = private_key.secret().clone();
        let public = x25519::PublicKey::from(&secret);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            udp,
            local_addr,
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            public_key: private_key.public(),
            secret,
            public,
            index_table: IndexTable::from_os_rng(),
            metrics,
            drops: DropLog::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let io = Arc::new(io);
        let handles = vec![
            runtime.spawn(
                tun_to_udp(Arc::clone(&inner), Arc::clone(&io), shutdown.clone())
                    .instrument(tracing::info_span!("tunnel", task = "tun_to_udp")),
            ),
            runtime.spawn(
                udp_to_tun(Arc::clone(&inner), io, shutdown.clone())
                    .instrument(tracing::info_span!("tunnel", task = "udp_to_tun")),
            ),
            runtime.spawn(
                timers(Arc::clone(&inner), shutdown)
                    .instrument(tracing::info_span!("tunnel", task = "timers")),
            ),
        ];
        *lock(&inner.tasks) = handles;
        Ok(Device { inner })
    }

    /// The UDP address the device is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// The device's counters.
    pub fn metrics(&self) -> &TunnelMetrics {
        &self.inner.metrics
    }

    /// Waits until the device's tasks have ended (after `shutdown` turned true).
    pub async fn stopped(&self) {
        let handles = std::mem::take(&mut *lock(&self.inner.tasks));
        for handle in handles {
            if let Err(e) = handle.await {
                tracing::warn!(error = %e, "a tunnel task ended abnormally");
            }
        }
    }

    /// Replaces the peer set: adds, updates (endpoint, allowed set) and removes peers. A peer
    /// whose public key changed starts over, without a pre-shared key.
    ///
    /// Misconfigurations are skipped with a warning, never guessed at: a second peer with the
    /// same node keeps the last entry; a peer with another peer's public key (or ours) is left
    /// out; an address in two peers' allowed sets is routed to neither and accepted from
    /// neither.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let inner = &self.inner;
        // The same rules as the kernel device's: own key, a node named twice, a key used
        // twice, an address in two allowed sets (then in neither).
        let wanted = crate::kernel::sanitize_peers(inner.public_key, peers);
        let keys: HashMap<[u8; 32], NodeId> = wanted
            .iter()
            .map(|(node, p)| (*p.public_key.as_bytes(), *node))
            .collect();
        let owners: HashMap<Ipv4Addr, NodeId> = wanted
            .iter()
            .flat_map(|(node, p)| p.allowed.iter().map(move |a| (*a, *node)))
            .collect();

        let mut state = lock(&inner.state);
        let State { peers, by_idx, .. } = &mut *state;
        peers.retain(|node, peer| {
            let keep = wanted
                .get(node)
                .is_some_and(|w| w.public_key == peer.public_key);
            if !keep {
                let reason = if wanted.contains_key(node) {
                    DropReason::NoKey
                } else {
                    DropReason::NoPeer
                };
                for _ in peer.held.drain(..) {
                    inner.drop_packet(
                        reason,
                        Some(*node),
                        "held packet of a removed or re-keyed peer",
                    );
                }
                by_idx.retain(|_, n| n != node);
                tracing::info!(peer.node = %node, "tunnel peer removed or re-keyed");
            }
            keep
        });
        for (node, config) in &wanted {
            let allowed = config.allowed.clone();
            match peers.get_mut(node) {
                Some(peer) => {
                    peer.endpoint = config.endpoint;
                    peer.allowed = allowed;
                }
                None => {
                    tracing::info!(peer.node = %node, key.public = %config.public_key,
                        peer.endpoint = %config.endpoint, "tunnel peer added");
                    peers.insert(*node, Peer::new(config, allowed));
                }
            }
        }
        state.by_key = keys;
        state.by_addr = owners;
    }

    /// Sets the peer's pre-shared key. The first one creates the peer's tunnel; a later,
    /// different one is used from the next handshake on, and a handshake is started at once,
    /// while the established session keeps carrying traffic until the new one is up (so a
    /// rotation never interrupts flows). Setting the key the peer already has changes nothing.
    /// Returns false for an unknown peer.
    pub fn set_psk(&self, node: NodeId, psk: Psk) -> bool {
        let inner = &self.inner;
        let (packet, endpoint) = {
            let mut state = lock(&inner.state);
            let State { peers, by_idx, .. } = &mut *state;
            let Some(peer) = peers.get_mut(&node) else {
                return false;
            };
            if peer.psk.as_ref() == Some(&psk) {
                return true;
            }
            let packet = match peer.tunn.as_mut() {
                None => {
                    peer.tunn = Some(Box::new(Tunn::new(
                        inner.secret.clone(),
                        x25519::PublicKey::from(*peer.public_key.as_bytes()),
                        Some(psk.bytes()),
                        None,
                        inner.index_table.clone(),
                        Arc::clone(&inner.rate_limiter),
                    )));
                    tracing::info!(peer.node = %node, "tunnel keyed");
                    None
                }
                Some(tunn) => {
                    tunn.set_preshared_key(Some(psk.bytes()));
                    peer.rotations += 1;
                    inner.metrics.count_rotation();
                    tracing::info!(peer.node = %node, "tunnel pre-shared key rotated; handshaking");
                    tunn.format_handshake_initiation(true).map(WgKind::from)
                }
            };
            peer.psk = Some(psk);
            if let Some(p) = &packet {
                register_idx(by_idx, p, node);
            }
            peer.sync_bytes(&inner.metrics);
            (packet, peer.endpoint)
        };
        if let Some(packet) = packet {
            let packet = Packet::from(packet);
            // Not awaited (this is not async): a full socket buffer only delays the new key
            // until the timers retry the handshake.
            if let Err(e) = inner.udp.try_send_to(packet.as_ref(), endpoint) {
                tracing::debug!(peer.node = %node, error = %e, "could not send the rotation handshake now; the timers retry it");
            }
        }
        true
    }

    /// Per-peer state and counters, ordered by node.
    pub fn status(&self) -> Vec<PeerStatus> {
        let state = lock(&self.inner.state);
        state
            .peers
            .iter()
            .map(|(node, peer)| PeerStatus {
                node: *node,
                public_key: peer.public_key,
                endpoint: peer.endpoint,
                state: peer.state(),
                last_handshake: peer.confirmed_at.map(|t| t.elapsed()),
                tx_bytes: peer.tx_bytes,
                rx_bytes: peer.rx_bytes,
                handshakes: peer.handshakes,
                rotations: peer.rotations,
            })
            .collect()
    }
}

impl Inner {
    fn drop_packet(&self, reason: DropReason, node: Option<NodeId>, detail: &'static str) {
        self.metrics.count_drop(reason);
        self.drops.record(reason, node, detail);
    }

    /// A packet from the IO: route it to a peer and encrypt it, or hold it for a handshake.
    fn outgoing(&self, buf: &[u8]) -> Outgoing {
        let mut out = Vec::new();
        let ip = match parse_ipv4(buf) {
            Ok(ip) => ip,
            Err(bad) => {
                self.drop_packet(bad.reason(), None, bad.detail());
                return out;
            }
        };
        let mut state = lock(&self.state);
        let State {
            peers,
            by_addr,
            by_idx,
            ..
        } = &mut *state;
        let Some(node) = by_addr.get(&ip.dst).copied() else {
            self.drop_packet(
                DropReason::NoPeer,
                None,
                "destination is in no peer's allowed set",
            );
            return out;
        };
        let Some(peer) = peers.get_mut(&node) else {
            self.drop_packet(DropReason::NoPeer, Some(node), "destination's peer is gone");
            return out;
        };
        if peer.tunn.is_none() {
            self.drop_packet(
                DropReason::NoKey,
                Some(node),
                "the peer has no pre-shared key yet",
            );
            return out;
        }
        let packet = Packet::from_bytes(BytesMut::from(&buf[..ip.total_len]));
        peer.flush_held(node, &mut out);
        if peer.held.len() >= MAX_HELD {
            self.drop_packet(
                DropReason::QueueFull,
                Some(node),
                "too many packets held for a handshake",
            );
            return out;
        }
        peer.held.push_back(packet);
        peer.flush_held(node, &mut out);
        if !peer.held.is_empty()
            && let Some(tunn) = peer.tunn.as_mut()
            && let Some(init) = tunn.format_handshake_initiation(false)
        {
            let init = WgKind::from(init);
            register_idx(by_idx, &init, node);
            tracing::debug!(peer.node = %node, "tunnel handshake initiated for held traffic");
            out.push((init.into(), peer.endpoint, Some(node)));
        }
        peer.sync_bytes(&self.metrics);
        out
    }

    /// A datagram from the network.
    fn incoming(&self, buf: &[u8], from: SocketAddr) -> Incoming {
        let mut result = Incoming {
            to_udp: Vec::new(),
            to_io: None,
        };
        let packet = Packet::from_bytes(BytesMut::from(buf));
        let kind = match self.rate_limiter.verify_packet(from, packet) {
            Ok(kind) => kind,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                tracing::debug!(udp.from = %from, "handshake load: answered with a cookie");
                result.to_udp.push((cookie.into(), from, None));
                return result;
            }
            Err(_) => {
                self.drop_packet(
                    DropReason::Invalid,
                    None,
                    "not a WireGuard message, or a bad MAC",
                );
                return result;
            }
        };
        let mut state = lock(&self.state);
        let State {
            peers,
            by_key,
            by_idx,
            ..
        } = &mut *state;
        let node = match &kind {
            WgKind::HandshakeInit(p) => match parse_handshake_anon(&self.secret, &self.public, p) {
                Ok(half) => match by_key.get(&half.peer_static_public) {
                    Some(node) => *node,
                    None => {
                        self.drop_packet(
                            DropReason::UnknownSender,
                            None,
                            "handshake from a key that is no peer",
                        );
                        return result;
                    }
                },
                Err(_) => {
                    self.drop_packet(
                        DropReason::Invalid,
                        None,
                        "undecodable handshake initiation",
                    );
                    return result;
                }
            },
            WgKind::HandshakeResp(p) => match by_idx.get(&p.receiver_idx.get()) {
                Some(node) => *node,
                None => {
                    self.drop_packet(
                        DropReason::UnknownSender,
                        None,
                        "handshake response for no handshake of ours",
                    );
                    return result;
                }
            },
            WgKind::CookieReply(p) => match by_idx.get(&p.receiver_idx.get()) {
                Some(node) => *node,
                None => {
                    self.drop_packet(
                        DropReason::UnknownSender,
                        None,
                        "cookie reply for no handshake of ours",
                    );
                    return result;
                }
            },
            WgKind::Data(p) => match by_idx.get(&p.header.receiver_idx.get()) {
                Some(node) => *node,
                None => {
                    self.drop_packet(
                        DropReason::UnknownSender,
                        None,
                        "data for no session of ours",
                    );
                    return result;
                }
            },
        };
        let Some(peer) = peers.get_mut(&node) else {
            self.drop_packet(DropReason::UnknownSender, Some(node), "the peer is gone");
            return result;
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            self.drop_packet(
                DropReason::NoKey,
                Some(node),
                "the peer has no pre-shared key yet",
            );
            return result;
        };
        let is_response = matches!(kind, WgKind::HandshakeResp(_));
        let data_idx = match &kind {
            WgKind::Data(p) => Some(p.header.receiver_idx.get()),
            _ => None,
        };
        match tunn.handle_incoming_packet(kind) {
            TunnResult::Done => {}
            TunnResult::Err(e) => {
                self.drop_packet(DropReason::Invalid, Some(node), wg_error(&e));
            }
            TunnResult::WriteToNetwork(reply) => {
                register_idx(by_idx, &reply, node);
                if let WgKind::HandshakeResp(r) = &reply {
                    if peer.unconfirmed.len() >= MAX_UNCONFIRMED {
                        peer.unconfirmed.pop_front();
                    }
                    peer.unconfirmed.push_back(r.sender_idx.get());
                }
                if is_response {
                    peer.confirm(node, &self.metrics, "initiator");
                }
                result
                    .to_udp
                    .push((reply.into(), peer.endpoint, Some(node)));
                peer.flush_held(node, &mut result.to_udp);
            }
            TunnResult::WriteToTunnel(mut decrypted) => {
                if let Some(idx) = data_idx
                    && let Some(pos) = peer.unconfirmed.iter().position(|i| *i == idx)
                {
                    peer.unconfirmed.remove(pos);
                    peer.confirm(node, &self.metrics, "responder");
                }
                peer.flush_held(node, &mut result.to_udp);
                if !decrypted.as_ref().is_empty() {
                    match parse_ipv4(decrypted.as_ref()) {
                        Err(bad) => self.drop_packet(bad.reason(), Some(node), bad.detail()),
                        Ok(ip) if !peer.allowed.contains(&ip.src) => {
                            self.drop_packet(
                                DropReason::SourceNotPeerPod,
                                Some(node),
                                "decrypted packet's source is not one of this peer's pods",
                            );
                        }
                        Ok(ip) => {
                            // WireGuard may pad to 16 bytes: the IP length is the packet.
                            decrypted.truncate(ip.total_len);
                            result.to_io = Some((decrypted, node));
                        }
                    }
                }
            }
        }
        peer.sync_bytes(&self.metrics);
        result
    }

    /// One timer round: WireGuard timers of every peer, stale indices.
    fn tick(&self) -> Outgoing {
        let mut out = Vec::new();
        self.rate_limiter.try_reset_count();
        let mut state = lock(&self.state);
        let State { peers, by_idx, .. } = &mut *state;
        by_idx.retain(|idx, _| self.index_table.in_use(*idx));
        for (node, peer) in peers.iter_mut() {
            peer.unconfirmed.retain(|idx| self.index_table.in_use(*idx));
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            match tunn.update_timers() {
                Ok(Some(packet)) => {
                    register_idx(by_idx, &packet, *node);
                    out.push((packet.into(), peer.endpoint, Some(*node)));
                }
                Ok(None) => {}
                Err(WireGuardError::ConnectionExpired) => {
                    for _ in peer.held.drain(..) {
                        self.drop_packet(
                            DropReason::HandshakeTimeout,
                            Some(*node),
                            "held for a handshake that did not complete",
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(peer.node = %node, error = ?e, "tunnel timer error");
                }
            }
            peer.sync_bytes(&self.metrics);
        }
        out
    }

    async fn send_udp(&self, out: Outgoing) {
        for (packet, addr, node) in out {
            if let Err(e) = self.udp.send_to(packet.as_ref(), addr).await {
                tracing::debug!(peer.node = node.map(NodeId::get), udp.to = %addr, error = %e, "UDP send failed");
                self.drop_packet(DropReason::IoError, node, "UDP send failed");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent-enough maps; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves when `shutdown` is true or its sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Rate limit for warnings about IO errors inside a task.
struct WarnGate(Option<Instant>, u64);

impl WarnGate {
    fn warn(&mut self, what: &'static str, e: &io::Error) {
        let now = Instant::now();
        if self.0.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            tracing::warn!(error = %e, held_back = self.1, "{what}");
            self.0 = Some(now);
            self.1 = 0;
        } else {
            self.1 += 1;
            tracing::debug!(error = %e, "{what}");
        }
    }
}

async fn tun_to_udp<I: PacketIo>(
    inner: Arc<Inner>,
    io: Arc<I>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; BUF_LEN];
    let mut gate = WarnGate(None, 0);
    loop {
        let read = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            read = io.recv(&mut buf) => read,
        };
        match read {
            Ok(n) => {
                let out = inner.outgoing(&buf[..n.min(buf.len())]);
                inner.send_udp(out).await;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::warn!(error = %e, "the packet IO closed; the tunnel stops sending");
                break;
            }
            Err(e) => {
                gate.warn("reading from the packet IO failed", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracing::debug!("tunnel task stopped");
}

async fn udp_to_tun<I: PacketIo>(
    inner: Arc<Inner>,
    io: Arc<I>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; BUF_LEN];
    let mut gate = WarnGate(None, 0);
    loop {
        let read = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            read = inner.udp.recv_from(&mut buf) => read,
        };
        match read {
            Ok((n, from)) => {
                let Incoming { to_udp, to_io } = inner.incoming(&buf[..n.min(buf.len())], from);
                inner.send_udp(to_udp).await;
                if let Some((packet, node)) = to_io
                    && let Err(e) = io.send(packet.as_ref()).await
                {
                    if e.kind() == io::ErrorKind::WouldBlock {
                        inner.drop_packet(
                            DropReason::QueueFull,
                            Some(node),
                            "the packet IO queue is full",
                        );
                    } else {
                        tracing::debug!(peer.node = %node, error = %e, "packet IO write failed");
                        inner.drop_packet(
                            DropReason::IoError,
                            Some(node),
                            "packet IO write failed",
                        );
                    }
                }
            }
            Err(e) => {
                gate.warn("receiving from the UDP socket failed", &e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::debug!("tunnel task stopped");
}

async fn timers(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TIMER_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            _ = interval.tick() => {
                let out = inner.tick();
                inner.send_udp(out).await;
            }
        }
    }
    tracing::debug!("tunnel task stopped");
}

fn wg_error(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::InvalidMac => "bad MAC",
        WireGuardError::InvalidAeadTag => "failed authentication (wrong key or pre-shared key)",
        WireGuardError::WrongKey => "handshake from an unexpected static key",
        WireGuardError::InvalidTai64nTimestamp | WireGuardError::WrongTai64nTimestamp => {
            "replayed or stale handshake"
        }
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => {
            "replayed or too old data packet"
        }
        WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
            "data for an unknown or expired session"
        }
        WireGuardError::UnexpectedPacket => "unexpected handshake message",
        WireGuardError::ConnectionExpired => "session expired",
        _ => "malformed WireGuard message",
    }
}

/// One warning per reason per [`WARN_EVERY`], carrying the number held back; debug always.
#[derive(Default)]
struct DropLog {
    slots: Mutex<[WarnSlot; DropReason::ALL.len()]>,
}

#[derive(Default, Clone, Copy)]
struct WarnSlot {
    last: Option<Instant>,
    held_back: u64,
}

impl DropLog {
    /// Returns whether it warned (for tests).
    fn record(&self, reason: DropReason, node: Option<NodeId>, detail: &'static str) -> bool {
        let node = node.map(NodeId::get);
        tracing::debug!(drop.reason = %reason, peer.node = node, detail, "tunnel dropped a packet");
        let held_back = {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(reason.index()) else {
                return false;
            };
            let now = Instant::now();
            if slot
                .last
                .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
            {
                let held = slot.held_back;
                *slot = WarnSlot {
                    last: Some(now),
                    held_back: 0,
                };
                held
            } else {
                slot.held_back += 1;
                return false;
            }
        };
        tracing::warn!(drop.reason = %reason, peer.node = node, detail, held_back,
            "tunnel dropped a packet (one warning per reason per 10 s; held_back counts those since the last)");
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4Info {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    total_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadPacket {
    NotIpv4,
    Malformed,
}

impl BadPacket {
    fn reason(self) -> DropReason {
        match self {
            BadPacket::NotIpv4 => DropReason::Unsupported,
            BadPacket::Malformed => DropReason::Invalid,
        }
    }

    fn detail(self) -> &'static str {
        match self {
            BadPacket::NotIpv4 => "not an IPv4 packet",
            BadPacket::Malformed => "malformed IPv4 header",
        }
    }
}

/// The addresses and length of an IPv4 packet, with the header's lengths checked.
fn parse_ipv4(p: &[u8]) -> Result<Ipv4Info, BadPacket> {
    let first = *p.first().ok_or(BadPacket::Malformed)?;
    if first >> 4 != 4 {
        return Err(BadPacket::NotIpv4);
    }
    let h: &[u8; 20] = p
        .get(..20)
        .and_then(|h| h.try_into().ok())
        .ok_or(BadPacket::Malformed)?;
    let header_len = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if header_len < 20 || total_len < header_len || total_len > p.len() {
        return Err(BadPacket::Malformed);
    }
    Ok(Ipv4Info {
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        total_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(total_len: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total_len.to_be_bytes());
        p[12..16].copy_from_slice(&[10, 200, 1, 5]);
        p[16..20].copy_from_slice(&[10, 200, 2, 5]);
        p
    }

    #[test]
    fn parses_ipv4_and_checks_lengths() {
        let p = header(28);
        assert_eq!(
            parse_ipv4(&p),
            Ok(Ipv4Info {
                src: Ipv4Addr::new(10, 200, 1, 5),
                dst: Ipv4Addr::new(10, 200, 2, 5),
                total_len: 28
            })
        );
        // Padding after the IP length is allowed (and cut off by the caller).
        assert_eq!(parse_ipv4(&header(24)).map(|i| i.total_len), Ok(24));
        assert_eq!(parse_ipv4(&header(29)), Err(BadPacket::Malformed));
        assert_eq!(parse_ipv4(&header(19)), Err(BadPacket::Malformed));
        assert_eq!(parse_ipv4(&p[..12]), Err(BadPacket::Malformed));
        assert_eq!(parse_ipv4(&[]), Err(BadPacket::Malformed));
        let mut ihl = header(28);
        ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&ihl), Err(BadPacket::Malformed));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(BadPacket::NotIpv4));
    }

    #[test]
    fn drop_log_warns_once_per_period_per_reason() {
        let log = DropLog::default();
        assert!(log.record(DropReason::NoPeer, None, "x"));
        for _ in 0..100 {
            assert!(!log.record(DropReason::NoPeer, None, "x"));
        }
        // Another reason has its own budget.
        assert!(log.record(DropReason::Invalid, None, "x"));
        let slots = lock(&log.slots);
        assert_eq!(slots[DropReason::NoPeer.index()].held_back, 100);
    }
}
