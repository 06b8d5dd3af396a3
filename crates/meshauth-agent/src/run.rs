//! Wiring of the agent: bootstrap the identity, bind the sockets, run the manager and servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meshauth_proto::agent::agent_admin_server::AgentAdminServer;
use meshauth_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use meshauth_spiffe::TrustDomain;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::admin::AdminApi;
use crate::identity::DataDir;
use crate::manager::{Manager, ManagerConfig, bootstrap};
use crate::metrics::Metrics;
use crate::workload_api::WorkloadApi;

/// The agent's defaults, in one place (also shown by `--help`).
pub mod defaults {
    /// The server.
    pub const SERVER: &str = "127.0.0.1:8081";
    /// Trust domain.
    pub const TRUST_DOMAIN: &str = "meshauth.local";
    /// Data directory.
    pub const DATA_DIR: &str = "/var/lib/meshauth/agent";
    /// Workload API socket.
    pub const WORKLOAD_SOCKET: &str = "/run/meshauth/workload.sock";
    /// Admin socket.
    pub const ADMIN_SOCKET: &str = "/run/meshauth/agent-admin.sock";
    /// Metrics and health.
    pub const METRICS_LISTEN: &str = "127.0.0.1:9091";
}

/// Everything `meshauth agent run` configures.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// The server, `host:port`.
    pub server: String,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Single-use token for the first attestation.
    pub join_token: Option<String>,
    /// PEM bundle to trust the server with on first contact.
    pub trust_bundle: PathBuf,
    /// Node key, SVID and latest bundle.
    pub data_dir: PathBuf,
    /// SPIFFE Workload API socket (mode 0777: any local process may ask; attestation decides).
    pub workload_socket: PathBuf,
    /// Admin socket (mode 0600).
    pub admin_socket: PathBuf,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Enforce network policy on this node's pods (datapath, auth manager, handshakes).
    pub enforce: Option<EnforceSettings>,
}

/// How the agent finds its pods and where it answers handshakes.
#[derive(Debug, Clone)]
pub struct EnforceSettings {
    /// The lab whose pods on this node are the endpoints.
    pub lab: String,
    /// The handshake address; default: the address this node reaches the server from.
    pub node_address: Option<std::net::IpAddr>,
    /// Auth manager sizes (queue, workers, re-authentication margin, retry backoff).
    pub auth: meshauth_auth::ManagerConfig,
}

/// An agent with its identity loaded and its sockets bound.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    manager: Manager,
    metrics: Metrics,
    workload: UnixListener,
    admin: UnixListener,
    metrics_listener: TcpListener,
}

impl Agent {
    /// Loads or obtains the node identity and binds every socket.
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Agent> {
        let data = DataDir::open(&config.data_dir)?;
        let mconfig = ManagerConfig {
            node_name: config.node_name.clone(),
            server: config.server.clone(),
            trust_domain: config.trust_domain.clone(),
        };
        let (node, bundle) = bootstrap(
            &mconfig,
            &data,
            &config.trust_bundle,
            config.join_token.as_deref(),
        )
        .await?;
        let metrics = Metrics::new();
        let manager = Manager::new(mconfig, data, node, bundle, metrics.clone())?;
        let workload = meshauth_telemetry::bind_unix_socket(
            &config.workload_socket,
            0o777,
            "--workload-socket",
        )
        .await?;
        let admin =
            meshauth_telemetry::bind_unix_socket(&config.admin_socket, 0o600, "--agent-socket")
                .await?;
        let metrics_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (use --metrics-listen)",
                    config.metrics_listen
                )
            })?;
        tracing::info!(
            node = %config.node_name,
            server = %config.server,
            workload_socket = %config.workload_socket.display(),
            admin_socket = %config.admin_socket.display(),
            metrics = %metrics_listener.local_addr()?,
            "agent ready"
        );
        Ok(Agent {
            config,
            manager,
            metrics,
            workload,
            admin,
            metrics_listener,
        })
    }

    /// Runs until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Agent {
            config,
            manager,
            metrics,
            workload,
            admin,
            metrics_listener,
        } = self;
        let auth_entries = crate::enforce::AuthEntries::default();
        let flow_log = crate::flows::FlowLog::default();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let workload_api = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(WorkloadApi::new(
                manager.subscribe(),
                metrics.clone(),
            )))
            .serve_with_incoming_shutdown(
                crate::authority_fix::accept_relayed(workload),
                stopped(stop_rx.clone()),
            );
        let admin_api = tonic::transport::Server::builder()
            .add_service(AgentAdminServer::new(AdminApi::new(
                manager.clone(),
                config.node_name.clone(),
                auth_entries.clone(),
                flow_log.clone(),
            )))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(stop_rx.clone()));
        // Ready once the first sync with the server completed.
        let ready = meshauth_telemetry::Readiness::new();
        let sync_ready = ready.register("sync");
        sync_ready.set_not_ready("waiting for the first sync with the server");
        let mut snapshots = manager.subscribe();
        let readiness = async move {
            let _ = snapshots.wait_for(|s| s.synced).await;
            sync_ready.set_ready();
        };
        let encoder: meshauth_telemetry::Encoder = {
            let (m, mgr) = (metrics.clone(), manager.clone());
            Arc::new(move || m.encode(mgr.soonest_expiry()))
        };
        let http = meshauth_telemetry::serve_http(
            metrics_listener,
            encoder,
            ready.clone(),
            stopped(stop_rx.clone()),
        );
        let run = manager.clone().run(stop_rx.clone());
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        };
        let mut stop_readiness = stop_rx.clone();
        let readiness = async move {
            tokio::select! {
                () = readiness => {}
                _ = stop_readiness.wait_for(|s| *s) => {}
            }
        };
        let enforce = {
            let published = auth_entries.clone();
            let flows = flow_log.clone();
            let metrics = metrics.clone();
            let stop = stop_rx.clone();
            let manager = manager.clone();
            let settings = config.enforce.clone();
            let server = config.server.clone();
            let node = config.node_name.clone();
            async move {
                let Some(settings) = settings else {
                    return Ok(());
                };
                let node_address = match settings.node_address {
                    Some(a) => a,
                    None => local_address_towards(&server).await?,
                };
                let cfg = crate::enforce::EnforceConfig {
                    node_name: node.clone(),
                    pin_dir: meshauth_datapath::Datapath::pin_dir_for(&format!(
                        "{}-{node}",
                        settings.lab
                    )),
                    node_address,
                    handshake_port: meshauth_auth::handshake::HANDSHAKE_PORT,
                    manager: settings.auth,
                    published,
                    flows,
                    metrics,
                };
                let source = Box::new(crate::enforce::LabEndpoints::new(&settings.lab, &node)?);
                crate::enforce::run(cfg, manager, source, stop).await
            }
        };
        let (w, a, h, (), (), (), e) =
            tokio::join!(workload_api, admin_api, http, run, stop, readiness, enforce);
        e.context("enforcement")?;
        w.context("workload API")?;
        a.context("admin API")?;
        h.context("metrics")?;
        for path in [&config.workload_socket, &config.admin_socket] {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

/// The local address this host uses to reach `server` (`host:port`).
async fn local_address_towards(server: &str) -> anyhow::Result<std::net::IpAddr> {
    let target = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .with_context(|| format!("{server} resolves to nothing"))?;
    let probe = std::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}
