//! The node-pair key exchange behind encryption: the WireGuard pre-shared key of two nodes is
//! the TLS 1.3 exporter (RFC 8446 section 7.5) of a handshake between their agents, each
//! presenting its node SVID.
//!
//! - The node whose name sorts first initiates ([`initiates`]); it dials the peer's agent on
//!   TCP [`TUNNEL_KEY_PORT`] and expects exactly the peer's node SVID
//!   (`spiffe://<td>/node/<name>`).
//! - The responder verifies the client's node SVID against the bundle, and accepts it only if
//!   the registry binds that very node to the address the connection comes from, the node
//!   sorts before it, and the node has published a WireGuard key.
//! - The initiator then sends the two WireGuard public keys as it sees them (its own, the
//!   responder's); the responder refuses unless both match what the registry says (a stale
//!   view retries later). Both sides export 32 bytes under [`EXPORTER_LABEL`] with both names
//!   and both keys as the context ([`context`]): the PSK.
//! - The responder installs the key (its accept hook) before it answers [`STATUS_OK`], so the
//!   WireGuard handshake the initiator starts next finds the key on both sides.
//! - Only the node that sorts first derives keys, one exchange at a time per peer, so the two
//!   sides never install different keys. The other node, when it holds no key (it restarted),
//!   asks for one ([`REQUEST_REKEY`], authenticated the same way).
//!
//! A WireGuard tunnel therefore comes up only between two nodes that passed mutual SVID
//! authentication with each other, and a node's WireGuard private key alone is not enough to
//! impersonate it. The key lives as long as the earlier of the two node SVIDs; the agent
//! exchanges a new one before (rotation), which WireGuard mixes into its next handshake
//! while the established session keeps carrying traffic.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use meshauth_policy::{NodeId, TunnelKey};
use meshauth_spiffe::{SpiffeId, TrustDomain};
use meshauth_tls::{ClientAuth, PeerPolicy, SharedBundle, SharedCertifiedKey};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::handshake::{AcceptErrors, Timeouts, WarnLimit};

/// The key exchange port.
pub const TUNNEL_KEY_PORT: u16 = 4251;
/// ALPN of the key exchange.
pub const ALPN: &[u8] = b"meshauth-tunnel/1";
/// The TLS exporter label of the WireGuard pre-shared key.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshauth-wireguard-psk";
/// Connections a responder serves at once; more are closed when accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// First byte of a request: derive a key (from the node that sorts first).
pub const REQUEST_EXCHANGE: u8 = 1;
/// First byte of a request: ask the node that sorts first to derive a key now (from the other
/// node, which has none: it restarted). It carries no key; the exchange that follows does.
pub const REQUEST_REKEY: u8 = 2;
/// The responder accepted and installed the key.
pub const STATUS_OK: u8 = 1;
/// The responder does not bind the initiator's node to the address it connects from, or the
/// node has published no key.
pub const STATUS_UNKNOWN_NODE: u8 = 2;
/// The keys the initiator named are not those the responder's registry view holds.
pub const STATUS_KEY_MISMATCH: u8 = 3;
/// The initiator is not the node that initiates for this pair.
pub const STATUS_WRONG_ROLE: u8 = 4;
/// The responder cannot use the key (no tunnel peer for the node yet).
pub const STATUS_NOT_READY: u8 = 5;

/// Why an exchange failed (low cardinality: metric label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeReason {
    /// The peer agent could not be reached.
    Unreachable,
    /// A step took longer than its timeout.
    Timeout,
    /// The peer's certificate was rejected (not the expected node SVID, expired, bad chain).
    PeerCertificateRejected,
    /// The peer is not bound to the address it connects from, or published no key.
    UnknownNode,
    /// The two sides' views of the keys differ.
    KeyMismatch,
    /// The wrong side initiated.
    WrongRole,
    /// The responder had no tunnel peer for us yet.
    NotReady,
    /// The connection broke, or the peer spoke another protocol.
    Io,
    /// The responder was at its connection limit.
    Overloaded,
}

