//! `meshauth demo`: the walkthrough, on a lab on this machine.
//!
//! Three nodes; `demodeployment` (3 replicas, HTTP on port 80), `client1`, `client2` and
//! `client3` (3 replicas each); a server on the underlay and an agent per node enforcing the
//! walkthrough's policies (default deny for the demo app, an allow for client1, an allow with
//! `authentication.mode: required` for client2). Then one request from each client kind to a
//! demo pod on another node, and the auth entries the agents hold.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshauth_lab::Lab;

use crate::common::Output;
use crate::observe::hubble;
use meshauth_proto::agent::Flow;

/// The walkthrough's three policies.
const POLICIES: &str = include_str!("../../meshauth-policy/tests/fixtures/walkthrough.yaml");
const TRUST_DOMAIN: &str = "demo.meshauth.local";

/// Demo options.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    /// Leave the lab, server and agents running to explore (`meshauth lab down --lab NAME`
    /// stops everything).
    #[arg(long)]
    keep: bool,
    /// The lab's name.
    #[arg(long, default_value = "demo")]
    lab: String,
    /// Output format of the results.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
    /// SVID lifetime (node and identity SVIDs); short ones show rotation and re-authentication.
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "1h")]
    svid_ttl: std::time::Duration,
    /// Agents authenticate the pairs policy requires before their first packet
    /// (`agent run --pre-authenticate`): client2's first SYN is not even held. Without it, the
    /// SYN is held on client2's node while the agents authenticate, then released.
    #[arg(long)]
    pre_authenticate: bool,
    /// Encrypt pod traffic between nodes (`agent run --encrypt`): WireGuard between the lab
    /// nodes, its pre-shared keys derived from the agents' node-SVID handshake; with --keep,
    /// `meshauth status --agent-socket ...` shows the tunnels.
    #[arg(long)]
    encrypt: bool,
    /// With --encrypt: how often the agents derive a new pre-shared key with each node
    /// (`agent run --tunnel-rotate`).
    #[arg(long, value_parser = crate::common::parse_duration, requires = "encrypt")]
    tunnel_rotate: Option<std::time::Duration>,
    /// Nodes attest with certificates of an operator CA (x509pop) instead of join tokens: the
    /// demo makes the CA (`operator-ca.pem`) and one certificate per node in its work dir, and
    /// the server trusts it (`server run --x509pop-ca`). Such nodes attest again by themselves
    /// after an outage longer than their SVID lifetime.
    #[arg(long)]
    x509pop: bool,
    /// Run this many server replicas (2-5) on an etcd the demo starts on the underlay (the
    /// `etcd` binary of the Debian package etcd-server), ports 8081 up, the CA sealed under a
    /// key-encryption key in the work dir; agents get every replica in `--server`. With --keep,
    /// stop a replica (`server healthcheck --admin-socket .../server-admin-<i>.sock` names the
    /// leader) and watch the others take over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: u8,
}

