//! The kernel's WireGuard, configured over netlink: where the kernel has WireGuard, the node's
//! tunnel is a `wireguard` link and this module is its control plane; the kernel does the
//! data plane (and cryptokey routing) itself.
//!
//! Same contract as the userspace [`Device`](crate::Device):
//! - [`KernelDevice::set_peers`] replaces the peer set. A peer is *recorded* at once but put
//!   into the kernel only with its first pre-shared key ([`KernelDevice::set_psk`]): a kernel
//!   peer would otherwise handshake without the key the agent derived. Until then it is
//!   [`TunnelState::NoKey`], and packets routed to its pods find no kernel peer and are
//!   dropped by the kernel (never sent in the clear). A peer whose public key changed is
//!   removed from the kernel and starts over unkeyed.
//! - [`KernelDevice::set_psk`] adds the peer (pre-shared key, endpoint, one /32 allowed IP per
//!   pod, in one request) the first time, and later only replaces its pre-shared key. The
//!   kernel has no way to start a handshake on request: it mixes the new key into its next
//!   handshake (at the latest after REKEY_AFTER_TIME, 120 s, of a session), while the current
//!   session carries traffic on.
//! - [`KernelDevice::status`] reads the kernel's peers (a `GET_DEVICE` dump): last handshake,
//!   bytes, and puts back what someone changed behind the agent's back (a peer removed or
//!   added, a pre-shared key changed, allowed IPs widened).
//!
//! # Metrics
//!
//! The kernel counts per peer (bytes) and per link (errors), not per drop reason. On each
//! [`KernelDevice::status`] the byte counters' increase goes into `tunnel_bytes`, a changed
//! last-handshake time counts a handshake, and the link's `rx_frame_errors` increase counts as
//! `source_not_peer_pod` drops: the kernel gives no finer reason (see the comment in
//! [`KernelDevice::status`]). Other kernel drops (such as packets to a pod of a peer without
//! a pre-shared key, which the kernel counts in the link's `tx_errors` with those to no peer
//! at all) are not counted by reason.
//!
//! Every call is a few blocking netlink system calls under one lock; the kernel answers while
//! it handles the request, so they do not wait on the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use meshauth_policy::NodeId;
use netlink_packet_core::{Emitable as _, NLM_F_DUMP};
use netlink_packet_route::link::InfoKind;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

use crate::TunnelError;
use crate::device::{PeerConfig, PeerStatus, TunnelState};
use crate::keys::{PrivateKey, Psk, PublicKey};
use crate::metrics::{Direction, DropReason, TunnelMetrics};
use crate::netlink::{self, LinkFacts, NlSocket, WG_FAMILY};

/// A session is unusable this long after its handshake (WireGuard's REJECT_AFTER_TIME): a
/// peer whose last handshake is older is not up.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Allowed IPs in one peer entry of a request (a peer with more takes several entries).
const ALLOWED_IPS_PER_ENTRY: usize = 512;
/// Largest WireGuard request sent at once (a larger configuration takes several requests,
/// as `wg` does); the kernel takes far more, this keeps each one small.
const MAX_MESSAGE: usize = 32 * 1024;
/// At most one warning about failed status reads in this period.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The kernel's WireGuard link, configured over netlink. A cheap handle: clones share it.
///
/// The link and its configuration belong to the kernel and outlive this handle (as the
/// persistent TUN of the userspace device does): while no agent runs, the kernel keeps
/// carrying traffic with the keys it has. [`KernelDevice::start`] takes over an existing link
/// and clears its peers; [`KernelDevice::delete`] removes it.
#[derive(Clone)]
pub struct KernelDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("name", &self.inner.name)
            .field("index", &self.inner.index)
            .field("listen_port", &self.inner.listen_port)
            .field("public_key", &self.inner.public_key)
            .finish_non_exhaustive()
    }
}

struct Inner {
    name: String,
    index: u32,
    family: u16,
    listen_port: u16,
    public_key: PublicKey,
    metrics: TunnelMetrics,
    state: Mutex<State>,
}

struct State {
    genl: NlSocket,
    route: NlSocket,
    peers: BTreeMap<NodeId, KernelPeer>,
    /// The link's `rx_frame_errors` when last read.
    frame_errors: u64,
    /// A request failed: the kernel may differ from `peers` until put back.
    resync: bool,
    last_warning: Option<Instant>,
}

/// One peer as this device keeps it.
#[derive(Debug, Clone)]
pub(crate) struct KernelPeer {
    /// The configuration in force (allowed set less addresses two peers claimed).
    pub(crate) config: PeerConfig,
    /// The pre-shared key; `Some` exactly when the peer is in the kernel.
    pub(crate) psk: Option<Psk>,
    rotations: u64,
    handshakes: u64,
    /// The kernel's last handshake time, as last read.
    last_handshake: Option<SystemTime>,
    /// The kernel's byte counters, as last read.
    tx_bytes: u64,
    rx_bytes: u64,
}

impl KernelPeer {
    pub(crate) fn new(config: PeerConfig) -> KernelPeer {
        KernelPeer {
            config,
            psk: None,
            rotations: 0,
            handshakes: 0,
            last_handshake: None,
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }

    fn add_op(&self, psk: Psk) -> PeerOp {
        PeerOp::Add {
            public_key: self.config.public_key,
            psk,
            endpoint: self.config.endpoint,
            allowed: self.config.allowed.clone(),
        }
    }
}

/// One change to the kernel's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerOp {
    /// Remove the peer.
    Remove {
        /// Its public key.
        public_key: PublicKey,
    },
    /// A peer already in the kernel: new endpoint, allowed IPs replaced; its pre-shared key
    /// kept. Never creates a peer.
    Update {
        /// Its public key.
        public_key: PublicKey,
        /// Its endpoint.
        endpoint: SocketAddr,
        /// All its allowed addresses (each a /32).
        allowed: BTreeSet<Ipv4Addr>,
    },
    /// Add the peer (or, if it is there, set all of it): pre-shared key, endpoint, allowed
    /// IPs replaced.
    Add {
        /// Its public key.
        public_key: PublicKey,
        /// Its pre-shared key.
        psk: Psk,
        /// Its endpoint.
        endpoint: SocketAddr,
        /// All its allowed addresses (each a /32).
        allowed: BTreeSet<Ipv4Addr>,
    },
    /// A peer already in the kernel: a new pre-shared key, nothing else. Never creates a peer.
    SetPsk {
        /// Its public key.
        public_key: PublicKey,
        /// The new key.
        psk: Psk,
    },
}

