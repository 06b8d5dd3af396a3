//! Numeric identifiers shared by the control plane and the datapath.
//!
//! Both are plain `u32` on the wire and in BPF maps; in Rust they are distinct types so that an
//! identity can never be passed where a node is meant.

use std::fmt;

/// A numeric security identity: one per distinct label set, plus a few reserved values.
///
/// Its SPIFFE ID is `spiffe://<trust-domain>/identity/<id>`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct IdentityId(u32);

impl IdentityId {
    /// Reserved: no identity known (never allowed by policy, never authenticated).
    pub const UNKNOWN: IdentityId = IdentityId(0);
    /// Reserved: the node itself (the `host` entity).
    pub const HOST: IdentityId = IdentityId(1);
    /// Reserved: anything outside the cluster (the `world` entity).
    pub const WORLD: IdentityId = IdentityId(2);
    /// Reserved: a pod the agent does not manage (the `unmanaged` entity).
    pub const UNMANAGED: IdentityId = IdentityId(3);
    /// Reserved: another node of the cluster (the `remote-node` entity): the addresses of the
    /// other nodes, as the agent knows them. Cilium's number for it.
    pub const REMOTE_NODE: IdentityId = IdentityId(6);
    /// The first identity handed out for label sets; everything below is reserved.
    pub const FIRST_ALLOCATED: u32 = 256;
    /// The first node-local identity (Cilium's local scope, bit 24): each node numbers the CIDR
    /// prefixes of its policies from here (see [`crate::cidr::CidrIdentities`]). Label-set
    /// identities stay below it.
    pub const FIRST_LOCAL: u32 = 1 << 24;
    /// The last node-local identity (16,777,216 numbers in all).
    pub const LAST_LOCAL: u32 = (1 << 25) - 1;

    /// Wraps a raw value (from a map, the wire or the store).
    pub const fn new(raw: u32) -> Self {
        IdentityId(raw)
    }

    /// The raw value, for maps and the wire.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// True for the reserved identities (below [`IdentityId::FIRST_ALLOCATED`]).
    pub const fn is_reserved(self) -> bool {
        self.0 < Self::FIRST_ALLOCATED
    }

    /// True for node-local identities ([`IdentityId::FIRST_LOCAL`] to
    /// [`IdentityId::LAST_LOCAL`]): CIDR prefixes, numbered by each node for itself.
    pub const fn is_local(self) -> bool {
        self.0 >= Self::FIRST_LOCAL && self.0 <= Self::LAST_LOCAL
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A numeric node identifier, allocated by the server when a node first attests.
///
/// `0` means "this node" (local) in the datapath.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(u32);

impl NodeId {
    /// The local node, as the datapath sees it.
    pub const LOCAL: NodeId = NodeId(0);

    /// Wraps a raw value (from a map, the wire or the store).
    pub const fn new(raw: u32) -> Self {
        NodeId(raw)
    }

    /// The raw value, for maps and the wire.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node's WireGuard public key (Curve25519, 32 bytes), as the node published it to the
/// server over its attested connection. Shown in standard base64, as `wg` shows keys.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelKey([u8; 32]);

impl TunnelKey {
    /// Wraps 32 key bytes.
    pub const fn new(bytes: [u8; 32]) -> Self {
        TunnelKey(bytes)
    }

    /// The key from the wire or the store: exactly 32 bytes, else `None`.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(TunnelKey)
    }

    /// The key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for TunnelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine as _;
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for TunnelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TunnelKey({self})")
    }
}

impl std::str::FromStr for TunnelKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|b| TunnelKey::from_slice(&b))
            .ok_or_else(|| format!("{s:?} is not a WireGuard key: expected 32 bytes in base64"))
    }
}
