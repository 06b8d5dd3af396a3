//! Mutual authentication end to end, on the lab (root only): a server on the underlay, an
//! agent in each node enforcing policy on its pods, the walkthrough's policies applied.
//! client1 reaches the demo app, client2 reaches it once the two agents have authenticated the
//! pair (both nodes hold the auth entry), client3 is denied.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshauth_lab::Lab;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const TD: &str = "e2e.test";
const WALKTHROUGH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../meshauth-policy/tests/fixtures/walkthrough.yaml"
);

const ECHO: &str = r#"
import socket, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 80)); t.listen(64)
print("ready", flush=True)
while True:
    c, _ = t.accept()
    def echo(c=c):
        for d in iter(lambda: c.recv(4096), b""):
            c.sendall(d)
    threading.Thread(target=echo, daemon=True).start()
"#;

const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=float(sys.argv[2]))
s.sendall(b"x"); assert s.recv(1) == b"x"
"#;

struct Cluster {
    lab: Lab,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

impl Cluster {
    fn admin(&self) -> String {
        self.dir.path().join("admin.sock").display().to_string()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &self.admin()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn try_cli(&self, args: &[&str]) -> bool {
        Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &self.admin()])
            .output()
            .unwrap()
            .status
            .success()
    }

    fn spawn(&mut self, netns: &str, args: &[&str], log: &str) {
        let argv: Vec<String> = std::iter::once(BIN.to_string())
            .chain(args.iter().map(|s| s.to_string()))
            .collect();
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        let child = self
            .lab
            .exec_in(netns, &argv)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn connects(&self, from: &str, to: std::net::Ipv4Addr, timeout_s: &str) -> bool {
        let argv: Vec<String> = ["python3", "-c", CLIENT, &to.to_string(), timeout_s]
            .iter()
            .map(|s| s.to_string())
            .collect();
        self.lab
            .exec(from, &argv)
            .unwrap()
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn walkthrough_end_to_end() {
    if !meshauth_lab::can_run() {
        eprintln!("skipping: the end-to-end test needs root (lab, eBPF)");
        return;
    }
    let lab = Lab::new("e2e").unwrap();
    let _ = lab.down();
    lab.up(2).unwrap();
    let mut c = Cluster {
        lab,
        children: vec![],
        dir: tempfile::tempdir().unwrap(),
    };
    let label = |app: &str| BTreeMap::from([("app".to_string(), app.to_string())]);
    let demo = c
        .lab
        .add_pod("demo", "n1", label("demodeployment"))
        .unwrap();
    for (pod, app) in [
        ("client1", "client1"),
        ("client2", "client2"),
        ("client3", "client3"),
    ] {
        c.lab.add_pod(pod, "n2", label(app)).unwrap();
    }

    // The server on the underlay.
    let server = format!("{}:8081", meshauth_lab::SERVER_ADDRESS);
    let (admin, data) = (c.admin(), c.dir.path().join("server").display().to_string());
    c.spawn(
        "e2e-ul",
        &[
            "server",
            "run",
            "--trust-domain",
            TD,
            "--listen",
            &server,
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--admin-socket",
            &admin,
        ],
        "server.log",
    );
    wait_until(Duration::from_secs(20), "server health", || {
        c.try_cli(&["server", "healthcheck"])
    });
    let bundle = c.dir.path().join("bundle.pem");
    std::fs::write(&bundle, c.cli(&["bundle", "show"])).unwrap();
    c.cli(&["policy", "apply", "-f", WALKTHROUGH]);

    // An agent per node, in the node's namespace, enforcing on its pods.
    for node in ["n1", "n2"] {
        let token = c
            .cli(&["token", "generate", "--node", node])
            .trim()
            .to_string();
        let d = c.dir.path().display().to_string();
        c.spawn(
            &format!("e2e-{node}"),
            &[
                "agent",
                "run",
                "--node",
                node,
                "--trust-domain",
                TD,
                "--server",
                &server,
                "--join-token",
                &token,
                "--trust-bundle",
                &bundle.display().to_string(),
                "--data-dir",
                &format!("{d}/{node}"),
                "--workload-socket",
                &format!("{d}/{node}-w.sock"),
                "--agent-socket",
                &format!("{d}/{node}-a.sock"),
                "--metrics-listen",
                "127.0.0.1:0",
                "--lab",
                "e2e",
            ],
            &format!("agent-{node}.log"),
        );
    }
    wait_until(Duration::from_secs(30), "4 endpoints registered", || {
        let eps: serde_json::Value =
            serde_json::from_str(&c.cli(&["endpoint", "list", "-o", "json"])).unwrap();
        eps.as_array().unwrap().len() == 4
    });

    let argv: Vec<String> = ["python3", "-c", ECHO]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut echo = c
        .lab
        .exec("demo", &argv)
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(echo.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    c.children.push(echo);

    // Policy reaches the datapath: client1 allowed, client3 denied.
    wait_until(Duration::from_secs(15), "client1 allowed", || {
        c.connects("client1", demo.ip, "1")
    });
    assert!(
        !c.connects("client3", demo.ip, "1"),
        "client3 has no allow rule"
    );

    // client2 needs authentication: the first SYN is dropped, the agents authenticate the pair,
    // the retransmitted SYN passes.
    let t = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "client2 allowed after authentication",
        || c.connects("client2", demo.ip, "3"),
    );
    eprintln!("client2's first connection took {:?}", t.elapsed());
    for node in ["n1", "n2"] {
        let pins = meshauth_datapath::Datapath::pin_dir_for(&format!("e2e-{node}"));
        let mut dp = meshauth_datapath::Datapath::load(&pins).unwrap();
        let entries = dp.auth_entries().unwrap();
        if entries.is_empty() {
            for n in ["n1", "n2"] {
                let log = std::fs::read_to_string(c.dir.path().join(format!("agent-{n}.log")))
                    .unwrap_or_default();
                eprintln!(
                    "--- agent {n} ---\n{}",
                    log.lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        assert!(
            !entries.is_empty(),
            "node {node} holds the auth entry of the pair"
        );
    }
}
