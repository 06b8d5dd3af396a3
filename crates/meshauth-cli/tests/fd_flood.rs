//! A flood of connections at the agent's file-descriptor limit: the agent's limit is lowered to
//! 96 (`prlimit`), under its Workload API's connection limit (128), and 200 connections are
//! opened to its Workload API socket and held. Every `accept` beyond the limit fails (EMFILE)
//! while they wait; the agent must pause instead of spinning and log at most about one line a
//! second about it. When the flood ends it serves again, with as many descriptors as before.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{AgentProcess, BIN, ServerProcess, TD, eventually};

const FLOOD: usize = 200;
const HOLD: Duration = Duration::from_secs(4);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn log_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_flood_at_the_descriptor_limit_is_survived_with_a_bounded_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/flooded"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{}", nix_uid()),
    ]);
    let token = server.token("n1");
    let agent = AgentProcess::start(dir.path(), "n1", &server, Some(&token));
    let fetch = || {
        Command::new(BIN)
            .args(["workload", "fetch", "-o", "json", "--socket"])
            .arg(&agent.workload_socket)
            .output()
            .unwrap()
    };
    eventually(Duration::from_secs(20), "an SVID to fetch", || {
        fetch().status.success().then_some(())
    });
    let pid = agent.pid();
    let limited = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=96:96"])
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit");
    let fds_before = fd_count(pid);
    assert!(
        fds_before < 60,
        "room for the flood to reach the limit: {fds_before}"
    );
    let log = dir.path().join("n1-agent.log");
    let lines_before = log_lines(&log);
    let cpu_before = cpu_ticks(pid);

    let started = Instant::now();
    let held: Vec<UnixStream> = (0..FLOOD)
        .map(|_| UnixStream::connect(&agent.workload_socket).unwrap())
        .collect();
    eventually(
        Duration::from_secs(10),
        "the agent at its descriptor limit",
        || (fd_count(pid) >= 90).then_some(()),
    );
    std::thread::sleep(HOLD);
    let flood_for = started.elapsed();
    let lines_during = log_lines(&log) - lines_before;
    let cpu = cpu_ticks(pid) - cpu_before;
    drop(held);

    // Bounded: about one warning a second, and no busy loop (100 ticks = one CPU second).
    let bound = 3 + flood_for.as_secs() as usize * 2;
    assert!(
        lines_during <= bound,
        "{lines_during} log lines in {flood_for:?} (bound {bound}):\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        cpu < flood_for.as_millis() as u64 / 10 / 2,
        "the agent used {cpu} ticks of CPU in {flood_for:?}: it spins"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("workload socket accept failed") && text.contains("suppressed"),
        "the accept failures are logged, with a count of those not logged"
    );

    // It recovers: serves again, and gives back the descriptors.
    eventually(Duration::from_secs(10), "the agent to serve again", || {
        fetch().status.success().then_some(())
    });
    eventually(
        Duration::from_secs(10),
        "the descriptors to be released",
        || (fd_count(pid) <= fds_before + 3).then_some(()),
    );
    eprintln!(
        "fd flood: {FLOOD} connections held for {flood_for:?} at a limit of 96 descriptors: {lines_during} log lines, {cpu} CPU ticks; serving again afterwards"
    );
    agent.stop();
    server.stop();
}

fn nix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}
