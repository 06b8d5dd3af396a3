//! Server replicas sharing one etcd (a real etcd process): one CA sealed in etcd, one leader
//! that rotates it while the other follows, and what one replica registers reaches the sync
//! streams of agents connected to the other, as the parts it touched (no full rebuild of the
//! other's cluster view).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use meshauth_proto::node::{AttestJoinTokenRequest, SyncRequest};
use meshauth_server::datastore_url::DatastoreUrl;
use meshauth_test_support::etcd::Etcd;
use support::*;

fn replica_config(
    dir: &std::path::Path,
    name: &str,
    etcd: &Etcd,
    kek: &std::path::Path,
    ca_ttl: Duration,
) -> meshauth_server::ServerConfig {
    let mut c = config(&dir.join(name), ca_ttl, Duration::from_secs(2));
    std::fs::create_dir_all(dir.join(name)).unwrap();
    c.datastore = DatastoreUrl::Etcd {
        endpoints: vec![etcd.endpoint()],
        prefix: Some("/test/replicas".into()),
    };
    c.kek_file = Some(kek.to_owned());
    c
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An entry for uid 1000's workload on `node`.
fn workload_of(node: &str) -> meshauth_datastore::NewEntry {
    meshauth_datastore::NewEntry {
        spiffe_id: format!("spiffe://{TD}/w").parse().unwrap(),
        parent_id: format!("spiffe://{TD}/node/{node}").parse().unwrap(),
        selectors: vec!["unix:uid:1000".parse().unwrap()],
        x509_svid_ttl: None,
        dns_names: vec![],
    }
}

/// Writes a fresh key-encryption key file into `dir`.
fn kek_file(dir: &std::path::Path) -> std::path::PathBuf {
    let kek = dir.join("kek");
    std::fs::write(&kek, "c3".repeat(32)).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    kek
}

/// Counts `meshauth_server_view_builds_total{kind}` of `server`.
fn view_builds(server: &TestServer, kind: &str) -> u64 {
    let text = server.registry.metrics().encode();
    let line = format!("meshauth_server_view_builds_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_ca_one_leader_and_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"));
    let kek = kek_file(dir.path());
    // A short CA lifetime: the leader prepares a new authority after 6 s.
    let ca_ttl = Duration::from_secs(12);
    let a = TestServer::start(replica_config(dir.path(), "a", &etcd, &kek, ca_ttl)).await;
    let b = TestServer::start(replica_config(dir.path(), "b", &etcd, &kek, ca_ttl)).await;

    // One CA: b loaded the one a created and sealed.
    assert_eq!(a.bundle().authorities, b.bundle().authorities);
    // What etcd holds, read as anyone with access to etcd (or its backups) would: sealed.
    let raw = meshauth_datastore::EtcdStore::connect(
        &[etcd.endpoint()],
        "/test/replicas",
        Duration::from_secs(5),
    )
    .unwrap();
    let stored = meshauth_datastore::Datastore::load_ca_journal(&raw)
        .unwrap()
        .unwrap();
    assert!(stored.starts_with("meshauth-sealed:v1:"));
    assert!(!stored.contains('"'), "no JSON of the CA journal in etcd");
    // A replica with another key-encryption key cannot take the CA, and says why.
    let other = dir.path().join("other-kek");
    std::fs::write(&other, "d4".repeat(32)).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = meshauth_server::Server::bind(replica_config(dir.path(), "c", &etcd, &other, ca_ttl))
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("every replica must read the same --kek-file"),
        "{e:#}"
    );
    let leaders = || [a.registry.is_leader(), b.registry.is_leader()];
    wait_for("one leader", || {
        (leaders().iter().filter(|l| **l).count() == 1).then_some(())
    })
    .await;

    // A node attests at b with a token made at a, and syncs from b.
    let token = a.token("n1");
    let mut attest = node_client(b.addr, b.bundle(), None).await;
    let (key, csr) = key_and_csr();
    let issued = attest
        .attest_join_token(AttestJoinTokenRequest {
            token: token.clone(),
            node_name: "n1".into(),
            csr,
        })
        .await
        .expect("a token made at one replica attests at the other")
        .into_inner();
    let n1 = (chain(&issued.svid_chain), pkcs8(&key));
    let e = attest
        .attest_join_token(AttestJoinTokenRequest {
            token,
            node_name: "n1".into(),
            csr: key_and_csr().1,
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("already used"),
        "a token works once, across replicas: {e}"
    );
    let mut c = node_client(b.addr, b.bundle(), Some(n1)).await;
    let mut stream = c.sync(SyncRequest::default()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.entries.is_empty());

    // An entry and a policy registered at a reach the stream at b.
    a.registry.create_entry(workload_of("n1")).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stream.message().await.unwrap().unwrap();
            if !m.entries.is_empty() {
                return m;
            }
        }
    })
    .await
    .expect("a's registration reaches b's sync stream");
    assert!(got.delta);
    assert_eq!(got.entries[0].spiffe_id, format!("spiffe://{TD}/w"));

    // Identities allocated at both replicas at once, by several threads each (as concurrent
    // admin calls are), agree: one identity per label set, never one id for two sets.
    let mut threads = Vec::new();
    for (r, reg) in [&a, &b].into_iter().enumerate() {
        for t in 0..4 {
            let reg = std::sync::Arc::clone(&reg.registry);
            threads.push(tokio::task::spawn_blocking(move || {
                (0..12)
                    .map(|i| {
                        let labels = format!("app=x{}", (i + t) % 12);
                        let pod = reg
                            .create_pod(
                                "default",
                                &format!("p{r}-{t}-{i}"),
                                labels.parse().unwrap(),
                                &"n1".parse().unwrap(),
                            )
                            .unwrap();
                        (labels, pod.identity)
                    })
                    .collect::<Vec<_>>()
            }));
        }
    }
    let mut by_labels = std::collections::BTreeMap::new();
    for t in threads {
        for (labels, id) in t.await.unwrap() {
            let first = *by_labels.entry(labels.clone()).or_insert(id);
            assert_eq!(first, id, "{labels} got two identities");
        }
    }
    let ids: std::collections::BTreeSet<_> = by_labels.values().collect();
    assert_eq!(
        ids.len(),
        12,
        "twelve label sets, twelve identities: {by_labels:?}"
    );

    // The leader prepares the next authority; the follower serves it in its bundle too.
    let before = a.bundle().authorities.len();
    wait_for("a rotation seen by both replicas", || {
        let (na, nb) = (a.bundle(), b.bundle());
        (na.authorities.len() > before && na.authorities == nb.authorities).then_some(())
    })
    .await;
    let now = SystemTime::now();
    assert_eq!(
        a.registry.bundle(now).sequence,
        b.registry.bundle(now).sequence
    );
    // Both TLS listeners trust it too, the follower's included (it loads the leader's
    // journal through its change feed).
    wait_for("both listeners to trust the rotated bundle", || {
        let (na, nb) = (a.bundle(), b.bundle());
        (a.trust.get().authorities == na.authorities && b.trust.get().authorities == nb.authorities)
            .then_some(())
    })
    .await;
    drop(stream);

    // The leader stops (and resigns): the other leads.
    let (leader, follower) = if a.registry.is_leader() {
        (a, b)
    } else {
        (b, a)
    };
    leader.stop().await;
    wait_for("the follower to lead", || {
        follower.registry.is_leader().then_some(())
    })
    .await;
    follower.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_changes_update_the_view_without_a_full_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&dir.path().join("etcd"));
    let kek = kek_file(dir.path());
    // No CA rotation during the test.
    let ca_ttl = Duration::from_secs(24 * 3600);
    let a = TestServer::start(replica_config(dir.path(), "a", &etcd, &kek, ca_ttl)).await;
    let b = TestServer::start(replica_config(dir.path(), "b", &etcd, &kek, ca_ttl)).await;

    // A node attests at b and syncs from b: b has built its first view.
    let token = a.token("n1");
    let mut attest = node_client(b.addr, b.bundle(), None).await;
    let (key, csr) = key_and_csr();
    let issued = attest
        .attest_join_token(AttestJoinTokenRequest {
            token,
            node_name: "n1".into(),
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    let n1 = (chain(&issued.svid_chain), pkcs8(&key));
    let mut c = node_client(b.addr, b.bundle(), Some(n1)).await;
    let mut stream = c.sync(SyncRequest::default()).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let full = view_builds(&b, "Full");
    let incremental = view_builds(&b, "Incremental");
    assert!(full >= 1, "b's first view is a full build");

    // A pod (with a new identity), a policy and an entry, made at a.
    let pod = a
        .registry
        .create_pod(
            "default",
            "web-1",
            "app=web".parse().unwrap(),
            &"n1".parse().unwrap(),
        )
        .unwrap();
    a.registry
        .apply_policies(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{}]}]\n",
            None,
        )
        .unwrap();
    a.registry.create_entry(workload_of("n1")).unwrap();
    // All of them reach the stream at b.
    let (mut identity, mut endpoint, mut policy, mut entry) = (false, false, false, false);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(identity && endpoint && policy && entry) {
            let m = stream.message().await.unwrap().unwrap();
            identity |= m.identities.iter().any(|i| i.id == pod.identity.get());
            endpoint |= m.endpoints.iter().any(|e| e.name == "web-1");
            policy |= !m.policies.is_empty();
            entry |= m
                .entries
                .iter()
                .any(|e| e.spiffe_id == format!("spiffe://{TD}/w"));
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a's changes reach b's stream: identity {identity}, endpoint {endpoint}, policy {policy}, entry {entry}"
        )
    });
    assert_eq!(
        view_builds(&b, "Full"),
        full,
        "a's changes made b read the whole store again"
    );
    assert!(
        view_builds(&b, "Incremental") > incremental,
        "b applied a's changes to its view"
    );
    drop(stream);
    a.stop().await;
    b.stop().await;
}
