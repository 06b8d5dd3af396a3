//! Soak: 10,000 auth-required signals per second for 60 s against one agent (root only).
//!
//! `cargo bench -p meshauth-cli --bench soak`
//!
//! On the demo's three-node lab (`meshauth demo --lab soak --keep`, agents with their default
//! flags: hold mode, 4 auth workers, an auth queue of 1,024), a sender pod `soaksend-1` on n1
//! and a receiver pod `soakrecv-2` on n2, whose ingress from the sender on UDP 9000-9011
//! requires authentication per connection (`meshauth.io/authentication: per-connection`): every
//! new 5-tuple is its own auth key. The sender (python3, a raw socket in its pod) sends one UDP
//! datagram per new 5-tuple (source ports from 10,000 up, times the 12 destination ports), paced
//! at 10,000 per second for 60 s: each is an auth-required signal for n1's agent (its packet
//! held in n1's hold queue while the agent asks for a handshake of its own). The receiver
//! counts what arrives.
//!
//! Every second the bench samples n1's agent (VmRSS, VmHWM, RssAnon, VmData and CPU from
//! `/proc/<pid>`, its `/metrics`; n2's VmRSS), and at the start and the end it reads every
//! counter on the way of a signal: the sender's, the pod's veth, n1's datapath (`ma_stats`), n1's
//! NFQUEUE (`/proc/net/netfilter/nfnetlink_queue` of the node), the agent's hold queue and auth
//! manager, n2's datapath and the receiver. It prints where each signal went and what no counter
//! explains, and the CPU of n1's agent's threads. At the middle of the soak a new ordinary pair
//! of n1 (client2-1 to demodeployment-3, HTTP) must authenticate and pass.
//!
//! Once the counters have settled, the entries n1's agent lists must equal its kernel auth map
//! (the soak's entries still there). Then the bench waits for the per-connection entries to
//! drain (a UDP flow is tracked for 60 s after its last packet; the conntrack sweep runs every
//! 30 s) and checks that no auth state was lost: both agents ready (`agent healthcheck`), n1's
//! list equal to its kernel map again, the demo's pair entries still there, and a new ordinary
//! pair (client2-1 to demodeployment-2) authenticates and passes. It exits non-zero if a check
//! or a bound fails. The lab is removed at the end, also on failure (its work directory, with
//! the agents' logs, stays in `/run/meshauth-lab/soak` as the other lab benches leave theirs).
//!
//! `MESHAUTH_SOAK_SECS` and `MESHAUTH_SOAK_RATE` change the duration and rate (for a quick try;
//! the recorded figures use the defaults).

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use meshauth_datapath::{Datapath, Direction, DropReason};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const LAB: &str = "soak";
/// Signals per second, and for how long.
const RATE: u64 = 10_000;
const SECS: u64 = 60;
/// The receiver's ports (`port`..`endPort` of the policy) and the sender's first source port:
/// 12 ports x 55,536 source ports = 666,432 distinct 5-tuples, more than 600,000.
const PORT_FIRST: u16 = 9000;
const PORT_LAST: u16 = 9011;
const SPORT_FIRST: u16 = 10_000;
/// The probe datagram's source port (outside the soak's range).
const PROBE_SPORT: u16 = 9_999;
/// How long the per-connection entries may take to drain after the soak: the 60 s idle timeout
/// of a tracked UDP flow, the 30 s period of the conntrack sweep, the 5 s grace of a fresh
/// entry, and slack.
const DRAIN_LIMIT: Duration = Duration::from_secs(150);
/// Bounds on n1's agent memory: its peak during the soak and drain (VmHWM before the bench's
/// own `auth list`, VmRSS sampled after it) at most this much above its VmRSS at the start; the mean VmRSS of the soak's last 10 s at most this much above
/// that of the 10 s before (no steady growth once the state the load keeps has filled).
const PEAK_BOUND_MB: f64 = 64.0;
const LATE_GROWTH_BOUND_MB: f64 = 4.0;

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: soak-per-connection
  annotations:
    meshauth.io/authentication: per-connection
spec:
  endpointSelector:
    matchLabels:
      app: soakrecv
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: soaksend
    toPorts:
    - ports:
      - port: "9000"
        endPort: 9011
        protocol: UDP
    authentication:
      mode: required
"#;

/// `sender.py SRC DST RATE COUNT FIRST_PORT,LAST_PORT FIRST_SPORT`: COUNT UDP datagrams from a
/// raw socket, each of a new 5-tuple (source port FIRST_SPORT + i / ports, destination port
/// FIRST_PORT + i % ports), paced at RATE per second; prints a JSON summary (attempted, send
/// errors by errno, elapsed seconds, cumulative attempts at each whole second).
const SENDER: &str = r#"
import json, socket, struct, sys, time
src, dst, rate, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
first, last = (int(p) for p in sys.argv[5].split(","))
sport0 = int(sys.argv[6])
ports = list(range(first, last + 1))
n = len(ports)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
body = b"soak"
head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(body), 0, 0, 64, 17, 0,
                   socket.inet_aton(src), socket.inet_aton(dst))
