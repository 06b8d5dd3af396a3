//! No dropped first packet (root only), on the demo's lab:
//! - with pre-authentication, client2's first request to the demo app (whose ingress policy
//!   requires authentication) needs no retransmission: the agents authenticated the pair before
//!   its first packet;
//! - without it, a pair whose *egress* policy requires authentication has its first SYN held
//!   on the sender's node (marked by the datapath, queued by the node, released once the agents
//!   authenticated the pair), again without a retransmission.
//!
//! Retransmissions are read from the client pod's own TCP counters (`/proc/net/snmp`).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");

struct Down(meshauth_lab::Lab);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

/// TCP segments the pod retransmitted so far.
fn retransmits(lab: &meshauth_lab::Lab, pod: &str) -> u64 {
    let argv: Vec<String> = ["cat", "/proc/net/snmp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = lab.exec(pod, &argv).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn get(lab: &meshauth_lab::Lab, pod: &str, to: &str) -> Option<f64> {
    let py = format!(
        "import time, urllib.request as u\nt=time.monotonic(); s=u.urlopen('http://{to}/', timeout=5).status\nprint(s, time.monotonic()-t)"
    );
    let argv: Vec<String> = ["python3", "-c", &py]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = lab.exec(pod, &argv).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut w = text.split_whitespace();
    (w.next() == Some("200")).then(|| w.next().and_then(|t| t.parse().ok()).unwrap_or(0.0))
}

#[test]
fn first_packets_of_new_pairs_are_not_dropped() {
    if !meshauth_test_support::require_root("the zero-drop end-to-end test (lab, eBPF)") {
        return;
    }
    // 1. Pre-authentication.
    let lab = meshauth_lab::Lab::new("zdpre").unwrap();
    let down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log",
            "warn",
            "demo",
            "--lab",
            "zdpre",
            "--keep",
            "--pre-authenticate",
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
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["requests"][1]["from"], "client2-2");
    assert_eq!(result["requests"][1]["status"], 200, "{result}");
    assert_eq!(
        retransmits(&lab, "client2-2"),
        0,
        "client2's first request needed no retransmission: {result}"
    );
    eprintln!(
        "pre-authenticated first request: {} ms",
        result["requests"][1]["ms"]
    );
    drop(down);

    // 2. Holding: a policy on client1's egress requires authentication toward the demo app;
    //    client1-3's first request to demodeployment-1 is held on n3, not dropped.
    let lab = meshauth_lab::Lab::new("zdhold").unwrap();
    let _down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log", "warn", "demo", "--lab", "zdhold", "--keep", "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = format!("{}/zdhold", meshauth_lab::STATE_DIR);
    let policy = format!("{work}/client1-egress.yaml");
    std::fs::write(
        &policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: client1-egress-auth\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client1\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        app: demodeployment\n    authentication:\n      mode: required\n",
    )
    .unwrap();
    let admin = format!("{work}/server-admin.sock");
    let applied = Command::new(BIN)
        .args(["policy", "apply", "-f", &policy, "--admin-socket", &admin])
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = retransmits(&lab, "client1-3");
    let took = get(&lab, "client1-3", "demodeployment-1").expect("the first request succeeds");
    assert_eq!(
        retransmits(&lab, "client1-3"),
        before,
        "the held SYN was released, not dropped and retransmitted"
    );
    eprintln!("held first request: {:.1} ms", took * 1e3);
    // The flow log shows it held, then released.
    let out = Command::new(BIN)
        .args([
            "observe",
            "-o",
            "json",
            "--agent-socket",
            &format!("{work}/n3-agent.sock"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HELD"), "{text}");
    assert!(text.contains("released after authentication"), "{text}");
    lab.down().unwrap();
}