impl ExchangeReason {
    /// The name shown in logs and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeReason::Unreachable => "unreachable",
            ExchangeReason::Timeout => "timeout",
            ExchangeReason::PeerCertificateRejected => "peer_certificate_rejected",
            ExchangeReason::UnknownNode => "unknown_node",
            ExchangeReason::KeyMismatch => "key_mismatch",
            ExchangeReason::WrongRole => "wrong_role",
            ExchangeReason::NotReady => "not_ready",
            ExchangeReason::Io => "io",
            ExchangeReason::Overloaded => "overloaded",
        }
    }
}

/// A failed exchange.
#[derive(Debug, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct ExchangeError {
    /// Why.
    pub reason: ExchangeReason,
    /// Details for the log.
    pub detail: String,
}

fn fail(reason: ExchangeReason, detail: impl std::fmt::Display) -> ExchangeError {
    ExchangeError {
        reason,
        detail: detail.to_string(),
    }
}

/// Another node as the registry says: its name, id, address and published WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeer {
    /// Its name.
    pub name: String,
    /// Its id.
    pub node: NodeId,
    /// The address bound to it.
    pub address: IpAddr,
    /// The WireGuard public key it published.
    pub key: TunnelKey,
}

/// The registry's view of the other nodes, for the responder's checks.
pub trait TunnelPeers: Send + Sync + 'static {
    /// The node bound to `addr`, if it published a key.
    fn peer_at(&self, addr: IpAddr) -> Option<TunnelPeer>;
}

/// A pre-shared key two nodes derived together.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey {
    /// The other node.
    pub peer: TunnelPeer,
    /// The 32 bytes WireGuard mixes into its handshake.
    pub psk: [u8; 32],
    /// The earlier of the two node SVIDs' expiry: exchange a new key before.
    pub expires: SystemTime,
}

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKey")
            .field("peer", &self.peer)
            .field("psk", &"..")
            .field("expires", &self.expires)
            .finish()
    }
}

/// Whether node `own` initiates the exchange with node `peer` (the name that sorts first).
pub fn initiates(own: &str, peer: &str) -> bool {
    own < peer
}

/// The exporter context: both names and both keys, initiator first, each name ended by a
/// zero byte (names hold no zero byte).
pub fn context(initiator: (&str, &TunnelKey), responder: (&str, &TunnelKey)) -> Vec<u8> {
    let mut c = Vec::with_capacity(initiator.0.len() + responder.0.len() + 66);
    for (name, key) in [initiator, responder] {
        c.extend_from_slice(name.as_bytes());
        c.push(0);
        c.extend_from_slice(key.as_bytes());
    }
    c
}

fn node_name_of<'a>(id: &'a SpiffeId, td: &TrustDomain) -> Option<&'a str> {
    if id.trust_domain() != td {
        return None;
    }
    id.path().strip_prefix("/node/").filter(|n| !n.is_empty())
}

fn export(
    conn: &rustls::ConnectionCommon<impl Sized>,
    context: &[u8],
) -> Result<[u8; 32], ExchangeError> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, Some(context))
        .map_err(|e| fail(ExchangeReason::Io, format!("TLS exporter: {e}")))
}

fn peer_expiry(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<SystemTime> {
    meshauth_spiffe::not_after_of(certs?.first()?).ok()
}

/// Called by the responder with every key it is about to accept, before it answers: returns
/// whether the key is in place (a tunnel peer exists for that node).
pub type KeyHook = Arc<dyn Fn(&PairKey) -> bool + Send + Sync>;

/// Called by the node that initiates for a pair when the other node asks for a key now
/// ([`KeyExchange::request_rekey`]: it holds none); the caller schedules an exchange.
pub type RekeyHook = Arc<dyn Fn(&TunnelPeer) + Send + Sync>;

/// Runs key exchanges for the agent of one node, in both roles.
#[derive(Clone)]
pub struct KeyExchange {
    trust_domain: TrustDomain,
    bundle: SharedBundle,
    node_svid: SharedCertifiedKey,
    own_name: String,
    own_key: TunnelKey,
    own_expiry: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    peers: Arc<dyn TunnelPeers>,
    timeouts: Timeouts,
}

impl std::fmt::Debug for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyExchange")
            .field("own_name", &self.own_name)
            .field("own_key", &self.own_key)
            .finish_non_exhaustive()
    }
}

