//! Wiring: open the store, load the CA, bind the listeners, run until shutdown.
//!
//! [`Server::bind`] does everything that can fail at startup (so the CLI reports it before going
//! into the background) and returns the bound addresses; [`Server::serve`] runs the tasks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use meshauth_proto::admin::admin_server::AdminServer;
use meshauth_proto::node::node_server::NodeServer;
use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use meshauth_telemetry::{CancellationToken, Readiness, ReadyHandle, Restart, Supervisor};
use meshauth_tls::{ClientAuth, PeerPolicy, SharedBundle, SharedCertifiedKey};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use crate::admin_api::AdminApi;
use crate::datastore_url::DatastoreUrl;
use crate::metrics::{Metrics, TickStep};
use crate::node_api::NodeApi;
use crate::registry::{Registry, RegistryConfig};
use crate::tls_incoming::accept_tls;
use crate::view::ViewFeed;

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
/// The longest delay before the ticker is restarted after a panic.
const TICKER_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A lasting ticker failure is logged on its first tick and then every this many ticks.
const LOG_EVERY: u64 = 60;
/// ALPN of gRPC over TLS.
const ALPN_H2: &[u8] = b"h2";

/// Everything `meshauth server run` configures.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The trust domain served.
    pub trust_domain: TrustDomain,
    /// Where the SQLite file lives: created with mode 0700, or an existing directory of this user
    /// that no one else may write in (never chmodded); locked by one server at a time.
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
    /// Where nodes' pod ranges are allocated from (a /24 each) when none is bound to them.
    pub pod_cidr: meshauth_datastore::Ipv4Range,
    /// The operator CAs whose node certificates attest by x509pop (`None`: join tokens only).
    pub x509pop: Option<meshauth_tls::x509pop::OperatorRoots>,
    /// The file of the key-encryption key that seals the CA journal in the store (required
    /// with etcd; optional with SQLite).
    pub kek_file: Option<PathBuf>,
    /// Where the registry is kept: the SQLite file in `data_dir`, or etcd shared by replicas.
    pub datastore: DatastoreUrl,
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
    /// Held while the server runs, so that a second server on the same data dir refuses to start.
    data_lock: meshauth_telemetry::DataDirLock,
    /// With etcd: the shared store and this replica's candidacy for CA leader.
    shared: Option<Shared>,
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
        let data_lock = open_data_dir(&config.data_dir)?;
        let (store, shared) = open_datastore(&config).await?;
        let replicated = shared.is_some();
        let now = SystemTime::now();
        let registry = Arc::new(Registry::open(
            RegistryConfig {
                trust_domain: config.trust_domain.clone(),
                ca_ttl: config.ca_ttl,
                svid_ttl: config.svid_ttl,
                join_token_ttl: config.join_token_ttl,
                pod_cidr: config.pod_cidr,
                x509pop: config.x509pop.clone(),
                kek: match &config.kek_file {
                    Some(path) => Some(Arc::new(crate::kek::Kek::read(path)?)),
                    None => None,
                },
                replicated,
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
            data_lock,
            shared,
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

    /// The bundle the node API's TLS listener verifies node SVIDs with, as it changes (kept
    /// equal to the registry's by the ticker, whichever replica rotated the CA).
    pub fn trust_bundle(&self) -> SharedBundle {
        self.bundle.clone()
    }

    /// Serves until `shutdown` completes, each listener and the CA/SVID ticker as a supervised
    /// task. Fails, naming the task, if a listener fails; the ticker never stops on an error: it
    /// logs it, counts it (`meshauth_server_ticker_failures_total`), reports it on `/readyz` and
    /// retries on the next tick.
    ///
    /// `/readyz` conditions: `store` (the datastore answers), `ca` (the last CA rotation check
    /// succeeded and was persisted), `server-svid` (the serving SVID has not expired). All are
    /// ready at first: [`Server::bind`] opened the store, loaded the CA and issued the SVID.
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
            own_expiry,
            data_lock: _data_lock,
            shared,
        } = self;
        let readiness = Readiness::new();
        let ticker = Ticker::new(
            Arc::clone(&registry),
            registry.metrics().clone(),
            TickerState {
                bundle: bundle.clone(),
                own: own.clone(),
                own_id,
                own_expiry,
            },
            &readiness,
        );

        let tls = meshauth_tls::server_config(
            own,
            bundle,
            PeerPolicy::AnyInTrustDomain,
            ClientAuth::Optional,
            &[ALPN_H2],
        )?;
        let mut tasks = Supervisor::new();
        let leadership = shared.as_ref().map(|s| Arc::clone(&s.leadership));
        if let Some(shared) = shared {
            spawn_replica_tasks(&mut tasks, &registry, shared);
        }
        // The cluster view sync streams serve, rebuilt once per change.
        let views = ViewFeed::new();
        tasks.spawn(
            "view-builder",
            Restart::Backoff {
                min: TICK,
                max: TICKER_MAX_BACKOFF,
            },
            {
                let (registry, views) = (Arc::clone(&registry), views.clone());
                move |token| {
                    let (registry, views) = (Arc::clone(&registry), views.clone());
                    async move { views.run(registry, token).await }
                }
            },
        );
        tasks.spawn_once("node-api", {
            let registry = Arc::clone(&registry);
            move |token| async move {
                // Sync streams end when this turns true, so that a graceful shutdown does not
                // wait for agents to hang up.
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let incoming = ReceiverStream::new(accept_tls(
                    node_listener,
                    Arc::new(tls),
                    registry.metrics().clone(),
                ));
                let stopping = token.clone();
                let serve = tonic::transport::Server::builder()
                    .add_service(NodeServer::new(NodeApi::new(registry, views, stop_rx)))
                    .serve_with_incoming_shutdown(incoming, async move {
                        token.cancelled().await;
                        let _ = stop_tx.send(true);
                    });
                meshauth_telemetry::with_connection_grace(
                    "node API",
                    serve,
                    stopping.cancelled_owned(),
                )
                .await
            }
        });
        tasks.spawn_once("admin-api", {
            let registry = Arc::clone(&registry);
            move |token| {
                let serve = tonic::transport::Server::builder()
                    .add_service(AdminServer::new(AdminApi::new(registry)))
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(admin_listener),
                        token.clone().cancelled_owned(),
                    );
                meshauth_telemetry::with_connection_grace(
                    "admin API",
                    serve,
                    token.cancelled_owned(),
                )
            }
        });
        let encoder: meshauth_telemetry::Encoder = {
            let m = registry.metrics().clone();
            Arc::new(move || m.encode())
        };
        tasks.spawn_once("metrics", move |token| {
            meshauth_telemetry::serve_http(
                metrics_listener,
                encoder,
                readiness,
                token.cancelled_owned(),
            )
        });
        // The ticker handles its own errors; a restart only follows a panic. Its state (when the
        // server SVID was issued) survives restarts.
        let ticker = Arc::new(Mutex::new(ticker));
        tasks.spawn(
            "ca-ticker",
            Restart::Backoff {
                min: TICK,
                max: TICKER_MAX_BACKOFF,
            },
            move |token| run_ticker(Arc::clone(&ticker), TICK, token),
        );
        let served = tasks.run_until(shutdown).await;
        // Another replica takes over CA rotation now rather than when the lease runs out.
        let candidacy = leadership.and_then(|l| l.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(l) = candidacy {
            match tokio::task::spawn_blocking(move || l.resign()).await {
                Ok(Ok(())) => tracing::info!("resigned as CA leader"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot resign as CA leader; the lease expires by itself")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot resign as CA leader; the lease expires by itself")
                }
            }
        }
        served?;
        Ok(())
    }
}

