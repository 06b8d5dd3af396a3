//! Cilium's semantics, evaluated and compiled.
//!
//! - An endpoint selected by any rule in a direction (a rule whose `endpointSelector` matches
//!   it and that has allow or deny rules in that direction) is default-deny there; an endpoint
//!   no rule selects allows everything in that direction.
//! - Allow rules add up; a matching deny rule wins over every allow.
//! - Authentication follows Cilium's `authPreferredInsert`: entries with the same key take the
//!   strongest mode (`test-always-fail` > `required` > `disabled`). An entry whose rule did not
//!   set `authentication` inherits the mode of the most specific broader allow entry that did
//!   (same or wildcard identity, same or any protocol, a port range containing its own); an
//!   entry whose rule set it explicitly, even to `disabled`, keeps its own (explicit beats
//!   inherited). An entry for any identity that inherits nothing for a specific identity with a
//!   broader explicit entry gets a companion entry for that identity (Cilium adds the same
//!   L3/L4 keys), so the datapath's lookup keeps that identity's requirement.
//! - Specificity, used both for inheritance and by [`lookup`] (what the datapath does): a
//!   narrower port range first, then a named protocol, then a named identity; ties take the
//!   strongest authentication.
//!
//! - ICMP: the `port` of a flow is its ICMP type (0-255); see [`crate::entry`].
//!
//! Peers map to identities as follows (the entity table is in [`Entity`]): `world` →
//! [`IdentityId::WORLD`] and every CIDR prefix identity, `host` → [`IdentityId::HOST`],
//! `remote-node` → [`IdentityId::REMOTE_NODE`], `unmanaged` → [`IdentityId::UNMANAGED`],
//! `cluster` → every workload identity plus host, remote-node and unmanaged, `all` → any
//! identity (a wildcard entry), `none` → nothing; a CIDR peer → the prefix identities it
//! matches, and [`IdentityId::WORLD`] for a `/0` (see [`crate::cidr`]); an endpoint selector →
//! the workload identities whose labels it matches (selectors carry their namespace, see
//! [`crate::policy`]).
//!
//! Policies are named by their [`crate::PolicyKey`] (`namespace/name`, or `name` for a
//! clusterwide policy) in [`RuleRef`], [`DirectionVerdict::selected_by`] and the [`Compiler`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::str::FromStr;

use crate::IdentityId;
use crate::cidr::{Cidr, CidrIdentities, cidr_prefixes_of};
use crate::entry::{AuthType, Direction, PolicyEntry, PortRange, Protocol, Verdict};
use crate::labels::Labels;
use crate::policy::{Entity, PeerRule, Peers, Policy, PolicyKey, PortProtocol, Rule};

/// The peer of a flow, as rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer<'a> {
    /// A workload with these labels (its namespace among them, see
    /// [`Labels::with_namespace`]).
    Endpoint(&'a Labels),
    /// Outside the cluster, at an address no CIDR prefix of the policies contains: the `/0`
    /// entry of the ipcache, [`IdentityId::WORLD`].
    World,
    /// The node the endpoint runs on.
    Host,
    /// Another node of the cluster.
    RemoteNode,
    /// A pod the agent does not manage.
    Unmanaged,
    /// An address outside the cluster (not a pod's, not a node's): matched by `world`, `all`
    /// and the CIDR peers that contain it and whose excepts do not.
    Address(IpAddr),
    /// The identity of a CIDR prefix (what the ipcache gives the addresses whose longest named
    /// prefix it is): matched by `world`, `all` and the CIDR peers `Q` with `prefix ⊆ Q` and
    /// `prefix` inside none of their excepts.
    Cidr(Cidr),
}

/// An owned [`Peer`], e.g. parsed from a command line (see its [`FromStr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// A workload with these labels.
    Endpoint(Labels),
    /// See [`Peer::World`].
    World,
    /// See [`Peer::Host`].
    Host,
    /// See [`Peer::RemoteNode`].
    RemoteNode,
    /// See [`Peer::Unmanaged`].
    Unmanaged,
    /// See [`Peer::Address`].
    Address(IpAddr),
    /// See [`Peer::Cidr`].
    Cidr(Cidr),
}

impl PeerSpec {
    /// As a [`Peer`] for [`evaluate`] and [`trace_peers`].
    pub fn as_peer(&self) -> Peer<'_> {
        match self {
            PeerSpec::Endpoint(l) => Peer::Endpoint(l),
            PeerSpec::World => Peer::World,
            PeerSpec::Host => Peer::Host,
            PeerSpec::RemoteNode => Peer::RemoteNode,
            PeerSpec::Unmanaged => Peer::Unmanaged,
            PeerSpec::Address(a) => Peer::Address(*a),
            PeerSpec::Cidr(c) => Peer::Cidr(*c),
        }
    }
}

