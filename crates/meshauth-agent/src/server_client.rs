//! Dialing the server's node API over mutual TLS 1.3, and the keys and CSRs sent to it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use meshauth_proto::node::node_client::NodeClient;
use meshauth_spiffe::TrustDomain;
use meshauth_tls::x509pop::{EXPORTER_LABEL, EXPORTER_LEN};
use meshauth_tls::{HandshakeFailure, PeerPolicy, SharedBundle, SharedCertifiedKey};
use rustls::AlertDescription;
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
    dial(server, td, bundle, own, None).await
}

/// The TLS exporter value of the latest connection a channel made, for x509pop proofs.
pub type ExporterSlot = Arc<std::sync::Mutex<Option<[u8; EXPORTER_LEN]>>>;

/// Connects to `server` without a client certificate, for attestation; when `exporter` is
/// given, each connection's TLS exporter value ([`meshauth_tls::x509pop::EXPORTER_LABEL`]) is
/// put there, for a proof bound to the connection.
pub async fn connect_for_attestation(
    server: &str,
    td: &TrustDomain,
    bundle: SharedBundle,
    exporter: Option<ExporterSlot>,
) -> anyhow::Result<NodeClient<Channel>> {
    dial(server, td, bundle, None, exporter).await
}

async fn dial(
    server: &str,
    td: &TrustDomain,
    bundle: SharedBundle,
    own: Option<SharedCertifiedKey>,
    exporter: Option<ExporterSlot>,
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
            let exporter = exporter.clone();
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
                if let Some(slot) = exporter {
                    let value = tls
                        .get_ref()
                        .1
                        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
                        .map_err(std::io::Error::other)?;
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
                }
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| connect_error(server, td, e))?;
    Ok(NodeClient::new(channel))
}

/// The error of a failed dial: a TLS failure becomes one sentence that says what to check (its
/// cause chain is dropped: it would repeat the sentence in rustls' words); anything else keeps
/// its causes after what to check.
fn connect_error(server: &str, td: &TrustDomain, err: tonic::transport::Error) -> anyhow::Error {
    match HandshakeFailure::find(&err) {
        Some(failure) => anyhow::anyhow!("{}", tls_advice(server, td, &failure)),
        None => anyhow::Error::new(err).context(format!(
            "cannot reach the server at {server} (is `meshauth server run` running there? check --server)"
        )),
    }
}

/// One sentence for a handshake with the server that failed: what is wrong and what to check.
fn tls_advice(server: &str, td: &TrustDomain, failure: &HandshakeFailure) -> String {
    match failure {
        HandshakeFailure::WrongTrustDomain { peer_id, .. } => {
            let theirs = peer_id.trust_domain();
            format!(
                "the server at {server} is in trust domain {theirs} (its certificate is {peer_id}), \
                 not {td}: pass --trust-domain {theirs}, or --server with a server of {td}"
            )
        }
        HandshakeFailure::UnknownIssuer => format!(
            "the server at {server} presented a certificate that no CA of this agent's trust bundle \
             issued: get the server's bundle with `meshauth bundle show` on the server and pass it \
             with --trust-bundle (a bundle saved in --data-dir takes precedence)"
        ),
        HandshakeFailure::Expired => format!(
            "the server at {server} presented an expired certificate: check the clocks of both \
             machines and the server's log (it renews its own SVID)"
        ),
        HandshakeFailure::NotYetValid => format!(
            "the server at {server} presented a certificate that is not valid yet: check the \
             clocks of both machines"
        ),
        HandshakeFailure::IdNotAccepted => format!(
            "the server at {server} is not the meshauth server of {td} (its certificate is not \
             spiffe://{td}/meshauth/server): check --server"
        ),
        HandshakeFailure::Refused(
            AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied,
        ) => format!(
            "the server at {server} refused this node's SVID ({failure}): a node with \
             --x509pop-cert attests again by itself; otherwise write a new join token from \
             `meshauth token generate` on the server to --join-token-file, or check --server"
        ),
        other => format!(
            "TLS with the server at {server} failed: {other}; check --server and --trust-domain"
        ),
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn tls_advice_says_what_to_check() {
        let td: TrustDomain = "b.test".parse().unwrap();
        let wrong = HandshakeFailure::WrongTrustDomain {
            peer_id: "spiffe://a.test/meshauth/server".parse().unwrap(),
            expected: "b.test".into(),
        };
        let text = tls_advice("10.0.0.1:8081", &td, &wrong);
        assert!(text.contains("is in trust domain a.test"), "{text}");
        assert!(text.contains("pass --trust-domain a.test"), "{text}");
        let text = tls_advice("10.0.0.1:8081", &td, &HandshakeFailure::UnknownIssuer);
        assert!(
            text.contains("`meshauth bundle show` on the server"),
            "{text}"
        );
        let refused = HandshakeFailure::Refused(AlertDescription::UnknownCA);
        let text = tls_advice("10.0.0.1:8081", &td, &refused);
        assert!(text.contains("--join-token"), "{text}");
        for text in [
            tls_advice("s:1", &td, &wrong),
            tls_advice("s:1", &td, &HandshakeFailure::Other("x".into())),
        ] {
            assert!(!text.contains('\n') && !text.contains('{'), "{text}");
        }
    }
}
