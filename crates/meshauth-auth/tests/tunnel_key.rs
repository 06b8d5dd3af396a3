//! Real TLS 1.3 key exchanges between node agents over loopback (127.0.0.1, .2 and .3 play
//! nodes n1, n2 and n3): both sides derive the same pre-shared key from the exporter, and every
//! refusal has its reason, attacked with real node SVIDs of the same CA.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshauth_auth::Timeouts;
use meshauth_auth::tunnel_key::{
    ExchangeReason, KeyExchange, KeyHook, PairKey, RekeyHook, TunnelPeer, TunnelPeers,
};
use meshauth_ca::{Ca, CaConfig};
use meshauth_policy::{NodeId, TunnelKey};
use meshauth_tls::{SharedBundle, SharedCertifiedKey};
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::mpsc;

const TD: &str = "mesh.test";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(n: u8) -> TunnelKey {
    TunnelKey::new([n; 32])
}

/// n1 at 127.0.0.1 (key 1), n2 at .2 (key 2), n3 at .3 (key 3).
fn peer(n: u8) -> TunnelPeer {
    TunnelPeer {
        name: format!("n{n}"),
        node: NodeId::new(u32::from(n)),
        address: ip(&format!("127.0.0.{n}")),
        key: key(n),
    }
}

struct Registry(HashMap<IpAddr, TunnelPeer>);

impl TunnelPeers for Registry {
    fn peer_at(&self, addr: IpAddr) -> Option<TunnelPeer> {
        self.0.get(&addr).cloned()
    }
}

fn registry(peers: &[TunnelPeer]) -> Arc<Registry> {
    Arc::new(Registry(
        peers.iter().map(|p| (p.address, p.clone())).collect(),
    ))
}

fn node_svid(ca: &Ca, spiffe_id: &str) -> (SharedCertifiedKey, SystemTime) {
    let now = SystemTime::now();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .sign_csr(
            csr.der(),
            &spiffe_id.parse().unwrap(),
            Some(Duration::from_secs(600)),
            &[],
            now,
        )
        .unwrap();
    (
        SharedCertifiedKey::new(
            issued.chain,
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap(),
        issued.not_after,
    )
}

fn exchanger(
    ca: &Ca,
    spiffe_id: &str,
    name: &str,
    own: TunnelKey,
    view: &[TunnelPeer],
) -> KeyExchange {
    let (svid, expiry) = node_svid(ca, spiffe_id);
    KeyExchange::new(
        TD.parse().unwrap(),
        SharedBundle::new(ca.bundle(SystemTime::now())),
        svid,
        Arc::new(move || expiry),
        name.into(),
        own,
        registry(view),
        Timeouts::default(),
    )
}

struct Responder {
    port: u16,
    installed: Arc<Mutex<Vec<PairKey>>>,
    rekeys: Arc<Mutex<Vec<TunnelPeer>>>,
    failed: mpsc::Receiver<ExchangeReason>,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// n2's responder on 127.0.0.2, whose registry view holds `view`.
async fn responder(ca: &Ca, view: &[TunnelPeer]) -> Responder {
    responder_as(ca, 2, view).await
}

/// Node `n`'s responder on 127.0.0.`n`.
async fn responder_as(ca: &Ca, n: u8, view: &[TunnelPeer]) -> Responder {
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.{n}:0"))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let ex = exchanger(
        ca,
        &format!("spiffe://mesh.test/node/n{n}"),
        &format!("n{n}"),
        key(n),
        view,
    );
    let rekeys = Arc::new(Mutex::new(Vec::new()));
    let asked = Arc::clone(&rekeys);
    let rekey: RekeyHook = Arc::new(move |p: &TunnelPeer| asked.lock().unwrap().push(p.clone()));
    let installed = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&installed);
    let hook: KeyHook = Arc::new(move |k: &PairKey| {
        sink.lock().unwrap().push(k.clone());
        true
    });
    let (ftx, failed) = mpsc::channel(8);
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(ex.serve(listener, hook, rekey, ftx, rx));
    Responder {
        port,
        installed,
        rekeys,
        failed,
        _stop: stop,
    }
}

