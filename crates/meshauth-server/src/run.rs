//! Wiring: open the store, load the CA, bind the listeners, run until shutdown.
//!
//! [`Server::bind`] does everything that can fail at startup (so the CLI reports it before going
//! into the background) and returns the bound addresses; [`Server::serve`] runs the tasks.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use meshauth_proto::admin::admin_server::AdminServer;
use meshauth_proto::node::node_server::NodeServer;
use meshauth_spiffe::{SpiffeId, TrustDomain};
use meshauth_tls::{ClientAuth, PeerPolicy, SharedBundle, SharedCertifiedKey};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use crate::admin_api::AdminApi;
use crate::metrics::Metrics;
use crate::node_api::NodeApi;
use crate::registry::{Registry, RegistryConfig};
use crate::tls_incoming::accept_tls;

/// The server's defaults, in one place (also shown by `--help`).
pub mod defaults {
    use std::time::Duration;

    /// Trust domain.
    pub const TRUST_DOMAIN: &str = "meshauth.local";
    /// Node API listen address.
    pub const LISTEN: &str = "0.0.0.0:8081";
    /// Admin socket.
    pub const ADMIN_SOCKET: &str = "/run/meshauth/server-admin.sock";
    /// Metrics and health listen address.
    pub const METRICS_LISTEN: &str = "127.0.0.1:9090";
    /// Data directory.
    pub const DATA_DIR: &str = "/var/lib/meshauth/server";
    /// CA lifetime.
    pub const CA_TTL: Duration = Duration::from_secs(24 * 3600);
    /// X.509-SVID lifetime.
    pub const SVID_TTL: Duration = Duration::from_secs(3600);
    /// Join token lifetime.
    pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);
}

/// How often CA rotation and the server's own SVID are checked.
const TICK: Duration = Duration::from_secs(1);
/// ALPN of gRPC over TLS.
const ALPN_H2: &[u8] = b"h2";

/// Everything `meshauth server run` configures.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The trust domain served.
    pub trust_domain: TrustDomain,
    /// Where the SQLite file lives (created 0700).
    pub data_dir: PathBuf,
    /// Node API (gRPC over mutual TLS).
    pub listen: SocketAddr,
    /// Admin socket path (created 0600).
    pub admin_socket: PathBuf,
    /// Metrics and health (`/metrics`, `/healthz`, `/readyz`).
    pub metrics_listen: SocketAddr,
    /// CA lifetime.
    pub ca_ttl: Duration,
    /// Default X.509-SVID lifetime.
    pub svid_ttl: Duration,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
}

/// A server whose store is open and whose listeners are bound.
#[derive(Debug)]
pub struct Server {
    registry: Arc<Registry>,
    node_listener: TcpListener,
    admin_listener: UnixListener,
    metrics_listener: TcpListener,
    bundle: SharedBundle,
    own: SharedCertifiedKey,
    own_id: SpiffeId,
    own_expiry: (SystemTime, SystemTime),
}

/// The SPIFFE ID the server presents to agents: `spiffe://<td>/meshauth/server`.
pub fn server_spiffe_id(td: &TrustDomain) -> anyhow::Result<SpiffeId> {
    format!("spiffe://{td}/meshauth/server")
        .parse()
        .context("building the server's SPIFFE ID")
}

impl Server {
    /// Opens the store, loads or creates the CA, issues the server's own SVID and binds.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Server> {
        create_private_dir(&config.data_dir)?;
        let store = meshauth_datastore::Store::open(&config.data_dir.join("meshauth.db"))?;
        let now = SystemTime::now();
        let registry = Arc::new(Registry::open(
            RegistryConfig {
                trust_domain: config.trust_domain.clone(),
                ca_ttl: config.ca_ttl,
                svid_ttl: config.svid_ttl,
                join_token_ttl: config.join_token_ttl,
            },
            store,
            Metrics::new(),
            now,
        )?);
        let own_id = server_spiffe_id(&config.trust_domain)?;
        let (chain, key, not_after) = issue_own_svid(&registry, &own_id, now)?;
        let own = SharedCertifiedKey::new(chain, key)?;
        let bundle = SharedBundle::new(registry.bundle(now));

