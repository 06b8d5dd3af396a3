//! Table-driven tests of parsing and Cilium's semantics: the walkthrough, every construct, and
//! examples from Cilium's policy documentation (L3/L4, namespaces, CIDR, entities, ICMP) with the
//! verdicts the docs state.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use meshauth_policy::engine::Peer;
use meshauth_policy::{
    AuthType, Cidr, CidrIdentities, Compiler, Direction, IdentityId, Labels, PeerSpec, Policy,
    PolicyEntry, PolicyError, PolicyKey, PortRange, Protocol, Verdict, cidr_prefixes,
    compile_endpoint, compile_endpoint_with, evaluate, lookup, parse_policies, parse_policies_in,
    peer_of_identity, trace, trace_peers,
};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// A pod's labels: in namespace `default` unless they name their namespace.
fn l(s: &str) -> Labels {
    let labels: Labels = s.parse().unwrap();
    if labels.namespace().is_some() {
        labels
    } else {
        labels.with_namespace("default").unwrap()
    }
}

/// Labels as written, without a namespace.
fn raw(s: &str) -> Labels {
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
            "default/demo1-allow-client1",
            "default/demo1-allow-client2-auth",
            "default/demo1-default-deny"
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
        "  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n    icmps: [{fields: [{type: 8}]}]\n    toPorts: [{ports: [{port: \"80\"}]}]\n",
    );
    assert!(
        e.contains("spec.egress[0]") && e.contains("icmps and toPorts cannot be in the same rule"),
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

// === namespaces, CIDR, entities, ICMP ===

/// Labels of a pod in namespace `ns`.
fn ns(ns: &str, s: &str) -> Labels {
    raw(s).with_namespace(ns).unwrap()
}

fn docs(file: &str) -> Vec<Policy> {
    parse_policies(&fixture(&format!("cilium-docs/{file}"))).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn allowed(policies: &[Policy], src: Peer<'_>, dst: Peer<'_>, proto: Protocol, port: u16) -> bool {
    trace_peers(policies, src, dst, proto, port).verdict == Verdict::Allow
}

#[test]
fn namespace_isolation_from_the_kubernetes_docs() {
    let p = docs("22-isolate-namespaces.yaml");
    // Two policies of the same name, one per namespace: two keys.
    let keys: Vec<String> = p.iter().map(|p| p.key().to_string()).collect();
    assert_eq!(keys, ["ns1/isolate-ns1", "ns2/isolate-ns1"]);
    let (a1, b1, a2, a3) = (
        ns("ns1", "app=a"),
        ns("ns1", "app=b"),
        ns("ns2", "app=a"),
        ns("ns3", "app=a"),
    );
    // The docs: ingress of ns1 and ns2 pods only from their own namespace; egress anywhere
    // unless the destination is in ns1 or ns2.
    for (src, dst, want) in [
        (&a1, &b1, true),
        (&b1, &a1, true),
        (&a2, &a1, false),
        (&a1, &a2, false),
        (&a3, &a1, false),
        (&a3, &a2, false),
        (&a1, &a3, true),
        (&a2, &a3, true),
        (&a3, &a3, true),
    ] {
        let t = trace(&p, src, dst, Protocol::Tcp, 80);
        assert_eq!(t.verdict == Verdict::Allow, want, "{src} -> {dst}: {t:?}");
    }
    // The deciding policy and the default deny are named by key.
    let t = trace(&p, &b1, &a1, Protocol::Tcp, 80);
    assert_eq!(t.ingress.decided_by[0].policy, "ns1/isolate-ns1");
    let t = trace(&p, &a1, &a2, Protocol::Tcp, 80);
    assert_eq!(t.ingress.selected_by, ["ns2/isolate-ns1"]);
    assert!(t.ingress.decided_by.is_empty());
    // Labels without a namespace are no pod of ns1.
    assert!(
        !trace(&p, &raw("app=a"), &a1, Protocol::Tcp, 80)
            .verdict
            .eq(&Verdict::Allow)
    );

    // The compiler keys them apart: neither overwrites the other.
    let mut c = Compiler::new();
    for (i, labels) in [&a1, &b1, &a2, &a3].into_iter().enumerate() {
        c.set_identity(IdentityId::new(256 + i as u32), labels.clone());
    }
    c.set_endpoint("a1", a1.clone());
    c.set_endpoint("a2", a2.clone());
    for policy in p.clone() {
        c.set_policy(policy);
    }
    assert_eq!(c.policies().count(), 2);
    let ingress_from = |c: &Compiler, ep: &str| -> BTreeSet<Option<u32>> {
        c.entries(ep)
            .unwrap()
            .iter()
            .filter(|e| e.direction == Direction::Ingress)
            .map(|e| e.remote.map(IdentityId::get))
            .collect()
    };
    assert_eq!(
        ingress_from(&c, "a1"),
        BTreeSet::from([Some(256), Some(257)])
    );
    assert_eq!(ingress_from(&c, "a2"), BTreeSet::from([Some(258)]));
    // Removing one by key leaves the other.
    assert_eq!(
        c.remove_policy_key(&PolicyKey::namespaced("ns1", "isolate-ns1")),
        ["a1"]
    );
    assert_eq!(ingress_from(&c, "a1"), BTreeSet::from([None]));
    assert_eq!(ingress_from(&c, "a2"), BTreeSet::from([Some(258)]));
    // The bare name (callers from before namespaces) removes every policy of that name.
    for policy in p {
        c.set_policy(policy);
    }
    let mut changed = c.remove_policy("isolate-ns1");
    changed.sort();
    assert_eq!(changed, ["a1", "a2"]);
    assert_eq!(c.policies().count(), 0);
    // `ns/name` removes only that one.
    c.set_policy(docs("22-isolate-namespaces.yaml").remove(1));
    assert!(c.remove_policy("ns1/isolate-ns1").is_empty());
    assert_eq!(c.remove_policy("ns2/isolate-ns1"), ["a2"]);
}

#[test]
fn pods_exposed_across_namespaces() {
    let p = docs("23-namespace-policy.yaml");
    let leia1 = ns("ns1", "name=leia");
    for (src, dst, want) in [
        // The docs: leia of ns1 accepts luke of ns2 ...
        (ns("ns2", "name=luke"), leia1.clone(), true),
        // ... and no one else: the selector names ns2, so luke of ns1 does not match.
        (ns("ns1", "name=luke"), leia1.clone(), false),
        (ns("ns2", "name=han"), leia1.clone(), false),
        // leia of ns2 is not selected by a policy of ns1.
        (ns("ns2", "name=han"), ns("ns2", "name=leia"), true),
    ] {
        assert_eq!(
            trace(&p, &src, &dst, Protocol::Tcp, 80).verdict == Verdict::Allow,
            want,
            "{src} -> {dst}"
        );
    }
}

#[test]
fn egress_to_kube_dns_in_the_policy_namespace() {
    let text = fixture("cilium-docs/24-kubedns-policy.yaml");
    // Created in `public`, as the docs do.
    let p = parse_policies_in(&text, "public").unwrap();
    assert_eq!(p[0].key().to_string(), "public/allow-to-kubedns");
    assert_eq!(
        parse_policies(&text).unwrap()[0].key(),
        PolicyKey::namespaced("default", "allow-to-kubedns")
    );
    let dns = ns("kube-system", "k8s-app=kube-dns");
    let web = ns("public", "app=web");
    for (src, dst, proto, port, want) in [
        (&web, &dns, Protocol::Udp, 53, true),
        (&web, &dns, Protocol::Udp, 54, false),
        (&web, &dns, Protocol::Tcp, 53, false),
        // The selector names kube-system: a kube-dns label elsewhere does not match.
        (
            &web,
            &ns("public", "k8s-app=kube-dns"),
            Protocol::Udp,
            53,
            false,
        ),
        // Pods of other namespaces are not selected.
        (
            &ns("default", "app=web"),
            &ns("default", "app=db"),
            Protocol::Tcp,
            5432,
            true,
        ),
    ] {
        assert_eq!(
            trace(&p, src, dst, proto, port).verdict == Verdict::Allow,
            want,
            "{src} -> {dst} {port}/{proto:?}"
        );
    }
    // The default namespace given must be a namespace.
    let e = parse_policies_in(&text, "Public").unwrap_err().to_string();
    assert!(
        e.contains("metadata.namespace") && e.contains("default namespace"),
        "{e}"
    );
}

#[test]
fn clusterwide_policies_apply_across_namespaces() {
    let p = docs("25-clusterwide-policy.yaml");
    assert_eq!(
        p[0].key(),
        PolicyKey::clusterwide("clusterwide-policy-example")
    );
    assert_eq!(p[0].namespace, None);
    for (src, dst, want) in [
        // The docs: luke of any namespace reaches leia of any namespace.
        (ns("ns2", "name=luke"), ns("ns1", "name=leia"), true),
        (ns("ns3", "name=luke"), ns("ns5", "name=leia"), true),
        (ns("ns1", "name=han"), ns("ns1", "name=leia"), false),
        // A clusterwide peer selector selects pods only: labels with no namespace do not match.
        (raw("name=luke"), ns("ns1", "name=leia"), false),
    ] {
        assert_eq!(
            trace(&p, &src, &dst, Protocol::Tcp, 80).verdict == Verdict::Allow,
            want,
            "{src} -> {dst}"
        );
    }
    let t = trace(
        &p,
        &ns("ns3", "name=han"),
        &ns("ns5", "name=leia"),
        Protocol::Tcp,
        80,
    );
    assert_eq!(t.ingress.selected_by, ["clusterwide-policy-example"]);

    // `fromEndpoints: [{}]` of a clusterwide policy: every pod, never the host or the world.
    let p = docs("26-wildcard-from-endpoints.yaml");
    let dns = ns("kube-system", "k8s-app=kube-dns");
    for (src, proto, port, want) in [
        (Peer::Endpoint(&ns("ns7", "app=x")), Protocol::Udp, 53, true),
        (
            Peer::Endpoint(&ns("kube-system", "app=x")),
            Protocol::Udp,
            53,
            true,
        ),
        (
            Peer::Endpoint(&ns("ns7", "app=x")),
            Protocol::Udp,
            54,
            false,
        ),
        (Peer::Endpoint(&raw("app=x")), Protocol::Udp, 53, false),
        (Peer::Host, Protocol::Udp, 53, false),
        (Peer::World, Protocol::Udp, 53, false),
    ] {
        assert_eq!(
            allowed(&p, src, Peer::Endpoint(&dns), proto, port),
            want,
            "{src:?} {port}/{proto:?}"
        );
    }
    // kube-dns of another namespace is not selected.
    assert!(allowed(
        &p,
        Peer::World,
        Peer::Endpoint(&ns("default", "k8s-app=kube-dns")),
        Protocol::Tcp,
        1
    ));
}

#[test]
fn namespace_errors() {
    let doc = |kind: &str, meta: &str, spec: &str| {
        format!("apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{{meta}}}\nspec:\n{spec}")
    };
    let cnp = "CiliumNetworkPolicy";
    let ccnp = "CiliumClusterwideNetworkPolicy";
    let spec = "  endpointSelector: {}\n  ingress: [{}]\n";
    let err = |k: &str, m: &str, s: &str| parse_policies(&doc(k, m, s)).unwrap_err().to_string();
    let e = err(cnp, "name: x, namespace: Bad_NS", spec);
    assert!(
        e.contains("metadata.namespace") && e.contains("invalid namespace \"Bad_NS\""),
        "{e}"
    );
    let e = err(ccnp, "name: x, namespace: ns1", spec);
    assert!(
        e.contains("metadata.namespace") && e.contains("has no namespace"),
        "{e}"
    );
    let e = err(cnp, "name: a/b", spec);
    assert!(e.contains("metadata.name") && e.contains("'/'"), "{e}");
    // A namespaced policy's endpointSelector cannot reach into another namespace ...
    let other = "  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: ns2}}\n  ingress: [{}]\n";
    let e = err(cnp, "name: x, namespace: ns1", other);
    assert!(
        e.contains("spec.endpointSelector") && e.contains("applies in its own namespace \"ns1\""),
        "{e}"
    );
    // ... it may name its own; a clusterwide policy may name any.
    assert!(parse_policies(&doc(cnp, "name: x, namespace: ns2", other)).is_ok());
    let p = parse_policies(&doc(ccnp, "name: x", other)).unwrap();
    let sel = &p[0].rules[0].endpoint_selector;
    assert!(sel.matches(&ns("ns2", "app=a")) && !sel.matches(&ns("ns1", "app=a")));
}

#[test]
fn cidr_rules_with_except_from_the_docs() {
    let p = docs("15-cidr.yaml");
    let svc = l("app=myService");
    // Every cidr and except needs an ipcache entry of its own.
    let want: BTreeSet<Cidr> = ["10.0.0.0/8", "10.96.0.0/12", "20.1.1.1/32"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(cidr_prefixes(&p), want);
    let cidrs = CidrIdentities::for_policies(&p);
    let entries = compile_endpoint_with(&p, &BTreeMap::new(), &cidrs, &svc);
    assert_eq!(entries, compile_endpoint(&p, &BTreeMap::new(), &svc));
    // The docs: 20.1.1.1 and 10.0.0.0/8 are allowed, 10.96.0.0/12 is not; nothing else is.
    for (addr, want) in [
        ("20.1.1.1", true),
        ("20.1.1.2", false),
        ("10.0.0.0", true),
        ("10.1.2.3", true),
        ("10.95.255.255", true),
        ("10.96.0.1", false),
        ("10.111.255.255", false),
        ("10.112.0.0", true),
        ("10.255.255.255", true),
        ("11.0.0.1", false),
        ("192.168.1.1", false),
    ] {
        let t = trace_peers(
            &p,
            Peer::Endpoint(&svc),
            Peer::Address(ip(addr)),
            Protocol::Tcp,
            443,
        );
        assert_eq!(t.verdict == Verdict::Allow, want, "{addr}: {t:?}");
        // The datapath: the ipcache's identity for the address, then the compiled entries.
        let remote = cidrs.identity_of(ip(addr));
        assert_eq!(
            lookup(&entries, Direction::Egress, remote, Protocol::Tcp, 443).0 == Verdict::Allow,
            want,
            "{addr} as {remote}"
        );
    }
    // The rule that decided, by policy key.
    let t = trace_peers(
        &p,
        Peer::Endpoint(&svc),
        Peer::Address(ip("10.1.2.3")),
        Protocol::Udp,
        53,
    );
    assert_eq!(
        (
            t.egress.decided_by[0].policy.as_str(),
            t.egress.decided_by[0].section,
            t.egress.decided_by[0].index
        ),
        ("default/cidr-rule", "egress", 1)
    );
    // The rest of the world (the /0 entry) and the prefix identities, as peers.
    assert!(!allowed(
        &p,
        Peer::Endpoint(&svc),
        Peer::World,
        Protocol::Tcp,
        1
    ));
    let prefix = |s: &str| Peer::Cidr(s.parse().unwrap());
    assert!(allowed(
        &p,
        Peer::Endpoint(&svc),
        prefix("10.0.0.0/8"),
        Protocol::Tcp,
        1
    ));
    assert!(!allowed(
        &p,
        Peer::Endpoint(&svc),
        prefix("10.96.0.0/12"),
        Protocol::Tcp,
        1
    ));
    assert!(allowed(
        &p,
        Peer::Endpoint(&svc),
        prefix("20.1.1.1/32"),
        Protocol::Tcp,
        1
    ));
    // The ipcache: 0.0.0.0/0 and ::/0 are the world identity; every prefix a local identity.
    let ipcache = cidrs.ipcache_entries();
    assert_eq!(ipcache[0], (Cidr::ALL_V4, IdentityId::WORLD));
    assert_eq!(ipcache[1], (Cidr::ALL_V6, IdentityId::WORLD));
    assert!(ipcache[2..].iter().all(|(_, id)| id.is_local()));
    assert_eq!(ipcache.len(), 5);
    // Pods are not CIDR peers: a pod (whatever its address) is matched by selectors only.
    assert!(!allowed(
        &p,
        Peer::Endpoint(&svc),
        Peer::Endpoint(&l("app=x")),
        Protocol::Tcp,
        1
    ));
}

#[test]
fn cidr_dependent_layer4_rule() {
    let p = docs("27-cidr-l4.yaml");
    let crawler = l("role=crawler");
    for (addr, proto, port, want) in [
        ("192.0.2.10", Protocol::Tcp, 80, true),
        ("192.0.2.255", Protocol::Tcp, 80, true),
        ("192.0.2.10", Protocol::Tcp, 443, false),
        ("192.0.2.10", Protocol::Udp, 80, false),
        ("198.51.100.1", Protocol::Tcp, 80, false),
    ] {
        assert_eq!(
            allowed(
                &p,
                Peer::Endpoint(&crawler),
                Peer::Address(ip(addr)),
                proto,
                port
            ),
            want,
            "{addr} {port}/{proto:?}"
        );
    }
    // Endpoints without role=crawler are not restricted by it.
    assert!(allowed(
        &p,
        Peer::Endpoint(&l("role=other")),
        Peer::Address(ip("192.0.2.10")),
        Protocol::Tcp,
        443
    ));
}

#[test]
fn cidr_parsing_and_matching_edges() {
    let doc = |egress: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: c}}\nspec:\n  endpointSelector: {{}}\n  egress:\n{egress}"
        )
    };
    let parse = |egress: &str| parse_policies(&doc(egress)).unwrap();
    let err = |egress: &str| parse_policies(&doc(egress)).unwrap_err().to_string();
    let ep = l("app=a");
    let to = |p: &[Policy], addr: &str| {
        allowed(
            p,
            Peer::Endpoint(&ep),
            Peer::Address(ip(addr)),
            Protocol::Tcp,
            80,
        )
    };

    // Host bits set: cleared, as Cilium does.
    let p = parse("  - toCIDR: [10.1.2.3/8]\n");
    assert_eq!(
        cidr_prefixes(&p).into_iter().collect::<Vec<_>>(),
        ["10.0.0.0/8".parse::<Cidr>().unwrap()]
    );
    assert!(to(&p, "10.200.0.1") && !to(&p, "11.0.0.1"));
    // /32 and a bare address are one address.
    for one in ["20.1.1.1/32", "20.1.1.1"] {
        let p = parse(&format!("  - toCIDR: [{one}]\n"));
        assert!(
            to(&p, "20.1.1.1") && !to(&p, "20.1.1.0") && !to(&p, "20.1.1.2"),
            "{one}"
        );
    }
    // /0: the world (everything outside the cluster, prefix identities included), no prefix of
    // its own.
    let p = parse("  - toCIDR: [0.0.0.0/0]\n  - toCIDR: [10.0.0.0/8]\n");
    assert_eq!(cidr_prefixes(&p).len(), 1);
    assert!(to(&p, "8.8.8.8") && to(&p, "10.0.0.1"));
    assert!(allowed(
        &p,
        Peer::Endpoint(&ep),
        Peer::World,
        Protocol::Tcp,
        80
    ));
    let cidrs = CidrIdentities::for_policies(&p);
    let entries = compile_endpoint(&p, &BTreeMap::new(), &ep);
    for addr in ["8.8.8.8", "10.0.0.1"] {
        let remote = cidrs.identity_of(ip(addr));
        assert_eq!(
            lookup(&entries, Direction::Egress, remote, Protocol::Tcp, 80).0,
            Verdict::Allow
        );
    }
    // /0 with an except: the world minus the except.
    let p = parse("  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]\n");
    assert!(to(&p, "8.8.8.8") && !to(&p, "10.0.0.1"));
    assert!(allowed(
        &p,
        Peer::Endpoint(&ep),
        Peer::World,
        Protocol::Tcp,
        80
    ));
    // An except equal to the cidr leaves nothing.
    let p = parse("  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]\n");
    assert!(!to(&p, "10.0.0.1") && !to(&p, "10.255.255.255"));
    let p = parse("  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [0.0.0.0/0]}]\n");
    assert!(!to(&p, "8.8.8.8"));
    assert!(!allowed(
        &p,
        Peer::Endpoint(&ep),
        Peer::World,
        Protocol::Tcp,
        80
    ));
    // Nested excepts, and another rule allowing inside an except (rules add up).
    let p = parse(
        "  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.1.2.0/24]}]\n  - toCIDR: [10.1.2.3/32]\n",
    );
    for (addr, want) in [
        ("10.0.0.1", true),
        ("10.1.0.1", false),
        ("10.1.2.4", false),
        ("10.1.2.3", true),
        ("10.2.0.1", true),
    ] {
        assert_eq!(to(&p, addr), want, "{addr}");
        let cidrs = CidrIdentities::for_policies(&p);
        let entries = compile_endpoint(&p, &BTreeMap::new(), &ep);
        assert_eq!(
            lookup(
                &entries,
                Direction::Egress,
                cidrs.identity_of(ip(addr)),
                Protocol::Tcp,
                80
            )
            .0 == Verdict::Allow,
            want,
            "lookup {addr}"
        );
    }
    // A deny on an except of an allow.
    let p = parse_policies(&format!(
        "{}  egressDeny:\n  - toCIDR: [10.96.0.0/12]\n",
        doc("  - toCIDR: [10.0.0.0/8]\n")
    ))
    .unwrap();
    assert!(to(&p, "10.1.0.1") && !to(&p, "10.96.0.1"));
    // IPv6.
    let p = parse("  - toCIDRSet: [{cidr: \"2001:db8::/32\", except: [\"2001:db8:1::/48\"]}]\n");
    assert!(to(&p, "2001:db8::1") && !to(&p, "2001:db8:1::1") && !to(&p, "2001:db9::1"));
    assert!(!to(&p, "10.0.0.1"));

    // Refusals name the field.
    for (egress, path, what) in [
        (
            "  - toCIDR: [10.0.0.0/33]\n",
            "spec.egress[0].toCIDR[0]",
            "at most 32",
        ),
        (
            "  - toCIDR: [10.0.0/8]\n",
            "spec.egress[0].toCIDR[0]",
            "not an IPv4 or IPv6",
        ),
        (
            "  - toCIDR: [\"::/129\"]\n",
            "spec.egress[0].toCIDR[0]",
            "at most 128",
        ),
        (
            "  - toCIDR: [\"\"]\n",
            "spec.egress[0].toCIDR[0]",
            "is not a CIDR",
        ),
        (
            "  - toCIDRSet: [{cidr: 20.1.1.1}]\n",
            "spec.egress[0].toCIDRSet[0].cidr",
            "prefix length",
        ),
        (
            "  - toCIDRSet: [{except: [10.0.0.0/8]}]\n",
            "spec.egress[0].toCIDRSet[0]",
            "needs `cidr`",
        ),
        (
            "  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]\n",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "is not inside the cidr 10.0.0.0/8",
        ),
        (
            "  - toCIDRSet: [{cidr: 10.0.0.0/16, except: [10.0.0.0/8]}]\n",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "is not inside",
        ),
        (
            "  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [\"::/0\"]}]\n",
            "spec.egress[0].toCIDRSet[0].except[0]",
            "is not inside",
        ),
        (
            "  - toCIDRSet: [{cidrGroupRef: my-group}]\n",
            "spec.egress[0].toCIDRSet[0].cidrGroupRef",
            "field `cidrGroupRef` is not supported",
        ),
        (
            "  - toCIDRSet: [{cidrGroupSelector: {matchLabels: {a: b}}}]\n",
            "spec.egress[0].toCIDRSet[0].cidrGroupSelector",
            "field `cidrGroupSelector` is not supported",
        ),
        (
            "  - toCIDR: [10.0.0.0/8]\n    authentication: {mode: required}\n",
            "spec.egress[0]",
            "CIDR peers can never succeed",
        ),
    ] {
        let e = err(egress);
        assert!(
            e.contains(&format!("{path}: ")) && e.contains(what),
            "{egress}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // fromCIDR / fromCIDRSet on ingress.
    let p = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: i}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromCIDR: [192.0.2.0/24]\n  - fromCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]\n",
    )
    .unwrap();
    for (addr, want) in [
        ("192.0.2.7", true),
        ("198.51.100.1", true),
        ("198.51.100.200", false),
        ("203.0.113.1", false),
    ] {
        assert_eq!(
            allowed(
                &p,
                Peer::Address(ip(addr)),
                Peer::Endpoint(&ep),
                Protocol::Tcp,
                22
            ),
            want,
            "{addr}"
        );
    }
}