impl FromStr for PeerSpec {
    type Err = String;

    /// Labels (`app=web,io.kubernetes.pod.namespace=prod`), an entity (`world`, `host`,
    /// `remote-node`, `unmanaged`), an address (`192.0.2.1`) or a prefix (`192.0.2.0/24`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.contains('=') {
            return s
                .parse::<Labels>()
                .map(PeerSpec::Endpoint)
                .map_err(|e| e.to_string());
        }
        match s {
            "world" => return Ok(PeerSpec::World),
            "host" => return Ok(PeerSpec::Host),
            "remote-node" => return Ok(PeerSpec::RemoteNode),
            "unmanaged" => return Ok(PeerSpec::Unmanaged),
            _ => {}
        }
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(PeerSpec::Address(a));
        }
        if s.contains('/') {
            return Cidr::parse_prefix(s)
                .map(PeerSpec::Cidr)
                .map_err(|e| e.to_string());
        }
        Err(format!(
            "{s:?} is not a peer: use labels (app=web,io.kubernetes.pod.namespace=prod), an entity (world, host, remote-node, unmanaged), an address (192.0.2.1) or a prefix (192.0.2.0/24)"
        ))
    }
}

/// The peer an identity stands for: a reserved identity's entity, a CIDR prefix's identity
/// (from `cidrs`), or a workload's labels (from `identities`). `None` for an identity neither
/// knows (and for [`IdentityId::UNKNOWN`]).
pub fn peer_of_identity<'a>(
    id: IdentityId,
    identities: &'a BTreeMap<IdentityId, Labels>,
    cidrs: &CidrIdentities,
) -> Option<Peer<'a>> {
    match id {
        IdentityId::HOST => Some(Peer::Host),
        IdentityId::WORLD => Some(Peer::World),
        IdentityId::REMOTE_NODE => Some(Peer::RemoteNode),
        IdentityId::UNMANAGED => Some(Peer::Unmanaged),
        id if id.is_local() => cidrs.prefix(id).map(Peer::Cidr),
        id => identities.get(&id).map(Peer::Endpoint),
    }
}

/// Which rule decided.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct RuleRef {
    /// The policy's key, as text: `namespace/name` for a `CiliumNetworkPolicy`, `name` for a
    /// `CiliumClusterwideNetworkPolicy` (see [`PolicyKey`]).
    pub policy: String,
    /// `spec` (0) or `specs[i]`.
    pub rule: usize,
    /// `ingress`, `egress`, `ingressDeny` or `egressDeny`.
    pub section: &'static str,
    /// Index in that list.
    pub index: usize,
}

/// The outcome in one direction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectionVerdict {
    /// Whether any policy selects the endpoint in this direction.
    pub selected: bool,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Required authentication (allow only).
    pub auth: AuthType,
    /// The keys (`namespace/name` or `name`) of the policies with a rule selecting the endpoint
    /// in this direction (sorted, unique): for a default deny, these are what made it.
    pub selected_by: Vec<String>,
    /// The rules that decided (empty for "not selected" and for default deny).
    pub decided_by: Vec<RuleRef>,
}

