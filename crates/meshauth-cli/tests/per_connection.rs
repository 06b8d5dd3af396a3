//! Per-connection authentication (root only), on the demo's lab: a policy annotated
//! `meshauth.io/authentication: per-connection` lets client3 reach the demo app with a fresh
//! handshake for every new TCP connection, and each connection's auth entry goes when the
//! connection closes: from the kernel's auth maps of both nodes at once, from the agents' lists
//! within seconds. Then a ban: the banned node's auth entries go from its peers within 1 s.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use demo_lab::{BIN, DemoLab};
use meshauth_test_support::eventually;

const LAB: &str = "pconn";

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client3-per-connection
  annotations:
    meshauth.io/authentication: per-connection
spec:
  endpointSelector:
    matchLabels:
      app: demodeployment
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client3
    toPorts:
    - ports:
      - port: \"80\"
        protocol: TCP
    authentication:
      mode: required
";

fn work() -> String {
    format!("{}/{LAB}", meshauth_lab::STATE_DIR)
}

fn socket(node: &str) -> String {
    format!("{}/{node}-agent.sock", work())
}

/// The agents' successful handshakes between client3 and the demo app that `node` initiated.
fn initiated(node: &str) -> usize {
    let out = Command::new(BIN)
        .args([
            "observe",
            "-o",
            "json",
            "--verdict",
            "SUCCEEDED",
            "--agent-socket",
            &socket(node),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|f| {
            let m = &f["flow"]["extensions"]["meshauth"];
            f["flow"]["Type"] == "meshauth_auth"
                && m["reason"]
                    .as_str()
                    .is_none_or(|r| !r.contains("responder"))
                && f["flow"]["source"]["labels"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == "k8s:app=client3"))
        })
        .count()
}

/// The per-connection entries `node`'s agent lists (their connections, as text).
fn listed(node: &str) -> Vec<String> {
    let out = Command::new(BIN)
        .args([
            "auth",
            "list",
            "-o",
            "json",
            "--agent-socket",
            &socket(node),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["connection"].as_str().map(str::to_owned))
        .collect()
}

/// The per-connection entries in `node`'s kernel auth map.
fn in_kernel(node: &str) -> usize {
    let mut dp = meshauth_datapath::Datapath::load(&meshauth_datapath::Datapath::pin_dir_for(
        &format!("{LAB}-{node}"),
    ))
    .unwrap();
    dp.auth_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.connection.is_some())
        .count()
}

/// One new connection from client3-2 (n2) to demodeployment-1 (n1): whether it got a 200.
fn get(d: &DemoLab) -> bool {
    d.get("client3-2", "demodeployment-1")
}

/// Waits up to `limit` for `f`.
fn within(limit: Duration, what: &str, f: impl Fn() -> bool) {
    eventually(limit, what, || f().then_some(()));
}

