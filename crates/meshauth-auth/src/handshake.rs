//! The agent-to-agent handshake that authenticates one pair of identities.
//!
//! The initiator (the agent whose datapath saw the flow) dials the peer node's agent on TCP
//! 4250 and runs TLS 1.3:
//!
//! - it presents the SVID of its local identity and names the remote identity in SNI
//!   (`<id>.identity.meshauth`, since SNI must be a DNS name);
//! - the responder answers only if that identity has an endpoint on its node (else it has no
//!   certificate to present and the handshake fails), presents that identity's SVID, verifies
//!   the client chain against the bundle, and checks that the registry places the client's
//!   identity on the node at the connection's source address;
//! - the initiator verifies that the server presented exactly the SVID of the remote identity;
//! - the initiator says what it authenticates: the pair ([`REQUEST_PAIR`]), or one connection
//!   ([`REQUEST_CONNECTION`] and the connection's addresses, ports and protocol, for
//!   per-connection authentication); the responder accepts a connection only from a pod of the
//!   initiator's identity on the initiator's node, to a pod of its own identity here;
//! - the responder then sends one status byte; on [`STATUS_OK`] both sides record the pair (or
//!   the connection) as authenticated until the earlier of the two certificates' expiry.
//!
//! Both sides verify both identities, and a node can only answer for identities it hosts:
//! the trust-model holes of Cilium's design (one-sided checks, every node holding every key)
//! are closed here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use meshauth_policy::{AuthKey, AuthType, Connection, IdentityId, NodeId};
use meshauth_spiffe::{SpiffeId, TrustDomain};
use meshauth_tls::{ClientAuth, PeerPolicy, SharedBundle, SharedCertifiedKey};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// The handshake port.
pub const HANDSHAKE_PORT: u16 = 4250;
/// Handshake connections a responder serves at once ([`Handshaker::serve`]); more are closed
/// when accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// ALPN of the handshake protocol.
pub const ALPN: &[u8] = b"meshauth-auth/2";
/// The initiator authenticates the pair.
pub const REQUEST_PAIR: u8 = 0;
/// The initiator authenticates one connection; 13 bytes follow: source and destination
/// address, source and destination port (big-endian), protocol.
pub const REQUEST_CONNECTION: u8 = 1;
/// The responder accepted.
pub const STATUS_OK: u8 = 1;
/// The responder refused: the initiator's identity is not hosted on the initiator's node.
pub const STATUS_NOT_HOSTED: u8 = 2;
/// The responder refused: the connection is not from a pod of the initiator's identity on its
/// node to a pod of the requested identity on the responder's.
pub const STATUS_BAD_CONNECTION: u8 = 3;

/// Why a handshake failed (low cardinality: metric label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The peer agent could not be reached.
    Unreachable,
    /// A step took longer than its timeout.
    Timeout,
    /// This agent holds no SVID for the local identity.
    NoLocalSvid,
    /// The peer's certificate was rejected (wrong identity, trust domain, expired, bad chain).
    PeerCertificateRejected,
    /// The responder refused the handshake (e.g. it does not host the requested identity).
    Refused,
    /// The initiator's identity is not hosted on the node it connected from.
    InitiatorNotHosted,
    /// The connection broke.
    Io,
    /// Policy asks for `authentication.mode: test-always-fail`, which never succeeds: the auth
    /// manager fails such a pair without a handshake and never writes an entry for it.
    TestAlwaysFail,
    /// The responder was serving [`MAX_CONNECTIONS`] handshakes already and closed the
    /// connection at once.
    Overloaded,
}

/// A failed handshake.
#[derive(Debug, thiserror::Error)]
#[error("{reason:?}: {detail}")]
pub struct AuthError {
    /// Why.
    pub reason: Reason,
    /// Details for the log.
    pub detail: String,
}

fn fail(reason: Reason, detail: impl std::fmt::Display) -> AuthError {
    AuthError {
        reason,
        detail: detail.to_string(),
    }
}

