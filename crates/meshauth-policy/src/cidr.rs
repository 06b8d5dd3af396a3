//! CIDR prefixes: parsing, containment, the rules that name them, and the node-local identities
//! of the prefixes policies name.
//!
//! # How addresses outside the cluster get identities (as in Cilium)
//! Workloads have identities derived from their labels; addresses outside the cluster have
//! none, so, as Cilium does, every CIDR prefix that a policy names (`fromCIDR`, `toCIDR`,
//! `fromCIDRSet`/`toCIDRSet`, their `cidr` **and** their `except` prefixes) gets a node-local
//! identity of its own, with Cilium's labels `cidr:<prefix>` and `reserved:world`
//! ([`Cidr::labels`]). The agent puts every such prefix in its ipcache (the address → identity
//! longest-prefix-match table) with that identity ([`CidrIdentities::ipcache_entries`]), plus
//! `0.0.0.0/0` (and `::/0`) → [`IdentityId::WORLD`] for the rest of the address space. Pod and
//! node addresses are `/32` entries with their own identities, longer than any other prefix,
//! and where a policy names exactly a pod's or node's `/32` the pod's or node's entry must win
//! (as Cilium's ipcache prefers them): CIDR rules never select workloads or nodes (as in Cilium
//! by default).
//!
//! An address then has the identity of the longest prefix that contains it, and a rule with
//! prefix `Q` and excepts `E…` matches a prefix identity `P` iff `P ⊆ Q` and `P` is inside no
//! `E` ([`CidrRule::matches_prefix`]); it matches [`IdentityId::WORLD`] iff `Q` is a `/0` that
//! no except removes ([`CidrRule::matches_world`]). Because every except has its own entry,
//! this is exactly "the address is in `Q` and in no `E`" ([`CidrRule::matches_address`]).
//!
//! # Numbers
//! Node-local identities are numbered from [`IdentityId::FIRST_LOCAL`] (16,777,216, Cilium's
//! local scope) to [`IdentityId::LAST_LOCAL`], by each agent for itself: no coordination with
//! the server or the other nodes is needed, since these numbers never leave the node (no SPIFFE
//! identity, no authentication). [`CidrIdentities`] is a small pure allocator: a prefix keeps
//! its number while policies name it; new prefixes take the next free number.
//! [`CidrIdentities::for_policies`] numbers a policy set from scratch, in prefix order, which is
//! deterministic for a given set of policies.
//!
//! # Families
//! IPv4 and IPv6 prefixes are both parsed and matched; there is one world identity for both
//! families (as in Cilium without dual stack). meshauth's datapath handles IPv4 only, so the
//! agent may leave the IPv6 entries out of its ipcache.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::IdentityId;
use crate::policy::{PeerRule, Peers, Policy};

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a CIDR: {why}")]
pub struct CidrError {
    /// The string.
    pub input: String,
    /// What is wrong.
    pub why: &'static str,
}

/// An IPv4 or IPv6 prefix, with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

fn family_bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn mask(prefix_len: u8, max: u8) -> u128 {
    if prefix_len == 0 {
        return 0;
    }
    let full = if max == 128 {
        u128::MAX
    } else {
        (1u128 << max) - 1
    };
    (u128::MAX << (max - prefix_len)) & full
}

