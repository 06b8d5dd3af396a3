//! `meshauth server ...`: run the server, check its health.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use meshauth_proto::admin::HealthRequest;
use meshauth_server::{ServerConfig, defaults};
use meshauth_spiffe::TrustDomain;

use crate::common::{AdminSocket, Output, block_on, parse_duration, rpc, seconds_left, time};

/// Server commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Run the server: CA, registry (SQLite in --data-dir, or etcd shared by replicas), node
    /// API, admin socket, metrics.
    ///
    /// The CA and every record survive restarts: SVIDs issued before a restart keep validating.
    Run(Box<RunArgs>),
    /// Check a data dir's datastore without starting a server: that it is there, readable, of
    /// this trust domain, holds its CA, and that every row decodes (what `server run` checks
    /// before it serves). Prints the rows of each table; exits non-zero naming the damage.
    ///
    /// Example: meshauth server check --data-dir /var/lib/meshauth/server
    Check {
        /// The server's data dir.
        #[arg(long, default_value = defaults::DATA_DIR)]
        data_dir: PathBuf,
        /// The trust domain the data dir must belong to.
        #[arg(long, default_value = defaults::TRUST_DOMAIN)]
        trust_domain: TrustDomain,
    },
    /// Ask a running server whether it is healthy (exit 0) and print its CA state.
    Healthcheck {
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Trust domain served (lowercase letters, digits, `.`, `-`, `_`).
    #[arg(long, default_value = defaults::TRUST_DOMAIN)]
    trust_domain: TrustDomain,
    /// Directory of the SQLite datastore (holds the CA keys; created with mode 0700). With
    /// etcd it holds no records, only the lock that keeps two servers off one directory.
    #[arg(long, default_value = defaults::DATA_DIR)]
    data_dir: PathBuf,
    /// Where the registry is kept: `sqlite` (one server, the file in --data-dir), or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` for several replicas of this server on one
    /// etcd cluster (needs --kek-file). Every replica serves the node and admin APIs; one,
    /// elected through etcd, rotates the CA, and the others follow. Records live under PREFIX
    /// (default /meshauth/<trust domain>). Give agents every replica: `agent run --server
    /// A:8081,B:8081,C:8081`.
    #[arg(long, default_value = "sqlite", value_name = "URL")]
    datastore: meshauth_server::datastore_url::DatastoreUrl,
    /// Address of the node API (gRPC over mutual TLS 1.3) that agents dial.
    #[arg(long, default_value = defaults::LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    socket: AdminSocket,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = defaults::METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// CA lifetime; a new CA is prepared at 1/2 and activated at 5/6 of it.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    ca_ttl: Duration,
    /// Default X.509-SVID lifetime for nodes and workloads (capped by the CA's expiry).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    svid_ttl: Duration,
    /// Default lifetime of join tokens.
    #[arg(long, value_parser = parse_duration, default_value = "600s")]
    join_token_ttl: Duration,
    /// Where nodes' pod ranges are allocated from, a /24 per node, for nodes attesting without a
    /// range bound to them (`meshauth token generate --pod-range` or `meshauth agent register`).
    #[arg(long, default_value = "10.200.0.0/16", value_parser = |s: &str| s.parse::<meshauth_datastore::Ipv4Range>())]
    pod_cidr: meshauth_datastore::Ipv4Range,
    /// PEM file of the operator CA certificates that issue node certificates: nodes holding one
    /// (`agent run --x509pop-cert/--x509pop-key`) attest with it whenever they need to, as
    /// SPIRE's x509pop does, so a node whose SVID expired in an outage comes back by itself.
    /// The node name must be the certificate's subject common name or one of its DNS names.
    #[arg(long, value_name = "FILE")]
    x509pop_ca: Option<PathBuf>,
    /// File of the key-encryption key (64 hex digits, mode 0600; make one with `openssl rand
    /// -hex 32`) that seals the CA's private keys before they are stored. A store written
    /// without it is sealed at the next start with it; one sealed with it does not start
    /// without it. Required with --datastore etcd://.
    #[arg(long, value_name = "FILE")]
    kek_file: Option<PathBuf>,
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd.command {
        Sub::Run(args) => run_server(*args),
        Sub::Healthcheck { socket, output } => block_on(healthcheck(socket, output)),
        Sub::Check {
            data_dir,
            trust_domain,
        } => {
            let store = meshauth_server::open_store(&data_dir, &trust_domain, false)?;
            let counts = store.check()?;
            out!(
                "{}: the datastore of trust domain {trust_domain} is readable, with its CA",
                data_dir.join(meshauth_server::DATASTORE_FILE).display()
            );
            for (table, n) in counts {
                out!("  {table:<12} {n} rows");
            }
            Ok(())
        }
    }
}

fn run_server(args: RunArgs) -> anyhow::Result<()> {
    if args.svid_ttl >= args.ca_ttl {
        anyhow::bail!(
            "--svid-ttl ({}) must be shorter than --ca-ttl ({})",
            humantime::format_duration(args.svid_ttl),
            humantime::format_duration(args.ca_ttl)
        );
    }
    let x509pop = match &args.x509pop_ca {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "cannot read the x509pop CA file {} (--x509pop-ca)",
                    path.display()
                )
            })?;
            Some(
                meshauth_tls::x509pop::OperatorRoots::from_pem(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "{} (--x509pop-ca) is not a PEM file of CA certificates: {e}",
                        path.display()
                    )
                })?,
            )
        }
    };
    let config = ServerConfig {
        trust_domain: args.trust_domain,
        data_dir: args.data_dir,
        listen: args.listen,
        admin_socket: args.socket.admin_socket,
        metrics_listen: args.metrics_listen,
        ca_ttl: args.ca_ttl,
        svid_ttl: args.svid_ttl,
        join_token_ttl: args.join_token_ttl,
        pod_cidr: args.pod_cidr,
        x509pop,
        kek_file: args.kek_file,
        datastore: args.datastore,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meshauth-server")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = meshauth_server::Server::bind(config).await?;
        server.serve(shutdown_signal()).await
    })
}

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn healthcheck(socket: AdminSocket, output: Output) -> anyhow::Result<()> {
    let mut client = socket.connect().await?;
    let h = client
        .health(HealthRequest {})
        .await
        .map_err(rpc)
        .context("health request failed")?
        .into_inner();
    match output {
        Output::Json => {
            let authorities: Vec<_> = h
                .authorities
                .iter()
                .map(|a| serde_json::json!({"state": a.state, "serial": a.serial, "not_after": time(a.not_after_unix)}))
                .collect();
            out!(
                "{}",
                serde_json::json!({
                    "healthy": true,
                    "trust_domain": h.trust_domain,
                    "bundle_sequence": h.bundle_sequence,
                    "authorities": authorities,
                    "agents": h.agents,
                    "entries": h.entries,
                    "datastore": h.datastore,
                    "leader": h.leader,
                })
            );
        }
        Output::Text => {
            out!("server is healthy");
            out!("trust domain:    {}", h.trust_domain);
            out!("bundle sequence: {}", h.bundle_sequence);
            out!("agents: {}  entries: {}", h.agents, h.entries);
            out!(
                "datastore: {}  {}",
                h.datastore,
                if h.leader {
                    "leader (rotates the CA)"
                } else {
                    "follower (the leader rotates the CA)"
                }
            );
            for a in &h.authorities {
                out!(
                    "CA {:<8} serial {}  expires {} (in {}s)",
                    a.state,
                    a.serial,
                    time(a.not_after_unix),
                    seconds_left(a.not_after_unix)
                );
            }
        }
    }
    Ok(())
}
