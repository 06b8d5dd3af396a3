//! Accepting TLS connections for tonic, with the verified peer identity attached.
//!
//! tonic's own TLS takes a static CA list; ours must follow the live bundle (CA rotation) and
//! check SPIFFE IDs, so the server terminates TLS itself with `meshauth-tls` configs and hands
//! tonic the decrypted streams.
//!
//! The port is open to the network and a client certificate is optional (join-token
//! attestation comes without one), so everything here is bounded ([`Limits`]):
//!
//! - at most [`Limits::max_connections`] connections at once, TLS handshakes included; one
//!   more is closed as soon as it is accepted, counted and logged (at most one warning per
//!   [`WARN_EVERY`]);
//! - each handshake runs in its own task with [`Limits::handshake_timeout`], so that a slow or
//!   silent client cannot hold up accepting others;
//! - a connection without a client certificate is closed after [`Limits::idle_timeout`]
//!   without traffic (nodes with an SVID keep their sync streams open, quiet, for as long as
//!   they like);
//! - the accept loop and its handshakes live only as long as the receiver: when tonic drops
//!   the incoming stream (shutdown), the loop stops and the handshakes in progress are dropped.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::{ConnectionCloseReason, Metrics};
use crate::registry::NodeCaller;

/// Default of [`Limits::max_connections`].
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Default of [`Limits::handshake_timeout`].
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Limits::idle_timeout`].
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most one warning per this long about connections refused over the limit.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);
/// Accepted connections waiting for tonic.
const BACKLOG: usize = 64;
/// Pauses after a failed `accept` (e.g. EMFILE): from this, doubling.
const MIN_PAUSE: Duration = Duration::from_millis(10);
/// ... up to this.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Bounds of the node API listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Connections at once, TLS handshakes included.
    pub(crate) max_connections: usize,
    /// Time for a client to finish the TLS handshake.
    pub(crate) handshake_timeout: Duration,
    /// Time without traffic after which a connection without a client certificate is closed.
    pub(crate) idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// What a handler learns about its caller.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The TCP peer.
    pub remote_addr: SocketAddr,
    /// The verified client SVID, if one was presented.
    pub caller: Option<NodeCaller>,
    /// This connection's TLS exporter value for x509pop proofs
    /// ([`meshauth_tls::x509pop::EXPORTER_LABEL`]): what binds a proof to the connection.
    pub x509pop_exporter: Option<[u8; meshauth_tls::x509pop::EXPORTER_LEN]>,
}

/// One connection's place under the limit, from accept until the connection is dropped.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: Metrics) -> Slot {
        metrics.node_api_connection_opened();
        Slot {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.node_api_connection_ended();
    }
}

/// Fails reads once the stream saw no traffic for `limit`.
#[derive(Debug)]
struct IdleTimer {
    limit: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    expired: bool,
    reported: bool,
}

impl IdleTimer {
    fn new(limit: Duration) -> IdleTimer {
        let now = Instant::now();
        IdleTimer {
            limit,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + limit)),
            expired: false,
            reported: false,
        }
    }

    /// True the first time only: an idle close is counted once, however often it is polled.
    fn report(&mut self) -> bool {
        !std::mem::replace(&mut self.reported, true)
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Whether the limit has passed since the last traffic; otherwise `cx` is woken when it
    /// may have.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.expired {
                return true;
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last + self.limit;
            if deadline <= Instant::now() {
                self.expired = true;
            } else {
                // There was traffic since the timer was set: wait for the rest.
                self.sleep.as_mut().reset(deadline);
            }
        }
    }
}

/// A TLS connection as tonic sees it.
#[derive(Debug)]
pub(crate) struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Set for connections without a client certificate.
    idle: Option<IdleTimer>,
    slot: Slot,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if let Some(idle) = &mut this.idle
                    && buf.filled().len() > before
                {
                    idle.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let Some(idle) = &mut this.idle else {
                    return Poll::Pending;
                };
                if !idle.poll_expired(cx) {
                    return Poll::Pending;
                }
                if idle.report() {
                    this.slot
                        .metrics
                        .node_api_connection_closed(ConnectionCloseReason::IdleTimeout);
                    tracing::debug!(
                        peer.addr = %this.info.remote_addr,
                        idle_ms = u64::try_from(idle.limit.as_millis()).unwrap_or(u64::MAX),
                        "closing an idle connection without a client certificate"
                    );
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection without a client certificate",
                )))
            }
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let (Some(idle), Poll::Ready(Ok(n))) = (&mut this.idle, &r)
            && *n > 0
        {
            idle.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// At most one warning per [`WARN_EVERY`]; the others are counted into the next one.
#[derive(Debug, Default)]
struct WarnLimit(Mutex<(Option<std::time::Instant>, u64)>);

impl WarnLimit {
    /// `Some(held back since the last warning)` if this event may be a warning.
    fn allow(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if state
            .0
            .is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY)
        {
            state.1 = state.1.saturating_add(1);
            return None;
        }
        let suppressed = state.1;
        *state = (Some(now), 0);
        Some(suppressed)
    }
}

/// Accepts TCP connections on `listener` within the default [`Limits`], completes TLS
/// handshakes and yields the connections. Dropping the receiver stops accepting and drops the
/// handshakes in progress.
pub(crate) fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Metrics,
) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
    accept_tls_with(listener, config, metrics, Limits::default())
}

/// [`accept_tls`] within `limits`.
pub(crate) fn accept_tls_with(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: Metrics,
    limits: Limits,
) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        // The handshakes in progress; dropped, so aborted, with this task.
        let mut handshakes = tokio::task::JoinSet::new();
        let over_limit = WarnLimit::default();
        let accept_errors = WarnLimit::default();
        let mut pause = MIN_PAUSE;
        loop {
            let (tcp, remote_addr) = tokio::select! {
                () = tx.closed() => return,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(a) => {
                        pause = MIN_PAUSE;
                        a
                    }
                    Err(e) => {
                        // At the descriptor limit every accept fails at once: pause, do not
                        // spin.
                        if let Some(suppressed) = accept_errors.allow() {
                            tracing::warn!(error = %e, suppressed, retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "accept failed");
                        }
                        tokio::select! {
                            () = tx.closed() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(MAX_PAUSE);
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                drop(tcp);
                metrics.node_api_connection_closed(ConnectionCloseReason::OverLimit);
                match over_limit.allow() {
                    Some(suppressed) => tracing::warn!(
                        peer.addr = %remote_addr,
                        limit = limits.max_connections,
                        suppressed,
                        "node API connection closed: at the connection limit"
                    ),
                    None => tracing::debug!(
                        peer.addr = %remote_addr,
                        limit = limits.max_connections,
                        "node API connection closed: at the connection limit"
                    ),
                }
                continue;
            };
            let slot = Slot::new(permit, metrics.clone());
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            handshakes.spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let caller = caller_of(&stream);
                        let x509pop_exporter = stream
                            .get_ref()
                            .1
                            .export_keying_material(
                                [0u8; meshauth_tls::x509pop::EXPORTER_LEN],
                                meshauth_tls::x509pop::EXPORTER_LABEL,
                                None,
                            )
                            .ok();
                        let idle = caller
                            .is_none()
                            .then(|| IdleTimer::new(limits.idle_timeout));
                        let conn = TlsConnection {
                            stream,
                            info: PeerInfo {
                                remote_addr,
                                caller,
                                x509pop_exporter,
                            },
                            idle,
                            slot,
                        };
                        // The receiver is gone only at shutdown.
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        slot.metrics
                            .node_api_connection_closed(ConnectionCloseReason::TlsHandshakeFailed);
                        tracing::debug!(peer.addr = %remote_addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        slot.metrics.node_api_connection_closed(
                            ConnectionCloseReason::TlsHandshakeTimeout,
                        );
                        tracing::debug!(peer.addr = %remote_addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}

fn caller_of(stream: &TlsStream<TcpStream>) -> Option<NodeCaller> {
    let certs = stream.get_ref().1.peer_certificates()?;
    let spiffe_id = meshauth_tls::peer_spiffe_id(Some(certs))?;
    let serial = meshauth_spiffe::serial_of(certs.first()?).ok()?;
    Some(NodeCaller { spiffe_id, serial })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A self-signed server config (no client certificates) and its certificate.
    fn server_config() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        (Arc::new(config), cert)
    }

    async fn listen(
        limits: Limits,
    ) -> (
        SocketAddr,
        mpsc::Receiver<io::Result<TlsConnection>>,
        Metrics,
        CertificateDer<'static>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (config, cert) = server_config();
        let metrics = Metrics::new();
        let rx = accept_tls_with(listener, config, metrics.clone(), limits);
        (addr, rx, metrics, cert)
    }

    /// Whether the server closed `c` (EOF or reset) within `wait`.
    async fn closed_within(c: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(wait, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    fn has(metrics: &Metrics, line: &str) -> bool {
        metrics.encode().lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn the_connection_over_the_limit_is_closed_at_once() {
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let (addr, rx, metrics, _) = listen(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(5)).await);
        assert!(has(
            &metrics,
            "meshauth_server_node_api_connections_closed_total{reason=\"OverLimit\"} 1"
        ));
        assert!(has(&metrics, "meshauth_server_node_api_connections 2"));
        for c in &mut held {
            assert!(!closed_within(c, Duration::from_millis(200)).await);
        }

        // A client that leaves frees its place (its handshake fails at EOF).
        drop(held.pop());
        eventually(|| has(&metrics, "meshauth_server_node_api_connections 1")).await;
        let mut next = TcpStream::connect(addr).await.unwrap();
        assert!(!closed_within(&mut next, Duration::from_millis(200)).await);

        // Dropping the receiver stops the accept loop and drops the handshakes in progress.
        drop(rx);
        assert!(closed_within(&mut next, Duration::from_secs(5)).await);
        assert!(closed_within(&mut held[0], Duration::from_secs(5)).await);
        eventually(|| has(&metrics, "meshauth_server_node_api_connections 0")).await;
    }

    /// Polls `f` for up to 5 s.
    async fn eventually(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let limits = Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _rx, metrics, _) = listen(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        eventually(|| {
            has(
                &metrics,
                "meshauth_server_node_api_connections_closed_total{reason=\"TlsHandshakeTimeout\"} 1",
            ) && has(&metrics, "meshauth_server_node_api_connections 0")
        })
        .await;
    }

    #[tokio::test]
    async fn an_idle_connection_without_a_client_certificate_is_closed() {
        let limits = Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(300),
        };
        let (addr, mut rx, metrics, cert) = listen(limits).await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let _tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut conn = rx.recv().await.unwrap().unwrap();
        assert!(conn.info.caller.is_none());
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let err = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the idle timeout fires")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(has(
            &metrics,
            "meshauth_server_node_api_connections_closed_total{reason=\"IdleTimeout\"} 1"
        ));
        drop(conn);
        assert!(has(&metrics, "meshauth_server_node_api_connections 0"));
    }

    async fn expired(t: &mut IdleTimer) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(t.poll_expired(cx))).await
    }

    #[tokio::test]
    async fn traffic_pushes_the_idle_deadline_back() {
        let mut timer = IdleTimer::new(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        timer.touch();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!expired(&mut timer).await, "200 ms after the last traffic");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(expired(&mut timer).await, "350 ms after the last traffic");
        assert!(timer.report());
        assert!(!timer.report(), "counted once");
    }
}
