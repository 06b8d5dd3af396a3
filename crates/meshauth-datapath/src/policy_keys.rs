//! The policy map's keys, planned so that the kernel's lookup means what
//! [`meshauth_policy::lookup`] means. Pure: no maps, no syscalls, unit- and property-tested
//! without root.
//!
//! # The kernel's lookup
//! `policy_lookup` in `bpf/datapath.bpf.c` tries four keys in a fixed order, each an LPM lookup
//! over the destination port, and the **first hit decides** (its verdict and auth type):
//!
//! 1. (remote identity, protocol)
//! 2. (remote identity, any protocol)
//! 3. (any identity, protocol)
//! 4. (any identity, any protocol)
//!
//! No hit anywhere denies. The port looked up is the destination port for TCP, UDP and SCTP,
//! the ICMP **type** for ICMP (as in Cilium and in [`meshauth_policy::lookup`], where an ICMP
//! entry's ports are a range of types), and 0 for every other protocol.
//!
//! An LPM lookup returns only the longest matching prefix, so writing each compiled entry as
//! its own prefixes cannot express "a broad deny beats a narrow allow" or "the most specific
//! allow decides across identities and protocols". Instead, every packet is put in a *class*
//! (a remote identity named by some entry, or "any other"; a protocol TCP/UDP/SCTP/ICMP, or
//! "any other") and, for each class, this module computes the answer
//! [`meshauth_policy::lookup`] gives over the port space. Classes are written from the last in
//! the kernel's order to the first; a class gets a key only for the port intervals where its
//! answer differs from what the kernel would already answer by falling through to the classes
//! after it. The blocks of one class are disjoint, so the longest match in a class is its only
//! match. By construction the kernel then answers every packet as `lookup` does; the
//! property test in `tests/kernel_model.rs` checks it against random policies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use meshauth_policy::{AuthType, Direction, IdentityId, PolicyEntry, PortRange, Protocol, Verdict};

use crate::types::port_prefixes;

/// One key of the policy map for one endpoint (the endpoint id is added by the loader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Which way.
    pub direction: Direction,
    /// The peer identity; `None` is the "any identity" key.
    pub remote: Option<IdentityId>,
    /// The protocol; `None` is the "any protocol" key.
    pub protocol: Option<Protocol>,
    /// First port of the prefix block.
    pub port: u16,
    /// Prefix length over the 16 port bits (0: every port, 16: one port).
    pub bits: u8,
}

/// What a key answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// What an allow requires (always [`AuthType::None`] for a deny).
    pub auth: AuthType,
}

impl Decision {
    /// What no matching key means.
    pub const DENY: Decision = Decision {
        verdict: Verdict::Deny,
        auth: AuthType::None,
    };

    fn of((verdict, auth): (Verdict, AuthType)) -> Decision {
        match verdict {
            Verdict::Deny => Decision::DENY,
            Verdict::Allow => Decision { verdict, auth },
        }
    }
}

/// The planned keys of one endpoint.
pub type PolicyKeys = BTreeMap<PolicyKey, Decision>;

/// The protocols a class can name; every other protocol falls in the "any protocol" class.
const PROTOCOLS: [Protocol; 4] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp];

/// Whether the kernel looks up a packet's own port for `protocol`: the destination port of
/// TCP, UDP and SCTP, the type of ICMP. Every other protocol (`None`: one policy cannot name;
/// ICMPv6, which this IPv4 datapath never sees as such) looks up port 0.
fn has_port(protocol: Option<Protocol>) -> bool {
    matches!(
        protocol,
        Some(Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::Icmp)
    )
}

type ClassId = (Direction, Option<IdentityId>, Option<Protocol>);

/// The kernel's order of keys for a packet of class (remote, protocol).
fn chain(
    direction: Direction,
    remote: Option<IdentityId>,
    protocol: Option<Protocol>,
) -> Vec<ClassId> {
    let mut out: Vec<ClassId> = vec![
        (direction, remote, protocol),
        (direction, remote, None),
        (direction, None, protocol),
        (direction, None, None),
    ];
    out.dedup();
    let mut seen = BTreeSet::new();
    out.retain(|c| seen.insert(*c));
    out
}

