//! The enforcement planner: from what the cluster and the node say, what the datapath should
//! hold, and which auth entries are still justified. Pure: no I/O, no clock, tested without
//! root. [`crate::driver`] makes the datapath so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use meshauth_datapath::EndpointId;
use meshauth_policy::{AuthKey, AuthType, IdentityId, NodeId, PolicyEntry};

use crate::cache::ClusterState;
use crate::endpoints::LocalEndpoint;

/// A local endpoint bound to the control plane's pod of the same namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundEndpoint {
    /// The endpoint (runtime facts).
    pub endpoint: LocalEndpoint,
    /// Its identity (from the control plane).
    pub identity: IdentityId,
    /// The labels policies select it by: its identity's (its labels in its namespace).
    pub labels: meshauth_policy::Labels,
}

/// What one local endpoint should look like in the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredEndpoint {
    /// Its name.
    pub name: String,
    /// The host-side interface the programs attach to.
    pub iface: String,
    /// Its id in the policy map.
    pub id: EndpointId,
    /// Its identity.
    pub identity: IdentityId,
    /// Its only source address.
    pub ipv4: Ipv4Addr,
    /// Its compiled policy entries.
    pub entries: Vec<PolicyEntry>,
}

/// What the datapath should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Local endpoints by host-side ifindex.
    pub endpoints: BTreeMap<u32, DesiredEndpoint>,
    /// Every cluster address with its identity and node.
    pub ipcache: BTreeMap<Ipv4Addr, (IdentityId, NodeId)>,
    /// Addresses claimed by endpoints of different identities: left out of the ipcache (their
    /// traffic is dropped as "no identity") until the claim is resolved.
    pub conflicts: BTreeSet<Ipv4Addr>,
}

/// Plans the datapath. `entries` gives the compiled entries of a local endpoint by name; an
/// endpoint without compiled entries gets none (everything to and from it is dropped).
pub fn plan<'a>(
    cluster: &ClusterState,
    local: &BTreeMap<String, BoundEndpoint>,
    entries: impl Fn(&str) -> Option<&'a [PolicyEntry]>,
) -> Desired {
    let mut out = Desired::default();
    for (name, b) in local {
        out.endpoints.insert(
            b.endpoint.host_ifindex,
            DesiredEndpoint {
                name: name.clone(),
                iface: b.endpoint.host_veth.clone(),
                id: EndpointId(b.endpoint.host_ifindex),
                identity: b.identity,
                ipv4: b.endpoint.ipv4,
                entries: entries(name)
                    .map(<[PolicyEntry]>::to_vec)
                    .unwrap_or_default(),
            },
        );
    }
    for e in &cluster.endpoints {
        let Some(ip) = e.ipv4 else { continue };
        if out.conflicts.contains(&ip) {
            continue;
        }
        match out.ipcache.get(&ip) {
            Some(existing) if *existing != (e.identity, e.node_id) => {
                out.ipcache.remove(&ip);
                out.conflicts.insert(ip);
            }
            _ => {
                out.ipcache.insert(ip, (e.identity, e.node_id));
            }
        }
    }
    out
}

/// Whether some entry of `entries` requires authentication with `remote`.
pub fn requires_auth(entries: &[PolicyEntry], remote: IdentityId) -> bool {
    entries
        .iter()
        .any(|e| e.auth != AuthType::None && e.remote.is_none_or(|r| r == remote))
}

/// The identities among `candidates` that `entries` require authentication with.
fn auth_peers(entries: &[PolicyEntry], candidates: &BTreeSet<IdentityId>) -> Vec<IdentityId> {
    let needing = entries.iter().filter(|e| e.auth != AuthType::None);
    if needing.clone().any(|e| e.remote.is_none()) {
        return candidates.iter().copied().collect();
    }
    needing
        .filter_map(|e| e.remote)
        .filter(|r| candidates.contains(r))
        .collect()
}

/// What justifies keeping auth entries.
#[derive(Debug, Clone, Default)]
pub struct Justification {
    /// Identities hosted on this node.
    pub local: BTreeSet<IdentityId>,
    /// (identity, node) of every cluster endpoint.
    pub placed: BTreeSet<(IdentityId, NodeId)>,
    /// (local, remote) pairs some local endpoint's policy requires authentication for.
    pub required_here: BTreeSet<(IdentityId, IdentityId)>,
    /// (remote, local) pairs the remote identity's own policy requires authentication for.
    pub required_by_peer: BTreeSet<(IdentityId, IdentityId)>,
}

