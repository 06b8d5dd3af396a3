//! Real TLS 1.3 handshakes (in memory) between SVID holders: who is accepted and who is not.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::SystemTime;

use meshauth_ca::{Ca, CaConfig};
use meshauth_tls::{
    ClientAuth, PeerPolicy, SharedBundle, SharedCertifiedKey, client_config, peer_spiffe_id,
    server_config,
};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};

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