/// What `lookup` answers for a packet of a class at `port`. `entries` are the entries that can
/// match the class (its direction; its remote or any remote).
fn answer(entries: &[PolicyEntry], class: ClassId, port: u16) -> Decision {
    let (direction, remote, protocol) = class;
    // A remote no entry names: only wildcard entries are in `entries`, so any id will do.
    let remote = remote.unwrap_or(IdentityId::UNKNOWN);
    match protocol {
        Some(p) => Decision::of(meshauth_policy::lookup(entries, direction, remote, p, port)),
        None => {
            // A protocol policy cannot name (GRE, ESP, ...): only "any protocol" entries whose
            // ports contain the packet's port 0 match, which `lookup` computes for them as it
            // would for a TCP packet.
            let any: Vec<PolicyEntry> = entries
                .iter()
                .filter(|e| e.protocol.is_none())
                .copied()
                .collect();
            Decision::of(meshauth_policy::lookup(
                &any,
                direction,
                remote,
                Protocol::Tcp,
                port,
            ))
        }
    }
}

/// The longest block of `class` in `keys` covering `port`.
fn lpm(
    keys: &HashMap<ClassId, BTreeMap<(u16, u8), Decision>>,
    class: &ClassId,
    port: u16,
) -> Option<Decision> {
    let blocks = keys.get(class)?;
    (0..=16u8).rev().find_map(|bits| {
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        blocks.get(&(port & mask, bits)).copied()
    })
}

/// What the kernel answers for `port` walking `chain` (first hit wins; no hit denies).
fn walk(
    keys: &HashMap<ClassId, BTreeMap<(u16, u8), Decision>>,
    chain: &[ClassId],
    port: u16,
) -> Decision {
    chain
        .iter()
        .find_map(|c| lpm(keys, c, port))
        .unwrap_or(Decision::DENY)
}

/// Plans the policy map keys of one endpoint from its compiled entries, so that
/// [`kernel_lookup`] (the model of the C program) agrees with [`meshauth_policy::lookup`] on
/// every packet.
pub fn policy_keys(entries: &[PolicyEntry]) -> PolicyKeys {
    let mut keys: HashMap<ClassId, BTreeMap<(u16, u8), Decision>> = HashMap::new();
    for direction in [Direction::Egress, Direction::Ingress] {
        let wildcard: Vec<PolicyEntry> = entries
            .iter()
            .filter(|e| e.direction == direction && e.remote.is_none())
            .copied()
            .collect();
        let mut by_remote: BTreeMap<IdentityId, Vec<PolicyEntry>> = BTreeMap::new();
        for e in entries.iter().filter(|e| e.direction == direction) {
            if let Some(r) = e.remote {
                by_remote
                    .entry(r)
                    .or_insert_with(|| wildcard.clone())
                    .push(*e);
            }
        }
        let protocols = std::iter::once(None).chain(PROTOCOLS.map(Some));
        // Classes after the ones that fall through to them: (any, any), (any, p), (r, any), (r, p).
        let mut order: Vec<(ClassId, &[PolicyEntry])> = Vec::new();
        for p in protocols.clone() {
            order.push(((direction, None, p), &wildcard));
        }
        for (r, es) in &by_remote {
            for p in protocols.clone() {
                order.push(((direction, Some(*r), p), es));
            }
        }
        for (class, es) in order {
            let after: Vec<ClassId> = chain(class.0, class.1, class.2)
                .into_iter()
                .skip(1)
                .collect();
            let blocks = plan_class(&keys, class, es, &after);
            if !blocks.is_empty() {
                keys.insert(class, blocks);
            }
        }
    }
    keys.into_iter()
        .flat_map(|((direction, remote, protocol), blocks)| {
            blocks.into_iter().map(move |((port, bits), d)| {
                (
                    PolicyKey {
                        direction,
                        remote,
                        protocol,
                        port,
                        bits,
                    },
                    d,
                )
            })
        })
        .collect()
}

