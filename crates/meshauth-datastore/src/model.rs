//! The records the registry keeps, as domain types. Rows become these types once, when read.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_policy::{NodeId, TunnelKey};
use meshauth_spiffe::SpiffeId;

/// A node's name: the last segment of its SPIFFE ID `spiffe://<td>/node/<name>`.
///
/// 1 to 63 characters of `[a-z0-9-_.]`, not `.` or `..`: it must be a valid SPIFFE path segment
/// and a sensible host name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(String);

/// Why a string is not a [`NodeName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {why}")]
pub struct InvalidNodeName {
    name: String,
    why: &'static str,
}

impl FromStr for NodeName {
    type Err = InvalidNodeName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| {
            Err(InvalidNodeName {
                name: s.chars().take(80).collect(),
                why,
            })
        };
        if s.is_empty() {
            return bad("it is empty");
        }
        if s.len() > 63 {
            return bad("it is longer than 63 characters");
        }
        if s == "." || s == ".." {
            return bad("`.` and `..` are not allowed");
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        }) {
            return bad("use only lowercase letters, digits, `-`, `_` and `.`");
        }
        Ok(NodeName(s.to_owned()))
    }
}

impl NodeName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload selector `type:value`, e.g. `unix:uid:1000` (type `unix`, value `uid:1000`).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Selector {
    /// The attestor that produces it, e.g. `unix` or `netns`.
    pub kind: String,
    /// What the attestor observed, e.g. `uid:1000`.
    pub value: String,
}

/// Why a string is not a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid selector {0:?}: expected `type:value` with a non-empty type of [a-z0-9_-] and a non-empty value, e.g. unix:uid:1000"
)]
pub struct InvalidSelector(String);

impl Selector {
    /// Builds a selector from its parts, with the same rules as parsing `type:value`.
    pub fn new(kind: &str, value: &str) -> Result<Self, InvalidSelector> {
        format!("{kind}:{value}").parse()
    }
}

