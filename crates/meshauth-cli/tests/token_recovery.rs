//! The documented recovery of a join-token node whose SVID expired while the server was down
//! (4-second SVIDs here): the spent token in its `--join-token-file` is refused, the agent says
//! to write a new one there, and once one is written the same agent process attests with it and
//! syncs; no restart.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, Instant};

use support::{AgentProcess, ServerProcess, eventually, free_port};

#[test]
fn a_join_token_node_takes_a_new_token_from_its_file_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let flags = ["--svid-ttl", "4s"];
    let server = ServerProcess::start_on(dir.path(), port, &flags);
    server.bundle_file();
    let token_file = dir.path().join("n1.token");
    std::fs::write(&token_file, server.token("n1")).unwrap();
    let file = token_file.display().to_string();
    let agent = AgentProcess::start_with(dir.path(), "n1", &server, &["--join-token-file", &file]);
    let connected = |agent: &AgentProcess| {
        agent
            .health()
            .filter(|h| h["server_connected"] == true)
            .map(|h| h["node_svid_serial"].clone())
    };
    let first = eventually(Duration::from_secs(20), "the agent to sync", || {
        connected(&agent)
    });

    // Down past the SVID's lifetime.
    server.stop();
    std::thread::sleep(Duration::from_secs(6));
    let server = ServerProcess::start_on(dir.path(), port, &flags);
    let log = dir.path().join("n1-agent.log");
    let said = eventually(
        Duration::from_secs(40),
        "the agent to ask for a new token",
        || {
            let text = std::fs::read_to_string(&log).unwrap();
            text.lines()
                .find(|l| l.contains("write a new one") && l.contains(&file))
                .map(str::to_owned)
        },
    );
    assert!(
        said.contains("already used"),
        "the spent token is named as such: {said}"
    );
    assert!(connected(&agent).is_none(), "not back on a spent token");

    // The operator writes a new token; the agent takes it on its next attempt.
    std::fs::write(&token_file, server.token("n1")).unwrap();
    let written = Instant::now();
    let serial = eventually(Duration::from_secs(40), "the agent to come back", || {
        connected(&agent)
    });
    assert_ne!(serial, first, "a new node SVID");
    eprintln!(
        "join-token recovery: back {:?} after a new token was written to the file",
        written.elapsed()
    );
    agent.stop();
    server.stop();
}
