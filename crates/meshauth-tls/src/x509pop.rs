//! x509pop node attestation: a node proves it holds the key of a certificate that the
//! operator's CA issued for it, as SPIRE's `x509pop` plugin does. Unlike a join token, the
//! credential is durable: a node whose SVID expired during a long server outage attests again
//! by itself.
//!
//! # The proof
//! The node signs, with the key of its operator certificate, a message that binds
//! - the TLS 1.3 exporter (RFC 8446 section 7.5, label [`EXPORTER_LABEL`]) of the very
//!   connection it sends it on, so a proof cannot be replayed on another connection (SPIRE
//!   sends a fresh nonce for the same reason; the exporter needs no server-side state),
//! - the node name it asks for, and
//! - the CSR of the node SVID it asks for, so a proof cannot be moved to another key.
//!
//! Why not present the operator certificate as the TLS client certificate: the server's client
//! verifier accepts SVIDs of the trust domain only, and an operator certificate must never be a
//! caller of any other RPC. Keeping the proof at the application layer keeps that verifier as
//! it is.
//!
//! # What the server checks ([`OperatorRoots::verify`])
//! The chain leads to one of the operator's CA certificates (RFC 5280 path validation by
//! `rustls-webpki`, with the client-authentication usage), the leaf is valid now, it names the
//! node (subject common name or a DNS name), and the signature over [`signed_message`]
//! verifies with the leaf's key under a TLS 1.3 signature scheme.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// The TLS exporter label of the proof.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshauth-x509pop";
/// Length of the exporter value the proof binds.
pub const EXPORTER_LEN: usize = 32;
/// The context string that starts every signed message (and versions it).
const CONTEXT: &[u8] = b"meshauth x509pop v1\0";

/// The TLS 1.3 signature schemes a proof may use.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// Why an x509pop proof was refused, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509PopError {
    /// No certificate was sent.
    #[error("the node sent no certificate")]
    NoCertificate,
    /// A certificate does not parse.
    #[error("certificate {index} of the node's chain is not valid DER X.509")]
    Malformed {
        /// Its position in the chain (0: the node's own).
        index: usize,
    },
    /// No operator CA issued the chain.
    #[error("the node's certificate was not issued by a CA of --x509pop-ca")]
    UnknownIssuer,
    /// The node's certificate has expired.
    #[error("the node's certificate expired")]
    Expired,
    /// The node's certificate is not valid yet.
    #[error("the node's certificate is not valid yet (check the clocks)")]
    NotYetValid,
    /// Path validation failed for another reason.
    #[error("the node's certificate chain is invalid: {0}")]
    InvalidChain(String),
    /// The certificate does not name the node.
    #[error(
        "the node's certificate names {names:?}, not {node:?} (the node name must be its subject common name or one of its DNS names)"
    )]
    WrongNode {
        /// The node name asked for.
        node: String,
        /// The names the certificate carries.
        names: Vec<String>,
    },
    /// A signature scheme that is not allowed.
    #[error("signature scheme {0:?} is not a TLS 1.3 scheme this server accepts")]
    Scheme(SignatureScheme),
    /// The signature does not verify: not made with the certificate's key over this
    /// connection, node name and CSR.
    #[error(
        "the proof of possession does not verify (not signed with the certificate's key for this connection and CSR)"
    )]
    BadSignature,
    /// The server's connection has no exporter value (not TLS 1.3).
    #[error("this connection cannot bind a proof (no TLS exporter)")]
    NoExporter,
    /// The node's key could not sign.
    #[error("cannot sign with the node's key: {0}")]
    Key(String),
}

/// The message a node signs: context, exporter, node name and CSR, each length-prefixed.
pub fn signed_message(exporter: &[u8], node: &str, csr: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTEXT.len() + exporter.len() + node.len() + csr.len() + 12);
    out.extend_from_slice(CONTEXT);
    for part in [exporter, node.as_bytes(), csr] {
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Signs [`signed_message`] with the node's operator key (PKCS#8, SEC1 or PKCS#1 DER): the
/// scheme chosen and the signature.
pub fn sign(
    key: &PrivateKeyDer<'_>,
    message: &[u8],
) -> Result<(SignatureScheme, Vec<u8>), X509PopError> {
    let key = crate::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| X509PopError::Key(e.to_string()))?;
    let signer = key
        .choose_scheme(SCHEMES)
        .ok_or_else(|| X509PopError::Key("no TLS 1.3 signature scheme fits this key".into()))?;
    let signature = signer
        .sign(message)
        .map_err(|e| X509PopError::Key(e.to_string()))?;
    Ok((signer.scheme(), signature))
}

