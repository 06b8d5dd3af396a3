//! Policy change to enforced on every lab node: p50/p99 over 20+ changes (root only).
//!
//! `cargo bench -p meshauth-cli --bench policy_change`
//!
//! On the demo's three-node lab, a prober in `client1-<k>` opens a new TCP connection to
//! `demodeployment-<k>` (same node k) every few milliseconds and reports each attempt's start
//! time and result. The benchmark alternately applies and deletes an `ingressDeny` of client1
//! on the demo app, and for each change measures, per node, the time from just before the
//! `meshauth policy apply|delete` command starts to the start of the first attempt that shows
//! the new verdict (an upper bound: the attempt before it still saw the old one). A change is
//! enforced on every node when the slowest node shows it.

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const LAB: &str = "pchg";
const CHANGES: usize = 24;
const NODES: [&str; 3] = ["1", "2", "3"];

const PROBER: &str = r#"
import socket, sys, time
while True:
    t = time.time()
    s = socket.socket(); s.settimeout(0.01)
    try:
        s.connect((sys.argv[1], 80)); ok = 1
    except Exception:
        ok = 0
    s.close()
    print(f"{t:.6f} {ok}", flush=True)
    time.sleep(0.003)
"#;

const DENY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-deny-client1
spec:
  endpointSelector:
    matchLabels:
      app: demodeployment
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: client1
"#;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Down(meshauth_lab::Lab);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn main() {
    if !meshauth_test_support::is_root() {
        eprintln!("policy_change: needs root (lab namespaces, eBPF)");
        std::process::exit(1);
    }
    let lab = meshauth_lab::Lab::new(LAB).unwrap();
    let _down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log", "warn", "demo", "--lab", LAB, "--keep", "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = format!("{}/{LAB}", meshauth_lab::STATE_DIR);
    let admin = format!("{work}/server-admin.sock");
    let deny_file = format!("{work}/bench-deny.yaml");
    std::fs::write(&deny_file, DENY).unwrap();

    // One prober per node; (node index, attempt start, ok) on one channel.
    let (tx, rx) = mpsc::channel::<(usize, f64, bool)>();
    let mut probers = Vec::new();
    for (i, k) in NODES.iter().enumerate() {
        let argv: Vec<String> = ["python3", "-c", PROBER, &format!("demodeployment-{k}")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut child = lab
            .exec(&format!("client1-{k}"), &argv)
            .unwrap()
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut w = line.split_whitespace();
                if let (Some(t), Some(ok)) = (w.next(), w.next())
                    && let Ok(t) = t.parse::<f64>()
                    && tx.send((i, t, ok == "1")).is_err()
                {
                    return;
                }
            }
        });
        probers.push(child);
    }

    // Wait until every node's prober sees the allowed state.
    let wait_for = |want: bool, since: f64, rx: &mpsc::Receiver<(usize, f64, bool)>| {
        let mut seen: [Option<f64>; 3] = [None; 3];
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while seen.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "not every node showed {want} within 15 s: {seen:?}"
            );
            if let Ok((i, t, ok)) = rx.recv_timeout(left)
                && ok == want
                && t >= since
                && seen[i].is_none()
            {
                seen[i] = Some(t - since);
            }
        }
        seen.map(|s| s.unwrap_or(f64::NAN))
    };
    wait_for(true, now(), &rx);

    let mut per_node = Vec::new();
    let mut every_node = Vec::new();
    for c in 0..CHANGES {
        let deny = c % 2 == 0;
        // Drain what arrived before the change.
        while rx.try_recv().is_ok() {}
        let t0 = now();
        let status = if deny {
            Command::new(BIN)
                .args([
                    "policy",
                    "apply",
                    "-f",
                    &deny_file,
                    "--admin-socket",
                    &admin,
                ])
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new(BIN)
                .args([
                    "policy",
                    "delete",
                    "bench-deny-client1",
                    "--admin-socket",
                    &admin,
                ])
                .stdout(Stdio::null())
                .status()
        }
        .unwrap();
        assert!(status.success());
        let seen = wait_for(!deny, t0, &rx);
        per_node.extend(seen);
        every_node.push(seen.iter().cloned().fold(0.0, f64::max));
        std::thread::sleep(Duration::from_millis(300));
    }
    for mut p in probers {
        let _ = p.kill();
        let _ = p.wait();
    }
    per_node.sort_by(f64::total_cmp);
    every_node.sort_by(f64::total_cmp);
    println!(
        "policy_change: {CHANGES} changes (apply/delete of an ingressDeny), 3 nodes; from the command's start to enforced: per node p50 {:.0} ms p99 {:.0} ms; on every node p50 {:.0} ms p99 {:.0} ms (max {:.0} ms)",
        percentile(&per_node, 0.5) * 1e3,
        percentile(&per_node, 0.99) * 1e3,
        percentile(&every_node, 0.5) * 1e3,
        percentile(&every_node, 0.99) * 1e3,
        every_node.last().copied().unwrap_or(f64::NAN) * 1e3,
    );
    lab.down().unwrap();
}
