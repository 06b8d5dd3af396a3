//! Placement comes from the control plane, never from nodes: tests that act as an attacker
//! holding one node's real SVID. The pods are placed through the admin side (the registry's
//! `create_pod`, what the admin API's CreatePod calls); the node API only lets a node report
//! the runtime facts of pods placed on it, inside its pod range, and never another node's.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, SystemTime};

use meshauth_proto::node::{
    AttestJoinTokenRequest, IdentityCsr, ReportPodRequest, SignIdentitySvidsRequest, SyncRequest,
    WithdrawPodRequest,
};
use support::*;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

/// Attests `node` with a token that binds its address and pod range.
async fn attest_bound(
    server: &TestServer,
    node: &str,
    address: &str,
    range: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let name = node.parse().unwrap();
    server
        .registry
        .register_node(
            &name,
            Some(address.parse().unwrap()),
            Some(range.parse().unwrap()),
        )
        .unwrap();
    let mut client = node_client(server.addr, server.bundle(), None).await;
    let (key, csr) = key_and_csr();
    let resp = client
        .attest_join_token(AttestJoinTokenRequest {
            token: server.token(node),
            node_name: node.into(),
            csr,
        })
        .await
        .expect("attestation succeeds")
        .into_inner();
    (chain(&resp.svid_chain), pkcs8(&key))
}

fn place(server: &TestServer, name: &str, app: &str, node: &str) -> u32 {
    server
        .registry
        .create_pod(
            "default",
            name,
            format!("app={app}").parse().unwrap(),
            &node.parse().unwrap(),
        )
        .unwrap()
        .identity
        .get()
}

fn report(name: &str, ip: &str) -> ReportPodRequest {
    ReportPodRequest {
        namespace: "default".into(),
        name: name.into(),
        ipv4: ip.into(),
        interface: "lxc10".into(),
    }
}

fn sign(identity: u32) -> SignIdentitySvidsRequest {
    SignIdentitySvidsRequest {
        csrs: vec![IdentityCsr {
            identity,
            csr: key_and_csr().1,
        }],
    }
}

