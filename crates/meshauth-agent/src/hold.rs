//! Hold, don't drop: the node-side queue for packets of pairs still being authenticated.
//!
//! The datapath marks such a packet ([`HOLD_MARK`]) instead of dropping it, and tracks its flow
//! as held. A netfilter rule in the node's network namespace ([`install_rule`]) sends marked
//! packets that the node forwards to NFQUEUE [`QUEUE`], without bypass: with no agent
//! listening they are dropped (fail closed). This module reads the queue: each packet waits under its pair's
//! auth key (read from the held flow's conntrack entry) and is released, in order, as soon as
//! the pair has a live auth entry; after [`HoldLimits::timeout`], when the handshake failed, or
//! when its pair's queue is full, it is dropped and counted.
//!
//! Why NFQUEUE: the packet has left the pod and the tc program already decided it; holding it
//! in the kernel's queue needs no copy into a device the agent owns and re-injects it where it
//! was, for every IP protocol alike. A BPF redirect to a TUN device would hold the same way but
//! needs the agent to re-inject the packet itself.
//!
//! The decisions (what to release, what to drop) are in [`Holder`], which does no I/O and is
//! tested without root; [`run`] wires it to the queue and the datapath.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use meshauth_policy::AuthKey;

/// The mark the datapath sets on held packets (`AuthMissAction::Mark`).
pub const HOLD_MARK: u32 = 0x4d41_0001;
/// The NFQUEUE number the node's rule sends them to.
pub const QUEUE: u16 = 4250;

/// Bounds of the hold queue.
#[derive(Debug, Clone, Copy)]
pub struct HoldLimits {
    /// Packets one pair may have waiting.
    pub packets_per_pair: usize,
    /// Bytes one pair may have waiting.
    pub bytes_per_pair: usize,
    /// Packets waiting in all.
    pub packets_total: usize,
    /// How long a packet may wait.
    pub timeout: Duration,
}

impl Default for HoldLimits {
    fn default() -> Self {
        HoldLimits {
            packets_per_pair: 64,
            bytes_per_pair: 256 * 1024,
            packets_total: 4096,
            timeout: Duration::from_secs(3),
        }
    }
}

/// Why a held packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HoldDrop {
    /// Its pair did not authenticate within the timeout.
    Timeout,
    /// Its pair's handshake failed.
    AuthFailed,
    /// Its pair's queue (or the whole queue) was full.
    Overflow,
    /// No held flow matches it (not from a held pair, or unparsable).
    Unknown,
}

/// What to do with held packets now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<P> {
    /// Let them continue, in this order; with how long the first one waited.
    Release(AuthKey, Vec<P>, Duration),
    /// Drop them, for this reason.
    Drop(Vec<P>, HoldDrop),
}

struct Waiting<P> {
    packets: VecDeque<(P, usize, Instant)>,
    bytes: usize,
}

/// The hold queue's state: packets waiting per pair. `P` is the queue's packet handle.
pub struct Holder<P> {
    limits: HoldLimits,
    pairs: HashMap<AuthKey, Waiting<P>>,
    total: usize,
    /// Counters by reason.
    pub dropped: BTreeMap<HoldDrop, u64>,
    /// Packets released after waiting.
    pub released: u64,
}

impl<P> Holder<P> {
    /// An empty queue.
    pub fn new(limits: HoldLimits) -> Self {
        Holder {
            limits,
            pairs: HashMap::new(),
            total: 0,
            dropped: BTreeMap::new(),
            released: 0,
        }
    }

    /// How many packets wait.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The pairs with packets waiting.
    pub fn pairs(&self) -> Vec<AuthKey> {
        self.pairs.keys().copied().collect()
    }

    fn count(&mut self, reason: HoldDrop, n: usize) {
        *self.dropped.entry(reason).or_default() += n as u64;
    }