#[test]
fn entities_from_the_docs() {
    let dev = l("env=dev");
    let pod = l("app=x");
    // host and remote-node: the docs' "all nodes in the cluster".
    let p = docs("28-entities-nodes.yaml");
    for (src, want) in [
        (Peer::Host, true),
        (Peer::RemoteNode, true),
        (Peer::World, false),
        (Peer::Address(ip("8.8.8.8")), false),
        (Peer::Unmanaged, false),
        (Peer::Endpoint(&pod), false),
    ] {
        assert_eq!(
            allowed(&p, src, Peer::Endpoint(&dev), Protocol::Tcp, 22),
            want,
            "{src:?}"
        );
    }
    let e = compile_endpoint(&p, &BTreeMap::new(), &dev);
    let remotes: BTreeSet<Option<IdentityId>> = e
        .iter()
        .filter(|e| e.direction == Direction::Ingress)
        .map(|e| e.remote)
        .collect();
    assert_eq!(
        remotes,
        BTreeSet::from([Some(IdentityId::HOST), Some(IdentityId::REMOTE_NODE)])
    );

    // world: every address outside the cluster, whichever identity the ipcache gives it.
    let mut p = docs("06-entities-world.yaml");
    p.extend(docs("15-cidr.yaml"));
    let public = l("role=public");
    let cidrs = CidrIdentities::for_policies(&p);
    let ids = BTreeMap::from([(IdentityId::new(256), pod.clone())]);
    let entries = compile_endpoint_with(&p, &ids, &cidrs, &public);
    for addr in ["8.8.8.8", "10.1.2.3", "10.96.0.1", "20.1.1.1"] {
        assert!(allowed(
            &p,
            Peer::Address(ip(addr)),
            Peer::Endpoint(&public),
            Protocol::Tcp,
            80
        ));
        let remote = cidrs.identity_of(ip(addr));
        assert_eq!(
            lookup(&entries, Direction::Ingress, remote, Protocol::Tcp, 80).0,
            Verdict::Allow,
            "{addr} as {remote}"
        );
    }
    for src in [Peer::Endpoint(&pod), Peer::Host, Peer::RemoteNode] {
        assert!(
            !allowed(&p, src, Peer::Endpoint(&public), Protocol::Tcp, 80),
            "{src:?}"
        );
    }

    // cluster: pods, the nodes and unmanaged pods; not the world.
    let p = docs("07-entities-cluster.yaml");
    let internal = l("role=internal");
    for (src, want) in [
        (Peer::Endpoint(&ns("other", "app=x")), true),
        (Peer::Host, true),
        (Peer::RemoteNode, true),
        (Peer::Unmanaged, true),
        (Peer::World, false),
        (Peer::Address(ip("10.1.2.3")), false),
    ] {
        assert_eq!(
            allowed(&p, src, Peer::Endpoint(&internal), Protocol::Tcp, 80),
            want,
            "{src:?}"
        );
    }

    // The clusterwide lockdown of the deny docs: everything but the world, in every namespace.
    let p = docs("31-from-world-deny.yaml");
    let any = ns("team-a", "app=y");
    for (src, want) in [
        (Peer::Endpoint(&ns("team-b", "app=x")), true),
        (Peer::Host, true),
        (Peer::World, false),
        (Peer::Address(ip("192.0.2.1")), false),
    ] {
        let t = trace_peers(&p, src, Peer::Endpoint(&any), Protocol::Tcp, 80);
        assert_eq!(t.verdict == Verdict::Allow, want, "{src:?}");
        if !want {
            assert_eq!(t.ingress.decided_by[0].policy, "external-lockdown");
            assert_eq!(t.ingress.decided_by[0].section, "ingressDeny");
        }
    }

    // Entities meshauth has nothing for are refused, with the reason.
    let e = parse_policies(&fixture("cilium-docs/29-entities-apiserver.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("spec.egress[0].toEntities[0]")
            && e.contains("entity \"kube-apiserver\" is not supported")
            && e.contains("toCIDR"),
        "{e}"
    );
    let entity_doc = |e: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: e}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toEntities: [{e}]\n"
        )
    };
    for (entity, why) in [
        ("init", "identity is known"),
        ("health", "no health endpoints"),
        ("ingress", "no ingress proxy"),
        ("world-ipv4", "use world"),
        ("world-ipv6", "use world"),
        ("everything", "is unknown"),
    ] {
        let e = parse_policies(&entity_doc(entity)).unwrap_err().to_string();
        assert!(
            e.contains(why) && e.contains(&format!("{entity:?}")),
            "{entity}: {e}"
        );
    }
    // `none` selects the endpoint and allows nothing.
    let p = parse_policies(&entity_doc("none")).unwrap();
    assert!(!allowed(
        &p,
        Peer::Endpoint(&pod),
        Peer::World,
        Protocol::Tcp,
        80
    ));
    // Authentication with the new entities can never succeed either.
    for entity in ["remote-node", "unmanaged"] {
        let e = parse_policies(&format!(
            "{}    authentication: {{mode: required}}\n",
            entity_doc(entity)
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("never succeed") && e.contains(entity), "{e}");
    }
}

