//! The agent's Prometheus metrics (prefix `meshauth_agent_`). Labels are enums only.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which SVID rotated.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SvidKind {
    /// The node SVID.
    Node,
    /// A workload SVID.
    Workload,
}

/// Workload API outcome.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ApiResult {
    /// Served.
    Ok,
    /// Missing `workload.spiffe.io: true` header.
    MissingHeader,
    /// Caller matched no entry.
    NoIdentity,
    /// Caller could not be attested (no peer credentials, or its process exited or changed).
    AttestationFailed,
    /// Not synced with the server yet.
    NotReady,
    /// The RPC is not implemented.
    Unimplemented,
}

/// Which side of a handshake.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Role {
    /// This agent dialed.
    Initiator,
    /// A peer dialed this agent.
    Responder,
}

/// How a handshake ended (low cardinality).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum HandshakeResult {
    /// Both sides recorded the pair.
    Success,
    /// The peer agent could not be reached.
    Unreachable,
    /// A step timed out.
    Timeout,
    /// No SVID for the local identity yet.
    NoLocalSvid,
    /// The peer's certificate was rejected.
    PeerCertificateRejected,
    /// The responder refused.
    Refused,
    /// The initiator's identity is not hosted on its node.
    InitiatorNotHosted,
    /// The connection broke.
    Io,
    /// Policy asks for `test-always-fail`: failed without a handshake.
    TestAlwaysFail,
    /// The responder was at its connection limit and closed the connection at once.
    Overloaded,
}

impl From<meshauth_auth::Reason> for HandshakeResult {
    fn from(r: meshauth_auth::Reason) -> Self {
        use meshauth_auth::Reason as R;
        match r {
            R::Unreachable => HandshakeResult::Unreachable,
            R::Timeout => HandshakeResult::Timeout,
            R::NoLocalSvid => HandshakeResult::NoLocalSvid,
            R::PeerCertificateRejected => HandshakeResult::PeerCertificateRejected,
            R::Refused => HandshakeResult::Refused,
            R::InitiatorNotHosted => HandshakeResult::InitiatorNotHosted,
            R::Io => HandshakeResult::Io,
            R::TestAlwaysFail => HandshakeResult::TestAlwaysFail,
            R::Overloaded => HandshakeResult::Overloaded,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    role: Role,
    result: HandshakeResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: SvidKind,
}

/// How an attestation of this node (first start, or again after its SVID expired) went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AttestationResult {
    /// A node SVID was issued.
    Ok,
    /// The server refused the credential.
    Refused,
    /// The server was not reached, or the credential could not be read.
    Failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestationLabels {
    result: AttestationResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    result: ApiResult,
}

/// Why the agent refused or closed a Workload API connection (low cardinality).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WorkloadCloseReason {
    /// The socket was at its connection limit: closed at once.
    OverLimit,
    /// The client did not speak HTTP/2.
    NotHttp2,
    /// The client did not send the HTTP/2 preface in time.
    PrefaceTimeout,
    /// A malformed or oversized frame.
    ProtocolError,
    /// An HPACK block that does not decode.
    HpackError,
    /// An HPACK dynamic table size update beyond the allowed size.
    HpackTableTooLarge,
    /// A header block that decodes to more than the header list limit (an HPACK bomb).
    HeaderListTooLarge,
    /// More open streams than the relay tracks.
    TooManyStreams,
    /// A request was not complete in time.
    RequestTimeout,
    /// No open stream for the idle timeout.
    IdleTimeout,
    /// The agent is stopping.
    Shutdown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadCloseLabels {
    reason: WorkloadCloseReason,
}

/// Which way a packet went, from the pod's point of view.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PacketDirection {
    /// Sent by the pod.
    Egress,
    /// Received by the pod.
    Ingress,
}

/// Why the datapath dropped a packet.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DropReasonLabel {
    /// Policy denies it.
    PolicyDenied,
    /// The pair has not authenticated.
    AuthenticationRequired,
    /// The peer address has no identity.
    NoIdentity,
    /// The pod sent from an address not its own.
    SpoofedSource,
    /// Not a protocol the datapath handles.
    Unsupported,
    /// Encryption on: from another node's pod, but not out of the tunnel.
    Unencrypted,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    direction: PacketDirection,
    reason: DropReasonLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: PacketDirection,
}

fn direction_label(d: meshauth_datapath::Direction) -> PacketDirection {
    match d {
        meshauth_datapath::Direction::Egress => PacketDirection::Egress,
        meshauth_datapath::Direction::Ingress => PacketDirection::Ingress,
    }
}

