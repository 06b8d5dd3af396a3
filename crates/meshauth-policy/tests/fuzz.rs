//! Arbitrary input never panics the parser, the evaluator or the compiler; and, for random
//! policies over every peer kind (selectors across namespaces, entities, CIDR sets with excepts,
//! ICMP types), the compiled entries looked up as the datapath does (the peer's identity from
//! the ipcache for addresses outside the cluster) agree with the evaluator.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;

use std::net::IpAddr;

use meshauth_policy::{
    CidrIdentities, Direction, IdentityId, Labels, Peer, Protocol, Verdict, compile_endpoint,
    compile_endpoint_with, evaluate, lookup, parse_policies, trace, trace_peers,
};
use proptest::prelude::*;
use serde_yaml::{Mapping, Value};

fn yamlish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "apiVersion: cilium.io/v2\n",
        "kind: CiliumNetworkPolicy\n",
        "kind: CiliumClusterwideNetworkPolicy\n",
        "metadata: {name: x}\n",
        "spec:\n",
        "specs:\n",
        "  endpointSelector: {}\n",
        "  endpointSelector: {matchLabels: {app: a}}\n",
        "  ingress:\n",
        "  egress:\n",
        "  ingressDeny:\n",
        "  - {}\n",
        "  - fromEndpoints: [{}]\n",
        "  - toEntities: [world, cluster]\n",
        "    toPorts: [{ports: [{port: \"80\", endPort: 90, protocol: TCP}]}]\n",
        "    authentication: {mode: required}\n",
        "  - fromEndpoints: [{matchExpressions: [{key: a, operator: In, values: [b]}]}]\n",
        "---\n",
        ": :\n",
        "  - [\n",
        "\t",
        "&a *a\n",
        "    toPorts: [{ports: [{port: 99999}]}]\n",
        "  - toFQDNs: [{matchName: x}]\n",
        "metadata: {name: x, namespace: ns1}\n",
        "metadata: {name: x, namespace: Bad}\n",
        "  - toCIDR: [10.0.0.0/8, 20.1.1.1]\n",
        "  - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]\n",
        "  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}]\n",
        "  - toCIDRSet: [{cidrGroupRef: g}]\n",
        "  - toCIDR: [\"2001:db8::/32\"]\n",
        "  - toEntities: [remote-node, unmanaged, none]\n",
        "  - fromEntities: [kube-apiserver]\n",
        "    icmps: [{fields: [{type: 8}, {type: EchoRequest, family: IPv6}]}]\n",
        "    icmps: [{fields: [{type: 300}]}]\n",
        "  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: ns2}}]\n",
    ]);
    prop::collection::vec(atoms, 0..24).prop_map(|v| v.concat())
}