fn sections(rule: &Rule, direction: Direction) -> [(&'static str, &Vec<PeerRule>, Verdict); 2] {
    match direction {
        Direction::Ingress => [
            ("ingress", &rule.ingress, Verdict::Allow),
            ("ingressDeny", &rule.ingress_deny, Verdict::Deny),
        ],
        Direction::Egress => [
            ("egress", &rule.egress, Verdict::Allow),
            ("egressDeny", &rule.egress_deny, Verdict::Deny),
        ],
    }
}

fn selects(rule: &Rule, endpoint: &Labels, direction: Direction) -> bool {
    rule.endpoint_selector.matches(endpoint)
        && sections(rule, direction)
            .iter()
            .any(|(_, l, _)| !l.is_empty())
}

/// Whether a peer set matches `peer`: `None` if not, `Some(true)` if through a specific
/// identity (a selector, an entity other than `all`, a CIDR), `Some(false)` only through a
/// wildcard.
fn peer_match(peers: &Peers, peer: Peer<'_>) -> Option<bool> {
    match peers {
        Peers::Any => Some(false),
        Peers::Nothing => None,
        Peers::Listed {
            selectors,
            entities,
            cidrs,
        } => {
            let has = |e: Entity| entities.contains(&e);
            let specific = match peer {
                Peer::Endpoint(labels) => {
                    selectors.iter().any(|s| s.matches(labels)) || has(Entity::Cluster)
                }
                Peer::Host => has(Entity::Host) || has(Entity::Cluster),
                Peer::RemoteNode => has(Entity::RemoteNode) || has(Entity::Cluster),
                Peer::Unmanaged => has(Entity::Unmanaged) || has(Entity::Cluster),
                Peer::World => has(Entity::World) || cidrs.iter().any(|r| r.matches_world()),
                Peer::Address(a) => {
                    has(Entity::World) || cidrs.iter().any(|r| r.matches_address(a))
                }
                Peer::Cidr(p) => {
                    has(Entity::World)
                        || cidrs.iter().any(|r| {
                            if p.is_all() {
                                r.matches_world()
                            } else {
                                r.matches_prefix(&p)
                            }
                        })
                }
            };
            if specific {
                Some(true)
            } else if has(Entity::All) {
                Some(false)
            } else {
                None
            }
        }
    }
}

fn peer_matches(peers: &Peers, peer: Peer<'_>) -> bool {
    peer_match(peers, peer).is_some()
}

/// How specific an entry's key is (greater is more specific): a narrower port range first,
/// then a named protocol, then a named identity.
fn specificity(
    remote_specific: bool,
    protocol: Option<Protocol>,
    ports: PortRange,
) -> (u32, bool, bool) {
    let width = u32::from(ports.end.saturating_sub(ports.start));
    (
        u32::from(u16::MAX) - width,
        protocol.is_some(),
        remote_specific,
    )
}

fn entry_matches(
    protocol: Option<Protocol>,
    ports: PortRange,
    flow_protocol: Protocol,
    flow_port: u16,
) -> bool {
    if flow_protocol.is_icmp() {
        // ICMP has no port: the flow's `port` is its ICMP type, matched by ICMP entries' ranges
        // of types; a rule for any protocol matches it only when it names no port (`protocol:
        // ANY` with a port is TCP/UDP/SCTP).
        return match protocol {
            Some(q) => q == flow_protocol && ports.contains(flow_port),
            None => ports == PortRange::ANY,
        };
    }
    protocol.is_none_or(|q| q == flow_protocol) && ports.contains(flow_port)
}

/// Whether every packet an entry (`protocol`, `ports`) matches is matched by a broader one
/// (`broad_protocol`, `broad_ports`).
fn covers(
    broad_protocol: Option<Protocol>,
    broad_ports: PortRange,
    protocol: Option<Protocol>,
    ports: PortRange,
) -> bool {
    let wider = broad_ports.start <= ports.start && broad_ports.end >= ports.end;
    match (broad_protocol, protocol) {
        (None, Some(q)) if q.is_icmp() => broad_ports == PortRange::ANY,
        (None, _) => wider,
        (Some(b), Some(q)) => b == q && wider,
        (Some(_), None) => false,
    }
}

/// The most specific (protocol, ports) of a rule's `toPorts` that matches the flow.
fn best_port(
    ports: &[PortProtocol],
    protocol: Protocol,
    port: u16,
) -> Option<(Option<Protocol>, PortRange)> {
    if ports.is_empty() {
        return Some((None, PortRange::ANY));
    }
    ports
        .iter()
        .filter(|p| entry_matches(p.protocol, p.ports, protocol, port))
        .map(|p| (p.protocol, p.ports))
        .max_by_key(|(proto, range)| specificity(false, *proto, *range))
}

/// Evaluates one direction for an endpoint with labels `endpoint` and a flow to or from `peer`
/// (`port`: the destination port, or the ICMP type for ICMP and ICMPv6).
pub fn evaluate(
    policies: &[Policy],
    endpoint: &Labels,
    direction: Direction,
    peer: Peer<'_>,
    protocol: Protocol,
    port: u16,
) -> DirectionVerdict {
    let mut selected = false;
    let mut selected_by = std::collections::BTreeSet::new();
    let mut allows = Vec::new();
    let mut denies = Vec::new();
    // The most specific explicit authentication among the matching allows, and its mode.
    let mut explicit: Option<((u32, bool, bool), AuthType)> = None;
    for p in policies {
        let key = p.key().to_string();
        for (ri, rule) in p.rules.iter().enumerate() {
            if !selects(rule, endpoint, direction) {
                continue;
            }
            selected = true;
            selected_by.insert(key.clone());
            for (section, list, verdict) in sections(rule, direction) {
                for (i, pr) in list.iter().enumerate() {
                    let Some(remote_specific) = peer_match(&pr.peers, peer) else {
                        continue;
                    };
                    let Some((proto, range)) = best_port(&pr.ports, protocol, port) else {
                        continue;
                    };
                    let r = RuleRef {
                        policy: key.clone(),
                        rule: ri,
                        section,
                        index: i,
                    };
                    if verdict == Verdict::Deny {
                        denies.push(r);
                        continue;
                    }
                    allows.push(r);
                    if pr.auth.is_explicit() {
                        let spec = specificity(remote_specific, proto, range);
                        let a = pr.auth.auth_type();
                        explicit = match explicit {
                            Some((s, b)) if s > spec => Some((s, b)),
                            Some((s, b)) if s == spec => Some((s, b.max(a))),
                            _ => Some((spec, a)),
                        };
                    }
                }
            }
        }
    }
    let auth = explicit.map_or(AuthType::None, |(_, a)| a);
    let selected_by: Vec<String> = selected_by.into_iter().collect();
    if !selected {
        return DirectionVerdict {
            selected,
            selected_by,
            verdict: Verdict::Allow,
            auth: AuthType::None,
            decided_by: vec![],
        };
    }
    if !denies.is_empty() {
        return DirectionVerdict {
            selected,
            selected_by,
            verdict: Verdict::Deny,
            auth: AuthType::None,
            decided_by: denies,
        };
    }
    if allows.is_empty() {
        return DirectionVerdict {
            selected,
            selected_by,
            verdict: Verdict::Deny,
            auth: AuthType::None,
            decided_by: vec![],
        };
    }
    DirectionVerdict {
        selected,
        selected_by,
        verdict: Verdict::Allow,
        auth,
        decided_by: allows,
    }
}

/// Both directions of a flow from `src` to `dst`, as `cilium policy trace` shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Trace {
    /// Allowed only if both directions allow.
    pub verdict: Verdict,
    /// The strongest requirement of the two directions.
    pub auth: AuthType,
    /// The source's egress.
    pub egress: DirectionVerdict,
    /// The destination's ingress.
    pub ingress: DirectionVerdict,
}

