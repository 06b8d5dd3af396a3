//! An agent that cannot enforce says so (root only: it loads the datapath): with the handshake
//! port taken, `/readyz` answers 503 naming the enforcement condition and the reason, and the
//! log has the reason too. When the port is free again, enforcement restarts by itself and the
//! agent becomes ready.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{BIN, ServerProcess, TD, eventually, free_port};

/// `GET /readyz`: (status code, body).
fn readyz(port: u16) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((code, body))
}

/// Kills the agent and removes its pins, also when an assertion fails.
struct Cleanup(std::process::Child, std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = meshauth_datapath::Datapath::remove_pins(&self.1);
    }
}

#[test]
fn an_agent_whose_handshake_port_is_taken_is_not_ready_and_says_why() {
    if !meshauth_test_support::require_root("the agent readiness test (eBPF datapath)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    std::fs::copy(dir.path().join("bundle.pem"), dir.path().join("trust.pem")).unwrap();
    let token = server.token("n1");
    // Something else holds the handshake port on the node address.
    let squatter = std::net::TcpListener::bind("127.0.0.1:4250").unwrap();
    let metrics = free_port();
    let pins = meshauth_datapath::Datapath::pin_dir_for("rdy-n1");
    let log = dir.path().join("agent.log");
    let agent = Command::new(BIN)
        .args(["agent", "run", "--node", "n1", "--trust-domain", TD])
        .args(["--server", &server.addr()])
        .arg("--trust-bundle")
        .arg(dir.path().join("trust.pem"))
        .arg("--data-dir")
        .arg(dir.path().join("agent-data"))
        .arg("--workload-socket")
        .arg(dir.path().join("workload.sock"))
        .arg("--agent-socket")
        .arg(dir.path().join("agent.sock"))
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--lab", "rdy", "--node-address", "127.0.0.1"])
        .env("MESHAUTH_JOIN_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _cleanup = Cleanup(agent, pins.clone());
    let body = eventually(
        Duration::from_secs(30),
        "/readyz names the taken port",
        || match readyz(metrics) {
            Some((503, body)) if body.contains("cannot listen on 127.0.0.1:4250") => Some(body),
            _ => None,
        },
    );
    assert!(body.contains("enforcement:"), "{body}");
    let health = Command::new(BIN)
        .args(["agent", "healthcheck", "--agent-socket"])
        .arg(dir.path().join("agent.sock"))
        .output()
        .unwrap();
    assert!(
        !health.status.success(),
        "healthcheck fails while not ready"
    );
    let err = String::from_utf8_lossy(&health.stderr);
    assert!(
        err.contains("not ready") && err.contains("cannot listen on 127.0.0.1:4250"),
        "{err}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("enforcement") && logged.contains("cannot listen on 127.0.0.1:4250"),
        "the failure is logged with the task's name and the reason:\n{logged}"
    );

    // The port is free again: enforcement restarts with backoff and the agent becomes ready.
    drop(squatter);
    let mut last = None;
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        last = readyz(metrics);
        if matches!(last, Some((200, _))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        matches!(last, Some((200, _))),
        "not ready 60 s after the port was freed: {last:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let health = Command::new(BIN)
        .args(["agent", "healthcheck", "--agent-socket"])
        .arg(dir.path().join("agent.sock"))
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
}

#[test]
fn an_agent_that_cannot_load_the_datapath_is_not_ready_and_says_why() {
    if !meshauth_test_support::require_root("the agent readiness test (eBPF datapath)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    let token = server.token("n1");
    // A map of another shape is pinned where the datapath's auth map belongs (incompatible
    // state left behind): loading must fail.
    // On a fresh machine nothing has mounted bpffs yet (the agent would, as it loads).
    meshauth_datapath::ensure_bpffs().expect("mount bpffs at /sys/fs/bpf");
    let pins = meshauth_datapath::Datapath::pin_dir_for("rdyb-n1");
    let _ = meshauth_datapath::Datapath::remove_pins(&pins);
    let abi = pins.join(format!("abi-v{}", meshauth_datapath::ABI_VERSION));
    std::fs::create_dir_all(&abi).unwrap();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(abi.join("ma_auth"))
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "ma_auth",
        ])
        .status()
        .unwrap();
    assert!(
        made.success(),
        "bpftool map create (Debian package bpftool)"
    );
    let metrics = free_port();
    let log = dir.path().join("agent.log");
    let agent = Command::new(BIN)
        .args(["agent", "run", "--node", "n1", "--trust-domain", TD])
        .args(["--server", &server.addr()])
        .arg("--trust-bundle")
        .arg(dir.path().join("bundle.pem"))
        .arg("--data-dir")
        .arg(dir.path().join("agent-data"))
        .arg("--workload-socket")
        .arg(dir.path().join("workload.sock"))
        .arg("--agent-socket")
        .arg(dir.path().join("agent.sock"))
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--lab", "rdyb", "--node-address", "127.0.0.1"])
        .env("MESHAUTH_JOIN_TOKEN", &token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let cleanup = Cleanup(agent, pins.clone());
    let body = eventually(
        Duration::from_secs(30),
        "/readyz names the datapath",
        || match readyz(metrics) {
            Some((503, body)) if body.contains("cannot load the datapath") => Some(body),
            _ => None,
        },
    );
    assert!(body.contains("enforcement:"), "{body}");
    let health = Command::new(BIN)
        .args(["agent", "healthcheck", "--agent-socket"])
        .arg(dir.path().join("agent.sock"))
        .output()
        .unwrap();
    assert!(!health.status.success());
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("cannot load the datapath"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("cannot load the datapath"), "{logged}");
    drop(cleanup);
    assert!(!pins.exists(), "the pins are removed");
}
