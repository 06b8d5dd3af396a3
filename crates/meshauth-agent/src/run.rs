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
use crate::manager::{Manager, ManagerConfig, ServerList, bootstrap};
use crate::metrics::Metrics;
use crate::workload_api::WorkloadApi;

/// The agent's defaults, in one place (also shown by `--help`).
pub mod defaults {
    /// The server (`--server` takes a comma-separated list of replicas).
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

/// Everything `meshauth agent run` configures. Its `Debug` shows whether a join token is set,
/// never the token.
#[derive(Clone)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// The servers (replicas of one registry), in the order of preference.
    pub servers: ServerList,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// What the node attests with: a join token (a secret: redacted in `Debug`) or an
    /// x509pop credential.
    pub attestor: crate::node_attestation::NodeAttestor,
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

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be left out (or leak) unnoticed.
        let AgentConfig {
            node_name,
            servers,
            trust_domain,
            attestor,
            trust_bundle,
            data_dir,
            workload_socket,
            admin_socket,
            metrics_listen,
            enforce,
        } = self;
        f.debug_struct("AgentConfig")
            .field("node_name", node_name)
            .field("servers", &servers.to_string())
            .field("trust_domain", trust_domain)
            .field("attestor", attestor)
            .field("trust_bundle", trust_bundle)
            .field("data_dir", data_dir)
            .field("workload_socket", workload_socket)
            .field("admin_socket", admin_socket)
            .field("metrics_listen", metrics_listen)
            .field("enforce", enforce)
            .finish()
    }
}

#[cfg(test)]
mod config_debug_tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    #[test]
    fn debug_never_shows_the_join_token() {
        let config = super::AgentConfig {
            node_name: "n1".into(),
            servers: "127.0.0.1:8081".parse().unwrap(),
            trust_domain: "test.local".parse().unwrap(),
            attestor: crate::node_attestation::NodeAttestor {
                join_token: Some("s3cr3t-t0ken".into()),
                ..Default::default()
            },
            trust_bundle: "/b.pem".into(),
            data_dir: "/d".into(),
            workload_socket: "/w.sock".into(),
            admin_socket: "/a.sock".into(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            enforce: None,
        };
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(shown.contains("\"n1\""), "{shown}");
        }
        assert!(format!("{config:?}").contains("join_token: Some(\"<redacted>\")"));
    }
}

/// Makes the endpoint source (again, when enforcement restarts after a failure).
pub type SourceFactory = Arc<dyn Fn() -> Box<dyn crate::endpoints::EndpointSource> + Send + Sync>;

/// How the agent finds its pods and where it answers handshakes.
#[derive(Clone)]
pub struct EnforceSettings {
    /// Where this node's endpoints come from.
    pub source: SourceFactory,
    /// Where the datapath pins its maps and links.
    pub pin_dir: PathBuf,
    /// The handshake address; default: the address this node reaches the server from.
    pub node_address: Option<std::net::IpAddr>,
    /// Auth manager sizes (queue, workers, re-authentication margin, retry backoff).
    pub auth: meshauth_auth::ManagerConfig,
    /// Hold packets of pairs being authenticated instead of dropping them (`None`: drop).
    pub hold: Option<crate::hold::HoldLimits>,
    /// Authenticate required pairs ahead of their first packet, at most this many per change.
    pub pre_authenticate: Option<usize>,
    /// The endpoints the CNI plugin hands over on the admin socket, when they are the source.
    pub cni: Option<crate::cni::CniEndpoints>,
    /// Encrypt pod traffic between nodes (WireGuard keyed by the node-pair key exchange).
    pub encrypt: Option<crate::tunnel::TunnelSettings>,
}

impl std::fmt::Debug for EnforceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnforceSettings")
            .field("pin_dir", &self.pin_dir)
            .field("node_address", &self.node_address)
            .field("auth", &self.auth)
            .field("hold", &self.hold)
            .field("encrypt", &self.encrypt)
            .finish_non_exhaustive()
    }
}

/// An agent with its identity loaded and its sockets bound.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    manager: Manager,
    tunnel_key: Option<meshauth_tunnel::PrivateKey>,
    metrics: Metrics,
    workload: UnixListener,
    admin: UnixListener,
    metrics_listener: TcpListener,
}

