//! The operator CLI against a real `meshauth server run` process: tokens, entries, agents,
//! bundles, health, restarts, and clear one-line errors for bad input.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");

struct ServerProcess {
    child: Child,
    socket: PathBuf,
}

impl ServerProcess {
    fn start(dir: &Path) -> ServerProcess {
        let socket = dir.join("admin.sock");
        let child = Command::new(BIN)
            .args([
                "server",
                "run",
                "--trust-domain",
                "cli.test",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--admin-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("server starts");
        let server = ServerProcess { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.cli(&["server", "healthcheck"]).status.success() {
            assert!(Instant::now() < deadline, "server did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.socket)
            .output()
            .expect("cli runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        one_line_error(&out)
    }

    fn stop(mut self) {
        // SIGTERM, then wait for a clean exit.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "server exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected one error line, got: {stderr}"
    );
    stderr
}

#[test]
fn tokens_entries_agents_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());

    let token = server.ok(&["token", "generate", "--node", "n1", "--ttl", "120s"]);
    let token = token.trim();
    assert_eq!(token.len(), 32, "the token alone on stdout: {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));

    let created = server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://cli.test/web",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:0",
        "--x509-svid-ttl",
        "5m",
        "-o",
        "json",
    ]);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_string();
    assert_eq!(created[0]["x509_svid_ttl_seconds"], 300);
    assert_eq!(
        created[0]["selectors"],
        serde_json::json!(["unix:gid:0", "unix:uid:1000"])
    );

    let shown: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "show", "--entry-id", &id, "-o", "json"]))
            .unwrap();
    assert_eq!(shown[0]["spiffe_id"], "spiffe://cli.test/web");
    let filtered: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--selector",
        "unix:uid:1000",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let none: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--parent-id",
        "spiffe://cli.test/node/n9",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(none, serde_json::json!([]));

    let updated: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--spiffe-id",
        "spiffe://cli.test/web2",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1001",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(updated[0]["revision"], 2);
    assert_eq!(updated[0]["spiffe_id"], "spiffe://cli.test/web2");

    let agents: serde_json::Value =
        serde_json::from_str(&server.ok(&["agent", "list", "-o", "json"])).unwrap();
    assert_eq!(agents, serde_json::json!([]));

    let pem = server.ok(&["bundle", "show"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let jwks: serde_json::Value =
        serde_json::from_str(&server.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "x509-svid");

    let health: serde_json::Value =
        serde_json::from_str(&server.ok(&["server", "healthcheck", "-o", "json"])).unwrap();
    assert_eq!(health["trust_domain"], "cli.test");
    assert_eq!(health["entries"], 1);

    server.ok(&["entry", "delete", "--entry-id", &id]);
    let err = server.fails(&["entry", "show", "--entry-id", &id]);
    assert!(err.contains("no entry with id"), "{err}");
    server.stop();
}

#[test]
fn bad_input_gets_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://cli.test/a/../b",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "spiffe-id",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "http://cli.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "spiffe-id",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "not in trust domain cli.test",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://cli.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "nocolon",
            ],
            "invalid selector",
        ),
        (
            &["entry", "delete", "--entry-id", "zzz"],
            "invalid entry id",
        ),
        (
            &[
                "entry",
                "delete",
                "--entry-id",
                "0123456789abcdef0123456789abcdef",
            ],
            "no entry with id",
        ),
        (
            &["token", "generate", "--node", "Bad/Name"],
            "invalid node name",
        ),
        (
            &["token", "generate", "--node", "n1", "--ttl", "soon"],
            "duration",
        ),
        (
            &["agent", "show", "--node", "ghost"],
            "no agent named ghost",
        ),
        (&["agent", "ban", "--node", "ghost"], "no agent named ghost"),
        (&["entry", "frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let err = server.fails(args);
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err:?}"
        );
    }
    server.stop();

    // No server: the error says where it looked and what to check.
    let out = Command::new(BIN)
        .args(["server", "healthcheck", "--admin-socket"])
        .arg(dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = one_line_error(&out);
    assert!(err.contains("is `meshauth server run` running?"), "{err}");
}

#[test]
fn restart_keeps_bundle_and_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://cli.test/web",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1000",
    ]);
    let bundle = server.ok(&["bundle", "show"]);
    server.stop();

    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("data/meshauth.db"))
            .unwrap()
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600, "the datastore holds CA keys");

    let server = ServerProcess::start(dir.path());
    assert_eq!(server.ok(&["bundle", "show"]), bundle);
    let entries: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "show", "-o", "json"])).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    server.stop();
}
