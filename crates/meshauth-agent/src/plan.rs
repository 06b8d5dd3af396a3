//! The enforcement planner: from what the cluster and the node say, what the datapath should
//! hold, and which auth entries are still justified. Pure: no I/O, no clock, tested without
//! root. [`crate::driver`] makes the datapath so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use meshauth_datapath::EndpointId;
use meshauth_policy::{AuthKey, AuthType, Cidr, IdentityId, NodeId, PolicyEntry};

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

/// An IPv4 prefix of the ipcache: network address (host bits clear) and length.
pub type Prefix = (Ipv4Addr, u8);

/// What the datapath should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Local endpoints by host-side ifindex.
    pub endpoints: BTreeMap<u32, DesiredEndpoint>,
    /// The ipcache: every prefix with its identity and node, looked up by longest prefix (see
    /// [`plan`]).
    pub ipcache: BTreeMap<Prefix, (IdentityId, NodeId)>,
    /// Addresses claimed by endpoints of different identities (or by a pod and a node): "no
    /// identity" in the ipcache (their traffic is dropped) until the claim is resolved.
    pub conflicts: BTreeSet<Ipv4Addr>,
    /// Remote identities' ingress entries toward this node's identities, where they may
    /// require authentication ([`peer_requirements`]): the datapath holds what a local pod
    /// sends them until the pair is authenticated, as it does for its own requirements.
    pub peer_policy: BTreeMap<IdentityId, Vec<PolicyEntry>>,
}

/// What the ipcache needs besides the cluster's pods: who this node is, and the CIDR prefixes
/// the policies name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addressing {
    /// This node's name: its address in the cluster's view is the host (identity 1), every
    /// other node's is a remote node (identity 6).
    pub node: String,
    /// More addresses of this node (the one its agent serves handshakes on).
    pub host: Vec<Ipv4Addr>,
    /// The node-local identities of the prefixes policies name, `0.0.0.0/0` → world included
    /// (the compiler's [`meshauth_policy::CidrIdentities::ipcache_entries`]).
    pub cidrs: Vec<(Cidr, IdentityId)>,
}

fn v4_prefix(c: &Cidr) -> Option<Prefix> {
    match c.addr() {
        IpAddr::V4(a) => Some((a, c.prefix_len())),
        IpAddr::V6(_) => None,
    }
}

/// Plans the datapath. `entries` gives the compiled entries of a local endpoint by name; an
/// endpoint without compiled entries gets none (everything to and from it is dropped).
///
/// The ipcache (IPv4; looked up by longest prefix, and where two sources name the same
/// prefix the later one here wins):
/// 1. the prefixes policies name with their node-local identities, `0.0.0.0/0` → world (2),
///    except prefixes inside a node's pod range (CIDR rules are about addresses outside the
///    cluster);
/// 2. each node's pod range → no identity (0): an address there that no pod has is dropped
///    as "no identity", as before the world entry existed;
/// 3. node addresses: this node's → host (1), the others' → remote-node (6);
/// 4. each pod's `/32` → its identity and node; an address two pods (or a pod and a node)
///    claim → no identity.
pub fn plan<'a>(
    cluster: &ClusterState,
    local: &BTreeMap<String, BoundEndpoint>,
    entries: impl Fn(&str) -> Option<&'a [PolicyEntry]>,
    addressing: &Addressing,
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
    let node_id = |name: &str| cluster.nodes.get(name).map_or(NodeId::new(0), |n| n.0);
    // 1. CIDR prefixes of policies, outside the pod ranges.
    let ranges: Vec<Cidr> = cluster.pod_ranges.values().copied().collect();
    for (c, id) in &addressing.cidrs {
        let Some(p) = v4_prefix(c) else { continue };
        if ranges.iter().any(|r| r.contains(c)) {
            continue;
        }
        out.ipcache.insert(p, (*id, NodeId::new(0)));
    }
    // 2. Pod ranges: no identity unless a pod has the address.
    for (node, r) in &cluster.pod_ranges {
        if let Some(p) = v4_prefix(r) {
            out.ipcache.insert(p, (IdentityId::UNKNOWN, node_id(node)));
        }
    }
    // 3. Nodes.
    let mut nodes: BTreeMap<Ipv4Addr, (IdentityId, NodeId)> = BTreeMap::new();
    for (name, (id, addr)) in &cluster.nodes {
        if let Some(IpAddr::V4(a)) = addr {
            let who = if *name == addressing.node {
                IdentityId::HOST
            } else {
                IdentityId::REMOTE_NODE
            };
            nodes.insert(*a, (who, *id));
        }
    }
    for a in &addressing.host {
        nodes.insert(*a, (IdentityId::HOST, node_id(&addressing.node)));
    }
    // 4. Pods; an address claimed twice has no identity.
    let mut pods: BTreeMap<Ipv4Addr, (IdentityId, NodeId)> = BTreeMap::new();
    for e in &cluster.endpoints {
        let Some(ip) = e.ipv4 else { continue };
        if out.conflicts.contains(&ip) {
            continue;
        }
        match pods.get(&ip) {
            Some(existing) if *existing != (e.identity, e.node_id) => {
                pods.remove(&ip);
                out.conflicts.insert(ip);
            }
            _ if nodes.contains_key(&ip) => {
                out.conflicts.insert(ip);
            }
            _ => {
                pods.insert(ip, (e.identity, e.node_id));
            }
        }
    }
    for (ip, v) in nodes.into_iter().chain(pods) {
        out.ipcache.insert((ip, 32), v);
    }
    for ip in &out.conflicts {
        out.ipcache
            .insert((*ip, 32), (IdentityId::UNKNOWN, NodeId::new(0)));
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
    auth_peers_where(entries, candidates, |a| a != AuthType::None)
}

