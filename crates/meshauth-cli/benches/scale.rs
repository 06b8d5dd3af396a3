//! The scale benchmark of "Enforcement that means what policy says", with real processes.
//!
//! Run as root: `cargo bench -p meshauth-cli --bench scale` (figures in docs/benchmarks.md).
//!
//! 1. **CPU at rest.** A lab (`bscale`) of five nodes: n1 holds 40 pods of 40 identities
//!    (`app=l<i>,side=local`), n2..n5 hold 200 pods of 200 identities (`app=r<j>,side=remote`,
//!    50 per node), placed through the control plane (`meshauth pod create`). A `meshauth
//!    server` on the underlay, a `meshauth agent run --lab` in every node (as `meshauth demo`
//!    starts them, with tokens binding each node's address and pod range), and two policies:
//!    the local apps may send to the remote apps only authenticated (egress,
//!    `authentication.mode: required`), the remote apps accept ingress from the local apps. Once every agent passes `agent healthcheck`
//!    and the cluster settled, n1's agent's CPU (utime+stime from `/proc/<pid>/stat`, and the
//!    threads' schedstat for ns resolution) is sampled at rest and its VmRSS read.
//! 2. **New pairs per second.** One python3 process per local pod sends one UDP datagram to
//!    every remote pod, all 40 released at once: 8,000 new pairs. Like a client retrying,
//!    each sends again every second while the bench waits. The time until n1's kernel auth map
//!    (which the agent writes as it tracks each entry) holds all 8,000 entries gives pairs/s;
//!    the agent's own gauge, counters and `observe --verdict FAILED` show what failed.
//! 3. **The whole agent at 1,000 identities and 100,000 auth entries.** Every agent is
//!    stopped (SIGTERM). 760 more remote identities are placed through the control plane, each
//!    on every remote node (3,040 more pods, which no node runs: placement alone justifies an
//!    entry toward a node), so the cluster has 1,000 identities and 3,240 remote placements.
//!    The bench then seeds n1's pinned kernel auth map with entries for (local identity,
//!    remote identity, remote node) triples policy requires, up to 100,000, as a previous run
//!    of the agent would have left them (this is the bench-only seeding path: no agent code
//!    exists for it), and starts n1's agent again without a token. The agent adopts the
//!    entries through its restart path, tracks them, re-checks them against policy and
//!    placement (they are all justified, so none is revoked), and the bench samples its CPU at
//!    rest, its VmRSS and VmHWM, the kernel map's count and the maps' `memlock`.
//!
//! Diagnostics: `MESHAUTH_SCALE_AGENT_ARGS="--auth-workers 16"` adds flags to every agent (the
//! recorded figures use the defaults); `MESHAUTH_SCALE_PERF=<dir>` `perf record`s n1's agent
//! during the rest windows and the pairs into `<dir>/{rest,pairs,rest-8000}.perf.data` (left
//! there for `perf report -i`).
//!
//! Everything it creates (the lab, its pins, the bench's pins, processes, the work directory)
//! is removed at the end, on failure and on SIGINT/SIGTERM. Traffic stays inside the lab.

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use meshauth_datapath::Datapath;
use meshauth_lab::Lab;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const LAB: &str = "bscale";
const LOCAL: usize = 40;
const REMOTE: usize = 200;
const REMOTE_NODES: usize = 4;
const PAIRS: usize = LOCAL * REMOTE;
const TRUST_DOMAIN: &str = "scale.meshauth.local";
/// Every agent's `/metrics` and `/readyz`, on its node namespace's loopback.
const METRICS: &str = "127.0.0.1:9091";
/// How long n1's agent is sampled at rest.
const REST_WINDOW: Duration = Duration::from_secs(20);
/// How long n1's agent is sampled at rest again, holding the 8,000 entries.
const REST_AFTER: Duration = Duration::from_secs(20);
/// How long the cluster is left alone after every agent is ready, before sampling.
const SETTLE: Duration = Duration::from_secs(10);
/// How often the senders send again while pairs are missing.
const RESEND: Duration = Duration::from_secs(1);
/// The longest the bench waits for the 8,000 pairs.
const PAIRS_LIMIT: Duration = Duration::from_secs(180);
/// How often the kernel map is counted while pairs authenticate.
const POLL: Duration = Duration::from_millis(200);
/// Part 3: identities in the cluster, and auth entries n1's agent holds.
const STATE_IDENTITIES: u32 = 1000;
const STATE_ENTRIES: usize = 100_000;
/// Diagnostics: a command that wraps n1's agent in part 3 (e.g. `heaptrack -o <file>`).
const WRAP_ENV: &str = "MESHAUTH_SCALE_N1_WRAP";
/// Diagnostics: the binary the wrapper runs (default: the bench's own `meshauth`).
const WRAP_BIN_ENV: &str = "MESHAUTH_SCALE_N1_BIN";
/// Diagnostics: a directory to `perf record` n1's agent into during both rest windows.
const PERF_ENV: &str = "MESHAUTH_SCALE_PERF";
/// Diagnostics: extra flags for every `meshauth agent run` (e.g. `--auth-queue 8192`),
/// separated by spaces; the recorded figures use none.
const AGENT_ARGS_ENV: &str = "MESHAUTH_SCALE_AGENT_ARGS";