/// Where identities run, as the registry says.
pub trait Placement: Send + Sync + 'static {
    /// Whether `identity` has an endpoint on this node.
    fn hosted_here(&self, identity: IdentityId) -> bool;
    /// The node with address `addr`.
    fn node_at(&self, addr: IpAddr) -> Option<NodeId>;
    /// Whether `identity` has an endpoint on `node`.
    fn hosted_on(&self, identity: IdentityId, node: NodeId) -> bool;
    /// The identity and node of the pod at `addr` (none when no pod, or two, have it).
    fn pod_at(&self, addr: Ipv4Addr) -> Option<(IdentityId, NodeId)> {
        let _ = addr;
        None
    }
    /// The identity of the pod at `addr` on this node.
    fn local_pod_at(&self, addr: Ipv4Addr) -> Option<IdentityId> {
        let _ = addr;
        None
    }
}

fn encode_request(connection: Option<Connection>) -> Vec<u8> {
    let Some(c) = connection else {
        return vec![REQUEST_PAIR];
    };
    let mut b = vec![REQUEST_CONNECTION];
    b.extend_from_slice(&c.src.octets());
    b.extend_from_slice(&c.dst.octets());
    b.extend_from_slice(&c.sport.to_be_bytes());
    b.extend_from_slice(&c.dport.to_be_bytes());
    b.push(c.protocol);
    b
}

fn decode_connection(b: &[u8; 13]) -> Connection {
    Connection {
        src: Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        dst: Ipv4Addr::new(b[4], b[5], b[6], b[7]),
        sport: u16::from_be_bytes([b[8], b[9]]),
        dport: u16::from_be_bytes([b[10], b[11]]),
        protocol: b[12],
    }
}

/// An SVID this agent holds for one of its identities.
#[derive(Clone, Debug)]
pub struct LocalSvid {
    /// Certificate and key, swappable on rotation.
    pub key: SharedCertifiedKey,
    /// Its expiry.
    pub not_after: SystemTime,
}

/// The SVIDs of the identities hosted on this node.
#[derive(Clone, Debug, Default)]
pub struct LocalSvids(Arc<RwLock<std::collections::HashMap<IdentityId, LocalSvid>>>);

impl LocalSvids {
    /// Sets (or replaces on rotation) the SVID of `identity`.
    pub fn set(&self, identity: IdentityId, svid: LocalSvid) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(identity, svid);
    }

    /// Forgets `identity` (its last endpoint left).
    pub fn remove(&self, identity: IdentityId) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&identity);
    }

    /// The identities with an SVID.
    pub fn identities(&self) -> Vec<IdentityId> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The SVID of `identity`.
    pub fn get(&self, identity: IdentityId) -> Option<LocalSvid> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&identity)
            .cloned()
    }
}

/// A pair that authenticated, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated {
    /// The identity on this node.
    pub local: IdentityId,
    /// The peer identity.
    pub remote: IdentityId,
    /// The peer's node.
    pub remote_node: NodeId,
    /// The earlier of the two certificates' expiry.
    pub expires: SystemTime,
    /// The connection, when one connection was authenticated (per-connection authentication).
    pub connection: Option<Connection>,
}

impl Authenticated {
    /// The auth entry it makes: the pair's, or the connection's.
    pub fn key(&self) -> AuthKey {
        AuthKey {
            local: self.local,
            remote: self.remote,
            remote_node: self.remote_node,
            auth_type: if self.connection.is_some() {
                AuthType::PerConnection
            } else {
                AuthType::Required
            },
            connection: self.connection,
        }
    }
}

/// Timeouts of one handshake.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// TLS handshake plus the status byte.
    pub handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            handshake: Duration::from_secs(3),
        }
    }
}

/// The SNI naming `identity`.
pub fn sni_for(identity: IdentityId) -> String {
    format!("{identity}.identity.meshauth")
}

fn identity_from_sni(sni: &str) -> Option<IdentityId> {
    sni.strip_suffix(".identity.meshauth")?
        .parse()
        .ok()
        .map(IdentityId::new)
}

/// The identity of an `spiffe://<td>/identity/<n>` ID of trust domain `td`.
pub fn identity_of(id: &SpiffeId, td: &TrustDomain) -> Option<IdentityId> {
    if id.trust_domain() != td {
        return None;
    }
    id.path()
        .strip_prefix("/identity/")?
        .parse()
        .ok()
        .map(IdentityId::new)
}

