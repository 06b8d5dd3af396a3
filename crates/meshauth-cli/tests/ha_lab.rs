//! The demo on three server replicas and an etcd (`meshauth demo --replicas 3`, root): the
//! leader replica is killed (SIGKILL); another leads, every agent fails over, renews its SVIDs
//! at the replicas left, and a pair never authenticated before authenticates (its handshake
//! with SVIDs signed after the kill) while policy still denies what it denied.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use std::process::Command;
use std::time::{Duration, Instant};

use demo_lab::{BIN, DemoLab};
use meshauth_test_support::eventually;

const LAB: &str = "harep";
/// Short SVIDs: within one lifetime after the kill, every SVID in use was signed by a replica
/// that survived.
const SVID_TTL: Duration = Duration::from_secs(10);
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const REPLICAS: [&str; 3] = ["server", "server-1", "server-2"];

/// Whether replica `i` answers and leads.
fn leads(d: &DemoLab, i: usize) -> Option<bool> {
    let socket = match i {
        0 => d.work().join("server-admin.sock"),
        i => d.work().join(format!("server-admin-{i}.sock")),
    };
    let out = Command::new(BIN)
        .args(["server", "healthcheck", "-o", "json", "--admin-socket"])
        .arg(socket)
        .output()
        .ok()?;
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    assert_eq!(h["datastore"], "etcd");
    h["leader"].as_bool()
}

fn leader(d: &DemoLab) -> Option<usize> {
    let l: Vec<usize> = (0..REPLICAS.len())
        .filter(|&i| leads(d, i) == Some(true))
        .collect();
    (l.len() == 1).then(|| l[0])
}

#[test]
fn with_the_leader_killed_agents_fail_over_and_new_pairs_authenticate() {
    if !meshauth_test_support::require_root("the replicas' lab test (lab, eBPF)") {
        return;
    }
    let ttl = format!("{}s", SVID_TTL.as_secs());
    let d = DemoLab::up_with(LAB, &["--replicas", "3", "--svid-ttl", &ttl]);
    let first = eventually(Duration::from_secs(10), "one leader", || leader(&d));
    assert!(
        d.get("client2-2", "demodeployment-1"),
        "client2 before the kill"
    );
    let serials: Vec<serde_json::Value> = NODES
        .iter()
        .map(|n| d.agent_health(n)["node_svid_serial"].clone())
        .collect();

    let (pid, _) = d.server_process(REPLICAS[first]);
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let killed = Instant::now();
    let next = eventually(Duration::from_secs(15), "a new leader", || leader(&d));
    assert_ne!(next, first);
    let took = killed.elapsed();

    // One SVID lifetime later every node SVID in use was issued after the kill, by the
    // replicas left, and every agent is connected to one.
    std::thread::sleep(SVID_TTL);
    for (n, before) in NODES.iter().zip(&serials) {
        eventually(
            Duration::from_secs(10),
            "the agent renewed and connected",
            || {
                let h = d.agent_health(n);
                (h["server_connected"] == true && h["node_svid_serial"] != *before).then_some(())
            },
        );
    }
    // A pair no agent authenticated before (client2 on n3 to demodeployment on n1).
    assert!(
        d.get("client2-3", "demodeployment-1"),
        "a new pair authenticates with the leader gone"
    );
    assert!(
        !d.get("client3-3", "demodeployment-1"),
        "policy still denies client3"
    );
    eprintln!(
        "leader replica killed: a new leader after {took:?}; a new pair authenticated {:?} after the kill",
        killed.elapsed()
    );
}