fn from_bits(bits: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(
            u32::try_from(bits & u128::from(u32::MAX)).unwrap_or(0),
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

impl Cidr {
    /// `0.0.0.0/0`: in the ipcache, the rest of the IPv4 space, [`IdentityId::WORLD`].
    pub const ALL_V4: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix_len: 0,
    };
    /// `::/0`: in the ipcache, the rest of the IPv6 space, [`IdentityId::WORLD`].
    pub const ALL_V6: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix_len: 0,
    };

    /// The prefix of `addr` of length `prefix_len`; host bits are cleared (`10.1.2.3/8` is
    /// `10.0.0.0/8`, as Cilium masks them). `None` if the length exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let (bits, max) = family_bits(addr);
        if prefix_len > max {
            return None;
        }
        Some(Cidr {
            addr: from_bits(bits & mask(prefix_len, max), addr.is_ipv4()),
            prefix_len,
        })
    }

    /// The single address `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix_len: family_bits(addr).1,
        }
    }

    /// Parses prefix notation, `<address>/<length>` (what `cidr` and `except` of a
    /// `toCIDRSet` take). Host bits are cleared, as Cilium does.
    pub fn parse_prefix(s: &str) -> Result<Cidr, CidrError> {
        let err = |why| CidrError {
            input: s.to_owned(),
            why,
        };
        let Some((a, l)) = s.split_once('/') else {
            return Err(err(
                "expected an address and a prefix length, e.g. 10.0.0.0/8 or 10.0.0.1/32",
            ));
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| err("the part before '/' is not an IPv4 or IPv6 address"))?;
        let canonical = !l.is_empty()
            && l.len() <= 3
            && l.bytes().all(|b| b.is_ascii_digit())
            && (l == "0" || !l.starts_with('0'));
        if !canonical {
            return Err(err("the prefix length is not a decimal number"));
        }
        let len: u8 = l
            .parse()
            .map_err(|_| err("the prefix length is not a decimal number"))?;
        Cidr::new(addr, len).ok_or_else(|| {
            err(if addr.is_ipv4() {
                "the prefix length of an IPv4 CIDR is at most 32"
            } else {
                "the prefix length of an IPv6 CIDR is at most 128"
            })
        })
    }

    /// Parses prefix notation or a single address (what `fromCIDR`/`toCIDR` take, as in
    /// Cilium: `20.1.1.1` is `20.1.1.1/32`).
    pub fn parse_prefix_or_addr(s: &str) -> Result<Cidr, CidrError> {
        if s.contains('/') {
            return Cidr::parse_prefix(s);
        }
        s.parse::<IpAddr>().map(Cidr::host).map_err(|_| CidrError {
            input: s.to_owned(),
            why: "expected an IP address or a prefix, e.g. 20.1.1.1 or 10.0.0.0/8",
        })
    }

    /// The network address (host bits clear).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether this is an IPv4 prefix.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether this is a `/0`: the whole space of its family, which the ipcache maps to
    /// [`IdentityId::WORLD`] (no prefix identity of its own).
    pub fn is_all(&self) -> bool {
        self.prefix_len == 0
    }

    /// Whether `other` lies inside this prefix (same family, at least as long, same network).
    pub fn contains(&self, other: &Cidr) -> bool {
        let (a, max) = family_bits(self.addr);
        let (b, _) = family_bits(other.addr);
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && other.prefix_len >= self.prefix_len
            && b & mask(self.prefix_len, max) == a
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.contains(&Cidr::host(addr))
    }

    /// The labels of this prefix's identity, as Cilium writes them: `cidr:<prefix>` (IPv6 with
    /// `-` for `:`, Cilium's label spelling) and `reserved:world`. For display and flow logs;
    /// they are not workload [`crate::Labels`] and no endpoint selector matches them.
    pub fn labels(&self) -> Vec<String> {
        let ip = self.addr.to_string();
        let mut key = String::with_capacity(ip.len() + 2);
        if ip.contains(':') {
            let n = ip.len();
            for (i, c) in ip.chars().enumerate() {
                match c {
                    ':' if i == 0 => key.push_str("0-"),
                    ':' if i + 1 == n => key.push_str("-0"),
                    ':' => key.push('-'),
                    c => key.push(c),
                }
            }
        } else {
            key.push_str(&ip);
        }
        vec![
            format!("cidr:{key}/{}", self.prefix_len),
            "reserved:world".to_owned(),
        ]
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Prefix notation; see [`Cidr::parse_prefix`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse_prefix(s)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One CIDR peer of a rule: `fromCIDR`/`toCIDR` entries (no excepts) and `fromCIDRSet`/
/// `toCIDRSet` entries (`cidr` with `except`). Every except lies inside `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CidrRule {
    /// The prefix allowed (or denied).
    pub cidr: Cidr,
    /// Prefixes inside `cidr` that the rule leaves out.
    pub except: Vec<Cidr>,
}

impl CidrRule {
    /// Whether the identity of prefix `p` matches: `p ⊆ cidr` and `p` inside no except.
    pub fn matches_prefix(&self, p: &Cidr) -> bool {
        self.cidr.contains(p) && !self.except.iter().any(|e| e.contains(p))
    }

    /// Whether an address outside the cluster matches: in `cidr` and in no except.
    pub fn matches_address(&self, addr: IpAddr) -> bool {
        self.matches_prefix(&Cidr::host(addr))
    }

    /// Whether [`IdentityId::WORLD`] (the `/0` entry: addresses no named prefix contains)
    /// matches: `cidr` is a `/0` and no except is.
    pub fn matches_world(&self) -> bool {
        self.cidr.is_all() && !self.except.iter().any(Cidr::is_all)
    }
}

fn peer_rules(policy: &Policy) -> impl Iterator<Item = &PeerRule> {
    policy.rules.iter().flat_map(|r| {
        r.ingress
            .iter()
            .chain(&r.egress)
            .chain(&r.ingress_deny)
            .chain(&r.egress_deny)
    })
}

/// Every prefix the policies name (each `cidr` and each `except`, allow and deny rules alike),
/// except the `/0`s, which are [`IdentityId::WORLD`]: the prefixes that need an ipcache entry
/// with an identity of their own.
pub fn cidr_prefixes(policies: &[Policy]) -> BTreeSet<Cidr> {
    cidr_prefixes_of(policies)
}

pub(crate) fn cidr_prefixes_of<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
) -> BTreeSet<Cidr> {
    let mut out = BTreeSet::new();
    for pr in policies.into_iter().flat_map(peer_rules) {
        if let Peers::Listed { cidrs, .. } = &pr.peers {
            for r in cidrs {
                out.extend(
                    std::iter::once(&r.cidr)
                        .chain(&r.except)
                        .filter(|c| !c.is_all()),
                );
            }
        }
    }
    out
}