/// The expiry of a peer's leaf. The TLS verifier has already validated the whole chain against
/// the bundle, so this only reads the date rather than validating a second time.
fn peer_expiry(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<SystemTime> {
    meshauth_spiffe::not_after_of(certs?.first()?).ok()
}

/// Runs handshakes for the agent of one node, in both roles.
#[derive(Clone)]
pub struct Handshaker {
    trust_domain: TrustDomain,
    bundle: SharedBundle,
    svids: LocalSvids,
    placement: Arc<dyn Placement>,
    timeouts: Timeouts,
    on_accept: Option<AcceptHook>,
}

/// Called by the responder with every pair it is about to accept, before it tells the
/// initiator: what the responder's side must hold (its auth entry) exists before the
/// initiator releases any packet toward it.
pub type AcceptHook = Arc<dyn Fn(&Authenticated) + Send + Sync>;

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaker")
            .field("trust_domain", &self.trust_domain.to_string())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct SniResolver {
    svids: LocalSvids,
    placement: Arc<dyn Placement>,
}

impl std::fmt::Debug for dyn Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Placement")
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let identity = identity_from_sni(hello.server_name()?)?;
        if !self.placement.hosted_here(identity) {
            // Triggered from the network: debug only; `serve` reports the refusal (rate-limited).
            tracing::debug!(identity = %identity, reason = ?Reason::Refused, "handshake for an identity not hosted here");
            return None;
        }
        Some(self.svids.get(identity)?.key.get())
    }
}

impl Handshaker {
    /// A handshaker for this node.
    pub fn new(
        trust_domain: TrustDomain,
        bundle: SharedBundle,
        svids: LocalSvids,
        placement: Arc<dyn Placement>,
        timeouts: Timeouts,
    ) -> Self {
        Handshaker {
            trust_domain,
            bundle,
            svids,
            placement,
            timeouts,
            on_accept: None,
        }
    }

    /// Runs `hook` for every pair this responder accepts, before the initiator hears of it.
    pub fn with_accept_hook(mut self, hook: AcceptHook) -> Self {
        self.on_accept = Some(hook);
        self
    }

