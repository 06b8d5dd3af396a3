//! From `connect()` to the first echoed byte, for new pairs (root only): p50/p99 over 60 pairs.
//!
//! `cargo bench -p meshauth-cli --bench first_byte`
//!
//! On the demo's three-node lab, 60 client pods on n1, each of its own identity
//! (`app=fbc<i>,role=fbclient`), and a TCP echo server (`app=fbecho`, port 7) on n2. Their
//! egress toward the echo server requires authentication. Each client, one at a time, opens a
//! connection, sends one byte and waits for it to come back; the time from just before
//! `connect()` to the byte's return is measured inside the client pod. Three cases, in one
//! run:
//!
//! - **held**: the first connection of each new pair (agents as `meshauth demo` starts them:
//!   the SYN is held on n1 while the agents authenticate the pair, then released);
//! - **authenticated**: a second connection of the same pairs, whose entries exist now;
//! - **pre-authenticated**: the first connection of new pairs on a second lab, whose agents
//!   run with `--pre-authenticate` (`meshauth demo --pre-authenticate`): the bench waits until
//!   n1's agent holds the pairs' entries, then connects.
//!
//! Each client also reports its TCP retransmissions (`/proc/net/snmp` of its pod): a held SYN
//! that was dropped instead would show one, and a second of latency.

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
/// New pairs per case.
const PAIRS: usize = 60;
/// p99 target of the held case on this machine.
const HELD_P99_TARGET_MS: f64 = 5.0;

const ECHO_SERVER: &str = r#"
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(64)
            if not d:
                return
            self.request.sendall(d)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 7), H).serve_forever()
"#;

/// Prints `<ms> <retransmissions>` for one connect + one echoed byte to argv[1]:7.
const CLIENT: &str = r#"
import socket, sys, time
def retrans():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])
r0 = retrans()
s = socket.socket()
s.settimeout(5)
t = time.monotonic()
s.connect((sys.argv[1], 7))
s.sendall(b"x")
assert s.recv(1) == b"x"
took = time.monotonic() - t
s.close()
print(f"{took * 1e3:.3f} {retrans() - r0}")
"#;

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fbclients-to-echo-auth
spec:
  endpointSelector:
    matchLabels:
      role: fbclient
  egress:
  - toEndpoints:
    - matchLabels:
        app: fbecho
    authentication:
      mode: required
"#;