/// The tasks of a replica on etcd: the CA leader role follows the election, and what other
/// replicas write reaches this one's registry (a new CA journal) and its sync streams, as the
/// parts it touched ([`meshauth_datastore::EtcdStore::take_changes`]), so that the cluster view
/// reads just those again, as for this replica's own changes.
fn spawn_replica_tasks(tasks: &mut Supervisor, registry: &Arc<Registry>, shared: Shared) {
    let backoff = Restart::Backoff {
        min: TICK,
        max: TICKER_MAX_BACKOFF,
    };
    tasks.spawn("ca-leader-election", backoff, {
        let (registry, is_leader) = (Arc::clone(registry), shared.is_leader.clone());
        move |token| {
            let (registry, mut is_leader) = (Arc::clone(&registry), is_leader.clone());
            async move {
                loop {
                    let leader = *is_leader.borrow_and_update();
                    registry.set_leader(leader);
                    tokio::select! {
                        changed = is_leader.changed() => changed?,
                        () = token.cancelled() => {
                            registry.set_leader(false);
                            return Ok::<(), anyhow::Error>(());
                        }
                    }
                }
            }
        }
    });
    tasks.spawn("store-watch", backoff, {
        let (registry, store) = (Arc::clone(registry), Arc::clone(&shared.store));
        move |token| {
            let (registry, store) = (Arc::clone(&registry), Arc::clone(&store));
            let mut changes = store.watch();
            // What was recorded before this (re)start is taken at once.
            changes.mark_changed();
            async move {
                loop {
                    tokio::select! {
                        changed = changes.changed() => changed?,
                        () = token.cancelled() => return Ok::<(), anyhow::Error>(()),
                    }
                    changes.borrow_and_update();
                    // Taken after the revision: the changes up to it are among these.
                    let (reg, store) = (Arc::clone(&registry), Arc::clone(&store));
                    let took = move || reg.store_changed(store.take_changes());
                    if let Err(e) = tokio::task::spawn_blocking(took).await? {
                        tracing::warn!(error = %format!("{e:#}"), "cannot take in another replica's change; retrying on the next one");
                    }
                }
            }
        }
    });
}