#[test]
fn icmp_types_from_the_docs() {
    let p = docs("30-icmp.yaml");
    let svc = l("app=myService");
    let db = l("app=db");
    let ids = BTreeMap::from([(IdentityId::new(256), db.clone())]);
    let entries = compile_endpoint(&p, &ids, &svc);
    // The type is the port of the entry's key.
    assert!(entries.contains(&PolicyEntry {
        direction: Direction::Egress,
        remote: None,
        protocol: Some(Protocol::Icmp),
        ports: PortRange::single(8),
        verdict: Verdict::Allow,
        auth: AuthType::None,
    }));
    assert!(entries.contains(&PolicyEntry {
        direction: Direction::Egress,
        remote: None,
        protocol: Some(Protocol::Icmpv6),
        ports: PortRange::single(128),
        verdict: Verdict::Allow,
        auth: AuthType::None,
    }));
    // The docs: only ICMP type 8 and ICMPv6 EchoRequest (128), to any destination; nothing
    // else, TCP included.
    for (proto, port, want) in [
        (Protocol::Icmp, 8, true),
        (Protocol::Icmp, 0, false),
        (Protocol::Icmp, 128, false),
        (Protocol::Icmpv6, 128, true),
        (Protocol::Icmpv6, 8, false),
        (Protocol::Icmpv6, 129, false),
        (Protocol::Tcp, 8, false),
        (Protocol::Udp, 128, false),
    ] {
        for (peer, remote) in [
            (Peer::Endpoint(&db), IdentityId::new(256)),
            (Peer::World, IdentityId::WORLD),
            (Peer::Host, IdentityId::HOST),
        ] {
            assert_eq!(
                allowed(&p, Peer::Endpoint(&svc), peer, proto, port),
                want,
                "{port}/{proto:?} to {peer:?}"
            );
            assert_eq!(
                lookup(&entries, Direction::Egress, remote, proto, port).0 == Verdict::Allow,
                want,
                "lookup {port}/{proto:?} to {remote}"
            );
        }
    }

    let doc = |egress: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: i}}\nspec:\n  endpointSelector: {{}}\n  egress:\n{egress}"
        )
    };
    let types = |egress: &str| -> Vec<(Option<Protocol>, PortRange)> {
        parse_policies(&doc(egress)).unwrap()[0].rules[0].egress[0]
            .ports
            .iter()
            .map(|p| (p.protocol, p.ports))
            .collect()
    };
    // Names per family, numbers as numbers or strings, IPv4 by default.
    assert_eq!(
        types(
            "  - icmps: [{fields: [{type: EchoRequest}, {type: EchoRequest, family: IPv6}, {type: \"3\"}, {type: 0, family: IPv4}]}]\n"
        ),
        [
            (Some(Protocol::Icmp), PortRange::single(8)),
            (Some(Protocol::Icmpv6), PortRange::single(128)),
            (Some(Protocol::Icmp), PortRange::single(3)),
            (Some(Protocol::Icmp), PortRange::single(0)),
        ]
    );
    // toPorts with protocol ICMP: every type.
    assert_eq!(
        types("  - toPorts: [{ports: [{port: \"8\", protocol: ICMP}]}]\n"),
        [(Some(Protocol::Icmp), PortRange::ANY)]
    );
    // An icmps deny beside an L3 allow: the type is dropped, the rest passes.
    let p = parse_policies(&format!(
        "{}  egressDeny:\n  - icmps: [{{fields: [{{type: 8}}]}}]\n",
        doc("  - toEntities: [all]\n")
    ))
    .unwrap();
    let entries = compile_endpoint(&p, &BTreeMap::new(), &svc);
    for (proto, port, want) in [
        (Protocol::Icmp, 8, false),
        (Protocol::Icmp, 0, true),
        (Protocol::Icmpv6, 8, true),
        (Protocol::Tcp, 8, true),
    ] {
        assert_eq!(
            allowed(&p, Peer::Endpoint(&svc), Peer::World, proto, port),
            want,
            "{port}/{proto:?}"
        );
        assert_eq!(
            lookup(&entries, Direction::Egress, IdentityId::WORLD, proto, port).0 == Verdict::Allow,
            want,
            "lookup {port}/{proto:?}"
        );
    }
    for (egress, path, what) in [
        (
            "  - icmps: [{fields: [{type: 256}]}]\n",
            "spec.egress[0].icmps[0].fields[0].type",
            "0 to 255",
        ),
        (
            "  - icmps: [{fields: [{type: -1}]}]\n",
            "spec.egress[0].icmps[0].fields[0].type",
            "0 to 255",
        ),
        (
            "  - icmps: [{fields: [{type: PacketTooBig}]}]\n",
            "spec.egress[0].icmps[0].fields[0].type",
            "not an ICMP type name for IPv4",
        ),
        (
            "  - icmps: [{fields: [{type: Echo, family: IPv6}]}]\n",
            "spec.egress[0].icmps[0].fields[0].type",
            "not an ICMP type name for IPv6",
        ),
        (
            "  - icmps: [{fields: [{type: 8, family: ipv4}]}]\n",
            "spec.egress[0].icmps[0].fields[0].family",
            "use IPv4 or IPv6",
        ),
        (
            "  - icmps: [{fields: []}]\n",
            "spec.egress[0].icmps[0]",
            "needs fields",
        ),
        (
            "  - icmps: [{fields: [{family: IPv4}]}]\n",
            "spec.egress[0].icmps[0].fields[0]",
            "type",
        ),
    ] {
        let e = parse_policies(&doc(egress)).unwrap_err().to_string();
        assert!(e.contains(path) && e.contains(what), "{egress}: {e}");
    }
}

