//! Real TLS 1.3 handshakes between two agents over loopback (127.0.0.1, .2 and .3 play three
//! nodes): success on both sides, and every refusal with its reason.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_auth::{
    Authenticated, Handshaker, LocalSvid, LocalSvids, Placement, Reason, Timeouts,
};
use meshauth_ca::{Ca, CaConfig};
use meshauth_policy::{AuthType, Connection, IdentityId, NodeId};
use meshauth_tls::{SharedBundle, SharedCertifiedKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

const TD: &str = "mesh.test";

struct StaticPlacement {
    here: HashSet<u32>,
    nodes: HashMap<IpAddr, u32>,
    hosted: HashSet<(u32, u32)>,
}

impl Placement for StaticPlacement {
    fn hosted_here(&self, identity: IdentityId) -> bool {
        self.here.contains(&identity.get())
    }
    fn node_at(&self, addr: IpAddr) -> Option<NodeId> {
        self.nodes.get(&addr).map(|n| NodeId::new(*n))
    }
    fn hosted_on(&self, identity: IdentityId, node: NodeId) -> bool {
        self.hosted.contains(&(identity.get(), node.get()))
    }
    /// Pods: 10.0.1.1 (identity 100, node 1), 10.0.1.2 (identity 101, node 1), 10.0.2.1
    /// (identity 200, node 2).
    fn pod_at(&self, addr: Ipv4Addr) -> Option<(IdentityId, NodeId)> {
        let (id, node) = match addr.octets() {
            [10, 0, 1, 1] => (100, 1),
            [10, 0, 1, 2] => (101, 1),
            [10, 0, 2, 1] => (200, 2),
            _ => return None,
        };
        Some((IdentityId::new(id), NodeId::new(node)))
    }
    fn local_pod_at(&self, addr: Ipv4Addr) -> Option<IdentityId> {
        self.pod_at(addr)
            .filter(|(id, _)| self.here.contains(&id.get()))
            .map(|(id, _)| id)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Nodes 1, 2, 3 at 127.0.0.1, .2, .3; identity 100 on node 1, 200 on node 2.
fn placement(here: &[u32]) -> Arc<StaticPlacement> {
    Arc::new(StaticPlacement {
        here: here.iter().copied().collect(),
        nodes: HashMap::from([
            (ip("127.0.0.1"), 1),
            (ip("127.0.0.2"), 2),
            (ip("127.0.0.3"), 3),
        ]),
        hosted: HashSet::from([(100, 1), (200, 2)]),
    })
}

fn svid(
    ca: &Ca,
    id: &str,
    ttl: Option<Duration>,
    at: SystemTime,
) -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    SystemTime,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let issued = ca
        .sign_csr(csr.der(), &id.parse().unwrap(), ttl, &[], at)
        .unwrap();
    (
        issued.chain,
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        issued.not_after,
    )
}

fn local(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: SystemTime,
) -> LocalSvid {
    LocalSvid {
        key: SharedCertifiedKey::new(chain, key).unwrap(),
        not_after,
    }
}

struct Responder {
    addr: SocketAddr,
    accepted: mpsc::Receiver<Authenticated>,
    failed: mpsc::Receiver<Reason>,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn responder(ca: &Ca, svids: LocalSvids, here: &[u32]) -> Responder {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hs = Handshaker::new(
        TD.parse().unwrap(),
        SharedBundle::new(ca.bundle(SystemTime::now())),
        svids,
        placement(here),
        Timeouts::default(),
    );
    let (atx, accepted) = mpsc::channel(8);
    let (ftx, failed) = mpsc::channel(8);
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(hs.serve(listener, atx, ftx, rx));
    Responder {
        addr,
        accepted,
        failed,
        _stop: stop,
    }
}

fn initiator(ca: &Ca, svids: LocalSvids) -> Handshaker {
    Handshaker::new(
        TD.parse().unwrap(),
        SharedBundle::new(ca.bundle(SystemTime::now())),
        svids,
        placement(&[100]),
        Timeouts::default(),
    )
}

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

fn id(n: u32) -> IdentityId {
    IdentityId::new(n)
}

#[tokio::test]
async fn both_sides_authenticate_and_record_the_pair() {
    let now = SystemTime::now();
    let ca = Ca::new(CaConfig::new(TD.parse().unwrap()), now).unwrap();
    let (a_chain, a_key, a_exp) = svid(
        &ca,
        "spiffe://mesh.test/identity/100",
        Some(Duration::from_secs(600)),
        now,
    );
    let (b_chain, b_key, b_exp) = svid(
        &ca,
        "spiffe://mesh.test/identity/200",
        Some(Duration::from_secs(900)),
        now,
    );
    let a = LocalSvids::default();
    a.set(id(100), local(a_chain, a_key, a_exp));
    let b = LocalSvids::default();
    b.set(id(200), local(b_chain, b_key, b_exp));
    let mut r = responder(&ca, b, &[200]).await;

    let got = initiator(&ca, a)
        .initiate(
            id(100),
            id(200),
            NodeId::new(2),
            r.addr,
            Some(ip("127.0.0.1")),
        )
        .await
        .unwrap();
    assert_eq!(
        (got.local, got.remote, got.remote_node),
        (id(100), id(200), NodeId::new(2))
    );
    assert_eq!(
        got.expires,
        a_exp.min(b_exp),
        "the earlier certificate expiry"
    );
    let theirs = next(&mut r.accepted).await;
    assert_eq!(
        (theirs.local, theirs.remote, theirs.remote_node),
        (id(200), id(100), NodeId::new(1))
    );
    assert_eq!(theirs.expires, got.expires);
}

#[tokio::test]
async fn refusals_have_reasons_on_both_sides() {
    let now = SystemTime::now();
    let long_ago = now - Duration::from_secs(7200);
    // A CA started two hours ago (valid for 24 h), so that it can have issued an SVID that has
    // expired by now.
    let ca = Ca::new(CaConfig::new(TD.parse().unwrap()), long_ago).unwrap();
    let other_ca = Ca::new(CaConfig::new("other.test".parse().unwrap()), now).unwrap();
    let (a_chain, a_key, a_exp) = svid(&ca, "spiffe://mesh.test/identity/100", None, now);
    let (b_chain, b_key, b_exp) = svid(&ca, "spiffe://mesh.test/identity/200", None, now);
    let b = LocalSvids::default();
    b.set(id(200), local(b_chain.clone(), b_key.clone_key(), b_exp));
    // Misconfigured: identity 300 "hosted" with 200's certificate.
    b.set(id(300), local(b_chain.clone(), b_key, b_exp));
    let mut r = responder(&ca, b, &[200, 300]).await;
    let a = LocalSvids::default();
    a.set(id(100), local(a_chain.clone(), a_key.clone_key(), a_exp));
    let init = initiator(&ca, a.clone());

    // SNI names an identity the responder does not host: no certificate, refused.
    let e = init
        .initiate(
            id(100),
            id(999),
            NodeId::new(2),
            r.addr,
            Some(ip("127.0.0.1")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason, Reason::Refused, "{e}");
    next(&mut r.failed).await;

    // The initiator connects from a node that does not host its identity.
    let e = init
        .initiate(
            id(100),
            id(200),
            NodeId::new(2),
            r.addr,
            Some(ip("127.0.0.3")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason, Reason::InitiatorNotHosted, "{e}");
    assert_eq!(next(&mut r.failed).await, Reason::InitiatorNotHosted);

    // The responder presents a certificate of another identity than the one asked for.
    let e = init
        .initiate(
            id(100),
            id(300),
            NodeId::new(2),
            r.addr,
            Some(ip("127.0.0.1")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason, Reason::PeerCertificateRejected, "{e}");
    next(&mut r.failed).await;

    // Client certificates the responder must refuse: another trust domain, expired, extra leaf.
    let (o_chain, o_key, o_exp) = svid(&other_ca, "spiffe://other.test/identity/100", None, now);
    let (x_chain, x_key, x_exp) = svid(
        &ca,
        "spiffe://mesh.test/identity/100",
        Some(Duration::from_secs(60)),
        long_ago,
    );
    assert!(x_exp < now);
    let mut extra = a_chain.clone();
    extra.push(b_chain[0].clone());
    for (what, svid) in [
        ("other trust domain", local(o_chain, o_key, o_exp)),
        ("expired", local(x_chain, x_key, x_exp)),
        ("extra leaf", local(extra, a_key.clone_key(), a_exp)),
    ] {
        let svids = LocalSvids::default();
        svids.set(id(100), svid);
        let hs = initiator(&ca, svids);
        let e = hs
            .initiate(
                id(100),
                id(200),
                NodeId::new(2),
                r.addr,
                Some(ip("127.0.0.1")),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e.reason, Reason::Refused | Reason::PeerCertificateRejected),
            "{what}: {e}"
        );
        assert_eq!(
            next(&mut r.failed).await,
            Reason::PeerCertificateRejected,
            "{what}"
        );
    }
}

fn conn(src: &str, dst: &str) -> Connection {
    Connection {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        sport: 40000,
        dport: 80,
        protocol: 6,
    }
}

#[tokio::test]
async fn a_connection_is_authenticated_only_between_the_pods_of_the_two_identities() {
    let now = SystemTime::now();
    let ca = Ca::new(CaConfig::new(TD.parse().unwrap()), now).unwrap();
    let ttl = Some(Duration::from_secs(600));
    let (a_chain, a_key, a_exp) = svid(&ca, "spiffe://mesh.test/identity/100", ttl, now);
    let (b_chain, b_key, b_exp) = svid(&ca, "spiffe://mesh.test/identity/200", ttl, now);
    let a = LocalSvids::default();
    a.set(id(100), local(a_chain, a_key, a_exp));
    let b = LocalSvids::default();
    b.set(id(200), local(b_chain, b_key, b_exp));
    let mut r = responder(&ca, b, &[200]).await;
    let hs = initiator(&ca, a);
    let go = |c: Connection| {
        hs.initiate_for(
            id(100),
            id(200),
            NodeId::new(2),
            r.addr,
            Some(ip("127.0.0.1")),
            Some(c),
        )
    };

    // From identity 100's pod on node 1 to identity 200's pod here: both sides record it.
    let ok = conn("10.0.1.1", "10.0.2.1");
    let got = go(ok).await.unwrap();
    assert_eq!(got.connection, Some(ok));
    assert_eq!(got.key().auth_type, AuthType::PerConnection);
    let theirs = next(&mut r.accepted).await;
    assert_eq!(
        theirs.connection,
        Some(ok),
        "the responder records the same connection"
    );
    assert_eq!(theirs.key().connection, Some(ok));

    // A node that holds identity 100's SVID asks for a connection of another identity's pod
    // (101 on its node), or one to a pod that is not identity 200's here, or from a pod on
    // another node: refused, on both sides, and nothing is recorded.
    for bad in [
        conn("10.0.1.2", "10.0.2.1"),
        conn("10.0.1.1", "10.0.1.2"),
        conn("10.0.2.1", "10.0.2.1"),
        conn("192.0.2.1", "10.0.2.1"),
    ] {
        let e = go(bad).await.unwrap_err();
        assert_eq!(e.reason, Reason::Refused, "{bad}: {e}");
        assert_eq!(next(&mut r.failed).await, Reason::Refused, "{bad}");
    }
    assert!(
        r.accepted.try_recv().is_err(),
        "no refused connection was recorded"
    );
}