    /// A packet of `key` arrives (`None`: no held flow matches it); `live`: whether the pair
    /// is authenticated already (then it passes at once).
    pub fn arrive(
        &mut self,
        key: Option<AuthKey>,
        packet: P,
        len: usize,
        live: bool,
        now: Instant,
    ) -> Option<Decision<P>> {
        let Some(key) = key else {
            self.count(HoldDrop::Unknown, 1);
            return Some(Decision::Drop(vec![packet], HoldDrop::Unknown));
        };
        if live && !self.pairs.contains_key(&key) {
            self.released += 1;
            return Some(Decision::Release(key, vec![packet], Duration::ZERO));
        }
        let limits = self.limits;
        // Full: refused before a pair is made for it (a flood of new flows must not leave a
        // waiting pair behind for each).
        if self.total >= limits.packets_total {
            self.count(HoldDrop::Overflow, 1);
            return Some(Decision::Drop(vec![packet], HoldDrop::Overflow));
        }
        let w = self.pairs.entry(key).or_insert_with(|| Waiting {
            packets: VecDeque::new(),
            bytes: 0,
        });
        if w.packets.len() >= limits.packets_per_pair || w.bytes + len > limits.bytes_per_pair {
            let empty = w.packets.is_empty();
            if empty {
                self.pairs.remove(&key);
            }
            self.count(HoldDrop::Overflow, 1);
            return Some(Decision::Drop(vec![packet], HoldDrop::Overflow));
        }
        w.packets.push_back((packet, len, now));
        w.bytes += len;
        self.total += 1;
        if live {
            return self.authenticated(key, now);
        }
        None
    }

    /// `key` has authenticated: its packets go, in order.
    pub fn authenticated(&mut self, key: AuthKey, now: Instant) -> Option<Decision<P>> {
        let w = self.pairs.remove(&key)?;
        self.total -= w.packets.len();
        let waited = w
            .packets
            .front()
            .map(|(_, _, t)| now.saturating_duration_since(*t))
            .unwrap_or_default();
        self.released += w.packets.len() as u64;
        Some(Decision::Release(
            key,
            w.packets.into_iter().map(|(p, _, _)| p).collect(),
            waited,
        ))
    }

    /// `key`'s handshake failed: its packets are dropped.
    pub fn failed(&mut self, key: AuthKey) -> Option<Decision<P>> {
        let w = self.pairs.remove(&key)?;
        self.total -= w.packets.len();
        self.count(HoldDrop::AuthFailed, w.packets.len());
        Some(Decision::Drop(
            w.packets.into_iter().map(|(p, _, _)| p).collect(),
            HoldDrop::AuthFailed,
        ))
    }

    /// Drops what waited longer than the timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<Decision<P>> {
        let timeout = self.limits.timeout;
        let mut expired = Vec::new();
        let mut empty = Vec::new();
        for (key, w) in self.pairs.iter_mut() {
            let mut gone = Vec::new();
            while let Some((_, len, t)) = w.packets.front() {
                if now.saturating_duration_since(*t) < timeout {
                    break;
                }
                w.bytes -= *len;
                if let Some((p, _, _)) = w.packets.pop_front() {
                    gone.push(p);
                }
            }
            if !gone.is_empty() {
                expired.push(gone);
            }
            if w.packets.is_empty() {
                empty.push(*key);
            }
        }
        for k in empty {
            self.pairs.remove(&k);
        }
        let mut out = Vec::new();
        for gone in expired {
            self.total -= gone.len();
            self.count(HoldDrop::Timeout, gone.len());
            out.push(Decision::Drop(gone, HoldDrop::Timeout));
        }
        out
    }
}

/// The flow of an IPv4 packet as the datapath keys held flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketFlow {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port (ICMP: the echo id).
    pub sport: u16,
    /// Destination port (ICMP: the echo id).
    pub dport: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// ICMP: the type (policy decides by it, and it is part of the flow's key); 0 otherwise.
    pub icmp_type: u8,
}

