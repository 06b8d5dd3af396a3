//! Compile 1,000 policies over 10,000 identities: the full compile of a node's endpoints, and
//! the incremental cost of one new identity and one new policy.
//!
//! Run: `cargo bench -p meshauth-policy --bench compile` (a plain bench binary: it prints the
//! median of repeated runs; compare numbers from the same machine and run).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshauth_policy::{Compiler, IdentityId, Labels, compile_endpoint, parse_policies};

const IDENTITIES: usize = 10_000;
const POLICIES: usize = 1_000;
const ENDPOINTS_ON_NODE: usize = 100;

fn labels(i: usize) -> Labels {
    format!("app=svc-{i},team=t{}", i % 50)
        .parse()
        .expect("valid labels")
}

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

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn time<T>(n: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let yaml = policies_yaml();
    let parse = time(5, || parse_policies(&yaml).expect("valid policies"));
    let policies = parse_policies(&yaml).expect("valid policies");
    let identities: BTreeMap<IdentityId, Labels> = (0..IDENTITIES)
        .map(|i| (IdentityId::new(256 + i as u32), labels(i)))
        .collect();
    let mut entries = 0;
    let full = time(5, || {
        entries = 0;
        for e in 0..ENDPOINTS_ON_NODE {
            entries += compile_endpoint(&policies, &identities, &labels(e)).len();
        }
    });

    let mut c = Compiler::new();
    for (id, l) in &identities {
        c.set_identity(*id, l.clone());
    }
    for e in 0..ENDPOINTS_ON_NODE {
        c.set_endpoint(&format!("ep{e}"), labels(e));
    }
    for p in policies.iter().cloned() {
        c.set_policy(p);
    }
    let mut next = 100_000u32;
    let add_identity = time(21, || {
        next += 1;
        c.set_identity(
            IdentityId::new(next),
            format!("app=new-{next},team=t7").parse().expect("labels"),
        )
    });
    let extra = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: extra}\nspec:\n  endpointSelector: {matchLabels: {app: svc-3}}\n  egress:\n  - toEndpoints: [{matchLabels: {team: t9}}]\n",
    )
    .expect("valid policy");
    let add_policy = time(21, || c.set_policy(extra[0].clone()));

    println!(
        "policies: {POLICIES}, identities: {IDENTITIES}, endpoints on the node: {ENDPOINTS_ON_NODE}"
    );
    println!("parse {POLICIES} policies:                 {parse:?}");
    println!("full compile of the node ({entries} entries): {full:?}");
    println!("incremental: one new identity:            {add_identity:?}");
    println!("incremental: one new policy:              {add_policy:?}");
}
