//! CIDR peers and entities end to end (root only), on the demo's three-node lab (`nscidr`)
//! with two hosts outside the cluster (192.0.2.1 and 192.0.2.2, in the lab's underlay
//! namespace): `toCIDRSet` with `except` and `fromCIDR` decide by address, `fromEntities`
//! `host` is the node's own address and `remote-node` the other nodes', an address outside the
//! cluster is `world`, and one inside a node's pod range that no pod has has no identity. Each
//! time the kernel does what `policy trace` says, and `observe` names the policy that decided
//! and labels the outside peers as Cilium does (`cidr:<prefix>`, `reserved:world`).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use demo_lab::{DemoLab, ip, until};

const EGRESS_CIDR: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client3-to-external
spec:
  endpointSelector:
    matchLabels:
      app: client3
  egress:
  - toCIDRSet:
    - cidr: 192.0.2.0/24
      except:
      - 192.0.2.2/32
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"#;

const INGRESS_CIDR: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client3-from-external
spec:
  endpointSelector:
    matchLabels:
      app: client3
  ingress:
  - fromCIDR:
    - 192.0.2.1/32
"#;

const FROM_HOST: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: demo-from-nodes
spec:
  endpointSelector:
    matchLabels:
      app: demodeployment
  ingress:
  - fromEntities:
    - host
"#;

fn apply(d: &DemoLab, name: &str, yaml: &str) {
    let path = d.work().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    d.cli(&["policy", "apply", "-f", path.to_str().unwrap()]);
}

