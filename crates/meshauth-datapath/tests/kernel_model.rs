//! The contract between `meshauth policy trace` and the kernel, checked without root: random
//! policies are compiled, planned into the exact policy map keys the loader writes
//! ([`policy_keys`]), and a model of the C program's lookup over those keys
//! ([`kernel_lookup`]) must answer every query as [`meshauth_policy::lookup`] does, verdict and
//! auth type alike. Policies are in namespaces (CiliumNetworkPolicies of `default` and `other`,
//! clusterwide policies), identities carry their namespace label, rules name ports, ICMP types
//! (`icmps`: the type is the port of ICMP queries) or entities.
//!
//! `the_old_key_layout_is_caught` runs the same property against the layout the loader wrote
//! before (every entry as its own prefixes; the kernel taking "deny anywhere" and the maximum
//! auth over its four lookups) and requires the property to find a counterexample: the test has
//! teeth.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, HashMap};

use meshauth_datapath::policy_keys::{Decision, kernel_lookup, policy_keys};
use meshauth_datapath::types::port_prefixes;
use meshauth_policy::{
    AuthType, Direction, IdentityId, Labels, PolicyEntry, Protocol, Verdict, compile_endpoint,
    lookup, parse_policies,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

/// One peer rule of a section, as YAML.
fn peer_rule(ingress: bool, allow: bool) -> impl Strategy<Value = String> {
    let (eps, ents) = if ingress {
        ("fromEndpoints", "fromEntities")
    } else {
        ("toEndpoints", "toEntities")
    };
    let peers = prop_oneof![
        prop::sample::select(vec!["a", "b", "c"])
            .prop_map(move |app| format!("{eps}: [{{matchLabels: {{app: {app}}}}}]")),
        // Across namespaces: the selector names the namespace label itself.
        prop::sample::select(vec!["a", "b"]).prop_map(move |app| format!(
            "{eps}: [{{matchLabels: {{app: {app}, k8s:io.kubernetes.pod.namespace: other}}}}]"
        )),
        Just(format!("{eps}: [{{}}]")),
        prop::sample::select(vec!["all", "world", "cluster", "host", "remote-node"])
            .prop_map(move |e| format!("{ents}: [{e}]")),
    ];
    let port = prop_oneof![
        Just(String::new()),
        // ICMP types: in the port field of compiled entries and of the kernel's lookup.
        prop::sample::select(vec!["0", "3", "8", "13", "EchoReply", "255"])
            .prop_map(|t| format!(", icmps: [{{fields: [{{type: {t}, family: IPv4}}]}}]")),
        (
            prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP", "ANY"]),
            prop::sample::select(vec![0u16, 1, 22, 53, 80, 443, 1024, 8080]),
            prop::option::of(prop::sample::select(vec![80u16, 90, 1023, 9000, 65535])),
        )
            .prop_map(|(proto, port, end)| {
                let end = match end {
                    Some(e) if e >= port && port > 0 => format!(", endPort: {e}"),
                    _ => String::new(),
                };
                format!(", toPorts: [{{ports: [{{port: \"{port}\", protocol: {proto}{end}}}]}}]")
            }),
    ];
    let auth = if allow {
        prop::sample::select(vec![
            "",
            "",
            ", authentication: {mode: required}",
            ", authentication: {mode: disabled}",
            ", authentication: {mode: test-always-fail}",
        ])
        .boxed()
    } else {
        Just("").boxed()
    };
    // Authentication is refused for entities (they have no SPIFFE identity).
    (peers, port, auth).prop_map(|(p, port, a)| {
        let a = if p.contains("Entities") { "" } else { a };
        format!("  - {{{p}{port}{a}}}\n")
    })
}

fn section(name: &'static str) -> impl Strategy<Value = String> {
    let ingress = name.starts_with("ingress");
    let allow = !name.ends_with("Deny");
    prop::collection::vec(peer_rule(ingress, allow), 0..3).prop_map(move |rules| {
        if rules.is_empty() {
            String::new()
        } else {
            format!("  {name}:\n{}", rules.concat())
        }
    })
}

/// A policy: a `CiliumNetworkPolicy` in `default` (no metadata.namespace) or in `other`, or a
/// `CiliumClusterwideNetworkPolicy`.
fn policy(i: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            "CiliumNetworkPolicy\nmetadata: {name: p}",
            "CiliumNetworkPolicy\nmetadata: {name: p}",
            "CiliumNetworkPolicy\nmetadata: {name: p, namespace: other}",
            "CiliumClusterwideNetworkPolicy\nmetadata: {name: p}",
        ]),
        prop::sample::select(vec!["{matchLabels: {app: a}}", "{}", "{matchLabels: {app: b}}"]),
        section("ingress"),
        section("ingressDeny"),
        section("egress"),
        section("egressDeny"),
    )
        .prop_map(move |(kind, sel, i1, i2, e1, e2)| {
            let kind = kind.replace("name: p", &format!("name: p{i}"));
            format!(
                "apiVersion: cilium.io/v2\nkind: {kind}\nspec:\n  endpointSelector: {sel}\n{i1}{i2}{e1}{e2}"
            )
        })
}