    /// Authenticates `local` (hosted here) with `remote` (hosted on the node at `peer`),
    /// connecting from `source` when given (the node address the responder will check).
    pub async fn initiate(
        &self,
        local: IdentityId,
        remote: IdentityId,
        remote_node: NodeId,
        peer: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<Authenticated, AuthError> {
        self.initiate_for(local, remote, remote_node, peer, source, None)
            .await
    }

    /// [`Handshaker::initiate`] for one connection (`Some`) or the pair (`None`).
    pub async fn initiate_for(
        &self,
        local: IdentityId,
        remote: IdentityId,
        remote_node: NodeId,
        peer: SocketAddr,
        source: Option<IpAddr>,
        connection: Option<Connection>,
    ) -> Result<Authenticated, AuthError> {
        let own = self
            .svids
            .get(local)
            .ok_or_else(|| fail(Reason::NoLocalSvid, format!("no SVID for identity {local}")))?;
        let expected = meshauth_spiffe::identity_spiffe_id(&self.trust_domain, remote.get());
        let config = meshauth_tls::client_config(
            Some(own.key.clone()),
            self.bundle.clone(),
            PeerPolicy::Exact(expected),
            &[ALPN],
        )
        .map_err(|e| fail(Reason::Io, e))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let socket = if peer.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| fail(Reason::Io, e))?;
        if let Some(src) = source {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| fail(Reason::Io, e))?;
        }
        let tcp = tokio::time::timeout(self.timeouts.connect, socket.connect(peer))
            .await
            .map_err(|_| fail(Reason::Timeout, "connect"))?
            .map_err(|e| fail(Reason::Unreachable, e))?;
        let _ = tcp.set_nodelay(true);
        let sni = ServerName::try_from(sni_for(remote)).map_err(|e| fail(Reason::Io, e))?;
        let exchange = async {
            let mut tls = connector
                .connect(sni, tcp)
                .await
                .map_err(|e| classify(&e))?;
            tls.write_all(&encode_request(connection))
                .await
                .map_err(|e| classify(&e))?;
            tls.flush().await.map_err(|e| classify(&e))?;
            let mut status = [0u8; 1];
            tls.read_exact(&mut status)
                .await
                .map_err(|e| classify(&e))?;
            let peer_expiry =
                peer_expiry(tls.get_ref().1.peer_certificates()).ok_or_else(|| {
                    fail(Reason::PeerCertificateRejected, "no valid peer certificate")
                })?;
            let _ = tls.shutdown().await;
            match status[0] {
                STATUS_OK => Ok(peer_expiry),
                STATUS_NOT_HOSTED => Err(fail(
                    Reason::InitiatorNotHosted,
                    "the responder does not place our identity on our node",
                )),
                STATUS_BAD_CONNECTION => Err(fail(
                    Reason::Refused,
                    "the responder does not place the connection's pods as we do",
                )),
                other => Err(fail(Reason::Refused, format!("status {other}"))),
            }
        };
        let peer_expiry = tokio::time::timeout(self.timeouts.handshake, exchange)
            .await
            .map_err(|_| fail(Reason::Timeout, "handshake"))??;
        Ok(Authenticated {
            local,
            remote,
            remote_node,
            expires: own.not_after.min(peer_expiry),
            connection,
        })
    }

    /// Answers handshakes on `listener` until `shutdown`; each success is sent on `accepted`,
    /// each failure is sent on `failed` with its reason.
    ///
    /// Bounded: at most [`MAX_CONNECTIONS`] connections are served at once; one more is closed
    /// as soon as it is accepted and reported as [`Reason::Overloaded`]. Each connection has
    /// the handshake timeout ([`Timeouts::handshake`]) to finish, and in-flight handshakes are
    /// dropped when `shutdown` turns true. Refusals come from the network, so they are logged
    /// at debug, plus at most one warning per 10 s carrying the number held back. A
    /// failing `accept` (e.g. EMFILE at the descriptor limit) pauses the loop, 10 ms doubling
    /// to 1 s and reset by the next success, and is logged at most once a second with the count
    /// of errors not logged.
    pub async fn serve(
        self,
        listener: TcpListener,
        accepted: mpsc::Sender<Authenticated>,
        failed: mpsc::Sender<Reason>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        self.serve_limited(listener, accepted, failed, shutdown, MAX_CONNECTIONS)
            .await;
    }

    /// [`Handshaker::serve`] with at most `limit` connections at once.
    async fn serve_limited(
        self,
        listener: TcpListener,
        accepted: mpsc::Sender<Authenticated>,
        failed: mpsc::Sender<Reason>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        limit: usize,
    ) {
        let predicate_td = self.trust_domain.clone();
        let peers = PeerPolicy::Predicate(Arc::new(move |id: &SpiffeId| {
            identity_of(id, &predicate_td).is_some()
        }));
        let resolver = Arc::new(SniResolver {
            svids: self.svids.clone(),
            placement: Arc::clone(&self.placement),
        });
        let config = match meshauth_tls::server_config_with_resolver(
            resolver,
            self.bundle.clone(),
            peers,
            ClientAuth::Required,
            &[ALPN],
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the handshake server config");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let mut errors = AcceptErrors::default();
        let permits = Arc::new(tokio::sync::Semaphore::new(limit));
        // Every connection's task; dropping the set (at shutdown) aborts them.
        let mut tasks = tokio::task::JoinSet::new();
        // Connections closed over the limit and not yet reported on `failed`: reported as the
        // channel has room, so that a flood neither blocks accepting nor goes uncounted.
        let mut overloaded: u64 = 0;
        let over_limit_log = Arc::new(WarnLimit::default());
        let refused_log = Arc::new(WarnLimit::default());
        loop {
            let accepted_conn = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => return,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                permit = failed.reserve(), if overloaded > 0 => {
                    match permit {
                        Ok(p) => {
                            p.send(Reason::Overloaded);
                            overloaded -= 1;
                        }
                        // Nobody listens any more.
                        Err(_) => overloaded = 0,
                    }
                    continue;
                }
            };
            let (tcp, from) = match accepted_conn {
                Ok(a) => {
                    errors.succeeded(tokio::time::Instant::now());
                    a
                }
                Err(e) => {
                    // At the descriptor limit every accept fails at once while a connection
                    // waits: pause rather than spin.
                    let pause = errors.failed(&e, tokio::time::Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                drop(tcp);
                overloaded = overloaded.saturating_add(1);
                match over_limit_log.allow() {
                    Some(suppressed) => tracing::warn!(
                        peer.addr = %from,
                        limit,
                        suppressed,
                        reason = ?Reason::Overloaded,
                        "handshake connection closed: at the connection limit"
                    ),
                    None => {
                        tracing::debug!(peer.addr = %from, limit, reason = ?Reason::Overloaded, "handshake connection closed: at the connection limit")
                    }
                }
                continue;
            };
            let (me, acceptor, accepted, failed, refused_log) = (
                self.clone(),
                acceptor.clone(),
                accepted.clone(),
                failed.clone(),
                Arc::clone(&refused_log),
            );
            tasks.spawn(async move {
                let _permit = permit;
                let timeout = me.timeouts.handshake;
                let result =
                    match tokio::time::timeout(timeout, me.respond(acceptor, tcp, from)).await {
                        Ok(r) => r,
                        Err(_) => Err(fail(Reason::Timeout, "handshake")),
                    };
                match result {
                    Ok(a) => {
                        tracing::debug!(local = %a.local, remote = %a.remote, remote.node = %a.remote_node, "pair authenticated (responder)");
                        let _ = accepted.send(a).await;
                    }
                    Err(e) => {
                        match refused_log.allow() {
                            Some(suppressed) => tracing::warn!(peer.addr = %from, reason = ?e.reason, error = %e.detail, suppressed, "handshake refused"),
                            None => tracing::debug!(peer.addr = %from, reason = ?e.reason, error = %e.detail, "handshake refused"),
                        }
                        let _ = failed.send(e.reason).await;
                    }
                }
            });
        }
    }

    async fn respond(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
        from: SocketAddr,
    ) -> Result<Authenticated, AuthError> {
        let mut tls = acceptor.accept(tcp).await.map_err(|e| classify(&e))?;
        let (_, conn) = tls.get_ref();
        let local = conn
            .server_name()
            .and_then(identity_from_sni)
            .ok_or_else(|| fail(Reason::Refused, "no SNI"))?;
        let certs = conn.peer_certificates();
        let peer_id = meshauth_tls::peer_spiffe_id(certs)
            .and_then(|id| identity_of(&id, &self.trust_domain))
            .ok_or_else(|| {
                fail(
                    Reason::PeerCertificateRejected,
                    "client presented no identity SVID",
                )
            })?;
        let peer_expiry = peer_expiry(certs).ok_or_else(|| {
            fail(
                Reason::PeerCertificateRejected,
                "client SVID has no readable expiry",
            )
        })?;
        let node = self.placement.node_at(from.ip());
        let Some(node) = node.filter(|n| self.placement.hosted_on(peer_id, *n)) else {
            let _ = tls.write_all(&[STATUS_NOT_HOSTED]).await;
            let _ = tls.shutdown().await;
            return Err(fail(
                Reason::InitiatorNotHosted,
                format!(
                    "identity {peer_id} is not hosted on the node at {}",
                    from.ip()
                ),
            ));
        };
        let own = self
            .svids
            .get(local)
            .ok_or_else(|| fail(Reason::NoLocalSvid, format!("no SVID for identity {local}")))?;
        let mut kind = [0u8; 1];
        tls.read_exact(&mut kind).await.map_err(|e| classify(&e))?;
        let connection = match kind[0] {
            REQUEST_PAIR => None,
            REQUEST_CONNECTION => {
                let mut b = [0u8; 13];
                tls.read_exact(&mut b).await.map_err(|e| classify(&e))?;
                let c = decode_connection(&b);
                // From a pod of the initiator's identity on its node, to one of ours here.
                if self.placement.pod_at(c.src) != Some((peer_id, node))
                    || self.placement.local_pod_at(c.dst) != Some(local)
                {
                    let _ = tls.write_all(&[STATUS_BAD_CONNECTION]).await;
                    let _ = tls.shutdown().await;
                    return Err(fail(
                        Reason::Refused,
                        format!(
                            "connection {c} is not from identity {peer_id} on the initiator's node to identity {local} here"
                        ),
                    ));
                }
                Some(c)
            }
            other => {
                let _ = tls.shutdown().await;
                return Err(fail(Reason::Refused, format!("unknown request {other}")));
            }
        };
        let accepted = Authenticated {
            local,
            remote: peer_id,
            remote_node: node,
            expires: own.not_after.min(peer_expiry),
            connection,
        };
        if let Some(hook) = &self.on_accept {
            hook(&accepted);
        }
        tls.write_all(&[STATUS_OK])
            .await
            .map_err(|e| fail(Reason::Io, e))?;
        let _ = tls.flush().await;
        let _ = tls.shutdown().await;
        Ok(accepted)
    }
}

/// Backoff and log rate limit of a failing accept loop: the pause doubles from
/// [`AcceptErrors::MIN`] to [`AcceptErrors::MAX`] and resets on success; at most one line per
/// [`AcceptErrors::LOG_EVERY`], carrying the number of errors not logged since the last line.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    pause: Duration,
    last_log: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            pause: Self::MIN,
            last_log: None,
            suppressed: 0,
        }
    }
}