udp = struct.Struct("!HHHH")
dest = (dst, 0)
errors = {}
marks = []
sent = 0
t0 = time.monotonic()
while sent < count:
    now = time.monotonic() - t0
    while len(marks) < int(now):
        marks.append(sent)
    due = min(count, int(now * rate) + 1)
    while sent < due:
        pkt = head + udp.pack(sport0 + sent // n, ports[sent % n], 8 + len(body), 0) + body
        try:
            s.sendto(pkt, dest)
        except OSError as e:
            errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
        sent += 1
    if sent < count:
        time.sleep(0.0002)
elapsed = time.monotonic() - t0
print(json.dumps({"attempted": sent, "errors": errors, "elapsed": elapsed, "marks": marks}), flush=True)
"#;

/// `receiver.py FIRST_PORT,LAST_PORT`: counts the UDP datagrams on each port and the distinct
/// (source port, port) pairs; answers each line on stdin with a JSON line of its counts, and
/// exits on EOF.
const RECEIVER: &str = r#"
import json, selectors, socket, sys
first, last = (int(p) for p in sys.argv[1].split(","))
sel = selectors.DefaultSelector()
for p in range(first, last + 1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("0.0.0.0", p))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
sel.register(sys.stdin, selectors.EVENT_READ)
got = 0
seen = set()
print("ready", flush=True)
while True:
    for key, _ in sel.select(1.0):
        if key.fileobj is sys.stdin:
            line = sys.stdin.readline()
            print(json.dumps({"received": got, "distinct": len(seen)}), flush=True)
            if not line:
                sys.exit(0)
            continue
        sock = key.fileobj
        port = sock.getsockname()[1]
        while True:
            try:
                _, addr = sock.recvfrom(64)
            except BlockingIOError:
                break
            got += 1
            seen.add((addr[1], port))
"#;

/// One HTTP GET to argv[1]:80 (10 s timeout): prints `<status> <ms> <TCP retransmissions>`.
const GET: &str = r#"
import http.client, sys, time
def retrans():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])
r0 = retrans()
t = time.monotonic()
try:
    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
    c.request("GET", "/")
    status = c.getresponse().status
except Exception:
    status = 0
print(status, round((time.monotonic() - t) * 1e3, 1), retrans() - r0)
"#;

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn work() -> String {
    format!("{}/{LAB}", meshauth_lab::STATE_DIR)
}

fn agent_socket(node: &str) -> String {
    format!("{}/{node}-agent.sock", work())
}

/// The lab, its processes and the bench's children; all removed when dropped.
struct Soak {
    lab: meshauth_lab::Lab,
    children: Vec<Child>,
}

impl Drop for Soak {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

impl Soak {
    fn cli(&self, args: &[&str]) -> String {
        let admin = format!("{}/server-admin.sock", work());
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &admin])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshauth {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn add_pod(&self, name: &str, node: &str, labels: &str) {
        self.cli(&["pod", "create", name, "--node", node, "--labels", labels]);
        let out = Command::new(BIN)
            .args(["lab", "--lab", LAB, "pod", "add", name])
            .args(["--node", node, "--labels", labels])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab pod add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pod(&self, name: &str) -> (String, String) {
        let state = self.lab.state().unwrap().unwrap();
        let p = state.pods.into_iter().find(|p| p.name == name).unwrap();
        (p.ip.to_string(), p.netns)
    }

    fn up() -> Soak {
        let lab = meshauth_lab::Lab::new(LAB).unwrap();
        // What a previous run may have left.
        let _ = lab.down();
        let s = Soak {
            lab,
            children: vec![],
        };
        let out = Command::new(BIN)
            .args([
                "--log", "warn", "demo", "--lab", LAB, "--keep", "-o", "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "demo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let policy = format!("{}/soak-policy.yaml", work());
        std::fs::write(&policy, POLICY).unwrap();
        s.cli(&["policy", "apply", "-f", &policy]);
        s.add_pod("soaksend-1", "n1", "app=soaksend");
        s.add_pod("soakrecv-2", "n2", "app=soakrecv");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pods: serde_json::Value =
                serde_json::from_str(&s.cli(&["pod", "list", "-o", "json"])).unwrap();
            let missing = pods
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["reported"] != true)
                .count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} pods not reported after 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Every node's ipcache and policy follow the sync.
        std::thread::sleep(Duration::from_secs(2));
        s
    }

    /// Starts a command in pod `pod`'s network namespace, with stdin and stdout piped.
    fn spawn_in_pod(&mut self, pod: &str, args: &[&str]) -> (ChildStdin, BufReader<ChildStdout>) {
        let mut child = self
            .lab
            .exec(pod, &argv(args))
            .unwrap()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        self.children.push(child);
        (stdin, stdout)
    }
}

/// The receiver's counts, asked for on its stdin.
struct Receiver {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Receiver {
    fn counts(&mut self) -> (u64, u64) {
        writeln!(self.stdin, "q").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        (
            v["received"].as_u64().unwrap(),
            v["distinct"].as_u64().unwrap(),
        )
    }
}

/// The pid of the agent of `node` in this lab.
fn agent_pid(node: &str) -> u32 {
    let marker = format!("{}/", work());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let has = |w: &[&str]| args.windows(w.len()).any(|x| x == w);
        if has(&["agent", "run"])
            && has(&["--node", node])
            && args.iter().any(|a| a.contains(&marker))
        {
            return pid;
        }
    }
    panic!("no agent process of {node} in lab {LAB}");
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let at = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(14) + at(15)
}

/// utime + stime of each thread of `pid`, in clock ticks, summed by thread name.
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let at = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        *out.entry(name).or_default() += at(14) + at(15);
    }
    out
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// Where the agent of `node` serves /metrics (from its log: `metrics=127.0.0.1:PORT`).
fn metrics_addr(node: &str) -> std::net::SocketAddr {
    let log = std::fs::read_to_string(format!("{}/agent-{node}.log", work())).unwrap();
    // Without colours (the log may carry ANSI escapes).
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain.find("metrics=").unwrap_or_else(|| {
        panic!("agent-{node}.log names no metrics address");
    });
    plain[at + "metrics=".len()..]
        .split(|c: char| c.is_whitespace())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The samples of `node`'s agent's /metrics: `name{labels}` -> value.
fn metrics(node: &str, addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let body = meshauth_datapath::netns::run_in(
        &meshauth_datapath::netns::named(&format!("{LAB}-{node}")),
        move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text
                .split_once("\r\n\r\n")
                .map(|x| x.1)
                .unwrap_or("")
                .to_owned())
        },
    )
    .unwrap()
    .unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0.0) as u64
}

