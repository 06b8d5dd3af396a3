//! Every X509-SVID rule, each with a certificate built to break exactly that rule.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::{Duration, SystemTime};

use meshauth_spiffe::{
    SvidRejectReason, X509Bundle, not_after_of, spiffe_id_of, validate_x509_svid,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

const DAY: Duration = Duration::from_secs(86_400);

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, td: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
    p
}

fn root(td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params("root", td);
    let cert = params.self_signed(&key).unwrap().der().clone();
    Ca {
        cert,
        issuer: Issuer::new(params, key),
    }
}

fn intermediate(parent: &Ca, td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params("intermediate", td);
    let cert = params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .clone();
    Ca {
        cert,
        issuer: Issuer::new(params, key),
    }
}

fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::hours(1);
    p
}

fn sign(params: &CertificateParams, ca: &Ca) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &ca.issuer).unwrap().der().clone()
}

fn bundle(td: &str, cas: &[&Ca]) -> X509Bundle {
    X509Bundle {
        trust_domain: td.parse().unwrap(),
        authorities: cas.iter().map(|c| c.cert.clone()).collect(),
        sequence: 1,
        refresh_hint: None,
    }
}

fn reject(chain: &[CertificateDer<'static>], b: &X509Bundle) -> SvidRejectReason {
    validate_x509_svid(chain, b, SystemTime::now())
        .expect_err("must be rejected")
        .reason()
}

#[test]
fn valid_leaf_and_intermediate_chain() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let leaf = sign(&leaf_params(&["spiffe://td.test/web"]), &ca);
    let v = validate_x509_svid(&[leaf], &b, SystemTime::now()).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://td.test/web");
    assert!(v.not_after > SystemTime::now());
    assert!(!v.serial.is_empty());

    let mid = intermediate(&ca, "td.test");
    let leaf = sign(&leaf_params(&["spiffe://td.test/db"]), &mid);
    validate_x509_svid(&[leaf.clone(), mid.cert.clone()], &b, SystemTime::now())
        .expect("leaf + intermediate chains to the root");
    // Without the intermediate the path cannot be built.
    assert_eq!(reject(&[leaf], &b), SvidRejectReason::UnknownAuthority);
}

#[test]
fn uri_san_rules() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let two = sign(
        &leaf_params(&["spiffe://td.test/a", "spiffe://td.test/b"]),
        &ca,
    );
    assert_eq!(reject(&[two], &b), SvidRejectReason::UriSanCount);
    let mut none = leaf_params(&[]);
    none.subject_alt_names = vec![SanType::DnsName("web.td.test".try_into().unwrap())];
    assert_eq!(
        reject(&[sign(&none, &ca)], &b),
        SvidRejectReason::UriSanCount
    );
    let http = sign(&leaf_params(&["https://td.test/web"]), &ca);
    assert_eq!(reject(&[http], &b), SvidRejectReason::NotSpiffeId);
    let root_id = sign(&leaf_params(&["spiffe://td.test"]), &ca);
    assert_eq!(reject(&[root_id], &b), SvidRejectReason::NotSpiffeId);
    // DNS SANs beside the one URI SAN are allowed.
    let mut with_dns = leaf_params(&["spiffe://td.test/web"]);
    with_dns
        .subject_alt_names
        .push(SanType::DnsName("web.td.test".try_into().unwrap()));
    validate_x509_svid(&[sign(&with_dns, &ca)], &b, SystemTime::now()).unwrap();
}

#[test]
fn leaf_must_not_be_a_ca() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let mut p = leaf_params(&["spiffe://td.test/web"]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    assert_eq!(reject(&[sign(&p, &ca)], &b), SvidRejectReason::LeafIsCa);
}