impl FromStr for Selector {
    type Err = InvalidSelector;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kind, value)) = s.split_once(':') else {
            return Err(InvalidSelector(s.to_owned()));
        };
        let kind_ok = !kind.is_empty()
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if !kind_ok || value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control)
        {
            return Err(InvalidSelector(s.chars().take(80).collect()));
        }
        Ok(Selector {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The identifier of a registration entry (32 lowercase hex characters, random).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(String);

/// Why a string is not an [`EntryId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid entry id {0:?}: expected 32 lowercase hex characters (see `meshauth entry show`)")]
pub struct InvalidEntryId(String);

impl EntryId {
    /// A fresh random id.
    pub fn random() -> Self {
        EntryId(random_hex(16))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = InvalidEntryId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(EntryId(s.to_owned()))
        } else {
            Err(InvalidEntryId(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registration entry: workloads under `parent_id` that match every selector get `spiffe_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Its identifier.
    pub id: EntryId,
    /// The identity issued.
    pub spiffe_id: SpiffeId,
    /// The node (agent) allowed to obtain it.
    pub parent_id: SpiffeId,
    /// All must match the caller (sorted, no duplicates).
    pub selectors: Vec<Selector>,
    /// SVID lifetime; `None` is the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// DNS SANs added to the SVID.
    pub dns_names: Vec<String>,
    /// Increases on every update of this entry.
    pub revision: u64,
}

/// The fields of a new entry (the store assigns id and revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// The identity issued.
    pub spiffe_id: SpiffeId,
    /// The node (agent) allowed to obtain it.
    pub parent_id: SpiffeId,
    /// All must match the caller.
    pub selectors: Vec<Selector>,
    /// SVID lifetime; `None` is the server default.
    pub x509_svid_ttl: Option<Duration>,
    /// DNS SANs added to the SVID.
    pub dns_names: Vec<String>,
}

/// Filters of [`crate::Store::list_entries`]; `None`/empty matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
    /// Only entries that have every one of these selectors.
    pub selectors: Vec<Selector>,
}

impl EntryFilter {
    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &RegistrationEntry) -> bool {
        self.spiffe_id
            .as_ref()
            .is_none_or(|id| *id == entry.spiffe_id)
            && self
                .parent_id
                .as_ref()
                .is_none_or(|id| *id == entry.parent_id)
            && self.selectors.iter().all(|s| entry.selectors.contains(s))
    }
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Its name.
    pub name: NodeName,
    /// Its numeric id (datapath, auth map keys); never reused while the record exists.
    pub node_id: NodeId,
    /// Serial (hex) of its current node SVID.
    pub serial: String,
    /// Serial of the SVID the last renewal replaced, still accepted until it expires.
    pub previous_serial: Option<String>,
    /// Expiry of its current node SVID.
    pub svid_not_after: SystemTime,
    /// Refused from now on (attestation and renewal).
    pub banned: bool,
    /// Where other agents reach it (handshake port), once it has synced.
    pub address: Option<std::net::IpAddr>,
    /// When it first attested.
    pub attested_at: SystemTime,
    /// How it last attested: what it can do when its SVID expires.
    pub attestation: NodeAttestation,
    /// The WireGuard public key it published (encryption on), if any.
    pub tunnel_key: Option<TunnelKey>,
}

/// How a node attested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAttestation {
    /// A single-use join token: once its SVID expired, the node needs a new token.
    JoinToken,
    /// Proof of possession of an operator-issued certificate (x509pop): the node attests again
    /// by itself whenever its SVID expired.
    X509Pop,
}

impl NodeAttestation {
    /// The name stored and shown (`join_token`, `x509pop`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAttestation::JoinToken => "join_token",
            NodeAttestation::X509Pop => "x509pop",
        }
    }

    /// Whether a node attested this way comes back by itself after its SVID expired.
    pub fn can_reattest(self) -> bool {
        self == NodeAttestation::X509Pop
    }
}

impl std::str::FromStr for NodeAttestation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "join_token" => Ok(NodeAttestation::JoinToken),
            "x509pop" => Ok(NodeAttestation::X509Pop),
            other => Err(format!("unknown attestation method {other:?}")),
        }
    }
}

impl NodeRecord {
    /// Whether a node SVID with this serial belongs to the node's current attestation: the
    /// latest SVID or the one it replaced. An SVID from before an eviction never matches.
    pub fn accepts_serial(&self, serial: &str) -> bool {
        self.serial == serial || self.previous_serial.as_deref() == Some(serial)
    }
}

/// An IPv4 prefix, such as a node's pod range (`10.200.1.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Range {
    /// The first address (host bits zero).
    pub base: std::net::Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub prefix: u8,
}

impl Ipv4Range {
    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Whether `ip` is in the range.
    pub fn contains(self, ip: std::net::Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(self, other: Ipv4Range) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.base) & m == u32::from(other.base) & m
    }
}

impl std::fmt::Display for Ipv4Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Range {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid IPv4 range {s:?}: use ADDRESS/PREFIX, e.g. 10.200.1.0/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let base: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let r = Ipv4Range { base, prefix };
        if u32::from(base) & !r.mask() != 0 {
            return Err(format!(
                "invalid IPv4 range {s:?}: host bits are set (did you mean {}/{prefix}?)",
                std::net::Ipv4Addr::from(u32::from(base) & r.mask())
            ));
        }
        Ok(r)
    }
}

/// What the operator (or the server, at attestation) bound to a node name: where it is
/// reached and which pod addresses it may report. A node cannot change either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node.
    pub name: NodeName,
    /// Its address (handshake port); `None` until it attests, when the address it connects
    /// from is bound.
    pub address: Option<std::net::IpAddr>,
    /// The addresses its pods may have.
    pub pod_range: Ipv4Range,
}

/// What a node reported about one of its pods: facts of its runtime, never its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRuntime {
    /// The pod's address, inside its node's pod range, unique in the cluster.
    pub ipv4: std::net::Ipv4Addr,
    /// The node-side interface.
    pub interface: String,
}

/// A pod as the control plane placed it (the orchestrator side: the admin API), with what its
/// node reported about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Its namespace.
    pub namespace: String,
    /// Its name, unique in the namespace.
    pub name: String,
    /// Its labels.
    pub labels: meshauth_policy::Labels,
    /// The node the control plane bound it to.
    pub node: NodeName,
    /// The identity of its labels.
    pub identity: meshauth_policy::IdentityId,
    /// Reported by its node once it runs there.
    pub runtime: Option<PodRuntime>,
}

/// A join token as returned to the operator: the secret itself is only ever shown once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedJoinToken {
    /// The secret to pass to `meshauth agent run --join-token`.
    pub token: String,
    /// The node it may attest.
    pub node: NodeName,
    /// After this it is refused.
    pub expires_at: SystemTime,
}

/// Random lowercase hex of `bytes` random bytes, from the system CSPRNG.
pub(crate) fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    // The system RNG failing is not recoverable and not input-derived.
    #[allow(
        clippy::expect_used,
        reason = "the OS random source does not fail on Linux"
    )]
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("system random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_secs`].
pub(crate) fn from_unix_secs(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["n1", "node-a", "worker_3.eu"] {
            assert!(ok.parse::<NodeName>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "N1", "a/b", "a b", &"x".repeat(64), "é"] {
            assert!(bad.parse::<NodeName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!((s.kind.as_str(), s.value.as_str()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        for bad in ["unix", ":x", "unix:", "Unix:uid:1", "un ix:a", "a:b\nc"] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entry_ids() {
        let id = EntryId::random();
        assert_eq!(id.as_str().parse::<EntryId>().unwrap(), id);
        assert_ne!(EntryId::random(), id);
        assert!("xyz".parse::<EntryId>().is_err());
        assert!(
            "ABCDEF00ABCDEF00ABCDEF00ABCDEF00"
                .parse::<EntryId>()
                .is_err()
        );
    }
}
