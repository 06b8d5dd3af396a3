//! Test support: an in-process server on loopback and a node API client over mutual TLS.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]
#![allow(dead_code, unreachable_pub, reason = "shared by several test files")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use meshauth_proto::node::node_client::NodeClient;
use meshauth_server::registry::Registry;
use meshauth_server::{Server, ServerConfig};
use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use meshauth_tls::{PeerPolicy, SharedBundle, SharedCertifiedKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Channel, Endpoint};

pub const TD: &str = "test.local";

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub registry: Arc<Registry>,
    /// The bundle the node API's TLS listener trusts.
    pub trust: SharedBundle,
    pub admin_socket: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn config(dir: &Path, ca_ttl: Duration, svid_ttl: Duration) -> ServerConfig {
    ServerConfig {
        trust_domain: TD.parse().unwrap(),
        data_dir: dir.join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("admin.sock"),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ca_ttl,
        svid_ttl,
        join_token_ttl: Duration::from_secs(600),
        x509pop: None,
        kek_file: None,
        datastore: meshauth_server::datastore_url::DatastoreUrl::Sqlite,
        pod_cidr: meshauth_server::registry::DEFAULT_POD_CIDR,
    }
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> TestServer {
        let admin_socket = config.admin_socket.clone();
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.node_addr().unwrap();
        let metrics_addr = server.metrics_addr().unwrap();
        let registry = server.registry();
        let trust = server.trust_bundle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            metrics_addr,
            registry,
            trust,
            admin_socket,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    pub fn bundle(&self) -> X509Bundle {
        self.registry.bundle(SystemTime::now())
    }

    pub fn token(&self, node: &str) -> String {
        self.registry
            .create_join_token(&node.parse().unwrap(), None, SystemTime::now())
            .unwrap()
            .token
    }
}

/// A key and CSR made on the "node", as an agent does.
pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (key, csr.der().to_vec())
}

pub fn pkcs8(key: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

pub fn chain(raw: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    raw.iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

/// Dials the node API, verifying the server's SVID, optionally presenting a client SVID.
pub async fn node_client(
    addr: std::net::SocketAddr,
    bundle: X509Bundle,
    own: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> NodeClient<Channel> {
    try_node_client(addr, bundle, own)
        .await
        .expect("connects to the node API")
}

/// [`node_client`], or the error of the dial (a client certificate the server refuses).
pub async fn try_node_client(
    addr: std::net::SocketAddr,
    bundle: X509Bundle,
    own: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<NodeClient<Channel>, tonic::transport::Error> {
    let td: TrustDomain = TD.parse().unwrap();
    let server_id: SpiffeId = meshauth_server::server_spiffe_id(&td).unwrap();
    let own = own.map(|(c, k)| SharedCertifiedKey::new(c, k).unwrap());
    let config = meshauth_tls::client_config(
        own,
        SharedBundle::new(bundle),
        PeerPolicy::Exact(server_id),
        &[b"h2"],
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("meshauth-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(NodeClient::new(channel))
}

/// Dials the node API without a client certificate, as an agent does to attest, and returns
/// the connection's TLS exporter value for x509pop proofs.
pub async fn attestation_client(
    addr: std::net::SocketAddr,
    bundle: X509Bundle,
) -> (
    NodeClient<Channel>,
    [u8; meshauth_tls::x509pop::EXPORTER_LEN],
) {
    let td: TrustDomain = TD.parse().unwrap();
    let server_id: SpiffeId = meshauth_server::server_spiffe_id(&td).unwrap();
    let config = meshauth_tls::client_config(
        None,
        SharedBundle::new(bundle),
        PeerPolicy::Exact(server_id),
        &[b"h2"],
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let slot = Arc::new(std::sync::Mutex::new(None));
    let seen = Arc::clone(&slot);
    let channel = Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let seen = Arc::clone(&seen);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("meshauth-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                let value = tls
                    .get_ref()
                    .1
                    .export_keying_material(
                        [0u8; meshauth_tls::x509pop::EXPORTER_LEN],
                        meshauth_tls::x509pop::EXPORTER_LABEL,
                        None,
                    )
                    .unwrap();
                *seen.lock().unwrap() = Some(value);
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connects to the node API");
    let exporter = slot.lock().unwrap().expect("the connection was made");
    (NodeClient::new(channel), exporter)
}

/// An operator CA for x509pop node certificates, made as an operator would (with rcgen here).
pub struct OperatorCa {
    pub cert: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl OperatorCa {
    pub fn new(name: &str) -> OperatorCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let cert = p.self_signed(&key).unwrap().der().clone();
        OperatorCa {
            cert,
            issuer: rcgen::Issuer::new(p, key),
        }
    }

    pub fn roots(&self) -> meshauth_tls::x509pop::OperatorRoots {
        meshauth_tls::x509pop::OperatorRoots::new(vec![self.cert.clone()]).unwrap()
    }

    /// A node certificate whose subject common name is `node`.
    pub fn node_credential(&self, node: &str) -> meshauth_tls::x509pop::NodeCredential {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, node);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        meshauth_tls::x509pop::NodeCredential {
            chain: vec![cert.der().clone()],
            key: pkcs8(&key),
        }
    }
}
