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
//!   inherited).
//! - Specificity, used both for inheritance and by [`lookup`] (what the datapath does): a
//!   narrower port range first, then a named protocol, then a named identity; ties take the
//!   strongest authentication.
//!
//! Entities map to identities as follows: `world` → [`IdentityId::WORLD`], `host` →
//! [`IdentityId::HOST`], `cluster` → every known identity plus host, `all` → any identity
//! (a wildcard entry).

use std::collections::{BTreeMap, BTreeSet};

use crate::IdentityId;
use crate::entry::{AuthType, Direction, PolicyEntry, PortRange, Protocol, Verdict};
use crate::labels::Labels;
use crate::policy::{Entity, PeerRule, Peers, Policy, PortProtocol, Rule};

/// The peer of a flow, as rules see it.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// A workload with these labels.
    Endpoint(&'a Labels),
    /// Outside the cluster.
    World,
    /// The node.
    Host,
}

/// Which rule decided.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct RuleRef {
    /// The policy's name.
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
    /// The policies with a rule selecting the endpoint in this direction (sorted, unique): for a
    /// default deny, these are what made it.
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
/// identity (a selector, `world`, `host`, `cluster`), `Some(false)` only through a wildcard.
fn peer_match(peers: &Peers, peer: Peer<'_>) -> Option<bool> {
    match peers {
        Peers::Any => Some(false),
        Peers::Nothing => None,
        Peers::Listed {
            selectors,
            entities,
        } => {
            let specific = match peer {
                Peer::Endpoint(labels) => {
                    selectors.iter().any(|s| s.matches(labels))
                        || entities.contains(&Entity::Cluster)
                }
                Peer::World => entities.contains(&Entity::World),
                Peer::Host => entities
                    .iter()
                    .any(|e| matches!(e, Entity::Host | Entity::Cluster)),
            };
            if specific {
                Some(true)
            } else if entities.contains(&Entity::All) {
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
    match flow_protocol {
        // ICMP has no port: `protocol: ICMP` matches it whatever the port says, and a rule for
        // any protocol only when it names no port (`protocol: ANY` with a port is TCP/UDP/SCTP).
        Protocol::Icmp => {
            protocol == Some(Protocol::Icmp) || (protocol.is_none() && ports == PortRange::ANY)
        }
        _ => protocol.is_none_or(|q| q == flow_protocol) && ports.contains(flow_port),
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

/// Evaluates one direction for an endpoint with labels `endpoint` and a flow to or from `peer`.
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
        for (ri, rule) in p.rules.iter().enumerate() {
            if !selects(rule, endpoint, direction) {
                continue;
            }
            selected = true;
            selected_by.insert(p.name.clone());
            for (section, list, verdict) in sections(rule, direction) {
                for (i, pr) in list.iter().enumerate() {
                    let Some(remote_specific) = peer_match(&pr.peers, peer) else {
                        continue;
                    };
                    let Some((proto, range)) = best_port(&pr.ports, protocol, port) else {
                        continue;
                    };
                    let r = RuleRef {
                        policy: p.name.clone(),
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

/// Traces a flow between two workloads.
pub fn trace(
    policies: &[Policy],
    src: &Labels,
    dst: &Labels,
    protocol: Protocol,
    port: u16,
) -> Trace {
    let egress = evaluate(
        policies,
        src,
        Direction::Egress,
        Peer::Endpoint(dst),
        protocol,
        port,
    );
    let ingress = evaluate(
        policies,
        dst,
        Direction::Ingress,
        Peer::Endpoint(src),
        protocol,
        port,
    );
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
) -> Vec<Option<IdentityId>> {
    match peers {
        Peers::Nothing => vec![],
        Peers::Any => vec![None],
        Peers::Listed {
            selectors,
            entities,
        } => {
            let mut out = BTreeSet::new();
            for e in entities {
                match e {
                    Entity::All => {
                        out.insert(None);
                    }
                    Entity::World => {
                        out.insert(Some(IdentityId::WORLD));
                    }
                    Entity::Host => {
                        out.insert(Some(IdentityId::HOST));
                    }
                    Entity::Cluster => {
                        out.insert(Some(IdentityId::HOST));
                        out.extend(identities.keys().map(|id| Some(*id)));
                    }
                }
            }
            for (id, labels) in identities {
                if selectors.iter().any(|s| s.matches(labels)) {
                    out.insert(Some(*id));
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
pub fn compile_endpoint(
    policies: &[Policy],
    identities: &BTreeMap<IdentityId, Labels>,
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
                    for remote in peer_identities(&pr.peers, identities) {
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
                let covers = p.is_none_or(|p| Some(p) == protocol)
                    && range.start <= ports.start
                    && range.end >= ports.end;
                if !covers {
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
/// drops it. `remote` is the peer's identity. Returns the verdict and the requirement.
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
#[derive(Debug, Default)]
pub struct Compiler {
    policies: BTreeMap<String, Policy>,
    identities: BTreeMap<IdentityId, Labels>,
    endpoints: BTreeMap<String, Labels>,
    compiled: BTreeMap<String, Vec<PolicyEntry>>,
    recompilations: u64,
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
            let entries = compile_endpoint(&policies, &self.identities, labels);
            if self.compiled.get(name) != Some(&entries) {
                self.compiled.insert(name.clone(), entries);
                changed.push(name.clone());
            }
        }
        changed
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

    /// Adds or replaces a policy; recompiles only endpoints its rules (old or new) select.
    /// Setting a policy identical to the one held recompiles nothing.
    pub fn set_policy(&mut self, policy: Policy) -> Vec<String> {
        if self.policies.get(&policy.name) == Some(&policy) {
            return vec![];
        }
        let old = self.policies.insert(policy.name.clone(), policy.clone());
        let affected: BTreeSet<String> = self
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
        self.recompile(&affected)
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, name: &str) -> Vec<String> {
        let Some(old) = self.policies.remove(name) else {
            return vec![];
        };
        let affected: BTreeSet<String> = self
            .endpoints
            .iter()
            .filter(|(_, l)| old.rules.iter().any(|r| r.endpoint_selector.matches(l)))
            .map(|(n, _)| n.clone())
            .collect();
        self.recompile(&affected)
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