impl AcceptErrors {
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(1);

    fn may_log(&self, now: tokio::time::Instant) -> bool {
        self.last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::LOG_EVERY)
    }

    /// Records a failed accept; returns how long to pause before the next one.
    pub(crate) fn failed(&mut self, e: &std::io::Error, now: tokio::time::Instant) -> Duration {
        let pause = self.pause;
        if self.may_log(now) {
            tracing::warn!(
                error = %e,
                suppressed = self.suppressed,
                retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                "handshake accept failed"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
        }
        self.pause = pause.saturating_mul(2).min(Self::MAX);
        pause
    }

    /// Records a successful accept: the pause resets; errors not yet reported are reported
    /// (within the rate limit).
    pub(crate) fn succeeded(&mut self, now: tokio::time::Instant) {
        self.pause = Self::MIN;
        if self.suppressed > 0 && self.may_log(now) {
            tracing::info!(
                suppressed = self.suppressed,
                "handshake accept recovered after failures"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        }
    }
}

/// Rate limit of a warning the network can trigger: one per [`WarnLimit::EVERY`]; the others
/// go to debug and are counted into the next warning's `suppressed` field.
#[derive(Debug, Default)]
pub(crate) struct WarnLimit {
    /// When the last warning went out, and how many were held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl WarnLimit {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(held back since the last warning)` if this event may be a warning.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if state
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY)
        {
            state.1 = state.1.saturating_add(1);
            return None;
        }
        let suppressed = state.1;
        *state = (Some(now), 0);
        Some(suppressed)
    }
}