#[test]
fn trace_peers_and_identities() {
    let mut p = docs("15-cidr.yaml");
    p.extend(docs("06-entities-world.yaml"));
    let svc = l("app=myService");
    let ids = BTreeMap::from([(IdentityId::new(256), svc.clone())]);
    let cidrs = CidrIdentities::for_policies(&p);
    // Peers from a command line.
    for (s, want) in [
        ("world", PeerSpec::World),
        ("host", PeerSpec::Host),
        ("remote-node", PeerSpec::RemoteNode),
        ("unmanaged", PeerSpec::Unmanaged),
        ("10.1.2.3", PeerSpec::Address(ip("10.1.2.3"))),
        ("2001:db8::1", PeerSpec::Address(ip("2001:db8::1"))),
        ("10.0.0.0/8", PeerSpec::Cidr("10.0.0.0/8".parse().unwrap())),
        ("app=myService", PeerSpec::Endpoint(raw("app=myService"))),
    ] {
        assert_eq!(s.parse::<PeerSpec>().unwrap(), want, "{s}");
    }
    assert!(
        "nonsense"
            .parse::<PeerSpec>()
            .unwrap_err()
            .contains("is not a peer")
    );
    assert!("10.0.0.0/99".parse::<PeerSpec>().is_err());
    // The trace names the policy by key, and the rule.
    let dst: PeerSpec = "20.1.1.1".parse().unwrap();
    let t = trace_peers(&p, Peer::Endpoint(&svc), dst.as_peer(), Protocol::Tcp, 443);
    assert_eq!(t.verdict, Verdict::Allow);
    assert_eq!(t.egress.decided_by.len(), 1);
    let r = &t.egress.decided_by[0];
    assert_eq!(
        (r.policy.as_str(), r.rule, r.section, r.index),
        ("default/cidr-rule", 0, "egress", 0)
    );
    // The destination is not an endpoint: it has no policy.
    assert!(!t.ingress.selected && t.ingress.verdict == Verdict::Allow);
    // Identities resolve to peers: reserved ones to entities, local ones to their prefix.
    let local = cidrs.get(&"10.96.0.0/12".parse().unwrap()).unwrap();
    assert_eq!(
        peer_of_identity(local, &ids, &cidrs),
        Some(Peer::Cidr("10.96.0.0/12".parse().unwrap()))
    );
    assert_eq!(
        peer_of_identity(IdentityId::WORLD, &ids, &cidrs),
        Some(Peer::World)
    );
    assert_eq!(
        peer_of_identity(IdentityId::HOST, &ids, &cidrs),
        Some(Peer::Host)
    );
    assert_eq!(
        peer_of_identity(IdentityId::REMOTE_NODE, &ids, &cidrs),
        Some(Peer::RemoteNode)
    );
    assert_eq!(
        peer_of_identity(IdentityId::new(256), &ids, &cidrs),
        Some(Peer::Endpoint(&svc))
    );
    assert_eq!(peer_of_identity(IdentityId::new(999), &ids, &cidrs), None);
    assert_eq!(peer_of_identity(IdentityId::UNKNOWN, &ids, &cidrs), None);
    let via = peer_of_identity(local, &ids, &cidrs).unwrap();
    let t = trace_peers(&p, Peer::Endpoint(&svc), via, Protocol::Tcp, 443);
    assert_eq!(t.verdict, Verdict::Deny, "10.96.0.0/12 is the except");
    assert_eq!(t.egress.selected_by, ["default/cidr-rule"]);
    // A world peer's ingress into a pod (06: role=public accepts the world).
    let public = l("role=public");
    let t = trace_peers(
        &p,
        Peer::Address(ip("10.96.0.1")),
        Peer::Endpoint(&public),
        Protocol::Tcp,
        80,
    );
    assert_eq!(t.verdict, Verdict::Allow);
    assert_eq!(
        t.ingress.decided_by[0].policy,
        "default/from-world-to-role-public"
    );
    assert!(!t.egress.selected);
}

