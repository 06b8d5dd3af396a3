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
    /// Caller could not be attested (no peer credentials).
    AttestationFailed,
    /// Not synced with the server yet.
    NotReady,
    /// The RPC is not implemented.
    Unimplemented,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: SvidKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    result: ApiResult,
}

/// Handles to the agent's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    svids_held: Gauge,
    rotations: Family<KindLabels, Counter>,
    rotation_failures: Family<KindLabels, Counter>,
    soonest_expiry: Gauge,
    server_connected: Gauge,
    workload_api: Family<ApiLabels, Counter>,
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
        let workload_api = Family::<ApiLabels, Counter>::default();
        r.register(
            "workload_api_requests",
            "Workload API requests, by result",
            workload_api.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            svids_held,
            rotations,
            rotation_failures,
            soonest_expiry,
            server_connected,
            workload_api,
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

    pub(crate) fn rotated(&self, kind: SvidKind) {
        self.rotations.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn rotation_failed(&self, kind: SvidKind) {
        self.rotation_failures
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.server_connected.set(i64::from(up));
    }

    pub(crate) fn workload_api(&self, result: ApiResult) {
        self.workload_api.get_or_create(&ApiLabels { result }).inc();
    }
}
