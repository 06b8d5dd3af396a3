//! X.509-SVID validation (X509-SVID specification, section 5).
//!
//! RFC 5280 path validation is `rustls-webpki`'s; this module adds the SPIFFE rules on top:
//! exactly one URI SAN holding a SPIFFE ID with a path, in the bundle's trust domain; a leaf
//! that is not a CA, whose key usage has digitalSignature and neither keyCertSign nor cRLSign;
//! and no further leaf certificates after the first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::bundle::X509Bundle;
use crate::id::SpiffeId;

/// Low-cardinality reasons an SVID is rejected, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SvidRejectReason {
    /// No certificate presented.
    EmptyChain,
    /// Not parseable DER X.509.
    MalformedCertificate,
    /// Zero or several URI SANs.
    UriSanCount,
    /// The URI SAN is not a SPIFFE ID, or has no path.
    NotSpiffeId,
    /// Another trust domain than the bundle's.
    WrongTrustDomain,
    /// The leaf is a CA.
    LeafIsCa,
    /// Key usage missing or wrong.
    KeyUsage,
    /// A second leaf in the chain.
    ExtraLeafInChain,
    /// Expired.
    Expired,
    /// Not yet valid.
    NotYetValid,
    /// Does not chain to an authority of the bundle.
    UnknownAuthority,
    /// Other path validation failure (signature, constraints, usage).
    InvalidChain,
}

/// Why an SVID is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// No certificate presented.
    #[error("no certificate presented")]
    EmptyChain,
    /// Not parseable.
    #[error("certificate {index} of the chain is not valid DER X.509")]
    Malformed {
        /// Position in the chain.
        index: usize,
    },
    /// Zero or several URI SANs.
    #[error("the leaf has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    /// Not a SPIFFE ID.
    #[error("the leaf's URI SAN {uri:?} is not a SPIFFE ID with a path: {why}")]
    NotSpiffeId {
        /// The URI.
        uri: String,
        /// The reason.
        why: String,
    },
    /// Wrong trust domain.
    #[error(
        "{id} is not in trust domain {expected}: validate against the bundle of the SVID's own trust domain"
    )]
    WrongTrustDomain {
        /// The SVID's ID.
        id: SpiffeId,
        /// The bundle's trust domain.
        expected: String,
    },
    /// Leaf is a CA.
    #[error("the leaf has cA=true; an X.509-SVID leaf must not be a CA")]
    LeafIsCa,
    /// Key usage.
    #[error("the leaf's key usage {0}")]
    KeyUsage(&'static str),
    /// Second leaf.
    #[error("certificate {0} of the chain is not a CA: only the first may be a leaf")]
    ExtraLeafInChain(usize),
    /// Expired.
    #[error("the SVID has expired")]
    Expired,
    /// Not yet valid.
    #[error("the SVID is not valid yet (check clocks)")]
    NotYetValid,
    /// Unknown authority.
    #[error("the SVID does not chain to any authority of the trust bundle")]
    UnknownAuthority,
    /// Other path validation failure.
    #[error("the certificate chain is invalid: {0}")]
    InvalidChain(String),
}

impl SvidError {
    /// The reason, for metrics.
    pub fn reason(&self) -> SvidRejectReason {
        match self {
            SvidError::EmptyChain => SvidRejectReason::EmptyChain,
            SvidError::Malformed { .. } => SvidRejectReason::MalformedCertificate,
            SvidError::UriSanCount(_) => SvidRejectReason::UriSanCount,
            SvidError::NotSpiffeId { .. } => SvidRejectReason::NotSpiffeId,
            SvidError::WrongTrustDomain { .. } => SvidRejectReason::WrongTrustDomain,
            SvidError::LeafIsCa => SvidRejectReason::LeafIsCa,
            SvidError::KeyUsage(_) => SvidRejectReason::KeyUsage,
            SvidError::ExtraLeafInChain(_) => SvidRejectReason::ExtraLeafInChain,
            SvidError::Expired => SvidRejectReason::Expired,
            SvidError::NotYetValid => SvidRejectReason::NotYetValid,
            SvidError::UnknownAuthority => SvidRejectReason::UnknownAuthority,
            SvidError::InvalidChain(_) => SvidRejectReason::InvalidChain,
        }
    }
}