/// A node's durable credential: its operator certificate chain and the certificate's key.
#[derive(Debug)]
pub struct NodeCredential {
    /// The certificate and its intermediates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl NodeCredential {
    /// From PEM texts: the certificate file (leaf first, then any intermediates) and the key
    /// file (PKCS#8, SEC1 or PKCS#1). Checks that the key can sign a proof.
    pub fn from_pem(cert: &str, key: &str) -> Result<NodeCredential, X509PopError> {
        use rustls::pki_types::pem::PemObject as _;
        let chain = certs_from_pem(cert)?;
        if chain.is_empty() {
            return Err(X509PopError::NoCertificate);
        }
        check_parses(&chain)?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|_| X509PopError::Key("no PEM private key in the key file".into()))?;
        sign(&key, b"check")?;
        Ok(NodeCredential { chain, key })
    }

    /// The proof for `csr`, sent as `node`, on the connection whose exporter value is
    /// `exporter`.
    pub fn prove(
        &self,
        exporter: &[u8],
        node: &str,
        csr: &[u8],
    ) -> Result<(SignatureScheme, Vec<u8>), X509PopError> {
        sign(&self.key, &signed_message(exporter, node, csr))
    }
}

/// The certificates of a PEM text (its `CERTIFICATE` blocks, in order).
fn certs_from_pem(text: &str) -> Result<Vec<CertificateDer<'static>>, X509PopError> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| X509PopError::Malformed { index: 0 })
}

/// Every certificate of `chain` is DER X.509 (the error names the first that is not).
fn check_parses(chain: &[CertificateDer<'_>]) -> Result<(), X509PopError> {
    for (index, der) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|_| X509PopError::Malformed { index })?;
    }
    Ok(())
}

/// What a verified proof tells about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNodeCert {
    /// SHA-256 of the node's certificate, hex.
    pub fingerprint: String,
}

/// The operator's CA certificates that node certificates chain to.
#[derive(Debug, Clone)]
pub struct OperatorRoots {
    roots: Vec<CertificateDer<'static>>,
}

impl OperatorRoots {
    /// Roots from DER certificates; each must be usable as a trust anchor.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<OperatorRoots, X509PopError> {
        if roots.is_empty() {
            return Err(X509PopError::NoCertificate);
        }
        for (index, r) in roots.iter().enumerate() {
            webpki::anchor_from_trusted_cert(r).map_err(|_| X509PopError::Malformed { index })?;
        }
        Ok(OperatorRoots { roots })
    }

    /// Roots from a PEM file's text (one or more `CERTIFICATE` blocks).
    pub fn from_pem(text: &str) -> Result<OperatorRoots, X509PopError> {
        OperatorRoots::new(certs_from_pem(text)?)
    }

    /// Checks a node's proof: `chain` (its certificate first) leads to an operator CA and is
    /// valid at `now`, names `node`, and `signature` under `scheme` is its key's over
    /// [`signed_message`]`(exporter, node, csr)`.
    #[allow(clippy::too_many_arguments, reason = "each is one part of the proof")]
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        node: &str,
        csr: &[u8],
        exporter: Option<&[u8]>,
        scheme: SignatureScheme,
        signature: &[u8],
        now: SystemTime,
    ) -> Result<VerifiedNodeCert, X509PopError> {
        let exporter = exporter.ok_or(X509PopError::NoExporter)?;
        let leaf_der = chain.first().ok_or(X509PopError::NoCertificate)?;
        check_parses(chain)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|_| X509PopError::Malformed { index: 0 })?;
        let t = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let anchors: Vec<_> = self
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(leaf_der)
            .map_err(|_| X509PopError::Malformed { index: 0 })?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &chain[1..],
            UnixTime::since_unix_epoch(t),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                X509PopError::UnknownIssuer
            }
            webpki::Error::CertExpired { .. } => X509PopError::Expired,
            webpki::Error::CertNotValidYet { .. } => X509PopError::NotYetValid,
            other => X509PopError::InvalidChain(format!("{other:?}")),
        })?;
        let names = names_of(&leaf);
        if !names.iter().any(|n| n == node) {
            return Err(X509PopError::WrongNode {
                node: node.to_owned(),
                names,
            });
        }
        if !SCHEMES.contains(&scheme) {
            return Err(X509PopError::Scheme(scheme));
        }
        let provider = crate::provider();
        // As TLS 1.3 does: the first algorithm of the scheme's mapping, only.
        let alg = provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algs)| algs.first())
            .ok_or(X509PopError::Scheme(scheme))?;
        ee.verify_signature(*alg, &signed_message(exporter, node, csr), signature)
            .map_err(|_| X509PopError::BadSignature)?;
        Ok(VerifiedNodeCert {
            fingerprint: fingerprint(leaf_der),
        })
    }
}

/// The names a node certificate carries: its subject common names, then its DNS names.
fn names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names
}