#[test]
fn compiler_numbers_cidr_prefixes_and_keeps_them_stable() {
    let mut c = Compiler::new();
    let svc = l("app=myService");
    let other = l("app=other");
    c.set_endpoint("svc", svc.clone());
    c.set_endpoint("other", other);
    let before = c.recompilations();
    let changed = c.set_policy(docs("15-cidr.yaml").remove(0));
    assert_eq!(changed, ["svc"]);
    assert_eq!(c.recompilations() - before, 1, "only the selected endpoint");
    let ids: BTreeMap<Cidr, IdentityId> = c.cidr_identities().iter().collect();
    assert_eq!(ids.len(), 3);
    let ten = ids[&"10.0.0.0/8".parse::<Cidr>().unwrap()];
    assert!(
        c.entries("svc")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(ten) && e.verdict == Verdict::Allow)
    );
    // A world policy for another endpoint uses the CIDR identities too.
    let world = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: w}\nspec:\n  endpointSelector: {matchLabels: {app: other}}\n  egress:\n  - toEntities: [world]\n",
    )
    .unwrap()
    .remove(0);
    c.set_policy(world);
    assert!(
        c.entries("other")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(ten))
    );
    // A new prefix: numbered, existing numbers kept; endpoints using world/CIDR recompiled.
    let more = parse_policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: more, namespace: ns2}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [192.0.2.0/24]\n",
    )
    .unwrap()
    .remove(0);
    let before = c.recompilations();
    let changed = c.set_policy(more.clone());
    // Both use the world or CIDR identities and are recompiled; only `other`'s entries change
    // (svc's CIDR rules do not match the new prefix; `more` selects pods of ns2 only).
    assert_eq!(changed, ["other"]);
    assert_eq!(c.recompilations() - before, 2);
    assert_eq!(
        c.cidr_identities().get(&"10.0.0.0/8".parse().unwrap()),
        Some(ten)
    );
    let new = c
        .cidr_identities()
        .get(&"192.0.2.0/24".parse().unwrap())
        .unwrap();
    assert!(new.is_local() && new != ten);
    assert!(
        c.entries("other")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(new))
    );
    // The ipcache view, and what it compiles against, agree with a fresh numbering's verdicts.
    let all: Vec<Policy> = c.policies().map(|(_, p)| p.clone()).collect();
    for addr in ["10.1.2.3", "10.96.0.1", "192.0.2.1", "8.8.8.8"] {
        let want = allowed(
            &all,
            Peer::Endpoint(&svc),
            Peer::Address(ip(addr)),
            Protocol::Tcp,
            1,
        );
        let remote = c.cidr_identities().identity_of(ip(addr));
        assert_eq!(
            lookup(
                c.entries("svc").unwrap(),
                Direction::Egress,
                remote,
                Protocol::Tcp,
                1
            )
            .0 == Verdict::Allow,
            want,
            "{addr}"
        );
    }
    // Removing the policy frees its prefix and recompiles the users.
    let changed = c.remove_policy_key(&more.key());
    assert_eq!(changed, ["other"]);
    assert_eq!(
        c.cidr_identities().get(&"192.0.2.0/24".parse().unwrap()),
        None
    );
    assert_eq!(
        c.cidr_identities().get(&"10.0.0.0/8".parse().unwrap()),
        Some(ten)
    );
    assert!(
        !c.entries("other")
            .unwrap()
            .iter()
            .any(|e| e.remote == Some(new))
    );
}

