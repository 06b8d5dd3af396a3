//! `meshauth policy validate` and `trace` on the walkthrough's policies.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const WALKTHROUGH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../meshauth-policy/tests/fixtures/walkthrough.yaml"
);

fn trace(src: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "policy",
            "trace",
            "-f",
            WALKTHROUGH,
            "--src",
            src,
            "--dst",
            "app=demodeployment",
            "--dport",
            "80/TCP",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn trace_the_walkthrough() {
    let t = trace("app=client1");
    assert_eq!(
        (t["verdict"].as_str(), t["auth"].as_str()),
        (Some("allowed"), Some("none"))
    );
    assert_eq!(
        t["ingress"]["decided_by"][0],
        "default/demo1-allow-client1/ingress[0]"
    );
    let t = trace("app=client2");
    assert_eq!(
        (t["verdict"].as_str(), t["auth"].as_str()),
        (Some("allowed"), Some("required"))
    );
    // Labels without a namespace are in `default`; the walkthrough's policies select nothing
    // in another namespace.
    let t = trace("app=client1,io.kubernetes.pod.namespace=other");
    assert_eq!(t["verdict"].as_str(), Some("denied"), "{t}");
    let t = trace("app=client3");
    assert_eq!(
        (t["verdict"].as_str(), t["auth"].as_str()),
        (Some("denied"), Some("none"))
    );
    assert_eq!(t["egress"]["selected"], false);
    // Default deny names the policies that selected the destination.
    assert_eq!(
        t["ingress"]["selected_by"],
        serde_json::json!([
            "default/demo1-allow-client1",
            "default/demo1-allow-client2-auth",
            "default/demo1-default-deny"
        ])
    );
    assert_eq!(t["ingress"]["decided_by"], serde_json::json!([]));
}

#[test]
fn validate_reports_what_and_where() {
    let ok = Command::new(BIN)
        .args(["policy", "validate", "-f", WALKTHROUGH])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "3 policies valid\n  default/demo1-allow-client2-auth: authentication required (once per identity pair)"
    );

    // Several files after one -f.
    let two = Command::new(BIN)
        .args([
            "policy",
            "validate",
            "-f",
            WALKTHROUGH,
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../meshauth-policy/tests/fixtures/cilium-docs/01-l3-label.yaml"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&two.stdout).lines().next(),
        Some("4 policies valid"),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fqdn}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: x.com}]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "validate", "-f"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("document 1 (fqdn)") && err.contains("toFQDNs"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1);

    let out = Command::new(BIN)
        .args([
            "policy",
            "trace",
            "-f",
            WALKTHROUGH,
            "--src",
            "app",
            "--dst",
            "app=x",
            "--dport",
            "80/TCP",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"app\" is not a peer"));
}

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../meshauth-policy/tests/fixtures/cilium-docs"
);

