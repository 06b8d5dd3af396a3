//! X.509 trust bundles: the SPIFFE bundle format (an RFC 7517 JWK set with `x509-svid` keys,
//! `spiffe_sequence` and `spiffe_refresh_hint`) and concatenated PEM.
//!
//! The JWK fields (`kty`, `crv`, `x`, `y`) are derived from each CA's public key, so consumers
//! that read keys rather than `x5c` see the same authority.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Map, Value, json};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::id::TrustDomain;

/// Why a bundle document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not JSON, or not an object.
    #[error("bundle is not a JSON object: {0}")]
    Json(String),
    /// No `keys` member.
    #[error("bundle has no \"keys\" array")]
    MissingKeys,
    /// A key without `kty` or `use`.
    #[error("key {0} lacks \"kty\" or \"use\"")]
    IncompleteKey(usize),
    /// An `x509-svid` key without exactly one `x5c` certificate.
    #[error("x509-svid key {0} must carry exactly one certificate in \"x5c\"")]
    X5cCount(usize),
    /// A certificate that does not decode.
    #[error("key {0}: \"x5c\" is not base64 DER of an X.509 certificate")]
    BadCertificate(usize),
    /// PEM input without certificates, or with something else.
    #[error("PEM bundle: {0}")]
    Pem(String),
}

/// The CA certificates that SVIDs of one trust domain chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Bundle {
    /// Whose bundle it is (a bundle document itself does not say).
    pub trust_domain: TrustDomain,
    /// DER CA certificates.
    pub authorities: Vec<CertificateDer<'static>>,
    /// Increases with every change.
    pub sequence: u64,
    /// How often consumers should refetch.
    pub refresh_hint: Option<Duration>,
}

fn jwk_for(cert: &CertificateDer<'_>) -> Value {
    let mut jwk = Map::new();
    jwk.insert("use".into(), json!("x509-svid"));
    jwk.insert("x5c".into(), json!([STANDARD.encode(cert.as_ref())]));
    let parsed = X509Certificate::from_der(cert.as_ref()).ok();
    let key = parsed
        .as_ref()
        .and_then(|(_, c)| c.public_key().parsed().ok());
    match key {
        Some(PublicKey::EC(point)) if point.data().len() == 65 && point.data()[0] == 4 => {
            let (x, y) = point.data()[1..].split_at(32);
            jwk.insert("kty".into(), json!("EC"));
            jwk.insert("crv".into(), json!("P-256"));
            jwk.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(x)));
            jwk.insert("y".into(), json!(URL_SAFE_NO_PAD.encode(y)));
        }
        Some(PublicKey::RSA(rsa)) => {
            jwk.insert("kty".into(), json!("RSA"));
            jwk.insert("n".into(), json!(URL_SAFE_NO_PAD.encode(rsa.modulus)));
            jwk.insert("e".into(), json!(URL_SAFE_NO_PAD.encode(rsa.exponent)));
        }
        // Other key types: kty is required, x5c carries the key.
        _ => {
            jwk.insert("kty".into(), json!("EC"));
        }
    }
    Value::Object(jwk)
}

impl X509Bundle {
    /// The bundle in the SPIFFE format.
    pub fn to_jwks_json(&self) -> String {
        let mut doc = Map::new();
        doc.insert(
            "keys".into(),
            Value::Array(self.authorities.iter().map(jwk_for).collect()),
        );
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint.as_secs()));
        }
        Value::Object(doc).to_string()
    }

    /// Parses a SPIFFE-format bundle for `trust_domain`. Keys whose `use` is not `x509-svid`
    /// (JWT authorities, unknown uses) are skipped, as the specification requires.
    pub fn from_jwks_json(
        trust_domain: TrustDomain,
        json: &[u8],
    ) -> Result<X509Bundle, BundleError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let doc = doc
            .as_object()
            .ok_or_else(|| BundleError::Json("not an object".into()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::MissingKeys)?;
        let mut authorities = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let (Some(_kty), Some(usage)) = (
                key.get("kty").and_then(Value::as_str),
                key.get("use").and_then(Value::as_str),
            ) else {
                return Err(BundleError::IncompleteKey(i));
            };
            if usage != "x509-svid" {
                continue;
            }
            let x5c = key
                .get("x5c")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let [cert] = x5c else {
                return Err(BundleError::X5cCount(i));
            };
            let der = cert
                .as_str()
                .and_then(|b| STANDARD.decode(b).ok())
                .ok_or(BundleError::BadCertificate(i))?;
            if !matches!(X509Certificate::from_der(&der), Ok((rest, _)) if rest.is_empty()) {
                return Err(BundleError::BadCertificate(i));
            }
            authorities.push(CertificateDer::from(der));
        }
        Ok(X509Bundle {
            trust_domain,
            authorities,
            sequence: doc
                .get("spiffe_sequence")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            refresh_hint: doc
                .get("spiffe_refresh_hint")
                .and_then(Value::as_u64)
                .map(Duration::from_secs),
        })
    }

    /// The authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        self.authorities
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect()
    }

    /// Parses concatenated PEM certificates as the authorities of `trust_domain`.
    pub fn from_pem(trust_domain: TrustDomain, text: &str) -> Result<X509Bundle, BundleError> {
        let mut authorities = Vec::new();
        for cert in CertificateDer::pem_slice_iter(text.as_bytes()) {
            let cert = cert.map_err(|e| BundleError::Pem(e.to_string()))?;
            if !matches!(X509Certificate::from_der(cert.as_ref()), Ok((rest, _)) if rest.is_empty())
            {
                return Err(BundleError::Pem(format!(
                    "certificate {} is not valid X.509",
                    authorities.len()
                )));
            }
            authorities.push(cert);
        }
        if authorities.is_empty() {
            return Err(BundleError::Pem("no CERTIFICATE blocks found".into()));
        }
        Ok(X509Bundle {
            trust_domain,
            authorities,
            sequence: 0,
            refresh_hint: None,
        })
    }
}
