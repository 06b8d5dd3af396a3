//! Issuing SVIDs from CSRs, and rotation walked through with time passed in.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::{Duration, SystemTime};

use meshauth_ca::{AuthorityState, Ca, CaConfig, CaError, CaJournal, IssuedSvid, RotationEvent};
use meshauth_spiffe::{SpiffeId, SvidRejectReason, validate_x509_svid};

const HOUR: Duration = Duration::from_secs(3600);

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn config() -> CaConfig {
    CaConfig::new("td.test".parse().unwrap())
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn issue(ca: &Ca, at: SystemTime) -> IssuedSvid {
    ca.sign_csr(&csr(), &id("spiffe://td.test/web"), None, &[], at)
        .unwrap()
}

#[test]
fn signed_csr_validates_against_the_bundle() {
    let ca = Ca::new(config(), t0()).unwrap();
    let svid = ca
        .sign_csr(
            &csr(),
            &id("spiffe://td.test/web"),
            None,
            &["web.td.test".into()],
            t0(),
        )
        .unwrap();
    let v = validate_x509_svid(&svid.chain, &ca.bundle(t0()), t0()).unwrap();
    assert_eq!(v.spiffe_id, id("spiffe://td.test/web"));
    assert_eq!(v.serial, svid.serial);
    assert_eq!(svid.not_after, t0() + HOUR, "default TTL is one hour");
    // Backdated a few seconds for clock skew.
    assert!(
        validate_x509_svid(&svid.chain, &ca.bundle(t0()), t0() - Duration::from_secs(5)).is_ok()
    );
}

#[test]
fn csr_names_are_ignored() {
    let ca = Ca::new(config(), t0()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://td.test/admin".try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap();
    let svid = ca
        .sign_csr(csr.der(), &id("spiffe://td.test/web"), None, &[], t0())
        .unwrap();
    let v = validate_x509_svid(&svid.chain, &ca.bundle(t0()), t0()).unwrap();
    assert_eq!(
        v.spiffe_id,
        id("spiffe://td.test/web"),
        "the CSR's own URI SAN is not copied"
    );
}

#[test]
fn bad_csrs_and_ids_are_refused() {
    let ca = Ca::new(config(), t0()).unwrap();
    let mut tampered = csr();
    let n = tampered.len();
    tampered[n - 5] ^= 0xff; // inside the signature
    assert!(matches!(
        ca.sign_csr(&tampered, &id("spiffe://td.test/web"), None, &[], t0()),
        Err(CaError::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.sign_csr(b"junk", &id("spiffe://td.test/web"), None, &[], t0()),
        Err(CaError::InvalidCsr(_))
    ));
    assert!(matches!(
        ca.sign_csr(&csr(), &id("spiffe://other.test/web"), None, &[], t0()),
        Err(CaError::ForeignTrustDomain { .. })
    ));
    assert!(matches!(
        ca.sign_csr(&csr(), &id("spiffe://td.test"), None, &[], t0()),
        Err(CaError::NoPath(_))
    ));
    assert!(matches!(
        ca.sign_csr(
            &csr(),
            &id("spiffe://td.test/web"),
            None,
            &["bad name\n".into()],
            t0()
        ),
        Err(CaError::InvalidDnsName(_))
    ));
}

#[test]
fn svids_never_outlive_their_ca_and_serials_are_random() {
    let ca = Ca::new(config(), t0()).unwrap();
    let late = t0() + 23 * HOUR;
    let svid = ca
        .sign_csr(
            &csr(),
            &id("spiffe://td.test/web"),
            Some(10 * HOUR),
            &[],
            late,
        )
        .unwrap();
    let ca_end = ca.authorities()[0].not_after;
    assert_eq!(svid.not_after, ca_end);
    let serials: std::collections::HashSet<_> = (0..50).map(|_| issue(&ca, t0()).serial).collect();
    assert_eq!(serials.len(), 50);
    assert!(serials.iter().all(|s| s.len() == 32));
}

#[test]
fn rotation_prepared_active_old_with_continuous_validation() {
    let mut ca = Ca::new(config(), t0()).unwrap();
    let first_serial = ca.authorities()[0].serial.clone();
    let mut issued: Vec<IssuedSvid> = Vec::new();
    let mut events: Vec<(Duration, RotationEvent)> = Vec::new();
    // Walk a CA lifetime and a half in 10-minute steps.
    for step in 0..=216 {
        let now = t0() + Duration::from_secs(600 * step);
        for e in ca.tick(now).unwrap() {
            if matches!(e, RotationEvent::Activated { .. }) {
                let states: Vec<_> = ca.authorities().iter().map(|a| a.state).collect();
                assert_eq!(
                    states[states.len() - 2..],
                    [AuthorityState::Old, AuthorityState::Active]
                );
            }
            events.push((now.duration_since(t0()).unwrap(), e));
        }
        issued.push(issue(&ca, now));
        // Every SVID that has not expired validates against the bundle published now.
        let bundle = ca.bundle(now);
        for svid in &issued {
            match validate_x509_svid(&svid.chain, &bundle, now) {
                // X.509 validity includes its last second.
                Ok(_) => assert!(svid.not_after >= now),
                Err(e) => assert_eq!(e.reason(), SvidRejectReason::Expired, "at step {step}: {e}"),
            }
        }
    }
    let first = |want: fn(&RotationEvent) -> bool| events.iter().find(|(_, e)| want(e)).cloned();
    // Prepared at half of the first authority's life, activated 1/6 of its life before its
    // expiry, removed when it expired.
    let (at, _) = first(|e| matches!(e, RotationEvent::Prepared { .. })).expect("prepared");
    assert_eq!(at, 12 * HOUR);
    let (at, e) = first(|e| matches!(e, RotationEvent::Activated { .. })).expect("activated");
    assert_eq!(at, 20 * HOUR);
    assert!(!matches!(e, RotationEvent::Activated { ref serial } if *serial == first_serial));
    let (at, e) = first(|e| matches!(e, RotationEvent::Removed { .. })).expect("removed");
    assert_eq!(at, 24 * HOUR + Duration::from_secs(600));
    assert_eq!(
        e,
        RotationEvent::Removed {
            serial: first_serial
        }
    );
}

#[test]
fn bundle_sequence_grows_with_changes_only() {
    let mut ca = Ca::new(config(), t0()).unwrap();
    let s0 = ca.bundle(t0()).sequence;
    assert!(ca.tick(t0() + HOUR).unwrap().is_empty());
    assert_eq!(ca.bundle(t0() + HOUR).sequence, s0);
    assert!(!ca.tick(t0() + 13 * HOUR).unwrap().is_empty());
    let b = ca.bundle(t0() + 13 * HOUR);
    assert!(b.sequence > s0);
    assert_eq!(
        b.authorities.len(),
        2,
        "the prepared authority is published at once"
    );
}

#[test]
fn journal_round_trip_keeps_the_ca() {
    let mut ca = Ca::new(config(), t0()).unwrap();
    ca.tick(t0() + 13 * HOUR).unwrap();
    let svid = issue(&ca, t0() + 13 * HOUR);
    let json = serde_json::to_string(&ca.to_journal()).unwrap();
    let journal: CaJournal = serde_json::from_str(&json).unwrap();
    let restored = Ca::from_journal(config(), journal).unwrap();
    assert_eq!(restored.authorities(), ca.authorities());
    let now = t0() + 13 * HOUR;
    assert_eq!(restored.bundle(now), ca.bundle(now));
    validate_x509_svid(&svid.chain, &restored.bundle(now), now).unwrap();
    // The restored CA signs with the same authority.
    let again = issue(&restored, now);
    validate_x509_svid(&again.chain, &ca.bundle(now), now).unwrap();

    let other = CaConfig::new("other.test".parse().unwrap());
    let journal: CaJournal = serde_json::from_str(&json).unwrap();
    assert!(matches!(
        Ca::from_journal(other, journal),
        Err(CaError::Journal(_))
    ));
}

#[test]
fn ttls_that_cannot_be_signed_are_refused_without_panicking() {
    let ca = Ca::new(config(), t0()).unwrap();
    let sign =
        |ttl: Duration| ca.sign_csr(&csr(), &id("spiffe://td.test/web"), Some(ttl), &[], t0());
    for (ttl, why) in [
        (Duration::ZERO, "zero"),
        (Duration::from_millis(999), "under a second"),
        (Duration::from_secs(i64::MAX as u64), "i64::MAX seconds"),
        (Duration::from_secs(u64::MAX), "u64::MAX seconds"),
        (Duration::MAX, "Duration::MAX"),
    ] {
        let err = sign(ttl).expect_err(why);
        assert!(matches!(err, CaError::InvalidTtl { .. }), "{why}: {err:?}");
        assert!(err.to_string().contains("TTL"), "{why}: {err}");
    }
    // A TTL a clock can hold but a certificate cannot (31,000 years) is cut to the authority.
    let long = sign(Duration::from_secs(1_000_000_000_000)).unwrap();
    assert_eq!(long.not_after, ca.authorities()[0].not_after);
    // The shortest TTL signs.
    let short = sign(Duration::from_secs(1)).unwrap();
    assert_eq!(short.not_after, t0() + Duration::from_secs(1));
}

#[test]
fn ca_lifetimes_and_clocks_out_of_range_are_errors() {
    for ttl in [
        Duration::from_secs(20_000 * 365 * 24 * 3600),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ] {
        let err = Ca::new(config().with_ca_ttl(ttl), t0()).expect_err("no CA past year 9999");
        assert!(
            matches!(
                err,
                CaError::TimeOutOfRange { .. } | CaError::InvalidTtl { .. }
            ),
            "{err:?}"
        );
    }
    // Before the Unix epoch is a valid certificate time (years 0 to 9999).
    let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(24 * 3600);
    let ca = Ca::new(config(), before_epoch).unwrap();
    issue(&ca, before_epoch);
    // A clock past year 9999 is refused, not a panic in the certificate encoder.
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(8_100 * 365 * 24 * 3600 + 3600);
    assert!(matches!(
        Ca::new(config(), far),
        Err(CaError::TimeOutOfRange { .. })
    ));
    let err = ca
        .sign_csr(&csr(), &id("spiffe://td.test/web"), None, &[], far)
        .expect_err("the authority has expired by then");
    assert!(matches!(err, CaError::NoActiveAuthority), "{err:?}");
}

#[test]
fn dns_names_are_host_names() {
    let ca = Ca::new(config(), t0()).unwrap();
    for bad in ["10.0.0.1", "a_b.test", &format!("{}.test", "a".repeat(64))] {
        let err = ca
            .sign_csr(
                &csr(),
                &id("spiffe://td.test/web"),
                None,
                &[bad.to_owned()],
                t0(),
            )
            .expect_err(bad);
        assert!(matches!(err, CaError::InvalidDnsName(_)), "{bad}: {err:?}");
    }
    assert!(meshauth_ca::is_dns_name("web.td.test"));
    let at_limit = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(at_limit.len(), 253);
    assert!(meshauth_ca::is_dns_name(&at_limit));
    assert!(!meshauth_ca::is_dns_name(&format!("{at_limit}e")));
}

#[test]
fn after_an_outage_past_every_authority_the_new_one_is_reachable_from_the_old_bundle() {
    let ca_ttl = 24 * HOUR;
    let mut ca = Ca::new(config(), t0()).unwrap();
    // The last moment agents heard from the server: the prepared authority is in the bundle.
    let last_seen = t0() + 13 * HOUR;
    ca.tick(last_seen).unwrap();
    let agents_bundle = ca.bundle(last_seen);
    assert_eq!(agents_bundle.authorities.len(), 2, "active and prepared");
    // The server is back after every authority expired (the prepared one too).
    let back = last_seen + 2 * ca_ttl;
    let events = ca.tick(back).unwrap();
    let (fresh, by) = events
        .iter()
        .find_map(|e| match e {
            RotationEvent::Restarted {
                serial,
                cross_signed_by,
            } => Some((serial.clone(), cross_signed_by.clone())),
            _ => None,
        })
        .expect("a restart, named as such");
    let infos = ca.authorities();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].serial, fresh);
    assert_eq!(infos[0].state, AuthorityState::Active);
    // The cross-signer is the last one to expire: the prepared one agents held.
    let prepared = agents_bundle.authorities[1].clone();
    assert_eq!(
        meshauth_spiffe::serial_of(&prepared).unwrap(),
        by,
        "cross-signed by the authority that expired last"
    );
    let svid = issue(&ca, back);
    // An agent holding only the old bundle: the SVID alone does not verify...
    let err = validate_x509_svid(&svid.chain, &agents_bundle, back).unwrap_err();
    assert_eq!(err.reason(), SvidRejectReason::UnknownAuthority, "{err:?}");
    // ...with the continuity chain it does, and so it does under the new bundle.
    let continuity = ca.continuity_chain();
    assert_eq!(continuity.len(), 1);
    let mut chain = svid.chain.clone();
    chain.extend(continuity.clone());
    validate_x509_svid(&chain, &agents_bundle, back).expect("the old bundle reaches the new CA");
    validate_x509_svid(&chain, &ca.bundle(back), back).expect("and the new bundle still works");
    // A bundle of another CA that copied nothing of ours does not.
    let stranger = Ca::new(config(), last_seen).unwrap().bundle(last_seen);
    assert!(validate_x509_svid(&chain, &stranger, back).is_err());
    // Kept across restarts of the server; gone once the new authority is replaced.
    let journal: CaJournal =
        serde_json::from_str(&serde_json::to_string(&ca.to_journal()).unwrap()).unwrap();
    let restored = Ca::from_journal(config(), journal).unwrap();
    assert_eq!(restored.continuity_chain(), continuity);
    let mut later = restored;
    later.tick(back + ca_ttl).unwrap();
    assert!(later.continuity_chain().is_empty());
}