/// What a [`CidrIdentities::sync`] changed: what to add to and remove from the ipcache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrChanges {
    /// Prefixes newly numbered.
    pub added: Vec<(Cidr, IdentityId)>,
    /// Prefixes no policy names any more, with the number they had.
    pub removed: Vec<(Cidr, IdentityId)>,
    /// Prefixes left without a number: the node-local range is full (16,777,216 prefixes).
    pub unallocated: Vec<Cidr>,
}

impl CidrChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.unallocated.is_empty()
    }
}

/// The node-local identities of CIDR prefixes: a pure allocator (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrIdentities {
    by_prefix: BTreeMap<Cidr, IdentityId>,
    by_id: BTreeMap<IdentityId, Cidr>,
    next: u32,
}

impl Default for CidrIdentities {
    fn default() -> Self {
        Self::new()
    }
}

impl CidrIdentities {
    /// No prefixes.
    pub fn new() -> Self {
        CidrIdentities {
            by_prefix: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next: IdentityId::FIRST_LOCAL,
        }
    }

    /// The prefixes of `policies` ([`cidr_prefixes`]) numbered from scratch in prefix order,
    /// from [`IdentityId::FIRST_LOCAL`]: the same policies always give the same numbers.
    pub fn for_policies(policies: &[Policy]) -> Self {
        let mut c = Self::new();
        c.sync(&cidr_prefixes(policies));
        c
    }

    fn free_number(&self) -> Option<u32> {
        let mut cand = self.next;
        for id in self
            .by_id
            .range(IdentityId::new(self.next)..)
            .map(|(id, _)| id.get())
        {
            if id != cand {
                break;
            }
            cand += 1;
        }
        if cand <= IdentityId::LAST_LOCAL {
            return Some(cand);
        }
        let mut cand = IdentityId::FIRST_LOCAL;
        for id in self
            .by_id
            .range(..IdentityId::new(self.next))
            .map(|(id, _)| id.get())
        {
            if id != cand {
                break;
            }
            cand += 1;
        }
        (cand < self.next).then_some(cand)
    }