#[test]
fn every_new_connection_authenticates_and_its_entry_goes_when_it_closes() {
    if !meshauth_test_support::require_root("the per-connection end-to-end test (lab, eBPF)") {
        return;
    }
    let d = DemoLab::up(LAB);
    let lab = &d.lab;
    let path = format!("{}/per-connection.yaml", work());
    std::fs::write(&path, POLICY).unwrap();
    d.cli(&["policy", "apply", "-f", &path]);
    // client3 was denied by the walkthrough; now each connection authenticates first.
    within(Duration::from_secs(20), "client3 is allowed", || get(&d));
    let before = initiated("n2");
    assert!(before >= 1, "client3-2's node (n2) initiated the handshake");
    for i in 1..=3 {
        assert!(get(&d), "connection {i} succeeds");
    }
    within(
        Duration::from_secs(5),
        "one handshake per new connection",
        || initiated("n2") == before + 3,
    );
    // Each closed connection took its entry from the kernel on both nodes.
    within(
        Duration::from_secs(2),
        "closed connections leave no entry in the kernel",
        || in_kernel("n1") == 0 && in_kernel("n2") == 0,
    );

    // A connection that stays open keeps its entry (on both nodes, naming the connection);
    // closing it removes the entry.
    let keepalive = "
import http.client, sys
c = http.client.HTTPConnection('demodeployment-1', 80, timeout=3)
for line in sys.stdin:
    c.request('GET', '/'); r = c.getresponse(); r.read(); print(r.status, flush=True)
";
    let argv: Vec<String> = ["python3", "-c", keepalive]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut client = lab
        .exec("client3-2", &argv)
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    let mut output = BufReader::new(client.stdout.take().unwrap());
    for _ in 0..3 {
        writeln!(input, "go").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "200");
    }
    assert_eq!(
        initiated("n2"),
        before + 4,
        "three requests on one connection: one handshake"
    );
    assert_eq!(in_kernel("n1"), 1, "the open connection's entry on n1");
    assert_eq!(in_kernel("n2"), 1, "the open connection's entry on n2");
    // Wait out the grace of fresh entries (the closed connections' go from the lists then),
    // so that the agents' sweep keeps the open one for its connection's sake alone.
    within(
        Duration::from_secs(10),
        "the agents list only the open connection's entry",
        || listed("n1").len() == 1 && listed("n2").len() == 1,
    );
    std::thread::sleep(Duration::from_secs(2));
    let open = listed("n2");
    assert_eq!(open.len(), 1, "kept while the connection is open: {open:?}");
    assert!(
        open[0].starts_with("TCP ") && open[0].ends_with(":80"),
        "{open:?}"
    );
    assert_eq!(listed("n1"), open, "both nodes name the same connection");
    assert_eq!(in_kernel("n2"), 1);
    drop(input);
    let _ = client.wait();
    within(
        Duration::from_secs(2),
        "the closed connection's entry leaves the kernel",
        || in_kernel("n1") == 0 && in_kernel("n2") == 0,
    );
    within(
        Duration::from_secs(10),
        "the agents stop listing the closed connection's entry",
        || listed("n1").is_empty() && listed("n2").is_empty(),
    );

    // A ban revokes: n1 holds the demo's pair entry toward n2 (demodeployment <-> client2);
    // banning n2 removes it from n1's agent and kernel within 1 s, and n2's pods lose their
    // identity on n1 (their traffic is dropped).
    let toward_n2 = || -> usize {
        let out = Command::new(BIN)
            .args([
                "auth",
                "list",
                "-o",
                "json",
                "--agent-socket",
                &socket("n1"),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["remote"]["node"] == "n2")
            .count()
    };
    assert!(toward_n2() >= 1, "the demo's pair entry toward n2");
    let agents: serde_json::Value =
        serde_json::from_str(&d.cli(&["agent", "list", "-o", "json"])).unwrap();
    let n2_id = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["node"] == "n2")
        .and_then(|a| a["node_id"].as_u64())
        .unwrap();
    let kernel_before = {
        let mut dp = meshauth_datapath::Datapath::load(&meshauth_datapath::Datapath::pin_dir_for(
            &format!("{LAB}-n1"),
        ))
        .unwrap();
        dp.auth_entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| u64::from(k.remote_node.get()) == n2_id)
            .count()
    };
    assert!(
        kernel_before >= 1,
        "n1's kernel holds the pair's entry toward n2"
    );
    d.cli(&["agent", "ban", "--node", "n2"]);
    let t = Instant::now();
    within(
        Duration::from_secs(1),
        "n1 revokes its entries toward the banned node within 1 s",
        || {
            toward_n2() == 0 && {
                let mut dp = meshauth_datapath::Datapath::load(
                    &meshauth_datapath::Datapath::pin_dir_for(&format!("{LAB}-n1")),
                )
                .unwrap();
                dp.auth_entries()
                    .unwrap()
                    .iter()
                    .all(|(k, _)| u64::from(k.remote_node.get()) != n2_id)
            }
        },
    );
    eprintln!("ban to revoked on n1: {} ms", t.elapsed().as_millis());
    assert!(!get(&d), "the banned node's pods are cut off");
    drop(d);
}
