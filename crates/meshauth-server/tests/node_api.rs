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
    // Unauthenticated, not denied: the agent is to attest again.
    assert_eq!(err.code(), Code::Unauthenticated);
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
async fn a_node_that_could_not_save_its_renewal_is_never_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let first = attest(&server, "n1").await;
    let renew = |svid: (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )| {
        let (bundle, addr) = (server.bundle(), server.addr);
        async move {
            let mut c = node_client(addr, bundle, Some(svid)).await;
            let (key, csr) = key_and_csr();
            c.renew_node_svid(RenewNodeSvidRequest { csr })
                .await
                .map(|r| (chain(&r.into_inner().svid_chain), pkcs8(&key)))
        }
    };
    let copy = |s: &(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )| { (s.0.clone(), s.1.clone_key()) };
    // The node renews but cannot save the answer (a full disk): it keeps the SVID it has and
    // renews with it again, and again: each time accepted, as it proved it holds that one.
    for attempt in 1..=3 {
        renew(copy(&first))
            .await
            .unwrap_or_else(|e| panic!("renewal {attempt} with the old SVID: {e}"));
    }
    // Once it renews with a new one, the old one is done.
    let newer = renew(copy(&first)).await.unwrap();
    renew(copy(&newer))
        .await
        .expect("renewal with the newer SVID");
    let err = renew(copy(&first)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no longer current"),
        "{}",
        err.message()
    );
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

/// An x509pop proof for `node` with `credential`, bound to the connection whose exporter is
/// `exporter`.
fn x509pop_request(
    credential: &meshauth_tls::x509pop::NodeCredential,
    exporter: &[u8],
    node: &str,
) -> (rcgen::KeyPair, meshauth_proto::node::AttestX509PopRequest) {
    let (key, csr) = key_and_csr();
    let (scheme, signature) = credential.prove(exporter, node, &csr).unwrap();
    (
        key,
        meshauth_proto::node::AttestX509PopRequest {
            node_name: node.into(),
            cert_chain: credential.chain.iter().map(|c| c.to_vec()).collect(),
            csr,
            signature_scheme: u32::from(u16::from(scheme)),
            signature,
        },
    )
}

#[tokio::test]
async fn x509pop_attests_again_and_again_but_only_its_own_node_on_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let operator = OperatorCa::new("operator node CA");
    let mut cfg = config(dir.path(), 24 * HOUR, HOUR);
    cfg.x509pop = Some(operator.roots());
    let server = TestServer::start(cfg).await;
    let n1 = operator.node_credential("n1");

    // First attestation, and again (as after an outage that outlived the SVID): both work,
    // with no token, and the node keeps its id.
    let mut ids = vec![];
    for _ in 0..2 {
        let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
        let (key, req) = x509pop_request(&n1, &exporter, "n1");
        let resp = client.attest_x509_pop(req).await.unwrap().into_inner();
        assert_eq!(resp.spiffe_id, format!("spiffe://{TD}/node/n1"));
        assert_eq!(x509_public_key(&resp.svid_chain[0]), key.public_key_raw());
        meshauth_spiffe::validate_x509_svid(
            &chain(&resp.svid_chain),
            &server.bundle(),
            SystemTime::now(),
        )
        .unwrap();
        ids.push(resp.node_id);
    }
    assert_eq!(ids[0], ids[1]);
    let record = server.registry.node(&"n1".parse().unwrap()).unwrap();
    assert_eq!(
        record.attestation,
        meshauth_datastore::NodeAttestation::X509Pop
    );

    // A proof captured from one connection and replayed on another is refused.
    let (_, first_exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, replayed) = x509pop_request(&n1, &first_exporter, "n1");
    let (mut other, _) = attestation_client(server.addr, server.bundle()).await;
    let err = other.attest_x509_pop(replayed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("does not verify"),
        "{}",
        err.message()
    );

    // n1's certificate does not attest n2, whatever the request says.
    let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, as_n2) = x509pop_request(&n1, &exporter, "n2");
    let err = client.attest_x509_pop(as_n2).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not \"n2\""), "{}", err.message());

    // A CA that copies the operator CA's name, with its own key, attests nothing.
    let forged = OperatorCa::new("operator node CA").node_credential("n3");
    let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, req) = x509pop_request(&forged, &exporter, "n3");
    let err = client.attest_x509_pop(req).await.unwrap_err();
    assert!(err.message().contains("--x509pop-ca"), "{}", err.message());
    assert!(server.registry.node(&"n3".parse().unwrap()).is_err());

    // Banned: refused, certificate or not.
    server.registry.ban_node(&"n1".parse().unwrap()).unwrap();
    let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, req) = x509pop_request(&n1, &exporter, "n1");
    let err = client.attest_x509_pop(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("banned"), "{}", err.message());

    let metrics = server.registry.metrics().encode();
    assert!(
        metrics.contains("meshauth_server_requests_denied_total{reason=\"X509PopRefused\"} 3"),
        "{metrics}"
    );
    server.stop().await;
}

/// The operator certificate is an attestation credential only: presented as the TLS client
/// certificate, as if it were a node SVID, it gets nothing from the node API.
#[tokio::test]
async fn an_operator_certificate_is_no_node_svid() {
    let dir = tempfile::tempdir().unwrap();
    let operator = OperatorCa::new("operator node CA");
    let mut cfg = config(dir.path(), 24 * HOUR, HOUR);
    cfg.x509pop = Some(operator.roots());
    let server = TestServer::start(cfg).await;
    // The node exists (attested), so only the credential decides.
    let n1 = operator.node_credential("n1");
    let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, req) = x509pop_request(&n1, &exporter, "n1");
    client.attest_x509_pop(req).await.unwrap();
    let own = Some((n1.chain.clone(), n1.key.clone_key()));
    match try_node_client(server.addr, server.bundle(), own).await {
        Err(_) => {} // the handshake was refused
        Ok(mut c) => {
            let err = c.sync(SyncRequest::default()).await.unwrap_err();
            assert!(
                matches!(
                    err.code(),
                    Code::Unavailable | Code::Unknown | Code::Unauthenticated
                ),
                "{err:?}"
            );
            let (_, csr) = key_and_csr();
            assert!(
                c.renew_node_svid(RenewNodeSvidRequest { csr })
                    .await
                    .is_err()
            );
        }
    }
    let metrics = server.registry.metrics().encode();
    assert!(
        // (The channel may dial again after the refusal: once or more.)
        metrics.contains("node_api_connections_closed_total{reason=\"TlsHandshakeFailed\"}"),
        "the server refused the handshake: {metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn x509pop_is_refused_by_a_server_without_an_operator_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let n1 = OperatorCa::new("operator").node_credential("n1");
    let (mut client, exporter) = attestation_client(server.addr, server.bundle()).await;
    let (_, req) = x509pop_request(&n1, &exporter, "n1");
    let err = client.attest_x509_pop(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("start it with --x509pop-ca"),
        "{}",
        err.message()
    );
    server.stop().await;
}
