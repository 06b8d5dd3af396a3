//! Accepting TLS connections for tonic, with the verified peer identity attached.
//!
//! tonic's own TLS takes a static CA list; ours must follow the live bundle (CA rotation) and
//! check SPIFFE IDs, so the server terminates TLS itself with `meshauth-tls` configs and hands
//! tonic the decrypted streams. Handshakes run in their own tasks with a timeout so that a slow
//! or silent client cannot hold up accepting others.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::registry::NodeCaller;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for tonic.
const BACKLOG: usize = 64;

/// What a handler learns about its caller.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The TCP peer.
    pub remote_addr: SocketAddr,
    /// The verified client SVID, if one was presented.
    pub caller: Option<NodeCaller>,
}

/// A TLS connection as tonic sees it.
#[derive(Debug)]
pub(crate) struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
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
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections on `listener`, completes TLS handshakes and yields the connections.
/// The returned receiver ends when the listener fails.
pub(crate) fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let caller = caller_of(&stream);
                        let conn = TlsConnection {
                            stream,
                            info: PeerInfo {
                                remote_addr,
                                caller,
                            },
                        };
                        // The receiver is gone only at shutdown.
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer.addr = %remote_addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
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