fn policies() -> impl Strategy<Value = String> {
    (1usize..4)
        .prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
        .prop_map(|docs| docs.join("---\n"))
}

/// Workload identities as the server allocates them: labels in a namespace. 256-258 are
/// app=a, b, c in `default`; 259 and 260 app=a and b in `other` (the same labels, other
/// identities).
fn identities() -> BTreeMap<IdentityId, Labels> {
    [
        ("a", "default"),
        ("b", "default"),
        ("c", "default"),
        ("a", "other"),
        ("b", "other"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (app, ns))| (IdentityId::new(256 + i as u32), labels(app, ns)))
    .collect()
}

fn labels(app: &str, namespace: &str) -> Labels {
    format!("app={app}")
        .parse::<Labels>()
        .unwrap()
        .with_namespace(namespace)
        .unwrap()
}

/// The endpoints whose entries are checked.
const ENDPOINTS: [(&str, &str); 3] = [("a", "default"), ("b", "default"), ("a", "other")];

/// A query: direction, remote identity, protocol, port (for ICMP, the ICMP type).
type Query = (Direction, IdentityId, Protocol, u16);

fn queries() -> impl Strategy<Value = Vec<Query>> {
    let q = (
        prop::sample::select(vec![Direction::Ingress, Direction::Egress]),
        prop::sample::select(vec![256u32, 257, 258, 259, 260, 1, 2, 6, 999])
            .prop_map(IdentityId::new),
        prop::sample::select(vec![
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::Icmp,
        ]),
        prop_oneof![
            prop::sample::select(vec![
                0u16, 1, 21, 22, 23, 53, 79, 80, 81, 90, 91, 443, 1023, 1024, 8080, 9000, 65535
            ]),
            any::<u16>(),
        ],
        prop_oneof![prop::sample::select(vec![0u8, 3, 8, 13, 255]), any::<u8>()],
    )
        .prop_map(|(d, r, p, port, icmp_type)| {
            // An ICMP packet's "port" is its type, 0 to 255.
            let port = if p == Protocol::Icmp {
                u16::from(icmp_type)
            } else {
                port
            };
            (d, r, p, port)
        });
    prop::collection::vec(q, 64)
}

/// A kernel model: from compiled entries, what the datapath answers for each query.
type Model = fn(&[PolicyEntry]) -> Box<dyn Fn(Query) -> Decision>;

fn current_layout(entries: &[PolicyEntry]) -> Box<dyn Fn(Query) -> Decision> {
    let keys = policy_keys(entries);
    Box::new(move |(d, r, p, port)| kernel_lookup(&keys, d, r, p.number(), port))
}

fn old_model(entries: &[PolicyEntry]) -> Box<dyn Fn(Query) -> Decision> {
    let entries = entries.to_vec();
    Box::new(move |q| old_layout(&entries, q))
}

/// The layout of ABI v2: each entry written as its own prefixes (same key: deny wins, else the
/// strongest auth), looked up with four longest-prefix lookups of which any deny wins and the
/// strongest allow's auth applies.
fn old_layout(entries: &[PolicyEntry], (d, r, p, port): Query) -> Decision {
    type Key = (Direction, u32, u8, u16, u8);
    let mut keys: HashMap<Key, Decision> = HashMap::new();
    for e in entries {
        let proto = e.protocol.map_or(0, Protocol::number);
        let ranges = if e.protocol == Some(Protocol::Icmp) {
            vec![(0, 0)]
        } else {
            port_prefixes(e.ports)
        };
        for (start, bits) in ranges {
            let value = Decision {
                verdict: e.verdict,
                auth: e.auth,
            };
            keys.entry((
                e.direction,
                e.remote.map_or(0, IdentityId::get),
                proto,
                start,
                bits,
            ))
            .and_modify(|v| {
                if v.verdict == Verdict::Deny || e.verdict == Verdict::Deny {
                    *v = Decision::DENY;
                } else {
                    v.auth = v.auth.max(e.auth);
                }
            })
            .or_insert(value);
        }
    }
    let port = if p == Protocol::Icmp { 0 } else { port };
    let mut out: Option<Decision> = None;
    for (remote, proto) in [(r.get(), p.number()), (0, p.number()), (r.get(), 0), (0, 0)] {
        let hit = (0..=16u8).rev().find_map(|bits| {
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            keys.get(&(d, remote, proto, port & mask, bits))
        });
        match hit {
            Some(v) if v.verdict == Verdict::Deny => return Decision::DENY,
            Some(v) => {
                out = Some(match out {
                    Some(o) => Decision {
                        verdict: Verdict::Allow,
                        auth: o.auth.max(v.auth),
                    },
                    None => *v,
                })
            }
            None => {}
        }
    }
    out.unwrap_or(Decision::DENY)
}

