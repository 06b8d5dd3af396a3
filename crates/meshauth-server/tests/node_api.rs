//! The node API over real TCP and mutual TLS: attestation, renewal, node-scoped issuance, the
//! sync stream, bans and evictions, and restarts on the same SQLite file.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, SystemTime};

use meshauth_datastore::NewEntry;
use meshauth_proto::node::{
    AttestJoinTokenRequest, CsrForEntry, RenewNodeSvidRequest, SignWorkloadSvidsRequest,
    SyncRequest,
};
use support::*;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);
/// How long a pushed change may take to arrive. The property is "pushed, not polled", not
/// latency: generous, so that a loaded CI machine does not fail it.
const PUSH_DEADLINE: Duration = Duration::from_secs(10);

fn entry(spiffe: &str, parent: &str) -> NewEntry {
    NewEntry {
        spiffe_id: spiffe.parse().unwrap(),
        parent_id: parent.parse().unwrap(),
        selectors: vec!["unix:uid:1000".parse().unwrap()],
        x509_svid_ttl: Some(Duration::from_secs(600)),
        dns_names: vec![],
    }
}

/// Attests `node` with a fresh token; returns its SVID chain and key.
async fn attest(
    server: &TestServer,
    node: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
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

#[tokio::test]
async fn join_token_attestation_issues_a_node_svid_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let mut client = node_client(server.addr, server.bundle(), None).await;
    let token = server.token("n1");
    let (key, csr) = key_and_csr();
    let resp = client
        .attest_join_token(AttestJoinTokenRequest {
            token: token.clone(),
            node_name: "n1".into(),
            csr: csr.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, format!("spiffe://{TD}/node/n1"));
    assert!(resp.node_id > 0);
    let verified = meshauth_spiffe::validate_x509_svid(
        &chain(&resp.svid_chain),
        &server.bundle(),
        SystemTime::now(),
    )
    .expect("node SVID validates against the bundle");
    assert_eq!(verified.spiffe_id.to_string(), resp.spiffe_id);
    // The SVID carries the node's own key, which the server never saw.
    let leaf = x509_public_key(&resp.svid_chain[0]);
    assert_eq!(leaf, key.public_key_raw());

    let err = client
        .attest_join_token(AttestJoinTokenRequest {
            token,
            node_name: "n1".into(),
            csr,
        })
        .await
        .expect_err("a join token works once");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    server.stop().await;
}

fn x509_public_key(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}

#[tokio::test]
async fn expired_or_foreign_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let mut client = node_client(server.addr, server.bundle(), None).await;
    let past = SystemTime::now() - Duration::from_secs(3600);
    let expired = server
        .registry
        .create_join_token(&"n1".parse().unwrap(), Some(Duration::from_secs(600)), past)
        .unwrap();
    let (_, csr) = key_and_csr();
    let err = client
        .attest_join_token(AttestJoinTokenRequest {
            token: expired.token,
            node_name: "n1".into(),
            csr: csr.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    let err = client
        .attest_join_token(AttestJoinTokenRequest {
            token: server.token("n1"),
            node_name: "n2".into(),
            csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let metrics = server.registry.metrics().encode();
    assert!(metrics.contains("reason=\"TokenExpired\""), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn workload_svids_are_node_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let own = attest(&server, "n1").await;
    attest(&server, "n2").await;
    let mine = server
        .registry
        .create_entry(entry(
            &format!("spiffe://{TD}/web"),
            &format!("spiffe://{TD}/node/n1"),
        ))
        .unwrap();
    let theirs = server
        .registry
        .create_entry(entry(
            &format!("spiffe://{TD}/db"),
            &format!("spiffe://{TD}/node/n2"),
        ))
        .unwrap();
    let mut client = node_client(server.addr, server.bundle(), Some(own)).await;

    let (_, csr) = key_and_csr();
    let signed = client
        .sign_workload_svids(SignWorkloadSvidsRequest {
            csrs: vec![CsrForEntry {
                entry_id: mine.id.to_string(),
                csr: csr.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.svids.len(), 1);
    let v = meshauth_spiffe::validate_x509_svid(
        &chain(&signed.svids[0].svid_chain),
        &server.bundle(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(v.spiffe_id.to_string(), format!("spiffe://{TD}/web"));

    // Refusals are per entry: n1 gets no SVID for n2's entry, and is told why.
    let resp = client
        .sign_workload_svids(SignWorkloadSvidsRequest {
            csrs: vec![CsrForEntry {
                entry_id: theirs.id.to_string(),
                csr,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.svids.is_empty(),
        "n1 must not obtain n2's workload SVIDs"
    );
    assert_eq!(resp.refused.len(), 1);
    assert_eq!(resp.refused[0].entry_id, theirs.id.to_string());
    assert_eq!(resp.refused[0].reason, "EntryNotForNode");
    assert!(
        resp.refused[0]
            .message
            .contains("not to spiffe://test.local/node/n1"),
        "{}",
        resp.refused[0].message
    );
    assert!(
        server
            .registry
            .metrics()
            .encode()
            .contains("reason=\"EntryNotForNode\"")
    );

    // Without a client certificate nothing but attestation is served.
    let mut anonymous = node_client(server.addr, server.bundle(), None).await;
    let err = anonymous
        .sign_workload_svids(SignWorkloadSvidsRequest { csrs: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn renewal_ban_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let first = attest(&server, "n1").await;
    let mut client = node_client(
        server.addr,
        server.bundle(),
        Some((first.0.clone(), first.1.clone_key())),
    )
    .await;
    let (key, csr) = key_and_csr();
    let renewed = client
        .renew_node_svid(RenewNodeSvidRequest { csr })
        .await
        .expect("renewal with the current node SVID")
        .into_inner();
    assert_eq!(renewed.spiffe_id, format!("spiffe://{TD}/node/n1"));
    let second = (chain(&renewed.svid_chain), pkcs8(&key));

    // Evicted, then re-attested: SVIDs from before the eviction no longer work.
    server.registry.evict_node(&"n1".parse().unwrap()).unwrap();
    attest(&server, "n1").await;
    let mut stale = node_client(server.addr, server.bundle(), Some(second)).await;
    let (_, csr) = key_and_csr();
    let err = stale
        .renew_node_svid(RenewNodeSvidRequest { csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("no longer current"),
        "{}",
        err.message()
    );

    // Banned: refused, and a new token does not help.
    let third = attest(&server, "n1").await;
    server.registry.ban_node(&"n1".parse().unwrap()).unwrap();
    let mut banned = node_client(server.addr, server.bundle(), Some(third)).await;
    let (_, csr) = key_and_csr();
    let err = banned
        .renew_node_svid(RenewNodeSvidRequest { csr: csr.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("banned"), "{}", err.message());
    let mut anonymous = node_client(server.addr, server.bundle(), None).await;
    let err = anonymous
        .attest_join_token(AttestJoinTokenRequest {
            token: server.token("n1"),
            node_name: "n1".into(),
            csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn sync_stream_pushes_entry_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let own = attest(&server, "n1").await;
    let mut client = node_client(server.addr, server.bundle(), Some(own)).await;
    let mut stream = client
        .sync(SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.entries.is_empty());
    assert!(!first.bundle.unwrap().authorities.is_empty());

    let created = server
        .registry
        .create_entry(entry(
            &format!("spiffe://{TD}/web"),
            &format!("spiffe://{TD}/node/n1"),
        ))
        .unwrap();
    // Another node's entry is not shown to n1.
    server
        .registry
        .create_entry(entry(
            &format!("spiffe://{TD}/db"),
            &format!("spiffe://{TD}/node/n2"),
        ))
        .unwrap();
    // Pushed, not polled: a generous deadline, so that a loaded machine does not fail this.
    let next = tokio::time::timeout(PUSH_DEADLINE, stream.message())
        .await
        .expect("the change is pushed")
        .unwrap()
        .unwrap();
    assert_eq!(next.entries.len(), 1);
    assert_eq!(next.entries[0].id, created.id.to_string());

    server.registry.delete_entry(&created.id).unwrap();
    let next = tokio::time::timeout(PUSH_DEADLINE, stream.message())
        .await
        .expect("the deletion is pushed")
        .unwrap()
        .unwrap();
    assert!(next.entries.is_empty());

    server.registry.ban_node(&"n1".parse().unwrap()).unwrap();
    let end = tokio::time::timeout(PUSH_DEADLINE, stream.message())
        .await
        .expect("a ban ends the stream");
    assert_eq!(end.unwrap_err().code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_ca_nodes_and_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 24 * HOUR, HOUR);
    let server = TestServer::start(cfg.clone()).await;
    let own = attest(&server, "n1").await;
    server
        .registry
        .create_entry(entry(
            &format!("spiffe://{TD}/web"),
            &format!("spiffe://{TD}/node/n1"),
        ))
        .unwrap();
    let bundle_before = server.bundle();
    server.stop().await;

    let server = TestServer::start(cfg).await;
    let bundle_after = server.bundle();
    assert_eq!(bundle_before.authorities, bundle_after.authorities);
    meshauth_spiffe::validate_x509_svid(&own.0, &bundle_after, SystemTime::now())
        .expect("an SVID issued before the restart validates after it");
    // The node is still known: its SVID authenticates without a new token.
    let mut client = node_client(server.addr, bundle_after, Some(own)).await;
    let mut stream = client
        .sync(SyncRequest::default())
        .await
        .unwrap()
        .into_inner();
    let state = stream.message().await.unwrap().unwrap();
    assert_eq!(state.entries.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    attest(&server, "n1").await;
    // One refused attestation: an unknown token.
    let mut client = node_client(server.addr, server.bundle(), None).await;
    let err = client
        .attest_join_token(AttestJoinTokenRequest {
            token: "not-a-token".into(),
            node_name: "n2".into(),
            csr: key_and_csr().1,
        })
        .await
        .expect_err("an unknown token is refused");
    assert_eq!(err.code(), Code::Unauthenticated);

    let body = http_get(server.metrics_addr, "/metrics").await;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
            .to_owned()
    };
    assert_eq!(
        value("meshauth_server_svids_issued_total{kind=\"Node\"}"),
        "1"
    );
    assert_eq!(value("meshauth_server_node_attestations_total"), "1");
    assert_eq!(
        value("meshauth_server_requests_denied_total{reason=\"TokenUnknown\"}"),
        "1",
        "one refusal is counted once"
    );
    assert_eq!(value("meshauth_server_bundle_authorities"), "1");
    assert!(
        !body.contains("meshauth_server_ticker_failures_total{"),
        "no ticker step failed: {body}"
    );
    let ready = http_get(server.metrics_addr, "/readyz").await;
    assert!(ready.ends_with("\r\n\r\nready\n"), "{ready}");
    server.stop().await;
}

/// `GET path` over HTTP/1.0, asserting a 200; the whole response.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

#[tokio::test]
async fn endpoints_identities_and_identity_svids_are_node_scoped() {
    use meshauth_proto::node::{
        DeregisterEndpointRequest, IdentityCsr, RegisterEndpointRequest, SignIdentitySvidsRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 24 * HOUR, HOUR);
    let server = TestServer::start(cfg.clone()).await;
    let n1 = attest(&server, "n1").await;
    let n2 = attest(&server, "n2").await;
    let mut c1 = node_client(
        server.addr,
        server.bundle(),
        Some((n1.0.clone(), n1.1.clone_key())),
    )
    .await;
    let mut c2 = node_client(server.addr, server.bundle(), Some(n2)).await;
    let register = |name: &str, app: &str, ip: &str| RegisterEndpointRequest {
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ipv4: ip.into(),
    };
    let web = c1
        .register_endpoint(register("web-1", "web", "10.200.1.10"))
        .await
        .unwrap()
        .into_inner()
        .identity;
    let web2 = c1
        .register_endpoint(register("web-2", "web", "10.200.1.11"))
        .await
        .unwrap()
        .into_inner()
        .identity;
    let db = c2
        .register_endpoint(register("db-1", "db", "10.200.2.10"))
        .await
        .unwrap()
        .into_inner()
        .identity;
    assert_eq!(web, 256, "allocated identities start at 256");
    assert_eq!(web2, web, "one identity per label set");
    assert_eq!(db, 257);
    let bad = c1
        .register_endpoint(register("x", "web", "not-an-ip"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let sign = |identity: u32| SignIdentitySvidsRequest {
        csrs: vec![IdentityCsr {
            identity,
            csr: key_and_csr().1,
        }],
    };
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
        format!("spiffe://{TD}/identity/256")
    );
    let err = c1.sign_identity_svids(sign(db)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "n1 hosts no db endpoint"
    );
    assert!(
        server
            .registry
            .metrics()
            .encode()
            .contains("reason=\"IdentityNotHosted\"")
    );

    // The cluster state reaches every agent: identities, endpoints with their node, nodes with
    // their address, policies.
    server
        .registry
        .apply_policies(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../meshauth-policy/tests/fixtures/walkthrough.yaml"
            ))
            .unwrap(),
        )
        .unwrap();
    let mut stream = c2.sync(SyncRequest::default()).await.unwrap().into_inner();
    let state = stream.message().await.unwrap().unwrap();
    assert_eq!(state.identities.len(), 2);
    let web_ep = state.endpoints.iter().find(|e| e.name == "web-1").unwrap();
    assert_eq!(
        (web_ep.node.as_str(), web_ep.identity, web_ep.ipv4.as_str()),
        ("n1", 256, "10.200.1.10")
    );
    assert_ne!(web_ep.node_id, 0);
    assert!(
        state
            .nodes
            .iter()
            .any(|n| n.name == "n2" && n.address == "127.0.0.1")
    );
    assert_eq!(state.policies.len(), 3);
    assert!(
        meshauth_policy::parse_policies(&state.policies[0].yaml).is_ok(),
        "stored documents parse again"
    );

    // The last web endpoint leaving withdraws n1's right to identity 256.
    c1.deregister_endpoint(DeregisterEndpointRequest {
        name: "web-1".into(),
    })
    .await
    .unwrap();
    c1.sign_identity_svids(sign(web))
        .await
        .expect("web-2 still runs on n1");
    c1.deregister_endpoint(DeregisterEndpointRequest {
        name: "web-2".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        c1.sign_identity_svids(sign(web)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The other node is told.
    tokio::time::timeout(PUSH_DEADLINE, async {
        loop {
            let next = stream.message().await.unwrap().unwrap();
            if next.endpoints.iter().all(|e| e.node != "n1") {
                return;
            }
        }
    })
    .await
    .expect("the deregistration reaches n2's sync stream");
    drop(stream);
    server.stop().await;

    // Identities are stable across restarts.
    let server = TestServer::start(cfg).await;
    let mut c1 = node_client(server.addr, server.bundle(), Some(n1)).await;
    let again = c1
        .register_endpoint(register("db-2", "db", "10.200.1.12"))
        .await
        .unwrap()
        .into_inner()
        .identity;
    assert_eq!(again, db);
    server.stop().await;
}
