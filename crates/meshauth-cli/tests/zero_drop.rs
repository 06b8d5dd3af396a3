//! No dropped first packet (root only), on the demo's lab:
//! - with pre-authentication, client2's first request to the demo app (whose ingress policy
//!   requires authentication) needs no retransmission: the agents authenticated the pair before
//!   its first packet;
//! - without it, client2's first SYN is held on its own node for the authentication the demo
//!   app's ingress requires, and so is the first SYN of a pair whose *egress* policy requires
//!   it (marked by the datapath, queued by the node, released once the agents authenticated
//!   the pair), again without a retransmission;
//! - the same holds for a single UDP datagram and a single ICMP echo request, which nothing
//!   would send again: each gets its answer;
//! - a held datagram of a pair whose handshake fails (`authentication.mode: test-always-fail`)
//!   is dropped, and the flow log says why;
//! - a burst beyond a pair's hold queue is dropped as overflow, counted and shown.
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

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Sends one UDP datagram from `pod` to `to`:7 and waits up to 4 s for its echo: whether it came.
fn udp_once(lab: &meshauth_lab::Lab, pod: &str, to: &str) -> bool {
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(4)\ns.sendto(b'ping', ('{to}', 7))\ntry:\n    print(s.recvfrom(64)[0].decode())\nexcept socket.timeout:\n    print('timeout')"
    );
    let out = lab
        .exec(pod, &argv(&["python3", "-c", &py]))
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "ping"
}

/// A UDP echo server on port 7 of `pod` (killed on drop).
struct UdpEcho(std::process::Child);

impl UdpEcho {
    fn start(lab: &meshauth_lab::Lab, pod: &str) -> UdpEcho {
        let py = "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 7))\nwhile True:\n    d, a = s.recvfrom(64)\n    s.sendto(d, a)";
        let child = lab
            .exec(pod, &argv(&["python3", "-c", py]))
            .unwrap()
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        UdpEcho(child)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The flow log of one node's agent, as `observe -o json` prints it.
fn flows_of(work: &str, node: &str) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args([
            "observe",
            "-o",
            "json",
            "--agent-socket",
            &format!("{work}/{node}-agent.sock"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["flow"].clone())
        .collect()
}

/// The flows from `src` to `dst` (addresses) of protocol `l4` (`UDP`, `ICMPv4`) in `flows`.
fn between<'a>(
    flows: &'a [serde_json::Value],
    src: &str,
    dst: &str,
    l4: &str,
) -> Vec<&'a serde_json::Value> {
    flows
        .iter()
        .filter(|f| {
            f["IP"]["source"] == src && f["IP"]["destination"] == dst && f["l4"].get(l4).is_some()
        })
        .collect()
}

fn apply_policy(work: &str, name: &str, yaml: &str) {
    let path = format!("{work}/{name}.yaml");
    std::fs::write(&path, yaml).unwrap();
    let admin = format!("{work}/server-admin.sock");
    let applied = Command::new(BIN)
        .args(["policy", "apply", "-f", &path, "--admin-socket", &admin])
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
}

/// `app`'s egress toward `to` requires `mode` (`required`, `test-always-fail`).
fn egress_auth(name: &str, app: &str, to: &str, mode: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {app}\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        app: {to}\n    authentication:\n      mode: {mode}\n"
    )
}

