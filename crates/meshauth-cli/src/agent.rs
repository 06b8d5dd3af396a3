//! `meshauth agent ...`: run a node agent, ask it what it holds, and manage agents on the server.

use std::net::SocketAddr;
use std::path::PathBuf;

use meshauth_agent::{AgentConfig, defaults};
use meshauth_datastore::NodeName;
use meshauth_proto::admin::{Agent, AgentRequest, ListAgentsRequest};
use meshauth_proto::agent::agent_admin_client::AgentAdminClient;
use meshauth_proto::agent::{HealthRequest, ListSvidsRequest};
use meshauth_spiffe::TrustDomain;

use crate::common::{AdminSocket, Output, block_on, rpc, seconds_left, time};

/// Agent commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Run the node agent: attest (join token or x509pop on first start), keep SVIDs fresh,
    /// serve the SPIFFE Workload API.
    ///
    /// First start: meshauth agent run --node n1 --join-token-file TOKEN_FILE --trust-bundle
    /// bundle.pem
    /// Or, with a certificate from the operator's CA: meshauth agent run --node n1
    /// --x509pop-cert n1.crt --x509pop-key n1.key --trust-bundle bundle.pem
    /// Later starts re-use the node SVID kept in --data-dir. If it expired (the server was down
    /// longer than its lifetime), an x509pop node attests again by itself; a join-token node
    /// takes a new token written to --join-token-file, without a restart.
    ///
    /// Server replicas: --server s1:8081,s2:8081 (any serves; the agent fails over between
    /// them and keeps serving what it holds).
    Run(Box<RunArgs>),
    /// Ask a running agent whether it is healthy and ready; exits non-zero, naming what is not
    /// ready and why (first sync pending, enforcement not in force, ...), when it is not.
    Healthcheck {
        #[command(flatten)]
        socket: AgentSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the SVIDs a running agent holds (SPIFFE ID, serial, expiry; never keys).
    Svids {
        #[command(flatten)]
        socket: AgentSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List attested agents (on the server).
    List {
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one agent.
    Show {
        /// Node name.
        #[arg(long)]
        node: NodeName,
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Ban an agent: its renewals, syncs and SVID requests are refused, and it cannot re-attest
    /// until evicted.
    Ban {
        /// Node name.
        #[arg(long)]
        node: NodeName,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// Bind an address and a pod range to a node before it attests (a join token can carry
    /// them too: `token generate --address --pod-range`); an x509pop node gets them this way.
    ///
    /// Example: meshauth agent register --node n1 --address 10.199.0.1 --pod-range 10.200.1.0/24
    Register {
        /// Node name.
        #[arg(long)]
        node: NodeName,
        /// Where other agents reach it; default: the address it attests from. The node can
        /// never claim another.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Its pods' addresses must be inside; default: a /24 of the server's --pod-cidr.
        #[arg(long, value_parser = |s: &str| s.parse::<meshauth_datastore::Ipv4Range>())]
        pod_range: Option<meshauth_datastore::Ipv4Range>,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// Evict an agent: its record is deleted; it must attest again (a new join token; an
    /// x509pop node attests again by itself).
    Evict {
        /// Node name.
        #[arg(long)]
        node: NodeName,
        #[command(flatten)]
        socket: AdminSocket,
    },
}

/// Where an agent's admin socket is.
#[derive(Debug, Clone, clap::Args)]
struct AgentSocket {
    /// Path of the agent's admin socket.
    #[arg(long = "agent-socket", env = "MESHAUTH_AGENT_SOCKET", default_value = defaults::ADMIN_SOCKET)]
    path: PathBuf,
}

impl AgentSocket {
    async fn connect(&self) -> anyhow::Result<AgentAdminClient<tonic::transport::Channel>> {
        crate::common::agent_client(&self.path).await
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// This node's name (becomes spiffe://<td>/node/<name>).
    #[arg(long)]
    node: NodeName,
    /// The server's node API, HOST:PORT; replicas as HOST:PORT,HOST:PORT,... (or the flag given
    /// again, once per replica: both forms mix).
    ///
    /// Any replica serves the node API (attestation, renewal, signing, sync): they share one
    /// registry. The order is the preference: the agent attests at the first server that
    /// answers, keeps its sync stream on one server, and when that session fails (connect
    /// error, stream error, the server ended the stream) moves to the next, wrapping around.
    /// Within a round of the list the next server is dialed after 0.5 s; once every server of a
    /// round failed, the agent waits 0.5 s, doubled for each further failed round up to 30 s
    /// (±20 % jitter); the waits start over as soon as a server served a sync. Meanwhile it
    /// keeps serving everything it holds (SVIDs, bundle, policy) until expiry. A node whose
    /// SVID expired attests again at the server of the session, moving through the list the
    /// same way. `meshauth_agent_server_index` says which server it is on,
    /// `meshauth_agent_server_failovers_total` how often it moved.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]", default_value = defaults::SERVER)]
    server: Vec<meshauth_agent::manager::ServerList>,
    /// Trust domain.
    #[arg(long, default_value = defaults::TRUST_DOMAIN)]
    trust_domain: TrustDomain,
    /// File holding the single-use join token for the first start, e.g. `(umask 077; meshauth
    /// token generate --node NAME > FILE)`. Or set MESHAUTH_JOIN_TOKEN in the environment.
    #[arg(long, value_name = "FILE", conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// Discouraged: any local user can read a token given on the command line (in
    /// /proc/<pid>/cmdline) and spend it first. Use --join-token-file or MESHAUTH_JOIN_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<JoinToken>,
    /// PEM certificate the operator's CA issued for this node (subject CN or a DNS name = the
    /// node name), for x509pop attestation: the node attests with it at first start and again,
    /// by itself, whenever its SVID expired (the server runs with --x509pop-ca). Read again at
    /// each attestation, so it may be replaced in place.
    #[arg(long, value_name = "FILE", requires = "x509pop_key", conflicts_with_all = ["join_token", "join_token_file"])]
    x509pop_cert: Option<PathBuf>,
    /// PEM private key of --x509pop-cert (keep it 0600).
    #[arg(long, value_name = "FILE", requires = "x509pop_cert")]
    x509pop_key: Option<PathBuf>,
    /// PEM bundle used to verify the server on first contact (`meshauth bundle show`).
    #[arg(long, default_value = "/etc/meshauth/bundle.pem")]
    trust_bundle: PathBuf,
    /// Where the node key (0600), node SVID and latest bundle are kept.
    #[arg(long, default_value = defaults::DATA_DIR)]
    data_dir: PathBuf,
    /// SPIFFE Workload API socket for local workloads.
    #[arg(long, default_value = defaults::WORKLOAD_SOCKET)]
    workload_socket: PathBuf,
    /// The agent's admin socket.
    #[arg(long = "agent-socket", default_value = defaults::ADMIN_SOCKET)]
    agent_socket: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = defaults::METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// Enforce policy on the pods of this lab's node (loads the eBPF datapath; run the agent
    /// inside the node's network namespace: `nsenter --net=/run/netns/<lab>-<node> meshauth
    /// agent run ...`).
    #[arg(long, conflicts_with = "cni")]
    lab: Option<String>,
    /// Enforce policy on the containers the meshauth-cni plugin hands over on --agent-socket
    /// (loads the eBPF datapath; run the agent in the network namespace the containers' veths
    /// are made in, the host's on a real node). Each container gets an address of this node's
    /// pod range, only if the control plane placed its pod (MESHAUTH_POD) here; what the plugin
    /// handed over is kept in --data-dir across restarts.
    #[arg(long)]
    cni: bool,
    /// Where the datapath pins its maps and links (bpffs). Default:
    /// /sys/fs/bpf/meshauth/<node>, with --lab /sys/fs/bpf/meshauth/<lab>-<node>.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Address peers reach this node's handshake port (4250) on; default: the address this
    /// node reaches the server from.
    #[arg(long)]
    node_address: Option<std::net::IpAddr>,
    /// Pairs that may wait for a handshake at once; more requests are dropped and counted
    /// (the datapath signals again).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    auth_queue: u32,
    /// Drop the packets of pairs not authenticated yet (the sender retransmits) instead of
    /// holding them in the node's queue until the pair has authenticated.
    #[arg(long)]
    no_hold: bool,
    /// Authenticate the pairs policy requires ahead of their first packet (every identity
    /// placed anywhere that a local endpoint's policy requires authentication with), at most
    /// 4096 per change, instead of on the first packet only.
    #[arg(long)]
    pre_authenticate: bool,
    /// Handshakes run concurrently.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    auth_workers: u32,
    /// Encrypt pod traffic to other nodes: WireGuard (userspace, on the persistent TUN
    /// `mawg0`, UDP 51871) whose pre-shared key with each node is derived from a TLS 1.3
    /// handshake of the two agents' node SVIDs (TCP 4251). Each peer accepts only its own
    /// pods' addresses; every other node's pod range is routed into the tunnel, so nothing
    /// between pods of two nodes leaves in the clear, agent down or not. The node's WireGuard
    /// key is kept in --data-dir (wireguard.key, 0600) and published to the server. Every node
    /// must run with it. Needs --lab or --cni.
    #[arg(long)]
    encrypt: bool,
    /// With --encrypt: derive a new pre-shared key with each node this often (and before the
    /// earlier node SVID expires).
    #[arg(long, value_parser = crate::common::parse_duration, default_value = "10m", requires = "encrypt")]
    tunnel_rotate: std::time::Duration,
}

/// A source that could not be made: enforcement reports why and stays not ready.
struct FailedSource(String);

impl meshauth_agent::endpoints::EndpointSource for FailedSource {
    fn watch(
        self: Box<Self>,
    ) -> tokio::sync::watch::Receiver<meshauth_agent::endpoints::EndpointList> {
        let (tx, rx) = tokio::sync::watch::channel(Err(self.0));
        std::mem::forget(tx);
        rx
    }
}

/// A join token given on the command line; `Debug` (of `RunArgs`, of the whole command line)
/// never shows it.
#[derive(Clone)]
struct JoinToken(String);

impl std::str::FromStr for JoinToken {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(JoinToken(s.to_owned()))
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// The environment variable that may hold the join token (read only when no flag gives one).
const JOIN_TOKEN_ENV: &str = "MESHAUTH_JOIN_TOKEN";

/// The join token: from `--join-token-file`, else `--join-token` (with a warning), else the
/// environment. Never logged.
fn join_token(args: &RunArgs) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    if let Some(path) = &args.join_token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --join-token-file {}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            !token.is_empty(),
            "--join-token-file {} is empty (write the output of `meshauth token generate --node {}` to it)",
            path.display(),
            args.node
        );
        return Ok(Some(token.to_owned()));
    }
    if let Some(token) = &args.join_token {
        tracing::warn!(
            "--join-token puts the token where any local user can read it (/proc/<pid>/cmdline) \
             and spend it first; use --join-token-file or {JOIN_TOKEN_ENV}"
        );
        return Ok(Some(token.0.clone()));
    }
    Ok(std::env::var(JOIN_TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let attestor = meshauth_agent::node_attestation::NodeAttestor {
        x509pop: args
            .x509pop_cert
            .clone()
            .zip(args.x509pop_key.clone())
            .map(|(cert, key)| meshauth_agent::node_attestation::X509PopFiles { cert, key }),
        join_token: if args.x509pop_cert.is_some() {
            None
        } else {
            join_token(&args)?
        },
        join_token_file: args.join_token_file.clone(),
    };
    if let Some(files) = &attestor.x509pop {
        // Checked at start, so that a wrong path is an error now, not at the next outage.
        files.load()?;
    }
    let enforce = enforce_settings(&args)?;
    let servers = meshauth_agent::manager::ServerList::join(args.server)
        .map_err(|e| anyhow::anyhow!("--server: {e}"))?;
    let config = AgentConfig {
        node_name: args.node.to_string(),
        servers,
        trust_domain: args.trust_domain,
        attestor,
        trust_bundle: args.trust_bundle,
        data_dir: args.data_dir,
        workload_socket: args.workload_socket,
        admin_socket: args.agent_socket,
        metrics_listen: args.metrics_listen,
        enforce,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meshauth-agent")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let agent = meshauth_agent::Agent::bind(config).await?;
        agent.serve(crate::server::shutdown_signal()).await
    })
}

/// How the agent enforces: on the lab's pods (--lab), on the CNI plugin's containers (--cni),
/// or not at all.
fn enforce_settings(args: &RunArgs) -> anyhow::Result<Option<meshauth_agent::EnforceSettings>> {
    let common = |pin_dir, source, cni| meshauth_agent::EnforceSettings {
        pin_dir,
        source,
        node_address: args.node_address,
        hold: (!args.no_hold).then(meshauth_agent::hold::HoldLimits::default),
        pre_authenticate: args.pre_authenticate.then_some(4096),
        auth: meshauth_auth::ManagerConfig {
            queue: args.auth_queue as usize,
            workers: args.auth_workers as usize,
            ..Default::default()
        },
        cni,
        encrypt: args
            .encrypt
            .then(|| meshauth_agent::tunnel::TunnelSettings {
                rotate_every: args.tunnel_rotate,
                ..Default::default()
            }),
    };
    if args.encrypt && !args.cni && args.lab.is_none() {
        anyhow::bail!("--encrypt needs enforcement: add --lab LAB or --cni");
    }
    if args.cni {
        std::fs::create_dir_all(&args.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create --data-dir {}: {e}", args.data_dir.display())
        })?;
        let store = meshauth_agent::cni::CniEndpoints::open(&args.data_dir)?;
        store.prune(meshauth_agent::cni::interface_exists)?;
        let source: meshauth_agent::run::SourceFactory = {
            let store = store.clone();
            std::sync::Arc::new(move || store.source())
        };
        return Ok(Some(common(
            args.pin_dir.clone().unwrap_or_else(|| {
                meshauth_datapath::Datapath::pin_dir_for(&args.node.to_string())
            }),
            source,
            Some(store),
        )));
    }
    Ok(args.lab.clone().map(|lab| {
        let node = args.node.to_string();
        common(
            args.pin_dir.clone().unwrap_or_else(|| {
                meshauth_datapath::Datapath::pin_dir_for(&format!("{lab}-{node}"))
            }),
            std::sync::Arc::new(
                move || match crate::lab_source::LabEndpoints::new(&lab, &node) {
                    Ok(s) => Box::new(s) as Box<dyn meshauth_agent::endpoints::EndpointSource>,
                    Err(e) => Box::new(FailedSource(format!("lab {lab}: {e:#}"))),
                },
            ),
            None,
        )
    }))
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd.command {
        Sub::Run(args) => run_agent(*args),
        other => block_on(operate(other)),
    }
}

async fn operate(sub: Sub) -> anyhow::Result<()> {
    {
        match sub {
            Sub::Run(args) => {
                return Err(anyhow::anyhow!(
                    "internal: agent run for {} reached the operator path",
                    args.node
                ));
            }
            Sub::Healthcheck { socket, output } => {
                let mut c = socket.connect().await?;
                let h = c.health(HealthRequest {}).await.map_err(rpc)?.into_inner();
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({
                            "node": h.node_name,
                            "node_id": h.node_id,
                            "spiffe_id": h.spiffe_id,
                            "node_svid_serial": h.node_svid_serial,
                            "node_svid_expires_at": time(h.node_svid_expires_at_unix),
                            "server_connected": h.server_connected,
                            "server": h.server,
                            "bundle_sequence": h.bundle_sequence,
                            "entries": h.entries,
                            "svids": h.svids,
                            "ready": h.ready,
                            "not_ready": h.not_ready,
                            "unsignable_entries": h.unsignable_entries,
                        })
                    ),
                    Output::Text => {
                        println!("agent {} ({}) is running", h.node_name, h.spiffe_id);
                        println!(
                            "node SVID serial {} expires {} (in {}s)",
                            h.node_svid_serial,
                            time(h.node_svid_expires_at_unix),
                            seconds_left(h.node_svid_expires_at_unix)
                        );
                        println!(
                            "server {}: {}  entries: {}  SVIDs: {}  bundle sequence: {}",
                            h.server,
                            if h.server_connected {
                                "connected"
                            } else {
                                "disconnected (serving cached SVIDs)"
                            },
                            h.entries,
                            h.svids,
                            h.bundle_sequence
                        );
                        // Not a readiness condition: the node's other SVIDs are unaffected.
                        for u in &h.unsignable_entries {
                            println!("not signed by the server: {u}");
                        }
                        if h.ready {
                            println!("ready");
                        }
                    }
                }
                if !h.ready {
                    anyhow::bail!("the agent is not ready: {}", h.not_ready.join("; "));
                }
            }
            Sub::Svids { socket, output } => {
                let mut c = socket.connect().await?;
                let list = c
                    .list_svids(ListSvidsRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner();
                let refusal =
                    |entry_id: &str| list.unsignable.iter().find(|u| u.entry_id == entry_id);
                let error = |u: &meshauth_proto::agent::UnsignableEntry| {
                    serde_json::json!({
                        "reason": u.reason,
                        "message": u.message,
                        "refused_at": time(u.refused_at_unix),
                    })
                };
                // Entries without any SVID, after the SVIDs (whose renewal may be refused).
                let unsigned = list
                    .unsignable
                    .iter()
                    .filter(|u| !list.svids.iter().any(|s| s.entry_id == u.entry_id));
                match output {
                    Output::Json => {
                        let mut v: Vec<_> = list
                            .svids
                            .iter()
                            .map(|s| {
                                serde_json::json!({
                                    "spiffe_id": s.spiffe_id,
                                    "entry_id": s.entry_id,
                                    "serial": s.serial,
                                    "expires_at": time(s.expires_at_unix),
                                    "selectors": s.selectors,
                                    "error": refusal(&s.entry_id).map(error),
                                })
                            })
                            .collect();
                        v.extend(unsigned.map(|u| {
                            serde_json::json!({
                                "spiffe_id": u.spiffe_id,
                                "entry_id": u.entry_id,
                                "serial": null,
                                "expires_at": null,
                                "selectors": u.selectors,
                                "error": error(u),
                            })
                        }));
                        println!("{}", serde_json::Value::from(v));
                    }
                    Output::Text => {
                        if list.svids.is_empty() {
                            println!("no SVIDs");
                        }
                        for s in &list.svids {
                            println!(
                                "{}  serial {}  expires {} (in {}s)",
                                s.spiffe_id,
                                s.serial,
                                time(s.expires_at_unix),
                                seconds_left(s.expires_at_unix)
                            );
                            if let Some(u) = refusal(&s.entry_id) {
                                println!("  renewal refused ({}): {}", u.reason, u.message);
                            }
                        }
                        for u in unsigned {
                            println!(
                                "{}  entry {}  NOT SIGNED ({}): {}",
                                u.spiffe_id, u.entry_id, u.reason, u.message
                            );
                        }
                    }
                }
            }
            Sub::List { socket, output } => {
                let mut c = socket.connect().await?;
                let list = c
                    .list_agents(ListAgentsRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_agents(&list.agents, output);
            }
            Sub::Show {
                node,
                socket,
                output,
            } => {
                let mut c = socket.connect().await?;
                let a = c
                    .get_agent(AgentRequest {
                        node_name: node.to_string(),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                print_agents(&[a], output);
            }
            Sub::Ban { node, socket } => {
                let mut c = socket.connect().await?;
                c.ban_agent(AgentRequest {
                    node_name: node.to_string(),
                })
                .await
                .map_err(rpc)?;
                println!("banned agent {node}");
            }
            Sub::Register {
                node,
                address,
                pod_range,
                socket,
            } => {
                let mut c = socket.connect().await?;
                let spec = c
                    .register_node(meshauth_proto::admin::RegisterNodeRequest {
                        node_name: node.to_string(),
                        address: address.map(|a| a.to_string()).unwrap_or_default(),
                        pod_range: pod_range.map(|r| r.to_string()).unwrap_or_default(),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                println!(
                    "node {}: address {}, pod range {}",
                    spec.node_name,
                    if spec.address.is_empty() {
                        "(where it attests from)"
                    } else {
                        spec.address.as_str()
                    },
                    spec.pod_range
                );
            }
            Sub::Evict { node, socket } => {
                let mut c = socket.connect().await?;
                c.evict_agent(AgentRequest {
                    node_name: node.to_string(),
                })
                .await
                .map_err(rpc)?;
                println!("evicted agent {node}");
            }
        }
        Ok(())
    }
}

fn print_agents(agents: &[Agent], output: Output) {
    match output {
        Output::Json => {
            let list: Vec<_> = agents
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "node": a.node_name,
                        "node_id": a.node_id,
                        "spiffe_id": a.spiffe_id,
                        "serial": a.serial,
                        "expires_at": time(a.expires_at_unix),
                        "banned": a.banned,
                        "attested_at": time(a.attested_at_unix),
                        "attestation": a.attestation,
                        "can_reattest": a.can_reattest,
                    })
                })
                .collect();
            println!("{}", serde_json::Value::from(list));
        }
        Output::Text => {
            if agents.is_empty() {
                println!("no agents");
                return;
            }
            println!(
                "{:<16} {:>4}  {:<8} {:<22} {:<11} {:<13} SPIFFE ID",
                "NODE", "ID", "STATE", "SVID EXPIRES", "ATTESTED BY", "CAN RE-ATTEST"
            );
            for a in agents {
                println!(
                    "{:<16} {:>4}  {:<8} {:<22} {:<11} {:<13} {}",
                    a.node_name,
                    a.node_id,
                    if a.banned { "banned" } else { "active" },
                    time(a.expires_at_unix),
                    a.attestation,
                    // A join-token node needs a new token once its SVID expired.
                    if a.can_reattest { "yes" } else { "no (token)" },
                    a.spiffe_id
                );
            }
        }
    }
}

#[cfg(test)]
mod join_token_tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: super::RunArgs,
    }

    #[test]
    fn the_parsed_command_line_never_shows_the_token() {
        use clap::Parser as _;
        let cli =
            Cli::try_parse_from(["meshauth", "--node", "n1", "--join-token", "s3cr3t"]).unwrap();
        assert_eq!(cli.run.join_token.as_ref().unwrap().0, "s3cr3t");
        for shown in [format!("{cli:?}"), format!("{cli:#?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        let both = Cli::try_parse_from([
            "meshauth",
            "--node",
            "n1",
            "--join-token",
            "a",
            "--join-token-file",
            "/f",
        ]);
        assert!(both.is_err(), "one source of the token at a time");
    }

    fn servers(args: &[&str]) -> Result<String, String> {
        use clap::Parser as _;
        let mut argv = vec!["meshauth", "--node", "n1"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        meshauth_agent::manager::ServerList::join(cli.run.server)
            .map(|l| l.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn server_lists_come_as_commas_or_repeated_flags() {
        assert_eq!(servers(&[]).unwrap(), "127.0.0.1:8081", "the default");
        assert_eq!(
            servers(&["--server", "s1:8081"]).unwrap(),
            "s1:8081",
            "one server, as before"
        );
        assert_eq!(
            servers(&["--server", "s1:8081,s2:8081", "--server", "s3:9000"]).unwrap(),
            "s1:8081,s2:8081,s3:9000"
        );
        let no_port = servers(&["--server", "s1:8081,s2"]).unwrap_err();
        assert!(
            no_port.contains("server address \"s2\" has no port"),
            "{no_port}"
        );
        let twice = servers(&["--server", "s1:8081,s2:8081", "--server", "s2:8081"]).unwrap_err();
        assert_eq!(
            twice,
            "server s2:8081 is listed twice: give each replica once, in the order of preference"
        );
        let empty = servers(&["--server", ""]).unwrap_err();
        assert!(empty.contains("no server given"), "{empty}");
    }
}