/// The flow of an IPv4 packet as the datapath keys held flows: addresses, ports (the echo id
/// for ICMP), protocol and ICMP type. `None` for what is not IPv4 or too short.
pub fn flow_of(packet: &[u8]) -> Option<PacketFlow> {
    let v_ihl = *packet.first()?;
    if v_ihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(v_ihl & 0x0f) * 4;
    let protocol = *packet.get(9)?;
    let src = Ipv4Addr::new(*packet.get(12)?, packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(*packet.get(16)?, packet[17], packet[18], packet[19]);
    let l4 = packet.get(ihl..)?;
    let be = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?])) };
    let (sport, dport, icmp_type) = match protocol {
        6 | 17 | 132 => (be(0)?, be(2)?, 0),
        1 => {
            let id = be(4)?;
            (id, id, *l4.first()?)
        }
        _ => (0, 0, 0),
    };
    Some(PacketFlow {
        src,
        dst,
        sport,
        dport,
        protocol,
        icmp_type,
    })
}

/// Installs the rule that sends marked packets the node forwards to the queue, in the calling
/// thread's network namespace (idempotent). No `--queue-bypass`: with no agent reading the
/// queue, held packets are dropped.
///
/// The rule is an iptables (legacy) `NFQUEUE` target: kernels without nftables' queue
/// expression (`CONFIG_NFT_QUEUE`, absent on this project's machines) still have the xtables
/// target.
pub fn install_rule() -> std::io::Result<()> {
    let mark = format!("{HOLD_MARK:#x}");
    let queue = QUEUE.to_string();
    let rule = |op: &str| -> Vec<String> {
        [
            "-w",
            op,
            "FORWARD",
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "NFQUEUE",
            "--queue-num",
            &queue,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>| -> std::io::Result<std::process::Output> {
        std::process::Command::new("iptables-legacy")
            .args(&args)
            .output()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run iptables-legacy ({e}): install the Debian package iptables"
                    ),
                )
            })
    };
    if run(rule("-C"))?.status.success() {
        return Ok(());
    }
    let out = run(rule("-I"))?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "iptables-legacy refused the hold rule: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

type SharedDriver =
    std::sync::Arc<std::sync::Mutex<crate::driver::Driver<meshauth_datapath::Datapath>>>;

/// What the hold thread is told.
enum Signal {
    /// A handshake's outcome for a pair.
    Outcome(AuthKey, bool),
    /// The datapath marked a packet to hold: it is on its way to the queue.
    Marked,
}

/// Where the hold thread is told of handshake outcomes and of packets the datapath marked.
/// Never blocks: a full channel drops the signal (the thread also polls the auth map while it
/// holds packets, and wakes on its own every [`IDLE_WAIT`]).
#[derive(Clone)]
pub struct HoldHandle(std::sync::mpsc::SyncSender<Signal>);

impl HoldHandle {
    /// A handshake for `key` ended (`ok`: authenticated).
    pub fn outcome(&self, key: AuthKey, ok: bool) {
        let _ = self.0.try_send(Signal::Outcome(key, ok));
    }

    /// The datapath reported a held packet (its event): wake the thread to read the queue.
    pub fn marked(&self) {
        let _ = self.0.try_send(Signal::Marked);
    }
}

/// How long the hold thread sleeps when it holds nothing and hears nothing. A packet marked
/// while its event was lost (ring buffer full) waits at most this long to be read.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// After a marked-packet signal, how long the thread keeps polling the queue every
/// millisecond (the event can arrive before the packet reaches the queue).
const MARKED_WINDOW: Duration = Duration::from_millis(50);

/// The kernel's per-queue NFQUEUE statistics (of the agent's network namespace).
const NFQUEUE_STATS: &str = "/proc/net/netfilter/nfnetlink_queue";

