//! Registration entries as an operator (or someone with the admin socket) and a node see them,
//! against a real server: over the admin socket, entries for reserved IDs, under parents that
//! are not nodes, with selectors no agent produces, bad DNS names, out-of-range TTLs or
//! duplicating another entry are refused with the reason; over the node API (mutual TLS), an
//! entry the server cannot sign never keeps a node from its other SVIDs.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, SystemTime};

use meshauth_datastore::{EntryId, NewEntry, Store};
use meshauth_proto::admin::admin_client::AdminClient;
use meshauth_proto::admin::{EntryRequest, HealthRequest};
use meshauth_proto::node::{
    AttestJoinTokenRequest, CsrForEntry, Entry, Selector, SignWorkloadSvidsRequest,
};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

const HOUR: Duration = Duration::from_secs(3600);
const CA_TTL: Duration = Duration::from_secs(24 * 3600);

fn id(path: &str) -> String {
    format!("spiffe://{TD}{path}")
}

fn entry(path: &str, parent: &str, selectors: &[&str]) -> Entry {
    Entry {
        spiffe_id: id(path),
        parent_id: id(parent),
        selectors: selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap();
                Selector {
                    r#type: kind.into(),
                    value: value.into(),
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn web() -> Entry {
    entry("/web", "/node/n1", &["unix:uid:1000"])
}

async fn start(dir: &std::path::Path) -> (TestServer, AdminClient<Channel>) {
    let server = TestServer::start(config(dir, CA_TTL, HOUR)).await;
    let admin = meshauth_server::admin_client::connect(&server.admin_socket)
        .await
        .unwrap();
    (server, admin)
}

/// Creating `e` is refused as invalid, with a message containing every one of `expected`.
async fn refused(admin: &mut AdminClient<Channel>, e: Entry, expected: &[&str]) {
    let what = format!("{} {:?}", e.spiffe_id, e.selectors);
    let err = admin
        .create_entry(e)
        .await
        .expect_err(&format!("{what} must be refused"));
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{what}: {}",
        err.message()
    );
    for part in expected {
        assert!(
            err.message().contains(part),
            "{what}: expected {part:?} in {:?}",
            err.message()
        );
    }
}

/// The server still answers (no handler panicked).
async fn still_serving(admin: &mut AdminClient<Channel>) {
    admin.health(HealthRequest {}).await.unwrap();
}

#[tokio::test]
async fn reserved_ids_are_refused_naming_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    for (path, prefix) in [
        ("/meshauth/server", "/meshauth/"),
        ("/meshauth/x", "/meshauth/"),
        ("/meshauth", "/meshauth/"),
        ("/node/n1", "/node/"),
        ("/node/n2", "/node/"),
        ("/identity/300", "/identity/"),
        ("/identity/1/x", "/identity/"),
    ] {
        refused(
            &mut admin,
            entry(path, "/node/n1", &["unix:uid:1000"]),
            &["is reserved", &format!("IDs under {}", id(prefix))],
        )
        .await;
    }
    // Look-alikes outside the namespaces are ordinary IDs.
    for path in [
        "/nodes/n1",
        "/meshauthx",
        "/ns/meshauth/server",
        "/identity-300",
    ] {
        admin
            .create_entry(entry(path, "/node/n1", &["unix:uid:1000"]))
            .await
            .unwrap_or_else(|e| panic!("{path}: {}", e.message()));
    }
    // An update cannot move an entry into a reserved namespace either; the entry is unchanged.
    let created = admin.create_entry(web()).await.unwrap().into_inner();
    let mut to_server = entry("/meshauth/server", "/node/n1", &["unix:uid:1000"]);
    to_server.id = created.id.clone();
    let err = admin.update_entry(to_server).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("is reserved"), "{}", err.message());
    let kept = admin
        .get_entry(EntryRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept, created);
    server.stop().await;
}