fn denied(server: &TestServer, reason: &str) -> u64 {
    let text = server.registry.metrics().encode();
    text.lines()
        .find(|l| {
            l.starts_with("meshauth_server_requests_denied_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_node_gets_only_what_the_control_plane_placed_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = attest_bound(&server, "n1", "10.199.0.1", "10.200.1.0/24").await;
    let n2 = attest_bound(&server, "n2", "10.199.0.2", "10.200.2.0/24").await;
    let web = place(&server, "web-1", "web", "n1");
    let db = place(&server, "db-1", "db", "n2");
    assert_eq!((web, db), (256, 257), "identities from the pods' labels");
    // The attacker: n1, with its own real node SVID.
    let mut c1 = node_client(
        server.addr,
        server.bundle(),
        Some((n1.0.clone(), n1.1.clone_key())),
    )
    .await;
    let mut c2 = node_client(server.addr, server.bundle(), Some(n2)).await;

    // Its own pod, inside its range: accepted, with the identity the control plane chose.
    let id = c1
        .report_pod(report("web-1", "10.200.1.10"))
        .await
        .unwrap()
        .into_inner()
        .identity;
    assert_eq!(id, web);
    c2.report_pod(report("db-1", "10.200.2.10")).await.unwrap();

    // Claiming the other node's pod (to get its identity, or re-label its address): refused.
    let e = c1
        .report_pod(report("db-1", "10.200.1.11"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("not placed on node n1"),
        "{}",
        e.message()
    );
    assert_eq!(denied(&server, "PodNotPlacedHere"), 1);
    // A pod nobody placed: refused the same way (a node cannot invent pods or labels).
    let e = c1
        .report_pod(report("ghost", "10.200.1.12"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // An address outside its range, e.g. the other node's pod address: refused.
    let web2 = place(&server, "web-2", "web", "n1");
    assert_eq!(web2, web);
    let e = c1
        .report_pod(report("web-2", "10.200.2.10"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("outside node n1's pod range 10.200.1.0/24"),
        "{}",
        e.message()
    );
    assert_eq!(denied(&server, "AddressOutOfRange"), 1);
    // An address in its range that another pod has: refused.
    let e = c1
        .report_pod(report("web-2", "10.200.1.10"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(denied(&server, "AddressInUse"), 1);

    // Another node's address in its sync request: refused; its own: fine.
    let e = c1
        .sync(SyncRequest {
            node_address: "10.199.0.2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("10.199.0.1 is bound to it"),
        "{}",
        e.message()
    );
    assert_eq!(denied(&server, "NodeAddressMismatch"), 1);
    c1.sync(SyncRequest {
        node_address: "10.199.0.1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // SVIDs: only identities of pods placed on the node, never another's.
    let signed = c1
        .sign_identity_svids(sign(web))
        .await
        .unwrap()
        .into_inner();
    let v = meshauth_spiffe::validate_x509_svid(
        &chain(&signed.svids[0].svid_chain),
        &server.bundle(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(
        v.spiffe_id.to_string(),
        format!("spiffe://{TD}/identity/{web}")
    );
    let e = c1.sign_identity_svids(sign(db)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "n1 hosts no db pod");
    assert!(denied(&server, "IdentityNotHosted") >= 1);

    // Every agent sees the placement, labels from the control plane and the reported address.
    let mut stream = c2.sync(SyncRequest::default()).await.unwrap().into_inner();
    let state = stream.message().await.unwrap().unwrap();
    let p = state.endpoints.iter().find(|e| e.name == "web-1").unwrap();
    assert_eq!(
        (
            p.node.as_str(),
            p.identity,
            p.ipv4.as_str(),
            p.interface.as_str()
        ),
        ("n1", web, "10.200.1.10", "lxc10")
    );
    assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
    let unreported = state.endpoints.iter().find(|e| e.name == "web-2").unwrap();
    assert!(unreported.ipv4.is_empty(), "never reported: no address");
    assert!(
        state
            .nodes
            .iter()
            .any(|n| n.name == "n1" && n.address == "10.199.0.1" && n.pod_range == "10.200.1.0/24"),
        "agents learn each node's address and pod range: {:?}",
        state.nodes
    );

    // The control plane removes the pods: the node's right to identity 256 goes with them.
    c1.withdraw_pod(WithdrawPodRequest {
        namespace: "default".into(),
        name: "web-1".into(),
    })
    .await
    .unwrap();
    c1.sign_identity_svids(sign(web))
        .await
        .expect("web-1 and web-2 are still placed on n1");
    server.registry.delete_pod("default", "web-1").unwrap();
    server.registry.delete_pod("default", "web-2").unwrap();
    assert_eq!(
        c1.sign_identity_svids(sign(web)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn node_ranges_and_addresses_cannot_overlap_and_are_allocated_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let r = &server.registry;
    let n = |s: &str| -> meshauth_datastore::NodeName { s.parse().unwrap() };
    r.register_node(
        &n("a"),
        Some("10.199.0.1".parse().unwrap()),
        Some("10.200.1.0/24".parse().unwrap()),
    )
    .unwrap();
    let e = r
        .register_node(&n("b"), None, Some("10.200.1.128/25".parse().unwrap()))
        .unwrap_err();
    assert!(e.to_string().contains("overlaps node a"), "{e}");
    let e = r
        .register_node(&n("b"), Some("10.199.0.1".parse().unwrap()), None)
        .unwrap_err();
    assert!(e.to_string().contains("bound to node a"), "{e}");
    // Without a range, the next free /24 of the pod CIDR.
    let b = r.register_node(&n("b"), None, None).unwrap();
    assert_eq!(b.pod_range.to_string(), "10.200.0.0/24");
    let c = r.register_node(&n("c"), None, None).unwrap();
    assert_eq!(c.pod_range.to_string(), "10.200.2.0/24");
    // A node that attests without a binding gets a range and the address it connects from.
    let _ = attest_unbound(&server, "d").await;
    let spec = r
        .node_specs()
        .unwrap()
        .into_iter()
        .find(|s| s.name == n("d"))
        .unwrap();
    assert_eq!(spec.pod_range.to_string(), "10.200.3.0/24");
    assert_eq!(spec.address, Some("127.0.0.1".parse().unwrap()));
    server.stop().await;
}

async fn attest_unbound(server: &TestServer, node: &str) -> Vec<Vec<u8>> {
    let mut client = node_client(server.addr, server.bundle(), None).await;
    client
        .attest_join_token(AttestJoinTokenRequest {
            token: server.token(node),
            node_name: node.into(),
            csr: key_and_csr().1,
        })
        .await
        .unwrap()
        .into_inner()
        .svid_chain
}

#[tokio::test]
async fn a_banned_node_and_its_pods_vanish_from_every_view() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = attest_bound(&server, "n1", "10.199.0.1", "10.200.1.0/24").await;
    let n2 = attest_bound(&server, "n2", "10.199.0.2", "10.200.2.0/24").await;
    place(&server, "web-1", "web", "n1");
    let mut c1 = node_client(server.addr, server.bundle(), Some(n1)).await;
    c1.report_pod(report("web-1", "10.200.1.10")).await.unwrap();
    let mut c2 = node_client(server.addr, server.bundle(), Some(n2)).await;
    let mut stream = c2.sync(SyncRequest::default()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.endpoints.iter().any(|e| e.name == "web-1"));
    server.registry.ban_node(&"n1".parse().unwrap()).unwrap();
    // Pushed to n2 as a delta that removes n1 and its pod (n2's agent then revokes every
    // entry toward n1 and drops n1's pods).
    let after = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stream.message().await.unwrap().unwrap();
            if m.removed.as_ref().is_some_and(|r| !r.nodes.is_empty()) {
                return m;
            }
        }
    })
    .await
    .expect("the ban reaches n2's sync stream");
    assert!(after.delta, "a change on an open stream is a delta");
    let removed = after.removed.unwrap();
    assert_eq!(removed.nodes, ["n1"]);
    assert_eq!(removed.endpoints, ["default/web-1"]);
    assert!(after.nodes.is_empty() && after.endpoints.is_empty());
    // And n1 itself is refused.
    assert_eq!(
        c1.report_pod(report("web-1", "10.200.1.10"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn a_node_publishes_only_its_own_tunnel_key_and_never_another_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = attest_bound(&server, "n1", "10.199.0.1", "10.200.1.0/24").await;
    let n2 = attest_bound(&server, "n2", "10.199.0.2", "10.200.2.0/24").await;
    let mut c1 = node_client(server.addr, server.bundle(), Some(n1)).await;
    let mut c2 = node_client(server.addr, server.bundle(), Some(n2)).await;
    let key = |b: u8| vec![b; 32];

    // n1 publishes its key on its stream; every agent's view carries it, bound to n1.
    c1.sync(SyncRequest {
        tunnel_key: key(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = c2.sync(SyncRequest::default()).await.unwrap().into_inner();
    let view = stream.message().await.unwrap().unwrap();
    let keys: Vec<(&str, &[u8])> = view
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.tunnel_key.as_slice()))
        .collect();
    assert_eq!(keys, [("n1", key(1).as_slice()), ("n2", &[][..])]);

    // The attacker, n2 with its real node SVID, publishes n1's key (to take n1's place in
    // its peers' tunnels, or to cut n1's): refused, counted, and n1 keeps its key.
    let e = c2
        .sync(SyncRequest {
            tunnel_key: key(1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message()
            .contains("agent n2 published the WireGuard key of agent n1"),
        "{}",
        e.message()
    );
    assert_eq!(denied(&server, "DuplicateTunnelKey"), 1);
    // Not a key: refused with what is wrong.
    let e = c2
        .sync(SyncRequest {
            tunnel_key: vec![7; 31],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("31 bytes"), "{}", e.message());
    // Its own key: accepted; n1's is untouched.
    c2.sync(SyncRequest {
        tunnel_key: key(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let nodes = server.registry.nodes().unwrap();
    let of = |n: &str| {
        nodes
            .iter()
            .find(|r| r.name.as_str() == n)
            .unwrap()
            .tunnel_key
            .map(|k| k.as_bytes().to_vec())
    };
    assert_eq!((of("n1"), of("n2")), (Some(key(1)), Some(key(2))));
}

/// The next message of a sync stream, within 10 s.
async fn next(
    s: &mut tonic::Streaming<meshauth_proto::node::SyncResponse>,
) -> meshauth_proto::node::SyncResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap()
}

/// Counts `meshauth_server_sync_messages_total{kind}`.
fn sync_messages(server: &TestServer, kind: &str) -> u64 {
    let text = server.registry.metrics().encode();
    text.lines()
        .find(|l| {
            l.starts_with("meshauth_server_sync_messages_total")
                && l.contains(&format!("kind=\"{kind}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_open_stream_gets_deltas_with_only_its_own_entries_and_revisions_that_chain() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = attest_bound(&server, "n1", "10.199.0.1", "10.200.1.0/24").await;
    let n2 = attest_bound(&server, "n2", "10.199.0.2", "10.200.2.0/24").await;
    let mut c1 = node_client(server.addr, server.bundle(), Some(n1)).await;
    let mut c2 = node_client(server.addr, server.bundle(), Some(n2)).await;
    let mut s1 = c1.sync(SyncRequest::default()).await.unwrap().into_inner();
    let mut s2 = c2.sync(SyncRequest::default()).await.unwrap().into_inner();
    let first1 = s1.message().await.unwrap().unwrap();
    let first2 = s2.message().await.unwrap().unwrap();
    assert!(
        !first1.delta && !first2.delta,
        "a stream starts with the whole state"
    );
    assert_eq!(first1.nodes.len(), 2);
    // A pod placed on n1: both streams get a delta with just that endpoint.
    place(&server, "web-1", "web", "n1");
    let d1 = next(&mut s1).await;
    let d2 = next(&mut s2).await;
    for (d, first) in [(&d1, &first1), (&d2, &first2)] {
        assert!(d.delta);
        assert_eq!(
            d.base_revision, first.revision,
            "the delta applies to what is held"
        );
        assert!(d.revision > first.revision);
        assert_eq!(
            d.endpoints
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["web-1"]
        );
        assert!(d.nodes.is_empty() && d.policies.is_empty() && d.bundle.is_none());
    }
    // An entry of n2's: only n2's stream gets it; n1's next message is the next shared change,
    // and its base is what n1 holds.
    server
        .registry
        .create_entry(meshauth_datastore::NewEntry {
            spiffe_id: format!("spiffe://{TD}/w").parse().unwrap(),
            parent_id: format!("spiffe://{TD}/node/n2").parse().unwrap(),
            selectors: vec!["unix:uid:1000".parse().unwrap()],
            x509_svid_ttl: None,
            dns_names: vec![],
        })
        .unwrap();
    let e2 = next(&mut s2).await;
    assert_eq!(e2.entries.len(), 1);
    assert_eq!(e2.base_revision, d2.revision);
    server.registry.delete_pod("default", "web-1").unwrap();
    let r1 = next(&mut s1).await;
    assert!(
        r1.entries.is_empty(),
        "n1 never sees n2's entry: {:?}",
        r1.entries
    );
    assert_eq!(r1.base_revision, d1.revision);
    assert_eq!(r1.removed.unwrap().endpoints, ["default/web-1"]);
    let r2 = next(&mut s2).await;
    assert_eq!(r2.base_revision, e2.revision);
    assert_eq!(sync_messages(&server, "Full"), 2);
    assert!(sync_messages(&server, "Delta") >= 5);
    drop((s1, s2));
    server.stop().await;
}

#[tokio::test]
async fn a_large_whole_state_comes_in_pages_no_larger_than_64_kib() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = attest_bound(&server, "n1", "10.199.0.1", "10.200.0.0/16").await;
    const PODS: usize = 2_000;
    for i in 0..PODS {
        place(
            &server,
            &format!("a-pod-with-a-longer-name-{i:05}"),
            "web",
            "n1",
        );
    }
    let mut c1 = node_client(server.addr, server.bundle(), Some(n1)).await;
    let mut s1 = c1.sync(SyncRequest::default()).await.unwrap().into_inner();
    let first = next(&mut s1).await;
    assert!(
        !first.delta && first.more,
        "the first page of the whole state"
    );
    let mut pages = vec![first];
    while pages.last().is_some_and(|p| p.more) {
        pages.push(next(&mut s1).await);
    }
    let revision = pages[0].revision;
    assert!(pages.len() >= 2, "{} pages", pages.len());
    for (i, page) in pages.iter().enumerate() {
        let size = prost::Message::encoded_len(page);
        assert!(size <= 64 * 1024, "page {i} is {size} bytes");
        if i > 0 {
            assert!(
                page.delta && page.base_revision == revision && page.revision == revision,
                "page {i} continues revision {revision}"
            );
        }
    }
    let endpoints: usize = pages.iter().map(|p| p.endpoints.len()).sum();
    assert_eq!(endpoints, PODS, "the pages hold every endpoint once");
    assert_eq!(sync_messages(&server, "Full"), 1, "one whole state");
    // Then deltas go on from that revision.
    place(&server, "one-more", "web", "n1");
    let d = next(&mut s1).await;
    assert!(d.delta && !d.more && d.base_revision == revision);
    assert_eq!(d.endpoints.len(), 1);
}