/// The peer list as the agent gave it, less misconfigurations (the same rules as the userspace
/// device): a peer with this node's own key is left out; a node named twice keeps the last
/// entry; a second peer with an already used public key is left out; an address in two
/// peers' allowed sets is in neither.
pub(crate) fn sanitize_peers(
    own: PublicKey,
    peers: Vec<PeerConfig>,
) -> BTreeMap<NodeId, PeerConfig> {
    let mut wanted: BTreeMap<NodeId, PeerConfig> = BTreeMap::new();
    for peer in peers {
        if peer.public_key == own {
            tracing::warn!(peer.node = %peer.node, "a tunnel peer has this node's own public key; left out");
            continue;
        }
        let node = peer.node;
        if wanted.insert(node, peer).is_some() {
            tracing::warn!(peer.node = %node, "the tunnel peer list names a node twice; the last entry is used");
        }
    }
    let mut keys: HashMap<PublicKey, NodeId> = HashMap::new();
    wanted.retain(|node, peer| match keys.get(&peer.public_key) {
        Some(first) => {
            tracing::warn!(peer.node = %node, peer.other = %first, key.public = %peer.public_key,
                "two tunnel peers have the same public key; the second is left out");
            false
        }
        None => {
            keys.insert(peer.public_key, *node);
            true
        }
    });
    let mut owners: HashMap<Ipv4Addr, NodeId> = HashMap::new();
    let mut conflicts: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (node, peer) in &wanted {
        for addr in &peer.allowed {
            if let Some(other) = owners.insert(*addr, *node) {
                tracing::warn!(pod.addr = %addr, peer.node = %node, peer.other = %other,
                    "an address is in two tunnel peers' allowed sets; routed to neither");
                conflicts.insert(*addr);
            }
        }
    }
    for peer in wanted.values_mut() {
        peer.allowed.retain(|a| !conflicts.contains(a));
    }
    wanted
}

/// The kernel changes that take the peers from `current` to `wanted` (both sanitized):
/// removals first (peers gone, and peers whose public key changed: they start over without a
/// pre-shared key), then updates of keyed peers whose endpoint or allowed set changed. Peers
/// without a pre-shared key are not in the kernel: adding, changing or removing them needs
/// no request.
pub(crate) fn diff_peers(
    current: &BTreeMap<NodeId, KernelPeer>,
    wanted: &BTreeMap<NodeId, PeerConfig>,
) -> Vec<PeerOp> {
    let mut removals = Vec::new();
    let mut updates = Vec::new();
    for (node, peer) in current {
        if peer.psk.is_none() {
            continue;
        }
        match wanted.get(node) {
            Some(w) if w.public_key == peer.config.public_key => {
                if w.endpoint != peer.config.endpoint || w.allowed != peer.config.allowed {
                    updates.push(PeerOp::Update {
                        public_key: w.public_key,
                        endpoint: w.endpoint,
                        allowed: w.allowed.clone(),
                    });
                }
            }
            _ => removals.push(PeerOp::Remove {
                public_key: peer.config.public_key,
            }),
        }
    }
    removals.extend(updates);
    removals
}

/// The state of a keyed peer whose last handshake completed `age` ago (`None`: never).
pub(crate) fn state_from_handshake(age: Option<Duration>) -> TunnelState {
    match age {
        Some(age) if age < REJECT_AFTER => TunnelState::Up,
        _ => TunnelState::Handshaking,
    }
}

/// How much a kernel counter grew since `seen`. A counter below what was seen restarted (its
/// peer or link was made anew): all of it is new.
pub(crate) fn counter_increase(seen: u64, now: u64) -> u64 {
    if now >= seen { now - seen } else { now }
}

fn allowed_ip(addr: Ipv4Addr) -> WireguardAllowedIp {
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
        WireguardAllowedIpAttr::IpAddr(IpAddr::V4(addr)),
        WireguardAllowedIpAttr::Cidr(32),
    ])
}

/// The peer entries of one operation: the first carries everything; a peer with more than
/// `ips_per_entry` allowed IPs continues in entries that only append allowed IPs.
fn peer_entries(op: &PeerOp, ips_per_entry: usize) -> Vec<WireguardPeer> {
    let ips_per_entry = ips_per_entry.max(1);
    let continued = |public_key: &PublicKey, chunk: &[Ipv4Addr]| {
        WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*public_key.as_bytes()),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
            WireguardPeerAttribute::AllowedIps(chunk.iter().copied().map(allowed_ip).collect()),
        ])
    };
    match op {
        PeerOp::Remove { public_key } => vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*public_key.as_bytes()),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])],
        PeerOp::SetPsk { public_key, psk } => vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*public_key.as_bytes()),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
            WireguardPeerAttribute::PresharedKey(psk.bytes()),
        ])],
        PeerOp::Update {
            public_key,
            endpoint,
            allowed,
        }
        | PeerOp::Add {
            public_key,
            endpoint,
            allowed,
            ..
        } => {
            let addrs: Vec<Ipv4Addr> = allowed.iter().copied().collect();
            let mut chunks = addrs.chunks(ips_per_entry);
            let first = chunks.next().unwrap_or(&[]);
            let mut attrs = vec![WireguardPeerAttribute::PublicKey(*public_key.as_bytes())];
            match op {
                PeerOp::Add { psk, .. } => {
                    attrs.push(WireguardPeerAttribute::Flags(
                        WireguardPeerFlags::ReplaceAllowedIps,
                    ));
                    attrs.push(WireguardPeerAttribute::PresharedKey(psk.bytes()));
                }
                _ => attrs.push(WireguardPeerAttribute::Flags(
                    WireguardPeerFlags::ReplaceAllowedIps | WireguardPeerFlags::UpdateOnly,
                )),
            }
            attrs.push(WireguardPeerAttribute::Endpoint(*endpoint));
            attrs.push(WireguardPeerAttribute::AllowedIps(
                first.iter().copied().map(allowed_ip).collect(),
            ));
            let mut entries = vec![WireguardPeer(attrs)];
            entries.extend(chunks.map(|chunk| continued(public_key, chunk)));
            entries
        }
    }
}

fn set_device(index: u32, flags: Option<WireguardDeviceFlags>) -> WireguardMessage {
    let mut attributes = vec![WireguardAttribute::IfIndex(index)];
    if let Some(flags) = flags {
        attributes.push(WireguardAttribute::Flags(flags));
    }
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    }
}