struct Running {
    lab: Lab,
    children: Vec<Child>,
    keep: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

fn say(output: Output, msg: &str) {
    if output == Output::Text {
        eprintln!("== {msg}");
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

const HTTP_SERVER: &str = r#"
import http.server
http.server.SimpleHTTPRequestHandler.protocol_version = "HTTP/1.1"
http.server.ThreadingHTTPServer(("0.0.0.0", 80), http.server.SimpleHTTPRequestHandler).serve_forever()
"#;

/// The walkthrough's outcome of each request: HTTP status, 0 for no response.
const EXPECTED: [(&str, u16); 4] = [
    ("client1-2", 200),
    ("client2-2", 200),
    ("client3-2", 0),
    ("client2-2 (again)", 200),
];

fn status_text(code: u16) -> String {
    if code == 0 {
        "no response".into()
    } else {
        format!("HTTP {code}")
    }
}

/// The flows of `pod`'s connections to demodeployment-1.
fn flows_of<'a>(flows: &'a [Flow], pod: &str) -> impl Iterator<Item = &'a Flow> + use<'a> {
    let pod = pod.to_owned();
    flows
        .iter()
        .filter(move |f| f.kind == "flow" && f.src_pod == pod && f.dst_pod == "demodeployment-1")
}

/// What happened, told from the statuses, flows and auth entries observed (never assumed), and
/// how the requests' results differed from the walkthrough's.
fn story(
    results: &[(&str, u16, u64)],
    flows: &[Flow],
    auth: &[serde_json::Value],
) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    let mut differences = Vec::new();
    for (i, (client, want)) in EXPECTED.iter().enumerate() {
        match results.get(i) {
            Some((c, got, _)) if c == client && got == want => {}
            Some((c, got, _)) => differences.push(format!(
                "{c}: the walkthrough expects {}, got {}",
                status_text(*want),
                status_text(*got)
            )),
            None => differences.push(format!("{client}: no request was made")),
        }
    }
    let status = |i: usize| results.get(i).map(|r| r.1).unwrap_or(0);
    let dropped = |pod: &str, reason: &str| -> Vec<&Flow> {
        flows_of(flows, pod)
            .filter(|f| f.verdict == "DROPPED" && f.reason.starts_with(reason))
            .collect()
    };
    let forwarded = |pod: &str| {
        flows_of(flows, pod)
            .filter(|f| f.verdict == "FORWARDED")
            .count()
    };

    // client1: allowed by policy.
    let n = forwarded("client1-2");
    lines.push(match (status(0), n) {
        (200, n) if n > 0 => {
            format!("client1 is allowed by policy: {n} forwarded flow(s), HTTP 200.")
        }
        (code, n) => format!(
            "client1: {} with {n} forwarded flow(s) recorded.",
            status_text(code)
        ),
    });

    // client2: allowed with authentication required: its first SYN held on its own node while
    // the agents authenticate (the demo app's ingress requires it), then released.
    let auth_drops = dropped("client2-2", "authentication required");
    let held: Vec<&Flow> = flows_of(flows, "client2-2")
        .filter(|f| f.verdict == "HELD")
        .collect();
    let released = flows_of(flows, "client2-2")
        .find(|f| f.verdict == "FORWARDED" && f.reason.contains("released after authentication"));
    if let Some(first) = held.first() {
        lines.push(format!(
            "client2 needs mutual authentication: its first SYN was held on {} (not dropped) \
             while the agents authenticated the pair{}; client2's first request: {} in {} ms.",
            first.node,
            match released {
                Some(r) => format!(", then released ({})", r.reason),
                None => ", and no release was recorded".into(),
            },
            status_text(status(1)),
            results.get(1).map(|r| r.2).unwrap_or(0)
        ));
    }
    if let Some(first) = auth_drops.first() {
        lines.push(format!(
            "client2 needs mutual authentication: its first SYN was dropped for authentication \
             on {} ({} SYN(s) dropped so).",
            first.node,
            auth_drops.len()
        ));
    } else if held.is_empty() {
        lines.push("client2: no SYN of it was held or dropped for authentication.".into());
    }
    let pair = |f: &Flow| {
        let apps = [
            f.src_labels.get("app").map(String::as_str),
            f.dst_labels.get("app").map(String::as_str),
        ];
        apps.contains(&Some("client2")) && apps.contains(&Some("demodeployment"))
    };
    let handshakes: Vec<&Flow> = flows
        .iter()
        .filter(|f| f.kind == "auth" && f.verdict == "SUCCEEDED" && pair(f))
        .collect();
    let failed = flows
        .iter()
        .filter(|f| f.kind == "auth" && f.verdict == "FAILED" && pair(f))
        .count();
    match handshakes.iter().find(|f| f.latency_us > 0) {
        Some(h) => lines.push(format!(
            "The agent on {} authenticated demodeployment <-> client2 in {:.1} ms \
             ({} successful handshake record(s){}).",
            h.node,
            h.latency_us as f64 / 1000.0,
            handshakes.len(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        )),
        None if handshakes.is_empty() => {
            lines.push("No handshake of demodeployment <-> client2 was recorded.".into())
        }
        None => lines.push(format!(
            "{} handshake record(s) of demodeployment <-> client2.",
            handshakes.len()
        )),
    }
    let mut holders: Vec<&str> = auth
        .iter()
        .filter(|e| {
            let apps = [
                e["local"]["labels"]["app"].as_str(),
                e["remote"]["labels"]["app"].as_str(),
            ];
            apps.contains(&Some("client2")) && apps.contains(&Some("demodeployment"))
        })
        .filter_map(|e| e["node"].as_str())
        .collect();
    holders.sort();
    holders.dedup();
    if holders.is_empty() {
        lines.push("No node holds an auth entry for the pair.".into());
    } else {
        lines.push(format!(
            "The auth entry for the pair is on {}.",
            holders.join(", ")
        ));
    }
    if let Some(first) = auth_drops.first() {
        // The same program (node, direction) letting a SYN through, after the drop.
        let passed = flows_of(flows, "client2-2").find(|f| {
            f.verdict == "FORWARDED"
                && f.node == first.node
                && f.direction == first.direction
                && f.time_unix_ms >= first.time_unix_ms
        });
        match passed {
            Some(p) => lines.push(format!(
                "A retransmitted SYN passed {} ms after the drop; client2's first request: {} \
                 in {} ms.",
                p.time_unix_ms - first.time_unix_ms,
                status_text(status(1)),
                results.get(1).map(|r| r.2).unwrap_or(0)
            )),
            None => lines.push("No SYN of client2 passed after the drop.".into()),
        }
    }
    if let Some((_, code, ms)) = results.get(3) {
        lines.push(format!(
            "client2 again: {} in {ms} ms{}.",
            status_text(*code),
            if auth_drops.len() <= 1 && held.len() <= 1 && *code == 200 {
                ", the pair being authenticated already"
            } else {
                ""
            }
        ));
    }

    // client3: no policy allows it.
    let denied = dropped("client3-2", "policy denied");
    lines.push(if denied.is_empty() {
        format!(
            "client3: {}, and no drop of it was recorded.",
            status_text(status(2))
        )
    } else {
        format!(
            "client3 is denied by policy: {} SYN(s) dropped (policy denied), {}.",
            denied.len(),
            status_text(status(2))
        )
    });
    (lines, differences)
}

const GET: &str = r#"
import sys, time, urllib.request
t = time.monotonic()
try:
    r = urllib.request.urlopen("http://" + sys.argv[1] + "/", timeout=float(sys.argv[2]))
    print(r.status, int((time.monotonic() - t) * 1000))
except Exception as e:
    print(0, int((time.monotonic() - t) * 1000))
"#;

/// Writes a new file of mode 0600 (a token or a key).
/// The client address of the demo's etcd, in the lab's underlay namespace.
const DEMO_ETCD: &str = "127.0.0.1:2379";

/// Starts a one-member etcd in the underlay namespace for the replicas, data in the work dir,
/// and waits until it answers.
fn start_etcd(lab: &Lab, work: &std::path::Path) -> anyhow::Result<Child> {
    let client = format!("http://{DEMO_ETCD}");
    let argv: Vec<String> = [
        "etcd",
        "--name",
        "demo",
        "--data-dir",
        &work.join("etcd").display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "demo=http://127.0.0.1:2380",
    ]
    .map(str::to_owned)
    .to_vec();
    let log = std::fs::File::create(work.join("etcd.log"))?;
    let child = lab
        .exec_in(&lab.underlay_netns(), &argv)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start etcd for --replicas: install the Debian package etcd-server")?;
    // etcd says so in its log once it serves clients.
    let log = work.join("etcd.log");
    wait_until(Duration::from_secs(20), "etcd", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ready to serve client requests"))
    })?;
    Ok(child)
}

fn write_secret(path: &str, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .with_context(|| format!("cannot write {path}"))
}

/// The operator's side of x509pop, as the demo plays it: a CA (`operator-ca.pem`; its key is
/// not kept) and, for nodes n1..nN, a client certificate whose common name is the node name
/// (`nI.crt`, `nI.key`). On real hosts the operator's own PKI does this (see the README).
fn make_operator_credentials(work: &std::path::Path, nodes: u8) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "meshauth demo operator CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(work.join("operator-ca.pem"), ca_cert.pem())?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for i in 1..=nodes {
        let node = format!("n{i}");
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(rcgen::DnType::CommonName, &node);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(work.join(format!("{node}.crt")), cert.pem())?;
        write_secret(
            &work.join(format!("{node}.key")).display().to_string(),
            key.serialize_pem().as_bytes(),
        )?;
    }
    Ok(())
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    if !meshauth_lab::can_run() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let exe = std::env::current_exe().context("locating the meshauth binary")?;
    let exe = exe.display().to_string();
    let out = cmd.output;
    let lab = Lab::new(&cmd.lab)?;
    lab.down()?;
    let work = PathBuf::from(meshauth_lab::STATE_DIR).join(&cmd.lab);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let w = |name: &str| work.join(name).display().to_string();

    say(
        out,
        "lab: 3 nodes, demodeployment and three clients, 3 replicas each",
    );
    lab.up(3)?;
    let mut running = Running {
        lab: lab.clone(),
        children: vec![],
        keep: cmd.keep,
    };
    for i in 1..=3u8 {
        let node = format!("n{i}");
        for app in ["demodeployment", "client1", "client2", "client3"] {
            lab.add_pod(
                &format!("{app}-{i}"),
                &node,
                BTreeMap::from([("app".to_string(), app.to_string())]),
            )?;
        }
    }

    say(out, "server on the underlay, policies applied");
    let replicas: Vec<String> = (0..u16::from(cmd.replicas))
        .map(|i| format!("{}:{}", meshauth_lab::SERVER_ADDRESS, 8081 + i))
        .collect();
    // Agents are given every replica.
    let server = replicas.join(",");
    let admin = w("server-admin.sock");
    let spawn =
        |running: &mut Running, netns: &str, args: Vec<String>, log: &str| -> anyhow::Result<()> {
            let mut argv = vec![exe.clone()];
            argv.extend(args);
            let log = std::fs::File::create(w(log))?;
            running.children.push(
                lab.exec_in(netns, &argv)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
            Ok(())
        };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut shared_args = s(&[
        "server",
        "run",
        "--trust-domain",
        TRUST_DOMAIN,
        "--metrics-listen",
        "127.0.0.1:0",
        "--svid-ttl",
        &humantime::format_duration(cmd.svid_ttl).to_string(),
    ]);
    if cmd.x509pop {
        make_operator_credentials(&work, 3)?;
        shared_args.extend(s(&["--x509pop-ca", &w("operator-ca.pem")]));
    }
    if replicas.len() > 1 {
        let etcd = start_etcd(&lab, &work)?;
        running.children.push(etcd);
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
            .context("cannot read /dev/urandom for the key-encryption key")?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_secret(&w("kek"), hex.as_bytes())?;
        shared_args.extend(s(&[
            "--datastore",
            &format!("etcd://{DEMO_ETCD}"),
            "--kek-file",
            &w("kek"),
        ]));
    }
    for (i, listen) in replicas.iter().enumerate() {
        let (data, socket, log) = match i {
            0 => ("server".to_owned(), admin.clone(), "server.log".to_owned()),
            i => (
                format!("server-{i}"),
                w(&format!("server-admin-{i}.sock")),
                format!("server-{i}.log"),
            ),
        };
        let mut args = shared_args.clone();
        args.extend(s(&[
            "--listen",
            listen,
            "--data-dir",
            &w(&data),
            "--admin-socket",
            &socket,
        ]));
        spawn(&mut running, &lab.underlay_netns(), args, &log)?;
        if i == 0 && replicas.len() > 1 {
            // The first replica creates the CA; the others start once it is there.
            wait_until(Duration::from_secs(20), "the first replica", || {
                Command::new(&exe)
                    .args([
                        "--log",
                        "warn",
                        "server",
                        "healthcheck",
                        "--admin-socket",
                        &admin,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })?;
        }
    }
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let o = Command::new(&exe)
            .args(["--log", "warn"])
            .args(args)
            .args(["--admin-socket", &admin])
            .output()?;
        if !o.status.success() {
            bail!(
                "meshauth {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    wait_until(Duration::from_secs(20), "the server", || {
        cli(&["server", "healthcheck"]).is_ok()
    })?;
    std::fs::write(w("bundle.pem"), cli(&["bundle", "show"])?)?;
    let policies = w("policies.yaml");
    std::fs::write(&policies, POLICIES)?;
    cli(&["policy", "apply", "-f", &policies])?;
    // The control plane places the pods (as Kubernetes' API server would); nodes only report
    // where each runs.
    for i in 1..=3u8 {
        for app in ["demodeployment", "client1", "client2", "client3"] {
            cli(&[
                "pod",
                "create",
                &format!("{app}-{i}"),
                "--node",
                &format!("n{i}"),
                "--labels",
                &format!("app={app}"),
            ])?;
        }
    }

    say(out, "an agent per node, enforcing on its pods");
    let mut sockets = Vec::new();
    for i in 1..=3 {
        let node = format!("n{i}");
        let address = format!("10.199.0.{i}");
        let pod_range = format!("10.200.{i}.0/24");
        let credential = if cmd.x509pop {
            // The node's address and pod range, as the lab built them, bound before it attests.
            cli(&[
                "agent",
                "register",
                "--node",
                &node,
                "--address",
                &address,
                "--pod-range",
                &pod_range,
            ])?;
            s(&[
                "--x509pop-cert",
                &w(&format!("{node}.crt")),
                "--x509pop-key",
                &w(&format!("{node}.key")),
            ])
        } else {
            // The token binds the node's underlay address and pod range, as the lab built them.
            let token = cli(&[
                "token",
                "generate",
                "--node",
                &node,
                "--address",
                &address,
                "--pod-range",
                &pod_range,
            ])?
            .trim()
            .to_string();
            // In a file of mode 0600, not on the agent's command line (readable by every user).
            let token_file = w(&format!("{node}.token"));
            write_secret(&token_file, token.as_bytes())?;
            s(&["--join-token-file", &token_file])
        };
        let socket = w(&format!("{node}-agent.sock"));
        let mut agent_args = s(&[
            "agent",
            "run",
            "--node",
            &node,
            "--trust-domain",
            TRUST_DOMAIN,
            "--server",
            &server,
            "--trust-bundle",
            &w("bundle.pem"),
            "--data-dir",
            &w(&node),
            "--workload-socket",
            &w(&format!("{node}-workload.sock")),
            "--agent-socket",
            &socket,
            "--metrics-listen",
            "127.0.0.1:0",
            "--lab",
            &cmd.lab,
        ]);
        agent_args.extend(credential);
        if cmd.pre_authenticate {
            agent_args.push("--pre-authenticate".into());
        }
        if cmd.encrypt {
            agent_args.push("--encrypt".into());
        }
        if let Some(every) = cmd.tunnel_rotate {
            agent_args.push("--tunnel-rotate".into());
            agent_args.push(format!("{}ms", every.as_millis()));
        }
        spawn(
            &mut running,
            &format!("{}-{node}", cmd.lab),
            agent_args,
            &format!("agent-{node}.log"),
        )?;
        sockets.push(socket);
    }
    let reported = || {
        cli(&["pod", "list", "-o", "json"])
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .and_then(|v| {
                let pods = v.as_array()?;
                Some(pods.iter().filter(|p| p["reported"] == true).count())
            })
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(60), "12 pods reported", || {
        reported() == 12
    })?;

    say(out, "HTTP responders in the demodeployment pods");
    for i in 1..=3 {
        // HTTP/1.1, so that clients may keep connections open (nginx-like).
        let argv = s(&["python3", "-c", HTTP_SERVER]);
        running.children.push(
            lab.exec(&format!("demodeployment-{i}"), &argv)?
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    say(
        out,
        "requests from each client to demodeployment-1 (node n1), from node n2",
    );
    // client1 may only start once policy reached the datapath; wait for it first.
    let get = |from: &str, timeout: &str| -> anyhow::Result<(u16, u64)> {
        let o = lab
            .exec(
                from,
                &s(&["python3", "-c", GET, "demodeployment-1", timeout]),
            )?
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout);
        let mut parts = text.split_whitespace();
        Ok((
            parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
            parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        ))
    };
    wait_until(Duration::from_secs(60), "client1 to be allowed", || {
        get("client1-2", "1").is_ok_and(|(code, _)| code == 200)
    })?;
    if cmd.pre_authenticate {
        // Pre-authentication runs in the background; the walkthrough's requests start once
        // n1 holds the pair client2-2 will use (demodeployment-1 <-> client2 on n2).
        let n1 = sockets.first().cloned().unwrap_or_default();
        wait_until(
            Duration::from_secs(60),
            "the agents to pre-authenticate client2",
            || {
                Command::new(&exe)
                    .args(["auth", "list", "-o", "json", "--agent-socket", &n1])
                    .output()
                    .ok()
                    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                    .and_then(|v| {
                        let entries = v.as_array()?;
                        Some(entries.iter().any(|e| {
                            e["local"]["labels"]["app"] == "demodeployment"
                                && e["remote"]["labels"]["app"] == "client2"
                                && e["remote"]["node"] == "n2"
                        }))
                    })
                    .unwrap_or(false)
            },
        )?;
    }
    // The datapath flows shown and told are those from here on (not client1's wait above).
    let requests_from_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut results = Vec::new();
    for client in ["client1-2", "client2-2", "client3-2"] {
        let (code, ms) = get(client, "5")?;
        results.push((client, code, ms));
    }
    let (code, ms) = get("client2-2", "5")?;
    results.push(("client2-2 (again)", code, ms));
    std::thread::sleep(Duration::from_millis(700));

    let mut auth = Vec::new();
    for socket in &sockets {
        let o = Command::new(&exe)
            .args(["auth", "list", "-o", "json", "--agent-socket", socket])
            .output()?;
        if let Ok(serde_json::Value::Array(v)) = serde_json::from_slice(&o.stdout) {
            auth.extend(v);
        }
    }
    // The flows as `hubble observe` would show them, from the agents' flow logs.
    let agent_sockets: Vec<PathBuf> = sockets.iter().map(PathBuf::from).collect();
    let mut flows = Vec::new();
    crate::common::block_on(async {
        flows = crate::observe::collect(&agent_sockets).await?;
        flows.retain(|f| f.kind == "auth" || f.time_unix_ms >= requests_from_ms);
        Ok(())
    })?;
    let (lines, differences) = story(&results, &flows, &auth);

    match out {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "requests": results.iter().map(|(c, code, ms)| serde_json::json!({"from": c, "to": "demodeployment-1", "status": code, "ms": ms})).collect::<Vec<_>>(),
                "auth": auth,
                "flows": flows.iter().map(hubble::flow_json).collect::<Vec<_>>(),
                "story": lines,
                "differences": differences,
            })
        ),
        Output::Text => {
            println!();
            for (client, code, ms) in &results {
                let verdict = if *code == 200 {
                    format!("HTTP {code}")
                } else {
                    "denied (no response)".into()
                };
                println!("{client:<18} -> demodeployment-1   {verdict:<22} {ms:>5} ms");
            }
            println!();
            println!("auth entries (identity pairs the agents authenticated):");
            for e in &auth {
                println!(
                    "  on {}: {} <-> {} on {} ({}s left)",
                    e["node"].as_str().unwrap_or("?"),
                    e["local"]["labels"]["app"].as_str().unwrap_or("?"),
                    e["remote"]["labels"]["app"].as_str().unwrap_or("?"),
                    e["remote"]["node"].as_str().unwrap_or("?"),
                    e["seconds_left"]
                );
            }
            for client in ["client1", "client2", "client3"] {
                println!();
                println!("hubble observe --to-label app=demodeployment --from-label app={client}:");
                let pod = format!("{client}-2");
                let mut any = false;
                for f in flows_of(&flows, &pod) {
                    println!("  {}", hubble::flow_line(f));
                    any = true;
                }
                if !any {
                    println!("  (no flows of {pod})");
                }
            }
            println!();
            for l in &lines {
                println!("{l}");
            }
            if !differences.is_empty() {
                println!();
                println!("differences from the walkthrough:");
                for d in &differences {
                    println!("  {d}");
                }
            }
            if cmd.keep {
                println!();
                println!("kept running; explore with:");
                println!(
                    "  meshauth auth list --agent-socket {}",
                    sockets.join(" --agent-socket ")
                );
                println!("  meshauth endpoint list --admin-socket {admin}");
                if cmd.encrypt {
                    println!(
                        "  meshauth status --admin-socket {admin} --agent-socket {}   # the tunnels",
                        sockets.join(" --agent-socket ")
                    );
                }
                println!(
                    "  meshauth lab --lab {} exec client2-1 -- python3 -c \"import urllib.request as u; print(u.urlopen('http://demodeployment-3').status)\"",
                    cmd.lab
                );
                println!(
                    "  meshauth lab --lab {} down     # stops everything",
                    cmd.lab
                );
            }
        }
    }
    if !differences.is_empty() {
        bail!(
            "the demo differed from the walkthrough: {}",
            differences.join("; ")
        );
    }
    Ok(())
}
