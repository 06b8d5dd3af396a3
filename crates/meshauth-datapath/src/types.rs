//! The datapath's vocabulary as domain types; `abi` has the wire forms.

use std::fmt;
use std::net::Ipv4Addr;

use meshauth_policy::{IdentityId, NodeId};

/// Direction, from the pod's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// What the pod sends.
    Egress,
    /// What the pod receives.
    Ingress,
}

impl Direction {
    pub(crate) fn raw(self) -> u8 {
        match self {
            Direction::Egress => 0,
            Direction::Ingress => 1,
        }
    }

    pub(crate) fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(Direction::Egress),
            1 => Some(Direction::Ingress),
            _ => None,
        }
    }
}

/// What policy requires of a flow before it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthType {
    /// Nothing.
    None,
    /// Mutual authentication of the two identities (`authentication.mode: required`).
    Required,
    /// Always fails (`authentication.mode: test-always-fail`).
    TestAlwaysFail,
}

impl AuthType {
    pub(crate) fn raw(self) -> u8 {
        match self {
            AuthType::None => 0,
            AuthType::Required => 1,
            AuthType::TestAlwaysFail => 2,
        }
    }

    pub(crate) fn from_raw(v: u8) -> Option<Self> {
        match v {
            0 => Some(AuthType::None),
            1 => Some(AuthType::Required),
            2 => Some(AuthType::TestAlwaysFail),
            _ => None,
        }
    }
}

/// A policy verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let it through (subject to `AuthType`).
    Allow,
    /// Drop it; wins over any allow.
    Deny,
}

/// An IP protocol the datapath tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// An inclusive destination port range; `PortRange::ANY` matches every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

    /// The prefixes (port, bits) that cover exactly this range, for the policy LPM trie.
    pub(crate) fn prefixes(self) -> Vec<(u16, u8)> {
        let (mut start, end) = (u32::from(self.start), u32::from(self.end));
        let mut out = Vec::new();
        if start > end {
            return out;
        }
        while start <= end {
            // Largest aligned block starting at `start` that stays within `end`.
            let mut size = if start == 0 {
                1u32 << 16
            } else {
                1u32 << start.trailing_zeros().min(16)
            };
            while start + size - 1 > end {
                size >>= 1;
            }
            out.push((start as u16, 16 - size.trailing_zeros() as u8));
            start += size;
        }
        out
    }
}

/// A numeric endpoint id, unique on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// A pod as the datapath knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Its id (keys its policy entries).
    pub id: EndpointId,
    /// Its security identity.
    pub identity: IdentityId,
    /// The only source address it may send from.
    pub ipv4: Ipv4Addr,
}

/// One compiled policy rule for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    /// Which way.
    pub direction: Direction,
    /// The peer's identity; `None` is any.
    pub remote: Option<IdentityId>,
    /// The protocol; `None` is any.
    pub protocol: Option<Protocol>,
    /// Destination ports (ignored for ICMP).
    pub ports: PortRange,
    /// Allow or deny.
    pub verdict: Verdict,
    /// What an allow requires.
    pub auth: AuthType,
}

/// The key of an auth entry: a pair of identities on a pair of nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No policy entry allows it, or one denies it.
    PolicyDenied,
    /// Policy requires authentication and the pair has no live auth entry.
    AuthenticationRequired,
    /// The peer address has no identity in the ipcache.
    NoIdentity,
    /// The pod sent from an address that is not its own.
    SpoofedSource,
    /// Not IPv4 (this datapath handles IPv4 only for now).
    Unsupported,
}

impl DropReason {
    pub(crate) fn from_raw(v: u8) -> Option<Self> {
        match v {
            1 => Some(DropReason::PolicyDenied),
            2 => Some(DropReason::AuthenticationRequired),
            3 => Some(DropReason::NoIdentity),
            4 => Some(DropReason::SpoofedSource),
            5 => Some(DropReason::Unsupported),
            _ => None,
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::PolicyDenied => "policy denied",
            DropReason::AuthenticationRequired => "authentication required",
            DropReason::NoIdentity => "no identity",
            DropReason::SpoofedSource => "spoofed source",
            DropReason::Unsupported => "unsupported protocol",
        })
    }
}

/// A verdict the datapath reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEvent {
    /// CLOCK_BOOTTIME of the verdict, ns.
    pub boot_ns: u64,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port (ICMP: echo id).
    pub sport: u16,
    /// Destination port (ICMP: echo id).
    pub dport: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// TCP flags (TCP only).
    pub tcp_flags: u8,
    /// `None` when forwarded.
    pub drop: Option<DropReason>,
    /// Source identity (0 when unknown).
    pub src_identity: IdentityId,
    /// Destination identity (0 when unknown).
    pub dst_identity: IdentityId,
    /// The veth the program ran on.
    pub ifindex: u32,
    /// Which program decided.
    pub direction: Direction,
    /// For `AuthenticationRequired`: the auth entry that would have let it pass.
    pub auth_key: Option<AuthKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(r: PortRange) -> Vec<u16> {
        let mut ports: Vec<u16> = r
            .prefixes()
            .into_iter()
            .flat_map(|(p, bits)| {
                let size = 1u32 << (16 - bits);
                (u32::from(p)..u32::from(p) + size).map(|x| x as u16)
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    #[test]
    fn port_ranges_become_exact_prefix_sets() {
        assert_eq!(PortRange::ANY.prefixes(), vec![(0, 0)]);
        assert_eq!(PortRange::single(80).prefixes(), vec![(80, 16)]);
        for (s, e) in [
            (80, 80),
            (8000, 8080),
            (1, 65535),
            (0, 1023),
            (1024, 65535),
            (65535, 65535),
            (5, 3),
        ] {
            let r = PortRange { start: s, end: e };
            let expected: Vec<u16> = if s <= e { (s..=e).collect() } else { vec![] };
            assert_eq!(covers(r), expected, "{s}-{e}");
        }
    }
}