fn agrees(model: Model, yaml: &str, queries: &[Query]) -> Result<(), TestCaseError> {
    let policies = parse_policies(yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
    let ids = identities();
    for (app, ns) in ENDPOINTS {
        let endpoint = format!("{app}/{ns}");
        let entries = compile_endpoint(&policies, &ids, &labels(app, ns));
        let kernel = model(&entries);
        for q in queries {
            let (d, r, p, port) = *q;
            let (verdict, auth) = lookup(&entries, d, r, p, port);
            let want = match verdict {
                Verdict::Deny => Decision::DENY,
                Verdict::Allow => Decision { verdict, auth },
            };
            let got = kernel(*q);
            prop_assert_eq!(
                got,
                want,
                "endpoint {} query {:?}\npolicies:\n{}\nentries: {:?}",
                endpoint,
                q,
                yaml,
                entries
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn the_kernel_answers_what_lookup_answers(yaml in policies(), qs in queries()) {
        agrees(current_layout, &yaml, &qs)?;
    }
}

#[test]
fn the_old_key_layout_is_caught() {
    let mut runner = TestRunner::new(Config {
        cases: 2048,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(policies(), queries()), |(yaml, qs)| {
        agrees(old_model, &yaml, &qs)
    });
    match result {
        Err(TestError::Fail(reason, (yaml, _))) => {
            // Shown in the test's output with --nocapture: the minimal counterexample.
            println!("old layout counterexample:\n{reason}\n{yaml}");
        }
        other => panic!("the property should reject the old layout, got {other:?}"),
    }
}

#[test]
fn broad_deny_beside_narrow_allow_is_denied_by_the_kernel_model() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - {fromEndpoints: [{matchLabels: {app: b}}], toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]}\n  ingressDeny:\n  - {fromEndpoints: [{matchLabels: {app: b}}], toPorts: [{ports: [{port: \"1\", endPort: 1023, protocol: TCP}]}]}\n";
    let q = (Direction::Ingress, IdentityId::new(257), Protocol::Tcp, 80);
    let entries = compile_endpoint(
        &parse_policies(yaml).unwrap(),
        &identities(),
        &labels("a", "default"),
    );
    assert_eq!(current_layout(&entries)(q), Decision::DENY);
    assert_eq!(
        old_layout(&entries, q).verdict,
        Verdict::Allow,
        "the old layout let the narrow allow shadow the deny"
    );
    assert_eq!(
        lookup(&entries, q.0, q.1, q.2, q.3),
        (Verdict::Deny, AuthType::None)
    );
}

/// The property is about policies that select something: the generator's policies do select
/// the endpoints and name their peers through namespaced identities (were the identities
/// without their namespace, no `CiliumNetworkPolicy` would select anything and every endpoint
/// would allow everything, which the kernel model trivially agrees with).
#[test]
fn the_generated_policies_select_endpoints_in_their_namespace() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p0}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  ingress:\n  - {fromEndpoints: [{matchLabels: {app: b}}]}\n";
    let policies = parse_policies(yaml).unwrap();
    let ids = identities();
    let here = compile_endpoint(&policies, &ids, &labels("a", "default"));
    let remotes: Vec<Option<IdentityId>> = here
        .iter()
        .filter(|e| e.direction == Direction::Ingress)
        .map(|e| e.remote)
        .collect();
    assert_eq!(remotes, [Some(IdentityId::new(257))], "b of default only");
    let elsewhere = compile_endpoint(&policies, &ids, &labels("a", "other"));
    assert!(
        elsewhere.iter().all(|e| e.remote.is_none()),
        "the policy of default does not select a of other: {elsewhere:?}"
    );
    // b of other, the same labels as 257, is denied where 257 is allowed.
    let keys = policy_keys(&here);
    for (remote, want) in [(257, Verdict::Allow), (260, Verdict::Deny)] {
        let got = kernel_lookup(&keys, Direction::Ingress, IdentityId::new(remote), 6, 80);
        assert_eq!(got.verdict, want, "from {remote}");
    }
}