/// `policy trace` of `file` (under the Cilium fixtures) from `src` to `dst` on `dport`, JSON.
fn trace_fixture(file: &str, src: &str, dst: &str, dport: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["policy", "trace", "-f", &format!("{FIXTURES}/{file}")])
        .args(["--src", src, "--dst", dst, "--dport", dport, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn trace_by_address_prefix_entity_and_icmp_type() {
    // toCIDR 20.1.1.1, toCIDRSet 10.0.0.0/8 except 10.96.0.0/12.
    let cidr = "15-cidr.yaml";
    let t = trace_fixture(cidr, "app=myService", "10.1.2.3", "443/TCP");
    assert_eq!(t["verdict"], "allowed", "{t}");
    assert_eq!(t["egress"]["decided_by"][0], "default/cidr-rule/egress[1]");
    assert_eq!(
        t["egress"]["rules"][0],
        serde_json::json!({"policy": "default/cidr-rule", "spec": 0, "section": "egress", "index": 1})
    );
    assert_eq!(t["dst_peer"]["kind"], "address");
    assert_eq!(
        t["ingress"]["enforced"], false,
        "an address enforces nothing"
    );
    let t = trace_fixture(cidr, "app=myService", "10.96.0.1", "443/TCP");
    assert_eq!(t["verdict"], "denied", "the except: {t}");
    assert_eq!(
        trace_fixture(cidr, "app=myService", "20.1.1.1", "443/TCP")["egress"]["decided_by"][0],
        "default/cidr-rule/egress[0]"
    );
    // A prefix: the identity of a prefix policies name.
    let t = trace_fixture(cidr, "app=myService", "10.96.0.0/12", "443/TCP");
    assert_eq!(
        (t["verdict"].as_str(), t["dst_peer"]["labels"][0].as_str()),
        (Some("denied"), Some("cidr:10.96.0.0/12"))
    );
    assert_eq!(
        trace_fixture(cidr, "app=myService", "world", "443/TCP")["verdict"],
        "denied"
    );
    // Entities: host and remote-node.
    let nodes = "28-entities-nodes.yaml";
    for (src, want) in [
        ("host", "allowed"),
        ("remote-node", "allowed"),
        ("world", "denied"),
        ("app=other", "denied"),
    ] {
        let t = trace_fixture(nodes, src, "env=dev", "22/TCP");
        assert_eq!(t["verdict"], want, "from {src}: {t}");
        assert_eq!(t["egress"]["enforced"], src.contains('='));
    }
    // ICMP: the port is the type.
    let icmp = "30-icmp.yaml";
    assert_eq!(
        trace_fixture(icmp, "app=myService", "world", "8/ICMP")["verdict"],
        "allowed"
    );
    assert_eq!(
        trace_fixture(icmp, "app=myService", "world", "0/ICMP")["verdict"],
        "denied"
    );
    // Namespaces: Cilium's isolation example, by labels naming their namespace.
    let iso = "22-isolate-namespaces.yaml";
    let ns = |n: &str| format!("app=x,io.kubernetes.pod.namespace={n}");
    let t = trace_fixture(iso, &ns("ns1"), &ns("ns1"), "80/TCP");
    assert_eq!(t["ingress"]["decided_by"][0], "ns1/isolate-ns1/ingress[0]");
    let t = trace_fixture(iso, &ns("ns2"), &ns("ns1"), "80/TCP");
    assert_eq!(
        (t["verdict"].as_str(), &t["ingress"]["selected_by"]),
        (Some("denied"), &serde_json::json!(["ns1/isolate-ns1"]))
    );

    // Text: the side that is not a pod says so.
    let out = Command::new(BIN)
        .args(["policy", "trace", "-f", &format!("{FIXTURES}/{nodes}")])
        .args(["--src", "host", "--dst", "env=dev", "--dport", "22"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("host -> env=dev 22/TCP")
            && text.contains("not a pod: nothing enforced")
            && text.contains("default/to-dev-from-nodes-in-cluster/ingress[0]"),
        "{text}"
    );

    // Bad peers: one sentence each (clap's usage error).
    for (bad, want) in [
        ("nonsense", "is not a peer"),
        ("10.0.0.0/33", "at most 32"),
        ("pod:Bad/x", "invalid namespace"),
        ("app=x,io.kubernetes.pod.namespace=Bad", "invalid namespace"),
    ] {
        let out = Command::new(BIN)
            .args(["policy", "trace", "-f", &format!("{FIXTURES}/{nodes}")])
            .args(["--src", bad, "--dst", "world", "--dport", "22"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{bad}: {err}");
    }
}

#[test]
fn validate_and_trace_show_per_connection_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pc.yaml");
    std::fs::write(
        &file,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: db-per-connection\n  annotations:\n    meshauth.io/authentication: per-connection\nspec:\n  endpointSelector:\n    matchLabels: {app: db}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {app: api}\n    authentication: {mode: required}\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let out = Command::new(BIN)
        .args(["policy", "validate", "-f", &file])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("default/db-per-connection: authentication per connection"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args([
            "policy", "trace", "-f", &file, "--src", "app=api", "--dst", "app=db", "--dport",
            "5432/TCP",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("per-connection"), "{text}");
    let t = trace_fixture_file(&file, "app=api", "app=db", "5432/TCP");
    assert_eq!(t["auth"], "per-connection", "{t}");
    assert_eq!(t["ingress"]["auth"], "per-connection", "{t}");
}

fn trace_fixture_file(file: &str, src: &str, dst: &str, dport: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "policy", "trace", "-f", file, "--src", src, "--dst", dst, "--dport", dport, "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}