#[test]
fn key_usage_rules() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let mut missing_ds = leaf_params(&["spiffe://td.test/web"]);
    missing_ds.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert_eq!(
        reject(&[sign(&missing_ds, &ca)], &b),
        SvidRejectReason::KeyUsage
    );
    let mut cert_sign = leaf_params(&["spiffe://td.test/web"]);
    cert_sign.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    assert_eq!(
        reject(&[sign(&cert_sign, &ca)], &b),
        SvidRejectReason::KeyUsage
    );
    let mut crl_sign = leaf_params(&["spiffe://td.test/web"]);
    crl_sign.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    assert_eq!(
        reject(&[sign(&crl_sign, &ca)], &b),
        SvidRejectReason::KeyUsage
    );
    let mut absent = leaf_params(&["spiffe://td.test/web"]);
    absent.key_usages = vec![];
    assert_eq!(
        reject(&[sign(&absent, &ca)], &b),
        SvidRejectReason::KeyUsage
    );
}

#[test]
fn trust_domain_and_authority() {
    let ca = root("td.test");
    let other = root("other.test");
    let leaf = sign(&leaf_params(&["spiffe://other.test/web"]), &other);
    // Validated against our bundle: the trust domain is checked first.
    assert_eq!(
        reject(std::slice::from_ref(&leaf), &bundle("td.test", &[&ca])),
        SvidRejectReason::WrongTrustDomain
    );
    // Right trust domain, unknown root.
    let forged = sign(&leaf_params(&["spiffe://td.test/web"]), &other);
    assert_eq!(
        reject(&[forged], &bundle("td.test", &[&ca])),
        SvidRejectReason::UnknownAuthority
    );
    // Several authorities (rotation): either one works.
    let b = bundle("td.test", &[&other, &ca]);
    validate_x509_svid(
        &[sign(&leaf_params(&["spiffe://td.test/web"]), &ca)],
        &b,
        SystemTime::now(),
    )
    .unwrap();
}

#[test]
fn validity_period() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let leaf = sign(&leaf_params(&["spiffe://td.test/web"]), &ca);
    let later = SystemTime::now() + 2 * DAY;
    assert_eq!(
        validate_x509_svid(std::slice::from_ref(&leaf), &b, later)
            .unwrap_err()
            .reason(),
        SvidRejectReason::Expired
    );
    let earlier = SystemTime::now() - DAY / 4;
    assert_eq!(
        validate_x509_svid(&[leaf], &b, earlier)
            .unwrap_err()
            .reason(),
        SvidRejectReason::NotYetValid
    );
}

#[test]
fn extra_leaf_in_the_presented_chain() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let leaf = sign(&leaf_params(&["spiffe://td.test/web"]), &ca);
    let other_leaf = sign(&leaf_params(&["spiffe://td.test/db"]), &ca);
    assert_eq!(
        reject(&[leaf, other_leaf], &b),
        SvidRejectReason::ExtraLeafInChain
    );
}

#[test]
fn garbage_is_rejected_not_panicked_on() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    assert_eq!(reject(&[], &b), SvidRejectReason::EmptyChain);
    for junk in [
        vec![],
        vec![0u8; 10],
        vec![0x30, 0x82, 0xff, 0xff],
        b"not a cert".to_vec(),
    ] {
        assert_eq!(
            reject(&[CertificateDer::from(junk)], &b),
            SvidRejectReason::MalformedCertificate
        );
    }
}

#[test]
fn readers_of_a_verified_leaf_agree_with_validation() {
    let ca = root("td.test");
    let b = bundle("td.test", &[&ca]);
    let mut params = leaf_params(&["spiffe://td.test/web"]);
    let expiry = time::OffsetDateTime::from_unix_timestamp(4_102_444_800).unwrap();
    params.not_after = expiry;
    let leaf = sign(&params, &ca);
    let v = validate_x509_svid(std::slice::from_ref(&leaf), &b, SystemTime::now()).unwrap();
    let read = not_after_of(&leaf).unwrap();
    assert_eq!(read, v.not_after);
    assert_eq!(
        read,
        SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800)
    );
    assert_eq!(spiffe_id_of(&leaf).unwrap(), v.spiffe_id);
    let junk = CertificateDer::from(b"not a cert".to_vec());
    assert_eq!(
        not_after_of(&junk).unwrap_err().reason(),
        SvidRejectReason::MalformedCertificate
    );
}