const POLICIES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: scale-local-egress-auth
spec:
  endpointSelector:
    matchLabels:
      side: local
  egress:
  - toEndpoints:
    - matchLabels:
        side: remote
    authentication:
      mode: required
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: scale-remote-ingress
spec:
  endpointSelector:
    matchLabels:
      side: remote
  ingress:
  - fromEndpoints:
    - matchLabels:
        side: local
"#;

/// One sender per local pod: prints "ready", waits for a line, then sends one datagram to
/// every address given, again every `interval` s until its stdin closes (at most 300 s).
const SENDER: &str = r#"
import select, socket, sys, time
interval = float(sys.argv[1])
ips = sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
print("ready", flush=True)
if not sys.stdin.readline():
    sys.exit(0)
end = time.monotonic() + 300
rounds = 0
while time.monotonic() < end:
    for ip in ips:
        try:
            s.sendto(b"meshauth-scale", (ip, 9))
        except OSError:
            pass
    rounds += 1
    r, _, _ = select.select([sys.stdin], [], [], interval)
    if r and not sys.stdin.readline():
        break
print(rounds, flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// What the bench owns, removed on every exit path.

struct Owned {
    children: Vec<(String, Child)>,
    lab: Option<Lab>,
    pins: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

static OWNED: Mutex<Owned> = Mutex::new(Owned {
    children: Vec::new(),
    lab: None,
    pins: Vec::new(),
    dirs: Vec::new(),
});

fn owned<R>(f: impl FnOnce(&mut Owned) -> R) -> R {
    f(&mut OWNED.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Kills the children this bench started (by their pid), then the lab (whatever else runs
/// in its namespaces, its namespaces, hosts files and pins), the bench's own pins and its work
/// directory. Idempotent.
fn cleanup() {
    let (children, lab, pins, dirs) = owned(|o| {
        (
            std::mem::take(&mut o.children),
            o.lab.take(),
            std::mem::take(&mut o.pins),
            std::mem::take(&mut o.dirs),
        )
    });
    for (_, mut c) in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(lab) = lab
        && let Err(e) = lab.down()
    {
        eprintln!("scale: cleanup: lab down: {e}");
    }
    for p in pins {
        let _ = Datapath::remove_pins(&p);
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Stops the children whose name starts with `prefix` (SIGKILL, by pid).
fn kill_children(prefix: &str) {
    let gone: Vec<(String, Child)> = owned(|o| {
        let (gone, keep) = std::mem::take(&mut o.children)
            .into_iter()
            .partition(|(n, _)| n.starts_with(prefix));
        o.children = keep;
        gone
    });
    for (_, mut c) in gone {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// On SIGINT or SIGTERM: clean up and exit.
fn on_signal_cleanup() {
    let spawned = std::thread::Builder::new()
        .name("scale-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("scale: interrupted: cleaning up");
                cleanup();
                std::process::exit(130);
            });
        });
    if let Err(e) = spawned {
        eprintln!("scale: no signal handler ({e}): an interrupt leaves the lab up");
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn wait_until<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a command to completion within `limit` (killed, by its pid, if it takes longer).
fn output_within(cmd: &mut Command, limit: Duration) -> anyhow::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// How long a CLI command or tool may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn clk_tck() -> f64 {
    output_within(Command::new("getconf").arg("CLK_TCK"), COMMAND_LIMIT)
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// Time on CPU per thread (name, ns) from `/proc/<pid>/task/*/schedstat`.
fn thread_ns(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let name = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        *out.entry(format!("{name}#{}", t.file_name().to_string_lossy()))
            .or_default() += ns;
    }
    out
}

/// With `MESHAUTH_SCALE_PERF=<dir>`: `perf record`s `pid` into `<dir>/<name>.perf.data`
/// until [`perf_stop`] (perf's own CPU is not the agent's). Returns perf's pid.
fn perf_start(pid: u32, name: &str) -> anyhow::Result<Option<u32>> {
    let Some(dir) = std::env::var_os(PERF_ENV) else {
        return Ok(None);
    };
    let out = PathBuf::from(dir).join(format!("{name}.perf.data"));
    let child = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf")?;
    let perf_pid = child.id();
    owned(|o| o.children.push((format!("perf-{name}"), child)));
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(perf_pid))
}

/// Stops a recording of [`perf_start`] (SIGINT, so that it writes its file; bounded).
fn perf_stop(perf: Option<u32>, name: &str) {
    let Some(perf_pid) = perf else {
        return;
    };
    let _ = Command::new("kill")
        .args(["-INT", &perf_pid.to_string()])
        .status();
    let _ = wait_until(Duration::from_secs(20), "perf to finish", || {
        owned(|o| {
            o.children
                .iter_mut()
                .find(|(n, _)| *n == format!("perf-{name}"))
                .and_then(|(_, c)| c.try_wait().ok().flatten())
        })
    });
    kill_children(&format!("perf-{name}"));
}

/// A process's CPU over a window at rest.
struct Rest {
    /// utime + stime, percent of one core.
    pct: f64,
    /// The threads' schedstat, percent of one core.
    pct_ns: f64,
    wall: f64,
    /// Threads by CPU, percent of one core.
    by_thread: Vec<(String, f64)>,
}

impl Rest {
    /// Samples `pid` over `window` (and `perf record`s it meanwhile, see [`perf_start`]).
    fn sample(pid: u32, window: Duration, name: &str) -> anyhow::Result<Rest> {
        let hz = clk_tck();
        let perf = perf_start(pid, name)?;
        let (c0, th0, t) = (cpu_ticks(pid)?, thread_ns(pid), Instant::now());
        std::thread::sleep(window);
        let (c1, th1, wall) = (cpu_ticks(pid)?, thread_ns(pid), t.elapsed().as_secs_f64());
        perf_stop(perf, name);
        let ns: u64 = th1.values().sum::<u64>() - th0.values().sum::<u64>();
        let mut by_thread: Vec<(String, f64)> = th1
            .iter()
            .map(|(n, v)| {
                let b = th0.get(n).copied().unwrap_or(0);
                (n.clone(), (v - b) as f64 / 1e9 / wall * 100.0)
            })
            .filter(|(_, p)| *p >= 0.005)
            .collect();
        by_thread.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(Rest {
            pct: (c1 - c0) as f64 / hz / wall * 100.0,
            pct_ns: ns as f64 / 1e9 / wall * 100.0,
            wall,
            by_thread,
        })
    }

    fn text(&self) -> String {
        format!(
            "{:.2} % of one core (utime+stime over {:.1} s; threads' schedstat {:.3} %)",
            self.pct, self.wall, self.pct_ns
        )
    }

    fn threads(&self) -> String {
        self.by_thread
            .iter()
            .take(6)
            .map(|(n, p)| format!("{n} {p:.3} %"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// `memlock` of a pinned map, as `bpftool map show` reports it.
fn memlock(pin: &Path) -> String {
    let out = output_within(
        Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(pin),
        COMMAND_LIMIT,
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default();
    out.split_whitespace()
        .skip_while(|w| *w != "memlock")
        .nth(1)
        .unwrap_or("unknown")
        .to_owned()
}

/// GET `path` from an agent's metrics listener inside node namespace `netns`.
fn http_get(netns: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    let r = meshauth_datapath::netns::run_in(
        &meshauth_datapath::netns::named(netns),
        move || -> std::io::Result<(u16, String)> {
            let addr: std::net::SocketAddr = METRICS.parse().map_err(std::io::Error::other)?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let code = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
            Ok((code, body.to_owned()))
        },
    )?;
    Ok(r?)
}

/// The samples of a Prometheus text body: `name{labels}` -> value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if !meshauth_test_support::is_root() {
        eprintln!(
            "scale: needs root (it builds a network-namespace lab and loads eBPF programs): run as root"
        );
        std::process::exit(1);
    }
    on_signal_cleanup();
    let result = std::panic::catch_unwind(run);
    let failed = match &result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("panicked".to_owned()),
    };
    if failed.is_some() {
        show_logs();
    }
    cleanup();
    if let Some(e) = failed {
        eprintln!("scale: {e}");
        std::process::exit(1);
    }
}

fn work() -> PathBuf {
    PathBuf::from(meshauth_lab::STATE_DIR).join(LAB)
}

/// On failure: the last lines of each process's log (the work directory goes with cleanup).
fn show_logs() {
    let Ok(dir) = std::fs::read_dir(work()) else {
        return;
    };
    for e in dir.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last lines)", p.display());
            for l in &lines[lines.len().saturating_sub(8)..] {
                eprintln!("{l}");
            }
        }
    }
}

struct Agent {
    node: String,
    netns: String,
    socket: String,
    pid: u32,
    /// Its command line after `meshauth`.
    args: Vec<String>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn run() -> anyhow::Result<()> {
    let t_start = Instant::now();
    let load_start = loadavg();
    let lab = Lab::new(LAB)?;
    let (state, live) = lab.status()?;
    if state.is_some() || !live.is_empty() {
        bail!(
            "lab {LAB} already exists (another run?): remove it with `meshauth lab --lab {LAB} down` first"
        );
    }
    let work = work();
    owned(|o| {
        o.lab = Some(lab.clone());
        o.dirs.push(work.clone());
        o.pins.push(Datapath::pin_dir_for(&format!("{LAB}-state")));
    });
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let w = |name: &str| work.join(name).display().to_string();

    // The lab.
    let nodes = 1 + REMOTE_NODES;
    eprintln!(
        "== lab {LAB}: {nodes} nodes, {LOCAL} pods on n1, {REMOTE} on n2..n{nodes} (one identity each)"
    );
    lab.up(nodes as u8)?;
    let mut remote_ips = Vec::new();
    // (pod, node, labels) as the control plane will place them.
    let mut placed = Vec::new();
    for i in 0..LOCAL {
        placed.push((
            format!("l{i}"),
            "n1".to_owned(),
            format!("app=l{i},side=local"),
        ));
    }
    for j in 0..REMOTE {
        let node = format!("n{}", 2 + j % REMOTE_NODES);
        placed.push((format!("r{j}"), node, format!("app=r{j},side=remote")));
    }
    for (name, node, labels) in &placed {
        let pod = lab.add_pod(
            name,
            node,
            meshauth_lab::parse_labels(std::slice::from_ref(labels))?,
        )?;
        if name.starts_with('r') {
            remote_ips.push(pod.ip);
        }
    }
    eprintln!("   lab built in {:.1} s", t_start.elapsed().as_secs_f64());

    // The server, as `meshauth demo` starts it.
    let server = format!("{}:8081", meshauth_lab::SERVER_ADDRESS);
    let admin = w("server-admin.sock");
    let spawn = |name: &str, netns: &str, args: Vec<String>| -> anyhow::Result<u32> {
        let mut argv = vec![BIN.to_owned()];
        argv.extend(args);
        let log = std::fs::File::create(w(&format!("{name}.log")))?;
        let child = lab
            .exec_in(netns, &argv)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        owned(|o| o.children.push((name.to_owned(), child)));
        Ok(pid)
    };
    spawn(
        "server",
        &lab.underlay_netns(),
        sv(&[
            "server",
            "run",
            "--trust-domain",
            TRUST_DOMAIN,
            "--listen",
            &server,
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            &w("server"),
            "--admin-socket",
            &admin,
        ]),
    )?;
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let o = output_within(
            Command::new(BIN)
                .args(["--log", "warn"])
                .args(args)
                .args(["--admin-socket", &admin]),
            COMMAND_LIMIT,
        )?;
        if !o.status.success() {
            bail!(
                "meshauth {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    wait_until(Duration::from_secs(30), "the server", || {
        cli(&["server", "healthcheck"]).ok()
    })?;
    std::fs::write(w("bundle.pem"), cli(&["bundle", "show"])?)?;
    std::fs::write(w("policies.yaml"), POLICIES)?;
    cli(&["policy", "apply", "-f", &w("policies.yaml")])?;
    // The control plane places the pods (as `meshauth demo` does); nodes only report them.
    for (name, node, labels) in &placed {
        cli(&["pod", "create", name, "--node", node, "--labels", labels])?;
    }

    // An agent per node, as `meshauth demo` starts them.
    let extra: Vec<String> = std::env::var(AGENT_ARGS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // The agent's default, unless the extra flags set it.
    let workers: usize = extra
        .iter()
        .position(|a| a == "--auth-workers")
        .and_then(|i| extra.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(meshauth_auth::ManagerConfig::default().workers);
    let mut agents = Vec::new();
    for n in 1..=nodes {
        let node = format!("n{n}");
        // The token binds the node's underlay address and pod range, as the lab built them.
        let token = cli(&[
            "token",
            "generate",
            "--node",
            &node,
            "--address",
            &format!("10.199.0.{n}"),
            "--pod-range",
            &format!("10.200.{n}.0/24"),
        ])?
        .trim()
        .to_owned();
        // In a file of mode 0600, not on the agent's command line (as `meshauth demo` does).
        let token_file = w(&format!("{node}.token"));
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token_file)
                .and_then(|mut f| f.write_all(token.as_bytes()))
                .with_context(|| format!("cannot write {token_file}"))?;
        }
        let netns = format!("{LAB}-{node}");
        let socket = w(&format!("{node}-agent.sock"));
        let mut args = sv(&[
            "agent",
            "run",
            "--node",
            &node,
            "--trust-domain",
            TRUST_DOMAIN,
            "--server",
            &server,
            "--join-token-file",
            &token_file,
            "--trust-bundle",
            &w("bundle.pem"),
            "--data-dir",
            &w(&node),
            "--workload-socket",
            &w(&format!("{node}-workload.sock")),
            "--agent-socket",
            &socket,
            "--metrics-listen",
            METRICS,
            "--lab",
            LAB,
        ]);
        args.extend(extra.iter().cloned());
        let pid = spawn(&format!("agent-{node}"), &netns, args.clone())?;
        agents.push(Agent {
            node,
            netns,
            socket,
            pid,
            args,
        });
    }
    let total = LOCAL + REMOTE;
    wait_until(
        Duration::from_secs(180),
        &format!("{total} pods reported by their nodes"),
        || {
            cli(&["pod", "list", "-o", "json"])
                .ok()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .and_then(|v| {
                    let pods = v.as_array()?;
                    Some(pods.iter().filter(|p| p["reported"] == true).count() == total)
                })
                .and_then(|done| done.then_some(()))
        },
    )?;
    for a in &agents {
        wait_until(
            Duration::from_secs(120),
            &format!("agent {} ready", a.node),
            || {
                let ok = output_within(
                    Command::new(BIN)
                        .args(["--log", "warn", "agent", "healthcheck", "--agent-socket"])
                        .arg(&a.socket),
                    COMMAND_LIMIT,
                )
                .is_ok_and(|o| o.status.success());
                let ready = ok && http_get(&a.netns, "/readyz").is_ok_and(|(code, _)| code == 200);
                ready.then_some(())
            },
        )?;
    }
    let n1 = &agents[0];
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", n1.pid)).unwrap_or_default();
    if comm.trim() != "meshauth" {
        bail!(
            "pid {} is {comm:?}, not n1's meshauth agent (nsenter forked?)",
            n1.pid
        );
    }
    eprintln!(
        "   server and {nodes} agents ready, {total} pods reported, {:.1} s after the start",
        t_start.elapsed().as_secs_f64()
    );

    // The bench's own view of n1's kernel auth map (loaded now, not during the rest window).
    let mut n1_dp = Datapath::load(&Datapath::pin_dir_for(&format!("{LAB}-n1")))
        .context("opening n1's datapath")?;
    let pre = n1_dp.auth_entries()?.len();
    if pre != 0 {
        bail!("n1's auth map holds {pre} entries before any traffic");
    }

    // 1. CPU at rest.
    eprintln!(
        "== at rest: settling {} s, then sampling n1's agent (pid {}) for {} s",
        SETTLE.as_secs(),
        n1.pid,
        REST_WINDOW.as_secs()
    );
    std::thread::sleep(SETTLE);
    let hz = clk_tck();
    let before: Vec<u64> = agents
        .iter()
        .map(|a| cpu_ticks(a.pid))
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    let rest = Rest::sample(n1.pid, REST_WINDOW, "rest")?;
    let wall = t.elapsed().as_secs_f64();
    let after: Vec<u64> = agents
        .iter()
        .map(|a| cpu_ticks(a.pid))
        .collect::<anyhow::Result<_>>()?;
    let pct = |i: usize| (after[i] - before[i]) as f64 / hz / wall * 100.0;
    let rss_rest = status_kb(&n1.pid.to_string(), "VmRSS");
    let hwm_rest = status_kb(&n1.pid.to_string(), "VmHWM");
    let others: Vec<String> = (1..agents.len())
        .map(|i| format!("{} {:.2} %", agents[i].node, pct(i)))
        .collect();

    // 2. New pairs per second.
    eprintln!(
        "== {PAIRS} new pairs: one datagram from each of {LOCAL} local pods to each of {REMOTE} remote pods"
    );
    let ips: Vec<String> = remote_ips.iter().map(|i| i.to_string()).collect();
    let mut stdins: Vec<ChildStdin> = Vec::new();
    let (line_tx, line_rx) = mpsc::channel::<(usize, String)>();
    for i in 0..LOCAL {
        let mut argv = sv(&["python3", "-c", SENDER, &RESEND.as_secs_f64().to_string()]);
        argv.extend(ips.iter().cloned());
        let mut child = lab
            .exec(&format!("l{i}"), &argv)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a sender")?;
        stdins.push(child.stdin.take().context("sender stdin")?);
        let out = child.stdout.take().context("sender stdout")?;
        let tx = line_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((i, line)).is_err() {
                    return;
                }
            }
        });
        owned(|o| o.children.push((format!("sender-{i}"), child)));
    }
    let ready_by = Instant::now() + Duration::from_secs(60);
    let mut ready = 0;
    while ready < LOCAL {
        let left = ready_by.saturating_duration_since(Instant::now());
        match line_rx.recv_timeout(left) {
            Ok((_, l)) if l == "ready" => ready += 1,
            Ok(_) => {}
            Err(_) => bail!("only {ready} of {LOCAL} senders started within 60 s"),
        }
    }
    let perf = perf_start(n1.pid, "pairs")?;
    let cpu0 = cpu_ticks(n1.pid)?;
    let t0 = Instant::now();
    for s in &mut stdins {
        s.write_all(b"go\n")?;
        s.flush()?;
    }
    let mut timeline: Vec<(f64, usize)> = Vec::new();
    let mut first = None;
    let mut done = None;
    while t0.elapsed() < PAIRS_LIMIT {
        let n = n1_dp.auth_entries()?.len();
        let at = t0.elapsed().as_secs_f64();
        timeline.push((at, n));
        if n > 0 && first.is_none() {
            first = Some(at);
        }
        if n >= PAIRS {
            done = Some(at);
            break;
        }
        std::thread::sleep(POLL);
    }
    let cpu1 = cpu_ticks(n1.pid)?;
    let busy = t0.elapsed().as_secs_f64();
    perf_stop(perf, "pairs");
    drop(stdins);
    let mut rounds = Vec::new();
    let stop_by = Instant::now() + Duration::from_secs(10);
    while rounds.len() < LOCAL {
        let left = stop_by.saturating_duration_since(Instant::now());
        match line_rx.recv_timeout(left) {
            Ok((_, l)) => {
                if let Ok(r) = l.parse::<u64>() {
                    rounds.push(r);
                }
            }
            Err(_) => break,
        }
    }
    kill_children("sender-");
    // The agent publishes its gauge and counters once a second.
    std::thread::sleep(Duration::from_millis(1500));
    // At rest again, now holding the pairs' entries.
    let rest_after = Rest::sample(n1.pid, REST_AFTER, "rest-8000")?;
    let final_count = n1_dp.auth_entries()?.len();
    let rss_pairs = status_kb(&n1.pid.to_string(), "VmRSS");
    let metrics = http_get(&n1.netns, "/metrics")
        .map(|(_, b)| samples(&b))
        .unwrap_or_default();
    let m = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
    let handshakes: Vec<String> = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("meshauth_agent_auth_handshakes_total{"))
        .map(|(k, v)| {
            format!(
                "{} {v}",
                k.trim_start_matches("meshauth_agent_auth_handshakes_total")
            )
        })
        .collect();
    let mut failed_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut observe = Command::new(BIN);
    observe.args([
        "--log",
        "warn",
        "observe",
        "-o",
        "json",
        "--verdict",
        "FAILED",
    ]);
    for a in &agents {
        observe.args(["--agent-socket", &a.socket]);
    }
    if let Ok(o) = output_within(&mut observe, COMMAND_LIMIT) {
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                // Hubble's flow JSON (meshauth's reason under flow.extensions.meshauth).
                let node = v["node_name"].as_str().or(v["node"].as_str());
                let reason = v["flow"]["extensions"]["meshauth"]["reason"]
                    .as_str()
                    .or(v["reason"].as_str());
                let key = format!("{}: {}", node.unwrap_or("?"), reason.unwrap_or("?"));
                *failed_reasons.entry(key).or_default() += 1;
            }
        }
    }
    let auth_list = output_within(
        Command::new(BIN)
            .args([
                "--log",
                "warn",
                "auth",
                "list",
                "-o",
                "json",
                "--agent-socket",
            ])
            .arg(&n1.socket),
        COMMAND_LIMIT,
    )
    .ok()
    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
    .and_then(|v| v.as_array().map(Vec::len));
    let at_second = |s: f64| {
        timeline
            .iter()
            .rev()
            .find(|(t, _)| *t <= s)
            .map_or(0, |(_, n)| *n)
    };
    let mut best_rate = 0.0f64;
    for (i, (ta, na)) in timeline.iter().enumerate() {
        if let Some((tb, nb)) = timeline[i..].iter().find(|(tb, _)| tb - ta >= 1.0) {
            best_rate = best_rate.max((nb - na) as f64 / (tb - ta));
        }
    }
    let marks: Vec<String> = (1..=busy.ceil() as u64)
        .take(30)
        .map(|s| format!("{s}s:{}", at_second(s as f64)))
        .collect();
    let pairs_cpu = (cpu1 - cpu0) as f64 / hz;
    let load_pairs = loadavg();

    // 3. The whole agent at 1,000 identities and 100,000 auth entries.
    let extra_ids = STATE_IDENTITIES as usize - LOCAL - REMOTE;
    eprintln!(
        "== the whole agent at {STATE_IDENTITIES} identities and {STATE_ENTRIES} auth entries: agents stopped, {extra_ids} more remote identities placed on each of n2..n{nodes}, n1's auth map seeded, n1's agent started again"
    );
    // Stop every agent first, so that the placements below reach no sync stream one by one.
    for a in &agents {
        let _ = Command::new("kill")
            .args(["-TERM", &a.pid.to_string()])
            .status();
    }
    wait_until(Duration::from_secs(20), "the agents to stop", || {
        owned(|o| {
            o.children
                .iter_mut()
                .filter(|(n, _)| n.starts_with("agent-"))
                .all(|(_, c)| c.try_wait().ok().flatten().is_some())
        })
        .then_some(())
    })?;
    kill_children("agent-");
    let mut more = Vec::new();
    for j in REMOTE..REMOTE + extra_ids {
        for n in 2..=nodes {
            more.push((
                format!("x{j}-n{n}"),
                format!("n{n}"),
                format!("app=r{j},side=remote"),
            ));
        }
    }
    let t_place = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let cli = &cli;
        let handles: Vec<_> = more
            .chunks(more.len().div_ceil(4))
            .map(|chunk| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for (name, node, labels) in chunk {
                        cli(&["pod", "create", name, "--node", node, "--labels", labels])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a placing thread panicked"))??;
        }
        Ok(())
    })?;
    let place_s = t_place.elapsed().as_secs_f64();
    let pods: serde_json::Value = serde_json::from_str(&cli(&["pod", "list", "-o", "json"])?)?;
    let mut local_ids = std::collections::BTreeSet::new();
    let mut remote_placed = std::collections::BTreeSet::new();
    for p in pods.as_array().context("pod list -o json: not an array")? {
        let id = p["identity"].as_u64().context("a pod without identity")?;
        let node_id = p["node_id"].as_u64().context("a pod without node_id")?;
        if node_id == 0 {
            bail!("pod {} is on a node with no id", p["name"]);
        }
        if p["node"] == "n1" {
            local_ids.insert(u32::try_from(id)?);
        } else {
            remote_placed.insert((u32::try_from(id)?, u32::try_from(node_id)?));
        }
    }
    let remote_ids: std::collections::BTreeSet<u32> =
        remote_placed.iter().map(|(i, _)| *i).collect();
    let identities = local_ids.len() + remote_ids.len();
    if identities != STATE_IDENTITIES as usize {
        bail!("the cluster has {identities} identities, not {STATE_IDENTITIES}");
    }
    let t_seed = Instant::now();
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let mut seeded: std::collections::BTreeSet<meshauth_policy::AuthKey> =
        n1_dp.auth_entries()?.into_iter().map(|(k, _)| k).collect();
    let inherited = seeded.len();
    'seed: for l in &local_ids {
        for (r, node) in &remote_placed {
            if seeded.len() >= STATE_ENTRIES {
                break 'seed;
            }
            let key = meshauth_policy::AuthKey {
                local: meshauth_policy::IdentityId::new(*l),
                remote: meshauth_policy::IdentityId::new(*r),
                remote_node: meshauth_policy::NodeId::new(*node),
                auth_type: meshauth_policy::AuthType::Required,
                connection: None,
            };
            if seeded.insert(key) {
                n1_dp.insert_auth(key, expires)?;
            }
        }
    }
    let seed_s = t_seed.elapsed().as_secs_f64();
    let possible = local_ids.len() * remote_placed.len();
    drop(seeded);
    let n1_args: Vec<String> = {
        let mut args = Vec::new();
        let mut it = n1.args.iter();
        while let Some(a) = it.next() {
            if a == "--join-token-file" {
                it.next();
            } else {
                args.push(a.clone());
            }
        }
        args
    };
    let t_restart = Instant::now();
    // Diagnostics: a wrapper for this agent (e.g. `heaptrack -o <file>`); its figures are then
    // the wrapper's, not the agent's.
    let wrap: Vec<String> = std::env::var(WRAP_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let pid100k = if wrap.is_empty() {
        spawn("agent-n1-100k", &n1.netns, n1_args)?
    } else {
        let mut argv = wrap[1..].to_vec();
        // A build with line tables (target/debug) names the allocations' callers.
        argv.push(std::env::var(WRAP_BIN_ENV).unwrap_or_else(|_| BIN.to_owned()));
        argv.extend(n1_args);
        let log = std::fs::File::create(w("agent-n1-100k.log"))?;
        let child = lab
            .exec_in(&n1.netns, &[&[wrap[0].clone()], argv.as_slice()].concat())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the wrapped agent")?;
        let pid = child.id();
        owned(|o| o.children.push(("agent-n1-100k".to_owned(), child)));
        pid
    };
    let gauge = || {
        http_get(&n1.netns, "/metrics")
            .ok()
            .and_then(|(_, b)| samples(&b).get("meshauth_agent_auth_entries").copied())
            .unwrap_or(0.0)
    };
    wait_until(
        Duration::from_secs(180),
        "n1's restarted agent ready, tracking the seeded entries",
        || {
            let ready = http_get(&n1.netns, "/readyz").is_ok_and(|(code, _)| code == 200);
            (ready && gauge() >= STATE_ENTRIES as f64).then_some(())
        },
    )?;
    let restart_s = t_restart.elapsed().as_secs_f64();
    let comm = std::fs::read_to_string(format!("/proc/{pid100k}/comm")).unwrap_or_default();
    if comm.trim() != "meshauth" && wrap.is_empty() {
        bail!("pid {pid100k} is {comm:?}, not n1's meshauth agent");
    }
    std::thread::sleep(SETTLE);
    let rest_100k = Rest::sample(pid100k, REST_WINDOW, "rest-100k")?;
    let rss_100k = status_kb(&pid100k.to_string(), "VmRSS");
    let hwm_100k = status_kb(&pid100k.to_string(), "VmHWM");
    let gauge_100k = gauge();
    let kernel_100k = n1_dp.auth_entries()?.len();
    let t_list = Instant::now();
    let list_100k = output_within(
        Command::new(BIN)
            .args([
                "--log",
                "warn",
                "auth",
                "list",
                "-o",
                "json",
                "--agent-socket",
            ])
            .arg(&n1.socket),
        COMMAND_LIMIT,
    );
    let list_s = t_list.elapsed().as_secs_f64();
    let list_100k = match list_100k {
        Ok(o) if o.status.success() => serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .map_or("unparsable output".to_owned(), |n| {
                format!("{n} entries in {list_s:.2} s")
            }),
        Ok(o) => format!(
            "failed after {list_s:.2} s: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("failed: {e:#}"),
    };
    let abi = Datapath::pin_dir_for(&format!("{LAB}-n1"))
        .join(format!("abi-v{}", meshauth_datapath::ABI_VERSION));
    let maps_memlock = format!(
        "ma_auth {}, ma_policy {}, ma_ipcache {}, ma_conntrack {}",
        memlock(&abi.join("ma_auth")),
        memlock(&abi.join("ma_policy")),
        memlock(&abi.join("ma_ipcache")),
        memlock(&abi.join("ma_conntrack")),
    );

    // Free the machine.
    kill_children("");
    drop(n1_dp);
    lab.down()?;
    owned(|o| o.lab = None);

    // The report.
    println!();
    println!(
        "scale: lab {LAB}: n1 with {LOCAL} pods / {LOCAL} identities, {REMOTE} remote pods / {REMOTE} identities on {REMOTE_NODES} nodes; policy: local -> remote egress with authentication.mode: required; agent flags: {}",
        if extra.is_empty() {
            "defaults".to_owned()
        } else {
            extra.join(" ")
        }
    );
    println!(
        "1. CPU at rest, n1's agent: {}; target < 1 %: {}",
        rest.text(),
        if rest.pct < 1.0 { "met" } else { "MISSED" }
    );
    println!("   by thread: {}", rest.threads());
    println!("   other agents at rest: {}", others.join(", "));
    println!(
        "   n1's agent VmRSS at rest: {} (peak VmHWM {})",
        mb(rss_rest),
        mb(hwm_rest)
    );
    match done {
        Some(t) => println!(
            "2. {PAIRS} new pairs: all in n1's auth map {t:.2} s after the first datagrams: {:.0} pairs/s; target >= 500/s: {}",
            PAIRS as f64 / t,
            if PAIRS as f64 / t >= 500.0 {
                "met"
            } else {
                "MISSED"
            }
        ),
        None => println!(
            "2. {PAIRS} new pairs: only {final_count} in n1's auth map after {:.0} s ({} never authenticated): {:.0} pairs/s at best; target >= 500/s: MISSED",
            PAIRS_LIMIT.as_secs_f64(),
            PAIRS - final_count.min(PAIRS),
            final_count as f64 / PAIRS_LIMIT.as_secs_f64()
        ),
    }
    println!(
        "   first entry after {:.2} s; best 1-s window {best_rate:.0} pairs/s; senders re-sent every {} s ({} rounds each at most); n1's agent used {pairs_cpu:.1} s of CPU meanwhile",
        first.unwrap_or(f64::NAN),
        RESEND.as_secs(),
        rounds.iter().max().copied().unwrap_or(0)
    );
    println!("   entries over time: {}", marks.join(" "));
    println!(
        "   n1's agent: gauge meshauth_agent_auth_entries {}, auth list {} entries, kernel map {final_count}; queue overflows {}; datapath events lost {}",
        m("meshauth_agent_auth_entries"),
        auth_list.map_or("?".to_owned(), |n| n.to_string()),
        m("meshauth_agent_auth_queue_overflow_total"),
        m("meshauth_agent_datapath_events_lost_total"),
    );
    let hs_count = m("meshauth_agent_auth_handshake_duration_seconds_count");
    let hs_mean_ms = m("meshauth_agent_auth_handshake_duration_seconds_sum") / hs_count * 1e3;
    println!(
        "   n1's handshakes: {}; initiated ones took {hs_mean_ms:.1} ms on average (connect to verdict), so its {workers} auth workers run at most {:.0} handshakes/s",
        handshakes.join(", "),
        workers as f64 / hs_mean_ms * 1e3
    );
    if failed_reasons.is_empty() {
        println!("   observe --verdict FAILED (every agent): none");
    } else {
        println!(
            "   observe --verdict FAILED (every agent; the flow ring keeps 1,000 records): {}",
            failed_reasons
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    println!(
        "   n1's agent VmRSS after the pairs: {}; its CPU at rest holding them: {}",
        mb(rss_pairs),
        rest_after.text()
    );
    println!("   by thread: {}", rest_after.threads());
    println!(
        "3. n1's whole agent process at {identities} identities ({} local, {} remote placed {} times on n2..n{nodes}) and {gauge_100k} tracked auth entries (gauge; {inherited} from the pairs, the rest seeded into its kernel map, of {possible} pairs policy requires): VmRSS {} (peak VmHWM {}); target < 30 MB: {}",
        local_ids.len(),
        remote_ids.len(),
        remote_placed.len(),
        mb(rss_100k),
        mb(hwm_100k),
        if rss_100k < 30 * 1024 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "   kernel auth map after the rest window: {kernel_100k} entries (capacity {}); at least {STATE_ENTRIES}: {}",
        meshauth_datapath::capacity::AUTH,
        if kernel_100k >= STATE_ENTRIES {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "   its CPU at rest holding them: {}; by thread: {}",
        rest_100k.text(),
        rest_100k.threads()
    );
    println!("   maps (bpftool memlock, bytes): {maps_memlock}");
    println!(
        "   placing {} pods took {place_s:.1} s, seeding {seed_s:.1} s, the restart to ready with the entries tracked {restart_s:.1} s; auth list: {list_100k}",
        more.len()
    );
    println!(
        "(the whole run took {:.0} s; load average {load_start} at the start, {load_pairs} after the pairs: other work on the machine competes for its cores)",
        t_start.elapsed().as_secs_f64()
    );
    if kernel_100k < STATE_ENTRIES || gauge_100k < STATE_ENTRIES as f64 {
        bail!(
            "n1's agent holds {gauge_100k} entries and its kernel map {kernel_100k}, not {STATE_ENTRIES}: entries were revoked or lost"
        );
    }
    Ok(())
}