/// The `SET_DEVICE` requests that apply `ops` to the link `index`, in order, each at most
/// `max_len` bytes of attributes (one peer entry larger than that still goes, alone).
pub(crate) fn build_set_messages(
    index: u32,
    ops: &[PeerOp],
    ips_per_entry: usize,
    max_len: usize,
) -> Vec<WireguardMessage> {
    let mut messages = Vec::new();
    let mut peers: Vec<WireguardPeer> = Vec::new();
    let base = set_device(index, None).attributes.as_slice().buffer_len()
        + WireguardAttribute::Peers(Vec::new()).buffer_len();
    let mut len = base;
    let flush = |peers: &mut Vec<WireguardPeer>, messages: &mut Vec<WireguardMessage>| {
        if !peers.is_empty() {
            let mut message = set_device(index, None);
            message
                .attributes
                .push(WireguardAttribute::Peers(std::mem::take(peers)));
            messages.push(message);
        }
    };
    for entry in ops.iter().flat_map(|op| peer_entries(op, ips_per_entry)) {
        let entry_len = entry.buffer_len();
        if !peers.is_empty() && len + entry_len > max_len {
            flush(&mut peers, &mut messages);
            len = base;
        }
        len += entry_len;
        peers.push(entry);
    }
    flush(&mut peers, &mut messages);
    messages
}

/// The first request to a link: the node's private key and the listen port; every peer
/// removed (a previous agent's peers carry keys this one does not know).
pub(crate) fn build_start_message(
    index: u32,
    private_key: &PrivateKey,
    listen_port: u16,
) -> WireguardMessage {
    let mut message = set_device(index, Some(WireguardDeviceFlags::ReplacePeers));
    message.attributes.extend([
        WireguardAttribute::PrivateKey(private_key.secret().to_bytes()),
        WireguardAttribute::ListenPort(listen_port),
    ]);
    message
}

/// The `GET_DEVICE` dump request of the link `index`.
pub(crate) fn build_get_message(index: u32) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfIndex(index)],
    }
}

/// One peer as a `GET_DEVICE` dump shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DumpedPeer {
    /// The pre-shared key (`None` when unset: the kernel shows zeros).
    pub(crate) psk: Option<Psk>,
    /// When its last handshake completed (the kernel's wall clock).
    pub(crate) last_handshake: Option<SystemTime>,
    /// Bytes received from it.
    pub(crate) rx_bytes: u64,
    /// Bytes sent to it.
    pub(crate) tx_bytes: u64,
    /// Its allowed IPs.
    pub(crate) allowed: BTreeSet<(IpAddr, u8)>,
}

