//! TLS 1.3 between SPIFFE identities, on rustls with the `ring` provider.
//!
//! rustls verifies signatures and the handshake; this crate decides who the peer is:
//! the presented chain must be a valid X.509-SVID under the *current* trust bundle
//! ([`SharedBundle`], swapped on CA rotation without rebuilding configs), and its SPIFFE ID must
//! satisfy a [`PeerPolicy`]. Used by the server's node API, by agents dialing the server and by
//! the agent-to-agent handshake.
//!
//! # Layout
//! - [`SharedBundle`], [`SharedCertifiedKey`]: live trust bundle and live own SVID.
//! - [`PeerPolicy`]: which SPIFFE IDs a side accepts.
//! - [`server_config`], [`client_config`]: TLS 1.3-only rustls configs wired to the above.
//! - [`peer_spiffe_id`]: the verified peer's ID, after the handshake.
//! - [`HandshakeFailure`]: why a handshake failed, found in any error's source chain, for
//!   messages that say what to check.
//! - [`x509pop`]: node attestation by proof of possession of an operator-issued certificate,
//!   bound to the TLS connection it is sent on.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod failure;
mod verify;
pub mod x509pop;

use std::fmt;
use std::sync::{Arc, RwLock};

use meshauth_spiffe::{SpiffeId, X509Bundle};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

pub use failure::{HandshakeFailure, RejectedSvid};
pub use verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The private key could not be loaded (not PKCS#8 ECDSA/Ed25519/RSA).
    #[error("cannot load private key: {0}")]
    Key(rustls::Error),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The crypto provider used everywhere in meshauth (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A trust bundle that can be replaced while connections use it (CA rotation).
#[derive(Clone)]
pub struct SharedBundle(Arc<RwLock<Arc<X509Bundle>>>);

impl SharedBundle {
    /// Starts with `bundle`.
    pub fn new(bundle: X509Bundle) -> Self {
        SharedBundle(Arc::new(RwLock::new(Arc::new(bundle))))
    }

    /// The current bundle.
    pub fn get(&self) -> Arc<X509Bundle> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the bundle; new handshakes use it at once.
    pub fn set(&self, bundle: X509Bundle) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(bundle);
    }
}

impl fmt::Debug for SharedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.get();
        f.debug_struct("SharedBundle")
            .field("trust_domain", &b.trust_domain.to_string())
            .field("authorities", &b.authorities.len())
            .field("sequence", &b.sequence)
            .finish()
    }
}

/// Our own SVID and key, replaceable on rotation (never logged).
#[derive(Clone)]
pub struct SharedCertifiedKey(Arc<RwLock<Arc<CertifiedKey>>>);

impl SharedCertifiedKey {
    /// Builds from a chain (leaf first) and its PKCS#8 key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        Ok(SharedCertifiedKey(Arc::new(RwLock::new(Arc::new(
            certified_key(chain, key)?,
        )))))
    }

    /// Replaces the SVID; new handshakes present it at once.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let ck = Arc::new(certified_key(chain, key)?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }

    /// The current SVID and key.
    pub fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl fmt::Debug for SharedCertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCertifiedKey").finish_non_exhaustive()
    }
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(chain, signing))
}

#[derive(Debug)]
struct Resolver(SharedCertifiedKey);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Which SPIFFE IDs a side accepts from its peer (after the chain validated).
#[derive(Clone)]
pub enum PeerPolicy {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID of the bundle's trust domain; the application authorizes it afterwards.
    AnyInTrustDomain,
    /// Whatever the predicate accepts.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl PeerPolicy {
    pub(crate) fn accepts(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPolicy::Exact(want) => want == id,
            PeerPolicy::AnyInTrustDomain => true,
            PeerPolicy::Predicate(f) => f(id),
        }
    }
}

impl fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerPolicy::Exact(id) => write!(f, "Exact({id})"),
            PeerPolicy::AnyInTrustDomain => f.write_str("AnyInTrustDomain"),
            PeerPolicy::Predicate(_) => f.write_str("Predicate"),
        }
    }
}

/// Whether a server asks for, or requires, a client SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Handshakes without a client certificate succeed; handlers must check.
    Optional,
    /// Handshakes without a valid client SVID fail.
    Required,
}

/// A TLS 1.3-only server config presenting `own` and verifying clients against `bundle`.
pub fn server_config(
    own: SharedCertifiedKey,
    bundle: SharedBundle,
    peers: PeerPolicy,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with_resolver(Arc::new(Resolver(own)), bundle, peers, client_auth, alpn)
}

/// Like [`server_config`], with the certificate chosen per handshake by `resolver` (e.g. by
/// SNI, when one server answers for several identities).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    bundle: SharedBundle,
    peers: PeerPolicy,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = SpiffeClientVerifier::new(bundle, peers, client_auth);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3-only client config verifying the server against `bundle` and `peers`, presenting
/// `own` when given.
pub fn client_config(
    own: Option<SharedCertifiedKey>,
    bundle: SharedBundle,
    peers: PeerPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = SpiffeServerVerifier::new(bundle, peers);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match own {
        Some(own) => builder.with_client_cert_resolver(Arc::new(Resolver(own))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The SPIFFE ID of a peer whose chain the verifiers of this crate accepted.
///
/// `None` when the peer sent no certificate (optional client auth).
pub fn peer_spiffe_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    meshauth_spiffe::spiffe_id_of(leaf).ok()
}
