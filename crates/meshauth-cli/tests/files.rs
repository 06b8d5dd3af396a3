//! Secrets and files: one process per data dir, data dirs never chmodded, key files 0600 whatever
//! an interrupted write left behind, and the join token kept out of argv and logs.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{BIN, ServerProcess, TD, eventually, free_port, one_line_error};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn uid() -> u32 {
    // Read from procfs: this crate has no `unsafe`, so no getuid(2).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `meshauth server run` on `data_dir`, expected to fail at once; its one-line error.
fn server_fails(dir: &Path, data_dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["server", "run", "--trust-domain", TD])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--admin-socket")
        .arg(dir.join("second-admin.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second server must not start");
    one_line_error(&out)
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path());
    let data = dir.path().join("server-data");
    let pid = std::fs::read_to_string(data.join("meshauth.lock")).unwrap();
    let err = server_fails(dir.path(), &data);
    assert!(
        err.contains(&format!(
            "data dir {} is in use by another meshauth process (pid {})",
            data.display(),
            pid.trim()
        )),
        "{err}"
    );
    assert!(err.contains("--data-dir"), "{err}");
    // The first one still serves, and its admin socket was not replaced.
    first.ok(&["server", "healthcheck"]);
    assert!(!dir.path().join("second-admin.sock").exists());
    first.stop();
    // Once it is gone, the directory is free again, with its data where it was.
    let again = ServerProcess::start(dir.path());
    again.stop();
}