/// What the ticker needs from the registry (a seam for its tests).
trait TickerBackend: Send + Sync + 'static {
    /// Reads the datastore.
    fn probe_store(&self) -> anyhow::Result<()>;
    /// Advances CA rotation and persists it; the bundle the TLS listener should trust now
    /// (`None`: keep the one it has).
    fn rotate(&self, now: SystemTime) -> anyhow::Result<Option<X509Bundle>>;
    /// Issues a fresh SVID for the server.
    fn issue_own_svid(&self, id: &SpiffeId, now: SystemTime) -> anyhow::Result<OwnSvid>;
}

impl TickerBackend for Registry {
    fn probe_store(&self) -> anyhow::Result<()> {
        self.count_entries()?;
        Ok(())
    }

    fn rotate(&self, now: SystemTime) -> anyhow::Result<Option<X509Bundle>> {
        // Always the registry's bundle, not only when this tick rotated: on a replica, the
        // store's change feed may have loaded another replica's rotation before this tick.
        self.tick(now)?;
        Ok(Some(self.bundle(now)))
    }

    fn issue_own_svid(&self, id: &SpiffeId, now: SystemTime) -> anyhow::Result<OwnSvid> {
        issue_own_svid(self, id, now)
    }
}

/// What the ticker keeps current.
struct TickerState {
    bundle: SharedBundle,
    own: SharedCertifiedKey,
    own_id: SpiffeId,
    /// When the serving SVID was issued and when it expires.
    own_expiry: (SystemTime, SystemTime),
}

/// One ticker step's readiness condition and failure streak.
struct Step {
    kind: TickStep,
    ready: ReadyHandle,
    /// Consecutive failures.
    failing: u64,
}

impl Step {
    fn new(kind: TickStep, ready: ReadyHandle) -> Self {
        ready.set_ready();
        Step {
            kind,
            ready,
            failing: 0,
        }
    }

    fn succeeded(&mut self) {
        if self.failing > 0 {
            tracing::info!(step = ?self.kind, failures = self.failing, "ticker step recovered");
        }
        self.failing = 0;
    }

    /// Counts and logs a failure: at `error!` on the first of a streak and every
    /// [`LOG_EVERY`] after it, so that a lasting failure is neither silent nor a flood.
    fn failed(&mut self, metrics: &Metrics, what: &str, err: &anyhow::Error) {
        self.failing += 1;
        metrics.ticker_failed(self.kind);
        if self.failing == 1 || self.failing.is_multiple_of(LOG_EVERY) {
            tracing::error!(
                step = ?self.kind,
                error = %format!("{err:#}"),
                consecutive = self.failing,
                "{what}; retrying on the next tick"
            );
        }
    }
}