/// Traces a flow between two workloads (`port`: the destination port, or the ICMP type).
pub fn trace(
    policies: &[Policy],
    src: &Labels,
    dst: &Labels,
    protocol: Protocol,
    port: u16,
) -> Trace {
    trace_peers(
        policies,
        Peer::Endpoint(src),
        Peer::Endpoint(dst),
        protocol,
        port,
    )
}

/// What a side that is not an endpoint enforces: nothing (meshauth enforces policy on
/// endpoints only; the host, the other nodes and the world have no policy of their own).
fn not_enforced() -> DirectionVerdict {
    DirectionVerdict {
        selected: false,
        verdict: Verdict::Allow,
        auth: AuthType::None,
        selected_by: vec![],
        decided_by: vec![],
    }
}

/// Traces a flow from `src` to `dst`, either of which may be a workload, an entity, an address
/// or a CIDR prefix outside the cluster ([`Peer`]): the source's egress (when it is an
/// endpoint) and the destination's ingress (likewise), with the policies (by key) and rules
/// that decided. E.g. `trace_peers(&p, Peer::Endpoint(&pod), Peer::Address(ip), Protocol::Tcp,
/// 443)` for a pod reaching an external address.
pub fn trace_peers(
    policies: &[Policy],
    src: Peer<'_>,
    dst: Peer<'_>,
    protocol: Protocol,
    port: u16,
) -> Trace {
    let egress = match src {
        Peer::Endpoint(labels) => {
            evaluate(policies, labels, Direction::Egress, dst, protocol, port)
        }
        _ => not_enforced(),
    };
    let ingress = match dst {
        Peer::Endpoint(labels) => {
            evaluate(policies, labels, Direction::Ingress, src, protocol, port)
        }
        _ => not_enforced(),
    };
    let allowed = egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow;
    Trace {
        verdict: if allowed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        auth: if allowed {
            egress.auth.max(ingress.auth)
        } else {
            AuthType::None
        },
        egress,
        ingress,
    }
}

