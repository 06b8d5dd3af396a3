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
}