fn reason_label(r: meshauth_datapath::DropReason) -> DropReasonLabel {
    use meshauth_datapath::DropReason as R;
    match r {
        R::PolicyDenied => DropReasonLabel::PolicyDenied,
        R::AuthenticationRequired => DropReasonLabel::AuthenticationRequired,
        R::NoIdentity => DropReasonLabel::NoIdentity,
        R::SpoofedSource => DropReasonLabel::SpoofedSource,
        R::Unsupported => DropReasonLabel::Unsupported,
        R::Unencrypted => DropReasonLabel::Unencrypted,
    }
}

/// Raises `c` to `total` (a count the kernel keeps).
fn mirror(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HoldLabels {
    reason: HoldDropLabel,
}

/// Why a held packet was dropped.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum HoldDropLabel {
    /// Its pair did not authenticate in time.
    Timeout,
    /// Its pair's handshake failed.
    AuthFailed,
    /// The queue was full.
    Overflow,
    /// No held flow matched it.
    Unknown,
    /// Dropped by the kernel before the agent saw it: its NFQUEUE was at its length limit.
    KernelQueueFull,
    /// Dropped by the kernel before the agent saw it: the agent's netlink socket was full
    /// (the agent read too slowly).
    KernelSocketFull,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    operation: CniOperation,
    result: CniResult,
}

/// A CNI plugin call on the admin socket.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CniOperation {
    /// ADD.
    Add,
    /// DEL.
    Delete,
    /// CHECK.
    Check,
}

/// How it ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CniResult {
    /// Done.
    Ok,
    /// Refused: the pod is not placed on this node, already runs, or has no address left.
    Refused,
    /// The request was malformed.
    Invalid,
    /// Not now: not synced yet, or enforcement did not take (or let go of) it in time.
    Unavailable,
    /// Not held (CHECK).
    NotFound,
    /// The agent could not save it.
    Failed,
}

/// Handles to the agent's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    svids_held: Gauge,
    unsignable_entries: Gauge,
    rotations: Family<KindLabels, Counter>,
    rotation_failures: Family<KindLabels, Counter>,
    attestations: Family<AttestationLabels, Counter>,
    soonest_expiry: Gauge,
    server_connected: Gauge,
    server_failovers: Counter,
    server_index: Gauge,
    workload_api: Family<ApiLabels, Counter>,
    workload_connections: Gauge,
    workload_accepted: Counter,
    workload_closed: Family<WorkloadCloseLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_seconds: prometheus_client::metrics::histogram::Histogram,
    auth_entries: Gauge,
    auth_queue_depth: Gauge,
    auth_overflow: Counter,
    auth_revocations: Counter,
    datapath_drops: Family<DropLabels, Counter>,
    datapath_forwarded: Family<DirectionLabels, Counter>,
    datapath_events_lost: Counter,
    hold_released: Counter,
    hold_dropped: Family<HoldLabels, Counter>,
    hold_waiting: Gauge,
    hold_seconds: prometheus_client::metrics::histogram::Histogram,
    cni_requests: Family<CniLabels, Counter>,
    tunnel: meshauth_tunnel::TunnelMetrics,
    tunnel_exchanges: Family<ExchangeLabels, Counter>,
}

/// How a node-pair key exchange ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ExchangeResult {
    /// A new pre-shared key is in place on both sides.
    Success,
    /// The peer agent could not be reached.
    Unreachable,
    /// A step timed out.
    Timeout,
    /// The peer's node SVID was rejected.
    PeerCertificateRejected,
    /// The peer is not the node bound to its address, or published no key.
    UnknownNode,
    /// The two sides' views of the WireGuard keys differ.
    KeyMismatch,
    /// The wrong side initiated.
    WrongRole,
    /// The responder had no tunnel peer for the initiator yet.
    NotReady,
    /// The connection broke or spoke another protocol.
    Io,
    /// The responder was at its connection limit.
    Overloaded,
}

