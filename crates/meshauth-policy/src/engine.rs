//! Cilium's semantics, evaluated and compiled.
//!
//! - An endpoint selected by any rule in a direction (a rule whose `endpointSelector` matches
//!   it and that has allow or deny rules in that direction) is default-deny there; an endpoint
//!   no rule selects allows everything in that direction.
//! - Allow rules add up; a matching deny rule wins over every allow.
//! - Among the allow rules that match a flow, the strongest explicit authentication applies
//!   (`test-always-fail` > `required` > `disabled`/unset), so a narrower rule without
//!   `authentication` inherits the requirement of a broader one that matches the same flow,
//!   and an explicit `disabled` never lowers another rule's requirement.
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

fn peer_matches(peers: &Peers, peer: Peer<'_>) -> bool {
    match peers {
        Peers::Any => true,
        Peers::Nothing => false,
        Peers::Listed {
            selectors,
            entities,
        } => match peer {
            Peer::Endpoint(labels) => {
                selectors.iter().any(|s| s.matches(labels))
                    || entities
                        .iter()
                        .any(|e| matches!(e, Entity::All | Entity::Cluster))
            }
            Peer::World => entities
                .iter()
                .any(|e| matches!(e, Entity::All | Entity::World)),
            Peer::Host => entities
                .iter()
                .any(|e| matches!(e, Entity::All | Entity::Host | Entity::Cluster)),
        },
    }
}

fn port_matches(ports: &[PortProtocol], protocol: Protocol, port: u16) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            p.protocol.is_none_or(|q| q == protocol)
                && (protocol == Protocol::Icmp || p.ports.contains(port))
        })
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
    let mut allows = Vec::new();
    let mut denies = Vec::new();
    let mut auth = AuthType::None;
    for p in policies {
        for (ri, rule) in p.rules.iter().enumerate() {
            if !selects(rule, endpoint, direction) {
                continue;
            }
            selected = true;
            for (section, list, verdict) in sections(rule, direction) {
                for (i, pr) in list.iter().enumerate() {
                    if peer_matches(&pr.peers, peer) && port_matches(&pr.ports, protocol, port) {
                        let r = RuleRef {
                            policy: p.name.clone(),
                            rule: ri,
                            section,
                            index: i,
                        };
                        if verdict == Verdict::Deny {
                            denies.push(r);
                        } else {
                            auth = auth.max(pr.auth.auth_type());
                            allows.push(r);
                        }
                    }
                }
            }
        }
    }
    if !selected {
        return DirectionVerdict {
            selected,
            verdict: Verdict::Allow,
            auth: AuthType::None,
            decided_by: vec![],
        };
    }
    if !denies.is_empty() {
        return DirectionVerdict {
            selected,
            verdict: Verdict::Deny,
            auth: AuthType::None,
            decided_by: denies,
        };
    }
    if allows.is_empty() {
        return DirectionVerdict {
            selected,
            verdict: Verdict::Deny,
            auth: AuthType::None,
            decided_by: vec![],
        };
    }
    DirectionVerdict {
        selected,
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

/// Compiles the entries of one endpoint, sorted and merged (same key: strongest auth).
pub fn compile_endpoint(
    policies: &[Policy],
    identities: &BTreeMap<IdentityId, Labels>,
    endpoint: &Labels,
) -> Vec<PolicyEntry> {
    let mut merged: BTreeMap<EntryKey, AuthType> = BTreeMap::new();
    for direction in [Direction::Egress, Direction::Ingress] {
        let rules: Vec<&Rule> = policies
            .iter()
            .flat_map(|p| &p.rules)
            .filter(|r| selects(r, endpoint, direction))
            .collect();
        if rules.is_empty() {
            merged.insert(
                (direction, None, None, PortRange::ANY, Verdict::Allow),
                AuthType::None,
            );
            continue;
        }
        for rule in rules {
            for (_, list, verdict) in sections(rule, direction) {
                for pr in list {
                    let auth = if verdict == Verdict::Allow {
                        pr.auth.auth_type()
                    } else {
                        AuthType::None
                    };
                    let ports: Vec<(Option<Protocol>, PortRange)> = if pr.ports.is_empty() {
                        vec![(None, PortRange::ANY)]
                    } else {
                        pr.ports.iter().map(|p| (p.protocol, p.ports)).collect()
                    };
                    for remote in peer_identities(&pr.peers, identities) {
                        for (protocol, range) in &ports {
                            let slot = merged
                                .entry((direction, remote, *protocol, *range, verdict))
                                .or_insert(auth);
                            *slot = (*slot).max(auth);
                        }
                    }
                }
            }
        }
    }
    merged
        .into_iter()
        .map(
            |((direction, remote, protocol, ports, verdict), auth)| PolicyEntry {
                direction,
                remote,
                protocol,
                ports,
                verdict,
                auth,
            },
        )
        .collect()
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
    pub fn set_endpoint(&mut self, name: &str, labels: Labels) -> Vec<String> {
        self.endpoints.insert(name.to_owned(), labels);
        self.recompile(&BTreeSet::from([name.to_owned()]))
    }

    /// Removes a local endpoint.
    pub fn remove_endpoint(&mut self, name: &str) {
        self.endpoints.remove(name);
        self.compiled.remove(name);
    }

    /// Adds or replaces a policy; recompiles only endpoints its rules (old or new) select.
    pub fn set_policy(&mut self, policy: Policy) -> Vec<String> {
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

    /// Adds an identity; recompiles only endpoints with a rule whose peers can match it.
    pub fn set_identity(&mut self, id: IdentityId, labels: Labels) -> Vec<String> {
        self.identities.insert(id, labels.clone());
        let affected: BTreeSet<String> = self
            .endpoints
            .iter()
            .filter(|(_, ep)| {
                self.policies.values().flat_map(|p| &p.rules).any(|r| {
                    r.endpoint_selector.matches(ep)
                        && [&r.ingress, &r.egress, &r.ingress_deny, &r.egress_deny]
                            .iter()
                            .flat_map(|l| l.iter())
                            .any(|pr| peer_matches(&pr.peers, Peer::Endpoint(&labels)))
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        self.recompile(&affected)
    }
}
