//! What a datapath verdict means in policy terms, for the flow log (pure): the labels of peers
//! that are not pods (`reserved:world`, `cidr:<prefix>`, as Cilium names them) and the policies
//! that decided the event's direction, found with [`meshauth_policy::trace_peers`], the same
//! evaluation `meshauth policy trace` runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use meshauth_policy::{Cidr, Direction, IdentityId, Labels, Peer, Policy, Protocol, Verdict};

/// The policies that decided one direction of a flow, as `namespace/name` (a clusterwide
/// policy: `name`), sorted and unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decided {
    /// Policies with an allow rule that matched (none decided if nothing selects the endpoint).
    pub allowed_by: Vec<String>,
    /// Policies with a deny rule that matched.
    pub denied_by: Vec<String>,
    /// For a default deny (selected, no rule allows): the policies whose selection made it.
    pub default_deny_by: Vec<String>,
}

/// The labels the flow log shows for `identity` when no pod has it: Cilium's reserved labels
/// (`reserved:world`, `reserved:host`, ...) and, for the identity of a CIDR prefix the policies
/// name, `cidr:<prefix>` with `reserved:world`. Keys carry their source (`reserved:`, `cidr:`),
/// which no Kubernetes label key can contain; values are empty. `None` for identities of pods
/// and for unknown numbers.
pub fn reserved_labels(
    identity: IdentityId,
    cidrs: &BTreeMap<IdentityId, Cidr>,
) -> Option<HashMap<String, String>> {
    let names: Vec<String> = match identity {
        IdentityId::HOST => vec!["reserved:host".into()],
        IdentityId::WORLD => vec!["reserved:world".into()],
        IdentityId::UNMANAGED => vec!["reserved:unmanaged".into()],
        IdentityId::REMOTE_NODE => vec!["reserved:remote-node".into()],
        id => {
            let prefix = cidrs.get(&id)?;
            vec![format!("cidr:{prefix}"), "reserved:world".into()]
        }
    };
    Some(names.into_iter().map(|n| (n, String::new())).collect())
}

/// The peer policy sees at `ip` with `identity`: a pod's labels, an entity, or an address
/// outside the cluster (a CIDR prefix's identity). `None` when the identity is unknown (a
/// packet the datapath dropped for it).
fn peer<'a>(
    identity: IdentityId,
    ip: Ipv4Addr,
    identities: &'a BTreeMap<IdentityId, Labels>,
    cidrs: &BTreeMap<IdentityId, Cidr>,
) -> Option<Peer<'a>> {
    if let Some(labels) = identities.get(&identity) {
        return Some(Peer::Endpoint(labels));
    }
    match identity {
        IdentityId::HOST => Some(Peer::Host),
        IdentityId::WORLD => Some(Peer::World),
        IdentityId::REMOTE_NODE => Some(Peer::RemoteNode),
        IdentityId::UNMANAGED => Some(Peer::Unmanaged),
        // The ipcache gave the address the identity of the longest prefix the policies name
        // that contains it: the address itself matches the same CIDR peers.
        id if cidrs.contains_key(&id) => Some(Peer::Address(IpAddr::V4(ip))),
        _ => None,
    }
}

/// One datapath verdict, as [`decided`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// Source address and identity.
    pub src: (Ipv4Addr, IdentityId),
    /// Destination address and identity.
    pub dst: (Ipv4Addr, IdentityId),
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port, or for ICMP the type.
    pub port: u16,
    /// The program that decided: the source's egress or the destination's ingress.
    pub direction: Direction,
}

