//! Mutual authentication end to end (root only): `meshauth demo` replays the walkthrough on a
//! three-node lab with a real server, an agent per node and the eBPF datapath. client1 gets an
//! HTTP 200, client2 gets one after the two agents authenticated the pair (both nodes hold the
//! entry, in the kernel too), client3 is denied.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");

struct Down(meshauth_lab::Lab);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

#[test]
fn demo_replays_the_walkthrough() {
    if !meshauth_test_support::require_root("the end-to-end tests (lab, eBPF)") {
        return;
    }
    let lab = meshauth_lab::Lab::new("e2e").unwrap();
    let _down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log", "warn", "demo", "--lab", "e2e", "--keep", "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = |i: usize| result["requests"][i]["status"].as_u64().unwrap();
    assert_eq!(result["requests"][0]["from"], "client1-2");
    assert_eq!(status(0), 200, "client1 is allowed");
    assert_eq!(status(1), 200, "client2 is allowed after authentication");
    assert_eq!(status(2), 0, "client3 is denied");
    assert_eq!(status(3), 200, "client2 again");
    // The first request of the new pair has its SYN held on client2's node while the agents
    // authenticate (no drop, no 1 s retransmission); the next one is an ordinary connection
    // (figures: docs/benchmarks.md).
    assert!(
        result["requests"][1]["ms"].as_u64().unwrap() < 1000,
        "{result}"
    );
    assert!(
        result["requests"][3]["ms"].as_u64().unwrap() < 5000,
        "{result}"
    );

    let auth = result["auth"].as_array().unwrap();
    let pair = |node: &str, local: &str, remote: &str| {
        auth.iter().any(|e| {
            e["node"] == node
                && e["local"]["labels"]["app"] == local
                && e["remote"]["labels"]["app"] == remote
        })
    };
    assert!(pair("n1", "demodeployment", "client2"), "{auth:?}");
    assert!(pair("n2", "client2", "demodeployment"), "{auth:?}");
    assert_eq!(
        auth.len(),
        2,
        "no pair but client2 <-> demodeployment needed authentication"
    );

    // observe shows the story: client2's SYN held for authentication on its node, then
    // released; the handshake; client3 denied by policy.
    let socks: Vec<String> = ["n1", "n2"]
        .iter()
        .map(|n| format!("{}/e2e/{n}-agent.sock", meshauth_lab::STATE_DIR))
        .collect();
    let observe = |filter: &[&str]| -> Vec<serde_json::Value> {
        let out = Command::new(BIN)
            .args([
                "observe",
                "-o",
                "json",
                "--agent-socket",
                &socks[0],
                "--agent-socket",
                &socks[1],
            ])
            .args(filter)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let flows = observe(&["--to-label", "app=demodeployment"]);
    // Hubble's flow JSON (`hubble observe -o json`); meshauth's extras under extensions.
    let has_label = |v: &serde_json::Value, label: &str| {
        v["labels"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x == label))
    };
    let seen = |app: &str, verdict: &str, reason: &str| {
        flows.iter().any(|f| {
            f["flow"]["Type"] == "L3_L4"
                && has_label(&f["flow"]["source"], &format!("k8s:app={app}"))
                && f["flow"]["verdict"] == verdict
                && f["flow"]["extensions"]["meshauth"]["reason"] == reason
        })
    };
    assert!(seen("client2", "HELD", "authentication required"));
    assert!(
        flows.iter().any(|f| f["node_name"] == "n2"
            && has_label(&f["flow"]["source"], "k8s:app=client2")
            && f["flow"]["verdict"] == "FORWARDED"
            && f["flow"]["extensions"]["meshauth"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("released after authentication"))),
        "{flows:#?}"
    );
    assert!(
        !flows.iter().any(|f| f["flow"]["verdict"] == "DROPPED"
            && has_label(&f["flow"]["source"], "k8s:app=client2")),
        "no packet of client2 was dropped: {flows:#?}"
    );
    assert!(seen("client2", "FORWARDED", ""));
    assert!(seen("client1", "FORWARDED", ""));
    assert!(seen("client3", "DROPPED", "policy denied"));
    let handshakes = observe(&["--verdict", "SUCCEEDED"]);
    assert!(
        handshakes
            .iter()
            .any(|f| f["flow"]["Type"] == "meshauth_auth"
                && f["node_name"] == "n2"
                && has_label(&f["flow"]["source"], "k8s:app=client2")
                && has_label(&f["flow"]["destination"], "k8s:app=demodeployment")
                && f["flow"]["extensions"]["meshauth"]["latency_us"]
                    .as_u64()
                    .unwrap()
                    > 0),
        "the initiator (n2, client2's node, which held the SYN) reports the handshake with its latency: {handshakes:?}"
    );
    assert!(
        handshakes
            .iter()
            .all(|f| f["flow"]["extensions"]["meshauth"]["handshake"] == "SUCCEEDED")
    );

    // The entries are in the kernel's auth maps of both nodes.
    for node in ["n1", "n2"] {
        let mut dp = meshauth_datapath::Datapath::load(&meshauth_datapath::Datapath::pin_dir_for(
            &format!("e2e-{node}"),
        ))
        .unwrap();
        assert_eq!(dp.auth_entries().unwrap().len(), 1, "node {node}");
    }
    // An agent restart keeps established authenticated connections and the pair's entries:
    // client2-2 (n2) keeps an HTTP/1.1 connection to demodeployment-1 (n1) open while n1's
    // agent is killed and started again (without a token: it re-uses its node SVID; the
    // datapath's pinned state stays), and new connections after the restart pass through the
    // auth map, which must still hold the entries.
    let keepalive = r#"
import http.client, sys
c = http.client.HTTPConnection("demodeployment-1", 80, timeout=3)
for line in sys.stdin:
    c.request("GET", "/"); r = c.getresponse(); r.read(); print(r.status, flush=True)
"#;
    let argv: Vec<String> = ["python3", "-c", keepalive]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut client = lab
        .exec("client2-2", &argv)
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    let mut output = BufReader::new(client.stdout.take().unwrap());
    let mut request = |what: &str| {
        writeln!(input, "go").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "200", "{what}");
    };
    request("before the restart");
    let pids = Command::new("ip")
        .args(["netns", "pids", "e2e-n1"])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    assert!(!pids.trim().is_empty(), "n1's agent runs in its namespace");
    for pid in pids.split_whitespace() {
        Command::new("kill").arg(pid).status().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    request("while n1's agent is down");
    let work = format!("{}/e2e", meshauth_lab::STATE_DIR);
    let agent_args: Vec<String> = [
        BIN,
        "--log",
        "warn",
        "agent",
        "run",
        "--node",
        "n1",
        "--trust-domain",
        "demo.meshauth.local",
        "--server",
        &format!("{}:8081", meshauth_lab::SERVER_ADDRESS),
        "--trust-bundle",
        &format!("{work}/bundle.pem"),
        "--data-dir",
        &format!("{work}/n1"),
        "--workload-socket",
        &format!("{work}/n1-workload.sock"),
        "--agent-socket",
        &socks[0],
        "--metrics-listen",
        "127.0.0.1:0",
        "--lab",
        "e2e",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut restarted = lab
        .exec_in("e2e-n1", &agent_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while Command::new(BIN)
        .args(["agent", "healthcheck", "--agent-socket", &socks[0]])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the agent did not come back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    request("after the restart");
    let fresh = "import urllib.request as u; print(u.urlopen('http://demodeployment-1/', timeout=3).status)";
    for i in 0..3 {
        let argv: Vec<String> = ["python3", "-c", fresh]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = lab.exec("client2-2", &argv).unwrap().output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "200",
            "new connection {i} after the restart"
        );
    }
    drop(input);
    let _ = client.wait();
    let _ = restarted.try_wait();

    // Revocation is event-driven: removing the client2 pod on n2 removes the pair's entries on
    // both nodes at once (n2 no longer hosts client2, n1 no longer finds it there).
    let n3 = format!("{}/e2e/n3-agent.sock", meshauth_lab::STATE_DIR);
    let auth_count = || -> usize {
        let out = Command::new(BIN)
            .args([
                "auth",
                "list",
                "-o",
                "json",
                "--agent-socket",
                &socks[0],
                "--agent-socket",
                &socks[1],
                "--agent-socket",
                &n3,
            ])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(auth_count(), 2);
    let admin = format!("{}/e2e/server-admin.sock", meshauth_lab::STATE_DIR);
    let t = std::time::Instant::now();
    // As an orchestrator does: the control plane deletes the pod, the node tears it down.
    let del = Command::new(BIN)
        .args(["pod", "delete", "client2-2", "--admin-socket", &admin])
        .output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    lab.remove_pod("client2-2").unwrap();
    while auth_count() > 0 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "entries still present"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let revoked_in = t.elapsed();
    eprintln!("revoked on both nodes in {revoked_in:?}");

    for node in ["n1", "n2"] {
        let mut dp = meshauth_datapath::Datapath::load(&meshauth_datapath::Datapath::pin_dir_for(
            &format!("e2e-{node}"),
        ))
        .unwrap();
        assert!(
            dp.auth_entries().unwrap().is_empty(),
            "node {node}: the kernel entry is gone too"
        );
    }

    // Deleting the policy that required authentication revokes the entries too: authenticate
    // client2-3 (n3) with demodeployment-1 (n1), then delete the policy.
    let get = "import urllib.request as u; print(u.urlopen('http://demodeployment-1/', timeout=5).status)";
    let argv: Vec<String> = ["python3", "-c", get]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ok = lab.exec("client2-3", &argv).unwrap().output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "200");
    let t = std::time::Instant::now();
    while auth_count() < 2 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(3),
            "the new pair was not recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let t = std::time::Instant::now();
    let del = Command::new(BIN)
        .args([
            "policy",
            "delete",
            "demo1-allow-client2-auth",
            "--admin-socket",
            &admin,
        ])
        .output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    while auth_count() > 0 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "entries still present after the policy went"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("revoked after the policy deletion in {:?}", t.elapsed());

    lab.down().unwrap();
    let (_, live) = lab.status().unwrap();
    assert!(live.is_empty());
}

#[test]
fn short_svid_lifetimes_reauthenticate_without_a_failed_request() {
    if !meshauth_test_support::require_root("the end-to-end tests (lab, eBPF)") {
        return;
    }
    let lab = meshauth_lab::Lab::new("rot").unwrap();
    let _down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log",
            "warn",
            "demo",
            "--lab",
            "rot",
            "--keep",
            "--svid-ttl",
            "12s",
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
    assert_eq!(result["requests"][1]["status"], 200, "{result}");

    // 20 s of requests, a new connection every 200 ms, across several SVID rotations.
    let loop_py = r#"
import time, urllib.request
ok = fail = 0
end = time.monotonic() + 20
while time.monotonic() < end:
    try:
        urllib.request.urlopen("http://demodeployment-1/", timeout=2).read()
        ok += 1
    except Exception:
        fail += 1
    time.sleep(0.2)
print(ok, fail)
"#;
    let argv: Vec<String> = ["python3", "-c", loop_py]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = lab.exec("client2-2", &argv).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let counts: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{text}");
    assert!(counts[0] > 40, "{text}");
    assert_eq!(counts[1], 0, "no request may fail across rotations: {text}");

    // The pair was authenticated again with the rotated SVIDs (by either side, more than once;
    // the entries live at most 12 s, so the 20 s of requests above depended on it).
    let n1 = format!("{}/rot/n1-agent.sock", meshauth_lab::STATE_DIR);
    let n2 = format!("{}/rot/n2-agent.sock", meshauth_lab::STATE_DIR);
    let out = Command::new(BIN)
        .args([
            "observe",
            "-o",
            "json",
            "--verdict",
            "SUCCEEDED",
            "--agent-socket",
            &n1,
            "--agent-socket",
            &n2,
        ])
        .output()
        .unwrap();
    let initiated = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|f| f["flow"]["extensions"]["meshauth"]["reason"] == "")
        .count();
    assert!(
        initiated >= 2,
        "expected re-authentication, saw {initiated} handshake(s)"
    );
    lab.down().unwrap();
}