/// The identities a peer set stands for; `None` inside means "any".
fn peer_identities(
    peers: &Peers,
    identities: &BTreeMap<IdentityId, Labels>,
    cidr_ids: &CidrIdentities,
) -> Vec<Option<IdentityId>> {
    match peers {
        Peers::Nothing => vec![],
        Peers::Any => vec![None],
        Peers::Listed {
            selectors,
            entities,
            cidrs,
        } => {
            let mut out = BTreeSet::new();
            for e in entities {
                match e {
                    Entity::All => {
                        out.insert(None);
                    }
                    Entity::World => {
                        out.insert(Some(IdentityId::WORLD));
                        out.extend(cidr_ids.iter().map(|(_, id)| Some(id)));
                    }
                    Entity::Host => {
                        out.insert(Some(IdentityId::HOST));
                    }
                    Entity::RemoteNode => {
                        out.insert(Some(IdentityId::REMOTE_NODE));
                    }
                    Entity::Unmanaged => {
                        out.insert(Some(IdentityId::UNMANAGED));
                    }
                    Entity::Cluster => {
                        out.extend(
                            [
                                IdentityId::HOST,
                                IdentityId::REMOTE_NODE,
                                IdentityId::UNMANAGED,
                            ]
                            .map(Some),
                        );
                        out.extend(identities.keys().map(|id| Some(*id)));
                    }
                    Entity::None => {}
                }
            }
            if !cidrs.is_empty() {
                if cidrs.iter().any(|r| r.matches_world()) {
                    out.insert(Some(IdentityId::WORLD));
                }
                for (prefix, id) in cidr_ids.iter() {
                    if cidrs.iter().any(|r| r.matches_prefix(&prefix)) {
                        out.insert(Some(id));
                    }
                }
            }
            if !selectors.is_empty() {
                for (id, labels) in identities {
                    if selectors.iter().any(|s| s.matches(labels)) {
                        out.insert(Some(*id));
                    }
                }
            }
            out.into_iter().collect()
        }
    }
}

/// An entry without its auth: what merging groups by.
type EntryKey = (
    Direction,
    Option<IdentityId>,
    Option<Protocol>,
    PortRange,
    Verdict,
);

/// An allow entry's protocol, ports and explicit authentication.
type ExplicitAuth = (Option<Protocol>, PortRange, AuthType);

/// Compiles the entries of one endpoint, sorted and merged: one entry per key, with the
/// authentication resolved (same key: strongest explicit mode; no explicit mode: inherited from
/// the most specific broader explicit allow, see the module docs).
///
/// `identities` are the workload identities (their labels with their namespace). CIDR peers and
/// `world` compile to the identities [`CidrIdentities::for_policies`] gives the policies'
/// prefixes: build the ipcache from the same call, or use [`compile_endpoint_with`] (or the
/// [`Compiler`]) to choose the numbering.
pub fn compile_endpoint(
    policies: &[Policy],
    identities: &BTreeMap<IdentityId, Labels>,
    endpoint: &Labels,
) -> Vec<PolicyEntry> {
    compile_endpoint_with(
        policies,
        identities,
        &CidrIdentities::for_policies(policies),
        endpoint,
    )
}