/// The blocks class `class` needs: where its answer differs from the kernel's fall-through.
fn plan_class(
    keys: &HashMap<ClassId, BTreeMap<(u16, u8), Decision>>,
    class: ClassId,
    entries: &[PolicyEntry],
    after: &[ClassId],
) -> BTreeMap<(u16, u8), Decision> {
    let mut out = BTreeMap::new();
    // Every class is planned over the whole port space, ICMP's too (its types are ports
    // 0-255), and so is "any protocol": packets of the classes before it fall through to it at
    // their own port.
    // Interval starts: where an entry's range or a fall-through block begins or ends.
    let mut starts: BTreeSet<u32> = BTreeSet::from([0]);
    for e in entries {
        starts.insert(u32::from(e.ports.start));
        starts.insert(u32::from(e.ports.end) + 1);
    }
    for c in after {
        for (port, bits) in keys.get(c).into_iter().flat_map(|b| b.keys()) {
            starts.insert(u32::from(*port));
            starts.insert(u32::from(*port) + (1u32 << (16 - u32::from(*bits))));
        }
    }
    starts.retain(|s| *s <= u32::from(u16::MAX));
    let starts: Vec<u32> = starts.into_iter().collect();
    // Merge adjacent intervals that need the same value, then cut them into prefix blocks.
    let mut run: Option<(u32, u32, Decision)> = None;
    let flush = |run: Option<(u32, u32, Decision)>, out: &mut BTreeMap<(u16, u8), Decision>| {
        if let Some((s, e, d)) = run {
            // s <= e <= u16::MAX by construction.
            let range = PortRange {
                start: u16::try_from(s).unwrap_or(u16::MAX),
                end: u16::try_from(e).unwrap_or(u16::MAX),
            };
            for block in port_prefixes(range) {
                out.insert(block, d);
            }
        }
    };
    for (i, s) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(u32::from(u16::MAX), |n| n - 1);
        let port = u16::try_from(*s).unwrap_or(u16::MAX);
        let want = answer(entries, class, port);
        let need = want != walk(keys, after, port);
        run = match (run, need) {
            (Some((rs, _, d)), true) if d == want => Some((rs, end, d)),
            (r, true) => {
                flush(r, &mut out);
                Some((*s, end, want))
            }
            (r, false) => {
                flush(r, &mut out);
                None
            }
        };
    }
    flush(run, &mut out);
    out
}