/// SHA-256 of a DER certificate, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use std::time::Duration;

    use rustls::pki_types::PrivatePkcs8KeyDer;

    use super::*;

    struct Operator {
        ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn operator(name: &str) -> Operator {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = p.self_signed(&key).unwrap();
        Operator {
            ca: ca.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn node_cert(
        op: &Operator,
        cn: &str,
        dns: &[&str],
        valid_days: i64,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(valid_days);
        let cert = p.signed_by(&key, &op.issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    const EXPORTER: [u8; 32] = [7; 32];
    const CSR: &[u8] = b"a CSR";

    fn prove(
        key: &PrivateKeyDer<'_>,
        exporter: &[u8],
        node: &str,
        csr: &[u8],
    ) -> (SignatureScheme, Vec<u8>) {
        sign(key, &signed_message(exporter, node, csr)).unwrap()
    }

    #[test]
    fn a_node_certificate_of_the_operator_ca_attests() {
        let op = operator("operator");
        let (cert, key) = node_cert(&op, "n1", &[], 30);
        let roots = OperatorRoots::new(vec![op.ca.clone()]).unwrap();
        let (scheme, sig) = prove(&key, &EXPORTER, "n1", CSR);
        let v = roots
            .verify(
                std::slice::from_ref(&cert),
                "n1",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(v.fingerprint, fingerprint(&cert));
        assert_eq!(v.fingerprint.len(), 64);
        // A DNS name names the node too.
        let (cert, key) = node_cert(&op, "host-17", &["n2.nodes.example"], 30);
        let (scheme, sig) = prove(&key, &EXPORTER, "n2.nodes.example", CSR);
        roots
            .verify(
                &[cert],
                "n2.nodes.example",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                SystemTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn every_part_of_the_proof_is_checked() {
        let op = operator("operator");
        let roots = OperatorRoots::new(vec![op.ca.clone()]).unwrap();
        let (cert, key) = node_cert(&op, "n1", &[], 30);
        let now = SystemTime::now();
        let (scheme, sig) = prove(&key, &EXPORTER, "n1", CSR);
        let chain = [cert.clone()];
        let check = |node: &str, csr: &[u8], exporter: Option<&[u8]>, sig: &[u8]| {
            roots.verify(&chain, node, csr, exporter, scheme, sig, now)
        };
        // Replayed on another connection: another exporter value.
        assert_eq!(
            check("n1", CSR, Some(&[8; 32]), &sig),
            Err(X509PopError::BadSignature)
        );
        // Moved to another key (another CSR).
        assert_eq!(
            check("n1", b"another CSR", Some(&EXPORTER), &sig),
            Err(X509PopError::BadSignature)
        );
        // Another node's name.
        assert!(matches!(
            check("n2", CSR, Some(&EXPORTER), &sig),
            Err(X509PopError::WrongNode { .. })
        ));
        // No exporter (not TLS 1.3).
        assert_eq!(check("n1", CSR, None, &sig), Err(X509PopError::NoExporter));
        // A tampered signature.
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            check("n1", CSR, Some(&EXPORTER), &bad),
            Err(X509PopError::BadSignature)
        );
        // A scheme TLS 1.3 does not allow.
        assert_eq!(
            roots.verify(
                &chain,
                "n1",
                CSR,
                Some(&EXPORTER),
                SignatureScheme::RSA_PKCS1_SHA256,
                &sig,
                now
            ),
            Err(X509PopError::Scheme(SignatureScheme::RSA_PKCS1_SHA256))
        );
        // Signed by the certificate of another key: the certificate's key is what counts.
        let (_, other_key) = node_cert(&op, "n1", &[], 30);
        let (scheme2, sig2) = prove(&other_key, &EXPORTER, "n1", CSR);
        assert_eq!(
            roots.verify(&chain, "n1", CSR, Some(&EXPORTER), scheme2, &sig2, now),
            Err(X509PopError::BadSignature)
        );
    }

    #[test]
    fn another_ca_or_an_expired_certificate_is_refused() {
        let op = operator("operator");
        let roots = OperatorRoots::new(vec![op.ca.clone()]).unwrap();
        // A CA that copies the operator CA's name, with another key.
        let forged = operator("operator");
        let (cert, key) = node_cert(&forged, "n1", &[], 30);
        let (scheme, sig) = prove(&key, &EXPORTER, "n1", CSR);
        assert_eq!(
            roots.verify(
                &[cert],
                "n1",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                SystemTime::now()
            ),
            Err(X509PopError::UnknownIssuer)
        );
        let (cert, key) = node_cert(&op, "n1", &[], 30);
        let (scheme, sig) = prove(&key, &EXPORTER, "n1", CSR);
        let later = SystemTime::now() + Duration::from_secs(31 * 86_400);
        assert_eq!(
            roots.verify(
                std::slice::from_ref(&cert),
                "n1",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                later
            ),
            Err(X509PopError::Expired)
        );
        // A node certificate is no CA: what it signs does not chain.
        assert_eq!(
            roots.verify(
                &[],
                "n1",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                SystemTime::now()
            ),
            Err(X509PopError::NoCertificate)
        );
        assert_eq!(
            roots.verify(
                &[CertificateDer::from(vec![1, 2, 3])],
                "n1",
                CSR,
                Some(&EXPORTER),
                scheme,
                &sig,
                SystemTime::now()
            ),
            Err(X509PopError::Malformed { index: 0 })
        );
        assert!(OperatorRoots::new(vec![]).is_err());
    }

    #[test]
    fn the_message_separates_its_parts() {
        // "n1" + "2csr" and "n12" + "csr" must not sign the same bytes.
        assert_ne!(
            signed_message(&EXPORTER, "n1", b"2csr"),
            signed_message(&EXPORTER, "n12", b"csr")
        );
    }
}