#[test]
fn a_world_writable_data_dir_is_refused_and_not_chmodded() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();

    let err = server_fails(dir.path(), &shared);
    assert!(err.contains("writable by group or others"), "{err}");
    assert!(err.contains(&shared.display().to_string()), "{err}");
    assert_eq!(mode(&shared), 0o1777, "the server left the mode alone");

    let out = Command::new(BIN)
        .args(["agent", "run", "--node", "n1", "--trust-domain", TD])
        .args(["--server", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&shared)
        .arg("--workload-socket")
        .arg(dir.path().join("w.sock"))
        .arg("--agent-socket")
        .arg(dir.path().join("a.sock"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = one_line_error(&out);
    assert!(err.contains("writable by group or others"), "{err}");
    assert_eq!(mode(&shared), 0o1777, "the agent left the mode alone");
    assert_eq!(
        std::fs::read_dir(&shared).unwrap().count(),
        0,
        "nothing written"
    );

    // A subdirectory of it is fine: created private (the test server's data dir is
    // `<dir>/server-data`).
    let server = ServerProcess::start(&shared);
    assert_eq!(mode(&shared.join("server-data")), 0o700);
    assert_eq!(mode(&shared), 0o1777);
    server.stop();
}

/// How an agent gets its join token.
enum Token<'a> {
    File(&'a Path),
    Env(&'a str),
    Argv(&'a str),
}

/// An agent of node `node` with its state in `dir`, started by hand so that the test knows its
/// pid and log.
struct Agent {
    child: Child,
    log: PathBuf,
    admin: PathBuf,
    workload: PathBuf,
}

impl Agent {
    fn start(dir: &Path, node: &str, server: &ServerProcess, token: Token<'_>) -> Agent {
        let log = dir.join(format!("{node}-agent.log"));
        let admin = dir.join(format!("{node}-agent.sock"));
        let workload = dir.join(format!("{node}-workload.sock"));
        let mut cmd = Command::new(BIN);
        cmd.args(["--log", "trace"])
            .args(["agent", "run", "--node", node, "--trust-domain", TD])
            .args(["--server", &server.addr()])
            .arg("--trust-bundle")
            .arg(dir.join("bundle.pem"))
            .arg("--data-dir")
            .arg(dir.join(format!("{node}-data")))
            .arg("--workload-socket")
            .arg(&workload)
            .arg("--agent-socket")
            .arg(&admin)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env_remove("MESHAUTH_JOIN_TOKEN")
            .env_remove("MESHAUTH_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        match token {
            Token::File(p) => {
                cmd.arg("--join-token-file").arg(p);
            }
            Token::Env(t) => {
                cmd.env("MESHAUTH_JOIN_TOKEN", t);
            }
            Token::Argv(t) => {
                cmd.args(["--join-token", t]);
            }
        }
        let agent = Agent {
            child: cmd.spawn().unwrap(),
            log,
            admin,
            workload,
        };
        eventually(Duration::from_secs(20), "agent health", || {
            Command::new(BIN)
                .args(["agent", "healthcheck", "--agent-socket"])
                .arg(&agent.admin)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        });
        agent
    }

    fn cmdline(&self) -> String {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.child.id())).unwrap();
        String::from_utf8_lossy(&raw).replace('\0', " ")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn stop(mut self) {
        support::terminate(&mut self.child, "agent");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ARGV_WARNING: &str = "--join-token puts the token where any local user can read it";

#[test]
fn the_join_token_stays_out_of_argv_and_logs_when_given_by_file_or_env() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();

    let token = server.token("n1");
    let file = dir.path().join("n1.token");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()))
        .unwrap();
    let by_file = Agent::start(dir.path(), "n1", &server, Token::File(&file));
    assert!(!by_file.cmdline().contains(&token), "{}", by_file.cmdline());
    let log = by_file.log();
    assert!(log.contains("attested with the join token"), "{log}");
    assert!(!log.contains(&token), "the token is in the log:\n{log}");
    assert!(!log.contains(ARGV_WARNING), "{log}");

    let token2 = server.token("n2");
    let by_env = Agent::start(dir.path(), "n2", &server, Token::Env(&token2));
    assert!(!by_env.cmdline().contains(&token2));
    let log = by_env.log();
    assert!(log.contains("attested with the join token"), "{log}");
    assert!(!log.contains(&token2), "the token is in the log:\n{log}");
    assert!(!log.contains(ARGV_WARNING), "{log}");

    // The argv form still works, and says once why it should not be used.
    let token3 = server.token("n3");
    let by_argv = Agent::start(dir.path(), "n3", &server, Token::Argv(&token3));
    let log = by_argv.log();
    assert_eq!(log.matches(ARGV_WARNING).count(), 1, "{log}");
    assert!(!log.contains(&token3), "the token is in the log:\n{log}");

    // The server never logs tokens either.
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    for t in [&token, &token2, &token3] {
        assert!(!server_log.contains(t.as_str()), "{server_log}");
    }

    // Help steers away from the argv form.
    let help = Command::new(BIN)
        .args(["agent", "run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--join-token-file <FILE>"), "{help}");
    assert!(help.contains("Discouraged"), "{help}");
    assert!(help.contains("MESHAUTH_JOIN_TOKEN"), "{help}");

    // A second agent on a data dir in use is refused, naming it.
    let out = Command::new(BIN)
        .args(["agent", "run", "--node", "n1", "--trust-domain", TD])
        .args(["--server", &server.addr()])
        .arg("--trust-bundle")
        .arg(dir.path().join("bundle.pem"))
        .arg("--data-dir")
        .arg(dir.path().join("n1-data"))
        .arg("--workload-socket")
        .arg(dir.path().join("other-w.sock"))
        .arg("--agent-socket")
        .arg(dir.path().join("other-a.sock"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!(
            "data dir {} is in use by another meshauth process (pid {})",
            dir.path().join("n1-data").display(),
            by_file.child.id()
        )),
        "{err}"
    );
    by_file.stop();
    by_env.stop();
    by_argv.stop();
    server.stop();
}

/// Creates `path` with mode 0644, as an interrupted write of a public file may have left it.
fn stale_0644(path: &Path, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, data))
        .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn key_files_are_0600_even_after_an_interrupted_write() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/workload"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);

    // The agent's data dir as an older agent, interrupted while writing node.crt, left it: the
    // shared temporary file `node.tmp` with mode 0644 (and a key of that mode).
    let data = dir.path().join("n1-data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    stale_0644(&data.join("node.tmp"), b"half a certificate");
    stale_0644(&data.join("node.key"), b"an old key");

    let token = server.token("n1");
    let file = dir.path().join("n1.token");
    std::fs::write(&file, &token).unwrap();
    let agent = Agent::start(dir.path(), "n1", &server, Token::File(&file));
    assert_eq!(mode(&data.join("node.key")), 0o600);
    assert_eq!(mode(&data.join("node.crt")), 0o644);
    assert_ne!(std::fs::read(data.join("node.key")).unwrap(), b"an old key");
    assert_eq!(mode(&data), 0o700);

    // `workload fetch --write` into a directory with a stale world-readable key and temp file.
    let out_dir = dir.path().join("svid-out");
    std::fs::create_dir(&out_dir).unwrap();
    stale_0644(&out_dir.join("svid.key"), b"an old key");
    stale_0644(&out_dir.join("svid.tmp"), b"half a key");
    let fetch = || {
        Command::new(BIN)
            .args(["workload", "fetch", "--socket"])
            .arg(&agent.workload)
            .arg("--write")
            .arg(&out_dir)
            .output()
            .unwrap()
    };
    eventually(Duration::from_secs(20), "the workload SVID", || {
        fetch().status.success().then_some(())
    });
    assert_eq!(mode(&out_dir.join("svid.key")), 0o600);
    assert_eq!(mode(&out_dir.join("svid.pem")), 0o644);
    assert_eq!(mode(&out_dir.join("bundle.pem")), 0o644);
    let key = std::fs::read_to_string(out_dir.join("svid.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");

    // A missing output directory is created private.
    let fresh = dir.path().join("fresh/svid");
    let out = Command::new(BIN)
        .args(["workload", "fetch", "--socket"])
        .arg(&agent.workload)
        .arg("--write")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&fresh.join("svid.key")), 0o600);
    agent.stop();
    server.stop();
}