/// The model of the kernel's `policy_lookup` over planned keys: what the C program answers for
/// a packet to or from `remote` with IP protocol number `protocol` and destination `port` (for
/// ICMP, the ICMP type, 0 to 255).
pub fn kernel_lookup(
    keys: &PolicyKeys,
    direction: Direction,
    remote: IdentityId,
    protocol: u8,
    port: u16,
) -> Decision {
    // The C program keys protocols by number; a protocol policy cannot name matches no
    // protocol-specific key, and looks up port 0.
    let proto = Protocol::from_number(protocol);
    let port = if has_port(proto) { port } else { 0 };
    let candidates = [
        (Some(remote), proto.map(Some)),
        (Some(remote), Some(None)),
        (None, proto.map(Some)),
        (None, Some(None)),
    ];
    for (r, p) in candidates {
        let Some(p) = p else { continue };
        for bits in (0..=16u8).rev() {
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            let key = PolicyKey {
                direction,
                remote: r,
                protocol: p,
                port: port & mask,
                bits,
            };
            if let Some(d) = keys.get(&key) {
                return *d;
            }
        }
    }
    Decision::DENY
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        remote: Option<u32>,
        protocol: Option<Protocol>,
        ports: (u16, u16),
        verdict: Verdict,
        auth: AuthType,
    ) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Ingress,
            remote: remote.map(IdentityId::new),
            protocol,
            ports: PortRange {
                start: ports.0,
                end: ports.1,
            },
            verdict,
            auth,
        }
    }

    fn check(entries: &[PolicyEntry], remote: u32, protocol: Protocol, port: u16) {
        let keys = policy_keys(entries);
        let want = Decision::of(meshauth_policy::lookup(
            entries,
            Direction::Ingress,
            IdentityId::new(remote),
            protocol,
            port,
        ));
        let got = kernel_lookup(
            &keys,
            Direction::Ingress,
            IdentityId::new(remote),
            protocol.number(),
            port,
        );
        assert_eq!(
            got, want,
            "{protocol:?}/{port} from {remote}: {entries:?} -> {keys:?}"
        );
    }

    #[test]
    fn broad_deny_beside_narrow_allow_denies() {
        let es = [
            entry(
                Some(300),
                Some(Protocol::Tcp),
                (1, 1023),
                Verdict::Deny,
                AuthType::None,
            ),
            entry(
                Some(300),
                Some(Protocol::Tcp),
                (80, 80),
                Verdict::Allow,
                AuthType::None,
            ),
        ];
        for port in [79, 80, 81, 1023, 1024] {
            check(&es, 300, Protocol::Tcp, port);
        }
        // Nothing is allowed, so nothing needs a key: no hit denies.
        assert!(policy_keys(&es).is_empty());
    }

    #[test]
    fn wildcard_deny_beats_specific_allow() {
        let es = [
            entry(
                None,
                Some(Protocol::Tcp),
                (0, 65535),
                Verdict::Deny,
                AuthType::None,
            ),
            entry(
                Some(300),
                Some(Protocol::Tcp),
                (80, 80),
                Verdict::Allow,
                AuthType::Required,
            ),
            entry(Some(300), None, (0, 65535), Verdict::Allow, AuthType::None),
        ];
        check(&es, 300, Protocol::Tcp, 80);
        check(&es, 300, Protocol::Udp, 53);
        check(&es, 300, Protocol::Icmp, 0);
        check(&es, 301, Protocol::Udp, 53);
    }

    #[test]
    fn explicit_disabled_on_a_port_beats_required_on_any_protocol() {
        let es = [
            entry(
                Some(300),
                Some(Protocol::Tcp),
                (80, 80),
                Verdict::Allow,
                AuthType::None,
            ),
            entry(
                Some(300),
                None,
                (0, 65535),
                Verdict::Allow,
                AuthType::Required,
            ),
        ];
        check(&es, 300, Protocol::Tcp, 80);
        check(&es, 300, Protocol::Tcp, 81);
        check(&es, 300, Protocol::Udp, 80);
        let keys = policy_keys(&es);
        assert_eq!(
            kernel_lookup(&keys, Direction::Ingress, IdentityId::new(300), 6, 80).auth,
            AuthType::None
        );
        // GRE from 300: the any-protocol allow with its authentication.
        assert_eq!(
            kernel_lookup(&keys, Direction::Ingress, IdentityId::new(300), 47, 0),
            Decision {
                verdict: Verdict::Allow,
                auth: AuthType::Required
            }
        );
    }

    #[test]
    fn an_endpoint_no_policy_selects_is_one_key() {
        let es = [entry(
            None,
            None,
            (0, 65535),
            Verdict::Allow,
            AuthType::None,
        )];
        let keys = policy_keys(&es);
        assert_eq!(keys.len(), 1);
        for p in PROTOCOLS {
            check(&es, 999, p, 443);
        }
    }

    #[test]
    fn icmp_types_are_ports() {
        let echo = |verdict| {
            entry(
                Some(300),
                Some(Protocol::Icmp),
                (8, 8),
                verdict,
                AuthType::None,
            )
        };
        // An allow of echo requests only; an allow of every ICMP type beside a deny of echo
        // requests; an any-protocol allow on port 8 (TCP, UDP, SCTP: not ICMP type 8).
        for es in [
            vec![echo(Verdict::Allow)],
            vec![
                echo(Verdict::Deny),
                entry(
                    Some(300),
                    Some(Protocol::Icmp),
                    (0, 65535),
                    Verdict::Allow,
                    AuthType::None,
                ),
            ],
            vec![entry(
                Some(300),
                None,
                (8, 8),
                Verdict::Allow,
                AuthType::None,
            )],
        ] {
            for t in [0, 3, 7, 8, 9, 13, 255] {
                check(&es, 300, Protocol::Icmp, t);
                check(&es, 301, Protocol::Icmp, t);
            }
            check(&es, 300, Protocol::Tcp, 8);
        }
        let keys = policy_keys(&[echo(Verdict::Allow)]);
        let at = |t| kernel_lookup(&keys, Direction::Ingress, IdentityId::new(300), 1, t).verdict;
        assert_eq!(
            (at(8), at(0), at(13)),
            (Verdict::Allow, Verdict::Deny, Verdict::Deny)
        );
        // A protocol policy cannot name looks up port 0 whatever it carries.
        let any = [entry(
            Some(300),
            None,
            (0, 65535),
            Verdict::Allow,
            AuthType::None,
        )];
        assert_eq!(
            kernel_lookup(
                &policy_keys(&any),
                Direction::Ingress,
                IdentityId::new(300),
                47,
                80
            )
            .verdict,
            Verdict::Allow
        );
    }

    #[test]
    fn one_allowed_port_is_one_key() {
        let es = [entry(
            Some(300),
            Some(Protocol::Tcp),
            (80, 80),
            Verdict::Allow,
            AuthType::Required,
        )];
        assert_eq!(policy_keys(&es).len(), 1);
    }
}
