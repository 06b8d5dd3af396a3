//! One signing authority: a self-signed ECDSA P-256 root and its key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_spiffe::SpiffeId;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::{AuthorityState, CaConfig, CaError, IssuedSvid};

pub(crate) struct Authority {
    pub(crate) state: AuthorityState,
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// A random positive serial of 128 bits (RFC 5280 allows up to 20 octets).
fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero octet, so the hex form is stable
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

fn uri(id: &str) -> Result<SanType, CaError> {
    Ok(SanType::URI(id.try_into().map_err(gen_err)?))
}

/// `t` as a certificate time, or [`CaError::TimeOutOfRange`] when a certificate cannot carry
/// it: X.509 writes years 0 to 9999 (and the encoder panics outside them), so anything else is
/// refused here rather than converted with `OffsetDateTime::from`, which panics too.
pub(crate) fn to_time(what: &'static str, t: SystemTime) -> Result<time::OffsetDateTime, CaError> {
    let nanos = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).ok(),
        Err(before) => i128::try_from(before.duration().as_nanos())
            .ok()
            .map(|n| -n),
    };
    nanos
        .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .filter(|dt| (0..=9999).contains(&dt.year()))
        .ok_or(CaError::TimeOutOfRange { what })
}

/// `now + ttl`, or the error saying that this TTL reaches past what a clock can represent.
fn expiry(now: SystemTime, ttl: Duration) -> Result<SystemTime, CaError> {
    now.checked_add(ttl).ok_or(CaError::InvalidTtl {
        secs: ttl.as_secs(),
        why: "it reaches past the latest time this system can represent",
    })
}

/// What an authority's certificate says, but its serial and validity: its subject (one per
/// authority, from its serial `serial`), CA constraints, usages and trust domain URI.
fn authority_params(config: &CaConfig, serial: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "meshauth");
    // A subject per authority keeps path building unambiguous during rotation.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("meshauth CA {}", serial.get(..16).unwrap_or(serial)),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri(&config.trust_domain.id_string())?];
    Ok(params)
}

impl Authority {
    pub(crate) fn generate(
        config: &CaConfig,
        state: AuthorityState,
        now: SystemTime,
    ) -> Result<Authority, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let (serial_number, serial) = random_serial();
        let not_before = now.checked_sub(config.backdate).unwrap_or(now);
        let not_after = expiry(now, config.ca_ttl)?;
        let mut params = authority_params(config, &serial)?;
        params.serial_number = Some(serial_number);
        params.not_before = to_time("the CA's NotBefore", not_before)?;
        params.not_after = to_time("the CA's expiry (now + the CA TTL)", not_after)?;
        let cert = params.self_signed(&key).map_err(gen_err)?.der().clone();
        Self::from_parts(state, cert, key)
    }

    pub(crate) fn from_parts(
        state: AuthorityState,
        cert: CertificateDer<'static>,
        key: KeyPair,
    ) -> Result<Authority, CaError> {
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert)
            .map_err(|e| CaError::Journal(format!("authority certificate: {e}")))?;
        // X.509 times are years 0 to 9999, well inside what `SystemTime` holds on Linux; the
        // checked form keeps a hand-edited journal from panicking anyway.
        let secs = |t: i64| {
            UNIX_EPOCH
                .checked_add(Duration::from_secs(u64::try_from(t).unwrap_or(0)))
                .ok_or_else(|| CaError::Journal(format!("authority validity {t} out of range")))
        };
        let not_before = secs(parsed.validity().not_before.timestamp())?;
        let not_after = secs(parsed.validity().not_after.timestamp())?;
        let serial = parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(gen_err)?;
        Ok(Authority {
            state,
            cert,
            issuer,
            serial,
            not_before,
            not_after,
        })
    }

    /// A certificate of `successor` (its subject, key and expiry) issued by this authority:
    /// a client that trusts only this authority (its key: path validation does not check a
    /// trust anchor's own validity) accepts chains of the successor through it.
    pub(crate) fn cross_sign(
        &self,
        config: &CaConfig,
        successor: &Authority,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let backdate = config.backdate;
        let mut params = authority_params(config, &successor.serial)?;
        let (serial_number, _) = random_serial();
        params.serial_number = Some(serial_number);
        params.not_before = to_time(
            "the cross-certificate's NotBefore",
            now.checked_sub(backdate).unwrap_or(now),
        )?;
        params.not_after = to_time("the cross-certificate's expiry", successor.not_after)?;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(successor.issuer.key(), &self.issuer)
            .map_err(gen_err)?;
        Ok(cert.der().clone())
    }

    pub(crate) fn sign_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        now: SystemTime,
        backdate: Duration,
    ) -> Result<IssuedSvid, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::InvalidCsr(e.to_string()))?;
        if ttl.as_secs() == 0 {
            return Err(CaError::InvalidTtl {
                secs: 0,
                why: "an SVID must live at least one second",
            });
        }
        let not_after = expiry(now, ttl)?.min(self.not_after);
        let (serial_number, serial) = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshauth");
        params.serial_number = Some(serial_number);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![uri(&spiffe_id.to_string())?];
        for name in dns_names {
            if !is_dns_name(name) {
                return Err(CaError::InvalidDnsName(name.clone()));
            }
            let dns = name
                .as_str()
                .try_into()
                .map_err(|_| CaError::InvalidDnsName(name.clone()))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_time(
            "the SVID's NotBefore (now - backdate)",
            now.checked_sub(backdate)
                .unwrap_or(now)
                .max(self.not_before),
        )?;
        params.not_after = to_time("the SVID's expiry", not_after)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(gen_err)?;
        Ok(IssuedSvid {
            chain: vec![cert.der().clone()],
            spiffe_id: spiffe_id.clone(),
            serial,
            // X.509 times have whole seconds; truncating never overflows, the fallback is moot.
            not_after: not_after
                .duration_since(UNIX_EPOCH)
                .ok()
                .and_then(|d| UNIX_EPOCH.checked_add(Duration::from_secs(d.as_secs())))
                .unwrap_or(not_after),
        })
    }
}

/// Whether `name` may be a DNS SAN: an RFC 1123 host name of letters, digits and hyphens in
/// dot-separated labels of 1 to 63 characters, no label starting or ending with a hyphen, at
/// most 253 characters in all, optionally behind one leading `*.` wildcard. IP addresses are
/// not host names (they would need an IP SAN): an all-numeric last label is refused.
pub fn is_dns_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && name.len() <= 253
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dns_names() {
        for ok in [
            "web",
            "web.td.test",
            "*.td.test",
            "a-b.c1",
            "1a.b2",
            "0.web",
        ] {
            assert!(super::is_dns_name(ok), "{ok}");
        }
        for bad in [
            "", "bad name", "a..b", "-a.b", "a-.b", "a.b.", "*", "a_b", "é.test", "10.0.0.1",
            "*.1", "123", "*.*.a", "a.*.b",
        ] {
            assert!(!super::is_dns_name(bad), "{bad:?}");
        }
    }
}