/// As [`compile_endpoint`], with the CIDR prefix identities given (those the agent's ipcache
/// holds): a CIDR peer compiles to the identities of the prefixes in `cidrs` it matches (and
/// [`IdentityId::WORLD`] for a `/0`), `world` to [`IdentityId::WORLD`] and every one of them.
pub fn compile_endpoint_with(
    policies: &[Policy],
    identities: &BTreeMap<IdentityId, Labels>,
    cidrs: &CidrIdentities,
    endpoint: &Labels,
) -> Vec<PolicyEntry> {
    // Per key: the strongest explicit mode, if any rule producing the key set one.
    let mut merged: BTreeMap<EntryKey, Option<AuthType>> = BTreeMap::new();
    for direction in [Direction::Egress, Direction::Ingress] {
        let rules: Vec<&Rule> = policies
            .iter()
            .flat_map(|p| &p.rules)
            .filter(|r| selects(r, endpoint, direction))
            .collect();
        if rules.is_empty() {
            merged.insert(
                (direction, None, None, PortRange::ANY, Verdict::Allow),
                None,
            );
            continue;
        }
        for rule in rules {
            for (_, list, verdict) in sections(rule, direction) {
                for pr in list {
                    let explicit = (verdict == Verdict::Allow && pr.auth.is_explicit())
                        .then(|| pr.auth.auth_type());
                    let ports: Vec<(Option<Protocol>, PortRange)> = if pr.ports.is_empty() {
                        vec![(None, PortRange::ANY)]
                    } else {
                        pr.ports.iter().map(|p| (p.protocol, p.ports)).collect()
                    };
                    for remote in peer_identities(&pr.peers, identities, cidrs) {
                        for (protocol, range) in &ports {
                            let slot = merged
                                .entry((direction, remote, *protocol, *range, verdict))
                                .or_insert(None);
                            *slot = match (*slot, explicit) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                (a, b) => a.or(b),
                            };
                        }
                    }
                }
            }
        }
    }
    // Explicit allow entries by (direction, remote), for inheritance.
    let mut explicit: BTreeMap<(Direction, Option<IdentityId>), Vec<ExplicitAuth>> =
        BTreeMap::new();
    for ((direction, remote, protocol, ports, verdict), auth) in &merged {
        if let (Verdict::Allow, Some(a)) = (verdict, auth) {
            explicit
                .entry((*direction, *remote))
                .or_default()
                .push((*protocol, *ports, *a));
        }
    }
    // Cilium's `authPreferredInsert` for L4-only keys: an allow entry for any identity, without
    // an explicit mode, whose ports/protocol are narrower than those of an explicit allow entry
    // for a specific identity gets a companion entry for that identity (its ports/protocol, the
    // identity's mode by inheritance), so that the more specific wildcard entry does not hide
    // the identity's requirement from the datapath's lookup. Verdicts are unchanged (the
    // wildcard entry already allows that traffic).
    let mut companions: Vec<EntryKey> = Vec::new();
    for (&(direction, remote, protocol, ports, verdict), auth) in &merged {
        if verdict != Verdict::Allow || remote.is_some() || auth.is_some() {
            continue;
        }
        for ((d, r), list) in &explicit {
            if *d != direction || r.is_none() {
                continue;
            }
            let broader = list.iter().any(|(p, range, _)| {
                (*p, *range) != (protocol, ports) && covers(*p, *range, protocol, ports)
            });
            let key = (direction, *r, protocol, ports, Verdict::Allow);
            if broader && !merged.contains_key(&key) {
                companions.push(key);
            }
        }
    }
    for key in companions {
        merged.insert(key, None);
    }
    let inherited = |direction: Direction,
                     remote: Option<IdentityId>,
                     protocol: Option<Protocol>,
                     ports: PortRange| {
        let mut best: Option<((u32, bool, bool), AuthType)> = None;
        let candidates = [(remote, remote.is_some()), (None, false)];
        let candidates = if remote.is_some() {
            &candidates[..]
        } else {
            &candidates[..1]
        };
        for (r, specific) in candidates {
            for (p, range, a) in explicit.get(&(direction, *r)).into_iter().flatten() {
                if !covers(*p, *range, protocol, ports) {
                    continue;
                }
                let spec = specificity(*specific, *p, *range);
                best = match best {
                    Some((s, b)) if s > spec => Some((s, b)),
                    Some((s, b)) if s == spec => Some((s, b.max(*a))),
                    _ => Some((spec, *a)),
                };
            }
        }
        best.map_or(AuthType::None, |(_, a)| a)
    };
    merged
        .iter()
        .map(
            |(&(direction, remote, protocol, ports, verdict), auth)| PolicyEntry {
                direction,
                remote,
                protocol,
                ports,
                verdict,
                auth: match (verdict, auth) {
                    (Verdict::Deny, _) => AuthType::None,
                    (Verdict::Allow, Some(a)) => *a,
                    (Verdict::Allow, None) => inherited(direction, remote, protocol, ports),
                },
            },
        )
        .collect()
}

/// What the datapath does with an endpoint's entries for one packet: a matching deny entry
/// drops it; otherwise the most specific matching allow entry (see the module docs; ties take
/// the strongest authentication) lets it through with that entry's authentication; no match
/// drops it. `remote` is the peer's identity (for an address outside the cluster, what the
/// ipcache gives it: [`CidrIdentities::identity_of`]); `port` the destination port, or the
/// ICMP type for ICMP and ICMPv6. Returns the verdict and the requirement.
pub fn lookup(
    entries: &[PolicyEntry],
    direction: Direction,
    remote: IdentityId,
    protocol: Protocol,
    port: u16,
) -> (Verdict, AuthType) {
    let matching = entries.iter().filter(|e| {
        e.direction == direction
            && e.remote.is_none_or(|r| r == remote)
            && entry_matches(e.protocol, e.ports, protocol, port)
    });
    let mut best: Option<((u32, bool, bool), AuthType)> = None;
    for e in matching {
        if e.verdict == Verdict::Deny {
            return (Verdict::Deny, AuthType::None);
        }
        let spec = specificity(e.remote.is_some(), e.protocol, e.ports);
        best = match best {
            Some((s, b)) if s > spec => Some((s, b)),
            Some((s, b)) if s == spec => Some((s, b.max(e.auth))),
            _ => Some((spec, e.auth)),
        };
    }
    best.map_or((Verdict::Deny, AuthType::None), |(_, a)| {
        (Verdict::Allow, a)
    })
}

