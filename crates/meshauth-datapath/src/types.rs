//! The datapath's vocabulary as domain types; `abi` has the wire forms.

use std::fmt;
use std::net::Ipv4Addr;

use meshauth_policy::IdentityId;

pub use meshauth_policy::{
    AuthKey, AuthType, Direction, PolicyEntry, PortRange, Protocol, Verdict,
};

use crate::abi::c;

pub(crate) fn direction_raw(d: Direction) -> u8 {
    match d {
        Direction::Egress => c::DIR_EGRESS,
        Direction::Ingress => c::DIR_INGRESS,
    }
}

pub(crate) fn direction_from_raw(v: u8) -> Option<Direction> {
    match v {
        c::DIR_EGRESS => Some(Direction::Egress),
        c::DIR_INGRESS => Some(Direction::Ingress),
        _ => None,
    }
}

pub(crate) fn auth_raw(a: AuthType) -> u8 {
    match a {
        AuthType::None => c::AUTH_NONE,
        AuthType::Required => c::AUTH_REQUIRED,
        AuthType::TestAlwaysFail => c::AUTH_ALWAYS_FAIL,
        AuthType::PerConnection => c::AUTH_PER_CONNECTION,
    }
}

pub(crate) fn auth_from_raw(v: u8) -> Option<AuthType> {
    match v {
        c::AUTH_NONE => Some(AuthType::None),
        c::AUTH_REQUIRED => Some(AuthType::Required),
        c::AUTH_ALWAYS_FAIL => Some(AuthType::TestAlwaysFail),
        c::AUTH_PER_CONNECTION => Some(AuthType::PerConnection),
        _ => None,
    }
}

pub(crate) fn verdict_raw(v: Verdict) -> u8 {
    match v {
        Verdict::Allow => c::VERDICT_ALLOW,
        Verdict::Deny => c::VERDICT_DENY,
    }
}

pub(crate) fn verdict_from_raw(v: u8) -> Option<Verdict> {
    match v {
        c::VERDICT_ALLOW => Some(Verdict::Allow),
        c::VERDICT_DENY => Some(Verdict::Deny),
        _ => None,
    }
}

/// The prefixes (port, bits) that cover exactly `range`, for the policy LPM trie: aligned
/// blocks of `2^(16 - bits)` ports starting at `port`, disjoint, in ascending order.
pub fn port_prefixes(range: PortRange) -> Vec<(u16, u8)> {
    let (mut start, end) = (u32::from(range.start), u32::from(range.end));
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

/// A numeric endpoint id, unique on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl EndpointId {
    /// The policy-map id under which a remote identity's ingress entries toward this node's
    /// identities are held: a pod's egress to `identity` requires authentication where that
    /// identity's own ingress policy does (so the sender holds, rather than the receiver
    /// dropping). Never a host-side ifindex (those stay below 2^31).
    pub fn peer(identity: IdentityId) -> Self {
        EndpointId(c::PEER_ENDPOINT_BASE | (identity.get() & !c::PEER_ENDPOINT_BASE))
    }

    /// Whether this id holds a remote identity's entries ([`EndpointId::peer`]).
    pub fn is_peer(self) -> bool {
        self.0 & c::PEER_ENDPOINT_BASE != 0
    }
}

/// A pod as the datapath knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Its id (keys its policy entries).
    pub id: EndpointId,
    /// Its security identity.
    pub identity: IdentityId,
    /// The only source address it may send from.
    pub ipv4: Ipv4Addr,
    /// The generation of its policy entries: tracked flows accepted under another generation
    /// are decided again on their next packet. Bump it after every change of its entries.
    pub policy_gen: u32,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Encryption on: from a pod of another node, but not out of the tunnel (plaintext).
    Unencrypted,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 6] = [
        DropReason::PolicyDenied,
        DropReason::AuthenticationRequired,
        DropReason::NoIdentity,
        DropReason::SpoofedSource,
        DropReason::Unsupported,
        DropReason::Unencrypted,
    ];

    pub(crate) fn from_raw(v: u8) -> Option<Self> {
        match v {
            c::REASON_POLICY_DENIED => Some(DropReason::PolicyDenied),
            c::REASON_AUTH_REQUIRED => Some(DropReason::AuthenticationRequired),
            c::REASON_NO_IDENTITY => Some(DropReason::NoIdentity),
            c::REASON_SPOOFED => Some(DropReason::SpoofedSource),
            c::REASON_UNSUPPORTED => Some(DropReason::Unsupported),
            c::REASON_UNENCRYPTED => Some(DropReason::Unencrypted),
            _ => None,
        }
    }

    pub(crate) fn raw(self) -> u8 {
        match self {
            DropReason::PolicyDenied => c::REASON_POLICY_DENIED,
            DropReason::AuthenticationRequired => c::REASON_AUTH_REQUIRED,
            DropReason::NoIdentity => c::REASON_NO_IDENTITY,
            DropReason::SpoofedSource => c::REASON_SPOOFED,
            DropReason::Unsupported => c::REASON_UNSUPPORTED,
            DropReason::Unencrypted => c::REASON_UNENCRYPTED,
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
            DropReason::Unencrypted => "unencrypted",
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
    /// ICMP: the type, which policy decided on in place of a port (0 for other protocols).
    pub icmp_type: u8,
    /// TCP flags (TCP only).
    pub tcp_flags: u8,
    /// `None` when forwarded (or held).
    pub drop: Option<DropReason>,
    /// Marked for the node's hold queue: it waits there until its pair authenticates.
    pub held: bool,
    /// Source identity (0 when unknown).
    pub src_identity: IdentityId,
    /// Destination identity (0 when unknown).
    pub dst_identity: IdentityId,
    /// The veth the program ran on.
    pub ifindex: u32,
    /// Which program decided.
    pub direction: Direction,
    /// The packet belonged to a tracked flow that was decided again (its policy, the ipcache
    /// or its auth entry changed, or it was idle past its timeout).
    pub established: bool,
    /// For `AuthenticationRequired`: the auth entry that would have let it pass.
    pub auth_key: Option<AuthKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(r: PortRange) -> Vec<u16> {
        let mut ports: Vec<u16> = port_prefixes(r)
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
        assert_eq!(port_prefixes(PortRange::ANY), vec![(0, 0)]);
        assert_eq!(port_prefixes(PortRange::single(80)), vec![(80, 16)]);
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