/// Arbitrary YAML trees whose keys are mostly the policy language's own, so that generated
/// documents get deep into the parser instead of failing at the first key.
fn yaml_tree() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "endpointSelector",
        "matchLabels",
        "matchExpressions",
        "key",
        "operator",
        "values",
        "ingress",
        "egress",
        "ingressDeny",
        "egressDeny",
        "fromEndpoints",
        "toEndpoints",
        "fromEntities",
        "toEntities",
        "toPorts",
        "ports",
        "port",
        "endPort",
        "protocol",
        "authentication",
        "mode",
        "app",
        "rules",
        "toCIDR",
        "fromCIDR",
        "toCIDRSet",
        "fromCIDRSet",
        "cidr",
        "except",
        "cidrGroupRef",
        "icmps",
        "fields",
        "type",
        "family",
        "k8s:io.kubernetes.pod.namespace",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|n| Value::Number(n.into())),
        prop::sample::select(vec![
            "In",
            "in",
            "NotIn",
            "Exists",
            "DoesNotExist",
            "TCP",
            "UDP",
            "ANY",
            "ICMP",
            "80",
            "65536",
            "-1",
            "required",
            "disabled",
            "test-always-fail",
            "world",
            "host",
            "cluster",
            "all",
            "",
            "k8s:app",
            "remote-node",
            "unmanaged",
            "none",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "10.1.2.3",
            "::/0",
            "10.0.0.0/33",
            "IPv4",
            "IPv6",
            "EchoRequest",
            "8",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((key.clone(), inner), 0..5).prop_map(|kv| {
                let mut m = Mapping::new();
                for (k, v) in kv {
                    m.insert(Value::String(k.to_owned()), v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

fn pod(ns: &str, app: &str) -> Labels {
    format!("app={app}")
        .parse::<Labels>()
        .unwrap()
        .with_namespace(ns)
        .unwrap()
}

/// One peer rule of a section, as YAML: every kind of peer and of port.
fn peer_rule(ingress: bool, allow: bool) -> impl Strategy<Value = String> {
    let (eps, ents, cidr, cidr_set) = if ingress {
        ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet")
    } else {
        ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet")
    };
    let peers = prop_oneof![
        Just(String::new()),
        prop::sample::select(vec![
            "{}",
            "{matchLabels: {app: b}}",
            "{matchLabels: {k8s:io.kubernetes.pod.namespace: ns2}}",
            "{matchExpressions: [{key: io.kubernetes.pod.namespace, operator: NotIn, values: [ns2]}]}",
        ])
        .prop_map(move |s| format!("{eps}: [{s}], ")),
        prop::sample::select(vec![
            "all", "world", "cluster", "host", "remote-node", "unmanaged", "none",
        ])
        .prop_map(move |e| format!("{ents}: [{e}], ")),
        prop::sample::select(vec![
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3",
            "0.0.0.0/0",
            "192.0.2.0/24",
            "\"2001:db8::/32\"",
        ])
        .prop_map(move |c| format!("{cidr}: [{c}], ")),
        prop::sample::select(vec![
            "{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}",
            "{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.0.2.128/25]}",
            "{cidr: 10.1.0.0/16, except: [10.1.0.0/16]}",
            "{cidr: 0.0.0.0/0}",
        ])
        .prop_map(move |c| format!("{cidr_set}: [{c}], ")),
    ];
    let ports = prop_oneof![
        Just(String::new()),
        (
            prop::sample::select(vec!["TCP", "UDP", "ICMP", "ANY"]),
            prop::sample::select(vec![0u16, 8, 53, 80]),
        )
            .prop_map(|(proto, port)| format!(
                "toPorts: [{{ports: [{{port: \"{port}\", protocol: {proto}}}]}}], "
            )),
        prop::sample::select(vec![
            "{type: 8}",
            "{type: 0}",
            "{type: EchoRequest, family: IPv6}",
            "{type: 8, family: IPv6}",
        ])
        .prop_map(|f| format!("icmps: [{{fields: [{f}]}}], ")),
    ];
    let auth = if allow {
        prop::sample::select(vec![
            "",
            "authentication: {mode: required}",
            "authentication: {mode: disabled}",
        ])
        .boxed()
    } else {
        Just("").boxed()
    };
    (peers, ports, auth).prop_map(|(p, ports, a)| {
        // Authentication is refused unless the peers are endpoints.
        let a = if p.contains("Endpoints") { a } else { "" };
        format!("  - {{{p}{ports}{a}}}\n")
    })
}

fn policy(i: usize) -> impl Strategy<Value = String> {
    let section = |name: &'static str| {
        prop::collection::vec(
            peer_rule(name.starts_with("ingress"), !name.ends_with("Deny")),
            0..3,
        )
        .prop_map(move |rules| {
            if rules.is_empty() {
                String::new()
            } else {
                format!("  {name}:\n{}", rules.concat())
            }
        })
    };
    (
        prop::sample::select(vec![
            "kind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns1}",
            "kind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns2}",
            "kind: CiliumNetworkPolicy\nmetadata: {name: p}",
            "kind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}",
        ]),
        prop::sample::select(vec!["{}", "{matchLabels: {app: a}}"]),
        section("ingress"),
        section("ingressDeny"),
        section("egress"),
        section("egressDeny"),
    )
        .prop_map(move |(head, sel, i1, i2, e1, e2)| {
            let head = head.replace("name: p", &format!("name: p{i}"));
            format!(
                "apiVersion: cilium.io/v2\n{head}\nspec:\n  endpointSelector: {sel}\n{i1}{i2}{e1}{e2}"
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn compiled_entries_agree_with_evaluation_for_every_peer_kind(
        docs in (1usize..4).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>()),
        queries in prop::collection::vec(
            (
                prop::sample::select(vec![Direction::Ingress, Direction::Egress]),
                0usize..13,
                prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Icmpv6]),
                prop_oneof![prop::sample::select(vec![0u16, 8, 53, 80, 128]), any::<u16>()],
            ),
            32,
        ),
    ) {
        let yaml = docs.join("---\n");
        let policies = parse_policies(&yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        let pods = [pod("ns1", "a"), pod("ns1", "b"), pod("ns2", "a"), pod("ns2", "b"), pod("default", "b")];
        let ids: BTreeMap<IdentityId, Labels> = pods
            .iter()
            .enumerate()
            .map(|(i, l)| (IdentityId::new(256 + i as u32), l.clone()))
            .collect();
        let cidrs = CidrIdentities::for_policies(&policies);
        let addrs: Vec<IpAddr> = ["10.1.2.3", "10.1.9.9", "10.200.0.1", "192.0.2.5", "192.0.2.200", "8.8.8.8", "2001:db8::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for endpoint in &pods[..4] {
            let entries = compile_endpoint_with(&policies, &ids, &cidrs, endpoint);
            for &(direction, who, protocol, port) in &queries {
                // The peer as rules see it, and the identity the datapath sees for it.
                let (peer, remote) = match who {
                    0..=4 => (Peer::Endpoint(&pods[who]), IdentityId::new(256 + who as u32)),
                    5 => (Peer::Host, IdentityId::HOST),
                    6 => (Peer::RemoteNode, IdentityId::REMOTE_NODE),
                    7 => (Peer::Unmanaged, IdentityId::UNMANAGED),
                    n => {
                        let a = addrs[n - 8];
                        (Peer::Address(a), cidrs.identity_of(a))
                    }
                };
                let want = evaluate(&policies, endpoint, direction, peer, protocol, port);
                let got = lookup(&entries, direction, remote, protocol, port);
                let want = (want.verdict, if want.verdict == Verdict::Allow { want.auth } else { meshauth_policy::AuthType::None });
                prop_assert_eq!(
                    got,
                    want,
                    "endpoint {} {:?} peer {:?} ({}) {}/{:?}\npolicies:\n{}\nentries: {:?}",
                    endpoint, direction, peer, remote, port, protocol, yaml, entries
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_do_not_panic(s in ".{0,400}") {
        let _ = parse_policies(&s);
    }

    #[test]
    fn structured_garbage_does_not_panic(s in yamlish(), port in any::<u16>()) {
        if let Ok(policies) = parse_policies(&s) {
            let a = pod("default", "a");
            let ids = BTreeMap::from([(IdentityId::new(256), a.clone())]);
            let entries = compile_endpoint(&policies, &ids, &a);
            let _ = lookup(&entries, Direction::Ingress, IdentityId::new(256), Protocol::Tcp, port);
            let _ = trace(&policies, &a, &pod("ns1", "b"), Protocol::Tcp, port);
            let addr: IpAddr = "10.1.2.3".parse().unwrap();
            let _ = trace_peers(&policies, Peer::Address(addr), Peer::Endpoint(&a), Protocol::Icmp, port);
        }
    }

    #[test]
    fn arbitrary_yaml_trees_as_spec_do_not_panic(spec in yaml_tree(), port in any::<u16>()) {
        let body = serde_yaml::to_string(&spec).unwrap_or_default();
        let indented: String = body.lines().map(|l| format!("  {l}\n")).collect();
        let doc = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: fuzz}}\nspec:\n{indented}"
        );
        match parse_policies(&doc) {
            Ok(policies) => {
                let a = pod("default", "a");
                let ids = BTreeMap::from([(IdentityId::new(256), a.clone())]);
                let entries = compile_endpoint(&policies, &ids, &a);
                let _ = lookup(&entries, Direction::Egress, IdentityId::new(256), Protocol::Udp, port);
                let _ = lookup(&entries, Direction::Egress, IdentityId::new(1 << 24), Protocol::Icmp, port);
            }
            // Every refusal says where: a document, and a path or a line.
            Err(e) => prop_assert!(e.to_string().starts_with("document 1"), "{}", e),
        }
    }
}
