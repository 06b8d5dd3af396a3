//! A local, unprivileged user floods the Workload API socket (mode 0777) of a real agent: it
//! opens and drops hundreds of connections, some closing before sending anything, some after
//! part of the HTTP/2 preface, some after an HPACK bomb (one large header entry, then a HEADERS
//! frame of 16,000 one-byte references to it, about 48 MB once expanded), and a burst of more
//! connections at once than the socket's limit. Afterwards the agent holds no more descriptors
//! than before, its memory stayed bounded, a normal fetch still works, and SIGTERM stops it
//! promptly even while that user holds connections and a live `FetchX509SVID` stream.
//!
//! Needs root, to run the flooder as `nobody` (util-linux `setpriv`), and `/usr/bin/python3`.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{AgentProcess, ServerProcess, TD, eventually};

const NOBODY: u32 = 65534;
const PYTHON: &str = "/usr/bin/python3";

/// The flooder (`flood <socket>`) and the holder (`hold <socket>`), in Python so that it runs
/// as another user without access to this test's build directory.
const SCRIPT: &str = r#"
import json, os, socket, sys, time

mode, path = sys.argv[1], sys.argv[2]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

def frame(kind, flags, stream, payload):
    n = len(payload)
    return bytes([n >> 16 & 255, n >> 8 & 255, n & 255, kind, flags]) + stream.to_bytes(4, "big") + payload

def hint(value, prefix, first=0):
    top = (1 << prefix) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)

def literal(name, value):
    # Literal without indexing, new name.
    return b"\x00" + hint(len(name), 7) + name + hint(len(value), 7) + value

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s

def closed_by_peer(s, timeout):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False

out = {"uid": os.getuid(), "opened": 0}
if mode == "flood":
    # Connect and close before sending anything.
    for _ in range(200):
        connect().close()
        out["opened"] += 1
    # Part of the preface, then close.
    for i in range(150):
        s = connect()
        s.sendall(PREFACE[: 1 + i % 23])
        s.close()
        out["opened"] += 1
    # HPACK bombs: a 3,000-byte entry into the dynamic table, then 16,000 references to it.
    big = b"\x40" + hint(5, 7) + b"x-big" + hint(3000, 7) + b"x" * 3000
    bomb = PREFACE + frame(4, 0, 0, b"") + frame(1, 4, 1, big) + frame(1, 4, 3, bytes([0x80 | 62]) * 16000)
    out["bombs_closed_by_agent"] = 0
    for _ in range(150):
        s = connect()
        out["opened"] += 1
        try:
            s.sendall(bomb)
        except (ConnectionResetError, BrokenPipeError):
            pass
        if closed_by_peer(s, 5):
            out["bombs_closed_by_agent"] += 1
        s.close()
    # More connections at once than the limit, silent.
    held = []
    for _ in range(300):
        held.append(connect())
        out["opened"] += 1
    time.sleep(0.5)
    out["closed_at_once"] = sum(1 for s in held if closed_by_peer(s, 0.05))
    for s in held:
        s.close()
elif mode == "hold":
    # Connections that sent the preface, and one live FetchX509SVID stream.
    held = []
    for _ in range(40):
        s = connect()
        s.sendall(PREFACE + frame(4, 0, 0, b""))
        held.append(s)
    s = connect()
    block = (b"\x83\x86" + b"\x04" + hint(32, 7) + b"/SpiffeWorkloadAPI/FetchX509SVID"
             + b"\x01" + hint(9, 7) + b"localhost"
             + literal(b"content-type", b"application/grpc")
             + literal(b"te", b"trailers")
             + literal(b"workload.spiffe.io", b"true"))
    s.sendall(PREFACE + frame(4, 0, 0, b"") + frame(1, 4, 1, block) + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
    held.append(s)
    # Wait for the first DATA frame on stream 1: the SVID.
    buf = b""
    s.settimeout(10)
    streaming = False
    while not streaming:
        d = s.recv(65536)
        if not d:
            break
        buf += d
        while len(buf) >= 9:
            n = int.from_bytes(buf[0:3], "big")
            if len(buf) < 9 + n:
                break
            kind, stream = buf[3], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            if kind == 4 and not buf[4] & 1:
                s.sendall(frame(4, 1, 0, b""))
            if kind == 0 and stream == 1 and n > 0:
                streaming = True
            buf = buf[9 + n:]
    out["streaming"] = streaming
    print(json.dumps(out), flush=True)
    # Hold everything until killed, answering nothing.
    time.sleep(120)
print(json.dumps(out), flush=True)
"#;

/// Runs the script as `nobody`.
fn as_nobody(mode: &str, socket: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        PYTHON,
        "-c",
        SCRIPT,
        mode,
    ])
    .arg(socket);
    cmd
}

