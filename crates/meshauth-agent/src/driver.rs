//! The enforcement driver: makes the datapath hold what [`crate::plan`] planned, writing only
//! differences. [`DatapathOps`] is the seam: the kernel datapath implements it, and so does an
//! in-memory fake in the tests below, so the driver is tested without root.
//!
//! Order of writes, so that no packet sees a state less strict than both the old and the new:
//! new ipcache entries; each endpoint's policy, then its entry (with a new policy generation when
//! anything about it changed, which makes tracked flows be decided again); endpoints that went
//! away (detached, entry and policy removed); changed and removed ipcache entries, then a new
//! ipcache generation. The ipcache holds prefixes (longest match wins): a new prefix that takes
//! addresses from a broader entry of another identity (a CIDR prefix inside the world) changes
//! their identity, so it too brings a new generation; a new pod inside its node's pod range
//! (no identity before) does not.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use meshauth_datapath::{Datapath, DatapathError, EndpointId, EndpointInfo, Observed, PolicyEntry};
use meshauth_policy::{IdentityId, NodeId};

use crate::plan::{Desired, Prefix};

/// The datapath operations enforcement needs.
pub trait DatapathOps {
    /// What the datapath holds now (read once, at start).
    fn observe(&mut self) -> Result<Observed, DatapathError>;
    /// Attaches the programs to `iface` (replacing earlier ones in place).
    fn attach(&mut self, iface: &str) -> Result<(), DatapathError>;
    /// Detaches them (the interface may be gone already).
    fn detach(&mut self, iface: &str) -> Result<(), DatapathError>;
    /// Writes an endpoint entry.
    fn set_endpoint(&mut self, ifindex: u32, ep: &EndpointInfo) -> Result<(), DatapathError>;
    /// Removes one.
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    /// Maps a prefix to an identity on a node.
    fn set_ipcache(
        &mut self,
        prefix: Prefix,
        id: IdentityId,
        node: NodeId,
    ) -> Result<(), DatapathError>;
    /// Removes a prefix.
    fn remove_ipcache(&mut self, prefix: Prefix) -> Result<(), DatapathError>;
    /// Sets the ipcache generation.
    fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), DatapathError>;
    /// Replaces an endpoint's policy; returns whether anything changed.
    fn set_policy(
        &mut self,
        id: EndpointId,
        entries: &[PolicyEntry],
    ) -> Result<bool, DatapathError>;
    /// Removes an endpoint's policy.
    fn remove_policy(&mut self, id: EndpointId) -> Result<(), DatapathError>;
}

impl DatapathOps for Datapath {
    fn observe(&mut self) -> Result<Observed, DatapathError> {
        Datapath::observe(self)
    }
    fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        Datapath::attach(self, iface)
    }
    fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
        Datapath::detach(self, iface)
    }
    fn set_endpoint(&mut self, ifindex: u32, ep: &EndpointInfo) -> Result<(), DatapathError> {
        Datapath::set_endpoint(self, ifindex, ep)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        Datapath::remove_endpoint(self, ifindex)
    }
    fn set_ipcache(
        &mut self,
        (ip, len): Prefix,
        id: IdentityId,
        node: NodeId,
    ) -> Result<(), DatapathError> {
        Datapath::set_ipcache(self, ip, len, id, node)
    }
    fn remove_ipcache(&mut self, (ip, len): Prefix) -> Result<(), DatapathError> {
        Datapath::remove_ipcache(self, ip, len)
    }
    fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        Datapath::set_ipcache_generation(self, generation)
    }
    fn set_policy(
        &mut self,
        id: EndpointId,
        entries: &[PolicyEntry],
    ) -> Result<bool, DatapathError> {
        Datapath::set_policy(self, id, entries)
    }
    fn remove_policy(&mut self, id: EndpointId) -> Result<(), DatapathError> {
        Datapath::remove_policy(self, id)
    }
}

/// A failure to make one thing so; the rest was still applied.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ApplyError {
    /// What could not be done (names the endpoint or address).
    pub what: String,
    /// Why.
    pub source: DatapathError,
}

/// What one [`Driver::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Endpoints whose policy or entry changed (their tracked flows are decided again).
    pub endpoints_changed: usize,
    /// Endpoints removed.
    pub endpoints_removed: usize,
    /// ipcache entries added, changed or removed.
    pub ipcache_changed: usize,
}