/// The sum of every sample of `m` whose key starts with `prefix`.
fn metric_sum(m: &BTreeMap<String, f64>, prefix: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// `cat PATH` inside network namespace `netns` (`/proc/net/...` is the reader's namespace's).
fn read_in(netns: &str, path: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The hold queue's NFQUEUE counters in `node`'s namespace: (waiting in the kernel, dropped as
/// the queue was full, dropped as the agent's socket was full, packets handed to the agent).
#[derive(Debug, Clone, Copy, Default)]
struct Nfq {
    total: u64,
    queue_dropped: u64,
    user_dropped: u64,
    id_sequence: u64,
}

fn nfqueue(node: &str) -> Nfq {
    let text = read_in(
        &format!("{LAB}-{node}"),
        "/proc/net/netfilter/nfnetlink_queue",
    );
    let queue = meshauth_agent::hold::QUEUE.to_string();
    let f: Vec<u64> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&queue.as_str()))
        .map(|w| w.iter().map(|v| v.parse().unwrap_or(0)).collect())
        .unwrap_or_default();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Nfq {
        total: at(2),
        queue_dropped: at(5),
        user_dropped: at(6),
        id_sequence: at(7),
    }
}

/// (tx packets, tx dropped) of `eth0` in network namespace `netns`.
fn eth0_tx(netns: &str) -> (u64, u64) {
    let text = read_in(netns, "/proc/net/dev");
    let f: Vec<u64> = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("eth0:"))
        .map(|r| {
            r.split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    (
        f.get(9).copied().unwrap_or(0),
        f.get(11).copied().unwrap_or(0),
    )
}

/// `Udp:` counters of network namespace `netns` (`InDatagrams`, `RcvbufErrors`, ...).
fn udp_snmp(netns: &str) -> BTreeMap<String, u64> {
    let text = read_in(netns, "/proc/net/snmp");
    let lines: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    match lines.as_slice() {
        [names, values, ..] => names
            .iter()
            .zip(values.iter())
            .skip(1)
            .map(|(n, v)| (n.to_string(), v.parse().unwrap_or(0)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `meshauth auth list -o json` of `node`'s agent.
fn listed(node: &str) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args([
            "auth",
            "list",
            "-o",
            "json",
            "--agent-socket",
            &agent_socket(node),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "auth list {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// An entry as (local identity, remote identity, remote node, connection or "").
type Entry = (u64, u64, String, String);

fn listed_keys(node: &str) -> BTreeSet<Entry> {
    listed(node)
        .iter()
        .map(|e| {
            (
                e["local"]["identity"].as_u64().unwrap(),
                e["remote"]["identity"].as_u64().unwrap(),
                e["remote"]["node"].as_str().unwrap().to_owned(),
                e["connection"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn kernel_keys(dp: &mut Datapath, nodes: &BTreeMap<u64, String>) -> BTreeSet<Entry> {
    dp.auth_entries()
        .unwrap()
        .into_iter()
        .map(|(k, _)| {
            let node = u64::from(k.remote_node.get());
            (
                u64::from(k.local.get()),
                u64::from(k.remote.get()),
                nodes
                    .get(&node)
                    .cloned()
                    .unwrap_or_else(|| format!("node-{node}")),
                k.connection.map(|c| c.to_string()).unwrap_or_default(),
            )
        })
        .collect()
}

/// Whether `node`'s agent passes `agent healthcheck`.
fn healthy(node: &str) -> bool {
    Command::new(BIN)
        .args([
            "agent",
            "healthcheck",
            "--agent-socket",
            &agent_socket(node),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// One sample of n1's agent.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    rss_kb: u64,
    hwm_kb: u64,
    anon_kb: u64,
    data_kb: u64,
    ticks: u64,
    entries: u64,
    queue: u64,
    waiting: u64,
    released: u64,
    hold_dropped: u64,
    overflow: u64,
    handshakes: u64,
}

fn sample(t0: Instant, pid: u32, addr: std::net::SocketAddr) -> Sample {
    let m = metrics("n1", addr);
    Sample {
        t: t0.elapsed().as_secs_f64(),
        rss_kb: status_kb(pid, "VmRSS"),
        hwm_kb: status_kb(pid, "VmHWM"),
        anon_kb: status_kb(pid, "RssAnon"),
        data_kb: status_kb(pid, "VmData"),
        ticks: cpu_ticks(pid),
        entries: metric(&m, "meshauth_agent_auth_entries"),
        queue: metric(&m, "meshauth_agent_auth_queue_depth"),
        waiting: metric(&m, "meshauth_agent_hold_waiting_packets"),
        released: metric(&m, "meshauth_agent_hold_released_packets_total"),
        hold_dropped: metric_sum(&m, "meshauth_agent_hold_dropped_packets_total"),
        overflow: metric(&m, "meshauth_agent_auth_queue_overflow_total"),
        handshakes: metric_sum(
            &m,
            "meshauth_agent_auth_handshakes_total{role=\"Initiator\"",
        ),
    }
}

/// Every counter on the way of a signal, at one time.
struct Counters {
    sender_tx: (u64, u64),
    n1: meshauth_datapath::Stats,
    nfq: Nfq,
    n1_metrics: BTreeMap<String, f64>,
    n2: meshauth_datapath::Stats,
    n2_metrics: BTreeMap<String, f64>,
    recv_udp: BTreeMap<String, u64>,
    received: (u64, u64),
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

fn main() {
    if !meshauth_test_support::is_root() {
        eprintln!("soak: needs root (lab namespaces, eBPF)");
        std::process::exit(1);
    }
    let failures = run();
    if !failures.is_empty() {
        println!("soak: FAILED");
        for f in &failures {
            println!("   - {f}");
        }
        std::process::exit(1);
    }
    println!("soak: every check and bound met");
}

/// The bench; returns the checks and bounds that failed (the lab is down when it returns).
fn run() -> Vec<String> {
    let rate = env_u64("MESHAUTH_SOAK_RATE", RATE);
    let secs = env_u64("MESHAUTH_SOAK_SECS", SECS);
    let count = rate * secs;
    let ports = format!("{PORT_FIRST},{PORT_LAST}");
    assert!(
        count <= u64::from(u16::MAX - SPORT_FIRST + 1) * u64::from(PORT_LAST - PORT_FIRST + 1),
        "not enough distinct 5-tuples for {count} signals"
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: String = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("   [{}] {what}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures.push(what);
        }
    };

    let t_setup = Instant::now();
    let mut soak = Soak::up();
    let (send_ip, send_netns) = soak.pod("soaksend-1");
    let (recv_ip, recv_netns) = soak.pod("soakrecv-2");
    let (rx_in, mut rx_out) = soak.spawn_in_pod("soakrecv-2", &["python3", "-c", RECEIVER, &ports]);
    let mut line = String::new();
    rx_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the receiver started");
    let mut receiver = Receiver {
        stdin: rx_in,
        stdout: rx_out,
    };
    let nodes: BTreeMap<u64, String> = {
        let agents: serde_json::Value =
            serde_json::from_str(&soak.cli(&["agent", "list", "-o", "json"])).unwrap();
        agents
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["node_id"].as_u64().unwrap(),
                    a["node"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pid1 = agent_pid("n1");
    let pid2 = agent_pid("n2");
    let addr1 = metrics_addr("n1");
    let addr2 = metrics_addr("n2");
    let mut dp1 = Datapath::load(&Datapath::pin_dir_for(&format!("{LAB}-n1"))).unwrap();
    let mut dp2 = Datapath::load(&Datapath::pin_dir_for(&format!("{LAB}-n2"))).unwrap();

    // One probe datagram: the policy is in force, per connection, and the path works.
    let probe = soak
        .lab
        .exec(
            "soaksend-1",
            &argv(&[
                "python3",
                "-c",
                SENDER,
                &send_ip,
                &recv_ip,
                "1000",
                "1",
                &ports,
                &PROBE_SPORT.to_string(),
            ]),
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(probe.status.success(), "the probe sender ran");
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.counts().0 < 1 {
        assert!(
            Instant::now() < deadline,
            "the probe datagram did not arrive in 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let probe_entry = listed("n1").iter().any(|e| {
        e["connection"]
            .as_str()
            .is_some_and(|c| c.contains(&format!(":{PROBE_SPORT} ")))
    });
    assert!(probe_entry, "n1 holds the probe's per-connection entry");
    let pairs_before: BTreeSet<Entry> = listed_keys("n1")
        .into_iter()
        .filter(|e| e.3.is_empty())
        .collect();
    let ordinary_before = listed("n1").iter().any(|e| {
        e["local"]["labels"]["app"] == "client2"
            && e["remote"]["labels"]["app"] == "demodeployment"
            && e["remote"]["node"] == "n2"
    });
    eprintln!(
        "soak: lab ready in {:.0} s; n1's agent pid {pid1}, metrics {addr1}; {} pair entries on n1",
        t_setup.elapsed().as_secs_f64(),
        pairs_before.len()
    );
    // Let the probe's handshake and the lab settle.
    std::thread::sleep(Duration::from_secs(3));

    let read_counters =
        |receiver: &mut Receiver, dp1: &mut Datapath, dp2: &mut Datapath| Counters {
            sender_tx: eth0_tx(&send_netns),
            n1: dp1.stats().unwrap(),
            nfq: nfqueue("n1"),
            n1_metrics: metrics("n1", addr1),
            n2: dp2.stats().unwrap(),
            n2_metrics: metrics("n2", addr2),
            recv_udp: udp_snmp(&recv_netns),
            received: receiver.counts(),
        };
    let before = read_counters(&mut receiver, &mut dp1, &mut dp2);
    let tck = clk_tck();
    let t0 = Instant::now();
    let start = sample(t0, pid1, addr1);
    let start2 = (status_kb(pid2, "VmRSS"), cpu_ticks(pid2));
    let threads_start = thread_ticks(pid1);

    // The soak.
    let mut sender = soak
        .lab
        .exec(
            "soaksend-1",
            &argv(&[
                "python3",
                "-c",
                SENDER,
                &send_ip,
                &recv_ip,
                &rate.to_string(),
                &count.to_string(),
                &ports,
                &SPORT_FIRST.to_string(),
            ]),
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut samples = vec![start];
    let mut mid: Option<std::thread::JoinHandle<String>> = None;
    let mut peak2 = start2.0;
    let sent_json = loop {
        let next = t0 + Duration::from_secs(samples.len() as u64);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        samples.push(sample(t0, pid1, addr1));
        peak2 = peak2.max(status_kb(pid2, "VmRSS"));
        if mid.is_none() && t0.elapsed() >= Duration::from_secs(secs / 2) {
            let (ip3, _) = soak.pod("demodeployment-3");
            let mut cmd = soak
                .lab
                .exec("client2-1", &argv(&["python3", "-c", GET, &ip3]))
                .unwrap();
            mid = Some(std::thread::spawn(move || {
                let out = cmd.output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            }));
        }
        if let Some(status) = sender.try_wait().unwrap() {
            assert!(status.success(), "the sender failed");
            let mut text = String::new();
            sender
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            break text;
        }
    };
    let soak_end = samples.len() - 1;
    let threads_end = thread_ticks(pid1);
    let sent: serde_json::Value = serde_json::from_str(&sent_json).unwrap();
    let mid = mid.map(|h| h.join().unwrap()).unwrap_or_default();

    // The last held packets time out (3 s), the queue empties, the counters are mirrored (1 s).
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = sample(t0, pid1, addr1);
        samples.push(s);
        if (s.queue == 0 && s.waiting == 0 && nfqueue("n1").total == 0) || Instant::now() > settle {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = read_counters(&mut receiver, &mut dp1, &mut dp2);
    let settled = samples.len() - 1;
    // Under the soak's state (its per-connection entries not drained yet): what n1's agent
    // lists and what its kernel map holds, read until two reads agree (the agent's tick may
    // revoke entries between them).
    let hwm_before_list = status_kb(pid1, "VmHWM");
    let mut loaded = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..5 {
        loaded = (listed_keys("n1"), kernel_keys(&mut dp1, &nodes));
        if loaded.0 == loaded.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let hwm_after_list = status_kb(pid1, "VmHWM");
    let loaded_diff = (
        loaded.0.difference(&loaded.1).count(),
        loaded.1.difference(&loaded.0).count(),
    );

    // The drain of the per-connection entries: until both agents hold their pair entries only
    // (n1's include the mid-soak request's new pair).
    let pair_count = |node: &str| {
        listed(node)
            .iter()
            .filter(|e| e["connection"].is_null())
            .count() as u64
    };
    let (pairs1, pairs2) = (pair_count("n1"), pair_count("n2"));
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let drain_t = Instant::now();
    let mut drained = false;
    while Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_secs(1));
        let s = sample(t0, pid1, addr1);
        samples.push(s);
        peak2 = peak2.max(status_kb(pid2, "VmRSS"));
        let n2_entries = metric(&metrics("n2", addr2), "meshauth_agent_auth_entries");
        if s.entries <= pairs1 && n2_entries <= pairs2 {
            drained = true;
            break;
        }
    }
    let drain_secs = drain_t.elapsed().as_secs_f64();
    let end2 = (status_kb(pid2, "VmRSS"), cpu_ticks(pid2));

    // ---- Figures.
    let attempted = sent["attempted"].as_u64().unwrap();
    let errors: u64 = sent["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let elapsed = sent["elapsed"].as_f64().unwrap();
    let marks: Vec<u64> = sent["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let per_sec: Vec<u64> = marks
        .iter()
        .scan(0, |prev, m| {
            let d = m - *prev;
            *prev = *m;
            Some(d)
        })
        .collect();
    let d = |a: u64, b: u64| b.saturating_sub(a);
    let held_of = |s: &meshauth_datapath::Stats| {
        s.dropped
            .get(&(Direction::Egress, DropReason::AuthenticationRequired))
            .copied()
            .unwrap_or(0)
    };
    let fwd_of =
        |s: &meshauth_datapath::Stats, dir: Direction| s.forwarded.get(&dir).copied().unwrap_or(0);
    let m1 = |c: &Counters, k: &str| metric(&c.n1_metrics, k);
    let dm1 = |k: &str| d(m1(&before, k), m1(&after, k));
    let dm1_sum = |p: &str| {
        d(
            metric_sum(&before.n1_metrics, p),
            metric_sum(&after.n1_metrics, p),
        )
    };
    let hold = |reason: &str| {
        dm1(&format!(
            "meshauth_agent_hold_dropped_packets_total{{reason=\"{reason}\"}}"
        ))
    };

    let veth_tx = d(before.sender_tx.0, after.sender_tx.0);
    let veth_drop = d(before.sender_tx.1, after.sender_tx.1);
    let held = d(held_of(&before.n1), held_of(&after.n1));
    let n1_egress_fwd = d(
        fwd_of(&before.n1, Direction::Egress),
        fwd_of(&after.n1, Direction::Egress),
    );
    let n1_other_drops: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| **r != DropReason::AuthenticationRequired)
        .map(|r| {
            let k = (Direction::Egress, *r);
            let n = d(
                before.n1.dropped.get(&k).copied().unwrap_or(0),
                after.n1.dropped.get(&k).copied().unwrap_or(0),
            );
            (r, n)
        })
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r:?} {n}"))
        .collect();
    let events_lost = d(before.n1.events_lost, after.n1.events_lost);
    let q_dropped = d(before.nfq.queue_dropped, after.nfq.queue_dropped);
    let q_user = d(before.nfq.user_dropped, after.nfq.user_dropped);
    let q_handed = d(before.nfq.id_sequence, after.nfq.id_sequence);
    let released = dm1("meshauth_agent_hold_released_packets_total");
    let (h_timeout, h_failed, h_overflow, h_unknown) = (
        hold("Timeout"),
        hold("AuthFailed"),
        hold("Overflow"),
        hold("Unknown"),
    );
    // What the agent counted of the kernel's NFQUEUE drops (it reads the kernel's counters
    // each second).
    let (h_kernel_socket, h_kernel_queue) = (hold("KernelSocketFull"), hold("KernelQueueFull"));
    let waiting = m1(&after, "meshauth_agent_hold_waiting_packets");
    let overflow = dm1("meshauth_agent_auth_queue_overflow_total");
    let init_ok =
        dm1("meshauth_agent_auth_handshakes_total{role=\"Initiator\",result=\"Success\"}");
    let init_all = dm1_sum("meshauth_agent_auth_handshakes_total{role=\"Initiator\"");
    let init_failed: Vec<String> = after
        .n1_metrics
        .iter()
        .filter(|(k, _)| {
            k.starts_with("meshauth_agent_auth_handshakes_total{role=\"Initiator\"")
                && !k.contains("Success")
        })
        .map(|(k, v)| {
            let b = metric(&before.n1_metrics, k);
            (
                k.split("result=\"")
                    .nth(1)
                    .unwrap_or("")
                    .trim_end_matches("\"}")
                    .to_owned(),
                (*v as u64).saturating_sub(b),
            )
        })
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let hs_count = dm1("meshauth_agent_auth_handshake_duration_seconds_count");
    let hs_sum = after
        .n1_metrics
        .get("meshauth_agent_auth_handshake_duration_seconds_sum")
        .copied()
        .unwrap_or(0.0)
        - before
            .n1_metrics
            .get("meshauth_agent_auth_handshake_duration_seconds_sum")
            .copied()
            .unwrap_or(0.0);
    let m2 = |c: &Counters, k: &str| metric(&c.n2_metrics, k);
    let resp_ok = d(
        m2(
            &before,
            "meshauth_agent_auth_handshakes_total{role=\"Responder\",result=\"Success\"}",
        ),
        m2(
            &after,
            "meshauth_agent_auth_handshakes_total{role=\"Responder\",result=\"Success\"}",
        ),
    );
    let resp_all = d(
        metric_sum(
            &before.n2_metrics,
            "meshauth_agent_auth_handshakes_total{role=\"Responder\"",
        ),
        metric_sum(
            &after.n2_metrics,
            "meshauth_agent_auth_handshakes_total{role=\"Responder\"",
        ),
    );
    let n2_init = d(
        metric_sum(
            &before.n2_metrics,
            "meshauth_agent_auth_handshakes_total{role=\"Initiator\"",
        ),
        metric_sum(
            &after.n2_metrics,
            "meshauth_agent_auth_handshakes_total{role=\"Initiator\"",
        ),
    );
    let n2_in_fwd = d(
        fwd_of(&before.n2, Direction::Ingress),
        fwd_of(&after.n2, Direction::Ingress),
    );
    let n2_in_auth = d(
        before
            .n2
            .dropped
            .get(&(Direction::Ingress, DropReason::AuthenticationRequired))
            .copied()
            .unwrap_or(0),
        after
            .n2
            .dropped
            .get(&(Direction::Ingress, DropReason::AuthenticationRequired))
            .copied()
            .unwrap_or(0),
    );
    let udp = |c: &Counters, k: &str| c.recv_udp.get(k).copied().unwrap_or(0);
    let in_dgrams = d(udp(&before, "InDatagrams"), udp(&after, "InDatagrams"));
    let rcvbuf = d(udp(&before, "RcvbufErrors"), udp(&after, "RcvbufErrors"));
    let received = d(before.received.0, after.received.0);
    let distinct = d(before.received.1, after.received.1);

    // The mid-soak request's packets share the counters: its SYNs (1 + retransmissions) were
    // held on n1 like the soak's datagrams.
    let mid_fields: Vec<&str> = mid.split_whitespace().collect();
    let mid_status = mid_fields.first().copied().unwrap_or("0");
    let mid_ms = mid_fields.get(1).copied().unwrap_or("?");
    let mid_retrans: u64 = mid_fields.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);

    let soak_samples = &samples[..=soak_end];
    let rss_start = start.rss_kb;
    let rss_peak = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
    let hwm_end = samples.last().map(|s| s.hwm_kb).unwrap_or(0);
    // The soak's peak: VmHWM counts what happened between samples too (it also holds the
    // agent's startup peak, below the soak's), read before the bench's own `auth list` of the
    // soak's entries (an admin RPC that costs memory of its own, shown apart), then the VmRSS
    // sampled during the drain.
    let peak = rss_peak.max(hwm_before_list);
    let rss_end_soak = samples[soak_end].rss_kb;
    let rss_settled = samples[settled].rss_kb;
    let rss_drained = samples.last().map(|s| s.rss_kb).unwrap_or(0);
    let window = |from: f64, to: f64| -> Vec<f64> {
        soak_samples
            .iter()
            .filter(|s| s.t > from && s.t <= to)
            .map(|s| s.rss_kb as f64 / 1024.0)
            .collect()
    };
    let soak_t = soak_samples.last().map(|s| s.t).unwrap_or(0.0);
    let first10 = mean(&window(0.0, 10.0));
    let prev10 = mean(&window(soak_t - 20.0, soak_t - 10.0));
    let last10 = mean(&window(soak_t - 10.0, soak_t));
    let cpu_soak =
        (samples[soak_end].ticks - start.ticks) as f64 / tck / (samples[soak_end].t - start.t)
            * 100.0;
    let cpu2 = (end2.1 - start2.1) as f64 / tck / (samples.last().unwrap().t - start.t) * 100.0;
    let max_entries = samples.iter().map(|s| s.entries).max().unwrap_or(0);
    let max_queue = samples.iter().map(|s| s.queue).max().unwrap_or(0);
    let max_waiting = samples.iter().map(|s| s.waiting).max().unwrap_or(0);

    println!(
        "soak: {rate} auth-required signals/s for {secs} s, soaksend-1 (n1) -> soakrecv-2 (n2) UDP {PORT_FIRST}-{PORT_LAST}, per connection (load average at the start: {load})"
    );
    println!(
        "   n1's agent, every 5 s (t: VmRSS, VmHWM, RssAnon, VmData, auth entries, auth queue, held packets; per second over the last 5 s: handshakes, hold released, hold dropped, auth queue overflow):"
    );
    println!(
        "     {:5.0} s  {:>8}  {:>8}  {:>8}  {:>8}  {:>6}  {:>5}  {:>5}   (the start)",
        start.t,
        mb(start.rss_kb),
        mb(start.hwm_kb),
        mb(start.anon_kb),
        mb(start.data_kb),
        start.entries,
        start.queue,
        start.waiting
    );
    for w in samples.windows(6).step_by(5) {
        let (a, b) = (w[0], w[5]);
        let per = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / (b.t - a.t);
        println!(
            "     {:5.0} s  {:>8}  {:>8}  {:>8}  {:>8}  {:>6}  {:>5}  {:>5}   {:6.0} {:6.0} {:6.0} {:6.0}{}",
            b.t,
            mb(b.rss_kb),
            mb(b.hwm_kb),
            mb(b.anon_kb),
            mb(b.data_kb),
            b.entries,
            b.queue,
            b.waiting,
            per(a.handshakes, b.handshakes),
            per(a.released, b.released),
            per(a.hold_dropped, b.hold_dropped),
            per(a.overflow, b.overflow),
            if b.t <= soak_t + 0.5 {
                ""
            } else {
                "  (after the soak)"
            }
        );
    }
    println!(
        "   sent: {attempted} datagrams of distinct 5-tuples in {elapsed:.2} s: {:.0}/s (per second: min {}, max {}); send errors {errors} {}",
        attempted as f64 / elapsed,
        per_sec.iter().min().copied().unwrap_or(0),
        per_sec.iter().max().copied().unwrap_or(0),
        sent["errors"]
    );
    println!("   where each signal went (counter deltas over the soak and 3+ s after it):");
    println!("     sender pod's eth0: tx {veth_tx}, tx dropped {veth_drop}");
    println!(
        "     n1 datapath, egress (all of n1's pods): held for authentication {held} (ma_stats AUTH_REQUIRED: counted as `datapath_drops{{reason=\"AuthenticationRequired\"}}`), forwarded {n1_egress_fwd}, other drops [{}]; events lost (ring buffer full) {events_lost}",
        n1_other_drops.join(", ")
    );
    println!(
        "     n1 NFQUEUE {}: handed to the agent {q_handed}, dropped as the queue was full {q_dropped}, dropped as the agent's socket was full {q_user} (the agent counted {h_kernel_queue} and {h_kernel_socket})",
        meshauth_agent::hold::QUEUE
    );
    println!(
        "     n1 hold queue: released {released}; dropped: timeout {h_timeout}, overflow {h_overflow}, auth failed {h_failed}, unknown flow {h_unknown}; still waiting {waiting}"
    );
    let hold_drops = h_timeout + h_overflow + h_failed + h_unknown;
    let in_agent = released + hold_drops + waiting;
    let accounted = in_agent + q_user + q_dropped;
    let others = 1 + mid_retrans;
    println!(
        "     NFQUEUE: held {held} = handed {q_handed} + dropped as full {q_dropped}: remainder {}; handed {q_handed} = read by the agent {} + socket full {q_user}",
        held as i64 - (q_handed + q_dropped) as i64,
        q_handed.saturating_sub(q_user)
    );
    println!(
        "     held = released + hold drops + waiting (the agent's metrics) + NFQUEUE drops (the kernel's counters): {held} = {released} + {hold_drops} + {waiting} + ({q_user} + {q_dropped}) = {accounted}: remainder {}",
        held as i64 - accounted as i64
    );
    let uncounted = (q_user + q_dropped).saturating_sub(h_kernel_socket + h_kernel_queue);
    println!(
        "     signals the kernel dropped: {} of {held} held ({:.1} %); of those, counted by no metric of the agent: {uncounted}",
        q_user + q_dropped,
        (q_user + q_dropped) as f64 * 100.0 / held.max(1) as f64
    );
    let extra = held as i64 - (attempted - errors - veth_drop) as i64;
    println!(
        "     sent vs held: held {held} - (sent {attempted} - send errors {errors} - veth drops {veth_drop}) = {extra}: the mid-soak HTTP request's SYNs held (1 to {others}: 1 + {mid_retrans} retransmitted)"
    );
    println!(
        "     n1 auth manager: {init_all} handshakes initiated ({init_ok} succeeded{}; mean {:.2} ms connect to verdict), {overflow} requests dropped as the auth queue was full; peak queue {max_queue}, peak held {max_waiting}, peak entries {max_entries}",
        if init_failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", init_failed.join(", "))
        },
        if hs_count > 0 {
            hs_sum / hs_count as f64 * 1e3
        } else {
            f64::NAN
        }
    );
    println!(
        "     handshakes that released nothing (their datagram dropped after its request was queued): {init_ok} succeeded - {released} released = {}",
        init_ok as i64 - released as i64
    );
    println!(
        "     n2: {resp_all} handshakes answered ({resp_ok} succeeded), {n2_init} initiated; ingress forwarded {n2_in_fwd}, dropped for authentication {n2_in_auth}; receiver got {received} datagrams ({distinct} distinct 5-tuples), UDP InDatagrams {in_dgrams}, RcvbufErrors {rcvbuf}"
    );
    println!(
        "     released vs received: {released} released - {others} of the mid-soak request (at most) .. {released} vs {received} received"
    );
    println!(
        "   n1's agent memory: VmRSS at the start {} (VmHWM {}, VmData {}), highest sampled {}, at the end of the soak {}, settled {}, drained {}; peak (VmHWM before the bench's `auth list`, or VmRSS sampled later) {} (+{:.1} MB over the start's VmRSS); VmHWM at the end {}; VmData at the end {}",
        mb(rss_start),
        mb(start.hwm_kb),
        mb(start.data_kb),
        mb(rss_peak),
        mb(rss_end_soak),
        mb(rss_settled),
        mb(rss_drained),
        mb(peak),
        (peak as f64 - rss_start as f64) / 1024.0,
        mb(hwm_end),
        mb(samples.last().map(|s| s.data_kb).unwrap_or(0))
    );
    println!(
        "   n1's agent VmHWM when the counters had settled {}, after the bench's `auth list` of its {} entries {}",
        mb(hwm_before_list),
        loaded.0.len(),
        mb(hwm_after_list)
    );
    println!(
        "   n1's agent mean VmRSS: first 10 s {first10:.1} MB, 10 s before the last {prev10:.1} MB, last 10 s {last10:.1} MB; CPU during the soak {cpu_soak:.0} % of one core"
    );
    let soak_secs = samples[soak_end].t - start.t;
    let mut busiest: Vec<(String, f64)> = threads_end
        .iter()
        .map(|(name, t)| {
            let t0 = threads_start.get(name).copied().unwrap_or(0);
            (
                name.clone(),
                t.saturating_sub(t0) as f64 / tck / soak_secs * 100.0,
            )
        })
        .collect();
    busiest.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "   n1's agent threads during the soak (% of one core, summed by name): {}",
        busiest
            .iter()
            .take(5)
            .map(|(n, p)| format!("{n} {p:.0} %"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "   n2's agent (responder): VmRSS at the start {}, peak {}, at the end {}; CPU {cpu2:.0} % of one core",
        mb(start2.0),
        mb(peak2),
        mb(end2.0)
    );
    println!(
        "   mid-soak: client2-1 (n1) -> demodeployment-3 (n3), a new pair: HTTP {mid_status} in {mid_ms} ms ({mid_retrans} TCP retransmissions)"
    );
    println!(
        "   per-connection entries drained (n1 to its {pairs1} pair entries, n2 to its {pairs2}) in {drain_secs:.0} s after the counters settled: {}",
        if drained { "yes" } else { "NO" }
    );

    // ---- Checks.
    println!("   checks:");
    check(
        peak as f64 <= rss_start as f64 + PEAK_BOUND_MB * 1024.0,
        format!(
            "n1's peak memory during the soak and drain {} within {PEAK_BOUND_MB} MB of its VmRSS at the start {}",
            mb(peak),
            mb(rss_start)
        ),
    );
    check(
        last10 - prev10 <= LATE_GROWTH_BOUND_MB,
        format!(
            "n1's mean VmRSS of the soak's last 10 s ({last10:.1} MB) within {LATE_GROWTH_BOUND_MB} MB of the 10 s before ({prev10:.1} MB)"
        ),
    );
    check(
        (0..=others as i64).contains(&extra),
        format!(
            "every datagram sent reached n1's datapath as an auth-required signal (held {extra} more than sent: the mid-soak request's SYNs, at most {others})"
        ),
    );
    check(
        held == accounted,
        format!(
            "every held signal accounted for by some counter (released, dropped by a reason, waiting, dropped by NFQUEUE): remainder {}",
            held as i64 - accounted as i64
        ),
    );
    check(
        h_kernel_socket == q_user && h_kernel_queue == q_dropped,
        format!(
            "every dropped signal counted by the agent's metrics: of the kernel's NFQUEUE drops, {q_user} as the agent's socket was full and {q_dropped} as the queue was full, the agent counted {h_kernel_socket} and {h_kernel_queue} (hold_dropped_packets{{reason=\"KernelSocketFull\"|\"KernelQueueFull\"}})"
        ),
    );
    check(
        mid_status == "200",
        format!("mid-soak: a new pair of n1 authenticated and passed (HTTP {mid_status})"),
    );
    check(
        drained,
        format!("n1's and n2's per-connection entries drained within {DRAIN_LIMIT:?}"),
    );
    check(
        healthy("n1") && healthy("n2"),
        "n1's and n2's agents ready (agent healthcheck)".into(),
    );
    let n2_conn = listed_keys("n2").iter().filter(|e| !e.3.is_empty()).count();
    check(
        n2_conn == 0,
        format!("n2's per-connection entries drained: {n2_conn} left"),
    );
    // The agent's list and the kernel map, read until two reads in a row agree with each other.
    check(
        loaded_diff == (0, 0),
        format!(
            "with the soak's entries (counters settled): n1's listed entries ({}) equal its kernel auth map's ({}): {} only listed, {} only in the kernel",
            loaded.0.len(),
            loaded.1.len(),
            loaded_diff.0,
            loaded_diff.1
        ),
    );
    let (mut agent_keys, mut kernel) = (listed_keys("n1"), kernel_keys(&mut dp1, &nodes));
    for _ in 0..5 {
        if agent_keys == kernel {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        agent_keys = listed_keys("n1");
        kernel = kernel_keys(&mut dp1, &nodes);
    }
    check(
        agent_keys == kernel,
        format!(
            "after the drain: n1's listed entries ({}) equal its kernel auth map's ({}): {} only listed, {} only in the kernel",
            agent_keys.len(),
            kernel.len(),
            agent_keys.difference(&kernel).count(),
            kernel.difference(&agent_keys).count()
        ),
    );
    let pairs_after: BTreeSet<Entry> = agent_keys
        .iter()
        .filter(|e| e.3.is_empty())
        .cloned()
        .collect();
    check(
        pairs_before.is_subset(&pairs_after),
        format!(
            "the {} pair entries n1 held before the soak are still there ({} pair entries now)",
            pairs_before.len(),
            pairs_after.len()
        ),
    );
    let (ip2, _) = soak.pod("demodeployment-2");
    let out = soak
        .lab
        .exec("client2-1", &argv(&["python3", "-c", GET, &ip2]))
        .unwrap()
        .output()
        .unwrap();
    let get = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let ordinary_after = listed("n1").iter().any(|e| {
        e["local"]["labels"]["app"] == "client2"
            && e["remote"]["labels"]["app"] == "demodeployment"
            && e["remote"]["node"] == "n2"
    });
    check(
        get.starts_with("200 ") && !ordinary_before && ordinary_after,
        format!(
            "after the soak: client2-1 (n1) -> demodeployment-2 (n2), a new pair, authenticated and passed (status, ms, retransmissions: {get}; its entry on n1: before {ordinary_before}, after {ordinary_after})"
        ),
    );
    let rss_final = status_kb(pid1, "VmRSS");
    println!("   n1's agent VmRSS after the checks: {}", mb(rss_final));
    drop(receiver);
    drop(soak);
    failures
}