/// Found by the agreement property in tests/fuzz.rs: an L3 rule requiring authentication for
/// some identities beside an L4-only rule for any identity. The L4-only entry is the more
/// specific one for the datapath, so, as Cilium's `authPreferredInsert` does, the compiler adds
/// the identity's L3/L4 entry with the identity's requirement.
#[test]
fn l4_only_rules_keep_the_authentication_of_broader_identity_rules() {
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p0}\nspec:\n  endpointSelector: {}\n  ingress:\n  - {fromEndpoints: [{}], authentication: {mode: required}}\n  - {toPorts: [{ports: [{port: \"0\", protocol: ICMP}, {port: \"80\", protocol: TCP}]}]}\n";
    let p = parse_policies(yaml).unwrap();
    let a = ns("ns1", "app=a");
    let ids = BTreeMap::from([(IdentityId::new(256), a.clone())]);
    let entries = compile_endpoint(&p, &ids, &a);
    for (proto, port) in [
        (Protocol::Icmp, 0),
        (Protocol::Tcp, 80),
        (Protocol::Tcp, 81),
    ] {
        let want = evaluate(&p, &a, Direction::Ingress, Peer::Endpoint(&a), proto, port);
        assert_eq!(
            (want.verdict, want.auth),
            (Verdict::Allow, AuthType::Required)
        );
        assert_eq!(
            lookup(
                &entries,
                Direction::Ingress,
                IdentityId::new(256),
                proto,
                port
            ),
            (Verdict::Allow, AuthType::Required),
            "{port}/{proto:?}: {entries:?}"
        );
        // Anyone else (here the host) still passes without authentication.
        let host = evaluate(&p, &a, Direction::Ingress, Peer::Host, proto, port);
        let got = lookup(&entries, Direction::Ingress, IdentityId::HOST, proto, port);
        assert_eq!(got, (host.verdict, host.auth), "host {port}/{proto:?}");
    }
    assert!(entries.contains(&PolicyEntry {
        direction: Direction::Ingress,
        remote: Some(IdentityId::new(256)),
        protocol: Some(Protocol::Tcp),
        ports: PortRange::single(80),
        verdict: Verdict::Allow,
        auth: AuthType::Required,
    }));
}

#[test]
fn the_per_connection_annotation_makes_required_rules_per_connection() {
    let policy = |annotation: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: pc\n{annotation}spec:\n  endpointSelector:\n    matchLabels: {{app: db}}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {{app: api}}\n    toPorts:\n    - ports: [{{port: \"5432\", protocol: TCP}}]\n    authentication: {{mode: required}}\n  - fromEndpoints:\n    - matchLabels: {{app: batch}}\n"
        )
    };
    let annotated = policy("  annotations:\n    meshauth.io/authentication: per-connection\n");
    assert_eq!(
        check(&annotated, "app=api", "app=db", 5432, Protocol::Tcp),
        (true, AuthType::PerConnection)
    );
    // Rules without `authentication` stay without it.
    assert_eq!(
        check(&annotated, "app=batch", "app=db", 5432, Protocol::Tcp),
        (true, AuthType::None)
    );
    // Without the annotation, or with `per-pair`: once per identity pair.
    for yaml in [
        policy(""),
        policy("  annotations:\n    meshauth.io/authentication: per-pair\n"),
    ] {
        assert_eq!(
            check(&yaml, "app=api", "app=db", 5432, Protocol::Tcp),
            (true, AuthType::Required)
        );
    }
    // Another value is refused, naming the annotation.
    let err = parse_policies(&policy(
        "  annotations:\n    meshauth.io/authentication: per-request\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("meshauth.io/authentication") && err.contains("per-connection"),
        "{err}"
    );
}