/// The CA/SVID ticker: datastore probe, CA rotation, server SVID renewal at half-life. Every
/// step's failure is logged, counted and reported on `/readyz`, and retried on the next tick.
struct Ticker<B: ?Sized> {
    backend: Arc<B>,
    metrics: Metrics,
    state: TickerState,
    store: Step,
    ca: Step,
    svid: Step,
}

impl<B: TickerBackend + ?Sized> Ticker<B> {
    fn new(backend: Arc<B>, metrics: Metrics, state: TickerState, readiness: &Readiness) -> Self {
        Ticker {
            backend,
            metrics,
            state,
            store: Step::new(TickStep::StoreProbe, readiness.register("store")),
            ca: Step::new(TickStep::CaRotation, readiness.register("ca")),
            svid: Step::new(TickStep::ServerSvid, readiness.register("server-svid")),
        }
    }

    /// One tick at `now`. Cannot fail: there is nothing to give up.
    fn tick(&mut self, now: SystemTime) {
        match self.backend.probe_store() {
            Ok(()) => {
                self.store.succeeded();
                self.store.ready.set_ready();
            }
            Err(e) => {
                const WHAT: &str = "cannot read the datastore";
                self.store.failed(&self.metrics, WHAT, &e);
                self.store.ready.set_not_ready(format!("{WHAT}: {e:#}"));
            }
        }

        match self.backend.rotate(now) {
            Ok(changed) => {
                self.ca.succeeded();
                self.ca.ready.set_ready();
                if let Some(bundle) = changed
                    && *self.state.bundle.get() != bundle
                {
                    tracing::info!(
                        sequence = bundle.sequence,
                        "the TLS listener trusts a new bundle"
                    );
                    self.state.bundle.set(bundle);
                }
            }
            Err(e) => {
                const WHAT: &str = "CA rotation failed";
                self.ca.failed(&self.metrics, WHAT, &e);
                self.ca.ready.set_not_ready(format!("{WHAT}: {e:#}"));
            }
        }

        let (issued, not_after) = self.state.own_expiry;
        let half = issued + not_after.duration_since(issued).unwrap_or_default() / 2;
        let mut last_error = None;
        if now >= half {
            let renewed = self
                .backend
                .issue_own_svid(&self.state.own_id, now)
                .and_then(|(chain, key, new_not_after)| {
                    self.state.own.set(chain, key)?;
                    Ok(new_not_after)
                });
            match renewed {
                Ok(new_not_after) => {
                    self.svid.succeeded();
                    self.state.own_expiry = (now, new_not_after);
                    tracing::info!(
                        not_after_unix = unix_secs(new_not_after),
                        "server SVID renewed"
                    );
                }
                Err(e) => {
                    self.svid
                        .failed(&self.metrics, "cannot renew the server SVID", &e);
                    last_error = Some(e);
                }
            }
        }
        // A failed renewal matters once the SVID it should have replaced expires.
        let (_, not_after) = self.state.own_expiry;
        if now < not_after {
            self.svid.ready.set_ready();
        } else {
            let why = last_error.map_or_else(String::new, |e| format!(": {e:#}"));
            self.svid.ready.set_not_ready(format!(
                "the server SVID expired at {} (unix) and could not be renewed{why}",
                unix_secs(not_after)
            ));
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Ticks every `period` until `token` is cancelled.
async fn run_ticker<B: TickerBackend + ?Sized>(
    ticker: Arc<Mutex<Ticker<B>>>,
    period: Duration,
    token: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    let mut interval = tokio::time::interval(period);
    // A slow tick (a busy datastore) delays the next one instead of causing a burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return Ok(()),
        }
        ticker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tick(SystemTime::now());
    }
}

/// The server's own SVID: chain, key, expiry.
type OwnSvid = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    SystemTime,
);

