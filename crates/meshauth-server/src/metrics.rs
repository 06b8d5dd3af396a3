//! The server's Prometheus metrics (prefix `meshauth_server_`). Labels are enums: no SPIFFE IDs,
//! node names or addresses, which are unbounded; those go to logs.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use meshauth_spiffe::X509Bundle;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which kind of SVID was issued.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SvidKind {
    /// A node (agent) SVID.
    Node,
    /// A workload SVID for a registration entry.
    Workload,
    /// The server's own serving SVID.
    Server,
}

/// What a sync message carried.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SyncKind {
    /// The whole state (a stream's first message, or one that fell behind).
    Full,
    /// Only what changed since the stream's previous message.
    Delta,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncKindLabels {
    kind: SyncKind,
}

/// How a new cluster view was made.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ViewBuild {
    /// From the whole store (the first view, a failed update, a change feed that could not
    /// say what changed).
    Full,
    /// The previous view with the parts that changed read again.
    Incremental,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViewBuildLabels {
    kind: ViewBuild,
}

/// Why a request was refused (low cardinality).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DenyReason {
    /// Unknown or reused join token.
    TokenUnknown,
    /// Expired join token.
    TokenExpired,
    /// Join token of another node.
    TokenWrongNode,
    /// Banned node.
    NodeBanned,
    /// Unknown (evicted) node.
    NodeUnknown,
    /// No client certificate.
    Unauthenticated,
    /// Client certificate is not a node SVID.
    NotANode,
    /// Node SVID from before an eviction or re-attestation.
    StaleNodeSvid,
    /// Entry not parented to the caller.
    EntryNotForNode,
    /// Identity without an endpoint on the caller's node.
    IdentityNotHosted,
    /// A node reported a pod the control plane did not place on it.
    PodNotPlacedHere,
    /// A node reported a pod address outside its pod range.
    AddressOutOfRange,
    /// A node reported an address another pod or node has.
    AddressInUse,
    /// A node claimed an address other than the one bound to it.
    NodeAddressMismatch,
    /// An x509pop proof was refused, or x509pop is not configured.
    X509PopRefused,
    /// Unknown entry.
    EntryUnknown,
    /// CSR rejected.
    BadCsr,
    /// A node published a WireGuard key another node has.
    DuplicateTunnelKey,
    /// Malformed request.
    InvalidRequest,
    /// Server-side failure.
    Internal,
}

/// A step of the once-a-second CA/SVID ticker (each failure is retried on the next tick).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TickStep {
    /// Reading the datastore, to report its health.
    StoreProbe,
    /// Advancing CA rotation and persisting it.
    CaRotation,
    /// Renewing the server's own SVID.
    ServerSvid,
}

/// Why the server refused or closed a node API connection (low cardinality).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionCloseReason {
    /// The listener was at its connection limit: closed at once.
    OverLimit,
    /// The TLS handshake failed.
    TlsHandshakeFailed,
    /// The TLS handshake did not finish in time.
    TlsHandshakeTimeout,
    /// A connection without a client certificate was idle for too long.
    IdleTimeout,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionCloseLabels {
    reason: ConnectionCloseReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: TickStep,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: SvidKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: DenyReason,
}