/// Keeps the datapath equal to the plan.
#[derive(Debug)]
pub struct Driver<D> {
    dp: D,
    endpoints: BTreeMap<u32, (String, EndpointInfo)>,
    ipcache: BTreeMap<Prefix, (IdentityId, NodeId)>,
    policy: BTreeSet<EndpointId>,
    attached: BTreeSet<String>,
    /// Interfaces attached by this process (a restarted agent re-attaches each once, which
    /// replaces the old programs in place).
    attached_here: BTreeSet<String>,
    ipcache_gen: u32,
    next_policy_gen: u32,
}

impl<D: DatapathOps> Driver<D> {
    /// Whether this process attached the datapath to `iface` (and it stayed attached).
    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached_here.contains(iface)
    }

    /// Starts from what the datapath holds now (after a restart: the previous agent's state).
    pub fn new(mut dp: D) -> Result<Self, DatapathError> {
        let seen = dp.observe()?;
        let max_gen = seen
            .endpoints
            .values()
            .map(|e| e.policy_gen)
            .max()
            .unwrap_or(0);
        Ok(Driver {
            endpoints: seen
                .endpoints
                .into_iter()
                .map(|(ifindex, e)| (ifindex, (String::new(), e)))
                .collect(),
            ipcache: seen.ipcache,
            policy: seen.policy_endpoints,
            attached: seen.attached,
            attached_here: BTreeSet::new(),
            ipcache_gen: seen.ipcache_gen,
            next_policy_gen: max_gen.wrapping_add(1),
            dp,
        })
    }

    /// The datapath, for what the driver does not own (auth entries, events).
    pub fn datapath(&mut self) -> &mut D {
        &mut self.dp
    }

    fn policy_gen(&mut self) -> u32 {
        let g = self.next_policy_gen;
        // 0 is never used, so that a fresh map's zeroed entries never look current.
        self.next_policy_gen = self.next_policy_gen.wrapping_add(1).max(1);
        g.max(1)
    }

    /// Applies `desired`; what fails is reported and the rest is still applied (the next call
    /// retries what failed).
    pub fn apply(&mut self, desired: &Desired) -> (Applied, Vec<ApplyError>) {
        let mut done = Applied::default();
        let mut errors = Vec::new();
        let mut err =
            |what: String, source: DatapathError| errors.push(ApplyError { what, source });

        // New ipcache entries first: a new endpoint's peers resolve from its first packet. One
        // that takes addresses from a broader entry of another identity moves them.
        let mut moved = 0;
        let before = if desired.ipcache.keys().all(|p| self.ipcache.contains_key(p)) {
            BTreeMap::new()
        } else {
            self.ipcache.clone()
        };
        for (p, v) in &desired.ipcache {
            if !self.ipcache.contains_key(p) {
                // What its addresses had before this apply (none: no flow of theirs exists).
                let shadows = covering(&before, *p)
                    .is_some_and(|(id, _)| id != v.0 && id != IdentityId::UNKNOWN);
                match self.dp.set_ipcache(*p, v.0, v.1) {
                    Ok(()) => {
                        self.ipcache.insert(*p, *v);
                        if shadows {
                            moved += 1;
                        } else {
                            done.ipcache_changed += 1;
                        }
                    }
                    Err(e) => err(format!("ipcache {}/{}", p.0, p.1), e),
                }
            }
        }

        // Peers' requirements toward our identities (what a local pod sends them is held for
        // the authentication their ingress requires): written before the endpoints, and any
        // change gives every endpoint a new generation, so tracked flows are decided again.
        let mut peers_changed = false;
        for (id, entries) in &desired.peer_policy {
            let eid = EndpointId::peer(*id);
            match self.dp.set_policy(eid, entries) {
                Ok(c) => {
                    peers_changed |= c || !self.policy.contains(&eid);
                    self.policy.insert(eid);
                }
                Err(e) => err(format!("the requirements of peer identity {id}"), e),
            }
        }
        let stale_peers: Vec<EndpointId> = self
            .policy
            .iter()
            .filter(|id| id.is_peer())
            .filter(|id| {
                !desired
                    .peer_policy
                    .keys()
                    .any(|p| EndpointId::peer(*p) == **id)
            })
            .copied()
            .collect();
        for id in stale_peers {
            match self.dp.remove_policy(id) {
                Ok(()) => {
                    self.policy.remove(&id);
                    peers_changed = true;
                }
                Err(e) => err(format!("removing stale requirements (id {:#x})", id.0), e),
            }
        }

        for (ifindex, de) in &desired.endpoints {
            if !self.attached_here.contains(&de.iface) {
                if let Err(e) = self.dp.attach(&de.iface) {
                    err(
                        format!("attaching to {} (endpoint {})", de.iface, de.name),
                        e,
                    );
                    continue;
                }
                self.attached_here.insert(de.iface.clone());
                self.attached.insert(de.iface.clone());
            }
            let policy_changed = match self.dp.set_policy(de.id, &de.entries) {
                Ok(c) => c,
                Err(e) => {
                    err(format!("policy of endpoint {}", de.name), e);
                    continue;
                }
            };
            self.policy.insert(de.id);
            let current = self.endpoints.get(ifindex).map(|(_, e)| *e);
            let same = current.is_some_and(|c| {
                (c.id, c.identity, c.ipv4) == (de.id, de.identity, de.ipv4) && c.policy_gen != 0
            });
            if same && !policy_changed && !peers_changed {
                if let Some(slot) = self.endpoints.get_mut(ifindex) {
                    slot.0.clone_from(&de.name);
                }
                continue;
            }
            let info = EndpointInfo {
                id: de.id,
                identity: de.identity,
                ipv4: de.ipv4,
                policy_gen: self.policy_gen(),
            };
            match self.dp.set_endpoint(*ifindex, &info) {
                Ok(()) => {
                    self.endpoints.insert(*ifindex, (de.name.clone(), info));
                    done.endpoints_changed += 1;
                }
                Err(e) => err(format!("endpoint {}", de.name), e),
            }
        }

        // Endpoints that went away.
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|i| !desired.endpoints.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            let Some((name, info)) = self.endpoints.get(&ifindex).cloned() else {
                continue;
            };
            if let Err(e) = self.dp.remove_endpoint(ifindex) {
                err(format!("removing endpoint {name} (ifindex {ifindex})"), e);
                continue;
            }
            self.endpoints.remove(&ifindex);
            done.endpoints_removed += 1;
            if let Err(e) = self.dp.remove_policy(info.id) {
                err(format!("removing the policy of endpoint {name}"), e);
            } else {
                self.policy.remove(&info.id);
            }
        }
        let wanted_ifaces: BTreeSet<&String> =
            desired.endpoints.values().map(|e| &e.iface).collect();
        let stale_ifaces: Vec<String> = self
            .attached
            .iter()
            .filter(|i| !wanted_ifaces.contains(i))
            .cloned()
            .collect();
        for iface in stale_ifaces {
            match self.dp.detach(&iface) {
                Ok(()) => {
                    self.attached.remove(&iface);
                    self.attached_here.remove(&iface);
                }
                Err(e) => err(format!("detaching from {iface}"), e),
            }
        }
        let wanted_ids: BTreeSet<EndpointId> = desired
            .endpoints
            .values()
            .map(|e| e.id)
            .chain(desired.peer_policy.keys().map(|p| EndpointId::peer(*p)))
            .collect();
        let stale_policy: Vec<EndpointId> = self
            .policy
            .iter()
            .filter(|id| !wanted_ids.contains(id))
            .copied()
            .collect();
        for id in stale_policy {
            match self.dp.remove_policy(id) {
                Ok(()) => {
                    self.policy.remove(&id);
                }
                Err(e) => err(format!("removing stale policy of endpoint id {}", id.0), e),
            }
        }

        // Changed and removed addresses, then a new generation: flows to or from them are
        // decided again against the new identity, or dropped for having none.
        for (p, v) in &desired.ipcache {
            if self.ipcache.get(p).is_some_and(|old| old != v) {
                match self.dp.set_ipcache(*p, v.0, v.1) {
                    Ok(()) => {
                        self.ipcache.insert(*p, *v);
                        moved += 1;
                    }
                    Err(e) => err(format!("ipcache {}/{}", p.0, p.1), e),
                }
            }
        }
        let gone: Vec<Prefix> = self
            .ipcache
            .keys()
            .filter(|p| !desired.ipcache.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            match self.dp.remove_ipcache(p) {
                Ok(()) => {
                    self.ipcache.remove(&p);
                    moved += 1;
                }
                Err(e) => err(format!("removing ipcache {}/{}", p.0, p.1), e),
            }
        }
        if moved > 0 {
            let g = self.ipcache_gen.wrapping_add(1);
            match self.dp.set_ipcache_generation(g) {
                Ok(()) => self.ipcache_gen = g,
                Err(e) => err("the ipcache generation".into(), e),
            }
            done.ipcache_changed += moved;
        }
        (done, errors)
    }
}

