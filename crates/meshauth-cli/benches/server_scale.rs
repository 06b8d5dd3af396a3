//! Server at scale: a node simulator against one real `meshauth server run` (no root needed).
//!
//! `cargo bench -p meshauth-cli --bench server_scale -- [--nodes 1000] [--pods 30] [--changes 20]`,
//! or `scripts/bench-server.sh [ARGS]` (figures in docs/benchmarks.md). Other flags:
//! `--identities I` (label sets the pods share, default 300), `--concurrency C` (nodes set up
//! at once, and signing calls in flight, default 32), `--timeout S` (how long a change may take
//! to reach every node, default 30), `--rest S` (the window at rest, default 10), `--sign S`
//! (the signing window, default 5). `MESHAUTH_SIM_SERVER_ARGS="--flag value ..."` adds flags to
//! `meshauth server run` (e.g. another datastore); the table names the datastore they select.
//!
//! 1. **Server.** Starts `meshauth server run` on loopback (a free port for the node API and
//!    one for `/metrics`) with a data dir and admin socket in a fresh temporary directory.
//! 2. **Nodes.** For each of N simulated nodes, `C` at a time: a join token through the admin
//!    API that binds the node's address (10.199.x.y, distinct per node: every simulated node
//!    connects from 127.0.0.1) and a /24 pod range; attestation over the node API (mutual TLS
//!    afterwards, as an agent: a fresh P-256 key and CSR, the server's SPIFFE ID checked); M
//!    pods placed on it through the admin API (`CreatePod`, labels `app=app-<k>` of I label
//!    sets) and reported by the node (`ReportPod`, an address of its range); then its sync
//!    stream, opened with its node SVID and read until the end. For every message the reader
//!    notes the time, `delta`, the revision chain (a delta's `base_revision` must be the
//!    revision of the message before) and its size (`encoded_len`); it keeps no message.
//! 3. **At rest.** Once every stream got its first message (the whole state) and no stream got
//!    anything for 2 s: the server's VmRSS and VmHWM (`/proc/<pid>/status`) and its CPU
//!    (utime+stime of `/proc/<pid>/stat`) over the rest window.
//! 4. **Propagation.** K changes, one after the other, each with a unique name: even ones apply
//!    a new policy (`ApplyPolicies`), odd ones alternately place a pod through the admin API
//!    and have its node report it, or delete the pod placed before. For each change, the time
//!    from just before the first admin call to the arrival, on each of the N streams, of the
//!    first message that carries it (the policy; the pod with its reported address; the pod's
//!    key in `removed`), which must be a delta with the expected contents. Per change: p50,
//!    p99 and max over nodes, the carrying delta's size, the server's CPU and view rebuilds
//!    (its `/metrics`); over all changes, p50 and p99 of the per-change max.
//! 5. **Signing.** For a few seconds, the nodes call `SignIdentitySvids` (one CSR per call, for
//!    an identity of one of their pods; CSRs from a pool made beforehand), C calls in flight:
//!    SVIDs per second, against `openssl speed -seconds 3 ecdsap256` on the same machine (one
//!    core, raw signing).
//!
//! It prints a markdown table, and exits non-zero when a change did not reach every node
//! within the timeout (naming how many missed it), a stream ended or broke its revision chain,
//! or setup failed. The server process and the temporary directory are removed at the end, on
//! failure and on SIGINT/SIGTERM. The bench and the server share the machine's cores.

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshauth_agent::server_client::{connect, connect_for_attestation, key_and_csr};
use meshauth_proto::admin::admin_client::AdminClient;
use meshauth_proto::admin::{
    ApplyPoliciesRequest, CreateJoinTokenRequest, CreatePodRequest, GetBundleRequest,
    HealthRequest, PodRequest,
};
use meshauth_proto::node::node_client::NodeClient;
use meshauth_proto::node::{
    AttestJoinTokenRequest, IdentityCsr, RenewNodeSvidRequest, ReportPodRequest,
    SignIdentitySvidsRequest, SyncRequest, SyncResponse,
};
use meshauth_spiffe::{TrustDomain, X509Bundle};
use meshauth_tls::{SharedBundle, SharedCertifiedKey};
use prost::Message as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const TRUST_DOMAIN: &str = "sim.meshauth.local";
const NAMESPACE: &str = "default";
/// Extra flags for `meshauth server run`, separated by spaces.
const SERVER_ARGS_ENV: &str = "MESHAUTH_SIM_SERVER_ARGS";
/// The node API's connection limit (`tls_incoming::MAX_CONNECTIONS`; `server run` has no flag
/// for it). Each simulated node holds one connection; attestations add one each, briefly.
const SERVER_CONNECTIONS: usize = 1024;
/// Connections kept free under that limit for attestations in flight and stragglers.
const CONNECTION_MARGIN: usize = 24;
/// The largest sync message the bench decodes (tonic's default is 4 MiB; see the table).
const MAX_MESSAGE: usize = 1 << 30;
/// tonic's default decoding limit, which the agent's client keeps.
const TONIC_DEFAULT_LIMIT: usize = 4 << 20;
/// How long no stream may get a message before the server counts as settled.
const QUIET: Duration = Duration::from_secs(2);
/// The longest the bench waits for that.
const SETTLE_LIMIT: Duration = Duration::from_secs(600);
/// CSRs made before the signing window, used round robin.
const CSR_POOL: usize = 64;
/// How often setup progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// What the bench owns, removed on every exit path.

struct Owned {
    server: Option<Child>,
    dir: Option<PathBuf>,
}

/// Set on SIGINT/SIGTERM: what fails after it is the interruption, not the server.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

static OWNED: Mutex<Owned> = Mutex::new(Owned {
    server: None,
    dir: None,
});

