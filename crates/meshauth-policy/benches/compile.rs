//! Compile 1,000 policies over 10,000 identities: parsing, the full compile of a node's
//! endpoints, and the incremental cost of one new identity and one new policy.
//!
//! Run (short form, as recorded in docs/benchmarks.md):
//! `cargo bench -p meshauth-policy --bench compile -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use meshauth_policy::{Compiler, IdentityId, Labels, Policy, compile_endpoint, parse_policies};

const IDENTITIES: usize = 10_000;
const POLICIES: usize = 1_000;
const ENDPOINTS_ON_NODE: usize = 100;

/// A pod of namespace `default`, where the policies (no `metadata.namespace`) apply.
fn labels(i: usize) -> Labels {
    format!("app=svc-{i},team=t{}", i % 50)
        .parse::<Labels>()
        .expect("valid labels")
        .with_namespace("default")
        .expect("valid namespace")
}

/// Each policy selects one of the node's 100 endpoints and allows one of 50 teams (200
/// identities each) on its own port; a third require authentication.
fn policies_yaml() -> String {
    (0..POLICIES)
        .map(|k| {
            let auth = if k % 3 == 0 { "\n    authentication: {mode: required}" } else { "" };
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{k}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: svc-{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{team: t{}}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]{auth}\n---\n",
                k % ENDPOINTS_ON_NODE,
                k % 50,
                8000 + k
            )
        })
        .collect()
}

fn compile_node(policies: &[Policy], identities: &BTreeMap<IdentityId, Labels>) -> usize {
    (0..ENDPOINTS_ON_NODE)
        .map(|e| compile_endpoint(policies, identities, &labels(e)).len())
        .sum()
}

fn bench(c: &mut Criterion) {
    let yaml = policies_yaml();
    let policies = parse_policies(&yaml).expect("valid policies");
    let identities: BTreeMap<IdentityId, Labels> = (0..IDENTITIES)
        .map(|i| (IdentityId::new(256 + i as u32), labels(i)))
        .collect();
    let entries = compile_node(&policies, &identities);
    println!(
        "policies: {POLICIES}, identities: {IDENTITIES}, endpoints on the node: {ENDPOINTS_ON_NODE}, entries: {entries}"
    );

    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("parse 1000 policies", |b| {
        b.iter(|| parse_policies(black_box(&yaml)))
    });
    g.bench_function("full compile of the node", |b| {
        b.iter(|| compile_node(black_box(&policies), black_box(&identities)))
    });

    let mut compiler = Compiler::new();
    for (id, l) in &identities {
        compiler.set_identity(*id, l.clone());
    }
    for e in 0..ENDPOINTS_ON_NODE {
        compiler.set_endpoint(&format!("ep{e}"), labels(e));
    }
    for p in policies.iter().cloned() {
        compiler.set_policy(p);
    }
    let mut next = 100_000u32;
    g.bench_function("incremental: one new identity", |b| {
        b.iter(|| {
            next += 1;
            compiler.set_identity(
                IdentityId::new(next),
                format!("app=new-{next},team=t7").parse().expect("labels"),
            )
        })
    });
    // The same policy alternating between two peers, so every iteration is a real change
    // (setting an unchanged policy is a no-op).
    let extra: Vec<Policy> = ["t9", "t8"]
        .iter()
        .map(|team| {
            parse_policies(&format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: extra}}\nspec:\n  endpointSelector: {{matchLabels: {{app: svc-3}}}}\n  egress:\n  - toEndpoints: [{{matchLabels: {{team: {team}}}}}]\n"
            ))
            .expect("valid policy")
            .remove(0)
        })
        .collect();
    let mut flip = 0usize;
    g.bench_function("incremental: one changed policy", |b| {
        b.iter(|| {
            flip += 1;
            compiler.set_policy(extra[flip % 2].clone())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