#[test]
fn cidr_peers_and_entities_decide_in_the_kernel_as_trace_says() {
    if !meshauth_test_support::require_root("the CIDR end-to-end test (lab, eBPF)") {
        return;
    }
    let mut d = DemoLab::up("nscidr");
    let ul = d.lab.underlay_netns();
    let node_ns = |i: u8| format!("nscidr-n{i}");
    // Two hosts outside the cluster, on the underlay namespace, routed both ways.
    for a in ["192.0.2.1/32", "192.0.2.2/32"] {
        ip(&["-n", &ul, "addr", "add", a, "dev", "lo"]);
    }
    for i in 1..=3u8 {
        ip(&[
            "-n",
            &ul,
            "route",
            "add",
            &format!("10.200.{i}.0/24"),
            "via",
            &format!("10.199.0.{i}"),
        ]);
        ip(&[
            "-n",
            &node_ns(i),
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            "10.199.0.254",
        ]);
    }
    d.serve_http_in(&ul);

    // 1. No policy selects client3's egress: the world is reachable (it is `world`, 2).
    until("client3 reaches 192.0.2.2 (world)", || {
        d.get("client3-2", "192.0.2.2")
    });

    // 2. toCIDRSet 192.0.2.0/24 except 192.0.2.2/32, port 80.
    apply(&d, "egress-cidr", EGRESS_CIDR);
    assert_eq!(d.trace_live("pod:client3-2", "192.0.2.1"), "allowed");
    assert_eq!(d.trace_live("pod:client3-2", "192.0.2.2"), "denied");
    assert_eq!(d.trace("app=client3", "192.0.2.2"), "denied");
    until("the except is enforced", || {
        !d.get("client3-2", "192.0.2.2")
    });
    assert!(d.get("client3-2", "192.0.2.1"), "inside the cidr");
    assert!(!d.get("client3-1", "192.0.2.2"), "on every node");
    assert!(d.get("client3-3", "192.0.2.1"));

    // 3. fromCIDR 192.0.2.1: the external host at .1 may connect to client3, .2 may not.
    d.serve_http("client3-2");
    let target = d.ip_of("client3-2");
    until(
        "192.0.2.2 reaches client3 before its ingress is selected",
        || d.get_in(&ul, &target, Some("192.0.2.2")),
    );
    apply(&d, "ingress-cidr", INGRESS_CIDR);
    assert_eq!(d.trace_live("192.0.2.1", "pod:client3-2"), "allowed");
    assert_eq!(d.trace_live("192.0.2.2", "pod:client3-2"), "denied");
    until("fromCIDR is enforced", || {
        !d.get_in(&ul, &target, Some("192.0.2.2"))
    });
    assert!(d.get_in(&ul, &target, Some("192.0.2.1")));

    // 4. Entities: demodeployment-1 (n1) is default-deny; `host` lets its own node in (its
    //    address, 10.199.0.1), not the other nodes (remote-node).
    let demo = d.ip_of("demodeployment-1");
    assert!(!d.get_in(&node_ns(1), &demo, None), "default deny");
    apply(&d, "from-nodes", FROM_HOST);
    assert_eq!(d.trace_live("host", "pod:demodeployment-1"), "allowed");
    assert_eq!(
        d.trace_live("remote-node", "pod:demodeployment-1"),
        "denied"
    );
    until("the host reaches its pod", || {
        d.get_in(&node_ns(1), &demo, None)
    });
    assert!(!d.get_in(&node_ns(2), &demo, None), "n2 is a remote node");
    apply(
        &d,
        "from-nodes",
        &FROM_HOST.replace("    - host\n", "    - host\n    - remote-node\n"),
    );
    assert_eq!(
        d.trace_live("remote-node", "pod:demodeployment-1"),
        "allowed"
    );
    until(
        "another node reaches it once remote-node is allowed",
        || d.get_in(&node_ns(2), &demo, None),
    );

    // 5. An address of a node's pod range that no pod has: no identity, whatever policy says
    //    (client1-1's ingress is selected by no policy: every identity may reach it).
    d.serve_http("client1-1");
    let client1 = d.ip_of("client1-1");
    until(
        "n2's address reaches client1-1 (no policy selects it)",
        || d.get_in(&node_ns(2), &client1, None),
    );
    ip(&[
        "-n",
        &node_ns(2),
        "addr",
        "add",
        "10.200.2.250/32",
        "dev",
        "lo",
    ]);
    assert!(
        !d.get_in(&node_ns(2), &client1, Some("10.200.2.250")),
        "from an address of n2's pod range that no pod has"
    );
    let mut agent_sockets = Vec::new();
    for n in ["n1", "n2", "n3"] {
        agent_sockets.push("--agent-socket".to_string());
        agent_sockets.push(
            d.work()
                .join(format!("{n}-agent.sock"))
                .display()
                .to_string(),
        );
    }
    let out = std::process::Command::new(demo_lab::BIN)
        .args(["observe", "-o", "json", "--verdict", "DROPPED"])
        .args(&agent_sockets)
        .output()
        .unwrap();
    let dropped = String::from_utf8_lossy(&out.stdout);
    assert!(
        dropped
            .lines()
            .any(|l| l.contains("10.200.2.250") && l.contains("no identity")),
        "{dropped}"
    );

    // 6. The flows of step 2 as `observe -o json` shows them: the deciding policy in Hubble's
    //    fields, and the outside peers with the labels of their CIDR identity.
    let out = std::process::Command::new(demo_lab::BIN)
        .args(["observe", "-o", "json"])
        .args(&agent_sockets)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let flows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"].clone())
        .collect();
    let to = |dst: &str, verdict: &str| {
        flows
            .iter()
            .find(|f| {
                f["IP"]["destination"] == dst
                    && f["verdict"] == verdict
                    && f["traffic_direction"] == "EGRESS"
                    && f["source"]["pod_name"] == "client3-2"
                    && f["l4"]["TCP"]["destination_port"] == 80
            })
            .unwrap_or_else(|| panic!("no {verdict} flow from client3-2 to {dst}:80 in\n{text}"))
    };
    let allowed = to("192.0.2.1", "FORWARDED");
    assert_eq!(
        allowed["egress_allowed_by"],
        serde_json::json!([{"name": "client3-to-external", "namespace": "default", "kind": "CiliumNetworkPolicy"}]),
        "{allowed:#}"
    );
    assert_eq!(
        allowed["destination"]["labels"],
        serde_json::json!(["cidr:192.0.2.0/24", "reserved:world"]),
        "{allowed:#}"
    );
    let denied = to("192.0.2.2", "DROPPED");
    assert_eq!(denied["drop_reason_desc"], "POLICY_DENIED", "{denied:#}");
    assert_eq!(
        denied["extensions"]["meshauth"]["default_deny_by"],
        serde_json::json!(["default/client3-to-external"]),
        "{denied:#}"
    );
    assert_eq!(
        denied["destination"]["labels"],
        serde_json::json!(["cidr:192.0.2.2/32", "reserved:world"]),
        "{denied:#}"
    );
}