impl Agent {
    /// Loads or obtains the node identity and binds every socket.
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Agent> {
        let data = DataDir::open(&config.data_dir)?;
        let encrypt = config.enforce.as_ref().is_some_and(|e| e.encrypt.is_some());
        let tunnel_key = if encrypt {
            Some(meshauth_tunnel::PrivateKey::load_or_create(
                &config.data_dir.join(crate::tunnel::KEY_FILE),
            )?)
        } else {
            None
        };
        let mconfig = ManagerConfig {
            node_name: config.node_name.clone(),
            servers: config.servers.clone(),
            trust_domain: config.trust_domain.clone(),
            tunnel_key: tunnel_key.as_ref().map(|k| k.public().into()),
        };
        let (node, bundle, first_server) =
            bootstrap(&mconfig, &data, &config.trust_bundle, &config.attestor).await?;
        let metrics = Metrics::new();
        let manager = Manager::new(
            mconfig,
            data,
            node,
            bundle,
            metrics.clone(),
            config.attestor.clone(),
        )?
        .with_current_server(first_server);
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
            servers = %config.servers,
            server = %manager.current_server(),
            workload_socket = %config.workload_socket.display(),
            admin_socket = %config.admin_socket.display(),
            metrics = %metrics_listener.local_addr()?,
            "agent ready"
        );
        Ok(Agent {
            config,
            manager,
            tunnel_key,
            metrics,
            workload,
            admin,
            metrics_listener,
        })
    }

    /// Runs until `shutdown` completes. Every long-running part is a supervised task: the
    /// Workload API, admin API, metrics listener and sync stop the agent if they fail;
    /// enforcement restarts with backoff, and the agent is not ready meanwhile.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use meshauth_telemetry::{Readiness, Restart, Supervisor};
        let Agent {
            config,
            manager,
            tunnel_key,
            metrics,
            workload,
            admin,
            metrics_listener,
        } = self;
        let auth_entries = crate::enforce::AuthEntries::default();
        let tunnel_status = crate::tunnel::TunnelStatus::default();
        let (enforced_tx, enforced_rx) =
            tokio::sync::watch::channel(crate::cni::Enforced::default());
        let flow_log = crate::flows::FlowLog::default();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Encryption on: the tunnel interface exists before anything else runs and outlives
        // the agent, so that what is routed into it is never sent in the clear.
        let encrypt = config.enforce.as_ref().and_then(|s| s.encrypt.clone());
        let tunnel = match (&encrypt, tunnel_key) {
            (Some(t), Some(key)) => Some(crate::tunnel::start(
                t,
                key,
                metrics.tunnel().clone(),
                stop_rx.clone(),
            )?),
            _ => None,
        };
        let tunnel_ifindex = tunnel.as_ref().map(|(_, index)| *index);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let readiness = Readiness::new();
        let sync_ready = readiness.register("sync");
        sync_ready.set_not_ready("waiting for the first sync with the server");
        let mut sup = Supervisor::new();
        // The parts below stop on the watch channel; it follows the supervisor's token.
        {
            let token = sup.token();
            tokio::spawn(async move {
                token.cancelled().await;
                let _ = stop_tx.send(true);
            });
        }

        let workload_api = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(WorkloadApi::new(
                manager.subscribe(),
                metrics.clone(),
            )))
            .serve_with_incoming_shutdown(
                crate::authority_fix::accept_relayed(workload, metrics.clone(), sup.token()),
                stopped(stop_rx.clone()),
            );
        let workload_api = meshauth_telemetry::with_connection_grace(
            "workload API",
            workload_api,
            stopped(stop_rx.clone()),
        );
        sup.spawn_once("workload-api", |_| workload_api);
        let admin_api = tonic::transport::Server::builder()
            .add_service(AgentAdminServer::new(
                AdminApi::new(
                    manager.clone(),
                    config.node_name.clone(),
                    auth_entries.clone(),
                    flow_log.clone(),
                    readiness.clone(),
                )
                .with_cni(
                    config.enforce.as_ref().and_then(|s| s.cni.clone()),
                    enforced_rx,
                    metrics.clone(),
                )
                .with_tunnel(tunnel_status.clone()),
            ))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(stop_rx.clone()));
        let admin_api = meshauth_telemetry::with_connection_grace(
            "admin API",
            admin_api,
            stopped(stop_rx.clone()),
        );
        sup.spawn_once("admin-api", |_| admin_api);
        let encoder: meshauth_telemetry::Encoder = {
            let (m, mgr) = (metrics.clone(), manager.clone());
            Arc::new(move || m.encode(mgr.soonest_expiry()))
        };
        let http = meshauth_telemetry::serve_http(
            metrics_listener,
            encoder,
            readiness.clone(),
            stopped(stop_rx.clone()),
        );
        sup.spawn_once("metrics", |_| http);
        // Before the first sync (see `enforce::Preloaded`).
        let preloaded = config
            .enforce
            .as_ref()
            .map(|s| crate::enforce::Preloaded::load(&s.pin_dir))
            .unwrap_or_default();
        {
            let run = manager.clone().run(stop_rx.clone());
            sup.spawn_once("sync", |_| async move {
                run.await;
                Ok::<(), std::io::Error>(())
            });
        }
        // Ready for the sync condition once the first sync with the server completed.
        {
            let mut snapshots = manager.subscribe();
            sup.spawn_once("sync-readiness", move |token| async move {
                tokio::select! {
                    r = snapshots.wait_for(|s| s.synced) => {
                        if r.is_ok() {
                            sync_ready.set_ready();
                        }
                    }
                    () = token.cancelled() => {}
                }
                Ok::<(), std::io::Error>(())
            });
        }
        if let Some(settings) = config.enforce.clone() {
            let ready = readiness.register("enforcement");
            ready.set_not_ready("enforcement is starting");
            let (status_tx, mut status_rx) = tokio::sync::watch::channel::<
                crate::enforce::EnforceStatus,
            >(Err("enforcement is starting".into()));
            {
                let ready = ready.clone();
                tokio::spawn(async move {
                    loop {
                        match &*status_rx.borrow_and_update() {
                            Ok(()) => ready.set_ready(),
                            Err(reason) => ready.set_not_ready(reason.clone()),
                        }
                        if status_rx.changed().await.is_err() {
                            return;
                        }
                    }
                });
            }
            let node = config.node_name.clone();
            let (manager, metrics) = (manager.clone(), metrics.clone());
            let (published, flows, stop) =
                (auth_entries.clone(), flow_log.clone(), stop_rx.clone());
            sup.spawn_with_readiness(
                "enforcement",
                Restart::Backoff {
                    min: std::time::Duration::from_secs(1),
                    max: std::time::Duration::from_secs(30),
                },
                ready,
                move |_| {
                    let settings = settings.clone();
                    let node = node.clone();
                    let (manager, metrics) = (manager.clone(), metrics.clone());
                    let (published, flows, stop) = (published.clone(), flows.clone(), stop.clone());
                    let status = status_tx.clone();
                    let preloaded = preloaded.clone();
                    let enforced = enforced_tx.clone();
                    async move {
                        let node_address = match settings.node_address {
                            Some(a) => a,
                            None => local_address_towards_servers(&manager).await?,
                        };
                        let cfg = crate::enforce::EnforceConfig {
                            node_name: node,
                            pin_dir: settings.pin_dir.clone(),
                            node_address,
                            handshake_port: meshauth_auth::handshake::HANDSHAKE_PORT,
                            manager: settings.auth,
                            published,
                            flows,
                            metrics,
                            status,
                            hold: settings.hold,
                            pre_authenticate: settings.pre_authenticate,
                            preloaded: preloaded.clone(),
                            enforced: enforced.clone(),
                            tunnel: tunnel_ifindex,
                        };
                        crate::enforce::run(cfg, manager, (settings.source)(), stop).await
                    }
                },
            );
        }
        if let (Some(settings), Some((device, _))) = (encrypt, tunnel) {
            let ready = readiness.register("tunnel");
            ready.set_not_ready("the tunnel is starting");
            let node = config.node_name.clone();
            let node_address = config.enforce.as_ref().and_then(|s| s.node_address);
            let (manager, metrics, status, stop) = (
                manager.clone(),
                metrics.clone(),
                tunnel_status.clone(),
                stop_rx.clone(),
            );
            sup.spawn_with_readiness(
                "tunnel",
                Restart::Backoff {
                    min: std::time::Duration::from_secs(1),
                    max: std::time::Duration::from_secs(30),
                },
                ready.clone(),
                move |_| {
                    let (settings, node) = (settings.clone(), node.clone());
                    let device = Arc::clone(&device);
                    let (manager, metrics, status, stop, ready) = (
                        manager.clone(),
                        metrics.clone(),
                        status.clone(),
                        stop.clone(),
                        ready.clone(),
                    );
                    async move {
                        let node_address = match node_address {
                            Some(a) => a,
                            None => local_address_towards_servers(&manager).await?,
                        };
                        crate::tunnel::run(
                            crate::tunnel::TunnelConfig {
                                settings,
                                node_name: node,
                                node_address,
                                device,
                                metrics,
                                status,
                                ready,
                            },
                            manager,
                            stop,
                        )
                        .await
                    }
                },
            );
        }
        let result = sup
            .run_until(async move {
                shutdown.await;
                tracing::info!("shutting down");
            })
            .await;
        for path in [&config.workload_socket, &config.admin_socket] {
            let _ = std::fs::remove_file(path);
        }
        result.map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The local address this host uses to reach the servers: towards the current one, else the
/// next of the list that resolves and has a route (a UDP socket's connect: nothing is sent).
async fn local_address_towards_servers(manager: &Manager) -> anyhow::Result<std::net::IpAddr> {
    let servers = manager.servers();
    let mut errors = Vec::new();
    for (_, server) in servers.starting_at(manager.current_index()) {
        match local_address_towards(&server.to_string()).await {
            Ok(a) => return Ok(a),
            Err(e) if servers.as_slice().len() == 1 => return Err(e),
            Err(e) => errors.push(format!("{server}: {e:#}")),
        }
    }
    anyhow::bail!(
        "no local address towards any server ({}): pass --node-address",
        errors.join("; ")
    )
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