#[tokio::test]
async fn parents_must_be_node_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    for parent in [
        "/web",
        "/node",
        "/node/n1/x",
        "/node/N1",
        "/meshauth/server",
        "/identity/300",
    ] {
        refused(
            &mut admin,
            entry("/web", parent, &["unix:uid:1000"]),
            &["is not a node ID", &id("/node/<name>")],
        )
        .await;
    }
    let mut foreign = web();
    foreign.parent_id = "spiffe://other.test/node/n1".into();
    refused(&mut admin, foreign, &["not in trust domain"]).await;
    // A node that has not attested yet may have entries waiting for it.
    assert!(server.registry.nodes().unwrap().is_empty());
    admin
        .create_entry(entry("/web", "/node/later", &["unix:uid:1000"]))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn selectors_must_be_what_agents_produce() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    let cases: &[(&[&str], &str)] = &[
        (&["unix:uid:abc"], "a uid is a decimal number"),
        (&["unix:uid:-1"], "a uid is a decimal number"),
        (&["unix:uid:+5"], "a uid is a decimal number"),
        (&["unix:uid:007"], "a uid is a decimal number"),
        (&["unix:uid:4294967296"], "a uid is a decimal number"),
        (&["unix:gid:"], "a gid is a decimal number"),
        (&["unix:gid:1.5"], "a gid is a decimal number"),
        (&["unix:pid:1"], "unix:pid is not supported"),
        (&["unix:uid"], "the unix selectors are"),
        (&["unix:user:root"], "the unix selectors are"),
        (&["unix:path:bin/sh"], "absolute path"),
        (&["unix:path:/usr/../bin/sh"], "absolute path"),
        (&["unix:path:/usr//bin/sh"], "absolute path"),
        (&["unix:path:/usr/bin/"], "absolute path"),
        (&["unix:path:/"], "absolute path"),
        (&["netns:abc"], "inode number"),
        (&["netns:18446744073709551616"], "inode number"),
        (&["foo:bar"], "unknown type \"foo\""),
        (&["k8s:ns:default"], "unknown type \"k8s\""),
        (
            &["unix:uid:1000", "unix:uid:1001"],
            "can never both match: a process has only one uid",
        ),
        (
            &["netns:1", "netns:2"],
            "a process has only one network namespace",
        ),
    ];
    for (selectors, expected) in cases {
        refused(
            &mut admin,
            entry("/web", "/node/n1", selectors),
            &[expected],
        )
        .await;
    }
    let many: Vec<String> = (0..33).map(|i| format!("unix:uid:{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(
        &mut admin,
        entry("/web", "/node/n1", &many),
        &["at most 32 selectors"],
    )
    .await;
    refused(
        &mut admin,
        entry("/web", "/node/n1", &[]),
        &["at least one selector"],
    )
    .await;

    // Every kind the agent produces, at its limits, in one entry; repeats are one selector.
    let all = admin
        .create_entry(entry(
            "/web",
            "/node/n1",
            &[
                "unix:uid:0",
                "unix:gid:4294967295",
                "unix:path:/usr/bin/curl",
                "netns:18446744073709551615",
                "unix:uid:0",
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.selectors.len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn dns_names_must_be_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    let long_label = format!("{}.test", "a".repeat(64));
    let long_name = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62),
    ]
    .join(".");
    assert_eq!(long_name.len(), 254);
    for bad in [
        "",
        "bad_name",
        "web test",
        "-web.test",
        "web.test.",
        "10.0.0.1",
        "*",
        "a.*.test",
        "é.test",
        &long_label,
        &long_name,
    ] {
        let mut e = web();
        e.dns_names = vec!["ok.test".into(), bad.into()];
        refused(&mut admin, e, &["is not a host name"]).await;
    }
    let mut e = web();
    e.dns_names = (0..33).map(|i| format!("w{i}.test")).collect();
    refused(&mut admin, e, &["at most 32 DNS names"]).await;
    let mut e = web();
    e.dns_names = vec![
        "web.test.local".into(),
        "*.test.local".into(),
        long_name[1..].into(),
    ];
    admin.create_entry(e).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn ttls_are_bounded_and_never_panic_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    for secs in [-1, i64::MIN] {
        let mut e = web();
        e.x509_svid_ttl_seconds = secs;
        refused(&mut admin, e, &["out of range", "must be positive"]).await;
    }
    for secs in [i64::MAX, CA_TTL.as_secs() as i64 + 1] {
        let mut e = web();
        e.x509_svid_ttl_seconds = secs;
        refused(
            &mut admin,
            e,
            &["out of range", "at most the CA lifetime of 86400s"],
        )
        .await;
    }
    still_serving(&mut admin).await;
    // On the wire 0 is "the server's default" (proto3 has no "unset"); the registry refuses an
    // explicit zero, and anything under a second (stored as whole seconds, it would be zero).
    let mut e = web();
    e.x509_svid_ttl_seconds = 0;
    let default = admin.create_entry(e).await.unwrap().into_inner();
    assert_eq!(default.x509_svid_ttl_seconds, 0);
    for ttl in [Duration::ZERO, Duration::from_millis(999)] {
        let err = server
            .registry
            .create_entry(NewEntry {
                spiffe_id: id("/zero").parse().unwrap(),
                parent_id: id("/node/n1").parse().unwrap(),
                selectors: vec!["unix:uid:1".parse().unwrap()],
                x509_svid_ttl: Some(ttl),
                dns_names: vec![],
            })
            .unwrap_err();
        assert!(err.to_string().contains("at least 1s"), "{err}");
    }
    // The bounds themselves are fine.
    for (path, secs) in [("/one", 1), ("/ca", CA_TTL.as_secs() as i64)] {
        let mut e = entry(path, "/node/n1", &["unix:uid:1000"]);
        e.x509_svid_ttl_seconds = secs;
        let created = admin.create_entry(e).await.unwrap().into_inner();
        assert_eq!(created.x509_svid_ttl_seconds, secs);
    }
    // A join token whose lifetime no clock can hold is an error, not a panic.
    let err = server
        .registry
        .create_join_token(
            &"n1".parse().unwrap(),
            Some(Duration::from_secs(i64::MAX as u64)),
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("reaches past the latest time"),
        "{err}"
    );
    still_serving(&mut admin).await;
    server.stop().await;
}

#[tokio::test]
async fn duplicates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    let both = ["unix:uid:1000", "unix:gid:0"];
    let first = admin
        .create_entry(entry("/web", "/node/n1", &both))
        .await
        .unwrap()
        .into_inner();
    // The same set in another order, with other TTL and DNS names, is the same entry.
    let mut again = entry("/web", "/node/n1", &["unix:gid:0", "unix:uid:1000"]);
    again.x509_svid_ttl_seconds = 60;
    again.dns_names = vec!["web.test".into()];
    refused(
        &mut admin,
        again,
        &[
            "already has this SPIFFE ID, parent ID and selector set",
            &first.id,
        ],
    )
    .await;
    // Another parent, ID or selector set is another entry.
    admin
        .create_entry(entry("/web", "/node/n2", &both))
        .await
        .unwrap();
    admin
        .create_entry(entry("/web2", "/node/n1", &both))
        .await
        .unwrap();
    let mut second = admin
        .create_entry(entry("/web", "/node/n1", &["unix:uid:1000"]))
        .await
        .unwrap()
        .into_inner();
    // An update may keep an entry's own fields but not copy another's.
    second.x509_svid_ttl_seconds = 120;
    let kept = admin
        .update_entry(second.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.revision, 2);
    let mut copy = entry("/web", "/node/n1", &both);
    copy.id = second.id.clone();
    let err = admin.update_entry(copy).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains(&first.id), "{}", err.message());
    assert_eq!(server.registry.count_entries().unwrap(), 4);
    server.stop().await;
}

