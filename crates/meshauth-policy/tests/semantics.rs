//! Table-driven tests of parsing and Cilium's semantics: the walkthrough, every construct, and
//! examples from Cilium's L3/L4 policy documentation with the verdicts the docs state.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;

use meshauth_policy::engine::Peer;
use meshauth_policy::{
    AuthType, Compiler, Direction, IdentityId, Labels, PolicyEntry, PolicyError, PortRange,
    Protocol, Verdict, compile_endpoint, evaluate, lookup, parse_policies, trace,
};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn l(s: &str) -> Labels {
    s.parse().unwrap()
}

/// (src labels, dst labels, port, protocol) → (allowed, auth)
fn check(yaml: &str, src: &str, dst: &str, port: u16, proto: Protocol) -> (bool, AuthType) {
    let p = parse_policies(yaml).unwrap();
    let t = trace(&p, &l(src), &l(dst), proto, port);
    (t.verdict == Verdict::Allow, t.auth)
}

#[test]
fn walkthrough_client1_allowed_client2_needs_auth_client3_denied() {
    let yaml = fixture("walkthrough.yaml");
    assert_eq!(
        check(
            &yaml,
            "app=client1",
            "app=demodeployment",
            80,
            Protocol::Tcp
        ),
        (true, AuthType::None)
    );
    assert_eq!(
        check(
            &yaml,
            "app=client2",
            "app=demodeployment",
            80,
            Protocol::Tcp
        ),
        (true, AuthType::Required)
    );
    assert_eq!(
        check(
            &yaml,
            "app=client3",
            "app=demodeployment",
            80,
            Protocol::Tcp
        ),
        (false, AuthType::None)
    );
    // Port 443 is not opened for anyone; client pods themselves are not selected at all.
    assert!(
        !check(
            &yaml,
            "app=client1",
            "app=demodeployment",
            443,
            Protocol::Tcp
        )
        .0
    );
    assert_eq!(
        check(&yaml, "app=client1", "app=client2", 80, Protocol::Tcp),
        (true, AuthType::None)
    );
    // Default deny: no rule decided; the selecting policies are named.
    let t = trace(
        &parse_policies(&yaml).unwrap(),
        &l("app=client3"),
        &l("app=demodeployment"),
        Protocol::Tcp,
        80,
    );
    assert!(t.ingress.selected && t.ingress.decided_by.is_empty());
    assert_eq!(
        t.ingress.selected_by,
        [
            "demo1-allow-client1",
            "demo1-allow-client2-auth",
            "demo1-default-deny"
        ]
    );
    assert!(!t.egress.selected && t.egress.selected_by.is_empty());
    // The default-deny policy alone denies everyone.
    let deny_only: String = yaml.split("---").next().unwrap().to_string();
    assert!(
        !check(
            &deny_only,
            "app=client1",
            "app=demodeployment",
            80,
            Protocol::Tcp
        )
        .0
    );
}

struct DocCase {
    file: &'static str,
    src: &'static str,
    dst: &'static str,
    port: u16,
    proto: Protocol,
    allowed: bool,
}