/// The peers of a `GET_DEVICE` dump, by public key. A peer with many allowed IPs comes in
/// several entries (the first with its counters, the next ones with more allowed IPs): they are
/// merged.
pub(crate) fn parse_dump(messages: &[WireguardMessage]) -> BTreeMap<PublicKey, DumpedPeer> {
    let mut peers: BTreeMap<PublicKey, DumpedPeer> = BTreeMap::new();
    let entries = messages
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            WireguardAttribute::Peers(p) => Some(p),
            _ => None,
        })
        .flatten();
    for entry in entries {
        let Some(key) = entry.iter().find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(k) => Some(PublicKey::from_bytes(*k)),
            _ => None,
        }) else {
            continue;
        };
        let peer = peers.entry(key).or_default();
        for attribute in entry.iter() {
            match attribute {
                WireguardPeerAttribute::PresharedKey(k) => {
                    peer.psk = (*k != [0; 32]).then(|| Psk::from_bytes(*k));
                }
                WireguardPeerAttribute::LastHandshake(t) => {
                    peer.last_handshake = handshake_time(t.seconds, t.nano_seconds);
                }
                WireguardPeerAttribute::RxBytes(n) => peer.rx_bytes = *n,
                WireguardPeerAttribute::TxBytes(n) => peer.tx_bytes = *n,
                WireguardPeerAttribute::AllowedIps(ips) => {
                    for ip in ips {
                        let addr = ip.iter().find_map(|a| match a {
                            WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                            _ => None,
                        });
                        let cidr = ip.iter().find_map(|a| match a {
                            WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                            _ => None,
                        });
                        if let (Some(addr), Some(cidr)) = (addr, cidr) {
                            peer.allowed.insert((addr, cidr));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    peers
}

/// Whether the kernel has exactly the keyed peers of `peers`, each with its pre-shared key
/// and exactly its allowed addresses (each a /32): nobody added a peer, removed one, changed
/// a key or widened what a peer may send from.
pub(crate) fn kernel_matches(
    peers: &BTreeMap<NodeId, KernelPeer>,
    dumped: &BTreeMap<PublicKey, DumpedPeer>,
) -> bool {
    let keyed: Vec<(&KernelPeer, &Psk)> = peers
        .values()
        .filter_map(|p| p.psk.as_ref().map(|psk| (p, psk)))
        .collect();
    keyed.len() == dumped.len()
        && keyed.iter().all(|(peer, psk)| {
            dumped.get(&peer.config.public_key).is_some_and(|d| {
                d.psk.as_ref() == Some(*psk)
                    && d.allowed.len() == peer.config.allowed.len()
                    && peer
                        .config
                        .allowed
                        .iter()
                        .all(|a| d.allowed.contains(&(IpAddr::V4(*a), 32)))
            })
        })
}

/// The kernel's last-handshake timespec as a time; zero means never.
fn handshake_time(seconds: i64, nanos: i64) -> Option<SystemTime> {
    if seconds <= 0 && nanos <= 0 {
        return None;
    }
    let secs = u64::try_from(seconds).unwrap_or(0);
    let nanos = u32::try_from(nanos.clamp(0, 999_999_999)).unwrap_or(0);
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Whether the kernel takes `name` as a link name (`dev_valid_name`).
pub(crate) fn valid_link_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

/// What to check when a netlink request fails with `e`.
fn check_for(e: &io::Error, listen_port: u16) -> String {
    if e.kind() == io::ErrorKind::InvalidInput {
        return "check the tunnel interface name in the agent's settings".to_owned();
    }
    match e.raw_os_error() {
        Some(1 | 13) => {
            "check that the agent runs with CAP_NET_ADMIN in this network namespace".to_owned()
        }
        Some(98) => format!(
            "check that no other process or WireGuard link uses UDP port {listen_port} (ss -ulpn)"
        ),
        Some(19) => "check that nothing deleted the link (ip link show)".to_owned(),
        _ => "check the kernel log (dmesg) and that the agent has CAP_NET_ADMIN in this network namespace".to_owned(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves the kernel's `wireguard` generic-netlink family (loading its module where it can).
/// `ENOENT` is no WireGuard in this kernel.
pub(crate) fn resolve_wireguard(genl: &mut NlSocket) -> Result<u16, TunnelError> {
    netlink::resolve_family(genl, WG_FAMILY).map_err(|e| match e.raw_os_error() {
        Some(2) => TunnelError::KernelUnavailable {
            detail: "it has no `wireguard` generic netlink family: CONFIG_WIREGUARD is unset, or the module is not installed".to_owned(),
        },
        _ => TunnelError::KernelUnavailable {
            detail: format!("cannot ask it for its `wireguard` generic netlink family: {e}"),
        },
    })
}

impl KernelDevice {
    /// Takes the WireGuard link `name` in the calling thread's network namespace, creating it
    /// if there is none, and configures it: the node's private key, `listen_port` (on every
    /// address), no peers (those of a previous agent are removed), up. The link's MTU is the
    /// kernel's default for WireGuard (1420); addresses and routes are the caller's.
    ///
    /// Fails with [`TunnelError::KernelUnavailable`] where the kernel has no WireGuard (then
    /// nothing was created: use the userspace [`Device`](crate::Device)), with
    /// [`TunnelError::NotWireguard`] when `name` is another kind of link (such as the
    /// userspace device's TUN), and with [`TunnelError::Netlink`] when the kernel refuses a
    /// request.
    pub fn start(
        name: &str,
        listen_port: u16,
        private_key: PrivateKey,
        metrics: TunnelMetrics,
    ) -> Result<KernelDevice, TunnelError> {
        let netlink_err = |what: &str, source: io::Error| TunnelError::Netlink {
            name: name.to_owned(),
            what: what.to_owned(),
            check: check_for(&source, listen_port),
            source,
        };
        if !valid_link_name(name) {
            return Err(netlink_err(
                "use the name",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a link name is 1 to 15 bytes, not `.` or `..`, without '/', ':' or spaces",
                ),
            ));
        }
        let mut genl =
            NlSocket::generic().map_err(|e| netlink_err("open a generic netlink socket", e))?;
        // First: without WireGuard in the kernel, nothing is created.
        let family = resolve_wireguard(&mut genl)?;
        let mut route =
            NlSocket::route().map_err(|e| netlink_err("open a route netlink socket", e))?;
        let facts = match netlink::get_link(&mut route, name, 0) {
            Ok(facts) => facts,
            Err(e) if e.raw_os_error() == Some(19) => {
                match netlink::create_wireguard_link(&mut route, name) {
                    Ok(()) => tracing::info!(link.name = name, "created the kernel WireGuard link"),
                    // Made meanwhile by someone else: checked below like any existing link.
                    Err(e) if e.raw_os_error() == Some(17) => {}
                    Err(e) if e.raw_os_error() == Some(95) => {
                        return Err(TunnelError::KernelUnavailable {
                            detail: "it does not know the link kind `wireguard`".to_owned(),
                        });
                    }
                    Err(e) => return Err(netlink_err("create the link", e)),
                }
                netlink::get_link(&mut route, name, 0)
                    .map_err(|e| netlink_err("read the new link", e))?
            }
            Err(e) => return Err(netlink_err("read the link", e)),
        };
        if facts.kind != Some(InfoKind::Wireguard) {
            return Err(TunnelError::NotWireguard {
                name: name.to_owned(),
                kind: facts
                    .kind
                    .map_or_else(|| "none".to_owned(), |k| k.to_string()),
            });
        }
        let index = facts.index;
        netlink::wg_request(
            &mut genl,
            family,
            build_start_message(index, &private_key, listen_port),
            0,
        )
        .map_err(|e| netlink_err("set the private key and the listen port", e))?;
        netlink::set_link_up(&mut route, index).map_err(|e| netlink_err("set the link up", e))?;
        // Drops counted before this agent are not its to report.
        let frame_errors = netlink::get_link(&mut route, "", index)
            .ok()
            .and_then(|f| f.stats)
            .map_or(0, |s| s.rx_frame_errors);
        let public_key = private_key.public();
        tracing::info!(link.name = name, link.index = index, udp.port = listen_port,
            key.public = %public_key, "kernel WireGuard device started");
        Ok(KernelDevice {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                index,
                family,
                listen_port,
                public_key,
                metrics,
                state: Mutex::new(State {
                    genl,
                    route,
                    peers: BTreeMap::new(),
                    frame_errors,
                    resync: false,
                    last_warning: None,
                }),
            }),
        })
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The link's interface index.
    pub fn index(&self) -> u32 {
        self.inner.index
    }

    /// The UDP port the kernel listens on.
    pub fn listen_port(&self) -> u16 {
        self.inner.listen_port
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// The device's counters.
    pub fn metrics(&self) -> &TunnelMetrics {
        &self.inner.metrics
    }

    /// Replaces the peer set: adds, updates (endpoint, allowed set) and removes peers. A peer
    /// whose public key changed is removed from the kernel and starts over without a
    /// pre-shared key. New peers go into the kernel only with their first pre-shared key.
    ///
    /// Misconfigurations are skipped with a warning, as the userspace device does: a second
    /// peer with the same node keeps the last entry; a peer with another peer's public key (or
    /// ours) is left out; an address in two peers' allowed sets is in neither.
    ///
    /// A request the kernel refuses is logged, and the kernel is put back in line with this
    /// peer set on the next call (of any method).
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let wanted = sanitize_peers(self.inner.public_key, peers);
        let mut state = lock(&self.inner.state);
        self.resync_if_needed(&mut state);
        let ops = diff_peers(&state.peers, &wanted);
        if let Err(e) = self.apply(&mut state, &ops) {
            tracing::error!(error = %e, "cannot update the kernel WireGuard peers; retried on the next call");
            state.resync = true;
        }
        state.peers.retain(|node, peer| {
            let keep = wanted
                .get(node)
                .is_some_and(|w| w.public_key == peer.config.public_key);
            if !keep {
                tracing::info!(peer.node = %node, "tunnel peer removed or re-keyed");
            }
            keep
        });
        for (node, config) in wanted {
            match state.peers.get_mut(&node) {
                Some(peer) => peer.config = config,
                None => {
                    tracing::info!(peer.node = %node, key.public = %config.public_key,
                        peer.endpoint = %config.endpoint, "tunnel peer added (not in the kernel until its pre-shared key)");
                    state.peers.insert(node, KernelPeer::new(config));
                }
            }
        }
    }

    /// Sets the peer's pre-shared key. The first one puts the peer into the kernel (with its
    /// endpoint and allowed IPs, in the same request); a later, different one replaces the
    /// kernel's key, which the kernel mixes into its next handshake while the current session
    /// carries traffic on (counted as a rotation). Setting the key the peer already has
    /// changes nothing. Returns false for an unknown peer, and when the kernel refuses the
    /// request (logged; the key is then not in force).
    pub fn set_psk(&self, node: NodeId, psk: Psk) -> bool {
        let mut state = lock(&self.inner.state);
        self.resync_if_needed(&mut state);
        let Some(peer) = state.peers.get(&node) else {
            return false;
        };
        if peer.psk.as_ref() == Some(&psk) {
            return true;
        }
        let rotation = peer.psk.is_some();
        let op = if rotation {
            PeerOp::SetPsk {
                public_key: peer.config.public_key,
                psk: psk.clone(),
            }
        } else {
            peer.add_op(psk.clone())
        };
        match self.apply(&mut state, &[op]) {
            Ok(()) => {
                if let Some(peer) = state.peers.get_mut(&node) {
                    peer.psk = Some(psk);
                    if rotation {
                        peer.rotations += 1;
                        self.inner.metrics.count_rotation();
                        tracing::info!(peer.node = %node, "tunnel pre-shared key rotated (the kernel uses it from its next handshake)");
                    } else {
                        tracing::info!(peer.node = %node, "tunnel keyed: peer added to the kernel");
                    }
                }
                true
            }
            Err(e) => {
                tracing::error!(peer.node = %node, error = %e, "cannot set the pre-shared key in the kernel");
                state.resync = true;
                false
            }
        }
    }

    /// Per-peer state and counters, ordered by node, from the kernel (a `GET_DEVICE` dump):
    /// [`TunnelState::NoKey`] for peers without a pre-shared key (not in the kernel),
    /// [`TunnelState::Up`] when a handshake completed within [`REJECT_AFTER`], else
    /// [`TunnelState::Handshaking`]. Bytes are the kernel's since the peer was added.
    /// `handshakes` counts the changes of the kernel's last-handshake time this device saw
    /// (the kernel keeps no count).
    ///
    /// Also moves the kernel's counters into the metrics, and puts back kernel peers that
    /// someone changed behind the agent's back. When the kernel cannot be read, the last
    /// values read are shown (warned at most every 10 s).
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut state = lock(&self.inner.state);
        self.resync_if_needed(&mut state);
        match self.dump(&mut state) {
            Ok(dumped) => {
                self.absorb(&mut state, &dumped);
                if !kernel_matches(&state.peers, &dumped) {
                    tracing::warn!(link.name = %self.inner.name,
                        "the kernel WireGuard peers were changed outside the agent; putting them back");
                    if let Err(e) = self.resync(&mut state) {
                        tracing::error!(error = %e, "cannot put the kernel WireGuard peers back; retried on the next call");
                        state.resync = true;
                    }
                }
            }
            Err(e) => self.warn_gated(&mut state, &e),
        }
        match netlink::get_link(&mut state.route, "", self.inner.index) {
            Ok(LinkFacts {
                stats: Some(stats), ..
            }) => {
                // The kernel counts cryptokey-routing drops per link, with no finer reason:
                // drivers/net/wireguard/receive.c (wg_packet_consume_data_done) increments
                // rx_errors and rx_frame_errors when a decrypted packet's source address is not
                // in the allowed IPs of the peer that sent it ("Packet has unallowed src IP"),
                // and otherwise only when the decrypted packet is neither IPv4 nor IPv6. Both
                // are a peer sending what it must not through its tunnel, so every increase
                // counts as source_not_peer_pod.
                let seen = std::mem::replace(&mut state.frame_errors, stats.rx_frame_errors);
                for _ in 0..counter_increase(seen, stats.rx_frame_errors) {
                    self.inner.metrics.count_drop(DropReason::SourceNotPeerPod);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let e = self.netlink_error("read the link's counters", e);
                self.warn_gated(&mut state, &e);
            }
        }
        let now = SystemTime::now();
        state
            .peers
            .iter()
            .map(|(node, peer)| {
                let age = peer
                    .last_handshake
                    .map(|t| now.duration_since(t).unwrap_or_default());
                PeerStatus {
                    node: *node,
                    public_key: peer.config.public_key,
                    endpoint: peer.config.endpoint,
                    state: if peer.psk.is_some() {
                        state_from_handshake(age)
                    } else {
                        TunnelState::NoKey
                    },
                    last_handshake: age,
                    tx_bytes: peer.tx_bytes,
                    rx_bytes: peer.rx_bytes,
                    handshakes: peer.handshakes,
                    rotations: peer.rotations,
                }
            })
            .collect()
    }

    /// Deletes the link (and with it the kernel's peers and keys).
    pub fn delete(&self) -> Result<(), TunnelError> {
        let mut state = lock(&self.inner.state);
        netlink::delete_link(&mut state.route, self.inner.index)
            .map_err(|e| self.netlink_error("delete the link", e))?;
        state.peers.clear();
        tracing::info!(link.name = %self.inner.name, "kernel WireGuard link deleted");
        Ok(())
    }

    fn netlink_error(&self, what: &str, source: io::Error) -> TunnelError {
        TunnelError::Netlink {
            name: self.inner.name.clone(),
            what: what.to_owned(),
            check: check_for(&source, self.inner.listen_port),
            source,
        }
    }

    fn warn_gated(&self, state: &mut State, e: &TunnelError) {
        let now = Instant::now();
        if state
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            state.last_warning = Some(now);
            tracing::warn!(error = %e, "cannot read the kernel WireGuard state (one warning per 10 s)");
        } else {
            tracing::debug!(error = %e, "cannot read the kernel WireGuard state");
        }
    }

    fn apply(&self, state: &mut State, ops: &[PeerOp]) -> Result<(), TunnelError> {
        for message in build_set_messages(self.inner.index, ops, ALLOWED_IPS_PER_ENTRY, MAX_MESSAGE)
        {
            netlink::wg_request(&mut state.genl, self.inner.family, message, 0)
                .map_err(|e| self.netlink_error("configure the peers", e))?;
        }
        Ok(())
    }

    fn dump(&self, state: &mut State) -> Result<BTreeMap<PublicKey, DumpedPeer>, TunnelError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match netlink::wg_request(
                &mut state.genl,
                self.inner.family,
                build_get_message(self.inner.index),
                NLM_F_DUMP,
            ) {
                Ok(messages) => return Ok(parse_dump(&messages)),
                // Changed while it was read (by someone else: we hold the lock): read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempts < 3 => {}
                Err(e) => return Err(self.netlink_error("read the peers", e)),
            }
        }
    }

    /// Takes the kernel's counters into the peers and the metrics.
    fn absorb(&self, state: &mut State, dumped: &BTreeMap<PublicKey, DumpedPeer>) {
        let metrics = &self.inner.metrics;
        for (node, peer) in state.peers.iter_mut() {
            let Some(k) = dumped.get(&peer.config.public_key) else {
                continue;
            };
            if peer.psk.is_none() {
                continue;
            }
            metrics.add_bytes(Direction::Tx, counter_increase(peer.tx_bytes, k.tx_bytes));
            metrics.add_bytes(Direction::Rx, counter_increase(peer.rx_bytes, k.rx_bytes));
            peer.tx_bytes = k.tx_bytes;
            peer.rx_bytes = k.rx_bytes;
            if k.last_handshake.is_some() && k.last_handshake != peer.last_handshake {
                peer.handshakes += 1;
                metrics.count_handshake();
                tracing::debug!(peer.node = %node, "tunnel handshake completed (kernel)");
            }
            peer.last_handshake = k.last_handshake;
        }
    }

    fn resync_if_needed(&self, state: &mut State) {
        if state.resync {
            match self.resync(state) {
                Ok(()) => {
                    tracing::info!(link.name = %self.inner.name, "kernel WireGuard peers put back in line")
                }
                Err(e) => self.warn_gated(state, &e),
            }
        }
    }

    /// Puts the kernel's peers in line with ours: removes the kernel peers that are not keyed
    /// peers of ours, and sets every keyed peer whole (pre-shared key, endpoint, allowed IPs;
    /// its session is kept).
    fn resync(&self, state: &mut State) -> Result<(), TunnelError> {
        state.resync = true;
        let dumped = self.dump(state)?;
        let keyed: BTreeSet<PublicKey> = state
            .peers
            .values()
            .filter(|p| p.psk.is_some())
            .map(|p| p.config.public_key)
            .collect();
        let mut ops: Vec<PeerOp> = dumped
            .keys()
            .filter(|k| !keyed.contains(k))
            .map(|k| PeerOp::Remove { public_key: *k })
            .collect();
        ops.extend(
            state
                .peers
                .values()
                .filter_map(|p| p.psk.clone().map(|psk| p.add_op(psk))),
        );
        self.apply(state, &ops)?;
        state.resync = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_wireguard::WireguardTimeSpec;

    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn addrs(list: &[u8]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|n| Ipv4Addr::new(10, 200, 1, *n)).collect()
    }

    fn config(node: u32, k: u8, allowed: &[u8]) -> PeerConfig {
        PeerConfig {
            node: NodeId::new(node),
            public_key: key(k),
            endpoint: SocketAddr::from(([192, 0, 2, node as u8], 51871)),
            allowed: addrs(allowed),
        }
    }

    fn keyed(config: PeerConfig, psk: u8) -> KernelPeer {
        let mut peer = KernelPeer::new(config);
        peer.psk = Some(Psk::from_bytes([psk; 32]));
        peer
    }

    fn by_node(list: Vec<PeerConfig>) -> BTreeMap<NodeId, PeerConfig> {
        list.into_iter().map(|c| (c.node, c)).collect()
    }

    fn peer_attrs(message: &WireguardMessage) -> Vec<&WireguardPeer> {
        message
            .attributes
            .iter()
            .filter_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn flags(peer: &WireguardPeer) -> Option<WireguardPeerFlags> {
        peer.iter().find_map(|a| match a {
            WireguardPeerAttribute::Flags(f) => Some(*f),
            _ => None,
        })
    }

    fn allowed_of(peer: &WireguardPeer) -> Vec<(IpAddr, u8)> {
        peer.iter()
            .filter_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => Some(ips),
                _ => None,
            })
            .flatten()
            .map(|ip| {
                let addr = ip.iter().find_map(|a| match a {
                    WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                    _ => None,
                });
                let cidr = ip.iter().find_map(|a| match a {
                    WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                    _ => None,
                });
                assert!(ip.contains(&WireguardAllowedIpAttr::Family(
                    WireguardAddressFamily::Ipv4
                )));
                (addr.expect("an address"), cidr.expect("a mask"))
            })
            .collect()
    }

    /// Serializes as the kernel would receive it and parses it back.
    fn round_trip(message: WireguardMessage) -> WireguardMessage {
        let mut genl = GenlMessage::from_payload(message);
        genl.set_resolved_family_id(0x1234);
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(genl));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x1234, "family id");
        let parsed = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&buf)
            .expect("parses back");
        match parsed.payload {
            NetlinkPayload::InnerMessage(m) => m.payload,
            other => panic!("not a generic message: {other:?}"),
        }
    }

    #[test]
    fn add_carries_key_psk_endpoint_allowed_ips_and_replace() {
        let peer = keyed(config(2, 9, &[5, 6]), 7);
        let op = peer.add_op(Psk::from_bytes([7; 32]));
        let messages = build_set_messages(11, &[op], ALLOWED_IPS_PER_ENTRY, MAX_MESSAGE);
        assert_eq!(messages.len(), 1);
        let message = round_trip(messages[0].clone());
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        assert!(
            message
                .attributes
                .contains(&WireguardAttribute::IfIndex(11))
        );
        assert!(
            !message
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Flags(_))),
            "no REPLACE_PEERS outside start"
        );
        let peers = peer_attrs(&message);
        assert_eq!(peers.len(), 1);
        let p = peers[0];
        assert!(p.contains(&WireguardPeerAttribute::PublicKey([9; 32])));
        assert!(p.contains(&WireguardPeerAttribute::PresharedKey([7; 32])));
        assert!(
            p.contains(&WireguardPeerAttribute::Endpoint(SocketAddr::from((
                [192, 0, 2, 2],
                51871
            ))))
        );
        assert_eq!(flags(p), Some(WireguardPeerFlags::ReplaceAllowedIps));
        assert_eq!(
            allowed_of(p),
            vec![
                (IpAddr::from([10, 200, 1, 5]), 32),
                (IpAddr::from([10, 200, 1, 6]), 32)
            ]
        );
    }

    #[test]
    fn update_never_creates_and_keeps_the_psk() {
        let op = PeerOp::Update {
            public_key: key(3),
            endpoint: SocketAddr::from(([192, 0, 2, 3], 1)),
            allowed: addrs(&[1]),
        };
        let message = round_trip(build_set_messages(1, &[op], 512, MAX_MESSAGE).remove(0));
        let p = peer_attrs(&message)[0];
        assert_eq!(
            flags(p),
            Some(WireguardPeerFlags::ReplaceAllowedIps | WireguardPeerFlags::UpdateOnly)
        );
        assert!(
            !p.iter()
                .any(|a| matches!(a, WireguardPeerAttribute::PresharedKey(_))),
            "an update leaves the kernel's pre-shared key alone"
        );
        assert_eq!(allowed_of(p), vec![(IpAddr::from([10, 200, 1, 1]), 32)]);
    }

    #[test]
    fn rotation_sets_only_the_psk_and_remove_only_removes() {
        let ops = [
            PeerOp::SetPsk {
                public_key: key(4),
                psk: Psk::from_bytes([8; 32]),
            },
            PeerOp::Remove { public_key: key(5) },
        ];
        let message = round_trip(build_set_messages(1, &ops, 512, MAX_MESSAGE).remove(0));
        let peers = peer_attrs(&message);
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey([4; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
                WireguardPeerAttribute::PresharedKey([8; 32]),
            ]
        );
        assert_eq!(
            peers[1].0,
            vec![
                WireguardPeerAttribute::PublicKey([5; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]
        );
    }

    #[test]
    fn start_sets_the_private_key_the_port_and_clears_peers() {
        let private = PrivateKey::from_bytes([3; 32]);
        let message = round_trip(build_start_message(4, &private, 51871));
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        assert!(message.attributes.contains(&WireguardAttribute::IfIndex(4)));
        assert!(
            message
                .attributes
                .contains(&WireguardAttribute::PrivateKey(private.secret().to_bytes()))
        );
        assert!(
            message
                .attributes
                .contains(&WireguardAttribute::ListenPort(51871))
        );
        assert!(message.attributes.contains(&WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers
        )));
        let get = round_trip(build_get_message(4));
        assert_eq!(get.cmd, WireguardCmd::GetDevice);
        assert_eq!(get.attributes, vec![WireguardAttribute::IfIndex(4)]);
    }

    #[test]
    fn many_allowed_ips_are_split_and_only_the_first_entry_replaces() {
        let allowed: BTreeSet<Ipv4Addr> = (0..10u8).map(|n| Ipv4Addr::new(10, 9, 0, n)).collect();
        let op = PeerOp::Add {
            public_key: key(6),
            psk: Psk::from_bytes([1; 32]),
            endpoint: SocketAddr::from(([192, 0, 2, 6], 1)),
            allowed: allowed.clone(),
        };
        // With room, the three entries share one message.
        assert_eq!(
            build_set_messages(1, std::slice::from_ref(&op), 4, MAX_MESSAGE).len(),
            1
        );
        // 4 per entry, and messages so small that each entry goes alone.
        let messages = build_set_messages(1, &[op], 4, 1);
        assert_eq!(messages.len(), 3);
        let entries: Vec<WireguardPeer> = messages
            .into_iter()
            .map(round_trip)
            .flat_map(|m| peer_attrs(&m).into_iter().cloned().collect::<Vec<_>>())
            .collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            flags(&entries[0]),
            Some(WireguardPeerFlags::ReplaceAllowedIps)
        );
        assert!(entries[0].contains(&WireguardPeerAttribute::PresharedKey([1; 32])));
        for e in &entries[1..] {
            assert_eq!(
                flags(e),
                Some(WireguardPeerFlags::UpdateOnly),
                "appends, never replaces"
            );
            assert!(e.contains(&WireguardPeerAttribute::PublicKey([6; 32])));
            assert!(
                !e.iter()
                    .any(|a| matches!(a, WireguardPeerAttribute::PresharedKey(_)))
            );
        }
        let all: BTreeSet<IpAddr> = entries
            .iter()
            .flat_map(allowed_of)
            .map(|(a, _)| a)
            .collect();
        assert_eq!(all, allowed.into_iter().map(IpAddr::V4).collect());
        // With room, all entries share one message.
        let op = PeerOp::Remove { public_key: key(1) };
        assert_eq!(
            build_set_messages(1, &[op.clone(), op], 4, MAX_MESSAGE).len(),
            1
        );
        assert!(build_set_messages(1, &[], 4, MAX_MESSAGE).is_empty());
    }

    #[test]
    fn an_add_without_allowed_ips_still_carries_the_psk() {
        let op = keyed(config(2, 2, &[]), 1).add_op(Psk::from_bytes([1; 32]));
        let messages = build_set_messages(1, &[op], 4, MAX_MESSAGE);
        assert_eq!(messages.len(), 1);
        let p = peer_attrs(&messages[0])[0].clone();
        assert!(p.contains(&WireguardPeerAttribute::PresharedKey([1; 32])));
        assert!(allowed_of(&p).is_empty());
    }

    #[test]
    fn diff_removes_gone_and_rekeyed_updates_changed_and_ignores_unkeyed() {
        let current: BTreeMap<NodeId, KernelPeer> = [
            keyed(config(1, 1, &[1]), 1),        // unchanged
            keyed(config(2, 2, &[2]), 1),        // gone
            keyed(config(3, 3, &[3]), 1),        // new public key
            keyed(config(4, 4, &[4]), 1),        // new allowed set
            KernelPeer::new(config(5, 5, &[5])), // unkeyed, changed
            KernelPeer::new(config(6, 6, &[6])), // unkeyed, gone
            keyed(config(7, 7, &[7]), 1),        // new endpoint
        ]
        .into_iter()
        .map(|p| (p.config.node, p))
        .collect();
        let mut moved = config(7, 7, &[7]);
        moved.endpoint = SocketAddr::from(([192, 0, 2, 77], 51871));
        let wanted = by_node(vec![
            config(1, 1, &[1]),
            config(3, 33, &[3]),
            config(4, 4, &[4, 40]),
            config(5, 5, &[5, 50]),
            moved.clone(),
            config(8, 8, &[8]), // new
        ]);
        let ops = diff_peers(&current, &wanted);
        assert_eq!(
            ops,
            vec![
                PeerOp::Remove { public_key: key(2) },
                PeerOp::Remove { public_key: key(3) },
                PeerOp::Update {
                    public_key: key(4),
                    endpoint: config(4, 4, &[]).endpoint,
                    allowed: addrs(&[4, 40]),
                },
                PeerOp::Update {
                    public_key: key(7),
                    endpoint: moved.endpoint,
                    allowed: addrs(&[7]),
                },
            ]
        );
        let all_gone = diff_peers(&current, &by_node(vec![]));
        assert_eq!(
            all_gone,
            [1, 2, 3, 4, 7]
                .map(|k| PeerOp::Remove { public_key: key(k) })
                .to_vec(),
            "every keyed peer removed, and only those"
        );
    }

    #[test]
    fn sanitize_leaves_out_what_the_userspace_device_leaves_out() {
        let own = key(99);
        let mut own_peer = config(9, 99, &[9]);
        own_peer.public_key = own;
        let wanted = sanitize_peers(
            own,
            vec![
                config(1, 1, &[1, 2]),
                config(2, 1, &[3]),    // same public key as node 1: left out
                config(3, 3, &[2, 4]), // 2 is node 1's too: in neither
                config(4, 4, &[5]),
                config(4, 44, &[6]), // node 4 twice: the last one wins
                own_peer,            // our own key: left out
            ],
        );
        assert_eq!(
            wanted.keys().map(|n| n.get()).collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
        assert_eq!(wanted[&NodeId::new(1)].allowed, addrs(&[1]));
        assert_eq!(wanted[&NodeId::new(3)].allowed, addrs(&[4]));
        assert_eq!(wanted[&NodeId::new(4)].public_key, key(44));
    }

    #[test]
    fn state_follows_the_handshake_age() {
        assert_eq!(state_from_handshake(None), TunnelState::Handshaking);
        assert_eq!(
            state_from_handshake(Some(Duration::from_secs(0))),
            TunnelState::Up
        );
        assert_eq!(
            state_from_handshake(Some(Duration::from_secs(179))),
            TunnelState::Up
        );
        assert_eq!(
            state_from_handshake(Some(REJECT_AFTER)),
            TunnelState::Handshaking
        );
        assert_eq!(
            state_from_handshake(Some(Duration::from_secs(600))),
            TunnelState::Handshaking
        );
    }

    #[test]
    fn link_names_are_checked_as_the_kernel_does() {
        for good in ["mawg0", "mkwg0", "a", "wg-node.1", "exactly15chars_"] {
            assert!(valid_link_name(good), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "sixteen-chars-xx",
        ] {
            assert!(!valid_link_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn counters_grow_and_restart() {
        assert_eq!(counter_increase(10, 15), 5);
        assert_eq!(counter_increase(10, 10), 0);
        assert_eq!(
            counter_increase(10, 3),
            3,
            "a restarted counter counts whole"
        );
    }

    #[test]
    fn dump_is_merged_per_peer() {
        let dump = vec![
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::IfIndex(3),
                    WireguardAttribute::ListenPort(51871),
                    WireguardAttribute::Peers(vec![
                        WireguardPeer(vec![
                            WireguardPeerAttribute::PublicKey([1; 32]),
                            WireguardPeerAttribute::PresharedKey([5; 32]),
                            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                                seconds: 1_700_000_000,
                                nano_seconds: 5,
                            }),
                            WireguardPeerAttribute::RxBytes(100),
                            WireguardPeerAttribute::TxBytes(200),
                            WireguardPeerAttribute::AllowedIps(vec![allowed_ip(Ipv4Addr::new(
                                10, 0, 0, 1,
                            ))]),
                        ]),
                        WireguardPeer(vec![
                            WireguardPeerAttribute::PublicKey([2; 32]),
                            WireguardPeerAttribute::PresharedKey([0; 32]),
                            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec::default()),
                        ]),
                    ]),
                ],
            },
            // The next message continues peer 1's allowed IPs.
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([1; 32]),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(Ipv4Addr::new(
                        10, 0, 0, 2,
                    ))]),
                ])])],
            },
        ];
        let peers = parse_dump(&dump);
        assert_eq!(peers.len(), 2);
        let one = &peers[&key(1)];
        assert_eq!(one.psk, Some(Psk::from_bytes([5; 32])));
        assert_eq!(
            one.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!((one.rx_bytes, one.tx_bytes), (100, 200));
        assert_eq!(
            one.allowed,
            BTreeSet::from([
                (IpAddr::from([10, 0, 0, 1]), 32),
                (IpAddr::from([10, 0, 0, 2]), 32)
            ])
        );
        let two = &peers[&key(2)];
        assert_eq!(two.psk, None, "zeros: no pre-shared key");
        assert_eq!(two.last_handshake, None, "zero: never");
    }

    #[test]
    fn drift_in_the_kernel_is_noticed() {
        let peers: BTreeMap<NodeId, KernelPeer> = [
            keyed(config(1, 1, &[1, 2]), 5),
            KernelPeer::new(config(2, 2, &[3])), // unkeyed: must not be in the kernel
        ]
        .into_iter()
        .map(|p| (p.config.node, p))
        .collect();
        let good = DumpedPeer {
            psk: Some(Psk::from_bytes([5; 32])),
            allowed: addrs(&[1, 2])
                .into_iter()
                .map(|a| (IpAddr::V4(a), 32))
                .collect(),
            ..DumpedPeer::default()
        };
        let dumped = BTreeMap::from([(key(1), good.clone())]);
        assert!(kernel_matches(&peers, &dumped));
        let mut other_psk = good.clone();
        other_psk.psk = Some(Psk::from_bytes([6; 32]));
        assert!(!kernel_matches(
            &peers,
            &BTreeMap::from([(key(1), other_psk)])
        ));
        let mut no_psk = good.clone();
        no_psk.psk = None;
        assert!(!kernel_matches(&peers, &BTreeMap::from([(key(1), no_psk)])));
        let mut widened = good.clone();
        widened.allowed.insert((IpAddr::from([10, 200, 3, 0]), 24));
        assert!(!kernel_matches(
            &peers,
            &BTreeMap::from([(key(1), widened)])
        ));
        let mut wrong_mask = good.clone();
        wrong_mask.allowed = BTreeSet::from([
            (IpAddr::from([10, 200, 1, 1]), 32),
            (IpAddr::from([10, 200, 1, 2]), 31),
        ]);
        assert!(!kernel_matches(
            &peers,
            &BTreeMap::from([(key(1), wrong_mask)])
        ));
        let mut extra = dumped.clone();
        extra.insert(key(2), good.clone());
        assert!(
            !kernel_matches(&peers, &extra),
            "the unkeyed peer is in the kernel"
        );
        assert!(
            !kernel_matches(&peers, &BTreeMap::new()),
            "the keyed peer is missing"
        );
    }

    #[test]
    fn errors_say_what_to_check() {
        let perm = io::Error::from_raw_os_error(1);
        assert!(check_for(&perm, 1).contains("CAP_NET_ADMIN"));
        let busy = io::Error::from_raw_os_error(98);
        assert!(check_for(&busy, 51871).contains("UDP port 51871"));
        let err = TunnelError::KernelUnavailable { detail: "x".into() }.to_string();
        assert!(err.contains("the kernel has no WireGuard"), "{err}");
        assert!(err.contains("userspace device is used"), "{err}");
        let err = TunnelError::NotWireguard {
            name: "mawg0".into(),
            kind: "tun".into(),
        }
        .to_string();
        assert!(err.contains("ip link del mawg0"), "{err}");
    }
}