/// The policies that decided `event`'s direction, by the policies and identities the agent
/// holds now (empty when a peer's identity or the protocol is unknown).
pub fn decided(
    policies: &[Policy],
    identities: &BTreeMap<IdentityId, Labels>,
    cidrs: &BTreeMap<IdentityId, Cidr>,
    event: &Event,
) -> Decided {
    let (Some(src), Some(dst), Some(protocol)) = (
        peer(event.src.1, event.src.0, identities, cidrs),
        peer(event.dst.1, event.dst.0, identities, cidrs),
        Protocol::from_number(event.protocol),
    ) else {
        return Decided::default();
    };
    let trace = meshauth_policy::trace_peers(policies, src, dst, protocol, event.port);
    let side = match event.direction {
        Direction::Egress => trace.egress,
        Direction::Ingress => trace.ingress,
    };
    if !side.selected {
        return Decided::default();
    }
    let keys: Vec<String> = side
        .decided_by
        .iter()
        .map(|r| r.policy.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    match (side.verdict, keys.is_empty()) {
        (Verdict::Allow, _) => Decided {
            allowed_by: keys,
            ..Decided::default()
        },
        (Verdict::Deny, false) => Decided {
            denied_by: keys,
            ..Decided::default()
        },
        (Verdict::Deny, true) => Decided {
            default_deny_by: side.selected_by,
            ..Decided::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied()).expect("valid labels")
    }

    const POLICIES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - icmps: [{fields: [{type: 8}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-telnet}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "23", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: egress-to-net, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toCIDR: [192.0.2.0/24]
"#;

    struct World {
        policies: Vec<Policy>,
        identities: BTreeMap<IdentityId, Labels>,
        cidrs: BTreeMap<IdentityId, Cidr>,
    }

    const CLIENT: IdentityId = IdentityId::new(256);
    const SERVER: IdentityId = IdentityId::new(257);
    const NET: IdentityId = IdentityId::new(IdentityId::FIRST_LOCAL);
    const C_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
    const S_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);

    fn world() -> World {
        let ns = ("io.kubernetes.pod.namespace", "default");
        World {
            policies: meshauth_policy::parse_policies(POLICIES).expect("the policies parse"),
            identities: BTreeMap::from([
                (CLIENT, labels(&[("app", "client"), ns])),
                (SERVER, labels(&[("app", "server"), ns])),
            ]),
            cidrs: BTreeMap::from([(NET, "192.0.2.0/24".parse().expect("a prefix"))]),
        }
    }

    fn ev(
        src: (Ipv4Addr, IdentityId),
        dst: (Ipv4Addr, IdentityId),
        proto: u8,
        port: u16,
        direction: Direction,
    ) -> Event {
        Event {
            src,
            dst,
            protocol: proto,
            port,
            direction,
        }
    }

    fn decide(w: &World, e: Event) -> Decided {
        decided(&w.policies, &w.identities, &w.cidrs, &e)
    }

    #[test]
    fn an_allowed_flow_names_the_allowing_policy_of_its_direction() {
        let w = world();
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 6, 80, Direction::Ingress),
        );
        assert_eq!(d.allowed_by, ["default/allow-client"]);
        assert!(
            d.denied_by.is_empty() && d.default_deny_by.is_empty(),
            "{d:?}"
        );
        // ICMP is decided by its type: echo request (8) is allowed, timestamp (13) is not.
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 1, 8, Direction::Ingress),
        );
        assert_eq!(d.allowed_by, ["default/allow-client"]);
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 1, 13, Direction::Ingress),
        );
        assert_eq!(d.default_deny_by, ["default/allow-client", "no-telnet"]);
    }

    #[test]
    fn a_deny_names_the_denying_clusterwide_policy() {
        let w = world();
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 6, 23, Direction::Ingress),
        );
        assert_eq!(d.denied_by, ["no-telnet"]);
        assert!(d.allowed_by.is_empty(), "{d:?}");
    }

    #[test]
    fn a_default_deny_names_the_policies_that_select_the_endpoint() {
        let w = world();
        // The client's egress is selected by egress-to-net, which allows only 192.0.2.0/24.
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 17, 53, Direction::Egress),
        );
        assert_eq!(d.default_deny_by, ["default/egress-to-net"]);
        assert!(d.allowed_by.is_empty() && d.denied_by.is_empty(), "{d:?}");
    }

    #[test]
    fn cidr_and_world_peers_are_matched_by_their_address() {
        let w = world();
        let inside = Ipv4Addr::new(192, 0, 2, 7);
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (inside, NET), 6, 443, Direction::Egress),
        );
        assert_eq!(d.allowed_by, ["default/egress-to-net"]);
        let outside = Ipv4Addr::new(198, 51, 100, 1);
        let d = decide(
            &w,
            ev(
                (C_IP, CLIENT),
                (outside, IdentityId::WORLD),
                6,
                443,
                Direction::Egress,
            ),
        );
        assert_eq!(d.default_deny_by, ["default/egress-to-net"]);
    }

    #[test]
    fn an_unselected_direction_or_an_unknown_peer_names_nothing() {
        let w = world();
        // Nothing selects the server's egress.
        let d = decide(
            &w,
            ev((S_IP, SERVER), (C_IP, CLIENT), 6, 80, Direction::Egress),
        );
        assert_eq!(d, Decided::default());
        let unknown = IdentityId::new(999);
        let d = decide(
            &w,
            ev((C_IP, unknown), (S_IP, SERVER), 6, 80, Direction::Ingress),
        );
        assert_eq!(d, Decided::default());
        let d = decide(
            &w,
            ev((C_IP, CLIENT), (S_IP, SERVER), 99, 80, Direction::Ingress),
        );
        assert_eq!(d, Decided::default());
    }

    #[test]
    fn peers_that_are_not_pods_get_ciliums_reserved_labels() {
        let w = world();
        let keys = |id| {
            let mut k: Vec<String> = reserved_labels(id, &w.cidrs)
                .map(|l| l.into_keys().collect())
                .unwrap_or_default();
            k.sort();
            k
        };
        assert_eq!(keys(IdentityId::WORLD), ["reserved:world"]);
        assert_eq!(keys(IdentityId::HOST), ["reserved:host"]);
        assert_eq!(keys(IdentityId::REMOTE_NODE), ["reserved:remote-node"]);
        assert_eq!(keys(NET), ["cidr:192.0.2.0/24", "reserved:world"]);
        assert!(reserved_labels(CLIENT, &w.cidrs).is_none());
        assert!(reserved_labels(IdentityId::UNKNOWN, &w.cidrs).is_none());
    }
}