#[tokio::test]
async fn an_unsignable_entry_never_blocks_the_nodes_other_svids() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin) = start(dir.path()).await;
    // The node attests.
    let mut anonymous = node_client(server.addr, server.bundle(), None).await;
    let (key, csr) = key_and_csr();
    let attested = anonymous
        .attest_join_token(AttestJoinTokenRequest {
            token: server.token("n1"),
            node_name: "n1".into(),
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    let own = (chain(&attested.svid_chain), pkcs8(&key));
    let mut node = node_client(server.addr, server.bundle(), Some(own)).await;

    // One good entry through the API; entries the API now refuses, written into the store
    // behind the server's back (as a datastore from before these checks would hold them).
    let good = admin.create_entry(web()).await.unwrap().into_inner();
    let store = Store::open(&dir.path().join("data/meshauth.db")).unwrap();
    let stored = |path: &str, ttl: Option<Duration>, dns: &[&str]| {
        store
            .create_entry(NewEntry {
                spiffe_id: id(path).parse().unwrap(),
                parent_id: id("/node/n1").parse().unwrap(),
                selectors: vec!["unix:uid:1000".parse().unwrap()],
                x509_svid_ttl: ttl,
                dns_names: dns.iter().map(|d| d.to_string()).collect(),
            })
            .unwrap()
    };
    let endless = stored("/endless", Some(Duration::from_secs(i64::MAX as u64)), &[]);
    let bad_dns = stored("/bad-dns", None, &["bad_name"]);
    let server_id = stored("/meshauth/server", None, &[]);
    let unknown = EntryId::random();

    let csr_for = |entry_id: &str| CsrForEntry {
        entry_id: entry_id.into(),
        csr: key_and_csr().1,
    };
    let resp = node
        .sign_workload_svids(SignWorkloadSvidsRequest {
            csrs: vec![
                csr_for(endless.id.as_str()),
                csr_for(&good.id),
                csr_for(bad_dns.id.as_str()),
                csr_for(server_id.id.as_str()),
                csr_for(unknown.as_str()),
                csr_for("not-an-entry-id"),
            ],
        })
        .await
        .expect("one bad entry does not fail the batch")
        .into_inner();

    assert_eq!(resp.svids.len(), 1, "{resp:?}");
    assert_eq!(resp.svids[0].entry_id, good.id);
    let v = meshauth_spiffe::validate_x509_svid(
        &chain(&resp.svids[0].svid_chain),
        &server.bundle(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(v.spiffe_id.to_string(), id("/web"));

    let refusal = |entry_id: &str| {
        resp.refused
            .iter()
            .find(|r| r.entry_id == entry_id)
            .unwrap_or_else(|| panic!("no refusal for {entry_id}: {resp:?}"))
    };
    assert_eq!(resp.refused.len(), 5, "{resp:?}");
    for (entry_id, reason, expected) in [
        (endless.id.as_str(), "InvalidRequest", "TTL"),
        (bad_dns.id.as_str(), "InvalidRequest", "invalid DNS name"),
        (server_id.id.as_str(), "InvalidRequest", "is reserved"),
        (unknown.as_str(), "EntryUnknown", "no entry with id"),
        ("not-an-entry-id", "InvalidRequest", "invalid entry id"),
    ] {
        let r = refusal(entry_id);
        assert_eq!(r.reason, reason, "{r:?}");
        assert!(r.message.contains(expected), "{r:?}");
    }
    let metrics = server.registry.metrics().encode();
    assert!(metrics.contains("reason=\"EntryUnknown\""), "{metrics}");
    assert!(metrics.contains("reason=\"InvalidRequest\""), "{metrics}");

    // The server is fine afterwards, and the good entry keeps signing.
    let again = node
        .sign_workload_svids(SignWorkloadSvidsRequest {
            csrs: vec![csr_for(&good.id)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.svids.len(), again.refused.len()), (1, 0));
    still_serving(&mut admin).await;
    server.stop().await;
}
