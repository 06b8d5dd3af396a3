//! What the node's WireGuard tunnel should hold, computed from the cluster view (pure).
//!
//! - One peer per other node that has an address and published a key; its allowed IPs are
//!   exactly the addresses of the pods the control plane placed on that node and the node
//!   reported (cryptokey routing): the tunnel accepts from a peer only its own pods, and sends
//!   a pod's packets only to the node that runs it. An address two pods claim is nobody's.
//! - Routes: every other node's pod range goes into the tunnel, peer or not, so that what has
//!   no peer yet is dropped there, never sent in the clear.
//! - The node whose name sorts first initiates the pair's key exchange.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use meshauth_policy::{Cidr, NodeId, TunnelKey};

use crate::cache::ClusterState;

/// One peer of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPeer {
    /// The peer node's name.
    pub name: String,
    /// Its id.
    pub node: NodeId,
    /// Its address (the tunnel's endpoint is this address and the tunnel port).
    pub address: IpAddr,
    /// The WireGuard key it published.
    pub key: TunnelKey,
    /// The addresses of its pods: what it may send through the tunnel, and what goes to it.
    pub allowed: BTreeSet<Ipv4Addr>,
    /// Whether this node initiates the pair's key exchange.
    pub initiator: bool,
}

/// The tunnel's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelPlan {
    /// Peers, by node name.
    pub peers: BTreeMap<String, PlannedPeer>,
    /// The pod ranges of every other node, routed into the tunnel.
    pub routes: BTreeSet<Cidr>,
}

impl TunnelPlan {
    /// The peer whose address is `addr`.
    pub fn peer_at(&self, addr: IpAddr) -> Option<&PlannedPeer> {
        self.peers.values().find(|p| p.address == addr)
    }
}

/// The plan for node `own` from `cluster`.
pub fn plan(cluster: &ClusterState, own: &str) -> TunnelPlan {
    // How many pods claim each address.
    let mut claims: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for ip in cluster.endpoints.iter().filter_map(|e| e.ipv4) {
        *claims.entry(ip).or_default() += 1;
    }
    let mut out = TunnelPlan::default();
    for (name, range) in &cluster.pod_ranges {
        if name != own {
            out.routes.insert(*range);
        }
    }
    for (name, (node, address)) in &cluster.nodes {
        if name == own {
            continue;
        }
        let (Some(address), Some(key)) = (address, cluster.tunnel_keys.get(name)) else {
            continue;
        };
        let allowed = cluster
            .endpoints
            .iter()
            .filter(|e| e.node == *name)
            .filter_map(|e| e.ipv4)
            // Two pods with one address (on two nodes, or one): nobody's.
            .filter(|ip| claims.get(ip) == Some(&1))
            .collect();
        out.peers.insert(
            name.clone(),
            PlannedPeer {
                name: name.clone(),
                node: *node,
                address: *address,
                key: *key,
                allowed,
                initiator: meshauth_auth::tunnel_key::initiates(own, name),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use super::*;
    use crate::cache::ClusterEndpoint;
    use meshauth_policy::IdentityId;

    fn ep(node: &str, id: u32, name: &str, ip: Option<&str>) -> ClusterEndpoint {
        ClusterEndpoint {
            node: node.into(),
            node_id: NodeId::new(id),
            namespace: "default".into(),
            name: name.into(),
            ipv4: ip.map(|i| i.parse().unwrap()),
            interface: String::new(),
            identity: IdentityId::new(300),
        }
    }

    fn cluster() -> ClusterState {
        let mut c = ClusterState::default();
        for (n, id) in [("n1", 1u32), ("n2", 2), ("n3", 3)] {
            c.nodes.insert(
                n.into(),
                (
                    NodeId::new(id),
                    Some(format!("10.199.0.{id}").parse().unwrap()),
                ),
            );
            c.pod_ranges.insert(
                n.into(),
                Cidr::parse_prefix(&format!("10.200.{id}.0/24")).unwrap(),
            );
        }
        c.tunnel_keys.insert("n1".into(), TunnelKey::new([1; 32]));
        c.tunnel_keys.insert("n2".into(), TunnelKey::new([2; 32]));
        c.endpoints = vec![
            ep("n1", 1, "a", Some("10.200.1.10")),
            ep("n2", 2, "b", Some("10.200.2.10")),
            ep("n2", 2, "c", Some("10.200.2.11")),
            // Placed, not running: no address, nothing allowed.
            ep("n2", 2, "d", None),
            ep("n3", 3, "e", Some("10.200.3.10")),
        ];
        c
    }

    #[test]
    fn peers_allow_exactly_their_running_pods() {
        let p = plan(&cluster(), "n1");
        assert_eq!(p.peers.len(), 1, "n3 published no key: no peer");
        let n2 = &p.peers["n2"];
        assert_eq!(n2.node, NodeId::new(2));
        assert_eq!(n2.key, TunnelKey::new([2; 32]));
        assert_eq!(
            n2.allowed,
            ["10.200.2.10", "10.200.2.11"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect()
        );
        assert!(n2.initiator, "n1 sorts first");
        assert!(!plan(&cluster(), "n2").peers["n1"].initiator);
    }

    #[test]
    fn every_other_nodes_range_is_routed_into_the_tunnel_peer_or_not() {
        let p = plan(&cluster(), "n1");
        let routes: Vec<String> = p.routes.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["10.200.2.0/24", "10.200.3.0/24"]);
    }

    #[test]
    fn an_address_two_pods_claim_is_nobodys() {
        let mut c = cluster();
        c.endpoints.push(ep("n1", 1, "x", Some("10.200.2.11")));
        let p = plan(&c, "n3");
        let n2 = &p.peers["n2"];
        assert!(!n2.allowed.contains(&"10.200.2.11".parse().unwrap()));
        assert!(n2.allowed.contains(&"10.200.2.10".parse().unwrap()));
        assert!(
            !p.peers["n1"]
                .allowed
                .contains(&"10.200.2.11".parse().unwrap())
        );
    }

    #[test]
    fn a_node_without_an_address_is_no_peer() {
        let mut c = cluster();
        c.nodes.insert("n2".into(), (NodeId::new(2), None));
        assert!(plan(&c, "n1").peers.is_empty());
        assert_eq!(plan(&c, "n1").routes.len(), 2);
    }

    #[test]
    fn peer_at_finds_the_node_by_address() {
        let p = plan(&cluster(), "n1");
        assert_eq!(
            p.peer_at("10.199.0.2".parse().unwrap())
                .map(|p| p.name.as_str()),
            Some("n2")
        );
        assert!(p.peer_at("10.199.0.3".parse().unwrap()).is_none());
    }
}
