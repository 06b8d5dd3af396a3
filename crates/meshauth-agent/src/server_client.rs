//! Dialing the server's node API over mutual TLS 1.3, and the keys and CSRs sent to it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use meshauth_proto::node::node_client::NodeClient;
use meshauth_spiffe::TrustDomain;
use meshauth_tls::{PeerPolicy, SharedBundle, SharedCertifiedKey};
use rustls::pki_types::PrivatePkcs8KeyDer;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for the TCP connection and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The SPIFFE ID the server must present: `spiffe://<td>/meshauth/server`.
pub fn server_spiffe_id(td: &TrustDomain) -> anyhow::Result<meshauth_spiffe::SpiffeId> {
    format!("spiffe://{td}/meshauth/server")
        .parse()
        .context("building the server's SPIFFE ID")
}

/// Connects to `server` (`host:port`), verifying its SVID against `bundle` and presenting `own`
/// (the node SVID) when given.
pub async fn connect(
    server: &str,
    td: &TrustDomain,
    bundle: SharedBundle,
    own: Option<SharedCertifiedKey>,
) -> anyhow::Result<NodeClient<Channel>> {
    let config = meshauth_tls::client_config(
        own,
        bundle,
        PeerPolicy::Exact(server_spiffe_id(td)?),
        &[b"h2"],
    )?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = server.to_owned();
    let channel = Endpoint::try_from(format!("http://{server}"))
        .with_context(|| format!("invalid server address {server:?}: expected HOST:PORT"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&target))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                tcp.set_nodelay(true)?;
                // The name is not checked: the verifier checks the server's SPIFFE ID.
                let name = rustls::pki_types::ServerName::try_from("meshauth-server")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("cannot reach the server at {server}"))?;
    Ok(NodeClient::new(channel))
}

/// A fresh ECDSA P-256 key, generated here where it is used, and a CSR for it.
pub fn key_and_csr() -> anyhow::Result<(PrivatePkcs8KeyDer<'static>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)
        .context("building a CSR")?;
    Ok((
        PrivatePkcs8KeyDer::from(key.serialize_der()),
        csr.der().to_vec(),
    ))
}
