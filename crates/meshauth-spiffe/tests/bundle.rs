//! Bundles in the SPIFFE format and as PEM: round trips and the rules for reading them.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use meshauth_spiffe::{BundleError, X509Bundle};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;

fn ca() -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.self_signed(&key).unwrap().der().clone()
}

fn bundle() -> X509Bundle {
    X509Bundle {
        trust_domain: "td.test".parse().unwrap(),
        authorities: vec![ca(), ca()],
        sequence: 7,
        refresh_hint: Some(Duration::from_secs(300)),
    }
}

#[test]
fn jwks_round_trip_and_shape() {
    let b = bundle();
    let json = b.to_jwks_json();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["spiffe_sequence"], 7);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let key = &doc["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert!(key.get("kid").is_none());
    assert_eq!(key["x5c"].as_array().unwrap().len(), 1);
    let back = X509Bundle::from_jwks_json("td.test".parse().unwrap(), json.as_bytes()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn jwks_rules() {
    let td = || "td.test".parse().unwrap();
    let parse = |s: &str| X509Bundle::from_jwks_json(td(), s.as_bytes());
    assert!(matches!(parse("[]"), Err(BundleError::Json(_))));
    assert!(matches!(parse("{"), Err(BundleError::Json(_))));
    assert!(matches!(parse("{}"), Err(BundleError::MissingKeys)));
    assert!(matches!(
        parse(r#"{"keys":[{"use":"x509-svid"}]}"#),
        Err(BundleError::IncompleteKey(0))
    ));
    assert!(matches!(
        parse(r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#),
        Err(BundleError::X5cCount(0))
    ));
    assert!(matches!(
        parse(r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AAAA"]}]}"#),
        Err(BundleError::BadCertificate(0))
    ));
    // Empty keys: every authority revoked.
    assert!(parse(r#"{"keys":[]}"#).unwrap().authorities.is_empty());
    // JWT keys and unknown uses are skipped; `use` is case-sensitive.
    let b = parse(r#"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"a"},{"kty":"EC","use":"X509-SVID","x5c":[]}]}"#)
        .unwrap();
    assert!(b.authorities.is_empty());
}

#[test]
fn pem_round_trip() {
    let b = bundle();
    let pem = b.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    let back = X509Bundle::from_pem("td.test".parse().unwrap(), &pem).unwrap();
    assert_eq!(back.authorities, b.authorities);
    assert!(X509Bundle::from_pem("td.test".parse().unwrap(), "").is_err());
    assert!(
        X509Bundle::from_pem(
            "td.test".parse().unwrap(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        .is_err()
    );
}