async fn next_failure(rx: &mut mpsc::Receiver<ExchangeReason>) -> ExchangeReason {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

fn ca() -> Ca {
    Ca::new(CaConfig::new(TD.parse().unwrap()), SystemTime::now()).unwrap()
}

#[tokio::test]
async fn both_nodes_derive_the_same_key_and_a_new_one_each_time() {
    let ca = ca();
    let mut r = responder(&ca, &[peer(1), peer(2)]).await;
    let n1 = exchanger(
        &ca,
        "spiffe://mesh.test/node/n1",
        "n1",
        key(1),
        &[peer(1), peer(2)],
    );
    let first = n1
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap();
    let second = n1
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap();
    let installed = r.installed.lock().unwrap().clone();
    assert_eq!(installed.len(), 2);
    assert_eq!(installed[0].psk, first.psk, "both sides hold the same key");
    assert_eq!(installed[1].psk, second.psk);
    assert_ne!(first.psk, second.psk, "every exchange derives a fresh key");
    assert_ne!(first.psk, [0u8; 32]);
    assert_eq!(installed[0].peer, peer(1));
    assert_eq!(first.peer, peer(2));
    assert!(first.expires > SystemTime::now());
    assert!(r.failed.try_recv().is_err());
}

#[tokio::test]
async fn another_nodes_real_svid_from_its_address_is_refused() {
    // n3 holds a real node SVID of the same CA and dials from n1's address, claiming to be
    // n1 by the keys it names: the registry binds 127.0.0.1 to n1, not n3.
    let ca = ca();
    let mut r = responder(&ca, &[peer(1), peer(2), peer(3)]).await;
    let n3 = exchanger(&ca, "spiffe://mesh.test/node/n3", "n1", key(1), &[peer(2)]);
    let err = n3
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ExchangeReason::UnknownNode);
    assert_eq!(
        next_failure(&mut r.failed).await,
        ExchangeReason::UnknownNode
    );
    assert!(r.installed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn keys_other_than_the_registrys_are_refused() {
    // n1 names a WireGuard key the registry does not hold for it (a stolen or stale one).
    let ca = ca();
    let mut r = responder(&ca, &[peer(1), peer(2)]).await;
    let n1 = exchanger(&ca, "spiffe://mesh.test/node/n1", "n1", key(9), &[peer(2)]);
    let err = n1
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ExchangeReason::KeyMismatch);
    assert_eq!(
        next_failure(&mut r.failed).await,
        ExchangeReason::KeyMismatch
    );
    assert!(r.installed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_node_that_published_no_key_is_refused() {
    let ca = ca();
    let mut r = responder(&ca, &[peer(2)]).await;
    let n1 = exchanger(&ca, "spiffe://mesh.test/node/n1", "n1", key(1), &[peer(2)]);
    let err = n1
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ExchangeReason::UnknownNode);
    assert_eq!(
        next_failure(&mut r.failed).await,
        ExchangeReason::UnknownNode
    );
}

#[tokio::test]
async fn a_workload_svid_is_no_node_svid() {
    let ca = ca();
    let mut r = responder(&ca, &[peer(1), peer(2)]).await;
    let w = exchanger(
        &ca,
        "spiffe://mesh.test/identity/100",
        "n1",
        key(1),
        &[peer(2)],
    );
    let err = w
        .initiate(&peer(2), r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.reason,
            ExchangeReason::PeerCertificateRejected | ExchangeReason::Io
        ),
        "{err}"
    );
    assert_eq!(
        next_failure(&mut r.failed).await,
        ExchangeReason::PeerCertificateRejected
    );
    assert!(r.installed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn only_the_node_that_sorts_first_initiates() {
    let ca = ca();
    let n3 = exchanger(&ca, "spiffe://mesh.test/node/n3", "n3", key(3), &[peer(2)]);
    let err = n3.initiate(&peer(2), 1, None).await.unwrap_err();
    assert_eq!(err.reason, ExchangeReason::WrongRole);
}

#[tokio::test]
async fn the_initiator_checks_the_responders_node_svid() {
    // The responder at 127.0.0.2 is n2, but the initiator expects n4 there.
    let ca = ca();
    let r = responder(&ca, &[peer(1), peer(2)]).await;
    let n1 = exchanger(&ca, "spiffe://mesh.test/node/n1", "n1", key(1), &[]);
    let mut impostor = peer(2);
    impostor.name = "n4".into();
    let err = n1
        .initiate(&impostor, r.port, Some(ip("127.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ExchangeReason::PeerCertificateRejected, "{err}");
    assert!(r.installed.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_node_that_sorts_second_asks_for_a_key_and_derives_none_itself() {
    // n2 restarted and holds no key for n1: it asks n1 (which initiates for the pair).
    let ca = ca();
    let mut n1 = responder_as(&ca, 1, &[peer(1), peer(2)]).await;
    let n2 = exchanger(&ca, "spiffe://mesh.test/node/n2", "n2", key(2), &[peer(1)]);
    n2.request_rekey(&peer(1), n1.port, Some(ip("127.0.0.2")))
        .await
        .unwrap();
    assert_eq!(*n1.rekeys.lock().unwrap(), vec![peer(2)]);
    assert!(
        n1.installed.lock().unwrap().is_empty(),
        "a request carries no key"
    );
    // It may not derive one itself, nor may n1 ask n2.
    let err = n2.initiate(&peer(1), n1.port, None).await.unwrap_err();
    assert_eq!(err.reason, ExchangeReason::WrongRole);
    let n1x = exchanger(&ca, "spiffe://mesh.test/node/n1", "n1", key(1), &[peer(2)]);
    let err = n1x.request_rekey(&peer(2), 1, None).await.unwrap_err();
    assert_eq!(err.reason, ExchangeReason::WrongRole);
    // Another node's real SVID from n2's address cannot ask in n2's name.
    let n3 = exchanger(&ca, "spiffe://mesh.test/node/n3", "n3", key(2), &[peer(1)]);
    let err = n3
        .request_rekey(&peer(1), n1.port, Some(ip("127.0.0.2")))
        .await
        .unwrap_err();
    assert_eq!(err.reason, ExchangeReason::UnknownNode);
    assert_eq!(
        next_failure(&mut n1.failed).await,
        ExchangeReason::UnknownNode
    );
    assert_eq!(n1.rekeys.lock().unwrap().len(), 1);
}