/// The identities among `candidates` that `entries` require an authentication of kind `kind`
/// with.
fn auth_peers_where(
    entries: &[PolicyEntry],
    candidates: &BTreeSet<IdentityId>,
    kind: impl Fn(AuthType) -> bool,
) -> Vec<IdentityId> {
    let needing = entries.iter().filter(|e| kind(e.auth));
    if needing.clone().any(|e| e.remote.is_none()) {
        return candidates.iter().copied().collect();
    }
    needing
        .filter_map(|e| e.remote)
        .filter(|r| candidates.contains(r))
        .collect()
}

/// The identities, placed on nodes other than `node`, that some rule with an ingress rule
/// requiring authentication selects: the peers whose own policy may ask a local pod's traffic
/// for authentication (compile them as peers, then [`peer_requirements`]).
pub fn auth_requiring_peers<'a>(
    cluster: &ClusterState,
    node: &str,
    policies: impl IntoIterator<Item = &'a meshauth_policy::Policy>,
) -> BTreeSet<IdentityId> {
    let selectors: Vec<&meshauth_policy::Selector> = policies
        .into_iter()
        .flat_map(|p| &p.rules)
        .filter(|r| {
            r.ingress
                .iter()
                .any(|pr| pr.auth.auth_type() != AuthType::None)
        })
        .map(|r| &r.endpoint_selector)
        .collect();
    if selectors.is_empty() {
        return BTreeSet::new();
    }
    let remote: BTreeSet<IdentityId> = cluster
        .endpoints
        .iter()
        .filter(|e| e.node != node)
        .map(|e| e.identity)
        .collect();
    remote
        .into_iter()
        .filter(|id| {
            cluster
                .identities
                .get(id)
                .is_some_and(|l| selectors.iter().any(|s| s.matches(l)))
        })
        .collect()
}

/// The part of each remote identity's compiled entries that decides what it requires of this
/// node's identities (`local`): its ingress entries naming one of them or any peer, for the
/// identities where some of these require authentication. The datapath looks them up as it
/// looks up a local endpoint's, so the answer is the peer's own ([`meshauth_policy::lookup`]).
pub fn peer_requirements<'a>(
    local: &BTreeSet<IdentityId>,
    peers: impl IntoIterator<Item = (IdentityId, &'a [PolicyEntry])>,
) -> BTreeMap<IdentityId, Vec<PolicyEntry>> {
    let mut out = BTreeMap::new();
    for (remote, entries) in peers {
        let toward_us: Vec<PolicyEntry> = entries
            .iter()
            .filter(|e| {
                e.direction == meshauth_policy::Direction::Ingress
                    && e.remote.is_none_or(|r| local.contains(&r))
            })
            .cloned()
            .collect();
        if toward_us.iter().any(|e| e.auth != AuthType::None) {
            out.insert(remote, toward_us);
        }
    }
    out
}

