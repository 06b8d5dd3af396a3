//! What the compiler produces per endpoint, and what the datapath enforces.
//!
//! # ICMP types in the port field
//! ICMP and ICMPv6 have no ports. As in Cilium, the ICMP **type** takes the place of the
//! destination port in an entry's key: an `icmps` rule allowing type 8 compiles to an entry with
//! `protocol: Some(Icmp)` and `ports: PortRange::single(8)`, and a packet is looked up with its
//! ICMP type as the port ([`crate::lookup`] with `port` = the type, 0 to 255). An ICMP entry
//! with [`PortRange::ANY`] (from `toPorts` with `protocol: ICMP`, or an L3-only rule) matches
//! every type. The datapath must therefore put the ICMP type (not the echo id, not 0) in the
//! port it looks up for ICMP packets.

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
    /// A fresh mutual authentication for each new connection, its entry living as long as the
    /// connection (`required` in a policy annotated `meshauth.io/authentication:
    /// per-connection`).
    PerConnection,
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
    /// ICMPv6 (58): only `icmps` rules with `family: IPv6` name it.
    Icmpv6,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmpv6 => 58,
        }
    }

    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Protocol::Icmp),
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            58 => Some(Protocol::Icmpv6),
            _ => None,
        }
    }
}

impl Protocol {
    /// Whether this is ICMP or ICMPv6: no ports; the ICMP type stands in the port field.
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmp | Protocol::Icmpv6)
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
            "ICMPV6" => Ok(Protocol::Icmpv6),
            _ => Err(format!(
                "unknown protocol {s:?}: use TCP, UDP, SCTP, ICMP or ICMPV6"
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
/// Wildcards: `remote: None` matches every identity (reserved ones included, node-local CIDR
/// identities too), `protocol: None` every protocol, [`PortRange::ANY`] every port. ICMP and
/// ICMPv6 have no port: their `ports` are a range of ICMP **types** (see the module docs), so an
/// entry with `protocol: Some(Icmp)` and `ports: PortRange::single(8)` matches echo requests only
/// and one with [`PortRange::ANY`] every ICMP packet; a `protocol: None` entry matches ICMP only
/// with [`PortRange::ANY`]. A matching
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
    /// Destination ports; for ICMP and ICMPv6, the ICMP types.
    pub ports: PortRange,
    /// Allow or deny.
    pub verdict: Verdict,
    /// What an allow requires.
    pub auth: AuthType,
}

/// The connection a per-connection auth entry is for, as its first packet went: from the
/// initiating pod to the other (the same on both nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Connection {
    /// The initiating pod's address.
    pub src: std::net::Ipv4Addr,
    /// The other pod's address.
    pub dst: std::net::Ipv4Addr,
    /// Source port (ICMP: the echo id).
    pub sport: u16,
    /// Destination port (ICMP: the echo id).
    pub dport: u16,
    /// IP protocol number.
    pub protocol: u8,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = Protocol::from_number(self.protocol).map_or_else(
            || self.protocol.to_string(),
            |p| format!("{p:?}").to_uppercase(),
        );
        write!(
            f,
            "{proto} {}:{} -> {}:{}",
            self.src, self.sport, self.dst, self.dport
        )
    }
}

/// The key of an auth entry: a pair of identities, the peer's node, the kind of authentication,
/// and for [`AuthType::PerConnection`] the connection.
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
    /// The connection, for [`AuthType::PerConnection`] (`None` otherwise).
    pub connection: Option<Connection>,
}