fn issue_own_svid(registry: &Registry, id: &SpiffeId, now: SystemTime) -> anyhow::Result<OwnSvid> {
    // The server's own key, generated here where it is used.
    let key = rcgen::KeyPair::generate().context("generating the server key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)
        .context("building the server CSR")?;
    let svid = registry.issue_own_svid(id, csr.der(), now)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((svid.chain, key, svid.not_after))
}

/// Creates the data dir (mode 0700), or checks the existing one (it must be this user's and not
/// writable by group or others; it is never chmodded, so `--data-dir /tmp` is refused, not made
/// 0700), and locks it for this process: a second server on the same directory fails here,
/// naming the directory and the pid of the first.
fn open_data_dir(dir: &Path) -> anyhow::Result<meshauth_telemetry::DataDirLock> {
    Ok(meshauth_telemetry::lock_data_dir(dir, "--data-dir")?)
}

/// How long a request to etcd may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// The lease of the CA leader: a leader that dies is replaced within about this long.
const LEADER_LEASE: Duration = Duration::from_secs(5);
/// How long a replica that finds no CA waits for the leader to create it.
const FIRST_CA_WAIT: Duration = Duration::from_secs(30);

/// The store the server runs on, and, with etcd, the shared store and this replica's
/// candidacy for CA leader.
async fn open_datastore(
    config: &ServerConfig,
) -> anyhow::Result<(Arc<dyn meshauth_datastore::Datastore>, Option<Shared>)> {
    let (endpoints, prefix) = match &config.datastore {
        DatastoreUrl::Sqlite => {
            let store = open_store(&config.data_dir, &config.trust_domain, true)?;
            return Ok((Arc::new(store), None));
        }
        DatastoreUrl::Etcd { endpoints, prefix } => (endpoints.clone(), prefix.clone()),
    };
    if config.kek_file.is_none() {
        anyhow::bail!(
            "--datastore etcd:// needs --kek-file: the replicas share the CA's private keys through etcd, which must only hold them sealed (every replica reads the same key file)"
        );
    }
    let prefix = prefix.unwrap_or_else(|| format!("/meshauth/{}", config.trust_domain));
    let store = tokio::task::spawn_blocking(move || {
        meshauth_datastore::EtcdStore::connect(&endpoints, &prefix, ETCD_TIMEOUT)
    })
    .await??;
    let store = Arc::new(store);
    let candidate = format!(
        "{}/{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".into()),
        config.listen
    );
    let leadership = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || store.campaign("ca-leader", &candidate, LEADER_LEASE))
            .await??
    };
    // On a first start of several replicas, only the leader creates the CA; the others wait
    // for the journal it writes instead of creating CAs of their own.
    let deadline = tokio::time::Instant::now() + FIRST_CA_WAIT;
    let mut is_leader = leadership.is_leader();
    loop {
        let probe = Arc::clone(&store);
        let journal = tokio::task::spawn_blocking(move || {
            meshauth_datastore::Datastore::load_ca_journal(&*probe)
        })
        .await??;
        if journal.is_some() || *is_leader.borrow_and_update() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "no CA in etcd and this replica was not elected to create it within {}s: check that etcd has quorum and that the other replicas are healthy",
                FIRST_CA_WAIT.as_secs()
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), is_leader.changed()).await;
    }
    let shared = Shared {
        store: Arc::clone(&store),
        is_leader: leadership.is_leader(),
        leadership: Arc::new(Mutex::new(Some(leadership))),
    };
    Ok((store, Some(shared)))
}

/// What a replica on etcd has beyond its store: the store's change feed and its candidacy.
#[derive(Debug, Clone)]
struct Shared {
    store: Arc<meshauth_datastore::EtcdStore>,
    /// Whether this replica leads now.
    is_leader: tokio::sync::watch::Receiver<bool>,
    /// The candidacy, resigned on a clean shutdown so that another replica leads at once.
    leadership: Arc<Mutex<Option<meshauth_datastore::Leadership>>>,
}

/// The datastore's file in a data dir.
pub const DATASTORE_FILE: &str = "meshauth.db";
/// The file that marks a data dir as initialized, holding its trust domain.
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";