/// The kernel's drop counters of one queue: `(queue_dropped, user_dropped)`, from the text of
/// [`NFQUEUE_STATS`] (`queue peer_portid total copy_mode copy_range queue_dropped user_dropped
/// id_sequence 1`).
fn kernel_drops(stats: &str, queue: u16) -> Option<(u64, u64)> {
    stats.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.first()?.parse::<u16>().ok()? != queue {
            return None;
        }
        Some((f.get(5)?.parse().ok()?, f.get(6)?.parse().ok()?))
    })
}

/// The kernel's counters as last seen, to count what they added since.
#[derive(Debug, Default)]
struct KernelDrops(Option<(u64, u64)>);

impl KernelDrops {
    /// What the counters added since the last call (nothing at the first; counters that went
    /// back, as when the queue is bound again, start over).
    fn advance(&mut self, seen: (u64, u64)) -> (u64, u64) {
        let added = match self.0 {
            Some((q, u)) if seen.0 >= q && seen.1 >= u => (seen.0 - q, seen.1 - u),
            _ => (0, 0),
        };
        self.0 = Some(seen);
        added
    }
}

/// Bytes of each held packet the kernel copies to the agent: IPv4 and TCP headers with options
/// fit (60 + 60).
const COPY_RANGE: u16 = 128;