/// Keeps compiled entries per endpoint and recompiles only what a change can affect.
///
/// Policies are held by [`PolicyKey`] (`namespace/name`, or `name` for a clusterwide policy), so
/// policies of the same name in two namespaces are two policies. The CIDR prefixes the policies
/// name are numbered by a [`CidrIdentities`] the compiler keeps in step with the policies
/// (numbers stay stable while a prefix is named): read it with [`Compiler::cidr_identities`] to
/// build the ipcache.
#[derive(Debug, Default)]
pub struct Compiler {
    policies: BTreeMap<PolicyKey, Policy>,
    identities: BTreeMap<IdentityId, Labels>,
    cidrs: CidrIdentities,
    endpoints: BTreeMap<String, Labels>,
    compiled: BTreeMap<String, Vec<PolicyEntry>>,
    recompilations: u64,
}

fn has_cidrs(policy: &Policy) -> bool {
    policy
        .rules
        .iter()
        .flat_map(|r| [&r.ingress, &r.egress, &r.ingress_deny, &r.egress_deny])
        .flatten()
        .any(|pr| matches!(&pr.peers, Peers::Listed { cidrs, .. } if !cidrs.is_empty()))
}

/// Whether a rule's peers depend on the CIDR prefix identities (`world` or a CIDR peer).
fn uses_cidr_identities(rule: &Rule) -> bool {
    [
        &rule.ingress,
        &rule.egress,
        &rule.ingress_deny,
        &rule.egress_deny,
    ]
    .into_iter()
    .flatten()
    .any(|pr| {
        matches!(&pr.peers, Peers::Listed { entities, cidrs, .. }
                if !cidrs.is_empty() || entities.contains(&Entity::World))
    })
}

impl Compiler {
    /// An empty compiler.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many endpoint compilations ran so far (to observe incrementality).
    pub fn recompilations(&self) -> u64 {
        self.recompilations
    }

    /// The entries of endpoint `name`.
    pub fn entries(&self, name: &str) -> Option<&[PolicyEntry]> {
        self.compiled.get(name).map(Vec::as_slice)
    }

    /// The policies held, by key.
    pub fn policies(&self) -> impl Iterator<Item = (&PolicyKey, &Policy)> {
        self.policies.iter()
    }

    /// The identities of the CIDR prefixes the policies name: what the ipcache must hold for
    /// addresses outside the cluster ([`CidrIdentities::ipcache_entries`]).
    pub fn cidr_identities(&self) -> &CidrIdentities {
        &self.cidrs
    }

    fn policies_vec(&self) -> Vec<Policy> {
        self.policies.values().cloned().collect()
    }

    fn recompile(&mut self, names: &BTreeSet<String>) -> Vec<String> {
        let policies = self.policies_vec();
        let mut changed = Vec::new();
        for name in names {
            let Some(labels) = self.endpoints.get(name) else {
                continue;
            };
            self.recompilations += 1;
            let entries = compile_endpoint_with(&policies, &self.identities, &self.cidrs, labels);
            if self.compiled.get(name) != Some(&entries) {
                self.compiled.insert(name.clone(), entries);
                changed.push(name.clone());
            }
        }
        changed
    }