/// Handles to the server's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    svids_issued: Family<KindLabels, Counter>,
    attestations_ok: Counter,
    denied: Family<ReasonLabels, Counter>,
    bundle_authorities: Gauge,
    bundle_sequence: Gauge<u64, AtomicU64>,
    sync_streams: Gauge,
    ticker_failures: Family<StepLabels, Counter>,
    node_api_connections: Gauge,
    node_api_closed: Family<ConnectionCloseLabels, Counter>,
    ca_restarts: Counter,
    sync_messages: Family<SyncKindLabels, Counter>,
    view_builds: Family<ViewBuildLabels, Counter>,
    view_build_seconds: Histogram,
    view_revision: Gauge<u64, AtomicU64>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshauth_server");
        let svids_issued = Family::<KindLabels, Counter>::default();
        registry.register(
            "svids_issued",
            "X.509-SVIDs issued, by kind",
            svids_issued.clone(),
        );
        let attestations_ok = Counter::default();
        registry.register(
            "node_attestations",
            "Successful node attestations (join token or x509pop)",
            attestations_ok.clone(),
        );
        let denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "requests_denied",
            "Node API requests refused, by reason",
            denied.clone(),
        );
        let bundle_authorities = Gauge::default();
        registry.register(
            "bundle_authorities",
            "CA certificates in the published trust bundle",
            bundle_authorities.clone(),
        );
        let bundle_sequence = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "bundle_sequence",
            "Sequence number of the published trust bundle",
            bundle_sequence.clone(),
        );
        let sync_streams = Gauge::default();
        registry.register(
            "sync_streams",
            "Open agent sync streams",
            sync_streams.clone(),
        );
        let ticker_failures = Family::<StepLabels, Counter>::default();
        registry.register(
            "ticker_failures",
            "Failed steps of the CA/SVID ticker, by step (each is retried on the next tick)",
            ticker_failures.clone(),
        );
        let node_api_connections = Gauge::default();
        registry.register(
            "node_api_connections",
            "Open node API connections (TLS handshake included)",
            node_api_connections.clone(),
        );
        let node_api_closed = Family::<ConnectionCloseLabels, Counter>::default();
        registry.register(
            "node_api_connections_closed",
            "Node API connections the server refused or closed itself, by reason",
            node_api_closed.clone(),
        );
        let ca_restarts = Counter::default();
        registry.register(
            "ca_restarts",
            "Times every CA authority had expired (the server was down longer than a CA lifetime) and a new one, cross-signed by the last, took over",
            ca_restarts.clone(),
        );
        let sync_messages = Family::<SyncKindLabels, Counter>::default();
        registry.register(
            "sync_messages",
            "Sync messages sent to agents, by kind (full state or delta)",
            sync_messages.clone(),
        );
        let view_builds = Family::<ViewBuildLabels, Counter>::default();
        registry.register(
            "view_builds",
            "New cluster views for sync streams (one per burst of changes), by how they were made",
            view_builds.clone(),
        );
        let view_build_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "view_build_seconds",
            "Time to make a new cluster view (read what changed, or the whole store; diff against the last view)",
            view_build_seconds.clone(),
        );
        let view_revision = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "view_revision",
            "Revision of the cluster view last built",
            view_revision.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the one that rotates the CA (always 1 with one server)",
            leader.clone(),
        );
        Metrics {
            leader,
            registry: Arc::new(registry),
            sync_messages,
            view_builds,
            view_build_seconds,
            view_revision,
            ca_restarts,
            svids_issued,
            attestations_ok,
            denied,
            bundle_authorities,
            bundle_sequence,
            sync_streams,
            ticker_failures,
            node_api_connections,
            node_api_closed,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn ca_restarted(&self) {
        self.ca_restarts.inc();
    }

    pub(crate) fn svid_issued(&self, kind: SvidKind) {
        self.svids_issued.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn attestation_succeeded(&self) {
        self.attestations_ok.inc();
    }

    pub(crate) fn denied(&self, reason: DenyReason) {
        self.denied.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn observe_bundle(&self, bundle: &X509Bundle) {
        self.bundle_authorities.set(bundle.authorities.len() as i64);
        self.bundle_sequence.set(bundle.sequence);
    }

    pub(crate) fn ticker_failed(&self, step: TickStep) {
        self.ticker_failures
            .get_or_create(&StepLabels { step })
            .inc();
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub(crate) fn sync_message(&self, kind: SyncKind) {
        self.sync_messages
            .get_or_create(&SyncKindLabels { kind })
            .inc();
    }

    pub(crate) fn view_built(&self, kind: ViewBuild, took: std::time::Duration, revision: u64) {
        self.view_builds
            .get_or_create(&ViewBuildLabels { kind })
            .inc();
        self.view_build_seconds.observe(took.as_secs_f64());
        self.view_revision.set(revision);
    }

    pub(crate) fn sync_stream_opened(&self) {
        self.sync_streams.inc();
    }

    pub(crate) fn sync_stream_closed(&self) {
        self.sync_streams.dec();
    }

    /// A node API connection was accepted within the limit;
    /// [`Metrics::node_api_connection_ended`] follows.
    pub(crate) fn node_api_connection_opened(&self) {
        self.node_api_connections.inc();
    }

    /// An accepted node API connection is gone.
    pub(crate) fn node_api_connection_ended(&self) {
        self.node_api_connections.dec();
    }

    /// The server refused or closed a node API connection for `reason`.
    pub(crate) fn node_api_connection_closed(&self, reason: ConnectionCloseReason) {
        self.node_api_closed
            .get_or_create(&ConnectionCloseLabels { reason })
            .inc();
    }
}