/// Starts the hold queue's thread; returns where to tell it each handshake's outcome and each
/// packet the datapath marked.
pub fn start<T: meshauth_auth::AuthTable>(
    limits: HoldLimits,
    driver: SharedDriver,
    auth: meshauth_auth::AuthManager<T>,
    flows: crate::flows::FlowLog,
    node: String,
    metrics: crate::metrics::Metrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<HoldHandle> {
    let mut queue = nfq::Queue::open()?;
    queue.bind(QUEUE)?;
    // Never accept when the queue is full: drop (fail closed).
    queue.set_fail_open(QUEUE, false)?;
    queue.set_queue_max_len(QUEUE, 8192)?;
    // Only the headers come up: the flow is read from them, and an accepted packet is
    // reinjected whole by the kernel. A held message keeps its receive buffer alive, and with
    // the default range (64 KiB) 4,096 held packets kept about 270 MiB.
    queue.set_copy_range(QUEUE, COPY_RANGE)?;
    queue.set_nonblocking(true);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Signal>(4096);
    std::thread::Builder::new()
        .name("meshauth-hold".into())
        .spawn(move || {
            let ctx = Ctx {
                driver,
                flows,
                node,
                metrics,
            };
            run(limits, queue, rx, &ctx, &auth, &stop)
        })?;
    Ok(HoldHandle(tx))
}

struct Ctx {
    driver: SharedDriver,
    flows: crate::flows::FlowLog,
    node: String,
    metrics: crate::metrics::Metrics,
}

impl Ctx {
    fn dp<R>(&self, f: impl FnOnce(&mut meshauth_datapath::Datapath) -> R) -> R {
        let mut d = self.driver.lock().unwrap_or_else(|p| p.into_inner());
        f(d.datapath())
    }

    fn record(&self, key: Option<AuthKey>, packet: &[u8], verdict: &str, reason: String) {
        let Some(PacketFlow {
            src,
            dst,
            sport,
            dport,
            protocol: proto,
            ..
        }) = flow_of(packet)
        else {
            return;
        };
        let (src_ip, dst_ip) = (src.to_string(), dst.to_string());
        // The datapath's HELD record of this packet's flow names its pods, labels, direction
        // and deciding policies: the outcome is told with the same.
        let held = self.flows.latest(|f| {
            f.verdict == "HELD"
                && f.src_ip == src_ip
                && f.dst_ip == dst_ip
                && f.sport == u32::from(sport)
                && f.dport == u32::from(dport)
        });
        if let Some(held) = held {
            self.flows.push(meshauth_proto::agent::Flow {
                time_unix_ms: crate::flows::now_ms(),
                verdict: verdict.into(),
                reason,
                ..held
            });
            return;
        }
        self.flows.push(meshauth_proto::agent::Flow {
            time_unix_ms: crate::flows::now_ms(),
            node: self.node.clone(),
            kind: "flow".into(),
            src_ip,
            dst_ip,
            sport: u32::from(sport),
            src_identity: key.map_or(0, |k| k.local.get()),
            dst_identity: key.map_or(0, |k| k.remote.get()),
            dport: u32::from(dport),
            protocol: match meshauth_policy::Protocol::from_number(proto) {
                Some(p) => format!("{p:?}").to_uppercase(),
                None => proto.to_string(),
            },
            verdict: verdict.into(),
            reason,
            ..Default::default()
        });
    }
}

fn settle(queue: &mut nfq::Queue, ctx: &Ctx, d: Decision<nfq::Message>) {
    match d {
        Decision::Release(key, packets, waited) => {
            let n = packets.len();
            for (i, mut m) in packets.into_iter().enumerate() {
                if i == 0 && !waited.is_zero() {
                    ctx.record(
                        Some(key),
                        m.get_payload(),
                        "FORWARDED",
                        format!(
                            "held {} ms, released after authentication",
                            waited.as_millis()
                        ),
                    );
                }
                m.set_verdict(nfq::Verdict::Accept);
                if let Err(e) = queue.verdict(m) {
                    tracing::warn!(error = %e, "cannot release a held packet");
                }
            }
            ctx.metrics.hold_released(n as u64, waited);
        }
        Decision::Drop(packets, reason) => {
            let n = packets.len();
            for (i, mut m) in packets.into_iter().enumerate() {
                if i == 0 {
                    ctx.record(
                        None,
                        m.get_payload(),
                        "DROPPED",
                        format!("hold: {reason:?}"),
                    );
                }
                m.set_verdict(nfq::Verdict::Drop);
                if let Err(e) = queue.verdict(m) {
                    tracing::warn!(error = %e, "cannot drop a held packet");
                }
            }
            ctx.metrics.hold_dropped(reason, n as u64);
        }
    }
}

fn run<T: meshauth_auth::AuthTable>(
    limits: HoldLimits,
    mut queue: nfq::Queue,
    signals: std::sync::mpsc::Receiver<Signal>,
    ctx: &Ctx,
    auth: &meshauth_auth::AuthManager<T>,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let mut holder: Holder<nfq::Message> = Holder::new(limits);
    let mut last_poll = Instant::now();
    let mut kernel = KernelDrops::default();
    let mut last_kernel = Instant::now();
    let mut active_until = Instant::now();
    let mut waiting: Option<Signal> = None;
    while !*stop.borrow() {
        let now = Instant::now();
        for signal in waiting.take().into_iter().chain(signals.try_iter()) {
            let (key, ok) = match signal {
                Signal::Outcome(key, ok) => (key, ok),
                Signal::Marked => {
                    active_until = now + MARKED_WINDOW;
                    continue;
                }
            };
            let d = if ok {
                holder.authenticated(key, now)
            } else {
                holder.failed(key)
            };
            if let Some(d) = d {
                settle(&mut queue, ctx, d);
            }
        }
        // Pairs authenticated by the peer's handshake (we were the responder) show up only in
        // the auth map.
        if !holder.is_empty() && now.duration_since(last_poll) >= Duration::from_millis(5) {
            last_poll = now;
            for key in holder.pairs() {
                if ctx.dp(|d| d.auth_live(key)).unwrap_or(false)
                    && let Some(d) = holder.authenticated(key, now)
                {
                    settle(&mut queue, ctx, d);
                }
            }
        }
        for d in holder.expire(now) {
            settle(&mut queue, ctx, d);
        }
        let mut got = false;
        for _ in 0..64 {
            match queue.recv() {
                Ok(msg) => {
                    got = true;
                    let payload = msg.get_payload();
                    // The packet's own length (only COPY_RANGE bytes of it came up).
                    let len = msg.get_original_len().max(payload.len());
                    let key = flow_of(payload).and_then(|f| {
                        ctx.dp(|x| {
                            x.held_flow(f.src, f.dst, f.sport, f.dport, f.protocol, f.icmp_type)
                        })
                        .ok()
                        .flatten()
                    });
                    let live = key.is_some_and(|k| ctx.dp(|d| d.auth_live(k)).unwrap_or(false));
                    match holder.arrive(key, msg, len, live, Instant::now()) {
                        Some(d) => settle(&mut queue, ctx, d),
                        // Held: its pair is authenticated now. A packet the queue had no room
                        // for asks for nothing (a flood of new flows would otherwise fill the
                        // auth queue with handshakes whose packets are gone).
                        None => {
                            if let Some(k) = key
                                && !live
                            {
                                auth.request(k, std::time::SystemTime::now());
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the hold queue failed");
                    break;
                }
            }
        }
        ctx.metrics.hold_waiting(holder.len());
        if now.duration_since(last_kernel) >= Duration::from_secs(1) {
            last_kernel = now;
            if let Some(seen) = std::fs::read_to_string(NFQUEUE_STATS)
                .ok()
                .and_then(|t| kernel_drops(&t, QUEUE))
            {
                let (queue_full, socket_full) = kernel.advance(seen);
                ctx.metrics.hold_dropped_by_kernel(queue_full, socket_full);
            }
        }
        if got {
            continue;
        }
        if holder.is_empty() && Instant::now() >= active_until {
            // Idle: sleep until a signal (a marked packet, an outcome) or IDLE_WAIT.
            match signals.recv_timeout(IDLE_WAIT) {
                Ok(signal) => waiting = Some(signal),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            // Holding, or a marked packet is on its way: a handshake's outcome wakes the thread
            // at once (its packets leave without waiting for a tick); otherwise the queue is
            // read again within a millisecond.
            match signals.recv_timeout(Duration::from_millis(1)) {
                Ok(signal) => waiting = Some(signal),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_policy::{AuthType, IdentityId, NodeId};

    fn key(remote: u32) -> AuthKey {
        AuthKey {
            local: IdentityId::new(300),
            remote: IdentityId::new(remote),
            remote_node: NodeId::new(2),
            auth_type: AuthType::Required,
            connection: None,
        }
    }

    #[test]
    fn packets_wait_per_pair_and_leave_in_order() {
        let mut h = Holder::new(HoldLimits::default());
        let t0 = Instant::now();
        assert!(h.arrive(Some(key(1)), 1, 60, false, t0).is_none());
        assert!(h.arrive(Some(key(1)), 2, 60, false, t0).is_none());
        assert!(h.arrive(Some(key(2)), 3, 60, false, t0).is_none());
        assert_eq!(h.len(), 3);
        let later = t0 + Duration::from_millis(7);
        match h.authenticated(key(1), later) {
            Some(Decision::Release(k, ps, waited)) => {
                assert_eq!(
                    (k, ps, waited),
                    (key(1), vec![1, 2], Duration::from_millis(7))
                );
            }
            other => panic!("{:?}", other.is_some()),
        }
        assert_eq!(h.len(), 1);
        assert_eq!(
            h.failed(key(2)),
            Some(Decision::Drop(vec![3], HoldDrop::AuthFailed))
        );
        assert!(h.is_empty());
        assert_eq!(h.dropped[&HoldDrop::AuthFailed], 1);
        // Already authenticated: passes at once; unknown: dropped.
        assert_eq!(
            h.arrive(Some(key(3)), 4, 60, true, t0),
            Some(Decision::Release(key(3), vec![4], Duration::ZERO))
        );
        assert_eq!(
            h.arrive(None, 5, 60, false, t0),
            Some(Decision::Drop(vec![5], HoldDrop::Unknown))
        );
    }

    #[test]
    fn queues_are_bounded_and_packets_time_out() {
        let limits = HoldLimits {
            packets_per_pair: 2,
            bytes_per_pair: 1000,
            packets_total: 3,
            timeout: Duration::from_secs(1),
        };
        let mut h = Holder::new(limits);
        let t0 = Instant::now();
        assert!(h.arrive(Some(key(1)), 1, 10, false, t0).is_none());
        assert!(h.arrive(Some(key(1)), 2, 10, false, t0).is_none());
        assert_eq!(
            h.arrive(Some(key(1)), 3, 10, false, t0),
            Some(Decision::Drop(vec![3], HoldDrop::Overflow)),
            "per pair"
        );
        assert_eq!(
            h.arrive(Some(key(2)), 4, 2000, false, t0),
            Some(Decision::Drop(vec![4], HoldDrop::Overflow)),
            "bytes"
        );
        assert!(h.arrive(Some(key(2)), 5, 10, false, t0).is_none());
        assert_eq!(
            h.arrive(Some(key(3)), 6, 10, false, t0),
            Some(Decision::Drop(vec![6], HoldDrop::Overflow)),
            "total"
        );
        assert_eq!(h.dropped[&HoldDrop::Overflow], 3);
        let drops = h.expire(t0 + Duration::from_millis(999));
        assert!(drops.is_empty());
        let drops = h.expire(t0 + Duration::from_secs(1));
        assert_eq!(drops.len(), 2);
        assert!(h.is_empty());
        assert_eq!(h.dropped[&HoldDrop::Timeout], 3);
    }

    #[test]
    fn kernel_drops_are_read_per_queue_and_counted_once() {
        let stats = "    0  12345     0 2 65531     0     0       17  1\n   42  999     3 2   128     7   284773  900  1\n";
        assert_eq!(kernel_drops(stats, 42), Some((7, 284_773)));
        assert_eq!(kernel_drops(stats, 0), Some((0, 0)));
        assert_eq!(kernel_drops(stats, 5), None);
        assert_eq!(kernel_drops("garbage", 42), None);
        let mut k = KernelDrops::default();
        assert_eq!(
            k.advance((7, 100)),
            (0, 0),
            "the first reading is the baseline"
        );
        assert_eq!(k.advance((9, 150)), (2, 50));
        assert_eq!(k.advance((9, 150)), (0, 0));
        assert_eq!(k.advance((0, 1)), (0, 0), "rebound: start over");
        assert_eq!(k.advance((1, 1)), (1, 0));
    }

    #[test]
    fn a_full_queue_leaves_no_waiting_pair_behind() {
        let mut h: Holder<u32> = Holder::new(HoldLimits {
            packets_total: 2,
            ..HoldLimits::default()
        });
        let now = Instant::now();
        assert!(h.arrive(Some(key(1)), 1, 100, false, now).is_none());
        assert!(h.arrive(Some(key(2)), 2, 100, false, now).is_none());
        for i in 3..1000 {
            assert!(matches!(
                h.arrive(Some(key(i)), i, 100, false, now),
                Some(Decision::Drop(_, HoldDrop::Overflow))
            ));
        }
        assert_eq!(h.pairs().len(), 2, "only the pairs that hold packets");
    }

    #[test]
    fn flows_are_read_as_the_datapath_keys_them() {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 200, 1, 10]);
        p[16..20].copy_from_slice(&[10, 200, 2, 10]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            flow_of(&p),
            Some(PacketFlow {
                src: "10.200.1.10".parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                dst: "10.200.2.10".parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                sport: 40000,
                dport: 80,
                protocol: 6,
                icmp_type: 0,
            })
        );
        p[9] = 1;
        p[20] = 8;
        p[24..26].copy_from_slice(&77u16.to_be_bytes());
        assert_eq!(
            flow_of(&p).map(|f| (f.sport, f.dport, f.icmp_type)),
            Some((77, 77, 8))
        );
        assert_eq!(flow_of(&p[..10]), None);
        assert_eq!(flow_of(&[0x60; 40]), None, "IPv6");
    }
}