/// The entry of `ipcache` that addresses of `prefix` fall to without it: the longest shorter
/// prefix containing it.
fn covering(
    ipcache: &BTreeMap<Prefix, (IdentityId, NodeId)>,
    (ip, len): Prefix,
) -> Option<(IdentityId, NodeId)> {
    (0..len.min(33)).rev().find_map(|l| {
        let mask = if l == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(l))
        };
        ipcache
            .get(&(Ipv4Addr::from(u32::from(ip) & mask), l))
            .copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DesiredEndpoint;
    use meshauth_policy::{AuthType, Direction, PortRange, Verdict};

    /// The datapath as a few maps; `fail_attach` makes attaching to that interface fail.
    #[derive(Debug, Default)]
    struct Fake {
        seen: Observed,
        policy: BTreeMap<EndpointId, Vec<PolicyEntry>>,
        writes: usize,
        fail_attach: Option<String>,
    }

    impl DatapathOps for Fake {
        fn observe(&mut self) -> Result<Observed, DatapathError> {
            Ok(self.seen.clone())
        }
        fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
            if self.fail_attach.as_deref() == Some(iface) {
                return Err(DatapathError::NoInterface(iface.into()));
            }
            self.seen.attached.insert(iface.into());
            Ok(())
        }
        fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
            self.seen.attached.remove(iface);
            Ok(())
        }
        fn set_endpoint(&mut self, ifindex: u32, ep: &EndpointInfo) -> Result<(), DatapathError> {
            self.writes += 1;
            self.seen.endpoints.insert(ifindex, *ep);
            Ok(())
        }
        fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
            self.seen.endpoints.remove(&ifindex);
            Ok(())
        }
        fn set_ipcache(
            &mut self,
            prefix: Prefix,
            id: IdentityId,
            node: NodeId,
        ) -> Result<(), DatapathError> {
            self.writes += 1;
            self.seen.ipcache.insert(prefix, (id, node));
            Ok(())
        }
        fn remove_ipcache(&mut self, prefix: Prefix) -> Result<(), DatapathError> {
            self.seen.ipcache.remove(&prefix);
            Ok(())
        }
        fn set_ipcache_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
            self.seen.ipcache_gen = generation;
            Ok(())
        }
        fn set_policy(
            &mut self,
            id: EndpointId,
            entries: &[PolicyEntry],
        ) -> Result<bool, DatapathError> {
            let changed = self.policy.get(&id).map(Vec::as_slice) != Some(entries);
            if changed {
                self.writes += 1;
            }
            self.policy.insert(id, entries.to_vec());
            self.seen.policy_endpoints.insert(id);
            Ok(changed)
        }
        fn remove_policy(&mut self, id: EndpointId) -> Result<(), DatapathError> {
            self.policy.remove(&id);
            self.seen.policy_endpoints.remove(&id);
            Ok(())
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn allow(remote: u32) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Ingress,
            remote: Some(IdentityId::new(remote)),
            protocol: None,
            ports: PortRange::ANY,
            verdict: Verdict::Allow,
            auth: AuthType::None,
        }
    }

    fn desired(
        eps: &[(&str, u32, &str, Vec<PolicyEntry>)],
        ipcache: &[(&str, u32, u32)],
    ) -> Desired {
        Desired {
            endpoints: eps
                .iter()
                .map(|(name, ifindex, addr, entries)| {
                    (
                        *ifindex,
                        DesiredEndpoint {
                            name: (*name).into(),
                            iface: format!("veth-{name}"),
                            id: EndpointId(*ifindex),
                            identity: IdentityId::new(300 + ifindex),
                            ipv4: ip(addr),
                            entries: entries.clone(),
                        },
                    )
                })
                .collect(),
            ipcache: ipcache
                .iter()
                .map(|(a, id, node)| {
                    let (addr, len) = a.split_once('/').unwrap_or((a, "32"));
                    (
                        (ip(addr), len.parse().unwrap_or(32)),
                        (IdentityId::new(*id), NodeId::new(*node)),
                    )
                })
                .collect(),
            conflicts: BTreeSet::new(),
            peer_policy: BTreeMap::new(),
        }
    }

    #[test]
    fn peer_requirements_are_written_under_peer_ids_and_their_changes_recheck_flows() {
        let mut d = Driver::new(Fake::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut want = desired(&[("a", 7, "10.0.1.2", vec![allow(301)])], &[]);
        d.apply(&want);
        let g1 = policy_gen_of(&mut d, 7);
        let required = PolicyEntry {
            auth: AuthType::Required,
            remote: Some(IdentityId::new(307)),
            ..allow(307)
        };
        want.peer_policy
            .insert(IdentityId::new(301), vec![required]);
        let (_, errors) = d.apply(&want);
        assert!(errors.is_empty(), "{errors:?}");
        let pid = EndpointId::peer(IdentityId::new(301));
        assert!(pid.is_peer() && !EndpointId(7).is_peer());
        assert_eq!(d.datapath().policy.get(&pid), Some(&vec![required]));
        let g2 = policy_gen_of(&mut d, 7);
        assert_ne!(g1, g2, "a new requirement re-checks the endpoint's flows");
        // Unchanged: nothing bumped.
        d.apply(&want);
        assert_eq!(policy_gen_of(&mut d, 7), g2);
        // Gone: removed, and flows re-checked.
        want.peer_policy.clear();
        let (_, errors) = d.apply(&want);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!d.datapath().policy.contains_key(&pid));
        assert_ne!(policy_gen_of(&mut d, 7), g2);
        assert!(d.datapath().policy.contains_key(&EndpointId(7)));
    }

    fn policy_gen_of(d: &mut Driver<Fake>, ifindex: u32) -> u32 {
        d.datapath().seen.endpoints[&ifindex].policy_gen
    }

    #[test]
    fn applies_only_differences_and_bumps_generations_on_change() {
        let mut d = Driver::new(Fake::default()).unwrap_or_else(|e| panic!("{e}"));
        let one = desired(
            &[("a", 7, "10.0.1.2", vec![allow(301)])],
            &[("10.0.1.2", 307, 1), ("10.0.2.2", 301, 2)],
        );
        let (done, errors) = d.apply(&one);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done.endpoints_changed, 1);
        assert!(d.datapath().seen.attached.contains("veth-a"));
        let g1 = policy_gen_of(&mut d, 7);
        assert!(g1 > 0);
        let writes = d.datapath().writes;

        // The same plan again writes nothing.
        let (done, _) = d.apply(&one);
        assert_eq!(done, Applied::default());
        assert_eq!(d.datapath().writes, writes);
        assert_eq!(policy_gen_of(&mut d, 7), g1);

        // A policy change writes the policy and bumps the generation.
        let two = desired(
            &[("a", 7, "10.0.1.2", vec![allow(302)])],
            &[("10.0.1.2", 307, 1), ("10.0.2.2", 301, 2)],
        );
        d.apply(&two);
        assert!(policy_gen_of(&mut d, 7) > g1);
        assert_eq!(d.datapath().policy[&EndpointId(7)], vec![allow(302)]);
        assert_eq!(d.datapath().seen.ipcache_gen, 0, "no address moved");

        // An address given to another identity, and one removed: a new ipcache generation.
        let three = desired(
            &[("a", 7, "10.0.1.2", vec![allow(302)])],
            &[("10.0.1.2", 307, 1), ("10.0.2.2", 999, 2)],
        );
        d.apply(&three);
        assert_eq!(
            d.datapath().seen.ipcache[&(ip("10.0.2.2"), 32)].0,
            IdentityId::new(999)
        );
        assert_eq!(d.datapath().seen.ipcache_gen, 1);
        let four = desired(
            &[("a", 7, "10.0.1.2", vec![allow(302)])],
            &[("10.0.1.2", 307, 1)],
        );
        d.apply(&four);
        assert!(
            !d.datapath()
                .seen
                .ipcache
                .contains_key(&(ip("10.0.2.2"), 32))
        );
        assert_eq!(d.datapath().seen.ipcache_gen, 2);

        // The endpoint goes: entry, policy and links go with it.
        let (done, _) = d.apply(&desired(&[], &[]));
        assert_eq!(done.endpoints_removed, 1);
        let f = d.datapath();
        assert!(f.seen.endpoints.is_empty() && f.policy.is_empty() && f.seen.attached.is_empty());
        assert!(f.seen.ipcache.is_empty());
    }

    #[test]
    fn prefixes_move_addresses_only_when_they_change_an_identity() {
        let mut d = Driver::new(Fake::default()).unwrap_or_else(|e| panic!("{e}"));
        let base = [
            ("0.0.0.0/0", 2, 0),
            ("10.200.1.0/24", 0, 1),
            ("10.200.1.10", 300, 1),
        ];
        let (_, errors) = d.apply(&desired(&[], &base));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d.datapath().seen.ipcache.len(), 3);
        assert_eq!(d.datapath().seen.ipcache_gen, 0, "nothing had an identity");
        // A new pod in its node's pod range: it had none.
        let mut more = base.to_vec();
        more.push(("10.200.1.11", 301, 1));
        d.apply(&desired(&[], &more));
        assert_eq!(d.datapath().seen.ipcache_gen, 0);
        // A CIDR prefix of a policy inside the world: its addresses were world.
        more.push(("192.0.2.0/24", 16_777_216, 0));
        d.apply(&desired(&[], &more));
        assert_eq!(
            d.datapath().seen.ipcache[&(ip("192.0.2.0"), 24)].0,
            IdentityId::new(16_777_216)
        );
        assert_eq!(d.datapath().seen.ipcache_gen, 1, "world to a CIDR identity");
        // The prefix goes: its addresses are world again.
        d.apply(&desired(&[], &base));
        assert_eq!(d.datapath().seen.ipcache_gen, 2);
        // A restarted driver keeps every prefix it finds.
        let fake = std::mem::take(d.datapath());
        let mut d = Driver::new(fake).unwrap_or_else(|e| panic!("{e}"));
        let (done, _) = d.apply(&desired(&[], &base));
        assert_eq!(done, Applied::default());
    }

    #[test]
    fn a_restarted_driver_removes_what_the_previous_agent_left_and_keeps_the_rest() {
        let mut fake = Fake::default();
        // Left by a previous agent: endpoint 7 (still wanted, same policy) and 9 (gone).
        for (ifindex, g) in [(7u32, 5u32), (9, 6)] {
            fake.seen.endpoints.insert(
                ifindex,
                EndpointInfo {
                    id: EndpointId(ifindex),
                    identity: IdentityId::new(300 + ifindex),
                    ipv4: ip(if ifindex == 7 { "10.0.1.2" } else { "10.0.1.9" }),
                    policy_gen: g,
                },
            );
            fake.seen.policy_endpoints.insert(EndpointId(ifindex));
            fake.seen.attached.insert(format!("veth-{ifindex}"));
        }
        fake.policy.insert(EndpointId(7), vec![allow(301)]);
        fake.policy.insert(EndpointId(9), vec![allow(301)]);
        fake.seen
            .ipcache
            .insert((ip("10.0.1.9"), 32), (IdentityId::new(309), NodeId::new(1)));
        let mut d = Driver::new(fake).unwrap_or_else(|e| panic!("{e}"));
        let mut want = desired(
            &[("a", 7, "10.0.1.2", vec![allow(301)])],
            &[("10.0.1.2", 307, 1)],
        );
        if let Some(e) = want.endpoints.get_mut(&7) {
            e.iface = "veth-7".into();
        }
        let (done, errors) = d.apply(&want);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done.endpoints_removed, 1);
        assert_eq!(
            policy_gen_of(&mut d, 7),
            5,
            "unchanged: tracked flows keep going"
        );
        let f = d.datapath();
        assert!(!f.seen.endpoints.contains_key(&9));
        assert!(!f.policy.contains_key(&EndpointId(9)));
        assert!(!f.seen.attached.contains("veth-9"));
        assert!(!f.seen.ipcache.contains_key(&(ip("10.0.1.9"), 32)));
        assert_eq!(f.seen.ipcache_gen, 1);
        // New policy generations continue above what was found.
        let mut changed = want.clone();
        if let Some(e) = changed.endpoints.get_mut(&7) {
            e.entries = vec![allow(302)];
        }
        d.apply(&changed);
        assert!(policy_gen_of(&mut d, 7) > 6);
    }

    #[test]
    fn a_failure_is_reported_and_the_rest_still_applied() {
        let fake = Fake {
            fail_attach: Some("veth-a".into()),
            ..Fake::default()
        };
        let mut d = Driver::new(fake).unwrap_or_else(|e| panic!("{e}"));
        let want = desired(
            &[
                ("a", 7, "10.0.1.2", vec![allow(301)]),
                ("b", 8, "10.0.1.3", vec![]),
            ],
            &[("10.0.1.2", 307, 1)],
        );
        let (_, errors) = d.apply(&want);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("veth-a"), "{}", errors[0]);
        let f = d.datapath();
        assert!(
            !f.seen.endpoints.contains_key(&7),
            "no entry for an endpoint without programs"
        );
        assert!(f.seen.endpoints.contains_key(&8));
        // Fixed: the next apply attaches it.
        f.fail_attach = None;
        let (_, errors) = d.apply(&want);
        assert!(errors.is_empty());
        assert!(d.datapath().seen.endpoints.contains_key(&7));
    }
}