impl From<meshauth_auth::tunnel_key::ExchangeReason> for ExchangeResult {
    fn from(r: meshauth_auth::tunnel_key::ExchangeReason) -> Self {
        use meshauth_auth::tunnel_key::ExchangeReason as R;
        match r {
            R::Unreachable => ExchangeResult::Unreachable,
            R::Timeout => ExchangeResult::Timeout,
            R::PeerCertificateRejected => ExchangeResult::PeerCertificateRejected,
            R::UnknownNode => ExchangeResult::UnknownNode,
            R::KeyMismatch => ExchangeResult::KeyMismatch,
            R::WrongRole => ExchangeResult::WrongRole,
            R::NotReady => ExchangeResult::NotReady,
            R::Io => ExchangeResult::Io,
            R::Overloaded => ExchangeResult::Overloaded,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabels {
    role: Role,
    result: ExchangeResult,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("meshauth_agent");
        let svids_held = Gauge::default();
        r.register(
            "svids_held",
            "Workload X.509-SVIDs held in memory",
            svids_held.clone(),
        );
        let unsignable_entries = Gauge::default();
        r.register(
            "unsignable_entries",
            "Entries of this node the server refused to sign or renew (the other entries are unaffected; see `meshauth agent svids`)",
            unsignable_entries.clone(),
        );
        let rotations = Family::<KindLabels, Counter>::default();
        r.register(
            "svid_rotations",
            "SVIDs renewed, by kind",
            rotations.clone(),
        );
        let rotation_failures = Family::<KindLabels, Counter>::default();
        r.register(
            "svid_rotation_failures",
            "Failed SVID renewals (the current SVID is kept until expiry), by kind",
            rotation_failures.clone(),
        );
        let attestations = Family::<AttestationLabels, Counter>::default();
        r.register(
            "node_attestations",
            "Attestations of this node after its first start (its SVID expired or was refused), by result",
            attestations.clone(),
        );
        let soonest_expiry = Gauge::default();
        r.register(
            "svid_soonest_expiry_seconds",
            "Seconds until the soonest expiry among the node SVID and held workload SVIDs",
            soonest_expiry.clone(),
        );
        let server_connected = Gauge::default();
        r.register(
            "server_connected",
            "1 while the sync stream with the server is up",
            server_connected.clone(),
        );
        let server_failovers = Counter::default();
        r.register(
            "server_failovers",
            "Times a session with a server ended and the next was with another server of --server",
            server_failovers.clone(),
        );
        let server_index = Gauge::default();
        r.register(
            "server_index",
            "Index in --server of the server of the current (or last) session; 0: the first",
            server_index.clone(),
        );
        let workload_api = Family::<ApiLabels, Counter>::default();
        r.register(
            "workload_api_requests",
            "Workload API requests, by result",
            workload_api.clone(),
        );
        let workload_connections = Gauge::default();
        r.register(
            "workload_connections",
            "Open Workload API connections",
            workload_connections.clone(),
        );
        let workload_accepted = Counter::default();
        r.register(
            "workload_connections_accepted",
            "Workload API connections accepted (within the connection limit)",
            workload_accepted.clone(),
        );
        let workload_closed = Family::<WorkloadCloseLabels, Counter>::default();
        r.register(
            "workload_connections_closed",
            "Workload API connections the agent refused or closed itself, by reason",
            workload_closed.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        r.register(
            "auth_handshakes",
            "Handshakes by role and result",
            handshakes.clone(),
        );
        let handshake_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
        );
        r.register(
            "auth_handshake_duration_seconds",
            "Initiated handshakes, connect to verdict",
            handshake_seconds.clone(),
        );
        let auth_entries = Gauge::default();
        r.register(
            "auth_entries",
            "Authenticated pairs in the auth map",
            auth_entries.clone(),
        );
        let auth_queue_depth = Gauge::default();
        r.register(
            "auth_queue_depth",
            "Pairs waiting for or in a handshake",
            auth_queue_depth.clone(),
        );
        let auth_overflow = Counter::default();
        r.register(
            "auth_queue_overflow",
            "Auth requests dropped because the queue was full",
            auth_overflow.clone(),
        );
        let auth_revocations = Counter::default();
        r.register(
            "auth_revocations",
            "Auth entries removed because their justification went away",
            auth_revocations.clone(),
        );
        let datapath_drops = Family::<DropLabels, Counter>::default();
        r.register(
            "datapath_drops",
            "Packets the datapath dropped, by direction and reason",
            datapath_drops.clone(),
        );
        let datapath_forwarded = Family::<DirectionLabels, Counter>::default();
        r.register(
            "datapath_forwarded",
            "Packets the datapath passed, by direction",
            datapath_forwarded.clone(),
        );
        let datapath_events_lost = Counter::default();
        r.register(
            "datapath_events_lost",
            "Datapath events (flows, auth-required signals) the ring buffer had no room for",
            datapath_events_lost.clone(),
        );
        let hold_released = Counter::default();
        r.register(
            "hold_released_packets",
            "Held packets released after their pair authenticated",
            hold_released.clone(),
        );
        let hold_dropped = Family::<HoldLabels, Counter>::default();
        r.register(
            "hold_dropped_packets",
            "Held packets dropped, by reason",
            hold_dropped.clone(),
        );
        let hold_waiting = Gauge::default();
        r.register(
            "hold_waiting_packets",
            "Packets waiting in the hold queue",
            hold_waiting.clone(),
        );
        let hold_seconds = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
        );
        r.register(
            "hold_duration_seconds",
            "How long the first held packet of a pair waited for its release",
            hold_seconds.clone(),
        );
        let cni_requests = Family::<CniLabels, Counter>::default();
        r.register(
            "cni_requests",
            "CNI plugin calls on the admin socket, by operation and result (refused: a container of a pod not placed here, or already running)",
            cni_requests.clone(),
        );
        let tunnel = meshauth_tunnel::TunnelMetrics::new();
        tunnel.register(&mut r);
        let tunnel_exchanges = Family::<ExchangeLabels, Counter>::default();
        r.register(
            "tunnel_key_exchanges",
            "Node-pair key exchanges (the WireGuard pre-shared key from the TLS exporter), by role and result",
            tunnel_exchanges.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            cni_requests,
            tunnel,
            tunnel_exchanges,
            attestations,
            hold_released,
            hold_dropped,
            hold_waiting,
            hold_seconds,
            datapath_drops,
            datapath_forwarded,
            datapath_events_lost,
            handshakes,
            handshake_seconds,
            auth_entries,
            auth_queue_depth,
            auth_overflow,
            auth_revocations,
            svids_held,
            unsignable_entries,
            rotations,
            rotation_failures,
            soonest_expiry,
            server_connected,
            server_failovers,
            server_index,
            workload_api,
            workload_connections,
            workload_accepted,
            workload_closed,
        }
    }

    /// The text exposition, with the expiry gauge computed for `soonest`.
    pub fn encode(&self, soonest: Option<SystemTime>) -> String {
        if let Some(t) = soonest {
            let left = t
                .duration_since(SystemTime::now())
                .map(|d| d.as_secs() as i64)
                .unwrap_or_else(|e| -(e.duration().as_secs() as i64));
            self.soonest_expiry.set(left);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn set_svids_held(&self, n: usize) {
        self.svids_held.set(n as i64);
    }

    pub(crate) fn set_unsignable_entries(&self, n: usize) {
        self.unsignable_entries.set(n as i64);
    }

    pub(crate) fn rotated(&self, kind: SvidKind) {
        self.rotations.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn attested_again(&self, result: AttestationResult) {
        self.attestations
            .get_or_create(&AttestationLabels { result })
            .inc();
    }

    pub(crate) fn rotation_failed(&self, kind: SvidKind) {
        self.rotation_failures
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.server_connected.set(i64::from(up));
    }

    /// The next session is with another server than the last.
    pub(crate) fn server_failover(&self) {
        self.server_failovers.inc();
    }

    /// Sessions are now with server `index` of the list.
    pub(crate) fn set_server_index(&self, index: usize) {
        self.server_index
            .set(i64::try_from(index).unwrap_or(i64::MAX));
    }

    pub(crate) fn handshake(&self, role: Role, result: HandshakeResult, seconds: Option<f64>) {
        self.handshakes
            .get_or_create(&HandshakeLabels { role, result })
            .inc();
        if let Some(s) = seconds {
            self.handshake_seconds.observe(s);
        }
    }

    /// Mirrors the auth manager's state: entries, queue depth, and the growth of its
    /// overflow and revocation counts since the last call.
    pub(crate) fn auth_state(&self, entries: usize, pending: usize, overflow: u64, revoked: u64) {
        self.auth_entries.set(entries as i64);
        self.auth_queue_depth.set(pending as i64);
        let o = overflow.saturating_sub(self.auth_overflow.get());
        self.auth_overflow.inc_by(o);
        let r = revoked.saturating_sub(self.auth_revocations.get());
        self.auth_revocations.inc_by(r);
    }

    /// Mirrors the datapath's counters.
    pub(crate) fn datapath(&self, s: &meshauth_datapath::Stats) {
        for ((d, r), n) in &s.dropped {
            let labels = DropLabels {
                direction: direction_label(*d),
                reason: reason_label(*r),
            };
            mirror(&self.datapath_drops.get_or_create(&labels), *n);
        }
        for (d, n) in &s.forwarded {
            let labels = DirectionLabels {
                direction: direction_label(*d),
            };
            mirror(&self.datapath_forwarded.get_or_create(&labels), *n);
        }
        mirror(&self.datapath_events_lost, s.events_lost);
    }

    /// Counts a CNI plugin call.
    pub fn cni_request(&self, operation: CniOperation, result: CniResult) {
        self.cni_requests
            .get_or_create(&CniLabels { operation, result })
            .inc();
    }

    pub(crate) fn hold_released(&self, n: u64, waited: std::time::Duration) {
        self.hold_released.inc_by(n);
        if !waited.is_zero() {
            self.hold_seconds.observe(waited.as_secs_f64());
        }
    }

    pub(crate) fn hold_dropped(&self, reason: crate::hold::HoldDrop, n: u64) {
        use crate::hold::HoldDrop as D;
        let reason = match reason {
            D::Timeout => HoldDropLabel::Timeout,
            D::AuthFailed => HoldDropLabel::AuthFailed,
            D::Overflow => HoldDropLabel::Overflow,
            D::Unknown => HoldDropLabel::Unknown,
        };
        self.hold_dropped
            .get_or_create(&HoldLabels { reason })
            .inc_by(n);
    }

    /// Packets the kernel dropped on the way to the hold queue, since the last call.
    pub(crate) fn hold_dropped_by_kernel(&self, queue_full: u64, socket_full: u64) {
        for (reason, n) in [
            (HoldDropLabel::KernelQueueFull, queue_full),
            (HoldDropLabel::KernelSocketFull, socket_full),
        ] {
            if n > 0 {
                self.hold_dropped
                    .get_or_create(&HoldLabels { reason })
                    .inc_by(n);
            }
        }
    }

    pub(crate) fn hold_waiting(&self, n: usize) {
        self.hold_waiting.set(n as i64);
    }

    pub(crate) fn workload_api(&self, result: ApiResult) {
        self.workload_api.get_or_create(&ApiLabels { result }).inc();
    }

    /// A Workload API connection was accepted; [`Metrics::workload_connection_ended`] follows.
    pub(crate) fn workload_connection_opened(&self) {
        self.workload_accepted.inc();
        self.workload_connections.inc();
    }

    /// An accepted Workload API connection is gone.
    pub(crate) fn workload_connection_ended(&self) {
        self.workload_connections.dec();
    }

    /// The agent refused or closed a Workload API connection for `reason`.
    pub(crate) fn workload_connection_closed(&self, reason: WorkloadCloseReason) {
        self.workload_closed
            .get_or_create(&WorkloadCloseLabels { reason })
            .inc();
    }
}

impl Metrics {
    /// The tunnel device's counters (bytes, drops by reason, handshakes, rotations).
    pub fn tunnel(&self) -> &meshauth_tunnel::TunnelMetrics {
        &self.tunnel
    }

    /// Counts a key exchange.
    pub fn tunnel_exchange(&self, role: Role, result: ExchangeResult) {
        self.tunnel_exchanges
            .get_or_create(&ExchangeLabels { role, result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_metrics_are_exported() {
        let m = Metrics::new();
        m.handshake(Role::Initiator, HandshakeResult::Success, Some(0.004));
        m.handshake(
            Role::Responder,
            meshauth_auth::Reason::InitiatorNotHosted.into(),
            None,
        );
        m.set_unsignable_entries(2);
        m.server_failover();
        m.set_server_index(1);
        m.auth_state(3, 1, 5, 2);
        m.auth_state(2, 0, 7, 2);
        let mut stats = meshauth_datapath::Stats::default();
        stats.dropped.insert(
            (
                meshauth_datapath::Direction::Ingress,
                meshauth_datapath::DropReason::PolicyDenied,
            ),
            4,
        );
        stats.events_lost = 3;
        m.datapath(&stats);
        stats.events_lost = 5;
        m.datapath(&stats);
        let text = m.encode(None);
        for line in [
            "meshauth_agent_auth_handshakes_total{role=\"Initiator\",result=\"Success\"} 1",
            "meshauth_agent_auth_handshakes_total{role=\"Responder\",result=\"InitiatorNotHosted\"} 1",
            "meshauth_agent_auth_handshake_duration_seconds_count 1",
            "meshauth_agent_auth_entries 2",
            "meshauth_agent_auth_queue_depth 0",
            "meshauth_agent_auth_queue_overflow_total 7",
            "meshauth_agent_auth_revocations_total 2",
            "meshauth_agent_datapath_drops_total{direction=\"Ingress\",reason=\"PolicyDenied\"} 4",
            "meshauth_agent_datapath_events_lost_total 5",
            "meshauth_agent_unsignable_entries 2",
            "meshauth_agent_server_failovers_total 1",
            "meshauth_agent_server_index 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