        let node_listener = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "cannot listen on {} (is another server running? use --listen)",
                config.listen
            )
        })?;
        let metrics_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (use --metrics-listen)",
                    config.metrics_listen
                )
            })?;
        let admin_listener =
            meshauth_telemetry::bind_unix_socket(&config.admin_socket, 0o600, "--admin-socket")
                .await?;
        tracing::info!(
            trust_domain = %config.trust_domain,
            listen = %node_listener.local_addr()?,
            admin_socket = %config.admin_socket.display(),
            metrics = %metrics_listener.local_addr()?,
            data_dir = %config.data_dir.display(),
            ca_ttl_s = config.ca_ttl.as_secs(),
            svid_ttl_s = config.svid_ttl.as_secs(),
            "server ready"
        );
        Ok(Server {
            registry,
            node_listener,
            admin_listener,
            metrics_listener,
            bundle,
            own,
            own_id,
            own_expiry: (now, not_after),
        })
    }

    /// The bound node API address.
    pub fn node_addr(&self) -> std::io::Result<SocketAddr> {
        self.node_listener.local_addr()
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// The registry (for in-process tests).
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            registry,
            node_listener,
            admin_listener,
            metrics_listener,
            bundle,
            own,
            own_id,
            mut own_expiry,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let tls = meshauth_tls::server_config(
            own.clone(),
            bundle.clone(),
            PeerPolicy::AnyInTrustDomain,
            ClientAuth::Optional,
            &[ALPN_H2],
        )?;
        let incoming = ReceiverStream::new(accept_tls(node_listener, Arc::new(tls)));
        let node = tonic::transport::Server::builder()
            .add_service(NodeServer::new(NodeApi::new(
                Arc::clone(&registry),
                stop_rx.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
        let admin = tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminApi::new(Arc::clone(&registry))))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(admin_listener),
                stopped(stop_rx.clone()),
            );
        let encoder: meshauth_telemetry::Encoder = {
            let m = registry.metrics().clone();
            Arc::new(move || m.encode())
        };
        // Bound only after the store, CA and listeners are up: ready from the start.
        let ready = meshauth_telemetry::Readiness::new();
        let metrics = meshauth_telemetry::serve_http(
            metrics_listener,
            encoder,
            ready,
            stopped(stop_rx.clone()),
        );

        let ticker = {
            let registry = Arc::clone(&registry);
            let mut stop = stop_rx.clone();
            async move {
                let mut interval = tokio::time::interval(TICK);
                loop {
                    tokio::select! {
                        _ = interval.tick() => {}
                        _ = stop.wait_for(|s| *s) => return Ok::<(), anyhow::Error>(()),
                    }
                    let now = SystemTime::now();
                    if registry.tick(now)? {
                        bundle.set(registry.bundle(now));
                    }
                    let (issued, not_after) = own_expiry;
                    let half = issued + not_after.duration_since(issued).unwrap_or_default() / 2;
                    if now >= half {
                        match issue_own_svid(&registry, &own_id, now) {
                            Ok((chain, key, new_not_after)) => {
                                own.set(chain, key)?;
                                own_expiry = (now, new_not_after);
                                tracing::info!("server SVID renewed");
                            }
                            Err(e) => tracing::error!(error = %e, "cannot renew the server SVID"),
                        }
                    }
                }
            }
        };

        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        };
        let (node, admin, metrics, ticker, ()) = tokio::join!(node, admin, metrics, ticker, stop);
        node.context("node API")?;
        admin.context("admin API")?;
        metrics.context("metrics")?;
        ticker.context("CA rotation")?;
        Ok(())
    }
}

fn issue_own_svid(
    registry: &Registry,
    id: &SpiffeId,
    now: SystemTime,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    SystemTime,
)> {
    // The server's own key, generated here where it is used.
    let key = rcgen::KeyPair::generate().context("generating the server key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)
        .context("building the server CSR")?;
    let svid = registry.issue_own_svid(id, csr.der(), now)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((svid.chain, key, svid.not_after))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {} (use --data-dir)", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
    Ok(())
}