fn owned<R>(f: impl FnOnce(&mut Owned) -> R) -> R {
    f(&mut OWNED.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Stops the server (SIGTERM, SIGKILL after 5 s, by its pid) and removes the temporary
/// directory. With `show_log`, prints the end of the server's log first. Idempotent.
fn cleanup(show_log: bool) {
    let (server, dir) = owned(|o| (o.server.take(), o.dir.take()));
    if let Some(mut child) = server {
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(dir) = dir {
        if show_log {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            if !lines.is_empty() {
                eprintln!("server_scale: the server log's last lines:");
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("  {l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// On SIGINT or SIGTERM: clean up and exit.
fn on_signal_cleanup() {
    let spawned = std::thread::Builder::new()
        .name("sim-signals".into())
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
                let which = tokio::select! {
                    _ = tokio::signal::ctrl_c() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                };
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("server_scale: interrupted ({which}): cleaning up");
                cleanup(false);
                std::process::exit(130);
            });
        });
    if let Err(e) = spawned {
        eprintln!("server_scale: no signal handler ({e}): an interrupt leaves the server running");
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments.

#[derive(Debug, Clone)]
struct Args {
    nodes: usize,
    pods: usize,
    changes: usize,
    identities: usize,
    concurrency: usize,
    timeout: Duration,
    rest: Duration,
    sign: Duration,
}

const USAGE: &str = "usage: server_scale [--nodes N] [--pods M] [--changes K] [--identities I] \
                     [--concurrency C] [--timeout SECS] [--rest SECS] [--sign SECS]";

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut a = Args {
            nodes: 1000,
            pods: 30,
            changes: 20,
            identities: 300,
            concurrency: 32,
            timeout: Duration::from_secs(30),
            rest: Duration::from_secs(10),
            sign: Duration::from_secs(5),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            // `cargo bench` passes --bench to every bench binary.
            if flag == "--bench" {
                continue;
            }
            let value = it
                .next()
                .with_context(|| format!("{flag} needs a value ({USAGE})"))?;
            let n: u64 = value
                .parse()
                .with_context(|| format!("{flag} {value:?} is not a whole number ({USAGE})"))?;
            let us = usize::try_from(n)?;
            match flag.as_str() {
                "--nodes" => a.nodes = us,
                "--pods" => a.pods = us,
                "--changes" => a.changes = us,
                "--identities" => a.identities = us,
                "--concurrency" => a.concurrency = us,
                "--timeout" => a.timeout = Duration::from_secs(n),
                "--rest" => a.rest = Duration::from_secs(n),
                "--sign" => a.sign = Duration::from_secs(n),
                other => bail!("unknown flag {other:?} ({USAGE})"),
            }
        }
        if a.nodes == 0 || a.pods == 0 || a.identities == 0 || a.concurrency == 0 {
            bail!("--nodes, --pods, --identities and --concurrency must be at least 1");
        }
        if a.nodes > SERVER_CONNECTIONS - CONNECTION_MARGIN {
            bail!(
                "--nodes {} is more than the server's node API takes: it holds at most {} connections (tls_incoming::MAX_CONNECTIONS, no flag), one per node plus attestations, so at most {} nodes",
                a.nodes,
                SERVER_CONNECTIONS,
                SERVER_CONNECTIONS - CONNECTION_MARGIN
            );
        }
        // Each node's /24 holds its M pods and the changes' pods (.1 to .254).
        if a.pods + a.changes > 253 {
            bail!("--pods plus --changes must be at most 253 (one /24 per node)");
        }
        if a.nodes > 250 * 56 {
            bail!(
                "--nodes must be at most {} (10.199.0.0/16 node addresses, /24 pod ranges from 10.200.0.0)",
                250 * 56
            );
        }
        Ok(a)
    }
}

/// The datastore `MESHAUTH_SIM_SERVER_ARGS` selects (`--datastore KIND://...`), else sqlite.
fn datastore_kind(args: &[String]) -> String {
    let mut value = None;
    for (i, a) in args.iter().enumerate() {
        if a == "--datastore" {
            value = args.get(i + 1).cloned();
        } else if let Some(v) = a.strip_prefix("--datastore=") {
            value = Some(v.to_owned());
        }
    }
    match value {
        None => "sqlite (the server's default)".into(),
        Some(v) => v.split("://").next().unwrap_or(&v).to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc, /metrics, small helpers.

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads, living and exited), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
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

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of an ascending slice.
fn pct<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// GET `/metrics` from the server's metrics listener: `name{labels}` -> value.
fn scrape(addr: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .with_context(|| format!("cannot reach the server's /metrics on {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// The sum of every sample of `name` (any labels) whose labels contain `label` (if given).
fn metric(m: &BTreeMap<String, f64>, name: &str, label: Option<&str>) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            let base = k.split('{').next().unwrap_or(k);
            base == name && label.is_none_or(|l| k.to_lowercase().contains(&l.to_lowercase()))
        })
        .map(|(_, v)| *v)
        .fold(0.0, |a, b| a + b)
}

/// The server's view rebuilds and sync messages, as its `/metrics` count them.
#[derive(Debug, Clone, Copy, Default)]
struct ServerCounts {
    builds: f64,
    build_seconds: f64,
    full: f64,
    delta: f64,
    svids: f64,
    refused_connections: f64,
}

impl ServerCounts {
    fn read(addr: &str) -> anyhow::Result<ServerCounts> {
        let m = scrape(addr)?;
        Ok(ServerCounts {
            builds: metric(&m, "meshauth_server_view_build_seconds_count", None),
            build_seconds: metric(&m, "meshauth_server_view_build_seconds_sum", None),
            full: metric(
                &m,
                "meshauth_server_sync_messages_total",
                Some("kind=\"full\""),
            ),
            delta: metric(
                &m,
                "meshauth_server_sync_messages_total",
                Some("kind=\"delta\""),
            ),
            svids: metric(&m, "meshauth_server_svids_issued_total", None),
            refused_connections: metric(
                &m,
                "meshauth_server_node_api_connections_closed_total",
                None,
            ),
        })
    }

    fn since(&self, before: &ServerCounts) -> ServerCounts {
        ServerCounts {
            builds: self.builds - before.builds,
            build_seconds: self.build_seconds - before.build_seconds,
            full: self.full - before.full,
            delta: self.delta - before.delta,
            svids: self.svids - before.svids,
            refused_connections: self.refused_connections - before.refused_connections,
        }
    }

    fn mean_build(&self) -> String {
        if self.builds > 0.0 {
            format!("{:.1} ms", self.build_seconds / self.builds * 1000.0)
        } else {
            "no build".into()
        }
    }
}

/// Raises this process's open-files limit (inherited by the server) to `need`, with `prlimit`.
fn raise_nofile(need: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("cannot read the open-files limit from /proc/self/limits")?;
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let soft: u64 = nums.first().and_then(|v| v.parse().ok()).unwrap_or(0);
    let hard: Option<u64> = nums.get(1).and_then(|v| v.parse().ok());
    if soft >= need {
        return Ok(());
    }
    if hard.is_some_and(|h| h < need) {
        bail!(
            "the open-files limit is {soft} (hard {}), below the {need} this run needs: raise it (ulimit -n {need}) or simulate fewer nodes",
            hard.unwrap_or(0)
        );
    }
    let hard_text = hard.map_or("unlimited".to_owned(), |h| h.to_string());
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={need}:{hard_text}"))
        .status()
        .context("running prlimit (util-linux) to raise the open-files limit")?;
    if !status.success() {
        bail!("prlimit could not raise the open-files limit from {soft} to {need}");
    }
    eprintln!("server_scale: open-files limit raised from {soft} to {need}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The streams: what each reader notes, and the change it looks for.

/// What a change looks like in a sync message.
#[derive(Debug, Clone)]
enum Want {
    /// A policy of this key.
    Policy { key: String, name: String },
    /// The pod of this key with its reported address.
    PodUp {
        key: String,
        ipv4: String,
        node: String,
    },
    /// The pod's key among the removed endpoints.
    PodGone { key: String },
}

impl Want {
    /// `Some(intact)` when `msg` carries the change: intact when its contents are as expected.
    fn carried_by(&self, msg: &SyncResponse) -> Option<bool> {
        match self {
            Want::Policy { key, name } => msg
                .policies
                .iter()
                .find(|p| p.name == *key)
                .map(|p| p.namespace == NAMESPACE && p.yaml.contains(name.as_str())),
            Want::PodUp { key, ipv4, node } => msg
                .endpoints
                .iter()
                .find(|e| format!("{}/{}", e.namespace, e.name) == *key && !e.ipv4.is_empty())
                .map(|e| e.ipv4 == *ipv4 && e.node == *node && e.identity != 0),
            Want::PodGone { key } => msg
                .removed
                .as_ref()
                .is_some_and(|r| r.endpoints.iter().any(|k| k == key))
                .then_some(true),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Want::Policy { .. } => "policy applied",
            Want::PodUp { .. } => "pod placed + reported",
            Want::PodGone { .. } => "pod deleted",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    after: Duration,
    bytes: usize,
    delta: bool,
    intact: bool,
}

/// One change being measured: where it arrived.
struct Probe {
    want: Want,
    started: Instant,
    arrivals: Vec<OnceLock<Arrival>>,
    remaining: AtomicUsize,
}

#[derive(Default)]
struct StreamStats {
    messages: AtomicU64,
    resent_full: AtomicU64,
    bytes: AtomicU64,
    revision: AtomicU64,
    chain_breaks: AtomicU64,
    /// The largest message, in bytes.
    largest: AtomicU64,
    /// The first whole state (all its pages): after how long (from the Sync call to its last
    /// page), its size, its endpoints, its pages.
    first: OnceLock<(Duration, usize, usize, usize)>,
    /// A whole state whose pages are arriving: bytes, endpoints and pages so far.
    arriving: Mutex<Option<(usize, usize, usize)>>,
    ended: Mutex<Option<String>>,
}

struct Shared {
    start: Instant,
    /// Nanoseconds after `start` of the latest message on any stream.
    last_message: AtomicU64,
    streams: Vec<StreamStats>,
    probe: RwLock<Option<Arc<Probe>>>,
}

impl Shared {
    fn note(&self, i: usize, msg: &SyncResponse, now: Instant, opened: Instant) {
        let st = &self.streams[i];
        let size = msg.encoded_len();
        self.last_message.store(
            u64::try_from(now.duration_since(self.start).as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        st.messages.fetch_add(1, Ordering::Relaxed);
        st.bytes.fetch_add(size as u64, Ordering::Relaxed);
        st.largest.fetch_max(size as u64, Ordering::Relaxed);
        let held = st.revision.load(Ordering::Relaxed);
        let mut arriving = st.arriving.lock().unwrap_or_else(|p| p.into_inner());
        if !msg.delta || arriving.is_some() {
            // A whole state, or one of its later pages (deltas from its revision to itself).
            if !msg.delta {
                if st.first.get().is_some() || arriving.is_some() {
                    st.resent_full.fetch_add(1, Ordering::Relaxed);
                }
                *arriving = Some((0, 0, 0));
            } else if msg.base_revision != held {
                st.chain_breaks.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((b, e, n)) = arriving.as_mut() {
                *b += size;
                *e += msg.endpoints.len();
                *n += 1;
            }
            if !msg.more {
                let (b, e, n) = arriving.take().unwrap_or_default();
                let _ = st.first.set((now.duration_since(opened), b, e, n));
            }
        } else if st.first.get().is_none() || msg.base_revision != held {
            st.chain_breaks.fetch_add(1, Ordering::Relaxed);
        }
        drop(arriving);
        st.revision.store(msg.revision, Ordering::Relaxed);
        let probe = self
            .probe
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Arc::clone);
        if let Some(p) = probe
            && p.arrivals[i].get().is_none()
            && let Some(intact) = p.want.carried_by(msg)
        {
            let arrival = Arrival {
                after: now.duration_since(p.started),
                bytes: size,
                delta: msg.delta,
                intact,
            };
            if p.arrivals[i].set(arrival).is_ok() {
                p.remaining.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn since_last_message(&self) -> Duration {
        let last = Duration::from_nanos(self.last_message.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn set_probe(&self, p: Option<Arc<Probe>>) {
        *self.probe.write().unwrap_or_else(|p| p.into_inner()) = p;
    }
}

async fn read_stream(
    i: usize,
    mut stream: tonic::Streaming<SyncResponse>,
    shared: Arc<Shared>,
    opened: Instant,
) {
    let why = loop {
        match stream.message().await {
            Ok(Some(msg)) => shared.note(i, &msg, Instant::now(), opened),
            Ok(None) => break "the server ended it".to_owned(),
            Err(s) => break format!("{:?}: {}", s.code(), s.message()),
        }
    };
    *shared.streams[i]
        .ended
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(why);
}

// ---------------------------------------------------------------------------------------------
// Setup of one simulated node.

struct Ctx {
    server: String,
    td: TrustDomain,
    bundle: SharedBundle,
    admin: AdminClient<Channel>,
    args: Args,
    shared: Arc<Shared>,
    times: Mutex<SetupTimes>,
    ready: AtomicUsize,
    connect_retries: AtomicUsize,
}

#[derive(Default)]
struct SetupTimes {
    token: Vec<Duration>,
    attest: Vec<Duration>,
    create_pod: Vec<Duration>,
    report_pod: Vec<Duration>,
    first_message: Vec<Duration>,
    node_total: Vec<Duration>,
}

struct SimNode {
    name: String,
    range: [u8; 3],
    client: NodeClient<Channel>,
    identities: Vec<u32>,
}

fn node_name(i: usize) -> String {
    format!("sim-n{i:05}")
}

fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 199, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn node_range(i: usize) -> [u8; 3] {
    [10, (200 + i / 256) as u8, (i % 256) as u8]
}

fn pod_address(range: [u8; 3], host: usize) -> Ipv4Addr {
    Ipv4Addr::new(range[0], range[1], range[2], host as u8)
}

/// Dials, retrying a few times (a connection closed at the server's limit while attestation
/// connections of other nodes are still closing); counts the retries.
async fn dial(ctx: &Ctx, own: Option<SharedCertifiedKey>) -> anyhow::Result<NodeClient<Channel>> {
    let mut attempt = 0;
    loop {
        let r = match &own {
            Some(k) => connect(&ctx.server, &ctx.td, ctx.bundle.clone(), Some(k.clone())).await,
            None => connect_for_attestation(&ctx.server, &ctx.td, ctx.bundle.clone(), None).await,
        };
        match r {
            Ok(c) => return Ok(c.max_decoding_message_size(MAX_MESSAGE)),
            Err(e) if attempt < 5 => {
                attempt += 1;
                ctx.connect_retries.fetch_add(1, Ordering::Relaxed);
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn labels_of(k: usize) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([("app".to_owned(), format!("app-{k}"))])
}

async fn setup_node(ctx: Arc<Ctx>, i: usize) -> anyhow::Result<SimNode> {
    let started = Instant::now();
    let name = node_name(i);
    let address = node_address(i);
    let range = node_range(i);
    let mut admin = ctx.admin.clone();

    let t = Instant::now();
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            node_name: name.clone(),
            ttl_seconds: 0,
            address: address.to_string(),
            pod_range: format!("{}.{}.{}.0/24", range[0], range[1], range[2]),
        })
        .await
        .map_err(|s| anyhow::anyhow!("creating the join token of {name} failed: {}", s.message()))?
        .into_inner()
        .token;
    let token_took = t.elapsed();

    let (key, csr) = key_and_csr()?;
    let t = Instant::now();
    let mut attest = dial(&ctx, None)
        .await
        .with_context(|| format!("{name} cannot reach the node API to attest"))?;
    let svid = attest
        .attest_join_token(AttestJoinTokenRequest {
            token,
            node_name: name.clone(),
            csr,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{name}'s attestation was refused: {}", s.message()))?
        .into_inner();
    drop(attest);
    let attest_took = t.elapsed();
    let chain = svid
        .svid_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let own = SharedCertifiedKey::new(chain, PrivateKeyDer::Pkcs8(key))
        .with_context(|| format!("{name}'s node SVID does not fit its key"))?;
    let mut client = dial(&ctx, Some(own))
        .await
        .with_context(|| format!("{name} cannot reach the node API with its node SVID"))?;

    let m = ctx.args.pods;
    let mut identities = Vec::with_capacity(m);
    let mut creates = Vec::with_capacity(m);
    for j in 0..m {
        let t = Instant::now();
        let ep = admin
            .create_pod(CreatePodRequest {
                namespace: NAMESPACE.into(),
                name: format!("{name}-p{j}"),
                labels: labels_of((i * m + j) % ctx.args.identities),
                node: name.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("placing pod {j} on {name} failed: {}", s.message()))?
            .into_inner();
        creates.push(t.elapsed());
        if !identities.contains(&ep.identity) {
            identities.push(ep.identity);
        }
    }
    let mut reports = Vec::with_capacity(m);
    for j in 0..m {
        let t = Instant::now();
        client
            .report_pod(ReportPodRequest {
                namespace: NAMESPACE.into(),
                name: format!("{name}-p{j}"),
                ipv4: pod_address(range, j + 1).to_string(),
                interface: format!("sim{j}"),
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!("{name}'s report of pod {j} was refused: {}", s.message())
            })?;
        reports.push(t.elapsed());
    }

    let opened = Instant::now();
    let stream = client
        .sync(SyncRequest {
            node_address: address.to_string(),
            tunnel_key: Vec::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{name}'s sync stream was refused: {}", s.message()))?
        .into_inner();
    tokio::spawn(read_stream(i, stream, Arc::clone(&ctx.shared), opened));
    let deadline = Instant::now() + ctx.args.timeout;
    let first = loop {
        let st = &ctx.shared.streams[i];
        if let Some((after, _, _, _)) = st.first.get() {
            break *after;
        }
        if let Some(why) = st.ended.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            bail!("{name}'s sync stream ended before its first message: {why}");
        }
        if Instant::now() > deadline {
            bail!(
                "{name}'s sync stream brought no first message within {} s",
                ctx.args.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    {
        let mut times = ctx.times.lock().unwrap_or_else(|p| p.into_inner());
        times.token.push(token_took);
        times.attest.push(attest_took);
        times.create_pod.extend(creates);
        times.report_pod.extend(reports);
        times.first_message.push(first);
        times.node_total.push(started.elapsed());
    }
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    Ok(SimNode {
        name,
        range,
        client,
        identities,
    })
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Server {
    pid: u32,
    node_addr: String,
    metrics_addr: String,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_server(
    dir: &Path,
    extra: &[String],
) -> anyhow::Result<(Server, AdminClient<Channel>)> {
    let (port, metrics_port) = (free_port()?, free_port()?);
    let socket = dir.join("admin.sock");
    let log = std::fs::File::create(dir.join("server.log"))?;
    let child = Command::new(BIN)
        .args(["server", "run", "--trust-domain", TRUST_DOMAIN])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .arg("--data-dir")
        .arg(dir.join("server-data"))
        .arg("--admin-socket")
        .arg(&socket)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {BIN} server run"))?;
    let pid = child.id();
    owned(|o| o.server = Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        let exited = owned(|o| o.server.as_mut().and_then(|c| c.try_wait().ok().flatten()));
        if let Some(status) = exited {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            let last = log.lines().last().unwrap_or("(no log)").to_owned();
            bail!("meshauth server run exited ({status}) before it served: {last}");
        }
        if socket.exists()
            && let Ok(mut c) = meshauth_server::admin_client::connect(&socket).await
            && c.health(HealthRequest {}).await.is_ok()
        {
            break c;
        }
        if Instant::now() > deadline {
            bail!("meshauth server run did not answer on its admin socket within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok((
        Server {
            pid,
            node_addr: format!("127.0.0.1:{port}"),
            metrics_addr: format!("127.0.0.1:{metrics_port}"),
        },
        admin,
    ))
}

/// Raw ECDSA P-256 signing on this machine: (sign/s, verify/s) of `openssl speed` (one core).
fn openssl_speed() -> anyhow::Result<(f64, f64)> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "3", "ecdsap256"])
        .output()
        .context("cannot run openssl (install it: the bench compares the server's signing with `openssl speed ecdsap256`)")?;
    if !out.status.success() {
        bail!(
            "openssl speed ecdsap256 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("ecdsa") && l.contains("nistp256"))
        .context("openssl speed printed no ecdsa (nistp256) line")?;
    let after = line.rsplit_once(')').map(|(_, r)| r).unwrap_or(line);
    let rates: Vec<f64> = after
        .split_whitespace()
        .filter(|w| !w.ends_with('s'))
        .filter_map(|w| w.parse().ok())
        .collect();
    match rates.as_slice() {
        [sign, verify, ..] => Ok((*sign, *verify)),
        _ => bail!("cannot read sign/s and verify/s from openssl's line {line:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
enum SignKind {
    /// `SignIdentitySvids` for an identity of one of the node's pods.
    Identity,
    /// `RenewNodeSvid` (the node's connection keeps presenting its first SVID, the one it
    /// proves at each renewal).
    RenewNode,
}

impl SignKind {
    fn call(self) -> &'static str {
        match self {
            SignKind::Identity => "SignIdentitySvids",
            SignKind::RenewNode => "RenewNodeSvid",
        }
    }
}

struct SignResult {
    signed: usize,
    failed: usize,
    first_err: Option<String>,
    /// Sorted latencies of the calls that succeeded.
    latency: Vec<Duration>,
    wall: f64,
    cpu: f64,
    /// SVIDs the server's `/metrics` counted in the window.
    counted: f64,
}

impl SignResult {
    fn rate(&self) -> f64 {
        self.signed as f64 / self.wall.max(f64::EPSILON)
    }

    fn per_cpu(&self) -> f64 {
        self.signed as f64 / self.cpu.max(f64::EPSILON)
    }
}

/// `concurrency` loops call `kind` round robin over the nodes until `window` has passed;
/// returns what they signed (the wall time runs to the last call's end).
async fn sign_window(
    kind: SignKind,
    targets: Arc<Vec<(NodeClient<Channel>, Vec<u32>)>>,
    pool: Arc<Vec<Vec<u8>>>,
    concurrency: usize,
    window: Duration,
    server: &Server,
    hz: f64,
) -> anyhow::Result<SignResult> {
    let counts0 = ServerCounts::read(&server.metrics_addr)?;
    let cpu0 = cpu_ticks(server.pid)?;
    let start = Instant::now();
    let end = start + window;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (pool, targets) = (Arc::clone(&pool), Arc::clone(&targets));
        set.spawn(async move {
            let (mut signed, mut failed, mut lat, mut first_err) =
                (0usize, 0usize, Vec::new(), None);
            let mut call = w;
            while Instant::now() < end {
                let (client, ids) = &targets[call % targets.len()];
                let identity = ids[(call / targets.len()) % ids.len()];
                let csr = pool[call % pool.len()].clone();
                call += concurrency;
                let t = Instant::now();
                let mut client = client.clone();
                let r = match kind {
                    SignKind::Identity => client
                        .sign_identity_svids(SignIdentitySvidsRequest {
                            csrs: vec![IdentityCsr { identity, csr }],
                        })
                        .await
                        .map(|r| r.into_inner().svids.len()),
                    SignKind::RenewNode => client
                        .renew_node_svid(RenewNodeSvidRequest { csr })
                        .await
                        .map(|r| usize::from(!r.into_inner().svid_chain.is_empty())),
                };
                match r {
                    Ok(n) => {
                        signed += n;
                        lat.push(t.elapsed());
                    }
                    Err(s) => {
                        failed += 1;
                        first_err.get_or_insert_with(|| s.message().to_owned());
                    }
                }
            }
            (signed, failed, lat, first_err, Instant::now())
        });
    }
    let mut r = SignResult {
        signed: 0,
        failed: 0,
        first_err: None,
        latency: Vec::new(),
        wall: 0.0,
        cpu: 0.0,
        counted: 0.0,
    };
    let mut last = start;
    while let Some(j) = set.join_next().await {
        let (s, f, l, e, finished) = j?;
        r.signed += s;
        r.failed += f;
        r.latency.extend(l);
        if r.first_err.is_none() {
            r.first_err = e;
        }
        last = last.max(finished);
    }
    r.wall = last.duration_since(start).as_secs_f64();
    r.cpu = (cpu_ticks(server.pid)? - cpu0) as f64 / hz;
    r.counted = ServerCounts::read(&server.metrics_addr)?
        .since(&counts0)
        .svids;
    r.latency.sort();
    Ok(r)
}

struct ChangeResult {
    index: usize,
    kind: &'static str,
    name: String,
    /// Sorted arrival times over the nodes it reached.
    after: Vec<Duration>,
    missed: usize,
    not_delta: usize,
    not_intact: usize,
    bytes: Vec<usize>,
    cpu_s: f64,
    counts: ServerCounts,
}

fn main() {
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("server_scale: {e:#}");
            std::process::exit(2);
        }
    };
    on_signal_cleanup();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("server_scale: cannot build a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(args));
    match result {
        Ok(failures) if failures.is_empty() => {
            cleanup(false);
            println!("server_scale: every change reached every node");
        }
        Ok(failures) => {
            cleanup(true);
            println!("server_scale: FAILED");
            for f in &failures {
                println!("   - {f}");
            }
            std::process::exit(1);
        }
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            cleanup(false);
            std::process::exit(130);
        }
        Err(e) => {
            cleanup(true);
            eprintln!("server_scale: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The bench; returns the checks that failed, or the error that stopped it.
async fn run(args: Args) -> anyhow::Result<Vec<String>> {
    let bench_start = Instant::now();
    // openssl first: fail before a long setup.
    Command::new("openssl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .context("openssl is not installed (or does not run): the bench compares the server's signing with `openssl speed ecdsap256`; install openssl")?;
    raise_nofile((args.nodes + args.concurrency) as u64 * 2 + 512)?;
    let extra: Vec<String> = std::env::var(SERVER_ARGS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let datastore = datastore_kind(&extra);
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let dir = std::env::temp_dir().join(format!("meshauth-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the work directory {}", dir.display()))?;
    owned(|o| o.dir = Some(dir.clone()));
    let (server, mut admin) = start_server(&dir, &extra).await?;
    eprintln!(
        "server_scale: server pid {} on {} (metrics {}), datastore {datastore}; {} nodes x {} pods, {} identities, {} at a time",
        server.pid,
        server.node_addr,
        server.metrics_addr,
        args.nodes,
        args.pods,
        args.identities,
        args.concurrency
    );
    let td: TrustDomain = TRUST_DOMAIN.parse()?;
    let b = admin
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetBundle failed: {}", s.message()))?
        .into_inner();
    let bundle = X509Bundle {
        trust_domain: td.clone(),
        authorities: b
            .authorities
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        sequence: b.sequence,
        refresh_hint: None,
    };
    let hz = clk_tck();
    let shared = Arc::new(Shared {
        start: Instant::now(),
        last_message: AtomicU64::new(0),
        streams: (0..args.nodes).map(|_| StreamStats::default()).collect(),
        probe: RwLock::new(None),
    });
    let ctx = Arc::new(Ctx {
        server: server.node_addr.clone(),
        td,
        bundle: SharedBundle::new(bundle),
        admin: admin.clone(),
        args: args.clone(),
        shared: Arc::clone(&shared),
        times: Mutex::new(SetupTimes::default()),
        ready: AtomicUsize::new(0),
        connect_retries: AtomicUsize::new(0),
    });

    // --- Setup: every node attests, places and reports its pods, and opens its stream.
    let rss_before_setup = status_kb(server.pid, "VmRSS");
    let counts_before_setup = ServerCounts::read(&server.metrics_addr)?;
    let cpu_setup0 = cpu_ticks(server.pid)?;
    let setup_start = Instant::now();
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.nodes {
        let (ctx, sem) = (Arc::clone(&ctx), Arc::clone(&sem));
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            setup_node(ctx, i).await.map(|n| (i, n))
        });
    }
    let mut nodes: Vec<Option<SimNode>> = (0..args.nodes).map(|_| None).collect();
    let mut last_progress = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                match joined {
                    Ok(Ok((i, n))) => nodes[i] = Some(n),
                    Ok(Err(e)) => {
                        set.abort_all();
                        return Err(e.context(format!("setup failed after {} of {} nodes", ctx.ready.load(Ordering::Relaxed), args.nodes)));
                    }
                    Err(e) => {
                        set.abort_all();
                        bail!("a setup task failed: {e}");
                    }
                }
            }
            _ = ticker.tick() => {}
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let done = ctx.ready.load(Ordering::Relaxed);
            eprintln!(
                "server_scale: setup {done}/{} nodes ready ({:.0} s, server VmRSS {})",
                args.nodes,
                setup_start.elapsed().as_secs_f64(),
                mb(status_kb(server.pid, "VmRSS"))
            );
        }
    }
    let nodes: Vec<SimNode> = nodes.into_iter().flatten().collect();
    let setup_took = setup_start.elapsed();
    eprintln!(
        "server_scale: setup done: {} nodes in {:.1} s; waiting for the server to settle",
        nodes.len(),
        setup_took.as_secs_f64()
    );

    // --- Settle: no stream got anything for QUIET.
    let settle_start = Instant::now();
    while shared.since_last_message() < QUIET {
        if settle_start.elapsed() > SETTLE_LIMIT {
            bail!(
                "the server did not settle: its streams still got messages {} s after setup",
                SETTLE_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled_after = settle_start.elapsed();
    let cpu_setup = (cpu_ticks(server.pid)? - cpu_setup0) as f64 / hz;
    let counts_setup = ServerCounts::read(&server.metrics_addr)?.since(&counts_before_setup);
    let mut failures = Vec::new();
    let ended: Vec<String> = shared
        .streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.ended
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .map(|w| format!("{}: {w}", node_name(i)))
        })
        .collect();
    if !ended.is_empty() {
        failures.push(format!(
            "{} sync streams ended during setup (first: {})",
            ended.len(),
            ended[0]
        ));
    }

    // --- At rest.
    eprintln!(
        "server_scale: sampling the server at rest for {} s",
        args.rest.as_secs()
    );
    let msgs = |s: &Shared| -> u64 {
        s.streams
            .iter()
            .map(|st| st.messages.load(Ordering::Relaxed))
            .sum()
    };
    let rest_msgs0 = msgs(&shared);
    let rss_rest0 = status_kb(server.pid, "VmRSS");
    let (c0, t0) = (cpu_ticks(server.pid)?, Instant::now());
    let bench_c0 = cpu_ticks(std::process::id())?;
    tokio::time::sleep(args.rest).await;
    let (c1, rest_wall) = (cpu_ticks(server.pid)?, t0.elapsed().as_secs_f64());
    let bench_c1 = cpu_ticks(std::process::id())?;
    let rest_pct = (c1 - c0) as f64 / hz / rest_wall * 100.0;
    let bench_rest_pct = (bench_c1 - bench_c0) as f64 / hz / rest_wall * 100.0;
    let rss_rest = status_kb(server.pid, "VmRSS");
    let hwm_rest = status_kb(server.pid, "VmHWM");
    let rest_msgs = msgs(&shared) - rest_msgs0;

    // --- Propagation.
    let mut results = Vec::new();
    let mut placed: Option<String> = None;
    let mut pod_changes = 0usize;
    let changes_counts0 = ServerCounts::read(&server.metrics_addr)?;
    let changes_cpu0 = cpu_ticks(server.pid)?;
    let bench_changes_cpu0 = cpu_ticks(std::process::id())?;
    let changes_start = Instant::now();
    for k in 0..args.changes {
        let change = format!("sim-change-{k}");
        let key = format!("{NAMESPACE}/{change}");
        let pod_change = k % 2 == 1;
        let create = pod_change && (pod_changes.is_multiple_of(2) || placed.is_none());
        let host = nodes.get((k * 7919) % nodes.len()).context("no nodes")?;
        let want = if !pod_change {
            Want::Policy {
                key: key.clone(),
                name: change.clone(),
            }
        } else if create {
            Want::PodUp {
                key: key.clone(),
                ipv4: pod_address(host.range, args.pods + 1 + k).to_string(),
                node: host.name.clone(),
            }
        } else {
            Want::PodGone {
                key: placed.clone().context("a pod to delete")?,
            }
        };
        let shown = match &want {
            Want::PodGone { key } => key.clone(),
            _ => key.clone(),
        };
        let before = ServerCounts::read(&server.metrics_addr)?;
        let cpu0 = cpu_ticks(server.pid)?;
        let probe = Arc::new(Probe {
            want: want.clone(),
            started: Instant::now(),
            arrivals: (0..args.nodes).map(|_| OnceLock::new()).collect(),
            remaining: AtomicUsize::new(args.nodes),
        });
        shared.set_probe(Some(Arc::clone(&probe)));
        match &want {
            Want::Policy { .. } => {
                let yaml = format!(
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {change}\nspec:\n  endpointSelector:\n    matchLabels:\n      app: app-{}\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: app-{}\n",
                    k % args.identities,
                    (k + 1) % args.identities
                );
                let names = admin
                    .apply_policies(ApplyPoliciesRequest {
                        yaml,
                        namespace: String::new(),
                    })
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!("applying policy {change} failed: {}", s.message())
                    })?
                    .into_inner()
                    .names;
                if names != [key.clone()] {
                    bail!("applying policy {change} stored {names:?}, not [{key:?}]");
                }
            }
            Want::PodUp { ipv4, .. } => {
                admin
                    .create_pod(CreatePodRequest {
                        namespace: NAMESPACE.into(),
                        name: change.clone(),
                        labels: labels_of(k % args.identities),
                        node: host.name.clone(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("placing pod {change} failed: {}", s.message()))?;
                host.client
                    .clone()
                    .report_pod(ReportPodRequest {
                        namespace: NAMESPACE.into(),
                        name: change.clone(),
                        ipv4: ipv4.clone(),
                        interface: format!("simc{k}"),
                    })
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!(
                            "{}'s report of pod {change} was refused: {}",
                            host.name,
                            s.message()
                        )
                    })?;
                placed = Some(key.clone());
            }
            Want::PodGone { key: gone } => {
                let name = gone.split_once('/').map_or(gone.as_str(), |(_, n)| n);
                admin
                    .delete_pod(PodRequest {
                        namespace: NAMESPACE.into(),
                        name: name.to_owned(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("deleting pod {gone} failed: {}", s.message()))?;
                placed = None;
            }
        }
        if pod_change {
            pod_changes += 1;
        }
        let deadline = probe.started + args.timeout;
        while probe.remaining.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shared.set_probe(None);
        // Let the last messages of this change go out before the next one is counted.
        while shared.since_last_message() < Duration::from_millis(300) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu_s = (cpu_ticks(server.pid)? - cpu0) as f64 / hz;
        let counts = ServerCounts::read(&server.metrics_addr)?.since(&before);
        let arrivals: Vec<Arrival> = probe
            .arrivals
            .iter()
            .filter_map(|a| a.get().copied())
            .collect();
        let mut after: Vec<Duration> = arrivals.iter().map(|a| a.after).collect();
        after.sort();
        let mut sizes: Vec<usize> = arrivals.iter().map(|a| a.bytes).collect();
        sizes.sort();
        let r = ChangeResult {
            index: k,
            kind: want.kind(),
            name: shown,
            missed: args.nodes - arrivals.len(),
            not_delta: arrivals.iter().filter(|a| !a.delta).count(),
            not_intact: arrivals.iter().filter(|a| !a.intact).count(),
            after,
            bytes: sizes,
            cpu_s,
            counts,
        };
        eprintln!(
            "server_scale: change {k} ({}, {}): max {} over {} nodes, {} missed",
            r.kind,
            r.name,
            r.after.last().map_or("-".into(), |d| ms(*d)),
            r.after.len(),
            r.missed
        );
        if r.missed > 0 {
            failures.push(format!(
                "change {k} ({}, {}) did not reach {} of {} nodes within {} s",
                r.kind,
                r.name,
                r.missed,
                args.nodes,
                args.timeout.as_secs()
            ));
        }
        if r.not_delta > 0 {
            failures.push(format!(
                "change {k} ({}) reached {} nodes in a full-state message, not a delta",
                r.kind, r.not_delta
            ));
        }
        if r.not_intact > 0 {
            failures.push(format!(
                "change {k} ({}) reached {} nodes with unexpected contents",
                r.kind, r.not_intact
            ));
        }
        results.push(r);
    }
    let changes_wall = changes_start.elapsed().as_secs_f64();
    let changes_cpu = (cpu_ticks(server.pid)? - changes_cpu0) as f64 / hz;
    let bench_changes_cpu = (cpu_ticks(std::process::id())? - bench_changes_cpu0) as f64 / hz;
    let changes_counts = ServerCounts::read(&server.metrics_addr)?.since(&changes_counts0);

    // --- Signing.
    let pool: Vec<Vec<u8>> = (0..CSR_POOL)
        .map(|_| key_and_csr().map(|(_, csr)| csr))
        .collect::<anyhow::Result<_>>()?;
    let pool = Arc::new(pool);
    let targets: Arc<Vec<(NodeClient<Channel>, Vec<u32>)>> = Arc::new(
        nodes
            .iter()
            .map(|n| (n.client.clone(), n.identities.clone()))
            .collect(),
    );
    let mut signing = Vec::new();
    for kind in [SignKind::Identity, SignKind::RenewNode] {
        eprintln!(
            "server_scale: {} for {} s, {} calls in flight",
            kind.call(),
            args.sign.as_secs(),
            args.concurrency
        );
        let r = sign_window(
            kind,
            Arc::clone(&targets),
            Arc::clone(&pool),
            args.concurrency,
            args.sign,
            &server,
            hz,
        )
        .await?;
        if r.failed > 0 {
            failures.push(format!(
                "{} of the {} calls failed (first: {})",
                r.failed,
                kind.call(),
                r.first_err.clone().unwrap_or_default()
            ));
        }
        signing.push((kind, r));
    }
    eprintln!("server_scale: openssl speed -seconds 3 ecdsap256");
    let (ossl_sign, ossl_verify) = openssl_speed()?;

    // --- Streams' health over the whole run.
    let ended: Vec<String> = shared
        .streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.ended
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .map(|w| format!("{}: {w}", node_name(i)))
        })
        .collect();
    if !ended.is_empty() && failures.iter().all(|f| !f.contains("ended during setup")) {
        failures.push(format!(
            "{} sync streams ended (first: {})",
            ended.len(),
            ended[0]
        ));
    }
    let chain_breaks: u64 = shared
        .streams
        .iter()
        .map(|s| s.chain_breaks.load(Ordering::Relaxed))
        .sum();
    if chain_breaks > 0 {
        failures.push(format!(
            "{chain_breaks} deltas did not apply to the revision their stream held (base_revision)"
        ));
    }
    let resent_full: u64 = shared
        .streams
        .iter()
        .map(|s| s.resent_full.load(Ordering::Relaxed))
        .sum();
    let total_msgs = msgs(&shared);
    let total_bytes: u64 = shared
        .streams
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .sum();
    let mut first_sizes: Vec<usize> = shared
        .streams
        .iter()
        .filter_map(|s| s.first.get().map(|f| f.1))
        .collect();
    first_sizes.sort();
    let most = |of: fn(&(Duration, usize, usize, usize)) -> usize| {
        shared
            .streams
            .iter()
            .filter_map(|s| s.first.get().map(of))
            .max()
            .unwrap_or(0)
    };
    let (full_endpoints, full_pages) = (most(|f| f.2), most(|f| f.3));
    let largest = shared
        .streams
        .iter()
        .map(|s| s.largest.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0) as usize;

    // --- The table.
    let times = ctx.times.lock().unwrap_or_else(|p| p.into_inner());
    let dist = |v: &[Duration]| -> String {
        let mut v = v.to_vec();
        v.sort();
        match (pct(&v, 0.5), pct(&v, 0.99), v.last()) {
            (Some(a), Some(b), Some(c)) => format!("{} / {} / {}", ms(a), ms(b), ms(*c)),
            _ => "-".into(),
        }
    };
    let pods_total = args.nodes * args.pods;
    println!();
    println!(
        "### Server at scale: {} nodes x {} pods ({} pods, {} label sets), K = {} changes, datastore {datastore}",
        thousands(args.nodes),
        args.pods,
        thousands(pods_total),
        args.identities,
        args.changes
    );
    println!();
    println!(
        "{cores} cores (the bench and the server share them), load average at the start {load}; `meshauth server run`{}",
        if extra.is_empty() {
            String::new()
        } else {
            format!(" with `{}`", extra.join(" "))
        }
    );
    println!();
    println!("| | measured |");
    println!("|---|---|");
    println!(
        "| setup: {} nodes attested, {} pods placed and reported, every stream open | {:.1} s ({:.1} nodes/s, {} at a time); server CPU {:.1} s |",
        thousands(nodes.len()),
        thousands(pods_total),
        setup_took.as_secs_f64(),
        nodes.len() as f64 / setup_took.as_secs_f64(),
        args.concurrency,
        cpu_setup
    );
    println!(
        "| setup per node (p50 / p99 / max): whole node | {} |",
        dist(&times.node_total)
    );
    println!("| ... join token (admin) | {} |", dist(&times.token));
    println!(
        "| ... attestation (TLS + AttestJoinToken) | {} |",
        dist(&times.attest)
    );
    println!(
        "| ... CreatePod (admin), each | {} |",
        dist(&times.create_pod)
    );
    println!(
        "| ... ReportPod (node), each | {} |",
        dist(&times.report_pod)
    );
    println!(
        "| ... Sync call to the whole state (its last page) | {} |",
        dist(&times.first_message)
    );
    println!(
        "| view rebuilds during setup; mean rebuild | {} ; {} |",
        thousands(counts_setup.builds as usize),
        counts_setup.mean_build()
    );
    println!(
        "| sync messages during setup: full / delta (server's count) | {} / {} |",
        thousands(counts_setup.full as usize),
        thousands(counts_setup.delta as usize)
    );
    println!(
        "| settled (no message for {} s) after setup | {:.1} s |",
        QUIET.as_secs(),
        settled_after.as_secs_f64()
    );
    println!(
        "| whole state (first one of each stream): size p50 / max; endpoints; pages (max); largest message of any stream | {} / {}; {}; {} ; {} ({}) |",
        bytes(pct(&first_sizes, 0.5).unwrap_or(0) as f64),
        bytes(first_sizes.last().copied().unwrap_or(0) as f64),
        thousands(full_endpoints),
        full_pages,
        bytes(largest as f64),
        if largest > TONIC_DEFAULT_LIMIT {
            "above tonic's default 4 MiB decoding limit, which the agent's client keeps"
        } else {
            "under tonic's default 4 MiB decoding limit"
        }
    );
    println!(
        "| server at rest: VmRSS / VmHWM (peak so far) | {} / {} (VmRSS before setup {}, at the start of the window {}) |",
        mb(rss_rest),
        mb(hwm_rest),
        mb(rss_before_setup),
        mb(rss_rest0)
    );
    println!(
        "| server CPU at rest ({:.1} s, {} streams open) | {:.2} % of one core ({} sync messages in the window; bench process {:.2} %) |",
        rest_wall,
        thousands(nodes.len()),
        rest_pct,
        rest_msgs,
        bench_rest_pct
    );
    let mut maxes: Vec<Duration> = results
        .iter()
        .filter_map(|r| {
            if r.missed == 0 {
                r.after.last().copied()
            } else {
                None
            }
        })
        .collect();
    maxes.sort();
    let all_reached = results.iter().filter(|r| r.missed == 0).count();
    println!(
        "| time to every node (per-change max), p50 / p99 over {} changes | {} / {}{} |",
        results.len(),
        pct(&maxes, 0.5).map_or("-".into(), ms),
        pct(&maxes, 0.99).map_or("-".into(), ms),
        if all_reached < results.len() {
            format!(" (over the {all_reached} changes that reached every node)")
        } else {
            String::new()
        }
    );
    let mut all_after: Vec<Duration> = results.iter().flat_map(|r| r.after.clone()).collect();
    all_after.sort();
    println!(
        "| one node's arrival, p50 / p99 over every (change, node) | {} / {} |",
        pct(&all_after, 0.5).map_or("-".into(), ms),
        pct(&all_after, 0.99).map_or("-".into(), ms)
    );
    println!(
        "| server CPU per change (all {} changes: {:.2} s over {:.1} s) | {:.3} s ({:.1} ms per node); bench process {:.2} s per change |",
        results.len(),
        changes_cpu,
        changes_wall,
        changes_cpu / results.len().max(1) as f64,
        changes_cpu / results.len().max(1) as f64 / nodes.len() as f64 * 1000.0,
        bench_changes_cpu / results.len().max(1) as f64
    );
    println!(
        "| view rebuilds during the changes; mean rebuild | {} ; {} |",
        changes_counts.builds,
        changes_counts.mean_build()
    );
    println!(
        "| sync messages during the changes: full / delta | {} / {} |",
        thousands(changes_counts.full as usize),
        thousands(changes_counts.delta as usize)
    );
    for (kind, r) in &signing {
        println!(
            "| SVID signing: {}, 1 CSR per call, {} in flight, {:.1} s | **{:.0} SVIDs/s** ({} signed; call p50 / p99 {} / {}; server CPU {:.1} s, {:.0} SVIDs per server CPU-second; the server counted {}) |",
            kind.call(),
            args.concurrency,
            r.wall,
            r.rate(),
            thousands(r.signed),
            pct(&r.latency, 0.5).map_or("-".into(), ms),
            pct(&r.latency, 0.99).map_or("-".into(), ms),
            r.cpu,
            r.per_cpu(),
            thousands(r.counted as usize)
        );
    }
    println!(
        "| raw ECDSA P-256, `openssl speed -seconds 3 ecdsap256`, one core | {ossl_sign:.0} sign/s, {ossl_verify:.0} verify/s (one sign + one verify: {:.0}/s) |",
        1.0 / (1.0 / ossl_sign + 1.0 / ossl_verify)
    );
    for (kind, r) in &signing {
        println!(
            "| {}: server's SVIDs/s / openssl's sign/s | **{:.3}** (per server CPU-second: {:.3}) |",
            kind.call(),
            r.rate() / ossl_sign,
            r.per_cpu() / ossl_sign
        );
    }
    println!(
        "| streams: messages / bytes received in all; full states resent; broken revision chains; ended | {} / {}; {resent_full}; {chain_breaks}; {} |",
        thousands(total_msgs as usize),
        bytes(total_bytes as f64),
        ended.len()
    );
    println!(
        "| node API connections the server closed itself (limit, timeouts); bench dial retries | {}; {} |",
        ServerCounts::read(&server.metrics_addr)?.refused_connections as u64,
        ctx.connect_retries.load(Ordering::Relaxed)
    );
    println!(
        "| whole bench | {:.1} s |",
        bench_start.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| change | kind | p50 | p99 | max | nodes reached | delta size (p50) | server CPU | view rebuilds |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} `{}` | {} | {} | {} | {} / {} | {} | {:.2} s | {} |",
            r.index,
            r.kind,
            r.name,
            pct(&r.after, 0.5).map_or("-".into(), ms),
            pct(&r.after, 0.99).map_or("-".into(), ms),
            r.after.last().map_or("-".into(), |d| ms(*d)),
            r.after.len(),
            args.nodes,
            pct(&r.bytes, 0.5).map_or("-".into(), |b| bytes(b as f64)),
            r.cpu_s,
            r.counts.builds
        );
    }
    println!();
    Ok(failures)
}
