//! rustls certificate verifiers that accept X.509-SVIDs of a live bundle.
//!
//! Chain and SVID rules come from `meshauth_spiffe::validate_x509_svid` (RFC 5280 path
//! validation plus the X509-SVID leaf rules); handshake signatures are checked by rustls'
//! provider. Server names are not used: the SPIFFE ID is the name.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_spiffe::SvidError;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::failure::RejectedSvid;
use crate::{ClientAuth, PeerPolicy, SharedBundle, provider};

/// Verifies client SVIDs (server side).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    peers: PeerPolicy,
    client_auth: ClientAuth,
}

impl SpiffeClientVerifier {
    /// Accepts clients whose SVID validates under `bundle` and whose ID `peers` accepts.
    pub fn new(bundle: SharedBundle, peers: PeerPolicy, client_auth: ClientAuth) -> Self {
        SpiffeClientVerifier {
            bundle,
            peers,
            client_auth,
        }
    }
}

/// Verifies server SVIDs (client side).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    peers: PeerPolicy,
}

impl SpiffeServerVerifier {
    /// Accepts servers whose SVID validates under `bundle` and whose ID `peers` accepts.
    pub fn new(bundle: SharedBundle, peers: PeerPolicy) -> Self {
        SpiffeServerVerifier { bundle, peers }
    }
}

fn to_system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Validates the presented chain as an SVID and applies the peer policy.
fn verify_svid(
    bundle: &SharedBundle,
    peers: &PeerPolicy,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    side: Side,
) -> Result<(), Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let bundle = bundle.get();
    let verified = meshauth_spiffe::validate_x509_svid(&chain, &bundle, to_system_time(now))
        .map_err(|e| {
            match side {
                Side::Client => {
                    tracing::warn!(peer.side = "client", reason = ?e.reason(), error = %e, "peer SVID rejected");
                }
                Side::Server => {
                    tracing::debug!(peer.side = "server", reason = ?e.reason(), error = %e, "peer SVID rejected");
                }
            }
            Error::InvalidCertificate(certificate_error(e, end_entity, now))
        })?;
    if !peers.accepts(&verified.spiffe_id) {
        match side {
            Side::Client => {
                tracing::warn!(peer.side = "client", peer.id = %verified.spiffe_id, policy = ?peers, "peer SPIFFE ID not accepted");
            }
            Side::Server => {
                tracing::debug!(peer.side = "server", peer.id = %verified.spiffe_id, policy = ?peers, "peer SPIFFE ID not accepted");
            }
        }
        return Err(Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    Ok(())
}

/// Which peer a verifier checks, which decides how loudly a refusal is logged: the accepting
/// side logs it at warn (nobody else reports it); the dialing side at debug, because its caller
/// gets the error and reports it (a warning too would say the same thing twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// A server verifying a client.
    Client,
    /// A client verifying a server.
    Server,
}

/// The rustls error for an SVID that did not validate: a specific variant where one fits (the
/// peer then gets the matching alert: `unknown_ca`, `certificate_expired`, `bad_certificate`),
/// else [`RejectedSvid`] in `Other` (alert `certificate_unknown`), which keeps the reason and,
/// for another trust domain, the peer's SPIFFE ID.
fn certificate_error(
    e: SvidError,
    end_entity: &CertificateDer<'_>,
    now: UnixTime,
) -> CertificateError {
    match e {
        SvidError::UnknownAuthority => CertificateError::UnknownIssuer,
        SvidError::Expired => match meshauth_spiffe::not_after_of(end_entity) {
            Ok(not_after) => CertificateError::ExpiredContext {
                time: now,
                not_after: UnixTime::since_unix_epoch(
                    not_after.duration_since(UNIX_EPOCH).unwrap_or_default(),
                ),
            },
            Err(_) => CertificateError::Expired,
        },
        SvidError::NotYetValid => CertificateError::NotValidYet,
        SvidError::Malformed { .. } => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(RejectedSvid(other)))),
    }
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth == ClientAuth::Required
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_svid(
            &self.bundle,
            &self.peers,
            end_entity,
            intermediates,
            now,
            Side::Client,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Configs built by this crate only speak TLS 1.3.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        verify_svid(
            &self.bundle,
            &self.peers,
            end_entity,
            intermediates,
            now,
            Side::Server,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}