/// The pid of the `meshauth agent run` serving `socket`.
fn agent_pid(socket: &Path) -> u32 {
    let needle = socket.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.windows(2).any(|w| w == [b"agent".as_slice(), b"run"])
                    && args.contains(&needle.as_bytes())
            })
        })
        .expect("the agent process")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// VmRSS in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The agent's metrics port, from its "agent ready" log line.
fn metrics_port(log: &Path) -> u16 {
    let text = std::fs::read_to_string(log).unwrap();
    // Strip ANSI colours.
    let mut plain = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain
        .find("metrics=127.0.0.1:")
        .expect("the agent logs its metrics address");
    plain[at + "metrics=127.0.0.1:".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn metrics(port: u16) -> String {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    body
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn fetch(agent: &AgentProcess) -> std::process::Output {
    Command::new(support::BIN)
        .args(["workload", "fetch", "-o", "json", "--socket"])
        .arg(&agent.workload_socket)
        .output()
        .unwrap()
}

fn entry(server: &ServerProcess, name: &str, uid: u32) {
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/{name}"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
}

#[test]
fn an_unprivileged_flood_leaves_nothing_behind() {
    if !meshauth_test_support::require_root("an_unprivileged_flood_leaves_nothing_behind") {
        return;
    }
    assert!(
        Path::new(PYTHON).exists(),
        "this test needs {PYTHON} (the flooder runs as nobody)"
    );
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach the socket inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    entry(&server, "root-workload", 0);
    entry(&server, "nobody-workload", NOBODY);
    let token = server.token("n1");
    let agent = AgentProcess::start(dir.path(), "n1", &server, Some(&token));
    let pid = agent_pid(&agent.workload_socket);
    let port = metrics_port(&dir.path().join("n1-agent.log"));

    // Warm up: a normal fetch works, then measure.
    eventually(Duration::from_secs(20), "a first SVID", || {
        fetch(&agent).status.success().then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = fd_count(pid);
    let rss_before = rss_kib(pid);

    // The flood, with the agent's RSS sampled meanwhile.
    let mut flooder = as_nobody("flood", &agent.workload_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv runs (util-linux)");
    let mut rss_peak = rss_before;
    let started = Instant::now();
    while flooder.try_wait().unwrap().is_none() {
        rss_peak = rss_peak.max(rss_kib(pid));
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the flood takes too long"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = flooder.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "flooder: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["uid"], NOBODY, "the flood ran unprivileged");
    assert!(report["opened"].as_u64().unwrap() >= 500, "{report}");
    assert_eq!(
        report["bombs_closed_by_agent"], 150,
        "the agent closes every HPACK bomb: {report}"
    );
    let at_once = report["closed_at_once"].as_u64().unwrap();
    assert!(
        at_once >= 300 - 128,
        "connections over the limit (128) are closed at once: {report}"
    );

    // Everything is released within a few seconds.
    eventually(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || (fd_count(pid) <= fds_before + 3).then_some(()),
    );
    let rss_after = rss_kib(pid);
    assert!(
        rss_peak < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to a peak of {rss_peak} KiB"
    );
    let text = metrics(port);
    let closed = "meshauth_agent_workload_connections_closed_total";
    assert_eq!(
        counter(&text, &format!("{closed}{{reason=\"HeaderListTooLarge\"}}")),
        150,
        "{text}"
    );
    assert!(counter(&text, &format!("{closed}{{reason=\"OverLimit\"}}")) >= 300 - 128);
    eventually(Duration::from_secs(5), "no connection left open", || {
        (counter(&metrics(port), "meshauth_agent_workload_connections ") == 0).then_some(())
    });

    // Still serving.
    let fetched = fetch(&agent);
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert!(String::from_utf8_lossy(&fetched.stdout).contains("root-workload"));

    // SIGTERM while nobody holds connections and a live stream.
    let mut holder = as_nobody("hold", &agent.workload_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let held: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        held["streaming"], true,
        "the holder's stream is live: {line}"
    );
    assert!(fd_count(pid) >= fds_before + 40);
    let stopping = Instant::now();
    agent.stop();
    let took = stopping.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    eprintln!(
        "flood: {report}; fds {fds_before}; RSS {rss_before} KiB, peak {rss_peak} KiB, after {rss_after} KiB; SIGTERM {took:?}"
    );
}