    /// Makes the numbered prefixes exactly `prefixes` (`/0`s are skipped: they are
    /// [`IdentityId::WORLD`]): prefixes already numbered keep their number, removed ones free
    /// theirs, new ones take the next free number (in prefix order). Returns the changes.
    pub fn sync(&mut self, prefixes: &BTreeSet<Cidr>) -> CidrChanges {
        let mut changes = CidrChanges::default();
        let gone: Vec<Cidr> = self
            .by_prefix
            .keys()
            .filter(|p| !prefixes.contains(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(id) = self.by_prefix.remove(&p) {
                self.by_id.remove(&id);
                changes.removed.push((p, id));
            }
        }
        for p in prefixes.iter().filter(|p| !p.is_all()) {
            if self.by_prefix.contains_key(p) {
                continue;
            }
            let Some(n) = self.free_number() else {
                changes.unallocated.push(*p);
                continue;
            };
            let id = IdentityId::new(n);
            self.by_prefix.insert(*p, id);
            self.by_id.insert(id, *p);
            self.next = if n == IdentityId::LAST_LOCAL {
                IdentityId::FIRST_LOCAL
            } else {
                n + 1
            };
            changes.added.push((*p, id));
        }
        changes
    }

    /// The identity of prefix `prefix` (`/0`s: [`IdentityId::WORLD`]).
    pub fn get(&self, prefix: &Cidr) -> Option<IdentityId> {
        if prefix.is_all() {
            return Some(IdentityId::WORLD);
        }
        self.by_prefix.get(prefix).copied()
    }

    /// The prefix numbered `id`.
    pub fn prefix(&self, id: IdentityId) -> Option<Cidr> {
        self.by_id.get(&id).copied()
    }

    /// Every numbered prefix, in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (Cidr, IdentityId)> + '_ {
        self.by_prefix.iter().map(|(p, id)| (*p, *id))
    }

    /// How many prefixes are numbered.
    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    /// Whether no prefix is numbered.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// What the ipcache must hold for addresses outside the cluster: `0.0.0.0/0` and `::/0` →
    /// [`IdentityId::WORLD`], then every numbered prefix → its identity. Looked up by longest
    /// prefix match (pod and node `/32`s, added by the agent, win over all of them).
    pub fn ipcache_entries(&self) -> Vec<(Cidr, IdentityId)> {
        [
            (Cidr::ALL_V4, IdentityId::WORLD),
            (Cidr::ALL_V6, IdentityId::WORLD),
        ]
        .into_iter()
        .chain(self.iter())
        .collect()
    }