#[test]
fn cilium_documentation_examples() {
    let cases = [
        DocCase {
            file: "01-l3-label.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 8080,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "01-l3-label.yaml",
            src: "role=other",
            dst: "role=backend",
            port: 8080,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "02-ingress-allow-all.yaml",
            src: "app=anything",
            dst: "role=victim",
            port: 1,
            proto: Protocol::Udp,
            allowed: true,
        },
        DocCase {
            file: "03-egress-default-deny.yaml",
            src: "role=restricted",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "03-egress-default-deny.yaml",
            src: "role=free",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "04-egress-allow-all.yaml",
            src: "role=frontend",
            dst: "app=x",
            port: 9,
            proto: Protocol::Icmp,
            allowed: true,
        },
        DocCase {
            file: "07-entities-cluster.yaml",
            src: "app=any",
            dst: "role=internal",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "08-l4-port.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "08-l4-port.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 443,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "08-l4-port.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 80,
            proto: Protocol::Udp,
            allowed: false,
        },
        DocCase {
            file: "09-l3-l4.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "09-l3-l4.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 81,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "10-port-range.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 443,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "10-port-range.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 445,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "11-match-expressions.yaml",
            src: "role=frontend,env=staging",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "11-match-expressions.yaml",
            src: "role=frontend,env=production",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "11-match-expressions.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "12-ingress-deny.yaml",
            src: "app=x",
            dst: "app=y",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "13-clusterwide-deny.yaml",
            src: "app=x",
            dst: "app=y",
            port: 22,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "13-clusterwide-deny.yaml",
            src: "app=x",
            dst: "app=y",
            port: 23,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "14-protocol-any.yaml",
            src: "app=client",
            dst: "k8s-app=kube-dns",
            port: 53,
            proto: Protocol::Udp,
            allowed: true,
        },
        DocCase {
            file: "14-protocol-any.yaml",
            src: "app=client",
            dst: "k8s:k8s-app=kube-dns",
            port: 53,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "14-protocol-any.yaml",
            src: "app=client",
            dst: "k8s-app=kube-dns",
            port: 54,
            proto: Protocol::Udp,
            allowed: false,
        },
        DocCase {
            file: "19-match-expressions-or.yaml",
            src: "k8s.io.kubernetes.pod.namespace=production",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "19-match-expressions-or.yaml",
            src: "k8s:cilium.example.com/policy=strict",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "19-match-expressions-or.yaml",
            src: "app=other",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "20-match-expressions-and.yaml",
            src: "io.kubernetes.pod.namespace=production,cilium.example.com/policy=strict",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "20-match-expressions-and.yaml",
            src: "io.kubernetes.pod.namespace=production",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "20-match-expressions-and.yaml",
            src: "cilium.example.com/policy=strict",
            dst: "app=x",
            port: 80,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "21-l4-multi-rule.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 8080,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "21-l4-multi-rule.yaml",
            src: "app=anyone",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Tcp,
            allowed: true,
        },
        DocCase {
            file: "21-l4-multi-rule.yaml",
            src: "app=anyone",
            dst: "role=backend",
            port: 8080,
            proto: Protocol::Tcp,
            allowed: false,
        },
        DocCase {
            file: "21-l4-multi-rule.yaml",
            src: "app=anyone",
            dst: "role=backend",
            port: 80,
            proto: Protocol::Udp,
            allowed: false,
        },
        // ICMP has no port: a port rule, even for protocol ANY, does not cover it; an L3 rule does.
        DocCase {
            file: "14-protocol-any.yaml",
            src: "app=client",
            dst: "k8s-app=kube-dns",
            port: 0,
            proto: Protocol::Icmp,
            allowed: false,
        },
        // ICMP has no port: a port rule, even for protocol ANY, does not cover it; an L3 rule does.
        DocCase {
            file: "08-l4-port.yaml",
            src: "app=myService",
            dst: "app=x",
            port: 0,
            proto: Protocol::Icmp,
            allowed: false,
        },
        // ICMP has no port: a port rule, even for protocol ANY, does not cover it; an L3 rule does.
        DocCase {
            file: "01-l3-label.yaml",
            src: "role=frontend",
            dst: "role=backend",
            port: 0,
            proto: Protocol::Icmp,
            allowed: true,
        },
    ];
    for c in &cases {
        let got = check(
            &fixture(&format!("cilium-docs/{}", c.file)),
            c.src,
            c.dst,
            c.port,
            c.proto,
        )
        .0;
        assert_eq!(
            got, c.allowed,
            "{}: {} -> {}:{}/{:?}",
            c.file, c.src, c.dst, c.port, c.proto
        );
    }
    // Entities: the host, the world.
    let dev = l("env=dev");
    let host = parse_policies(&fixture("cilium-docs/05-entities-host.yaml")).unwrap();
    assert_eq!(
        evaluate(
            &host,
            &dev,
            Direction::Egress,
            Peer::Host,
            Protocol::Tcp,
            22
        )
        .verdict,
        Verdict::Allow
    );
    assert_eq!(
        evaluate(
            &host,
            &dev,
            Direction::Egress,
            Peer::World,
            Protocol::Tcp,
            22
        )
        .verdict,
        Verdict::Deny
    );
    let public = l("role=public");
    let world = parse_policies(&fixture("cilium-docs/06-entities-world.yaml")).unwrap();
    assert_eq!(
        evaluate(
            &world,
            &public,
            Direction::Ingress,
            Peer::World,
            Protocol::Tcp,
            80
        )
        .verdict,
        Verdict::Allow
    );
    assert_eq!(
        evaluate(
            &world,
            &public,
            Direction::Ingress,
            Peer::Endpoint(&l("app=x")),
            Protocol::Tcp,
            80
        )
        .verdict,
        Verdict::Deny
    );
    let cluster = parse_policies(&fixture("cilium-docs/07-entities-cluster.yaml")).unwrap();
    assert_eq!(
        evaluate(
            &cluster,
            &l("role=internal"),
            Direction::Ingress,
            Peer::World,
            Protocol::Tcp,
            80
        )
        .verdict,
        Verdict::Deny
    );
    let lockdown = parse_policies(&fixture("cilium-docs/12-ingress-deny.yaml")).unwrap();
    let v = evaluate(
        &lockdown,
        &l("app=y"),
        Direction::Ingress,
        Peer::World,
        Protocol::Tcp,
        80,
    );
    assert_eq!(v.verdict, Verdict::Deny, "deny wins over the allow-all");
    assert_eq!(v.decided_by[0].section, "ingressDeny");
}

