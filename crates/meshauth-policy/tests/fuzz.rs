//! Arbitrary input never panics the parser, the evaluator or the compiler.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;

use meshauth_policy::{
    Direction, IdentityId, Labels, Protocol, compile_endpoint, lookup, parse_policies, trace,
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_do_not_panic(s in ".{0,400}") {
        let _ = parse_policies(&s);
    }

    #[test]
    fn structured_garbage_does_not_panic(s in yamlish(), port in any::<u16>()) {
        if let Ok(policies) = parse_policies(&s) {
            let ids = BTreeMap::from([(IdentityId::new(256), "app=a".parse::<Labels>().unwrap())]);
            let entries = compile_endpoint(&policies, &ids, &"app=a".parse().unwrap());
            let _ = lookup(&entries, Direction::Ingress, IdentityId::new(256), Protocol::Tcp, port);
            let _ = trace(&policies, &"app=a".parse().unwrap(), &"app=b".parse().unwrap(), Protocol::Tcp, port);
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
                let ids = BTreeMap::from([(IdentityId::new(256), "app=a".parse::<Labels>().unwrap())]);
                let entries = compile_endpoint(&policies, &ids, &"app=a".parse().unwrap());
                let _ = lookup(&entries, Direction::Egress, IdentityId::new(256), Protocol::Udp, port);
            }
            // Every refusal says where: a document, and a path or a line.
            Err(e) => prop_assert!(e.to_string().starts_with("document 1"), "{}", e),
        }
    }
}