fn classify(e: &std::io::Error) -> AuthError {
    let text = e.to_string();
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => Reason::PeerCertificateRejected,
        Some(rustls::Error::AlertReceived(_)) => Reason::Refused,
        Some(rustls::Error::NoCertificatesPresented) => Reason::PeerCertificateRejected,
        Some(_) => Reason::Refused,
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => Reason::Refused,
        None => Reason::Io,
    };
    fail(reason, text)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use super::*;

    struct Nowhere;

    impl Placement for Nowhere {
        fn hosted_here(&self, _: IdentityId) -> bool {
            false
        }
        fn node_at(&self, _: IpAddr) -> Option<NodeId> {
            None
        }
        fn hosted_on(&self, _: IdentityId, _: NodeId) -> bool {
            false
        }
    }

    /// Whether the server closed `c` (EOF or reset) within `wait`.
    async fn closed_within(c: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(wait, c.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once_and_reported() {
        let now = SystemTime::now();
        let td: TrustDomain = "mesh.test".parse().unwrap();
        let ca = meshauth_ca::Ca::new(meshauth_ca::CaConfig::new(td.clone()), now).unwrap();
        let hs = Handshaker::new(
            td,
            SharedBundle::new(ca.bundle(now)),
            LocalSvids::default(),
            Arc::new(Nowhere),
            Timeouts {
                connect: Duration::from_secs(1),
                handshake: Duration::from_secs(30),
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (atx, _arx) = mpsc::channel(8);
        let (ftx, mut frx) = mpsc::channel(8);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(hs.serve_limited(listener, atx, ftx, stop_rx, 2));

        // Two silent clients take both slots (each has 30 s to say hello).
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The third is closed at once, and counted.
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(5)).await);
        let reason = tokio::time::timeout(Duration::from_secs(5), frx.recv())
            .await
            .unwrap();
        assert_eq!(reason, Some(Reason::Overloaded));
        for c in &mut held {
            assert!(
                !closed_within(c, Duration::from_millis(200)).await,
                "connections within the limit stay open"
            );
        }

        // A client that goes away frees its slot.
        drop(held.pop());
        let reason = tokio::time::timeout(Duration::from_secs(5), frx.recv())
            .await
            .unwrap();
        assert_eq!(
            reason,
            Some(Reason::Refused),
            "the silent client's handshake"
        );
        let mut next = TcpStream::connect(addr).await.unwrap();
        assert!(!closed_within(&mut next, Duration::from_millis(300)).await);

        // Shutdown drops the connections in progress.
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(closed_within(&mut next, Duration::from_secs(5)).await);
        assert!(closed_within(&mut held[0], Duration::from_secs(5)).await);
    }
}
