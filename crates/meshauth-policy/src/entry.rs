//! What the compiler produces per endpoint, and what the datapath enforces.

use crate::{IdentityId, NodeId};

/// Direction, from the endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// What the endpoint sends.
    Egress,
    /// What the endpoint receives.
    Ingress,
}

/// What policy requires before an allowed flow passes. Ordered by strength.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthType {
    /// Nothing.
    None,
    /// Mutual authentication of the two identities (`authentication.mode: required`).
    Required,
    /// Always fails (`authentication.mode: test-always-fail`).
    TestAlwaysFail,
}

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Let it through (subject to its `AuthType`).
    Allow,
    /// Drop it; wins over every allow.
    Deny,
}

/// An IP protocol policy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// ICMP (1).
    Icmp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Protocol::Icmp),
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "ICMP" => Ok(Protocol::Icmp),
            "SCTP" => Ok(Protocol::Sctp),
            _ => Err(format!(
                "unknown protocol {s:?}: use TCP, UDP, SCTP or ICMP"
            )),
        }
    }
}

/// An inclusive destination port range; [`PortRange::ANY`] matches every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port.
    pub end: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: PortRange = PortRange {
        start: 0,
        end: u16::MAX,
    };

    /// One port.
    pub fn single(port: u16) -> Self {
        PortRange {
            start: port,
            end: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

/// One compiled rule of an endpoint.
///
/// Wildcards: `remote: None` matches every identity (reserved ones included), `protocol: None`
/// every protocol, [`PortRange::ANY`] every port. ICMP has no port: an entry with
/// `protocol: Some(Icmp)` matches every ICMP packet (its ports are ignored), and a `protocol:
/// None` entry matches ICMP only with [`PortRange::ANY`]. A matching
/// `Deny` entry always wins; otherwise the most specific matching `Allow` entry decides and its
/// `auth` is already resolved (inheritance done by the compiler). [`crate::lookup`] is the
/// reference for this lookup; no matching entry means drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyEntry {
    /// Which way.
    pub direction: Direction,
    /// The peer's identity; `None` is any.
    pub remote: Option<IdentityId>,
    /// The protocol; `None` is any.
    pub protocol: Option<Protocol>,
    /// Destination ports (meaningless for ICMP).
    pub ports: PortRange,
    /// Allow or deny.
    pub verdict: Verdict,
    /// What an allow requires.
    pub auth: AuthType,
}

/// The key of an auth entry: a pair of identities, the peer's node, the kind of authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct AuthKey {
    /// The identity on this node.
    pub local: IdentityId,
    /// The peer's identity.
    pub remote: IdentityId,
    /// The peer's node.
    pub remote_node: NodeId,
    /// What kind of authentication it records.
    pub auth_type: AuthType,
}