impl KeyExchange {
    /// An exchanger for node `own_name`, presenting `node_svid` (swapped on renewal; its
    /// current expiry from `own_expiry`) and publishing `own_key`.
    #[allow(
        clippy::too_many_arguments,
        reason = "each is a distinct part of the node's identity"
    )]
    pub fn new(
        trust_domain: TrustDomain,
        bundle: SharedBundle,
        node_svid: SharedCertifiedKey,
        own_expiry: Arc<dyn Fn() -> SystemTime + Send + Sync>,
        own_name: String,
        own_key: TunnelKey,
        peers: Arc<dyn TunnelPeers>,
        timeouts: Timeouts,
    ) -> Self {
        KeyExchange {
            trust_domain,
            bundle,
            node_svid,
            own_name,
            own_key,
            own_expiry,
            peers,
            timeouts,
        }
    }

    /// Derives a new key with `peer` (this node must be the initiator), dialing its agent at
    /// `port` on the peer's address, from `source` when given (the address the responder
    /// checks).
    pub async fn initiate(
        &self,
        peer: &TunnelPeer,
        port: u16,
        source: Option<IpAddr>,
    ) -> Result<PairKey, ExchangeError> {
        if !initiates(&self.own_name, &peer.name) {
            return Err(fail(
                ExchangeReason::WrongRole,
                format!("node {} initiates with {}", peer.name, self.own_name),
            ));
        }
        let (psk, peer_expiry) = self.call(REQUEST_EXCHANGE, peer, port, source).await?;
        Ok(PairKey {
            peer: peer.clone(),
            psk,
            expires: (self.own_expiry)().min(peer_expiry),
        })
    }

    /// Asks `peer` (the node that initiates for the pair: this one sorts after it) to derive a
    /// key with this node now, because this node holds none (it restarted). Authenticated as
    /// an exchange is; the key comes with the exchange the peer then starts.
    pub async fn request_rekey(
        &self,
        peer: &TunnelPeer,
        port: u16,
        source: Option<IpAddr>,
    ) -> Result<(), ExchangeError> {
        if !initiates(&peer.name, &self.own_name) {
            return Err(fail(
                ExchangeReason::WrongRole,
                format!(
                    "node {} initiates with {}: no need to ask",
                    self.own_name, peer.name
                ),
            ));
        }
        self.call(REQUEST_REKEY, peer, port, source)
            .await
            .map(|_| ())
    }

    /// One request to `peer`: the exported key and the peer's SVID expiry on success.
    async fn call(
        &self,
        kind: u8,
        peer: &TunnelPeer,
        port: u16,
        source: Option<IpAddr>,
    ) -> Result<([u8; 32], SystemTime), ExchangeError> {
        let expected = meshauth_spiffe::node_spiffe_id(&self.trust_domain, &peer.name)
            .map_err(|e| fail(ExchangeReason::UnknownNode, e))?;
        let config = meshauth_tls::client_config(
            Some(self.node_svid.clone()),
            self.bundle.clone(),
            PeerPolicy::Exact(expected),
            &[ALPN],
        )
        .map_err(|e| fail(ExchangeReason::Io, e))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = SocketAddr::new(peer.address, port);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| fail(ExchangeReason::Io, e))?;
        if let Some(src) = source {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| fail(ExchangeReason::Io, e))?;
        }
        let tcp = tokio::time::timeout(self.timeouts.connect, socket.connect(addr))
            .await
            .map_err(|_| fail(ExchangeReason::Timeout, "connect"))?
            .map_err(|e| fail(ExchangeReason::Unreachable, e))?;
        let _ = tcp.set_nodelay(true);
        let sni = ServerName::try_from("node.meshauth").map_err(|e| fail(ExchangeReason::Io, e))?;
        let exchange = async {
            let mut tls = connector
                .connect(sni, tcp)
                .await
                .map_err(|e| classify(&e))?;
            let mut request = vec![kind];
            request.extend_from_slice(self.own_key.as_bytes());
            request.extend_from_slice(peer.key.as_bytes());
            tls.write_all(&request).await.map_err(|e| classify(&e))?;
            tls.flush().await.map_err(|e| classify(&e))?;
            let mut status = [0u8; 1];
            tls.read_exact(&mut status)
                .await
                .map_err(|e| classify(&e))?;
            let (_, conn) = tls.get_ref();
            let expiry = peer_expiry(conn.peer_certificates()).ok_or_else(|| {
                fail(
                    ExchangeReason::PeerCertificateRejected,
                    "no valid peer certificate",
                )
            })?;
            let psk = export(
                conn,
                &context((&self.own_name, &self.own_key), (&peer.name, &peer.key)),
            )?;
            let _ = tls.shutdown().await;
            match status[0] {
                STATUS_OK => Ok((psk, expiry)),
                STATUS_UNKNOWN_NODE => Err(fail(
                    ExchangeReason::UnknownNode,
                    "the responder does not bind our node to our address, or holds no key of ours",
                )),
                STATUS_KEY_MISMATCH => Err(fail(
                    ExchangeReason::KeyMismatch,
                    "the responder's view of the WireGuard keys differs from ours",
                )),
                STATUS_WRONG_ROLE => Err(fail(
                    ExchangeReason::WrongRole,
                    "the responder expects to initiate",
                )),
                STATUS_NOT_READY => Err(fail(
                    ExchangeReason::NotReady,
                    "the responder has no tunnel peer for us yet",
                )),
                other => Err(fail(ExchangeReason::Io, format!("status {other}"))),
            }
        };
        tokio::time::timeout(self.timeouts.handshake, exchange)
            .await
            .map_err(|_| fail(ExchangeReason::Timeout, "exchange"))?
    }

    /// Answers exchanges on `listener` until `shutdown`. Each key is handed to `install`
    /// before the initiator hears of it; each failure is sent on `failed` with its reason.
    /// Bounded: at most [`MAX_CONNECTIONS`] at once (more are closed and reported as
    /// [`ExchangeReason::Overloaded`]), each within the handshake timeout. Refusals come from
    /// the network: logged at debug, plus one warning per 10 s with the number held back.
    pub async fn serve(
        self,
        listener: TcpListener,
        install: KeyHook,
        rekey: RekeyHook,
        failed: mpsc::Sender<ExchangeReason>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let td = self.trust_domain.clone();
        let peers = PeerPolicy::Predicate(Arc::new(move |id: &SpiffeId| {
            node_name_of(id, &td).is_some()
        }));
        let config = match meshauth_tls::server_config(
            self.node_svid.clone(),
            self.bundle.clone(),
            peers,
            ClientAuth::Required,
            &[ALPN],
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the key exchange server config");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let mut errors = AcceptErrors::default();
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = tokio::task::JoinSet::new();
        let refused_log = Arc::new(WarnLimit::default());
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|s| *s) => return,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let (tcp, from) = match accepted {
                Ok(a) => {
                    errors.succeeded(tokio::time::Instant::now());
                    a
                }
                Err(e) => {
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
                let _ = failed.try_send(ExchangeReason::Overloaded);
                tracing::debug!(peer.addr = %from, "key exchange closed: at the connection limit");
                continue;
            };
            let (me, acceptor, install, rekey, failed, refused_log) = (
                self.clone(),
                acceptor.clone(),
                Arc::clone(&install),
                Arc::clone(&rekey),
                failed.clone(),
                Arc::clone(&refused_log),
            );
            tasks.spawn(async move {
                let _permit = permit;
                let result = match tokio::time::timeout(
                    me.timeouts.handshake,
                    me.respond(acceptor, tcp, from, &install, &rekey),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(fail(ExchangeReason::Timeout, "exchange")),
                };
                match result {
                    Ok(Some(k)) => {
                        tracing::debug!(peer.node = %k.peer.name, "tunnel key derived (responder)")
                    }
                    Ok(None) => tracing::debug!(peer.addr = %from, "new tunnel key requested"),
                    Err(e) => {
                        match refused_log.allow() {
                            Some(suppressed) => tracing::warn!(peer.addr = %from, reason = e.reason.as_str(), error = %e.detail, suppressed, "key exchange refused"),
                            None => tracing::debug!(peer.addr = %from, reason = e.reason.as_str(), error = %e.detail, "key exchange refused"),
                        }
                        let _ = failed.try_send(e.reason);
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
        install: &KeyHook,
        rekey: &RekeyHook,
    ) -> Result<Option<PairKey>, ExchangeError> {
        let mut tls = acceptor.accept(tcp).await.map_err(|e| classify(&e))?;
        let (_, conn) = tls.get_ref();
        let certs = conn.peer_certificates();
        let client = meshauth_tls::peer_spiffe_id(certs).ok_or_else(|| {
            fail(
                ExchangeReason::PeerCertificateRejected,
                "client presented no node SVID",
            )
        })?;
        let name = node_name_of(&client, &self.trust_domain)
            .ok_or_else(|| fail(ExchangeReason::PeerCertificateRejected, "not a node SVID"))?
            .to_owned();
        let expiry = peer_expiry(certs).ok_or_else(|| {
            fail(
                ExchangeReason::PeerCertificateRejected,
                "client SVID has no readable expiry",
            )
        })?;
        let mut request = [0u8; 65];
        tls.read_exact(&mut request)
            .await
            .map_err(|e| classify(&e))?;
        let refuse =
            |status: u8, reason: ExchangeReason, detail: String| (status, fail(reason, detail));
        let kind = request[0];
        let outcome: Result<Option<PairKey>, (u8, ExchangeError)> = async {
            let Some(peer) = self.peers.peer_at(from.ip()).filter(|p| p.name == name) else {
                return Err(refuse(
                    STATUS_UNKNOWN_NODE,
                    ExchangeReason::UnknownNode,
                    format!(
                        "node {name} is not bound to {} or published no WireGuard key",
                        from.ip()
                    ),
                ));
            };
            let role_ok = match kind {
                REQUEST_EXCHANGE => initiates(&name, &self.own_name),
                REQUEST_REKEY => initiates(&self.own_name, &name),
                _ => false,
            };
            if !role_ok {
                return Err(refuse(
                    STATUS_WRONG_ROLE,
                    ExchangeReason::WrongRole,
                    format!(
                        "request {kind} from node {name}, which is not the node that may send it"
                    ),
                ));
            }
            let theirs = TunnelKey::from_slice(&request[1..33]);
            let ours = TunnelKey::from_slice(&request[33..65]);
            if theirs != Some(peer.key) || ours != Some(self.own_key) {
                return Err(refuse(
                    STATUS_KEY_MISMATCH,
                    ExchangeReason::KeyMismatch,
                    format!("node {name} named other WireGuard keys than the registry's"),
                ));
            }
            if kind == REQUEST_REKEY {
                rekey(&peer);
                return Ok(None);
            }
            let (_, conn) = tls.get_ref();
            let psk = export(
                conn,
                &context((&peer.name, &peer.key), (&self.own_name, &self.own_key)),
            )
            .map_err(|e| (STATUS_NOT_READY, e))?;
            let key = PairKey {
                peer,
                psk,
                expires: (self.own_expiry)().min(expiry),
            };
            if !install(&key) {
                return Err(refuse(
                    STATUS_NOT_READY,
                    ExchangeReason::NotReady,
                    format!("no tunnel peer for node {name} yet"),
                ));
            }
            Ok(Some(key))
        }
        .await;
        match outcome {
            Ok(key) => {
                tls.write_all(&[STATUS_OK])
                    .await
                    .map_err(|e| classify(&e))?;
                let _ = tls.shutdown().await;
                Ok(key)
            }
            Err((status, e)) => {
                let _ = tls.write_all(&[status]).await;
                let _ = tls.shutdown().await;
                Err(e)
            }
        }
    }
}

fn classify(e: &std::io::Error) -> ExchangeError {
    let text = e.to_string();
    let reason = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            ExchangeReason::PeerCertificateRejected
        }
        Some(_) => ExchangeReason::Io,
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => ExchangeReason::Io,
        None => ExchangeReason::Io,
    };
    fail(reason, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_that_sorts_first_initiates() {
        assert!(initiates("n1", "n2"));
        assert!(!initiates("n2", "n1"));
        assert!(!initiates("n1", "n1"));
    }

    #[test]
    fn the_context_binds_names_keys_and_roles() {
        let (a, b) = (TunnelKey::new([1; 32]), TunnelKey::new([2; 32]));
        let c = context(("n1", &a), ("n2", &b));
        assert_eq!(c.len(), 3 + 32 + 3 + 32);
        assert_ne!(c, context(("n2", &b), ("n1", &a)));
        assert_ne!(c, context(("n1", &b), ("n2", &a)));
        // A name boundary cannot move: "n1"+"0n2" differs from "n10"+"n2".
        assert_ne!(
            context(("n1", &a), ("0n2", &b)),
            context(("n10", &a), ("n2", &b))
        );
    }
}