/// What a valid SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its expiry.
    pub not_after: SystemTime,
    /// Its serial number, lowercase hex.
    pub serial: String,
}

fn parse(der: &[u8], index: usize) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        _ => Err(SvidError::Malformed { index }),
    }
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    out.push(*uri);
                }
            }
        }
    }
    out
}

/// The SPIFFE ID in a certificate's single URI SAN, without validating anything else.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    id_in(&parse(cert, 0)?)
}

fn id_in(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(cert);
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    uri.parse()
        .map_err(|e: crate::id::SpiffeIdError| SvidError::NotSpiffeId {
            uri: (*uri).to_owned(),
            why: e.to_string(),
        })
}

/// A certificate's expiry (`notAfter`), without validating anything else.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Result<SystemTime, SvidError> {
    Ok(expiry(&parse(cert, 0)?))
}

fn expiry(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// A certificate's serial number in lowercase hex.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<String, SvidError> {
    Ok(hex(parse(cert, 0)?.raw_serial()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// Validates `chain` (leaf first, then intermediates) as an X.509-SVID of `bundle`'s trust
/// domain at time `now`.
pub fn validate_x509_svid(
    chain: &[CertificateDer<'_>],
    bundle: &X509Bundle,
    now: SystemTime,
) -> Result<VerifiedSvid, SvidError> {
    let leaf_der = chain.first().ok_or(SvidError::EmptyChain)?;
    let leaf = parse(leaf_der, 0)?;

    // SPIFFE ID: exactly one URI SAN, a SPIFFE ID with a path, in the bundle's trust domain.
    let spiffe_id = id_in(&leaf)?;
    if spiffe_id.path().is_empty() {
        return Err(SvidError::NotSpiffeId {
            uri: spiffe_id.to_string(),
            why: "a leaf SVID's ID needs a path".into(),
        });
    }
    if *spiffe_id.trust_domain() != bundle.trust_domain {
        return Err(SvidError::WrongTrustDomain {
            id: spiffe_id,
            expected: bundle.trust_domain.to_string(),
        });
    }

    // Leaf rules.
    if is_ca(&leaf) {
        return Err(SvidError::LeafIsCa);
    }
    match leaf.key_usage() {
        Ok(Some(ku)) => {
            if !ku.value.digital_signature() {
                return Err(SvidError::KeyUsage("lacks digitalSignature"));
            }
            if ku.value.key_cert_sign() {
                return Err(SvidError::KeyUsage(
                    "has keyCertSign, which only CAs may have",
                ));
            }
            if ku.value.crl_sign() {
                return Err(SvidError::KeyUsage("has cRLSign, which only CAs may have"));
            }
        }
        Ok(None) => return Err(SvidError::KeyUsage("extension is missing")),
        Err(_) => return Err(SvidError::Malformed { index: 0 }),
    }
    for (index, der) in chain.iter().enumerate().skip(1) {
        if !is_ca(&parse(der, index)?) {
            return Err(SvidError::ExtraLeafInChain(index));
        }
    }

    // Validity period, reported precisely before path validation.
    let t = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    if t > leaf.validity().not_after.timestamp() {
        return Err(SvidError::Expired);
    }
    if t < leaf.validity().not_before.timestamp() {
        return Err(SvidError::NotYetValid);
    }

    // RFC 5280 path validation to an authority of the bundle.
    let anchors: Vec<_> = bundle
        .authorities
        .iter()
        .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| SvidError::InvalidChain(format!("{e:?}")))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        unix_time(now),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| match e {
        // No authority with the issuer's name, or one with the name but another key (a forged
        // CA that copies our subject): either way, not signed by this trust domain.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidError::UnknownAuthority
        }
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        other => SvidError::InvalidChain(format!("{other:?}")),
    })?;

    let not_after = expiry(&leaf);
    Ok(VerifiedSvid {
        spiffe_id,
        not_after,
        serial: hex(leaf.raw_serial()),
    })
}
