//! Test support: real `meshauth server run` and `meshauth agent run` processes on loopback and
//! temporary sockets, stopped (and waited for) when dropped.

#![allow(dead_code, unreachable_pub, reason = "shared by several test files")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub use meshauth_test_support::eventually;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
pub const TD: &str = "cli.test";

/// A free loopback port (bound then released; fine for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log_file(path: PathBuf) -> Stdio {
    Stdio::from(std::fs::File::create(path).unwrap())
}

pub struct ServerProcess {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
}

impl ServerProcess {
    /// Starts a server in `dir` on a free port and waits until it is healthy.
    pub fn start(dir: &Path) -> ServerProcess {
        Self::start_on(dir, free_port(), &[])
    }

    /// Starts a server on `port` with extra flags.
    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> ServerProcess {
        let socket = dir.join("admin.sock");
        let child = Command::new(BIN)
            .args(["server", "run", "--trust-domain", TD])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("server-data"))
            .arg("--admin-socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file(dir.join("server.log")))
            .spawn()
            .expect("server starts");
        let server = ServerProcess {
            child,
            dir: dir.to_owned(),
            socket,
            port,
        };
        eventually(Duration::from_secs(20), "server health", || {
            server
                .cli(&["server", "healthcheck"])
                .status
                .success()
                .then_some(())
        });
        server
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.socket)
            .output()
            .expect("cli runs")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        one_line_error(&out)
    }

    /// Writes the PEM bundle to a file for agents.
    pub fn bundle_file(&self) -> PathBuf {
        let path = self.dir.join("bundle.pem");
        std::fs::write(&path, self.ok(&["bundle", "show"])).unwrap();
        path
    }

    pub fn token(&self, node: &str) -> String {
        self.ok(&["token", "generate", "--node", node])
            .trim()
            .to_string()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) {
        terminate(&mut self.child, "server");
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn terminate(child: &mut Child, what: &str) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = eventually(
        Duration::from_secs(10),
        &format!("{what} to stop on SIGTERM"),
        || child.try_wait().unwrap(),
    );
    assert!(status.success(), "{what} exited with {status}");
}

pub fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected one error line, got: {stderr}"
    );
    stderr
}

pub struct AgentProcess {
    child: Child,
    pub workload_socket: PathBuf,
    pub admin_socket: PathBuf,
}

impl AgentProcess {
    /// Starts the agent of node `node` with its state in `dir`, waiting until it answers.
    pub fn start(
        dir: &Path,
        node: &str,
        server: &ServerProcess,
        token: Option<&str>,
    ) -> AgentProcess {
        match token {
            Some(t) => Self::start_with(dir, node, server, &["--join-token", t]),
            None => Self::start_with(dir, node, server, &[]),
        }
    }

    /// [`AgentProcess::start`] with other credential flags (e.g. `--x509pop-cert`).
    pub fn start_with(
        dir: &Path,
        node: &str,
        server: &ServerProcess,
        extra: &[&str],
    ) -> AgentProcess {
        let workload_socket = dir.join(format!("{node}-workload.sock"));
        let admin_socket = dir.join(format!("{node}-agent.sock"));
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "run", "--node", node, "--trust-domain", TD])
            .args(["--server", &server.addr()])
            .arg("--trust-bundle")
            .arg(dir.join("bundle.pem"))
            .arg("--data-dir")
            .arg(dir.join(format!("{node}-data")))
            .arg("--workload-socket")
            .arg(&workload_socket)
            .arg("--agent-socket")
            .arg(&admin_socket)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log_file(dir.join(format!("{node}-agent.log"))));
        cmd.args(extra);
        let child = cmd.spawn().expect("agent starts");
        let agent = AgentProcess {
            child,
            workload_socket,
            admin_socket,
        };
        eventually(Duration::from_secs(20), "agent health", || agent.health());
        agent
    }

    /// `meshauth agent healthcheck -o json`, if the agent answers.
    pub fn health(&self) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["agent", "healthcheck", "-o", "json", "--agent-socket"])
            .arg(&self.admin_socket)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn svids(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["agent", "svids", "-o", "json", "--agent-socket"])
            .arg(&self.admin_socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.workload_socket.display())
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        terminate(&mut self.child, "agent");
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This test process's uid (from procfs: this crate has no `unsafe`, so no getuid(2)).
pub fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The agent of node n1 given a `--server` list (replicas, or several paths to one server),
/// with a known metrics port; [`AgentProcess`] passes the one server it was given.
pub struct ListAgent {
    child: Child,
    admin_socket: PathBuf,
    metrics_port: u16,
    log: PathBuf,
}

impl ListAgent {
    pub fn start(dir: &Path, servers: &str, extra: &[&str]) -> ListAgent {
        let admin_socket = dir.join("n1-agent.sock");
        let metrics_port = free_port();
        let log = dir.join("n1-agent.log");
        let child = Command::new(BIN)
            .args(["agent", "run", "--node", "n1", "--trust-domain", TD])
            .args(["--server", servers])
            .arg("--trust-bundle")
            .arg(dir.join("bundle.pem"))
            .arg("--data-dir")
            .arg(dir.join("n1-data"))
            .arg("--workload-socket")
            .arg(dir.join("n1-workload.sock"))
            .arg("--agent-socket")
            .arg(&admin_socket)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            ))
            .spawn()
            .expect("agent starts");
        let agent = ListAgent {
            child,
            admin_socket,
            metrics_port,
            log,
        };
        eventually(Duration::from_secs(20), "agent health", || {
            agent.health().filter(|h| h["ready"] == true)
        });
        agent
    }

    pub fn agent_cli(&self, args: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(args)
            .arg("--agent-socket")
            .arg(&self.admin_socket)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn health(&self) -> Option<serde_json::Value> {
        self.agent_cli(&["agent", "healthcheck", "-o", "json"])
    }

    /// SPIFFE ID → serial of every SVID held.
    pub fn svids(&self) -> Vec<(String, String)> {
        let list = self
            .agent_cli(&["agent", "svids", "-o", "json"])
            .unwrap_or_default();
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some((
                    s["spiffe_id"].as_str()?.into(),
                    s["serial"].as_str()?.into(),
                ))
            })
            .collect()
    }

    pub fn serial_of(&self, name: &str) -> Option<String> {
        let id = format!("spiffe://{TD}/{name}");
        self.svids()
            .into_iter()
            .find(|(s, _)| *s == id)
            .map(|s| s.1)
    }

    /// The value of metric `name` (no labels), if the agent answers.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        c.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(mut self) {
        terminate(&mut self.child, "agent");
    }
}

impl Drop for ListAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