#[test]
fn unsupported_documentation_examples_are_refused_with_the_field_named() {
    for (file, field) in [
        ("15-cidr.yaml", "toCIDR"),
        ("16-fqdn.yaml", "toFQDNs"),
        ("17-l7-http.yaml", "rules"),
        ("18-requires.yaml", "fromRequires"),
    ] {
        let err = parse_policies(&fixture(&format!("cilium-docs/{file}")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("`{field}` is not supported")),
            "{file}: {err}"
        );
        assert!(err.contains("document 1 ("), "{file}: {err}");
    }
}

#[test]
fn constructs_and_errors() {
    let doc = |spec: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: t\nspec:\n{spec}"
        )
    };
    let err = |spec: &str| parse_policies(&doc(spec)).unwrap_err().to_string();

    // Authentication with reserved entities is refused at validation.
    let e = err(
        "  endpointSelector: {}\n  ingress:\n  - fromEntities: [world]\n    authentication: {mode: required}\n",
    );
    assert!(e.contains("can never succeed"), "{e}");
    assert!(
        e.contains("spec.ingress[0]") && e.contains("`world`"),
        "{e}"
    );
    for (entity, why) in [
        ("host", "`host` has no SPIFFE identity"),
        ("cluster", "`cluster` includes the host"),
        ("all", "`all` includes world and host"),
    ] {
        let e = err(&format!(
            "  endpointSelector: {{}}\n  egress:\n  - toEntities: [{entity}]\n    authentication: {{mode: test-always-fail}}\n"
        ));
        assert!(
            e.contains("spec.egress[0]") && e.contains(why) && e.contains("never succeed"),
            "{entity}: {e}"
        );
    }
    // Without authentication, and with `disabled`, the same entities are fine.
    assert!(
        parse_policies(&doc(
            "  endpointSelector: {}\n  egress:\n  - toEntities: [cluster, host, world, all]\n    authentication: {mode: disabled}\n"
        ))
        .is_ok()
    );
    let e = err(
        "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"80\"}]}]\n    authentication: {mode: required}\n",
    );
    assert!(e.contains("must name its peers"), "{e}");
    let e = err(
        "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    authentication: {mode: sometimes}\n",
    );
    assert!(
        e.contains("authentication.mode") && e.contains("sometimes"),
        "{e}"
    );
    let e = err(
        "  endpointSelector: {}\n  ingressDeny:\n  - fromEndpoints: [{}]\n    authentication: {mode: required}\n",
    );
    assert!(e.contains("deny rules cannot carry authentication"), "{e}");
    let e = err(
        "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"80\", endPort: 70}]}]\n",
    );
    assert!(e.contains("endPort"), "{e}");
    let e = err("  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"http\"}]}]\n");
    assert!(e.contains("named ports"), "{e}");
    let e = err(
        "  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"80\", protocol: GRE}]}]\n",
    );
    assert!(e.contains("unknown protocol"), "{e}");
    let e =
        err("  endpointSelector: {matchExpressions: [{key: a, operator: Near}]}\n  egress: [{}]\n");
    assert!(e.contains("unknown matchExpressions operator"), "{e}");
    let e = err("  endpointSelector: {}\n  egress:\n  - toEntities: [kube-apiserver]\n");
    assert!(e.contains("spec.egress[0].toEntities[0]"), "{e}");
    let e = err("  egress: [{}]\n");
    assert!(e.contains("endpointSelector is required"), "{e}");
    let e = err(
        "  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n    icmps: [{fields: [{type: 8}]}]\n",
    );
    assert!(
        e.contains("spec.egress[0]") && e.contains("`icmps` is not supported"),
        "{e}"
    );

    // YAML errors name the line; the kind and version are checked.
    let e = parse_policies("apiVersion: cilium.io/v2\nkind: [unclosed\n").unwrap_err();
    assert!(matches!(e, PolicyError::Yaml { line: 2.., .. }), "{e}");
    assert!(parse_policies("apiVersion: v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}}\n").unwrap_err().to_string().contains("cilium.io/v2"));
    assert!(parse_policies("apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}}\n").unwrap_err().to_string().contains("kind"));
    // The second document's error names it.
    let two = format!(
        "{}---\n{}",
        doc("  endpointSelector: {}\n"),
        doc("  endpointSelector: {}\n  bogus: 1\n").replace("name: t", "name: second")
    );
    let e = parse_policies(&two).unwrap_err().to_string();
    assert!(
        e.starts_with("document 2 (second)") && e.contains("bogus"),
        "{e}"
    );
}

