//! How the real `meshauth` binary fails: usage errors as clap renders them (exit 2), command
//! errors as one readable line, TLS failures that say what to check, and a closed stdout that
//! ends output quietly. Rootless.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{BIN, ServerProcess, TD, one_line_error};

fn meshauth(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn usage_errors_keep_clap_s_whole_message_and_exit_2() {
    let out = meshauth(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://cli.test/node/n1",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the following required arguments were not provided"),
        "{err}"
    );
    assert!(
        err.contains("--spiffe-id <SPIFFE_ID>"),
        "names the argument: {err}"
    );
    assert!(err.contains("Usage: meshauth entry create"), "{err}");

    let out = meshauth(&["observe", "--verdict", "FOO"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("possible values: FORWARDED, DROPPED"), "{err}");

    let out = meshauth(&["entyr", "show"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'entry'"), "did you mean: {err}");

    // Help is not an error.
    let out = meshauth(&["entry", "create", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--spiffe-id"));
}

#[test]
fn command_errors_are_one_line_with_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(BIN)
        .args(["entry", "show", "--admin-socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = one_line_error(&out);
    assert!(
        line.starts_with("error: cannot reach the server's admin socket"),
        "{line}"
    );
    assert!(line.contains("--admin-socket"), "{line}");
    assert_eq!(
        line.matches("No such file or directory").count(),
        1,
        "the cause once: {line}"
    );
}

/// `n` policies that all allow app=client to reach app=web: `policy trace` lists every one of
/// them on its egress line, well over a pipe buffer (64 KiB).
fn many_policies(path: &Path, n: usize) {
    let docs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: \
                 allow-client-to-web-number-{i:05}\nspec:\n  endpointSelector:\n    \
                 matchLabels:\n      app: client\n  egress:\n  - toEndpoints:\n    - \
                 matchLabels:\n        app: web\n"
            )
        })
        .collect();
    std::fs::write(path, docs.join("---\n")).unwrap();
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.yaml");
    many_policies(&file, 3000);
    let args = [
        "policy",
        "trace",
        "--src",
        "app=client",
        "--dst",
        "app=web",
        "--dport",
        "80/TCP",
        "-f",
    ];

    // All of it, to know it is larger than a pipe.
    let all = Command::new(BIN).args(args).arg(&file).output().unwrap();
    assert!(all.status.success(), "{}", stderr(&all));
    assert!(all.stdout.len() > 128 * 1024, "{} bytes", all.stdout.len());

    // `meshauth policy trace ... | head -1`.
    let mut child = Command::new(BIN)
        .args(args)
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        reader.read_line(&mut first).unwrap();
    } // The read end closes here, while the process still has most of its output to write.
    assert_eq!(first.trim(), "app=client -> app=web 80/TCP");
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.trim().is_empty(), "nothing on stderr: {err}");
    assert_eq!(out.status.code(), Some(0), "{err}");

    // A reader that is gone before the first line is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["policy", "validate", "-f"])
        .arg(&file)
        .stdout(writer)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.trim().is_empty(), "nothing on stderr: {err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// Runs `agent run` against `server` with `trust_domain` and `bundle` and a fresh join token;
/// returns the agent's stderr, after checking that it failed.
fn agent_first_contact(
    server: &ServerProcess,
    dir: &Path,
    trust_domain: &str,
    bundle: &Path,
) -> String {
    let token = server.token("n1");
    let out = Command::new(BIN)
        .args([
            "agent",
            "run",
            "--node",
            "n1",
            "--trust-domain",
            trust_domain,
        ])
        .args(["--server", &server.addr(), "--join-token", &token])
        .arg("--trust-bundle")
        .arg(bundle)
        .arg("--data-dir")
        .arg(dir.join("agent-data"))
        .arg("--workload-socket")
        .arg(dir.join("workload.sock"))
        .arg("--agent-socket")
        .arg(dir.join("agent.sock"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "the agent fails: {err}");
    err
}

/// The one `error:` line of `stderr`, checked to be a sentence rather than a dump.
fn the_error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    let line = errors[0];
    for dump in ["{", "Other(", "OtherError", "SpiffeId", "TrustDomain"] {
        assert!(!line.contains(dump), "no Debug dump ({dump}): {line}");
    }
    assert!(line.len() < 400, "one sentence: {line}");
    line
}

#[test]
fn an_agent_of_another_trust_domain_is_told_the_server_s() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let bundle = server.bundle_file();

    let err = agent_first_contact(&server, dir.path(), "other.test", &bundle);
    let line = the_error_line(&err);
    assert!(
        line.contains(&format!("is in trust domain {TD}")),
        "names the server's trust domain: {line}"
    );
    assert!(line.contains("not other.test"), "{line}");
    assert!(
        line.contains(&format!("--trust-domain {TD}")),
        "says which flag to pass: {line}"
    );
    // Said once: no repeated cause, and no warning that says it again.
    let server_id = format!("spiffe://{TD}/meshauth/server");
    assert_eq!(err.matches(&server_id).count(), 1, "{err}");
    assert_eq!(line.matches("is in trust domain").count(), 1, "{line}");
}

#[test]
fn an_agent_with_another_server_s_bundle_is_told_where_to_get_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = ServerProcess::start(&other_dir);
    let wrong_bundle = other.bundle_file();
    drop(other);

    let err = agent_first_contact(&server, dir.path(), TD, &wrong_bundle);
    let line = the_error_line(&err);
    assert!(line.contains(&server.addr()), "{line}");
    assert!(
        line.contains("`meshauth bundle show` on the server"),
        "{line}"
    );
    assert!(line.contains("--trust-bundle"), "{line}");
}