impl Justification {
    /// An auth entry lives only while its local identity is hosted here, its peer identity is
    /// on the peer node it names, some policy (either side's) requires authentication between
    /// the two, and its kind is one that can succeed.
    pub fn justified(&self, k: &AuthKey) -> bool {
        k.auth_type == AuthType::Required
            && self.local.contains(&k.local)
            && self.placed.contains(&(k.remote, k.remote_node))
            && (self.required_here.contains(&(k.local, k.remote))
                || self.required_by_peer.contains(&(k.remote, k.local)))
    }
}

/// The justification from the cluster, the local endpoints' plan, and the compiled entries of
/// remote identities (`peer_entries`, for the identities that have auth entries).
pub fn justification<'a>(
    cluster: &ClusterState,
    desired: &Desired,
    peers: impl IntoIterator<Item = (IdentityId, &'a [PolicyEntry])>,
) -> Justification {
    let local: BTreeSet<IdentityId> = desired.endpoints.values().map(|e| e.identity).collect();
    let placed = cluster
        .endpoints
        .iter()
        .map(|e| (e.identity, e.node_id))
        .collect();
    let remotes: BTreeSet<IdentityId> = cluster.endpoints.iter().map(|e| e.identity).collect();
    let mut required_here = BTreeSet::new();
    for e in desired.endpoints.values() {
        for r in auth_peers(&e.entries, &remotes) {
            required_here.insert((e.identity, r));
        }
    }
    let mut required_by_peer = BTreeSet::new();
    for (remote, entries) in peers {
        for l in auth_peers(entries, &local) {
            required_by_peer.insert((remote, l));
        }
    }
    Justification {
        local,
        placed,
        required_here,
        required_by_peer,
    }
}