/// Auth inheritance as Cilium's `authPreferredInsert`: explicit beats inherited, the most
/// specific explicit mode covering an entry applies, equal keys take the strongest.
const INHERITANCE: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: broad}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    authentication: {mode: required}
  - toPorts: [{ports: [{port: "9000", endPort: 9100}]}]
    authentication: {mode: disabled}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: narrow}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "5433", protocol: TCP}]}]
    authentication: {mode: disabled}
  - fromEndpoints: [{matchLabels: {app: test}}]
    authentication: {mode: test-always-fail}
  - fromEndpoints: [{matchLabels: {app: test}}]
    authentication: {mode: required}
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "9050", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    authentication: {mode: required}
"#;

#[test]
fn auth_inheritance_and_strongest_requirement() {
    // (src, dst, port, protocol, expected auth); every case is allowed.
    let cases = [
        // Narrower rule without `authentication` inherits the broader L3 rule's `required`.
        ("app=api", "app=db", 5432, Protocol::Tcp, AuthType::Required),
        // Narrower rule with explicit `disabled` keeps it: explicit beats inherited.
        ("app=api", "app=db", 5433, Protocol::Tcp, AuthType::None),
        // Only the broad rule matches.
        ("app=api", "app=db", 7, Protocol::Udp, AuthType::Required),
        // Same key from two rules: the strongest applies.
        (
            "app=test",
            "app=db",
            1,
            Protocol::Udp,
            AuthType::TestAlwaysFail,
        ),
        // Port 9050 from api: the most specific explicit cover is the port-range rule's
        // `disabled` (narrower ports beat the L3-only `required`).
        ("app=api", "app=db", 9050, Protocol::Tcp, AuthType::None),
        // Port 9060 from api: the range rule (disabled) is more specific than L3-only.
        ("app=api", "app=db", 9060, Protocol::Tcp, AuthType::None),
        // Anyone else on the range: allowed, no authentication.
        ("app=other", "app=db", 9000, Protocol::Tcp, AuthType::None),
        // Same key, one rule unset and one required: required.
        ("app=api", "app=web", 80, Protocol::Tcp, AuthType::Required),
    ];
    let policies = parse_policies(INHERITANCE).unwrap();
    let identities = BTreeMap::from([
        (IdentityId::new(256), l("app=api")),
        (IdentityId::new(257), l("app=db")),
        (IdentityId::new(258), l("app=test")),
        (IdentityId::new(259), l("app=other")),
        (IdentityId::new(260), l("app=web")),
    ]);
    for (src, dst, port, proto, auth) in cases {
        assert_eq!(
            check(INHERITANCE, src, dst, port, proto),
            (true, auth),
            "trace {src} -> {dst} {port}/{proto:?}"
        );
        // The compiled entries, looked up as the datapath does, agree with the trace.
        let remote = identities
            .iter()
            .find(|(_, labels)| **labels == l(src))
            .map(|(id, _)| *id)
            .unwrap();
        let entries = compile_endpoint(&policies, &identities, &l(dst));
        assert_eq!(
            lookup(&entries, Direction::Ingress, remote, proto, port),
            (Verdict::Allow, auth),
            "lookup {src} -> {dst} {port}/{proto:?}: {entries:#?}"
        );
    }
}

