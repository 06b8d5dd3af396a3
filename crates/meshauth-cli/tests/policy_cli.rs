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
        "3 policies valid"
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
        String::from_utf8_lossy(&two.stdout).trim(),
        "4 policies valid",
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected key=value"));
}