fn pod_ip(lab: &meshauth_lab::Lab, pod: &str) -> String {
    lab.state()
        .unwrap()
        .unwrap()
        .pods
        .into_iter()
        .find(|p| p.name == pod)
        .unwrap_or_else(|| panic!("no pod {pod} in the lab"))
        .ip
        .to_string()
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
    // The demo itself: the demo app's *ingress* requires authentication of client2, so
    // client2-2's first SYN is held on its own node (n2) and released, never dropped on n1.
    let demo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(demo["requests"][1]["from"], "client2-2");
    assert_eq!(demo["requests"][1]["status"], 200, "{demo}");
    assert_eq!(
        retransmits(&lab, "client2-2"),
        0,
        "client2's first SYN was held, not dropped: {demo}"
    );
    let client2: Vec<&serde_json::Value> = demo["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["flow"])
        .filter(|f| f["source"]["pod_name"] == "client2-2")
        .collect();
    assert!(
        client2
            .iter()
            .any(|f| f["verdict"] == "HELD" && f["node_name"] == "n2"),
        "{client2:#?}"
    );
    assert!(
        !client2.iter().any(|f| f["verdict"] == "DROPPED"),
        "{client2:#?}"
    );
    assert!(
        demo["story"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("was held on n2"))),
        "{demo}"
    );
    eprintln!(
        "demo, client2's held first request: {} ms",
        demo["requests"][1]["ms"]
    );
    let work = format!("{}/zdhold", meshauth_lab::STATE_DIR);
    apply_policy(
        &work,
        "client1-egress",
        &egress_auth(
            "client1-egress-auth",
            "client1",
            "demodeployment",
            "required",
        ),
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
    let n3 = flows_of(&work, "n3");
    assert!(n3.iter().any(|f| f["verdict"] == "HELD"), "{n3:#?}");
    assert!(
        n3.iter().any(|f| f["extensions"]["meshauth"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("released after authentication"))),
        "{n3:#?}"
    );

    // 3. UDP and ICMP: client1's egress toward client3 requires authentication (no policy
    //    selects client3's ingress). One datagram from client1-2 (n2) to client3-1 (n1), one
    //    echo request from client1-1 (n1) to client3-2 (n2): new pairs, each held and released
    //    on its sender's node, and answered although it was sent once.
    apply_policy(
        &work,
        "client1-to-client3",
        &egress_auth("client1-to-client3-auth", "client1", "client3", "required"),
    );
    let _echo = UdpEcho::start(&lab, "client3-1");
    std::thread::sleep(Duration::from_millis(500));
    let (c12, c31) = (pod_ip(&lab, "client1-2"), pod_ip(&lab, "client3-1"));
    assert!(
        udp_once(&lab, "client1-2", &c31),
        "the single held datagram was released and echoed"
    );
    let n2 = flows_of(&work, "n2");
    let udp = between(&n2, &c12, &c31, "UDP");
    assert!(
        udp.iter().any(|f| f["verdict"] == "HELD"),
        "held on n2: {udp:#?}"
    );
    assert!(
        udp.iter().any(|f| f["verdict"] == "FORWARDED"
            && f["extensions"]["meshauth"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("released after authentication"))),
        "released on n2: {udp:#?}"
    );
    let (c11, c32) = (pod_ip(&lab, "client1-1"), pod_ip(&lab, "client3-2"));
    let ping = lab
        .exec("client1-1", &argv(&["ping", "-c", "1", "-W", "4", &c32]))
        .unwrap()
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "the single held echo request was released and answered: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let n1 = flows_of(&work, "n1");
    let icmp = between(&n1, &c11, &c32, "ICMPv4");
    assert!(
        icmp.iter().any(|f| f["verdict"] == "HELD"),
        "held on n1: {icmp:#?}"
    );
    assert!(
        icmp.iter().any(|f| f["verdict"] == "FORWARDED"),
        "released on n1: {icmp:#?}"
    );

    // 4. A handshake that fails: client2's egress toward client3 is `test-always-fail`. The
    //    held datagram from client2-2 (n2) is dropped, not released, and the log says so.
    apply_policy(
        &work,
        "client2-to-client3",
        &egress_auth(
            "client2-to-client3-fail",
            "client2",
            "client3",
            "test-always-fail",
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    let c22 = pod_ip(&lab, "client2-2");
    assert!(
        !udp_once(&lab, "client2-2", &c31),
        "a datagram of a pair that cannot authenticate never arrives"
    );
    let n2 = flows_of(&work, "n2");
    let udp = between(&n2, &c22, &c31, "UDP");
    assert!(
        udp.iter().any(|f| f["verdict"] == "DROPPED"
            && f["extensions"]["meshauth"]["reason"] == "hold: AuthFailed"),
        "dropped on n2 for the failed handshake: {udp:#?}"
    );
    assert!(
        !udp.iter().any(|f| f["verdict"] == "FORWARDED"),
        "never forwarded: {udp:#?}"
    );

    // 5. Overflow: the demo app's egress toward client3 requires authentication, and n1's
    //    agent is stopped, so that demodeployment-3's (n3) handshake toward client3-1 (n1)
    //    cannot finish. A burst of 200 datagrams: the pair's queue takes 64, the rest are
    //    dropped as overflow, counted and shown; then the 64 time out.
    apply_policy(
        &work,
        "demo-to-client3",
        &egress_auth(
            "demo-to-client3-auth",
            "demodeployment",
            "client3",
            "required",
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    let pids = Command::new("ip")
        .args(["netns", "pids", "zdhold-n1"])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!pids.is_empty(), "n1's agent runs in its namespace");
    for pid in &pids {
        Command::new("kill").args(["-STOP", pid]).status().unwrap();
    }
    let burst = format!(
        "import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(200):\n    s.sendto(b'x', ('{c31}', 7))"
    );
    let sent = lab
        .exec("demodeployment-3", &argv(&["python3", "-c", &burst]))
        .unwrap()
        .output()
        .unwrap();
    assert!(sent.status.success());
    std::thread::sleep(Duration::from_millis(3500));
    for pid in &pids {
        Command::new("kill").args(["-CONT", pid]).status().unwrap();
    }
    let d3 = pod_ip(&lab, "demodeployment-3");
    let n3 = flows_of(&work, "n3");
    let udp = between(&n3, &d3, &c31, "UDP");
    let overflowed = udp
        .iter()
        .filter(|f| f["extensions"]["meshauth"]["reason"] == "hold: Overflow")
        .count();
    assert!(
        overflowed >= 100,
        "at least 200 - 64 datagrams beyond the pair's queue are shown dropped as overflow: {overflowed}"
    );
    // The hold's limit and the handshake's are both 3 s: the queued ones go when the first
    // of the two fires (on a loaded machine the handshake's timeout can come first).
    assert!(
        udp.iter().any(|f| {
            let r = &f["extensions"]["meshauth"]["reason"];
            *r == "hold: Timeout" || *r == "hold: AuthFailed"
        }),
        "the queued ones time out: {udp:#?}"
    );
    assert!(
        !udp.iter().any(|f| f["verdict"] == "FORWARDED"),
        "none of them is released: {udp:#?}"
    );
    lab.down().unwrap();
}