/// Opens the data dir's datastore, refusing rather than forgetting: a data dir that was
/// initialized (it has [`TRUST_DOMAIN_FILE`], or a datastore) must still have a readable
/// datastore with its CA, for the trust domain it was made for, and every row must decode. Only
/// a data dir that holds neither gets a new datastore (and then a new CA): the first start, when
/// `first_start` allows it (`server check` does not).
pub fn open_store(
    dir: &Path,
    td: &TrustDomain,
    first_start: bool,
) -> anyhow::Result<meshauth_datastore::Store> {
    let db = dir.join(DATASTORE_FILE);
    let marker = dir.join(TRUST_DOMAIN_FILE);
    let recorded = match std::fs::read_to_string(&marker) {
        Ok(t) => Some(t.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => anyhow::bail!("cannot read {}: {e}", marker.display()),
    };
    if let Some(r) = &recorded
        && r != td.as_str()
    {
        anyhow::bail!(
            "the data dir {} belongs to trust domain {r:?}, not {:?}: pass --trust-domain {r}, or use another --data-dir",
            dir.display(),
            td.as_str()
        );
    }
    let initialized = recorded.is_some() || db.exists();
    let store = if initialized {
        let store = meshauth_datastore::Store::open_existing(&db)?;
        if store.load_ca_journal()?.is_none() {
            anyhow::bail!(
                "the datastore {} holds no CA although its data dir was initialized: restore it from a backup; to start a new trust domain instead (every agent must join again), remove the data dir",
                db.display()
            );
        }
        store
    } else if !first_start {
        anyhow::bail!(
            "{} holds no meshauth datastore: nothing to check (a server started with this --data-dir creates one)",
            dir.display()
        );
    } else {
        tracing::info!(data_dir = %dir.display(), trust_domain = %td, "initializing a new data dir: a new datastore and CA");
        meshauth_datastore::Store::open(&db)?
    };
    let counts = store
        .check()
        .with_context(|| format!("the datastore {} is damaged", db.display()))?;
    tracing::debug!(?counts, "datastore checked");
    if recorded.is_none() {
        write_marker(&marker, td)?;
    }
    Ok(store)
}

fn write_marker(marker: &Path, td: &TrustDomain) -> anyhow::Result<()> {
    let tmp = marker.with_extension("tmp");
    std::fs::write(&tmp, format!("{td}\n"))
        .and_then(|()| std::fs::rename(&tmp, marker))
        .with_context(|| format!("cannot write {}", marker.display()))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use super::*;

    /// A registry stand-in whose steps fail with the given messages.
    #[derive(Default)]
    struct Fake {
        store: Mutex<Option<&'static str>>,
        rotate: Mutex<Option<&'static str>>,
        renew: Mutex<Option<&'static str>>,
        /// What `rotate` returns.
        bundle: Mutex<Option<X509Bundle>>,
    }

    fn fail(slot: &Mutex<Option<&'static str>>) -> anyhow::Result<()> {
        match *slot.lock().unwrap() {
            Some(msg) => Err(anyhow::anyhow!(msg).context("step")),
            None => Ok(()),
        }
    }

    fn self_signed(not_after: SystemTime) -> OwnSvid {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone()], key, not_after)
    }

    impl TickerBackend for Fake {
        fn probe_store(&self) -> anyhow::Result<()> {
            fail(&self.store)
        }

        fn rotate(&self, _now: SystemTime) -> anyhow::Result<Option<X509Bundle>> {
            fail(&self.rotate).map(|()| self.bundle.lock().unwrap().clone())
        }

        fn issue_own_svid(&self, _id: &SpiffeId, now: SystemTime) -> anyhow::Result<OwnSvid> {
            fail(&self.renew).map(|()| self_signed(now + HOUR))
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn ticker(t0: SystemTime) -> (Ticker<Fake>, Arc<Fake>, Metrics, Readiness) {
        let td: TrustDomain = "test.local".parse().unwrap();
        let (chain, key, not_after) = self_signed(t0 + HOUR);
        let state = TickerState {
            bundle: SharedBundle::new(X509Bundle {
                trust_domain: td.clone(),
                authorities: vec![],
                sequence: 0,
                refresh_hint: None,
            }),
            own: SharedCertifiedKey::new(chain, key).unwrap(),
            own_id: server_spiffe_id(&td).unwrap(),
            own_expiry: (t0, not_after),
        };
        let fake = Arc::new(Fake::default());
        let metrics = Metrics::new();
        let readiness = Readiness::new();
        let ticker = Ticker::new(Arc::clone(&fake), metrics.clone(), state, &readiness);
        (ticker, fake, metrics, readiness)
    }

    fn failures(metrics: &Metrics, step: &str) -> u64 {
        let needle = format!("meshauth_server_ticker_failures_total{{step=\"{step}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |n| n.parse().unwrap())
    }

    #[test]
    fn the_tls_listener_trusts_the_registrys_bundle_whoever_rotated_it() {
        let t0 = SystemTime::now();
        let (mut ticker, fake, _metrics, _readiness) = ticker(t0);
        ticker.tick(t0);
        assert_eq!(ticker.state.bundle.get().sequence, 0);
        // Another replica rotated; this one's change feed loaded the journal already, so this
        // tick itself rotates nothing, yet the registry's bundle is newer than the listener's.
        let mut newer = (*ticker.state.bundle.get()).clone();
        newer.sequence = 5;
        *fake.bundle.lock().unwrap() = Some(newer.clone());
        ticker.tick(t0 + TICK);
        assert_eq!(*ticker.state.bundle.get(), newer);
    }

    #[test]
    fn step_failures_are_counted_reported_and_retried_on_the_next_tick() {
        let t0 = SystemTime::now();
        let (mut ticker, fake, metrics, readiness) = ticker(t0);
        assert!(readiness.is_ready(), "{}", readiness.report());

        *fake.rotate.lock().unwrap() = Some("database is locked");
        *fake.store.lock().unwrap() = Some("disk I/O error");
        ticker.tick(t0);
        ticker.tick(t0 + TICK);
        assert_eq!(failures(&metrics, "CaRotation"), 2);
        assert_eq!(failures(&metrics, "StoreProbe"), 2);
        assert_eq!(
            readiness.report(),
            "store: cannot read the datastore: step: disk I/O error\n\
             ca: CA rotation failed: step: database is locked\n"
        );

        *fake.rotate.lock().unwrap() = None;
        *fake.store.lock().unwrap() = None;
        ticker.tick(t0 + 2 * TICK);
        assert!(readiness.is_ready(), "{}", readiness.report());
        assert_eq!(failures(&metrics, "CaRotation"), 2, "no new failure");
    }

    #[test]
    fn a_failed_server_svid_renewal_is_retried_and_matters_once_the_svid_expires() {
        let t0 = SystemTime::now();
        let (mut ticker, fake, metrics, readiness) = ticker(t0);
        let serving = ticker.state.own.get();
        *fake.renew.lock().unwrap() = Some("CA unavailable");

        ticker.tick(t0 + HOUR / 4);
        assert_eq!(
            failures(&metrics, "ServerSvid"),
            0,
            "not due before half-life"
        );
        ticker.tick(t0 + HOUR / 2);
        ticker.tick(t0 + HOUR / 2 + TICK);
        assert_eq!(failures(&metrics, "ServerSvid"), 2, "retried on every tick");
        assert!(readiness.is_ready(), "still valid: {}", readiness.report());

        ticker.tick(t0 + HOUR + TICK);
        let report = readiness.report();
        assert!(
            report.starts_with("server-svid: the server SVID expired"),
            "{report}"
        );
        assert!(report.contains("CA unavailable"), "{report}");

        *fake.renew.lock().unwrap() = None;
        let now = t0 + HOUR + 2 * TICK;
        ticker.tick(now);
        assert!(readiness.is_ready(), "{}", readiness.report());
        assert_eq!(ticker.state.own_expiry, (now, now + HOUR));
        assert!(
            !Arc::ptr_eq(&serving, &ticker.state.own.get()),
            "the new SVID is served"
        );
    }

    #[tokio::test]
    async fn the_ticker_loop_keeps_running_through_failures() {
        let (ticker, fake, metrics, _readiness) = ticker(SystemTime::now());
        *fake.rotate.lock().unwrap() = Some("database is locked");
        let token = CancellationToken::new();
        let run = tokio::spawn(run_ticker(
            Arc::new(Mutex::new(ticker)),
            Duration::from_millis(10),
            token.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while failures(&metrics, "CaRotation") < 5 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ticker stopped ticking after {} failures",
                failures(&metrics, "CaRotation")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!run.is_finished());
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the ticker stops when cancelled")
            .unwrap()
            .unwrap();
    }
}
