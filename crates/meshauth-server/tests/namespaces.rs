//! Namespaces on the server: a pod's identity is its labels in its namespace, policies are
//! stored and deleted by key (`namespace/name`, or `name` for a clusterwide policy), and a
//! store written before namespaces is brought up to them when the server starts.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::Duration;

use meshauth_policy::{IdentityId, Labels, PolicyKey, parse_policies};
use support::*;

const HOUR: Duration = Duration::from_secs(3600);

fn labels(s: &str) -> Labels {
    s.parse().unwrap()
}

const CNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{}]}]\n";
const CNP_PROD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: allow, namespace: prod}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEndpoints: [{}]}]\n";
const CCNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: allow}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEntities: [cluster]}]\n";

#[tokio::test]
async fn the_same_labels_in_two_namespaces_are_two_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let r = &server.registry;
    let n1 = "n1".parse().unwrap();
    let a = r
        .create_pod("default", "web-1", labels("app=web"), &n1)
        .unwrap();
    let b = r
        .create_pod("prod", "web-1", labels("app=web"), &n1)
        .unwrap();
    let c = r
        .create_pod("default", "web-2", labels("app=web"), &n1)
        .unwrap();
    assert_ne!(a.identity, b.identity, "one identity per namespace");
    assert_eq!(a.identity, c.identity, "one identity per label set");
    // The stored pod shows its labels; the identity carries the namespace.
    assert_eq!(a.labels, labels("app=web"));
    let ids: std::collections::BTreeMap<IdentityId, Labels> =
        r.identities().unwrap().into_iter().collect();
    assert_eq!(ids[&a.identity].namespace(), Some("default"));
    assert_eq!(ids[&b.identity].namespace(), Some("prod"));
    // A pod cannot choose its namespace by labelling itself.
    let d = r
        .create_pod(
            "default",
            "sneaky",
            labels("app=web,io.kubernetes.pod.namespace=prod"),
            &n1,
        )
        .unwrap();
    assert_eq!(d.identity, a.identity);
    // A bad namespace is refused in one sentence.
    let e = r
        .create_pod("Prod", "web-3", labels("app=web"), &n1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid namespace \"Prod\""), "{e}");
    assert_eq!(e.lines().count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn policies_are_stored_and_deleted_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let r = &server.registry;
    let keys = r.apply_policies(CNP, None).unwrap();
    assert_eq!(keys, vec![PolicyKey::namespaced("default", "allow")]);
    let keys = r.apply_policies(CNP, Some("staging")).unwrap();
    assert_eq!(keys, vec![PolicyKey::namespaced("staging", "allow")]);
    // A document naming its namespace keeps it, whatever -n says.
    let keys = r.apply_policies(CNP_PROD, Some("staging")).unwrap();
    assert_eq!(keys, vec![PolicyKey::namespaced("prod", "allow")]);
    r.apply_policies(CCNP, None).unwrap();
    let stored = r.policies().unwrap();
    let stored_keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        stored_keys,
        ["allow", "default/allow", "prod/allow", "staging/allow"]
    );
    // The stored documents name their namespace: agents parse them the same way.
    for (key, yaml) in &stored {
        let p = parse_policies(yaml).unwrap();
        assert_eq!(p[0].key().to_string(), *key, "{yaml}");
    }
    // Bad input: one sentence each.
    for (bad, want) in [
        (r.apply_policies(CNP, Some("Bad_NS")), "invalid namespace"),
        (
            r.apply_policies(
                "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x, namespace: a}\nspec: {endpointSelector: {}}\n",
                None,
            ),
            "has no namespace",
        ),
    ] {
        let e = bad.unwrap_err().to_string();
        assert!(e.contains(want) && e.lines().count() == 1, "{e}");
    }
    // Deleting: a bare name is the clusterwide policy, then default/<name>.
    assert_eq!(
        r.delete_policy("allow").unwrap(),
        PolicyKey::clusterwide("allow")
    );
    assert_eq!(
        r.delete_policy("allow").unwrap(),
        PolicyKey::namespaced("default", "allow")
    );
    let e = r.delete_policy("allow").unwrap_err().to_string();
    assert!(
        e.contains("no policy allow") && e.contains("prod/allow, staging/allow"),
        "{e}"
    );
    assert_eq!(
        r.delete_policy("prod/allow").unwrap(),
        PolicyKey::namespaced("prod", "allow")
    );
    let e = r.delete_policy("nope/allow").unwrap_err().to_string();
    assert!(e.contains("no policy nope/allow"), "{e}");
    let e = r.delete_policy("Bad/allow").unwrap_err().to_string();
    assert!(e.contains("invalid namespace \"Bad\""), "{e}");
    server.stop().await;
}

#[tokio::test]
async fn a_store_from_before_namespaces_is_brought_up_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    server.stop().await;
    // What an earlier version wrote: policies under their bare name, documents without a
    // namespace, and a pod whose identity is its labels alone.
    {
        let store =
            meshauth_datastore::Store::open(&dir.path().join("data").join("meshauth.db")).unwrap();
        store
            .put_policies(&[
                ("allow".into(), CNP.into()),
                (
                    "allow-ccnp".into(),
                    CCNP.replace("name: allow", "name: allow-ccnp"),
                ),
            ])
            .unwrap();
        let old = IdentityId::new(256);
        store.insert_identity(old, &labels("app=web")).unwrap();
        store
            .put_pod(&meshauth_datastore::PodRecord {
                namespace: "default".into(),
                name: "web-1".into(),
                labels: labels("app=web"),
                node: "n1".parse().unwrap(),
                identity: old,
                runtime: None,
            })
            .unwrap();
    }
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let r = &server.registry;
    let stored = r.policies().unwrap();
    let keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["allow-ccnp", "default/allow"]);
    assert!(
        stored[1].1.contains("namespace: default"),
        "{}",
        stored[1].1
    );
    let pod = r.pods().unwrap().remove(0);
    assert_eq!(pod.labels, labels("app=web"), "the pod keeps its labels");
    let ids: std::collections::BTreeMap<IdentityId, Labels> =
        r.identities().unwrap().into_iter().collect();
    assert_eq!(
        ids[&pod.identity],
        labels("app=web,io.kubernetes.pod.namespace=default")
    );
    // A second start changes nothing.
    server.stop().await;
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    assert_eq!(server.registry.policies().unwrap(), stored);
    assert_eq!(server.registry.pods().unwrap()[0].identity, pod.identity);
    server.stop().await;
}