/// What justifies keeping auth entries.
#[derive(Debug, Clone, Default)]
pub struct Justification {
    /// Identities hosted on this node.
    pub local: BTreeSet<IdentityId>,
    /// (identity, node) of every cluster endpoint running (its node reported its address): a
    /// pod placed but not running, such as one whose container was removed, justifies nothing.
    pub placed: BTreeSet<(IdentityId, NodeId)>,
    /// (local, remote) pairs some local endpoint's policy requires authentication for.
    pub required_here: BTreeSet<(IdentityId, IdentityId)>,
    /// The pairs of `required_here` that local policy requires authentication of per
    /// connection only (never once per pair): pre-authentication leaves them alone. Usually
    /// empty.
    pub connection_only_here: BTreeSet<(IdentityId, IdentityId)>,
    /// (remote, local) pairs the remote identity's own policy requires authentication for.
    pub required_by_peer: BTreeSet<(IdentityId, IdentityId)>,
}

impl Justification {
    /// An auth entry lives only while its local identity is hosted here, its peer identity is
    /// on the peer node it names, some policy (either side's) requires authentication between
    /// the two, and its kind is one that can succeed.
    pub fn justified(&self, k: &AuthKey) -> bool {
        matches!(k.auth_type, AuthType::Required | AuthType::PerConnection)
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
        .filter(|e| e.ipv4.is_some())
        .map(|e| (e.identity, e.node_id))
        .collect();
    let remotes: BTreeSet<IdentityId> = cluster.endpoints.iter().map(|e| e.identity).collect();
    let mut required_here = BTreeSet::new();
    let mut connection_only_here = BTreeSet::new();
    for e in desired.endpoints.values() {
        for r in auth_peers(&e.entries, &remotes) {
            required_here.insert((e.identity, r));
        }
        if e.entries.iter().any(|x| x.auth == AuthType::PerConnection) {
            let per_pair: BTreeSet<IdentityId> =
                auth_peers_where(&e.entries, &remotes, |a| a == AuthType::Required)
                    .into_iter()
                    .collect();
            for r in auth_peers_where(&e.entries, &remotes, |a| a == AuthType::PerConnection) {
                if !per_pair.contains(&r) {
                    connection_only_here.insert((e.identity, r));
                }
            }
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
        connection_only_here,
        required_by_peer,
    }
}

/// The pairs to authenticate ahead of their first packet: every pair some local endpoint's
/// policy requires authentication with once per pair, for every node the peer identity is
/// placed on, that has no entry yet; at most `max`. Never a pair policy does not require, nor
/// one it requires per connection (each connection authenticates on its own).
pub fn pre_authenticate(
    j: &Justification,
    existing: &dyn Fn(&AuthKey) -> bool,
    max: usize,
) -> Vec<AuthKey> {
    let mut out = Vec::new();
    for (local, remote) in &j.required_here {
        if j.connection_only_here.contains(&(*local, *remote)) {
            continue;
        }
        for (id, node) in j.placed.range((*remote, NodeId::new(0))..) {
            if id != remote {
                break;
            }
            let key = AuthKey {
                local: *local,
                remote: *remote,
                remote_node: *node,
                auth_type: AuthType::Required,
                connection: None,
            };
            if !existing(&key) {
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
        let d = plan(
            &cluster,
            &local,
            |n| (n == "a").then_some(&entries[..]),
            &Addressing::default(),
        );
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.endpoints[&7].id, EndpointId(7));
        assert_eq!(d.endpoints[&7].entries, entries);
        let conflict = "10.0.2.9".parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        assert_eq!(d.ipcache.len(), 3, "{:?}", d.ipcache);
        assert!(d.conflicts.contains(&conflict));
        assert_eq!(
            d.ipcache[&(conflict, 32)].0,
            IdentityId::UNKNOWN,
            "a conflict has no identity"
        );
        // No compiled entries: nothing allowed.
        let d = plan(&cluster, &local, |_| None, &Addressing::default());
        assert!(d.endpoints[&7].entries.is_empty());
    }

    #[test]
    fn the_ipcache_holds_pods_nodes_pod_ranges_and_policy_prefixes() {
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let c = |s: &str| Cidr::parse_prefix(s).unwrap_or(Cidr::ALL_V6);
        let local_id = |n: u32| IdentityId::new(IdentityId::FIRST_LOCAL + n);
        let cluster = ClusterState {
            endpoints: vec![
                cep("a", "10.200.1.10", 300, 1),
                cep("b", "10.200.2.10", 301, 2),
            ],
            nodes: BTreeMap::from([
                (
                    "n1".into(),
                    (
                        NodeId::new(1),
                        Some(
                            "10.199.0.1"
                                .parse()
                                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                        ),
                    ),
                ),
                (
                    "n2".into(),
                    (
                        NodeId::new(2),
                        Some(
                            "10.199.0.2"
                                .parse()
                                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                        ),
                    ),
                ),
                (
                    "n3".into(),
                    (
                        NodeId::new(3),
                        Some(
                            "2001:db8::3"
                                .parse()
                                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                        ),
                    ),
                ),
            ]),
            pod_ranges: BTreeMap::from([
                ("n1".into(), c("10.200.1.0/24")),
                ("n2".into(), c("10.200.2.0/24")),
            ]),
            ..ClusterState::default()
        };
        let addressing = Addressing {
            node: "n1".into(),
            host: vec![v4("10.199.0.1")],
            cidrs: vec![
                (Cidr::ALL_V4, IdentityId::WORLD),
                (Cidr::ALL_V6, IdentityId::WORLD),
                (c("10.0.0.0/8"), local_id(0)),
                (c("10.199.0.2/32"), local_id(1)),
                (c("10.200.1.0/24"), local_id(2)),
                (c("10.200.2.128/25"), local_id(3)),
                (c("10.200.2.10/32"), local_id(4)),
                (c("192.0.2.0/24"), local_id(5)),
                (c("2001:db8::/32"), local_id(6)),
            ],
        };
        let d = plan(&cluster, &BTreeMap::new(), |_| None, &addressing);
        let at = |ip: &str, len: u8| d.ipcache.get(&(v4(ip), len)).map(|v| v.0);
        // The world and the prefixes policies name (IPv4 only).
        assert_eq!(at("0.0.0.0", 0), Some(IdentityId::WORLD));
        assert_eq!(at("10.0.0.0", 8), Some(local_id(0)));
        assert_eq!(at("192.0.2.0", 24), Some(local_id(5)));
        // Pods and nodes win over equal prefixes; pod ranges over prefixes inside them.
        assert_eq!(at("10.200.2.10", 32), Some(IdentityId::new(301)));
        assert_eq!(at("10.200.1.10", 32), Some(IdentityId::new(300)));
        assert_eq!(at("10.199.0.2", 32), Some(IdentityId::REMOTE_NODE));
        assert_eq!(at("10.199.0.1", 32), Some(IdentityId::HOST));
        assert_eq!(at("10.200.1.0", 24), Some(IdentityId::UNKNOWN));
        assert_eq!(at("10.200.2.0", 24), Some(IdentityId::UNKNOWN));
        assert_eq!(at("10.200.2.128", 25), None, "inside a pod range");
        assert_eq!(d.ipcache[&(v4("10.199.0.2"), 32)].1, NodeId::new(2));
        assert_eq!(d.ipcache[&(v4("10.200.2.10"), 32)].1, NodeId::new(2));
        assert_eq!(d.ipcache.len(), 9, "{:?}", d.ipcache);
        // Another node's view: n2 is its host, n1 a remote node.
        let d = plan(
            &cluster,
            &BTreeMap::new(),
            |_| None,
            &Addressing {
                node: "n2".into(),
                ..addressing.clone()
            },
        );
        assert_eq!(d.ipcache[&(v4("10.199.0.2"), 32)].0, IdentityId::HOST);
        assert_eq!(
            d.ipcache[&(v4("10.199.0.1"), 32)].0,
            IdentityId::HOST,
            "its --address"
        );
        // A pod with a node's address: no identity.
        let mut clash = cluster.clone();
        clash.endpoints.push(cep("c", "10.199.0.2", 302, 2));
        let d = plan(&clash, &BTreeMap::new(), |_| None, &addressing);
        assert_eq!(d.ipcache[&(v4("10.199.0.2"), 32)].0, IdentityId::UNKNOWN);
        assert!(d.conflicts.contains(&v4("10.199.0.2")));
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
            required_here: BTreeSet::from([
                (IdentityId::new(300), IdentityId::new(301)),
                (IdentityId::new(300), IdentityId::new(302)),
            ]),
            // 300 <-> 302 is required per connection only: never ahead.
            connection_only_here: BTreeSet::from([(IdentityId::new(300), IdentityId::new(302))]),
            required_by_peer: BTreeSet::new(),
        };
        let key = |node: u32| AuthKey {
            local: IdentityId::new(300),
            remote: IdentityId::new(301),
            remote_node: NodeId::new(node),
            auth_type: AuthType::Required,
            connection: None,
        };
        assert_eq!(pre_authenticate(&j, &|_| false, 10), vec![key(2), key(3)]);
        assert_eq!(pre_authenticate(&j, &|k| *k == key(2), 10), vec![key(3)]);
        assert_eq!(pre_authenticate(&j, &|_| false, 1).len(), 1, "bounded");
        assert!(
            pre_authenticate(&j, &|_| false, 10)
                .iter()
                .all(|k| j.justified(k))
        );
    }

    #[test]
    fn a_peers_ingress_requirement_toward_local_identities_is_planned_for_the_sender() {
        let policies = meshauth_policy::parse_policies(include_str!(
            "../../meshauth-policy/tests/fixtures/walkthrough.yaml"
        ))
        .unwrap_or_default();
        assert_eq!(policies.len(), 3);
        let labels = |app: &str| {
            meshauth_policy::Labels::from_pairs([
                ("app", app),
                (meshauth_policy::NAMESPACE_LABEL, "default"),
            ])
            .unwrap_or_default()
        };
        let cluster = ClusterState {
            identities: BTreeMap::from([
                (IdentityId::new(300), labels("demodeployment")),
                (IdentityId::new(301), labels("client2")),
                (IdentityId::new(302), labels("client1")),
            ]),
            endpoints: vec![
                cep("demo-1", "10.0.1.2", 300, 1),
                cep("client2-2", "10.0.2.2", 301, 2),
                cep("client1-2", "10.0.2.3", 302, 2),
                cep("demo-2", "10.0.2.4", 300, 2),
            ],
            ..ClusterState::default()
        };
        // From n2, demodeployment on n1 is a peer whose ingress requires authentication;
        // clients are not (no rule requiring it selects them), nor a node's own pods.
        assert_eq!(
            auth_requiring_peers(&cluster, "n2", &policies),
            BTreeSet::from([IdentityId::new(300)])
        );
        let mut only_n1 = cluster.clone();
        only_n1.endpoints.retain(|e| e.name != "demo-2");
        assert!(auth_requiring_peers(&only_n1, "n1", &policies).is_empty());
        assert!(auth_requiring_peers(&cluster, "n2", &[]).is_empty());
        // Its compiled entries: kept toward our identities only, and only where some require.
        let mut c = meshauth_policy::Compiler::new();
        for (id, l) in &cluster.identities {
            c.set_identity(*id, l.clone());
        }
        for p in &policies {
            c.set_policy(p.clone());
        }
        c.set_endpoint("peer", labels("demodeployment"));
        let entries = c.entries("peer").unwrap_or_default();
        let client2 = BTreeSet::from([IdentityId::new(301)]);
        let got = peer_requirements(&client2, [(IdentityId::new(300), entries)]);
        let toward = &got[&IdentityId::new(300)];
        assert!(toward.iter().all(|e| e.direction == Direction::Ingress
            && e.remote.is_none_or(|r| r == IdentityId::new(301))));
        assert_eq!(
            meshauth_policy::lookup(
                toward,
                Direction::Ingress,
                IdentityId::new(301),
                meshauth_policy::Protocol::Tcp,
                80
            ),
            (Verdict::Allow, AuthType::Required)
        );
        // client1's traffic is allowed without authentication: nothing to hold for.
        let client1 = BTreeSet::from([IdentityId::new(302)]);
        assert!(peer_requirements(&client1, [(IdentityId::new(300), entries)]).is_empty());
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
            connection: None,
        };
        let with = [required(Some(301))];
        let wildcard = [required(None)];
        let d = plan(
            &cluster,
            &local,
            |_| Some(&with[..]),
            &Addressing::default(),
        );
        assert!(justification(&cluster, &d, []).justified(&key));
        let d = plan(
            &cluster,
            &local,
            |_| Some(&wildcard[..]),
            &Addressing::default(),
        );
        assert!(
            justification(&cluster, &d, []).justified(&key),
            "a wildcard requirement counts"
        );
        // Not required by us, but by the peer's policy.
        let d = plan(&cluster, &local, |_| None, &Addressing::default());
        assert!(!justification(&cluster, &d, []).justified(&key));
        let peer = [required(Some(300))];
        assert!(justification(&cluster, &d, [(IdentityId::new(301), &peer[..])]).justified(&key));
        // The peer is still placed on its node but no longer runs (its container was
        // removed, its node withdrew the address): nothing to authenticate with.
        let mut stopped = cluster.clone();
        stopped.endpoints[1].ipv4 = None;
        let d = plan(
            &stopped,
            &local,
            |_| Some(&with[..]),
            &Addressing::default(),
        );
        assert!(!justification(&stopped, &d, []).justified(&key));
        // The peer moved to another node, or the local identity left.
        let d = plan(
            &cluster,
            &local,
            |_| Some(&with[..]),
            &Addressing::default(),
        );
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