/// Compiled entries looked up as the datapath does give the same verdict and auth as the
/// trace, for every pair of identities, over several ports and protocols.
#[test]
fn compiled_lookup_agrees_with_evaluation() {
    let mut yaml = fixture("walkthrough.yaml");
    for f in [
        "cilium-docs/01-l3-label.yaml",
        "cilium-docs/08-l4-port.yaml",
        "cilium-docs/10-port-range.yaml",
        "cilium-docs/11-match-expressions.yaml",
        "cilium-docs/12-ingress-deny.yaml",
        "cilium-docs/13-clusterwide-deny.yaml",
        "cilium-docs/14-protocol-any.yaml",
    ] {
        yaml.push_str("\n---\n");
        yaml.push_str(&fixture(f));
    }
    yaml.push_str("\n---\n");
    yaml.push_str(INHERITANCE);
    let policies = parse_policies(&yaml).unwrap();
    let labels = [
        "app=client1",
        "app=client2",
        "app=client3",
        "app=demodeployment",
        "role=frontend",
        "role=backend",
        "role=frontend,env=production",
        "app=myService",
        "app=api",
        "app=db",
        "app=test",
        "app=web",
        "k8s-app=kube-dns",
        "app=y",
    ];
    let identities: BTreeMap<IdentityId, Labels> = labels
        .iter()
        .enumerate()
        .map(|(i, s)| (IdentityId::new(256 + i as u32), l(s)))
        .collect();
    let mut checked = 0;
    for (dst_id, dst) in &identities {
        let entries = compile_endpoint(&policies, &identities, dst);
        for (src_id, src) in &identities {
            for (proto, port) in [
                (Protocol::Tcp, 80),
                (Protocol::Tcp, 443),
                (Protocol::Tcp, 5432),
                (Protocol::Tcp, 9050),
                (Protocol::Udp, 53),
                (Protocol::Tcp, 22),
                (Protocol::Icmp, 0),
            ] {
                let want = evaluate(
                    &policies,
                    dst,
                    Direction::Ingress,
                    Peer::Endpoint(src),
                    proto,
                    port,
                );
                assert_eq!(
                    lookup(&entries, Direction::Ingress, *src_id, proto, port),
                    (want.verdict, want.auth),
                    "{src} -> {dst} {port}/{proto:?}"
                );
                let src_entries = compile_endpoint(&policies, &identities, src);
                let want = evaluate(
                    &policies,
                    src,
                    Direction::Egress,
                    Peer::Endpoint(dst),
                    proto,
                    port,
                );
                assert_eq!(
                    lookup(&src_entries, Direction::Egress, *dst_id, proto, port),
                    (want.verdict, want.auth),
                    "egress {src} -> {dst} {port}/{proto:?}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, labels.len() * labels.len() * 7);
}

fn entry(
    direction: Direction,
    remote: Option<u32>,
    protocol: Option<Protocol>,
    ports: PortRange,
    verdict: Verdict,
    auth: AuthType,
) -> PolicyEntry {
    PolicyEntry {
        direction,
        remote: remote.map(IdentityId::new),
        protocol,
        ports,
        verdict,
        auth,
    }
}

#[test]
fn compiled_entries_are_deterministic_and_complete() {
    let policies = parse_policies(&fixture("walkthrough.yaml")).unwrap();
    let identities = BTreeMap::from([
        (IdentityId::new(256), l("app=client1")),
        (IdentityId::new(257), l("app=client2")),
        (IdentityId::new(258), l("app=client3")),
        (IdentityId::new(259), l("app=demodeployment")),
    ]);
    let entries = compile_endpoint(&policies, &identities, &l("app=demodeployment"));
    let tcp80 = (Some(Protocol::Tcp), PortRange::single(80));
    assert_eq!(
        entries,
        vec![
            entry(
                Direction::Egress,
                None,
                None,
                PortRange::ANY,
                Verdict::Allow,
                AuthType::None
            ),
            entry(
                Direction::Ingress,
                Some(256),
                tcp80.0,
                tcp80.1,
                Verdict::Allow,
                AuthType::None
            ),
            entry(
                Direction::Ingress,
                Some(257),
                tcp80.0,
                tcp80.1,
                Verdict::Allow,
                AuthType::Required
            ),
        ]
    );
    // Unselected endpoints allow everything both ways.
    let client = compile_endpoint(&policies, &identities, &l("app=client1"));
    assert_eq!(client.len(), 2);
    assert!(
        client
            .iter()
            .all(|e| e.remote.is_none() && e.verdict == Verdict::Allow)
    );

    // Deny entries and entities.
    let lockdown = parse_policies(&fixture("cilium-docs/12-ingress-deny.yaml")).unwrap();
    let e = compile_endpoint(&lockdown, &identities, &l("app=y"));
    assert!(e.contains(&entry(
        Direction::Ingress,
        Some(2),
        None,
        PortRange::ANY,
        Verdict::Deny,
        AuthType::None
    )));
    assert!(e.contains(&entry(
        Direction::Ingress,
        None,
        None,
        PortRange::ANY,
        Verdict::Allow,
        AuthType::None
    )));
}

#[test]
fn compiler_recomputes_only_what_changed() {
    let mut c = Compiler::new();
    for (i, (name, labels)) in [
        ("demo-1", "app=demodeployment"),
        ("client1-1", "app=client1"),
        ("other", "app=other"),
    ]
    .iter()
    .enumerate()
    {
        c.set_identity(IdentityId::new(256 + i as u32), l(labels));
        c.set_endpoint(name, l(labels));
    }
    let before = c.recompilations();
    for p in parse_policies(&fixture("walkthrough.yaml")).unwrap() {
        let changed = c.set_policy(p);
        assert!(changed.iter().all(|n| n == "demo-1"), "{changed:?}");
    }
    assert_eq!(
        c.recompilations() - before,
        3,
        "only the selected endpoint, once per policy"
    );
    assert_eq!(
        c.entries("demo-1")
            .unwrap()
            .iter()
            .filter(|e| e.direction == Direction::Ingress)
            .count(),
        1
    );

    // A new client2 identity affects the demo endpoint only.
    let before = c.recompilations();
    let changed = c.set_identity(IdentityId::new(300), l("app=client2"));
    assert_eq!(changed, vec!["demo-1".to_string()]);
    assert_eq!(c.recompilations() - before, 1);
    assert!(
        c.entries("demo-1")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(IdentityId::new(300)) && e.auth == AuthType::Required)
    );
    // An identity nobody's rules mention recompiles nothing.
    let before = c.recompilations();
    assert!(
        c.set_identity(IdentityId::new(301), l("app=unrelated"))
            .is_empty()
    );
    assert_eq!(c.recompilations(), before);
    // Re-sending what the compiler already holds (an agent's periodic sync) recompiles nothing.
    let before = c.recompilations();
    assert!(
        c.set_identity(IdentityId::new(300), l("app=client2"))
            .is_empty()
    );
    for p in parse_policies(&fixture("walkthrough.yaml")).unwrap() {
        assert!(c.set_policy(p).is_empty());
    }
    assert!(c.set_endpoint("demo-1", l("app=demodeployment")).is_empty());
    assert_eq!(c.recompilations(), before);
    // Removing an identity removes its entries, recompiling only the endpoint that had them.
    let changed = c.remove_identity(IdentityId::new(300));
    assert_eq!(changed, vec!["demo-1".to_string()]);
    assert_eq!(c.recompilations(), before + 1);
    assert!(
        !c.entries("demo-1")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(IdentityId::new(300)))
    );
    assert!(c.remove_identity(IdentityId::new(300)).is_empty());
    c.set_identity(IdentityId::new(300), l("app=client2"));
    // Removing the auth policy removes the entry.
    c.remove_policy("demo1-allow-client2-auth");
    assert!(
        !c.entries("demo-1")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(IdentityId::new(300)))
    );
}