    /// Renumbers the CIDR prefixes after a policy change; returns the endpoints whose entries
    /// depend on them, if any changed.
    fn sync_cidrs(&mut self) -> BTreeSet<String> {
        let prefixes = cidr_prefixes_of(self.policies.values());
        if self.cidrs.sync(&prefixes).is_empty() {
            return BTreeSet::new();
        }
        self.endpoints
            .iter()
            .filter(|(_, l)| {
                self.policies
                    .values()
                    .flat_map(|p| &p.rules)
                    .any(|r| r.endpoint_selector.matches(l) && uses_cidr_identities(r))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Adds or updates a local endpoint; returns the endpoints whose entries changed.
    /// Setting an endpoint to the labels it already has recompiles nothing.
    pub fn set_endpoint(&mut self, name: &str, labels: Labels) -> Vec<String> {
        if self.endpoints.get(name) == Some(&labels) && self.compiled.contains_key(name) {
            return vec![];
        }
        self.endpoints.insert(name.to_owned(), labels);
        self.recompile(&BTreeSet::from([name.to_owned()]))
    }

    /// Removes a local endpoint.
    pub fn remove_endpoint(&mut self, name: &str) {
        self.endpoints.remove(name);
        self.compiled.remove(name);
    }

    /// Adds or replaces the policy with the same [`Policy::key`]; recompiles only endpoints its
    /// rules (old or new) select, and, when the set of CIDR prefixes changes, the endpoints
    /// whose rules use CIDR identities. Setting a policy identical to the one held recompiles
    /// nothing.
    pub fn set_policy(&mut self, policy: Policy) -> Vec<String> {
        let key = policy.key();
        if self.policies.get(&key) == Some(&policy) {
            return vec![];
        }
        let old = self.policies.insert(key, policy.clone());
        let mut affected: BTreeSet<String> = self
            .endpoints
            .iter()
            .filter(|(_, l)| {
                policy
                    .rules
                    .iter()
                    .chain(old.iter().flat_map(|o| &o.rules))
                    .any(|r| r.endpoint_selector.matches(l))
            })
            .map(|(n, _)| n.clone())
            .collect();
        if has_cidrs(&policy) || old.as_ref().is_some_and(has_cidrs) {
            affected.extend(self.sync_cidrs());
        }
        self.recompile(&affected)
    }

    /// Removes the policy with key `key`; returns the endpoints whose entries changed.
    pub fn remove_policy_key(&mut self, key: &PolicyKey) -> Vec<String> {
        let Some(old) = self.policies.remove(key) else {
            return vec![];
        };
        let mut affected: BTreeSet<String> = self
            .endpoints
            .iter()
            .filter(|(_, l)| old.rules.iter().any(|r| r.endpoint_selector.matches(l)))
            .map(|(n, _)| n.clone())
            .collect();
        if has_cidrs(&old) {
            affected.extend(self.sync_cidrs());
        }
        self.recompile(&affected)
    }

    /// Removes policies by key text: `namespace/name` removes that `CiliumNetworkPolicy`; a bare
    /// `name` (how policies were named before namespaces) removes the clusterwide policy of that
    /// name **and every** `CiliumNetworkPolicy` of that name, whatever its namespace. Prefer
    /// [`Compiler::remove_policy_key`].
    pub fn remove_policy(&mut self, name: &str) -> Vec<String> {
        let keys: Vec<PolicyKey> = self
            .policies
            .keys()
            .filter(|k| {
                if name.contains('/') {
                    k.to_string() == name
                } else {
                    k.name == name
                }
            })
            .cloned()
            .collect();
        let mut changed = BTreeSet::new();
        for k in keys {
            changed.extend(self.remove_policy_key(&k));
        }
        changed.into_iter().collect()
    }

    /// Adds an identity (or changes its labels); recompiles only endpoints with a rule whose
    /// peers can match it (with its old or new labels). Setting an identity to the labels it
    /// already has recompiles nothing.
    pub fn set_identity(&mut self, id: IdentityId, labels: Labels) -> Vec<String> {
        let old = self.identities.insert(id, labels.clone());
        if old.as_ref() == Some(&labels) {
            return vec![];
        }
        let affected = self.endpoints_matching_peer(&labels, old.as_ref());
        self.recompile(&affected)
    }

    /// Removes an identity; recompiles only endpoints with a rule whose peers matched it.
    pub fn remove_identity(&mut self, id: IdentityId) -> Vec<String> {
        let Some(old) = self.identities.remove(&id) else {
            return vec![];
        };
        let affected = self.endpoints_matching_peer(&old, None);
        self.recompile(&affected)
    }

    fn endpoints_matching_peer(&self, labels: &Labels, old: Option<&Labels>) -> BTreeSet<String> {
        self.endpoints
            .iter()
            .filter(|(_, ep)| {
                self.policies.values().flat_map(|p| &p.rules).any(|r| {
                    r.endpoint_selector.matches(ep)
                        && [&r.ingress, &r.egress, &r.ingress_deny, &r.egress_deny]
                            .iter()
                            .flat_map(|l| l.iter())
                            .any(|pr| {
                                std::iter::once(labels)
                                    .chain(old)
                                    .any(|l| peer_matches(&pr.peers, Peer::Endpoint(l)))
                            })
                })
            })
            .map(|(n, _)| n.clone())
            .collect()
    }
}
