//! Real TLS 1.3 handshakes (in memory) between SVID holders: who is accepted and who is not,
//! and what each side learns when a handshake fails.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::SystemTime;

use meshauth_ca::{Ca, CaConfig};
use meshauth_tls::{
    ClientAuth, HandshakeFailure, PeerPolicy, SharedBundle, SharedCertifiedKey, client_config,
    peer_spiffe_id, server_config,
};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConnection, ServerConnection};

fn svid(ca: &Ca, id: &str) -> SharedCertifiedKey {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .sign_csr(
            csr.der(),
            &id.parse().unwrap(),
            None,
            &[],
            SystemTime::now(),
        )
        .unwrap();
    SharedCertifiedKey::new(
        issued.chain,
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap()
}

fn ca(td: &str) -> Ca {
    Ca::new(CaConfig::new(td.parse().unwrap()), SystemTime::now()).unwrap()
}

/// Runs a handshake; returns the server's view of the client's ID, or the first error.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<Option<String>, rustls::Error> {
    let mut c =
        ClientConnection::new(Arc::new(client), ServerName::try_from("peer").unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets()?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // Let the server see the client's final flight.
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            return Ok(peer_spiffe_id(s.peer_certificates()).map(|id| id.to_string()));
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn mutual_authentication_with_exact_ids() {
    let ca = ca("td.test");
    let bundle = SharedBundle::new(ca.bundle(SystemTime::now()));
    let a = svid(&ca, "spiffe://td.test/identity/100");
    let b = svid(&ca, "spiffe://td.test/identity/200");
    let exact = |s: &str| PeerPolicy::Exact(s.parse().unwrap());
    let client = client_config(
        Some(a.clone()),
        bundle.clone(),
        exact("spiffe://td.test/identity/200"),
        &[],
    )
    .unwrap();
    let server = server_config(
        b.clone(),
        bundle.clone(),
        exact("spiffe://td.test/identity/100"),
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    assert_eq!(
        handshake(client, server).unwrap().as_deref(),
        Some("spiffe://td.test/identity/100")
    );

    // The client expects someone else: refused.
    let client = client_config(
        Some(a.clone()),
        bundle.clone(),
        exact("spiffe://td.test/identity/300"),
        &[],
    )
    .unwrap();
    let server = server_config(
        b.clone(),
        bundle.clone(),
        PeerPolicy::AnyInTrustDomain,
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    assert!(handshake(client, server).is_err());

    // The server expects someone else: refused.
    let client = client_config(Some(a), bundle.clone(), PeerPolicy::AnyInTrustDomain, &[]).unwrap();
    let server = server_config(
        b,
        bundle,
        exact("spiffe://td.test/identity/300"),
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    assert!(handshake(client, server).is_err());
}

#[test]
fn other_trust_domains_and_missing_client_certs() {
    let ours = ca("td.test");
    let theirs = ca("other.test");
    let bundle = SharedBundle::new(ours.bundle(SystemTime::now()));
    let server_svid = svid(&ours, "spiffe://td.test/meshauth/server");
    let intruder = svid(&theirs, "spiffe://other.test/node/n1");

    let client = client_config(
        Some(intruder),
        bundle.clone(),
        PeerPolicy::AnyInTrustDomain,
        &[],
    )
    .unwrap();
    let server = server_config(
        server_svid.clone(),
        bundle.clone(),
        PeerPolicy::AnyInTrustDomain,
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    assert!(
        handshake(client, server).is_err(),
        "a certificate of another trust domain is refused"
    );

    let anonymous = client_config(None, bundle.clone(), PeerPolicy::AnyInTrustDomain, &[]).unwrap();
    let optional = server_config(
        server_svid.clone(),
        bundle.clone(),
        PeerPolicy::AnyInTrustDomain,
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    assert_eq!(handshake(anonymous.clone(), optional).unwrap(), None);
    let required = server_config(
        server_svid,
        bundle,
        PeerPolicy::AnyInTrustDomain,
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    assert!(handshake(anonymous, required).is_err());
}

#[test]
fn bundle_swaps_take_effect_at_once() {
    let old = ca("td.test");
    let new = ca("td.test");
    let bundle = SharedBundle::new(old.bundle(SystemTime::now()));
    let server_svid = svid(&new, "spiffe://td.test/meshauth/server");
    let client = client_config(None, bundle.clone(), PeerPolicy::AnyInTrustDomain, &[]).unwrap();
    let server = server_config(
        server_svid,
        bundle.clone(),
        PeerPolicy::AnyInTrustDomain,
        ClientAuth::Optional,
        &[],
    )
    .unwrap();
    assert!(
        handshake(client.clone(), server.clone()).is_err(),
        "unknown authority before the swap"
    );
    bundle.set(new.bundle(SystemTime::now()));
    assert!(
        handshake(client, server).is_ok(),
        "trusted after the swap, with the same configs"
    );
}

/// Runs a handshake that fails; returns what each side saw, as [`HandshakeFailure`]s. The side
/// that refuses sends an alert, which the other side reads.
fn failed_handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> (Option<HandshakeFailure>, Option<HandshakeFailure>) {
    let mut c = rustls::Connection::from(
        ClientConnection::new(Arc::new(client), ServerName::try_from("peer").unwrap()).unwrap(),
    );
    let mut s = rustls::Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
    let (mut client_saw, mut server_saw) = (None, None);
    let pump = |from: &mut rustls::Connection, to: &mut rustls::Connection| {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            if to.read_tls(&mut rd).is_err() {
                break;
            }
        }
    };
    for _ in 0..10 {
        pump(&mut c, &mut s);
        if server_saw.is_none() {
            server_saw = s.process_new_packets().err();
        }
        pump(&mut s, &mut c);
        if client_saw.is_none() {
            client_saw = c.process_new_packets().err();
        }
        if client_saw.is_some() && server_saw.is_some() {
            break;
        }
    }
    assert!(
        client_saw.is_some() || server_saw.is_some(),
        "the handshake should fail"
    );
    if let Some(e) = client_saw.as_ref().or(server_saw.as_ref()) {
        let text = e.to_string();
        assert!(!text.contains('{'), "rustls prints a sentence: {text}");
    }
    (
        client_saw.map(|e| HandshakeFailure::from_rustls(&e)),
        server_saw.map(|e| HandshakeFailure::from_rustls(&e)),
    )
}

#[test]
fn each_side_learns_why_a_handshake_failed() {
    let ours = ca("td.test");
    let theirs = ca("other.test");
    let impostor = ca("td.test");
    let bundle = SharedBundle::new(ours.bundle(SystemTime::now()));
    let server_id = "spiffe://td.test/meshauth/server";
    let exact = |s: &str| PeerPolicy::Exact(s.parse().unwrap());
    let dial = |own: Option<SharedCertifiedKey>, want: &str| {
        client_config(own, bundle.clone(), exact(want), &[]).unwrap()
    };
    let serve = |own: SharedCertifiedKey, auth: ClientAuth| {
        server_config(own, bundle.clone(), PeerPolicy::AnyInTrustDomain, auth, &[]).unwrap()
    };

    // A server of another trust domain: the client can tell which one.
    let (client_saw, server_saw) = failed_handshake(
        dial(None, server_id),
        serve(
            svid(&theirs, "spiffe://other.test/meshauth/server"),
            ClientAuth::Optional,
        ),
    );
    match client_saw {
        Some(HandshakeFailure::WrongTrustDomain { peer_id, expected }) => {
            assert_eq!(peer_id.to_string(), "spiffe://other.test/meshauth/server");
            assert_eq!(expected, "td.test");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server_saw,
        Some(HandshakeFailure::Refused(
            AlertDescription::CertificateUnknown
        ))
    );

    // A server whose CA is not in the bundle: unknown issuer, and the server hears unknown_ca.
    let (client_saw, server_saw) = failed_handshake(
        dial(None, server_id),
        serve(svid(&impostor, server_id), ClientAuth::Optional),
    );
    assert_eq!(client_saw, Some(HandshakeFailure::UnknownIssuer));
    assert_eq!(
        server_saw,
        Some(HandshakeFailure::Refused(AlertDescription::UnknownCA))
    );

    // A valid SVID with another ID than the one expected: access denied.
    let (client_saw, server_saw) = failed_handshake(
        dial(None, "spiffe://td.test/identity/7"),
        serve(svid(&ours, server_id), ClientAuth::Optional),
    );
    assert_eq!(client_saw, Some(HandshakeFailure::IdNotAccepted));
    assert_eq!(
        server_saw,
        Some(HandshakeFailure::Refused(AlertDescription::AccessDenied))
    );

    // The server refuses a client of another trust domain; the client hears why.
    let (client_saw, server_saw) = failed_handshake(
        dial(
            Some(svid(&theirs, "spiffe://other.test/node/n1")),
            server_id,
        ),
        serve(svid(&ours, server_id), ClientAuth::Required),
    );
    assert!(
        matches!(&server_saw, Some(HandshakeFailure::WrongTrustDomain { peer_id, .. })
            if peer_id.trust_domain().as_str() == "other.test"),
        "{server_saw:?}"
    );
    assert_eq!(
        client_saw,
        Some(HandshakeFailure::Refused(
            AlertDescription::CertificateUnknown
        ))
    );
}

#[test]
fn expired_and_not_yet_valid_svids_map_to_rustls_variants() {
    use rustls::CertificateError;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::UnixTime;

    let ours = ca("td.test");
    let bundle = SharedBundle::new(ours.bundle(SystemTime::now()));
    let server = svid(&ours, "spiffe://td.test/meshauth/server").get();
    let verifier = meshauth_tls::SpiffeServerVerifier::new(bundle, PeerPolicy::AnyInTrustDomain);
    let at = |secs_from_now: i64| {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now.saturating_add_signed(secs_from_now),
        ))
    };
    let verify = |now| {
        verifier.verify_server_cert(
            &server.cert[0],
            &server.cert[1..],
            &ServerName::try_from("peer").unwrap(),
            &[],
            now,
        )
    };
    assert!(verify(at(0)).is_ok());

    let err = verify(at(30 * 24 * 3600)).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        HandshakeFailure::from_rustls(&err),
        HandshakeFailure::Expired
    );

    let err = verify(at(-24 * 3600)).unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
    );
    assert_eq!(
        HandshakeFailure::from_rustls(&err),
        HandshakeFailure::NotYetValid
    );
}