struct Lab {
    lab: meshauth_lab::Lab,
    name: String,
    echo: Option<std::process::Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.echo.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Lab {
    fn work(&self) -> String {
        format!("{}/{}", meshauth_lab::STATE_DIR, self.name)
    }

    fn cli(&self, args: &[&str]) -> String {
        let admin = format!("{}/server-admin.sock", self.work());
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshauth {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn add_pod(&self, name: &str, node: &str, labels: &str) {
        self.cli(&["pod", "create", name, "--node", node, "--labels", labels]);
        let out = Command::new(BIN)
            .args(["lab", "--lab", &self.name, "pod", "add", name])
            .args(["--node", node, "--labels", labels])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab pod add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ip_of(&self, pod: &str) -> String {
        let state = self.lab.state().unwrap().unwrap();
        state
            .pods
            .into_iter()
            .find(|p| p.name == pod)
            .unwrap()
            .ip
            .to_string()
    }

    /// The demo's lab (`extra`: more `demo` flags), 60 clients on n1, the echo server on n2,
    /// the policy, and every pod reported by its node.
    fn up(name: &str, extra: &[&str]) -> Lab {
        let t = Instant::now();
        let lab = meshauth_lab::Lab::new(name).unwrap();
        let mut l = Lab {
            lab,
            name: name.to_owned(),
            echo: None,
        };
        let out = Command::new(BIN)
            .args([
                "--log", "warn", "demo", "--lab", name, "--keep", "-o", "json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "demo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let policy = format!("{}/first-byte-policy.yaml", l.work());
        std::fs::write(&policy, POLICY).unwrap();
        l.cli(&["policy", "apply", "-f", &policy]);
        l.add_pod("fbecho-2", "n2", "app=fbecho");
        for i in 0..PAIRS {
            l.add_pod(
                &format!("fbc-{i}"),
                "n1",
                &format!("app=fbc{i},role=fbclient"),
            );
        }
        l.echo = Some(
            l.lab
                .exec("fbecho-2", &argv(&["python3", "-c", ECHO_SERVER]))
                .unwrap()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pods: serde_json::Value =
                serde_json::from_str(&l.cli(&["pod", "list", "-o", "json"])).unwrap();
            let missing = pods
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["reported"] != true)
                .count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} pods not reported after 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Every node's ipcache and policy follow the sync.
        std::thread::sleep(Duration::from_secs(2));
        eprintln!(
            "first_byte: lab {name} with {PAIRS} clients ready in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        l
    }

    /// How many of the clients' pairs n1's agent holds an entry for.
    fn n1_pairs(&self) -> usize {
        let sock = format!("{}/n1-agent.sock", self.work());
        let out = Command::new(BIN)
            .args(["auth", "list", "-o", "json", "--agent-socket", &sock])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let text = v.to_string();
        (0..PAIRS)
            .filter(|i| text.contains(&format!("\"fbc{i}\"")))
            .count()
    }

    /// One connect + echoed byte from each client, one at a time: (ms, retransmissions).
    fn measure(&self) -> Vec<(f64, u64)> {
        let echo = self.ip_of("fbecho-2");
        (0..PAIRS)
            .map(|i| {
                let out = self
                    .lab
                    .exec(
                        &format!("fbc-{i}"),
                        &argv(&["python3", "-c", CLIENT, &echo]),
                    )
                    .unwrap()
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                let mut w = text.split_whitespace();
                match (
                    w.next().and_then(|t| t.parse().ok()),
                    w.next().and_then(|r| r.parse().ok()),
                ) {
                    (Some(ms), Some(r)) => (ms, r),
                    _ => panic!(
                        "client fbc-{i} failed: {text} {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                }
            })
            .collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `name: p50 … p99 … max …; retransmissions N` for the samples.
fn report(name: &str, samples: &[(f64, u64)]) -> (f64, f64, u64) {
    let mut ms: Vec<f64> = samples.iter().map(|s| s.0).collect();
    ms.sort_by(f64::total_cmp);
    let retrans: u64 = samples.iter().map(|s| s.1).sum();
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!(
        "   {name:<18} p50 {p50:6.2} ms  p99 {p99:7.2} ms  max {:7.2} ms  ({} pairs, {retrans} TCP retransmissions)",
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len()
    );
    (p50, p99, retrans)
}

fn main() {
    if !meshauth_test_support::is_root() {
        eprintln!("first_byte: needs root (lab namespaces, eBPF)");
        std::process::exit(1);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let held_lab = Lab::up("fbyte", &[]);
    let held = held_lab.measure();
    let authenticated = held_lab.measure();
    assert_eq!(held_lab.n1_pairs(), PAIRS, "every held pair authenticated");
    drop(held_lab);

    let pre_lab = Lab::up("fbpre", &["--pre-authenticate"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pre_lab.n1_pairs() < PAIRS {
        assert!(
            Instant::now() < deadline,
            "n1 pre-authenticated only {} of {PAIRS} pairs in 30 s",
            pre_lab.n1_pairs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pre = pre_lab.measure();
    drop(pre_lab);

    println!(
        "first_byte: connect() to the first echoed byte, {PAIRS} pairs per case, n1 -> n2 (load average at the start: {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (_, _, _) = report("authenticated", &authenticated);
    let (_, held_p99, held_retrans) = report("new pair, held", &held);
    let (_, _, _) = report("pre-authenticated", &pre);
    println!(
        "   held p99 target <= {HELD_P99_TARGET_MS} ms: {}; held SYNs retransmitted: {held_retrans}",
        if held_p99 <= HELD_P99_TARGET_MS {
            "met"
        } else {
            "MISSED"
        }
    );
}
