//! The tunnel's Prometheus metrics. Label values come from the enums here only.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Which way WireGuard bytes went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Sent to peers (label `tx`).
    Tx,
    /// Received from peers (label `rx`).
    Rx,
}

impl Direction {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Tx => "tx",
            Direction::Rx => "rx",
        }
    }
}

/// Why the device dropped a packet (low cardinality: one label value each).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// An outgoing packet's destination is in no peer's allowed set.
    NoPeer,
    /// The peer has no pre-shared key yet (no tunnel may come up without one).
    NoKey,
    /// A decrypted packet's source address is not in the allowed set of the peer whose session
    /// decrypted it (a node claiming another node's pods).
    SourceNotPeerPod,
    /// An incoming handshake from a key that is no peer, or a packet for a session index that
    /// belongs to no peer.
    UnknownSender,
    /// Undecodable, or failed authentication (bad MAC, wrong pre-shared key, replay, stale
    /// session).
    Invalid,
    /// A bounded queue was full (packets waiting for a handshake, or the packet IO's queue).
    QueueFull,
    /// Not IPv4.
    Unsupported,
    /// Held for a handshake that did not complete in time (WireGuard gives up after 90 s).
    HandshakeTimeout,
    /// Writing to the UDP socket or to the TUN failed.
    IoError,
}

impl DropReason {
    /// Every reason, for pre-registering the label values.
    pub const ALL: [DropReason; 9] = [
        DropReason::NoPeer,
        DropReason::NoKey,
        DropReason::SourceNotPeerPod,
        DropReason::UnknownSender,
        DropReason::Invalid,
        DropReason::QueueFull,
        DropReason::Unsupported,
        DropReason::HandshakeTimeout,
        DropReason::IoError,
    ];

    /// The label value (snake case).
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::NoPeer => "no_peer",
            DropReason::NoKey => "no_key",
            DropReason::SourceNotPeerPod => "source_not_peer_pod",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::Invalid => "invalid",
            DropReason::QueueFull => "queue_full",
            DropReason::Unsupported => "unsupported",
            DropReason::HandshakeTimeout => "handshake_timeout",
            DropReason::IoError => "io_error",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// Written by hand rather than derived: the derive writes the variant name (`NoPeer`), and the
// documented label values are snake case (`no_peer`, `tx`).
impl EncodeLabelValue for DropReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: DropReason,
}

/// The tunnel's counters. Cheap to clone: clones share the counters.
#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    bytes: Family<DirectionLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    handshakes: Counter,
    rotations: Counter,
}

impl Default for TunnelMetrics {
    fn default() -> Self {
        TunnelMetrics::new()
    }
}

impl TunnelMetrics {
    /// New counters, every label value present at 0.
    pub fn new() -> TunnelMetrics {
        let m = TunnelMetrics {
            bytes: Family::default(),
            dropped: Family::default(),
            handshakes: Counter::default(),
            rotations: Counter::default(),
        };
        for direction in [Direction::Tx, Direction::Rx] {
            let _ = m.bytes.get_or_create(&DirectionLabels { direction });
        }
        for reason in DropReason::ALL {
            let _ = m.dropped.get_or_create(&ReasonLabels { reason });
        }
        m
    }

    /// Registers `tunnel_bytes`, `tunnel_packets_dropped`, `tunnel_handshakes` and
    /// `tunnel_key_rotations` under the registry's prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tunnel_bytes",
            "WireGuard bytes to and from peers, as gotatun's Noise state machine counts them (tx: datagrams sent; rx: handshakes received and data after decryption)",
            self.bytes.clone(),
        );
        registry.register(
            "tunnel_packets_dropped",
            "Packets the tunnel device dropped, by reason",
            self.dropped.clone(),
        );
        registry.register(
            "tunnel_handshakes",
            "WireGuard handshakes completed (confirmed by the peer)",
            self.handshakes.clone(),
        );
        registry.register(
            "tunnel_key_rotations",
            "Pre-shared key rotations applied to an existing tunnel",
            self.rotations.clone(),
        );
    }

    /// Bytes counted so far in one direction.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.bytes
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    /// Drops counted so far for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get_or_create(&ReasonLabels { reason }).get()
    }

    /// Completed handshakes so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.get()
    }

    /// Key rotations so far.
    pub fn rotations(&self) -> u64 {
        self.rotations.get()
    }

    pub(crate) fn add_bytes(&self, direction: Direction, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&DirectionLabels { direction })
                .inc_by(n);
        }
    }

    pub(crate) fn count_drop(&self, reason: DropReason) {
        self.dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub(crate) fn count_handshake(&self) {
        self.handshakes.inc();
    }

    pub(crate) fn count_rotation(&self) {
        self.rotations.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_with_the_documented_names_and_label_values() {
        let mut registry = Registry::with_prefix("meshauth_agent");
        let m = TunnelMetrics::new();
        m.register(&mut registry);
        m.clone().add_bytes(Direction::Tx, 148);
        m.count_drop(DropReason::SourceNotPeerPod);
        m.count_handshake();
        m.count_rotation();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "meshauth_agent_tunnel_bytes_total{direction=\"tx\"} 148",
            "meshauth_agent_tunnel_bytes_total{direction=\"rx\"} 0",
            "meshauth_agent_tunnel_packets_dropped_total{reason=\"source_not_peer_pod\"} 1",
            "meshauth_agent_tunnel_packets_dropped_total{reason=\"no_peer\"} 0",
            "meshauth_agent_tunnel_handshakes_total 1",
            "meshauth_agent_tunnel_key_rotations_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(m.dropped(DropReason::SourceNotPeerPod), 1);
        assert_eq!(m.bytes(Direction::Tx), 148);
    }
}
