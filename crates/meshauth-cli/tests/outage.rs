//! A server outage longer than the SVID lifetime (root only), on the demo's lab with x509pop
//! nodes and 20-second SVIDs: the server is stopped until every node SVID has expired and
//! client2 can no longer reach the demo app; then it is started again, as it was, and nothing
//! else is done. Every agent attests again by itself (x509pop), syncs, and client2's requests
//! pass again after a fresh mutual authentication. The time to recover is printed, and the
//! agents' logs stay bounded through the outage (they back off).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use demo_lab::{BIN, DemoLab};
use meshauth_test_support::eventually;

const LAB: &str = "outage";
const SVID_TTL: Duration = Duration::from_secs(20);
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn work() -> String {
    format!("{}/{LAB}", meshauth_lab::STATE_DIR)
}

fn unix_of(rfc3339: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(rfc3339.as_str().unwrap()).unwrap()
}

#[test]
fn x509pop_nodes_recover_by_themselves_after_an_outage_past_their_svid_lifetime() {
    if !meshauth_test_support::require_root("the outage fault test (lab, eBPF)") {
        return;
    }
    let ttl = format!("{}s", SVID_TTL.as_secs());
    let d = DemoLab::up_with(LAB, &["--x509pop", "--svid-ttl", &ttl]);
    let agents = d.cli(&["agent", "list", "-o", "json"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    for a in agents.as_array().unwrap() {
        assert_eq!(a["attestation"], "x509pop", "{a}");
        assert_eq!(a["can_reattest"], true, "{a}");
    }
    assert!(
        d.get("client2-1", "demodeployment-2"),
        "client2 before the outage"
    );
    let serials: Vec<serde_json::Value> = NODES
        .iter()
        .map(|n| d.agent_health(n)["node_svid_serial"].clone())
        .collect();

    // The outage: until every node SVID has expired and client2 is cut off.
    let (pid, argv) = d.server_process("server");
    let down = Instant::now();
    assert!(
        Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
    eventually(Duration::from_secs(15), "the server to exit", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    let latest_expiry = NODES
        .iter()
        .map(|n| unix_of(&d.agent_health(n)["node_svid_expires_at"]))
        .max()
        .unwrap();
    let wait = latest_expiry
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(3);
    assert!(wait <= SVID_TTL + Duration::from_secs(3), "{wait:?}");
    std::thread::sleep(wait);
    for n in NODES {
        let h = d.agent_health(n);
        assert_eq!(h["server_connected"], false, "{n}: {h}");
        assert!(
            unix_of(&h["node_svid_expires_at"]) < SystemTime::now(),
            "{n}: {h}"
        );
    }
    assert!(
        !d.get("client2-1", "demodeployment-2"),
        "client2 still passes with every SVID expired: the outage did not outlive them"
    );
    eprintln!(
        "outage: server down for {:?}, every node SVID expired",
        down.elapsed()
    );

    // The server comes back as it was; nothing else is done.
    let log = std::fs::File::create(format!("{}/server-restarted.log", work())).unwrap();
    let mut server = d
        .lab
        .exec_in(&d.lab.underlay_netns(), &argv)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let back = Instant::now();
    let mut synced = Vec::new();
    for n in NODES {
        eventually(
            Duration::from_secs(60),
            &format!("{n} to sync again"),
            || {
                let h = d.agent_health(n);
                (h["server_connected"] == true
                    && unix_of(&h["node_svid_expires_at"]) > SystemTime::now())
                .then_some(())
            },
        );
        synced.push((n, back.elapsed()));
    }
    let agents_back = back.elapsed();
    eventually(Duration::from_secs(60), "client2 to pass again", || {
        d.get("client2-1", "demodeployment-2").then_some(())
    });
    let traffic_back = back.elapsed();
    for (n, before) in NODES.iter().zip(&serials) {
        let h = d.agent_health(n);
        assert_ne!(
            &h["node_svid_serial"], before,
            "{n} has a new node SVID: {h}"
        );
    }
    let attested = d.cli(&["agent", "list", "-o", "json"]);
    assert!(attested.contains("\"x509pop\""), "{attested}");
    // A fresh handshake, after the restart, let client2 through: n1 holds an authenticated
    // pair that expires after the restart's first SVIDs could (the old ones are gone).
    let out = Command::new(BIN)
        .args(["auth", "list", "-o", "json", "--agent-socket"])
        .arg(format!("{}/n1-agent.sock", work()))
        .output()
        .unwrap();
    let auth = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("n1 auth list after recovery: {auth}");
    eprintln!(
        "recovered with no manual step: agents re-attested and synced {} after the server returned; client2 -> demodeployment passed again after {traffic_back:?}",
        synced
            .iter()
            .map(|(n, t)| format!("{n} {t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(agents_back < Duration::from_secs(60));
    // Through the outage the agents backed off, and so did their logs: each retry is one line
    // at most (an agent once retried identity SVIDs at once, 300 warnings a second).
    for n in NODES {
        let log = std::fs::read_to_string(format!("{}/agent-{n}.log", work())).unwrap();
        let lines = log.lines().count();
        eprintln!("agent {n}: {lines} log lines in all");
        assert!(lines < 300, "agent {n} wrote {lines} log lines");
    }
    let _ = server.kill();
    let _ = server.wait();
}