/// The pairs to authenticate ahead of their first packet: every pair some local endpoint's
/// policy requires authentication with, for every node the peer identity is placed on, that
/// has no entry yet; at most `max`. Never a pair policy does not require.
pub fn pre_authenticate(
    j: &Justification,
    existing: &BTreeSet<AuthKey>,
    max: usize,
) -> Vec<AuthKey> {
    let mut out = Vec::new();
    for (local, remote) in &j.required_here {
        for (id, node) in j.placed.range((*remote, NodeId::new(0))..) {
            if id != remote {
                break;
            }
            let key = AuthKey {
                local: *local,
                remote: *remote,
                remote_node: *node,
                auth_type: AuthType::Required,
            };
            if !existing.contains(&key) {
                out.push(key);
                if out.len() >= max {
                    return out;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ClusterEndpoint;
    use meshauth_policy::{Direction, PortRange, Verdict};

    fn ep(name: &str, ip: &str, ifindex: u32) -> LocalEndpoint {
        LocalEndpoint {
            namespace: "default".into(),
            name: name.into(),
            ipv4: ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
            host_veth: format!("veth-{name}"),
            host_ifindex: ifindex,
        }
    }

    fn cep(name: &str, ip: &str, identity: u32, node: u32) -> ClusterEndpoint {
        ClusterEndpoint {
            node: format!("n{node}"),
            node_id: NodeId::new(node),
            namespace: "default".into(),
            name: name.into(),
            labels: meshauth_policy::Labels::default(),
            ipv4: ip.parse().ok(),
            interface: String::new(),
            identity: IdentityId::new(identity),
        }
    }

    fn required(remote: Option<u32>) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Egress,
            remote: remote.map(IdentityId::new),
            protocol: None,
            ports: PortRange::ANY,
            verdict: Verdict::Allow,
            auth: AuthType::Required,
        }
    }

    #[test]
    fn plans_endpoints_and_the_ipcache_and_drops_conflicting_addresses() {
        let cluster = ClusterState {
            endpoints: vec![
                cep("a", "10.0.1.2", 300, 1),
                cep("b", "10.0.2.2", 301, 2),
                cep("x", "10.0.2.9", 301, 2),
                cep("y", "10.0.2.9", 302, 2),
            ],
            ..ClusterState::default()
        };
        let local = BTreeMap::from([(
            "a".to_string(),
            BoundEndpoint {
                endpoint: ep("a", "10.0.1.2", 7),
                identity: IdentityId::new(300),
                labels: meshauth_policy::Labels::default(),
            },
        )]);
        let entries = [required(Some(301))];
        let d = plan(&cluster, &local, |n| (n == "a").then_some(&entries[..]));
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.endpoints[&7].id, EndpointId(7));
        assert_eq!(d.endpoints[&7].entries, entries);
        assert_eq!(d.ipcache.len(), 2, "{:?}", d.ipcache);
        assert!(
            d.conflicts
                .contains(&"10.0.2.9".parse().unwrap_or(Ipv4Addr::UNSPECIFIED))
        );
        // No compiled entries: nothing allowed.
        let d = plan(&cluster, &local, |_| None);
        assert!(d.endpoints[&7].entries.is_empty());
    }

    #[test]
    fn pairs_policy_requires_are_authenticated_ahead_and_no_others() {
        let j = Justification {
            local: BTreeSet::from([IdentityId::new(300)]),
            placed: BTreeSet::from([
                (IdentityId::new(301), NodeId::new(2)),
                (IdentityId::new(301), NodeId::new(3)),
                (IdentityId::new(302), NodeId::new(2)),
            ]),
            required_here: BTreeSet::from([(IdentityId::new(300), IdentityId::new(301))]),
            required_by_peer: BTreeSet::new(),
        };
        let key = |node: u32| AuthKey {
            local: IdentityId::new(300),
            remote: IdentityId::new(301),
            remote_node: NodeId::new(node),
            auth_type: AuthType::Required,
        };
        assert_eq!(
            pre_authenticate(&j, &BTreeSet::new(), 10),
            vec![key(2), key(3)]
        );
        assert_eq!(
            pre_authenticate(&j, &BTreeSet::from([key(2)]), 10),
            vec![key(3)]
        );
        assert_eq!(
            pre_authenticate(&j, &BTreeSet::new(), 1).len(),
            1,
            "bounded"
        );
        assert!(
            pre_authenticate(&j, &BTreeSet::new(), 10)
                .iter()
                .all(|k| j.justified(k))
        );
    }

    #[test]
    fn auth_entries_live_only_while_justified() {
        let cluster = ClusterState {
            endpoints: vec![cep("a", "10.0.1.2", 300, 1), cep("b", "10.0.2.2", 301, 2)],
            ..ClusterState::default()
        };
        let local = BTreeMap::from([(
            "a".to_string(),
            BoundEndpoint {
                endpoint: ep("a", "10.0.1.2", 7),
                identity: IdentityId::new(300),
                labels: meshauth_policy::Labels::default(),
            },
        )]);
        let key = AuthKey {
            local: IdentityId::new(300),
            remote: IdentityId::new(301),
            remote_node: NodeId::new(2),
            auth_type: AuthType::Required,
        };
        let with = [required(Some(301))];
        let wildcard = [required(None)];
        let d = plan(&cluster, &local, |_| Some(&with[..]));
        assert!(justification(&cluster, &d, []).justified(&key));
        let d = plan(&cluster, &local, |_| Some(&wildcard[..]));
        assert!(
            justification(&cluster, &d, []).justified(&key),
            "a wildcard requirement counts"
        );
        // Not required by us, but by the peer's policy.
        let d = plan(&cluster, &local, |_| None);
        assert!(!justification(&cluster, &d, []).justified(&key));
        let peer = [required(Some(300))];
        assert!(justification(&cluster, &d, [(IdentityId::new(301), &peer[..])]).justified(&key));
        // The peer moved to another node, or the local identity left.
        let d = plan(&cluster, &local, |_| Some(&with[..]));
        let j = justification(&cluster, &d, []);
        assert!(!j.justified(&AuthKey {
            remote_node: NodeId::new(3),
            ..key
        }));
        assert!(!j.justified(&AuthKey {
            local: IdentityId::new(999),
            ..key
        }));
        // test-always-fail is never justified: it can never have authenticated.
        assert!(!j.justified(&AuthKey {
            auth_type: AuthType::TestAlwaysFail,
            ..key
        }));
    }
}