    /// The identity the ipcache gives an address outside the cluster: the longest numbered
    /// prefix containing it, else [`IdentityId::WORLD`]. The reference for the agent's
    /// longest-prefix-match table.
    pub fn identity_of(&self, addr: IpAddr) -> IdentityId {
        let max = family_bits(addr).1;
        (1..=max)
            .rev()
            .filter_map(|len| Cidr::new(addr, len))
            .find_map(|p| self.by_prefix.get(&p).copied())
            .unwrap_or(IdentityId::WORLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse_prefix_or_addr(s).unwrap()
    }

    #[test]
    fn parsing_and_host_bits() {
        assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("20.1.1.1").to_string(), "20.1.1.1/32");
        assert_eq!(c("0.0.0.0/0"), Cidr::ALL_V4);
        assert_eq!(c("1.2.3.4/0"), Cidr::ALL_V4);
        assert_eq!(c("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::/0"), Cidr::ALL_V6);
        assert_eq!(c("::1").prefix_len(), 128);
        for (bad, why) in [
            ("10.0.0.0/33", "at most 32"),
            ("::/129", "at most 128"),
            ("10.0.0.0/", "decimal"),
            ("10.0.0.0/08", "decimal"),
            ("10.0.0.0/-1", "decimal"),
            ("10.0.0.0/ 8", "decimal"),
            ("10.0.0/8", "not an IPv4 or IPv6 address"),
            ("010.0.0.0/8", "not an IPv4 or IPv6 address"),
            ("example.com/8", "not an IPv4 or IPv6 address"),
            ("", "expected an IP address"),
            ("10.0.0.256", "expected an IP address"),
        ] {
            let e = Cidr::parse_prefix_or_addr(bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("is not a CIDR"),
                "{bad:?}: {e}"
            );
        }
        // Prefix notation only where Cilium requires it.
        assert!(Cidr::parse_prefix("20.1.1.1").is_err());
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap(), c("10.0.0.0/8"));
    }

    #[test]
    fn containment_edges() {
        let all = Cidr::ALL_V4;
        let ten = c("10.0.0.0/8");
        let host = c("10.1.1.1/32");
        assert!(all.contains(&ten) && all.contains(&host) && all.contains(&all));
        assert!(ten.contains(&host) && ten.contains(&ten) && !host.contains(&ten));
        assert!(!ten.contains(&c("11.0.0.0/8")) && !ten.contains(&all));
        assert!(host.contains(&host) && !host.contains(&c("10.1.1.2/32")));
        // Families never contain each other, /0 included.
        assert!(!all.contains(&c("::1")) && !Cidr::ALL_V6.contains(&ten));
        assert!(Cidr::ALL_V6.contains(&c("2001:db8::/32")));
        assert!(ten.contains_addr("10.255.255.255".parse().unwrap()));
        assert!(!ten.contains_addr("9.255.255.255".parse().unwrap()));
        assert!(c("255.255.255.255/32").contains_addr("255.255.255.255".parse().unwrap()));
        assert!(c("ffff::/16").contains(&c("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
    }

    #[test]
    fn rule_matching_with_excepts() {
        let r = CidrRule {
            cidr: c("10.0.0.0/8"),
            except: vec![c("10.96.0.0/12")],
        };
        assert!(r.matches_prefix(&c("10.0.0.0/8")) && r.matches_prefix(&c("10.1.0.0/16")));
        assert!(!r.matches_prefix(&c("10.96.0.0/12")) && !r.matches_prefix(&c("10.100.0.0/16")));
        assert!(!r.matches_prefix(&c("0.0.0.0/0")) && !r.matches_world());
        assert!(r.matches_address("10.1.2.3".parse().unwrap()));
        assert!(!r.matches_address("10.97.0.1".parse().unwrap()));
        // An except equal to the cidr leaves nothing.
        let none = CidrRule {
            cidr: c("10.0.0.0/8"),
            except: vec![c("10.0.0.0/8")],
        };
        assert!(
            !none.matches_prefix(&c("10.0.0.0/8"))
                && !none.matches_address("10.0.0.1".parse().unwrap())
        );
        // Nested excepts: the outer one already removes the inner one.
        let nested = CidrRule {
            cidr: c("10.0.0.0/8"),
            except: vec![c("10.1.0.0/16"), c("10.1.2.0/24")],
        };
        assert!(!nested.matches_address("10.1.2.3".parse().unwrap()));
        assert!(!nested.matches_address("10.1.3.3".parse().unwrap()));
        assert!(nested.matches_address("10.2.0.1".parse().unwrap()));
        // /0: the world identity, unless excepted.
        let world = CidrRule {
            cidr: Cidr::ALL_V4,
            except: vec![c("10.0.0.0/8")],
        };
        assert!(world.matches_world() && world.matches_prefix(&c("192.168.0.0/16")));
        assert!(!world.matches_prefix(&c("10.0.0.0/8")));
        let nothing = CidrRule {
            cidr: Cidr::ALL_V4,
            except: vec![Cidr::ALL_V4],
        };
        assert!(!nothing.matches_world() && !nothing.matches_prefix(&c("1.0.0.0/8")));
        // /32: one address.
        let one = CidrRule {
            cidr: c("20.1.1.1/32"),
            except: vec![],
        };
        assert!(one.matches_address("20.1.1.1".parse().unwrap()));
        assert!(!one.matches_address("20.1.1.2".parse().unwrap()));
    }

    #[test]
    fn allocator_is_stable_and_longest_prefix_wins() {
        let set = |v: &[&str]| v.iter().map(|s| c(s)).collect::<BTreeSet<_>>();
        let mut ids = CidrIdentities::new();
        let ch = ids.sync(&set(&[
            "10.0.0.0/8",
            "10.96.0.0/12",
            "20.1.1.1/32",
            "0.0.0.0/0",
        ]));
        let first = IdentityId::FIRST_LOCAL;
        assert_eq!(
            ch.added,
            vec![
                (c("10.0.0.0/8"), IdentityId::new(first)),
                (c("10.96.0.0/12"), IdentityId::new(first + 1)),
                (c("20.1.1.1/32"), IdentityId::new(first + 2)),
            ]
        );
        assert!(ch.removed.is_empty() && ids.len() == 3);
        assert!(ids.iter().all(|(_, id)| id.is_local()));
        assert_eq!(ids.get(&Cidr::ALL_V4), Some(IdentityId::WORLD));
        let id = |s: &str| ids.identity_of(s.parse().unwrap());
        assert_eq!(id("10.1.1.1"), IdentityId::new(first));
        assert_eq!(id("10.97.1.1"), IdentityId::new(first + 1));
        assert_eq!(id("20.1.1.1"), IdentityId::new(first + 2));
        assert_eq!(id("20.1.1.2"), IdentityId::WORLD);
        assert_eq!(id("2001:db8::1"), IdentityId::WORLD);
        assert_eq!(ids.ipcache_entries().len(), 5);
        assert_eq!(ids.ipcache_entries()[0], (Cidr::ALL_V4, IdentityId::WORLD));
        assert_eq!(
            ids.prefix(IdentityId::new(first + 1)),
            Some(c("10.96.0.0/12"))
        );
        // Changing the set keeps the survivors' numbers and does not reuse freed ones at once.
        let ch = ids.sync(&set(&["10.0.0.0/8", "192.0.2.0/24"]));
        assert_eq!(
            ch.removed,
            vec![
                (c("10.96.0.0/12"), IdentityId::new(first + 1)),
                (c("20.1.1.1/32"), IdentityId::new(first + 2))
            ]
        );
        assert_eq!(
            ch.added,
            vec![(c("192.0.2.0/24"), IdentityId::new(first + 3))]
        );
        assert_eq!(ids.get(&c("10.0.0.0/8")), Some(IdentityId::new(first)));
        assert!(ids.sync(&set(&["10.0.0.0/8", "192.0.2.0/24"])).is_empty());
        // The labels Cilium gives these identities.
        assert_eq!(
            c("10.0.0.0/8").labels(),
            ["cidr:10.0.0.0/8", "reserved:world"]
        );
        assert_eq!(c("::/0").labels()[0], "cidr:0--0/0");
        assert_eq!(c("2001:db8::/32").labels()[0], "cidr:2001-db8--0/32");
    }

    #[test]
    fn allocator_wraps_around_the_local_range() {
        let mut ids = CidrIdentities::new();
        ids.next = IdentityId::LAST_LOCAL;
        let set: BTreeSet<Cidr> = ["1.0.0.0/8", "2.0.0.0/8"].iter().map(|s| c(s)).collect();
        let ch = ids.sync(&set);
        assert_eq!(
            ch.added,
            vec![
                (c("1.0.0.0/8"), IdentityId::new(IdentityId::LAST_LOCAL)),
                (c("2.0.0.0/8"), IdentityId::new(IdentityId::FIRST_LOCAL)),
            ]
        );
    }
}
