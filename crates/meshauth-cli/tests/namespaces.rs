//! Namespaces end to end (root only), on the demo's three-node lab (`nsiso`): a pod of
//! namespace `other` with client1's labels is another identity and is denied where client1 is
//! allowed; Cilium's namespace-isolation example (two policies of one name, in `ns1` and `ns2`)
//! lets each namespace's pods reach only their own namespace's, and deleting one of the two by
//! its key leaves the other in force. Each time the kernel does what `policy trace` says.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use demo_lab::{DemoLab, until};

const ISOLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../meshauth-policy/tests/fixtures/cilium-docs/22-isolate-namespaces.yaml"
);

#[test]
fn namespaces_isolate_identities_and_policies_in_the_kernel() {
    if !meshauth_test_support::require_root("the namespace end-to-end test (lab, eBPF)") {
        return;
    }
    let mut d = DemoLab::up("nsiso");

    // 1. client1's labels in namespace `other`: another identity, denied where client1 is
    //    allowed.
    d.add_pod("other", "client1-x", "n2", "app=client1");
    until("other/client1-x reported", || d.reported("other/client1-x"));
    let ids: serde_json::Value =
        serde_json::from_str(&d.cli(&["identity", "list", "-o", "json"])).unwrap();
    let client1 = ids
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["labels"]["app"] == "client1")
        .count();
    assert_eq!(client1, 2, "one identity per namespace: {ids}");
    assert_eq!(
        d.trace(
            "app=client1,io.kubernetes.pod.namespace=other",
            "app=demodeployment"
        ),
        "denied"
    );
    assert_eq!(d.trace("app=client1", "app=demodeployment"), "allowed");
    assert_eq!(
        d.trace_live("pod:other/client1-x", "pod:demodeployment-1"),
        "denied"
    );
    assert_eq!(
        d.trace_live("pod:client1-2", "pod:demodeployment-1"),
        "allowed"
    );
    assert!(d.get("client1-2", "demodeployment-1"), "client1 of default");
    for _ in 0..2 {
        assert!(
            !d.get("client1-x", "demodeployment-1"),
            "client1's labels in namespace other are denied"
        );
    }

    // 2. Cilium's namespace isolation: two policies named isolate-ns1, one in ns1 and one in
    //    ns2; each namespace's pods accept only their own namespace's.
    d.add_pod("ns1", "web-ns1", "n1", "app=web");
    d.add_pod("ns2", "web-ns2", "n1", "app=web");
    d.add_pod("ns1", "cl-ns1", "n2", "app=cl");
    d.add_pod("ns2", "cl-ns2", "n2", "app=cl");
    d.serve_http("web-ns1");
    d.serve_http("web-ns2");
    for p in ["ns1/web-ns1", "ns2/web-ns2", "ns1/cl-ns1", "ns2/cl-ns2"] {
        until(&format!("{p} reported"), || d.reported(p));
    }
    until("ns2's client reaches ns1's web before isolation", || {
        d.get("cl-ns2", "web-ns1")
    });
    let applied = d.cli(&["policy", "apply", "-f", ISOLATE]);
    assert!(
        applied.contains("applied policy ns1/isolate-ns1")
            && applied.contains("applied policy ns2/isolate-ns1"),
        "{applied}"
    );
    let ns = |app: &str, ns: &str| format!("app={app},io.kubernetes.pod.namespace={ns}");
    assert_eq!(d.trace(&ns("cl", "ns2"), &ns("web", "ns1")), "denied");
    assert_eq!(d.trace(&ns("cl", "ns1"), &ns("web", "ns1")), "allowed");
    assert_eq!(d.trace(&ns("cl", "ns1"), &ns("web", "ns2")), "denied");
    assert_eq!(d.trace("app=client1", &ns("web", "ns1")), "denied");
    until("ns2's client is denied by ns1's isolation", || {
        !d.get("cl-ns2", "web-ns1")
    });
    assert!(d.get("cl-ns1", "web-ns1"), "ns1 reaches ns1");
    assert!(d.get("cl-ns2", "web-ns2"), "ns2 reaches ns2");
    assert!(!d.get("cl-ns1", "web-ns2"), "ns1 does not reach ns2");
    assert!(!d.get("client1-2", "web-ns1"), "default does not reach ns1");

    // Deleting ns2's policy by its key leaves ns1's (same name) in force.
    assert_eq!(
        d.cli(&["policy", "delete", "ns2/isolate-ns1"]).trim(),
        "deleted policy ns2/isolate-ns1"
    );
    assert_eq!(d.trace(&ns("cl", "ns1"), &ns("web", "ns2")), "allowed");
    until("ns1's client reaches ns2 once ns2's policy went", || {
        d.get("cl-ns1", "web-ns2")
    });
    assert!(!d.get("cl-ns2", "web-ns1"), "ns1 is still isolated");
    let list = d.cli(&["policy", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with("ns1/isolate-ns1")) && !list.contains("ns2/isolate-ns1"),
        "{list}"
    );
}
