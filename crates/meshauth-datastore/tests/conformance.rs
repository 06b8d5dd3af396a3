//! The contract of [`Datastore`], run against every backend: each `fn` below takes a
//! `&dyn Datastore`, and `contract!` makes one `#[test]` per backend of it (`sqlite::<name>`
//! on an in-memory store, `etcd::<name>` on a real etcd under a key prefix of its own). The
//! etcd store's own promises (concurrent writers, the change feed, leader election, errors
//! when etcd is gone) are tested in `etcd_only`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_datastore::{
    Datastore, EntryFilter, NewEntry, NodeAttestation, NodeName, NodeSpec, PodRecord, PodRuntime,
    StoreError,
};
use meshauth_policy::{IdentityId, Labels, TunnelKey};
use meshauth_spiffe::SpiffeId;

/// One `#[test]` per backend for each contract function.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let store = meshauth_datastore::Store::in_memory().unwrap();
                    super::$name(&store);
                }
            )*
        }

        mod etcd {
            $(
                #[test]
                fn $name() {
                    let etcd = super::harness::shared_etcd();
                    let store = super::harness::store(&etcd.etcd, stringify!($name));
                    super::$name(&store);
                }
            )*
        }
    };
}

contract!(
    ca_journal_is_replaced_whole,
    tunnel_keys_are_kept_and_never_shared,
    join_token_works_once_and_for_its_node_only,
    join_token_expires,
    join_token_lifetime_past_the_clock_is_an_error,
    how_a_node_attested_is_kept_and_follows_its_latest_attestation,
    nodes_ban_evict_and_keep_ids,
    unknown_nodes,
    node_specs_and_addresses,
    entries_crud_and_filters,
    duplicate_entries_are_refused,
    identities_are_unique_both_ways,
    pods_and_their_runtime,
    policies_put_rekey_delete,
);

/// Now, to the second: stores keep times to the second.
fn now() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn node(s: &str) -> NodeName {
    s.parse().unwrap()
}

fn new_entry(spiffe: &str, parent: &str) -> NewEntry {
    NewEntry {
        spiffe_id: id(spiffe),
        parent_id: id(parent),
        selectors: vec![
            "unix:uid:1000".parse().unwrap(),
            "unix:gid:0".parse().unwrap(),
        ],
        x509_svid_ttl: Some(Duration::from_secs(300)),
        dns_names: vec!["web.local".into()],
    }
}

fn attest(store: &dyn Datastore, name: &str, serial: &str) {
    let now = now();
    store
        .record_attestation(&node(name), NodeAttestation::JoinToken, serial, now, now)
        .unwrap();
}

fn ca_journal_is_replaced_whole(store: &dyn Datastore) {
    assert_eq!(store.load_ca_journal().unwrap(), None);
    store.save_ca_journal("{\"v\":1}").unwrap();
    store.save_ca_journal("{\"v\":2}").unwrap();
    assert_eq!(
        store.load_ca_journal().unwrap().as_deref(),
        Some("{\"v\":2}")
    );
    assert!(["sqlite", "etcd"].contains(&store.kind()));
}

fn tunnel_keys_are_kept_and_never_shared(store: &dyn Datastore) {
    attest(store, "a", "01");
    attest(store, "b", "02");
    let (k1, k2) = (TunnelKey::new([1; 32]), TunnelKey::new([2; 32]));
    assert!(store.set_node_tunnel_key(&node("a"), k1).unwrap());
    assert!(
        !store.set_node_tunnel_key(&node("a"), k1).unwrap(),
        "no change"
    );
    let err = store.set_node_tunnel_key(&node("b"), k1).unwrap_err();
    assert!(
        matches!(err, StoreError::DuplicateTunnelKey { ref owner, .. } if owner == "a"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("agent b published the WireGuard key of agent a")
    );
    assert!(store.set_node_tunnel_key(&node("b"), k2).unwrap());
    assert_eq!(
        store.node(&node("a")).unwrap().unwrap().tunnel_key,
        Some(k1)
    );
    assert_eq!(
        store.node(&node("b")).unwrap().unwrap().tunnel_key,
        Some(k2)
    );
    // A node may replace its own key; the old one is free again.
    let k3 = TunnelKey::new([3; 32]);
    assert!(store.set_node_tunnel_key(&node("a"), k3).unwrap());
    assert!(store.set_node_tunnel_key(&node("b"), k1).unwrap());
    // The key survives a re-attestation; an evicted node's key is free.
    attest(store, "a", "03");
    assert_eq!(
        store.node(&node("a")).unwrap().unwrap().tunnel_key,
        Some(k3)
    );
    store.evict_node(&node("a")).unwrap();
    assert!(store.set_node_tunnel_key(&node("b"), k3).unwrap());
    // An unknown node changes nothing.
    assert!(
        !store
            .set_node_tunnel_key(&node("zz"), TunnelKey::new([9; 32]))
            .unwrap()
    );
}

fn join_token_works_once_and_for_its_node_only(store: &dyn Datastore) {
    let now = now();
    let t = store
        .create_join_token(&node("n1"), Duration::from_secs(600), now)
        .unwrap();
    assert_eq!(t.node, node("n1"));
    assert_eq!(t.expires_at, now + Duration::from_secs(600));
    assert!(matches!(
        store.consume_join_token(&t.token, &node("n2"), now),
        Err(StoreError::TokenWrongNode { .. })
    ));
    // A refused attempt still burns the token.
    assert!(matches!(
        store.consume_join_token(&t.token, &node("n1"), now),
        Err(StoreError::TokenUnknown)
    ));
    let t = store
        .create_join_token(&node("n1"), Duration::from_secs(600), now)
        .unwrap();
    store
        .consume_join_token(&t.token, &node("n1"), now)
        .unwrap();
    assert!(matches!(
        store.consume_join_token(&t.token, &node("n1"), now),
        Err(StoreError::TokenUnknown)
    ));
    assert!(matches!(
        store.consume_join_token("never-issued", &node("n1"), now),
        Err(StoreError::TokenUnknown)
    ));
}

fn join_token_expires(store: &dyn Datastore) {
    let now = now();
    let t = store
        .create_join_token(&node("n1"), Duration::from_secs(10), now)
        .unwrap();
    assert!(matches!(
        store.consume_join_token(&t.token, &node("n1"), now + Duration::from_secs(11)),
        Err(StoreError::TokenExpired)
    ));
}

fn join_token_lifetime_past_the_clock_is_an_error(store: &dyn Datastore) {
    for ttl in [Duration::from_secs(i64::MAX as u64), Duration::MAX] {
        assert!(matches!(
            store.create_join_token(&node("n1"), ttl, now()),
            Err(StoreError::LifetimeOutOfRange { .. })
        ));
    }
}

fn how_a_node_attested_is_kept_and_follows_its_latest_attestation(store: &dyn Datastore) {
    let now = now();
    let a = store
        .record_attestation(&node("a"), NodeAttestation::JoinToken, "01", now, now)
        .unwrap();
    assert_eq!(a.attestation, NodeAttestation::JoinToken);
    assert!(!a.attestation.can_reattest());
    store
        .record_attestation(&node("a"), NodeAttestation::X509Pop, "02", now, now)
        .unwrap();
    let a = store.node(&node("a")).unwrap().unwrap();
    assert_eq!(a.attestation, NodeAttestation::X509Pop);
    assert!(a.attestation.can_reattest());
    assert_eq!(
        store.nodes().unwrap()[0].attestation,
        NodeAttestation::X509Pop
    );
}

fn nodes_ban_evict_and_keep_ids(store: &dyn Datastore) {
    let now = now();
    let later = now + Duration::from_secs(3600);
    let a = store
        .record_attestation(&node("a"), NodeAttestation::JoinToken, "01", later, now)
        .unwrap();
    assert_eq!(a.serial, "01");
    assert_eq!(a.previous_serial, None);
    assert!(!a.banned);
    let b = store
        .record_attestation(&node("b"), NodeAttestation::JoinToken, "02", now, now)
        .unwrap();
    assert_ne!(a.node_id, b.node_id);
    store
        .set_node_address(&node("a"), "10.0.0.1".parse().unwrap())
        .unwrap();
    let a2 = store
        .record_attestation(
            &node("a"),
            NodeAttestation::JoinToken,
            "03",
            now,
            now + Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(a2.node_id, a.node_id);
    assert_eq!(a2.serial, "03");
    assert_eq!(
        a2.attested_at, a.attested_at,
        "the first attestation's time stays"
    );
    assert_eq!(a2.address, Some("10.0.0.1".parse().unwrap()));
    let renewed = store.record_renewal(&node("a"), "03", "04", later).unwrap();
    assert_eq!(
        (renewed.serial.as_str(), renewed.previous_serial.as_deref()),
        ("04", Some("03"))
    );
    let a4 = store.node(&node("a")).unwrap().unwrap();
    assert_eq!(a4, renewed);
    assert_eq!(a4.serial, "04");
    assert!(a4.accepts_serial("04") && a4.accepts_serial("03") && !a4.accepts_serial("01"));
    // Renewed again with 03 (04 was never saved, never used): 03 stays, 04 goes.
    store.record_renewal(&node("a"), "03", "06", now).unwrap();
    let a6 = store.node(&node("a")).unwrap().unwrap();
    assert!(a6.accepts_serial("06") && a6.accepts_serial("03") && !a6.accepts_serial("04"));
    assert_eq!(store.usable_node(&node("a")).unwrap(), a6);

    let banned = store.ban_node(&node("a")).unwrap();
    assert!(banned.banned);
    assert!(matches!(
        store.usable_node(&node("a")),
        Err(StoreError::NodeBanned(_))
    ));
    assert!(matches!(
        store.record_renewal(&node("a"), "03", "05", now),
        Err(StoreError::NodeBanned(_))
    ));
    assert!(matches!(
        store.record_attestation(&node("a"), NodeAttestation::JoinToken, "05", now, now),
        Err(StoreError::NodeBanned(_))
    ));
    store.evict_node(&node("a")).unwrap();
    assert!(matches!(
        store.usable_node(&node("a")),
        Err(StoreError::NodeNotFound(_))
    ));
    // Re-attesting after eviction gets a new id: ids are never reused.
    let a3 = store
        .record_attestation(&node("a"), NodeAttestation::JoinToken, "06", now, now)
        .unwrap();
    assert!(a3.node_id > b.node_id);
    assert!(!a3.banned);
    let names: Vec<String> = store
        .nodes()
        .unwrap()
        .iter()
        .map(|n| n.name.to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(matches!(
        store.evict_node(&node("zz")),
        Err(StoreError::NodeNotFound(_))
    ));
}

fn unknown_nodes(store: &dyn Datastore) {
    let zz = node("zz");
    assert_eq!(store.node(&zz).unwrap(), None);
    assert!(store.nodes().unwrap().is_empty());
    assert!(matches!(
        store.usable_node(&zz),
        Err(StoreError::NodeNotFound(_))
    ));
    assert!(matches!(
        store.record_renewal(&zz, "01", "02", now()),
        Err(StoreError::NodeNotFound(_))
    ));
    assert!(matches!(
        store.ban_node(&zz),
        Err(StoreError::NodeNotFound(_))
    ));
    store
        .set_node_address(&zz, "10.0.0.9".parse().unwrap())
        .unwrap();
    assert_eq!(store.node(&zz).unwrap(), None, "no node made up");
}

fn node_specs_and_addresses(store: &dyn Datastore) {
    assert_eq!(store.node_spec(&node("n1")).unwrap(), None);
    let n2 = NodeSpec {
        name: node("n2"),
        address: None,
        pod_range: "10.200.2.0/24".parse().unwrap(),
    };
    let mut n1 = NodeSpec {
        name: node("n1"),
        address: Some("10.199.0.1".parse().unwrap()),
        pod_range: "10.200.1.0/24".parse().unwrap(),
    };
    store.put_node_spec(&n2).unwrap();
    store.put_node_spec(&n1).unwrap();
    assert_eq!(store.node_spec(&node("n1")).unwrap(), Some(n1.clone()));
    n1.address = None;
    n1.pod_range = "10.200.9.0/24".parse().unwrap();
    store.put_node_spec(&n1).unwrap();
    assert_eq!(store.node_specs().unwrap(), vec![n1, n2]);
}

fn entries_crud_and_filters(store: &dyn Datastore) {
    let e1 = store
        .create_entry(new_entry("spiffe://td/web", "spiffe://td/node/n1"))
        .unwrap();
    let e2 = store
        .create_entry(new_entry("spiffe://td/db", "spiffe://td/node/n2"))
        .unwrap();
    assert_eq!(e1.revision, 1);
    assert_ne!(e1.id, e2.id);
    assert_eq!(store.entry(&e1.id).unwrap(), e1);
    assert_eq!(
        e1.selectors[0].to_string(),
        "unix:gid:0",
        "selectors are sorted"
    );
    assert_eq!(
        store.list_entries(&EntryFilter::default()).unwrap(),
        vec![e2.clone(), e1.clone()],
        "by SPIFFE ID"
    );

    let by_parent = store
        .list_entries(&EntryFilter {
            parent_id: Some(id("spiffe://td/node/n2")),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_parent, vec![e2.clone()]);
    let by_spiffe_id = store
        .list_entries(&EntryFilter {
            spiffe_id: Some(id("spiffe://td/web")),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_spiffe_id, vec![e1.clone()]);
    let by_selector = store
        .list_entries(&EntryFilter {
            selectors: vec!["unix:uid:1000".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_selector.len(), 2);
    let none = store
        .list_entries(&EntryFilter {
            selectors: vec!["unix:uid:1".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
    assert!(none.is_empty());

    let mut changed = new_entry("spiffe://td/web2", "spiffe://td/node/n1");
    changed.x509_svid_ttl = None;
    let e1b = store.update_entry(&e1.id, changed.clone()).unwrap();
    assert_eq!(e1b.revision, 2);
    assert_eq!(e1b.x509_svid_ttl, None);
    assert_eq!(store.entry(&e1.id).unwrap(), e1b);
    assert_eq!(
        store.update_entry(&e1.id, changed).unwrap().revision,
        3,
        "every update counts"
    );

    store.delete_entry(&e1.id).unwrap();
    assert!(matches!(
        store.entry(&e1.id),
        Err(StoreError::EntryNotFound(_))
    ));
    assert!(matches!(
        store.delete_entry(&e1.id),
        Err(StoreError::EntryNotFound(_))
    ));
    assert!(matches!(
        store.update_entry(&e1.id, new_entry("spiffe://td/x", "spiffe://td/node/n1")),
        Err(StoreError::EntryNotFound(_))
    ));
    assert_eq!(store.count_entries().unwrap(), 1);
    // The deleted entry's fields are free again.
    store
        .create_entry(new_entry("spiffe://td/web2", "spiffe://td/node/n1"))
        .unwrap();
    assert_eq!(store.count_entries().unwrap(), 2);
}

fn duplicate_entries_are_refused(store: &dyn Datastore) {
    let first = store
        .create_entry(new_entry("spiffe://td/web", "spiffe://td/node/n1"))
        .unwrap();
    // The same selectors in another order, repeated, are the same set.
    let mut same = new_entry("spiffe://td/web", "spiffe://td/node/n1");
    same.selectors.reverse();
    same.selectors.push("unix:gid:0".parse().unwrap());
    same.x509_svid_ttl = None;
    match store.create_entry(same.clone()) {
        Err(StoreError::DuplicateEntry { existing }) => assert_eq!(existing, first.id),
        other => panic!("duplicate accepted: {other:?}"),
    }
    // Another parent, SPIFFE ID or selector set is another entry.
    let other_parent = new_entry("spiffe://td/web", "spiffe://td/node/n2");
    store.create_entry(other_parent).unwrap();
    let mut fewer = new_entry("spiffe://td/web", "spiffe://td/node/n1");
    fewer.selectors.pop();
    let second = store.create_entry(fewer.clone()).unwrap();
    // An update may not turn one entry into a duplicate of another, but may keep its own.
    assert!(matches!(
        store.update_entry(&second.id, same),
        Err(StoreError::DuplicateEntry { .. })
    ));
    assert_eq!(store.update_entry(&second.id, fewer).unwrap().revision, 2);
    assert_eq!(store.count_entries().unwrap(), 3);
    // An entry moved away frees its old fields.
    store
        .update_entry(
            &first.id,
            new_entry("spiffe://td/moved", "spiffe://td/node/n1"),
        )
        .unwrap();
    store
        .create_entry(new_entry("spiffe://td/web", "spiffe://td/node/n1"))
        .unwrap();
    let msg = StoreError::DuplicateEntry {
        existing: first.id.clone(),
    }
    .to_string();
    assert!(msg.contains(first.id.as_str()), "{msg}");
}

fn identities_are_unique_both_ways(store: &dyn Datastore) {
    let web: Labels = "app=web,tier=a b".parse().unwrap();
    let db: Labels = "app=db".parse().unwrap();
    store.insert_identity(IdentityId::new(300), &db).unwrap();
    store.insert_identity(IdentityId::new(256), &web).unwrap();
    assert!(
        store.insert_identity(IdentityId::new(257), &web).is_err(),
        "labels are unique"
    );
    assert!(
        store
            .insert_identity(IdentityId::new(256), &"app=other".parse().unwrap())
            .is_err(),
        "ids are unique"
    );
    assert_eq!(
        store.identities().unwrap(),
        vec![(IdentityId::new(256), web), (IdentityId::new(300), db)]
    );
}

fn pods_and_their_runtime(store: &dyn Datastore) {
    attest(store, "n1", "01");
    let web: Labels = "app=web".parse().unwrap();
    let pod = PodRecord {
        namespace: "default".into(),
        name: "web-1".into(),
        labels: web,
        node: node("n1"),
        identity: IdentityId::new(256),
        runtime: None,
    };
    store.put_pod(&pod).unwrap();
    assert_eq!(store.pods().unwrap(), vec![pod.clone()]);
    assert_eq!(store.pod("default", "web-1").unwrap(), Some(pod.clone()));
    assert_eq!(store.pod("default", "nope").unwrap(), None);
    assert_eq!(store.pod("other", "web-1").unwrap(), None);
    assert_eq!(store.pods_on_node(&node("n1")).unwrap(), vec![pod.clone()]);
    assert_eq!(store.pods_on_node(&node("n2")).unwrap(), vec![]);
    let rt = PodRuntime {
        ipv4: "10.200.1.10".parse().unwrap(),
        interface: "lxc10".into(),
    };
    assert!(
        store
            .set_pod_runtime("default", "web-1", Some(&rt))
            .unwrap()
    );
    assert!(
        store
            .set_pod_runtime("default", "web-1", Some(&rt))
            .unwrap(),
        "the pod exists"
    );
    assert_eq!(store.pods().unwrap()[0].runtime, Some(rt.clone()));
    let reported = PodRecord {
        runtime: Some(rt.clone()),
        ..pod.clone()
    };
    assert_eq!(
        store.pod("default", "web-1").unwrap(),
        Some(reported.clone())
    );
    assert_eq!(store.pods_on_node(&node("n1")).unwrap(), vec![reported]);
    assert!(
        !store.set_pod_runtime("default", "nope", Some(&rt)).unwrap(),
        "no such pod"
    );
    // Another pod cannot report the same address.
    let other = PodRecord {
        name: "web-2".into(),
        ..pod.clone()
    };
    store.put_pod(&other).unwrap();
    match store.set_pod_runtime("default", "web-2", Some(&rt)) {
        Err(StoreError::AddressInUse { ipv4, pod }) => {
            assert_eq!((ipv4, pod.as_str()), (rt.ipv4, "default/web-1"));
        }
        other => panic!("a taken address: {other:?}"),
    }
    assert_eq!(store.pod("default", "web-2").unwrap(), Some(other.clone()));
    // Re-placing on the same node keeps the runtime facts (those given are ignored); on
    // another node forgets them, and frees the address.
    store
        .put_pod(&PodRecord {
            labels: "app=web,v=2".parse().unwrap(),
            runtime: None,
            ..pod.clone()
        })
        .unwrap();
    assert_eq!(store.pods().unwrap()[0].runtime, Some(rt.clone()));
    store
        .put_pod(&PodRecord {
            node: node("n2"),
            ..pod.clone()
        })
        .unwrap();
    assert_eq!(store.pods().unwrap()[0].runtime, None);
    // A moved pod is listed under its new node only.
    assert_eq!(
        store.pods_on_node(&node("n1")).unwrap(),
        vec![other.clone()]
    );
    assert_eq!(
        store.pods_on_node(&node("n2")).unwrap(),
        vec![PodRecord {
            node: node("n2"),
            ..pod.clone()
        }]
    );
    assert!(
        store
            .set_pod_runtime("default", "web-2", Some(&rt))
            .unwrap()
    );
    store.set_pod_runtime("default", "web-2", None).unwrap();
    store.put_pod(&pod).unwrap();
    store
        .set_pod_runtime("default", "web-1", Some(&rt))
        .unwrap();
    // A pod's new address frees its old one.
    let rt2 = PodRuntime {
        ipv4: "10.200.1.11".parse().unwrap(),
        interface: "lxc11".into(),
    };
    store
        .set_pod_runtime("default", "web-1", Some(&rt2))
        .unwrap();
    store
        .set_pod_runtime("default", "web-2", Some(&rt))
        .unwrap();
    store.set_pod_runtime("default", "web-2", None).unwrap();
    store.evict_node(&node("n1")).unwrap();
    assert!(
        store.pods().unwrap().iter().all(|p| p.runtime.is_none()),
        "eviction forgets what the node reported; the placement stays"
    );
    assert_eq!(store.pods().unwrap().len(), 2);
    // The evicted node's addresses are free.
    store
        .set_pod_runtime("default", "web-2", Some(&rt2))
        .unwrap();
    assert!(store.delete_pod("default", "web-1").unwrap());
    assert!(!store.delete_pod("default", "web-1").unwrap());
    assert_eq!(store.pod("default", "web-1").unwrap(), None);
    assert_eq!(
        store
            .pods_on_node(&node("n1"))
            .unwrap()
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        vec!["web-2"],
        "a deleted pod leaves its node's list"
    );
    // A deleted pod's address is free; a new pod may come with its runtime facts.
    assert!(store.delete_pod("default", "web-2").unwrap());
    let placed = PodRecord {
        namespace: "other".into(),
        name: "a".into(),
        runtime: Some(rt2.clone()),
        ..pod.clone()
    };
    store.put_pod(&placed).unwrap();
    let later = PodRecord {
        namespace: "kube-system".into(),
        ..placed.clone()
    };
    assert!(
        matches!(
            store.put_pod(&later),
            Err(StoreError::AddressInUse { pod, .. }) if pod == "other/a"
        ),
        "a new pod with a taken address"
    );
    assert_eq!(store.pods().unwrap(), vec![placed.clone()]);
    assert_eq!(store.pods_on_node(&node("n1")).unwrap(), vec![placed]);
    assert_eq!(store.pods_on_node(&node("n2")).unwrap(), vec![]);
}

fn policies_put_rekey_delete(store: &dyn Datastore) {
    store.put_policies(&[]).unwrap();
    store
        .put_policies(&[("a".into(), "x: 1".into()), ("b".into(), "y: 2".into())])
        .unwrap();
    store.put_policies(&[("a".into(), "x: 3".into())]).unwrap();
    assert_eq!(
        store.policies().unwrap(),
        vec![("a".into(), "x: 3".into()), ("b".into(), "y: 2".into())]
    );
    store
        .put_policies(&[("c".into(), "z: 1".into()), ("c".into(), "z: 2".into())])
        .unwrap();
    assert_eq!(store.policies().unwrap()[2], ("c".into(), "z: 2".into()));
    store.delete_policy("c").unwrap();
    store.delete_policy("a").unwrap();
    assert!(matches!(
        store.delete_policy("a"),
        Err(StoreError::PolicyNotFound(_))
    ));
    // Keys of namespaced policies fit the same column; a rekey moves a row.
    store
        .rekey_policies(&[("b".into(), "default/b".into(), "y: 4".into())])
        .unwrap();
    assert_eq!(
        store.policies().unwrap(),
        vec![("default/b".into(), "y: 4".into())]
    );
    // A rekey onto the same key rewrites it; onto a taken key replaces it.
    store
        .put_policies(&[("default/c".into(), "c: 1".into())])
        .unwrap();
    store
        .rekey_policies(&[
            ("default/b".into(), "default/b".into(), "y: 5".into()),
            ("default/c".into(), "default/b".into(), "c: 2".into()),
        ])
        .unwrap();
    assert_eq!(
        store.policies().unwrap(),
        vec![("default/b".into(), "c: 2".into())]
    );
}

/// Starting etcd, connecting to it, talking to it directly.
mod harness {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex, Weak};
    use std::time::Duration;

    use meshauth_datastore::EtcdStore;
    use meshauth_test_support::etcd::Etcd;

    /// An etcd and the directory of its data.
    pub(crate) struct Running {
        pub(crate) etcd: Etcd,
        _dir: tempfile::TempDir,
    }

    impl Running {
        pub(crate) fn start() -> Running {
            let dir = tempfile::tempdir().unwrap();
            Running {
                etcd: Etcd::start(dir.path()),
                _dir: dir,
            }
        }
    }

    /// One etcd for the tests running at the same time (each under its own prefix); it is
    /// killed when the last of them ends, and started again for later ones.
    pub(crate) fn shared_etcd() -> Arc<Running> {
        static SHARED: Mutex<Weak<Running>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slot.upgrade() {
            return running;
        }
        let running = Arc::new(Running::start());
        *slot = Arc::downgrade(&running);
        running
    }

    /// A key prefix no other test uses, not even one run before on the same etcd.
    pub(crate) fn prefix(test: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "/conformance/{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A store on `etcd` under a fresh prefix for `test`.
    pub(crate) fn store(etcd: &Etcd, test: &str) -> EtcdStore {
        connect(etcd, &prefix(test))
    }

    pub(crate) fn connect(etcd: &Etcd, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&[etcd.endpoint()], prefix, Duration::from_secs(5)).unwrap()
    }

    /// Runs `f` with a plain etcd client of its own, to act behind the store's back.
    pub(crate) fn raw<T, F, Fut>(etcd: &Etcd, f: F) -> T
    where
        F: FnOnce(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = etcd_client::Client::connect([etcd.endpoint()], None)
                .await
                .unwrap();
            f(client).await
        })
    }
}

mod etcd_only {
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use std::collections::BTreeSet;

    use meshauth_datastore::{
        Datastore, EtcdStore, NodeAttestation, NodeSpec, PodRecord, PodRuntime, StoreChange,
        StoreChanges, StoreError,
    };
    use meshauth_policy::IdentityId;
    use meshauth_test_support::eventually;

    use super::harness::{self, Running};
    use super::{attest, new_entry, node, now};

    /// Leases of the election tests: etcd's minimum with the harness's timers is 1 s; 2 s
    /// leaves room for a loaded machine.
    const TTL: Duration = Duration::from_secs(2);

    /// Many threads of one server writing at once (as its blocking pool does under load) take
    /// turns: none runs out of attempts.
    #[test]
    fn many_threads_of_one_store_never_run_out_of_attempts() {
        let etcd = harness::shared_etcd();
        let store = harness::connect(&etcd.etcd, &harness::prefix("threads"));
        let now = now();
        std::thread::scope(|s| {
            for t in 0..32u32 {
                let store = &store;
                s.spawn(move || {
                    for i in 0..5u32 {
                        store
                            .record_attestation(
                                &node(&format!("t{t}-{i}")),
                                NodeAttestation::JoinToken,
                                "01",
                                now,
                                now,
                            )
                            .unwrap_or_else(|e| panic!("thread {t}: {e}"));
                    }
                });
            }
        });
        assert_eq!(store.nodes().unwrap().len(), 160);
    }

    #[test]
    fn concurrent_writers_keep_every_invariant() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("concurrent");
        let (a, b) = (
            harness::connect(&etcd.etcd, &prefix),
            harness::connect(&etcd.etcd, &prefix),
        );
        assert_eq!(a.kind(), "etcd");
        let now = now();
        let token = a
            .create_join_token(&node("n"), Duration::from_secs(600), now)
            .unwrap();
        let start = Barrier::new(2);
        #[derive(Default)]
        struct Outcome {
            consumed: usize,
            entries: Vec<meshauth_datastore::EntryId>,
            duplicates: usize,
            node_ids: Vec<u32>,
            identities: usize,
        }
        let run = |t: u32, store: &EtcdStore| {
            let mut out = Outcome::default();
            start.wait();
            for i in 0..50u32 {
                match store.consume_join_token(&token.token, &node("n"), now) {
                    Ok(()) => out.consumed += 1,
                    Err(StoreError::TokenUnknown) => {}
                    Err(e) => panic!("consume_join_token: {e}"),
                }
                let fields = new_entry(&format!("spiffe://td/w{i}"), "spiffe://td/node/n1");
                match store.create_entry(fields) {
                    Ok(e) => out.entries.push(e.id),
                    Err(StoreError::DuplicateEntry { .. }) => out.duplicates += 1,
                    Err(e) => panic!("create_entry: {e}"),
                }
                let n = store
                    .record_attestation(
                        &node(&format!("t{t}-{i}")),
                        NodeAttestation::JoinToken,
                        "01",
                        now,
                        now,
                    )
                    .unwrap();
                out.node_ids.push(n.node_id.get());
                let labels = format!("i={i},t={t}").parse().unwrap();
                match store.insert_identity(IdentityId::new(256 + i), &labels) {
                    Ok(()) => out.identities += 1,
                    Err(StoreError::IdentityTaken { .. }) => {}
                    Err(e) => panic!("insert_identity: {e}"),
                }
            }
            out
        };
        let outcomes: Vec<Outcome> = std::thread::scope(|s| {
            let ha = s.spawn(|| run(0, &a));
            let hb = s.spawn(|| run(1, &b));
            vec![ha.join().unwrap(), hb.join().unwrap()]
        });
        let sum = |f: fn(&Outcome) -> usize| outcomes.iter().map(f).sum::<usize>();
        assert_eq!(sum(|o| o.consumed), 1, "a token works exactly once");
        assert_eq!(
            sum(|o| o.entries.len()),
            50,
            "one of each pair of creations"
        );
        assert_eq!(sum(|o| o.duplicates), 50, "the other is a duplicate");
        assert_eq!(sum(|o| o.identities), 50, "one label set per identity id");
        let mut entries: Vec<_> = outcomes.iter().flat_map(|o| o.entries.clone()).collect();
        entries.sort();
        entries.dedup();
        assert_eq!(entries.len(), 50, "no entry id reused");
        let mut ids: Vec<u32> = outcomes.iter().flat_map(|o| o.node_ids.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 100, "no node id reused");
        assert_eq!(b.count_entries().unwrap(), 50);
        assert_eq!(a.nodes().unwrap().len(), 100);
        assert_eq!(b.identities().unwrap().len(), 50);
    }

    #[test]
    fn the_watch_fires_on_another_clients_write() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("watch");
        let a = harness::connect(&etcd.etcd, &prefix);
        let b = harness::connect(&etcd.etcd, &prefix);
        // A prefix that merely starts with a's is another store.
        let neighbour = harness::connect(&etcd.etcd, &format!("{prefix}x"));
        let mut changes = a.watch();
        let before = *changes.borrow_and_update();
        neighbour.save_ca_journal("{}").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!changes.has_changed().unwrap(), "another prefix's write");
        b.save_ca_journal("{\"v\":1}").unwrap();
        eventually(Duration::from_secs(5), "a's watch to see b's write", || {
            changes.has_changed().unwrap().then_some(())
        });
        let first = *changes.borrow_and_update();
        assert!(first > before);
        b.put_policies(&[("p".into(), "x: 1".into())]).unwrap();
        eventually(Duration::from_secs(5), "a second change", || {
            changes.has_changed().unwrap().then_some(())
        });
        assert!(*changes.borrow() > first);
    }

    #[test]
    fn the_watch_leaves_out_the_stores_own_writes() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("own-writes");
        let a = harness::connect(&etcd.etcd, &prefix);
        let b = harness::connect(&etcd.etcd, &prefix);
        let mut changes = a.watch();
        changes.borrow_and_update();
        a.save_ca_journal("{}").unwrap();
        a.put_policies(&[("p".into(), "x: 1".into())]).unwrap();
        a.create_join_token(&node("n1"), Duration::from_secs(60), now())
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !changes.has_changed().unwrap(),
            "a's own writes reached a's change feed"
        );
        // b's feed sees them, and a's sees b's.
        let mut theirs = b.watch();
        theirs.borrow_and_update();
        a.delete_policy("p").unwrap();
        eventually(Duration::from_secs(5), "b's watch to see a's write", || {
            theirs.has_changed().unwrap().then_some(())
        });
        b.save_ca_journal("{\"v\":2}").unwrap();
        eventually(Duration::from_secs(5), "a's watch to see b's write", || {
            changes.has_changed().unwrap().then_some(())
        });
    }

    /// Takes `store`'s changes until they hold `want` (or time out); returns them all.
    fn changes_until(store: &EtcdStore, want: &StoreChange) -> BTreeSet<StoreChange> {
        let mut got = BTreeSet::new();
        eventually(Duration::from_secs(5), &format!("{want:?}"), || {
            match store.take_changes() {
                StoreChanges::Parts(parts) => got.extend(parts),
                StoreChanges::Everything => panic!("everything changed, after {got:?}"),
            }
            got.contains(want).then_some(())
        });
        got
    }

    #[test]
    fn the_feed_says_what_another_client_changed() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("parts");
        let a = harness::connect(&etcd.etcd, &prefix);
        let b = harness::connect(&etcd.etcd, &prefix);
        assert_eq!(a.take_changes(), StoreChanges::default());
        // a's own writes are not in a's feed.
        a.save_ca_journal("{}").unwrap();
        a.put_policies(&[("mine".into(), "x: 1".into())]).unwrap();
        attest(&a, "mine", "01");
        // b's are, as the records they touched; a join token is nothing a follower reads.
        b.create_join_token(&node("n1"), Duration::from_secs(60), now())
            .unwrap();
        attest(&b, "n1", "02");
        b.put_node_spec(&NodeSpec {
            name: node("n2"),
            address: None,
            pod_range: "10.200.2.0/24".parse().unwrap(),
        })
        .unwrap();
        // A name whose key segment is escaped.
        let pod = PodRecord {
            namespace: "default".into(),
            name: "web/1%".into(),
            labels: "app=web".parse().unwrap(),
            node: node("n1"),
            identity: IdentityId::new(256),
            runtime: None,
        };
        b.put_pod(&pod).unwrap();
        let runtime = PodRuntime {
            ipv4: "10.200.1.10".parse().unwrap(),
            interface: "lxc10".into(),
        };
        assert!(
            b.set_pod_runtime("default", "web/1%", Some(&runtime))
                .unwrap()
        );
        b.put_policies(&[("default/p".into(), "x: 1".into())])
            .unwrap();
        let entry = b
            .create_entry(new_entry("spiffe://td/w", "spiffe://td/node/n1"))
            .unwrap();
        b.insert_identity(IdentityId::new(256), &"app=web".parse().unwrap())
            .unwrap();
        b.save_ca_journal("{\"v\":1}").unwrap();
        let want: BTreeSet<StoreChange> = [
            StoreChange::Node(node("n1")),
            StoreChange::Node(node("n2")),
            StoreChange::Pod {
                namespace: "default".into(),
                name: "web/1%".into(),
            },
            StoreChange::Policies,
            StoreChange::Entry(entry.id),
            StoreChange::Identity(IdentityId::new(256)),
            StoreChange::CaJournal,
        ]
        .into_iter()
        .collect();
        // The CA journal was written last: once it is in, so is everything before it.
        assert_eq!(changes_until(&a, &StoreChange::CaJournal), want);
        assert_eq!(a.take_changes(), StoreChanges::default(), "drained");

        // An own write, then a token of b's: neither is a change; b's next spec marks the end.
        a.put_policies(&[("mine".into(), "x: 2".into())]).unwrap();
        b.create_join_token(&node("n3"), Duration::from_secs(60), now())
            .unwrap();
        let spec = NodeSpec {
            name: node("n3"),
            address: None,
            pod_range: "10.200.3.0/24".parse().unwrap(),
        };
        b.put_node_spec(&spec).unwrap();
        let n3 = StoreChange::Node(node("n3"));
        assert_eq!(changes_until(&a, &n3), BTreeSet::from([n3.clone()]));
        // An eviction deletes the node's runtime keys with one range delete: each is its pod.
        b.evict_node(&node("n1")).unwrap();
        b.put_node_spec(&spec).unwrap();
        assert_eq!(
            changes_until(&a, &n3),
            BTreeSet::from([
                StoreChange::Node(node("n1")),
                StoreChange::Pod {
                    namespace: "default".into(),
                    name: "web/1%".into(),
                },
                n3,
            ])
        );
        assert_eq!(a.take_changes(), StoreChanges::default());
    }

    #[test]
    fn a_watch_etcd_compacted_from_under_it_means_everything_changed() {
        // An etcd of its own: it is restarted.
        let mut running = Running::start();
        let a = harness::connect(&running.etcd, "/compacted");
        let mut changes = a.watch();
        changes.borrow_and_update();
        // Writes under another prefix move the revision on unseen by a's watch, which would
        // start again from before them; then etcd forgets them.
        harness::raw(&running.etcd, |mut c| async move {
            c.put("/elsewhere/1", "x", None).await.unwrap();
            let put = c.put("/elsewhere/2", "x", None).await.unwrap();
            let revision = put.header().unwrap().revision();
            c.compact(revision, None).await.unwrap();
        });
        assert_eq!(a.take_changes(), StoreChanges::default());
        // A restart breaks the watch; it is re-established from a compacted revision.
        running.etcd.restart(0);
        eventually(Duration::from_secs(15), "a's watch to announce it", || {
            changes.has_changed().unwrap().then_some(())
        });
        assert_eq!(a.take_changes(), StoreChanges::Everything);
        assert_eq!(a.take_changes(), StoreChanges::default(), "drained");
    }

    #[test]
    fn pods_written_before_the_node_index_are_indexed_at_the_next_connect() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("layout");
        // A store of layout 1: 150 placements (more than one transaction's worth) and no
        // node_pods keys, as the version before the index wrote them.
        harness::raw(&etcd.etcd, |mut client| {
            let prefix = prefix.clone();
            async move {
                for i in 0..150 {
                    let value = format!(
                        r#"{{"namespace":"default","name":"p{i}","labels":{{"app":"web"}},"node":"n{}","identity":256}}"#,
                        i % 3
                    );
                    client
                        .put(format!("{prefix}/pods/default/p{i}"), value, None)
                        .await
                        .unwrap();
                }
                // A stale index key of a pod that is gone.
                client
                    .put(format!("{prefix}/node_pods/n9/default/gone"), "{}", None)
                    .await
                    .unwrap();
            }
        });
        let store = harness::connect(&etcd.etcd, &prefix);
        for n in 0..3 {
            let on = store.pods_on_node(&node(&format!("n{n}"))).unwrap();
            assert_eq!(on.len(), 50, "node n{n}");
            assert!(on.iter().all(|p| p.node == node(&format!("n{n}"))));
        }
        assert_eq!(store.pods_on_node(&node("n9")).unwrap(), vec![]);
        // Connecting again finds the layout current and changes nothing.
        let again = harness::connect(&etcd.etcd, &prefix);
        assert_eq!(again.pods_on_node(&node("n1")).unwrap().len(), 50);
    }

    #[test]
    fn leadership_passes_on_at_a_resignation_and_after_a_crash() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("election");
        let a = harness::connect(&etcd.etcd, &prefix);
        let b = harness::connect(&etcd.etcd, &prefix);
        let la = a.campaign("ctl", "a", TTL).unwrap();
        eventually(Duration::from_secs(5), "a to lead", || {
            la.leading().then_some(())
        });
        let lb = b.campaign("ctl", "b", TTL).unwrap();
        assert_eq!(b.leader("ctl").unwrap().as_deref(), Some("a"));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!lb.leading(), "one leader at a time");

        la.resign().unwrap();
        eventually(Duration::from_secs(2), "b to lead once a resigned", || {
            lb.leading().then_some(())
        });
        assert_eq!(a.leader("ctl").unwrap().as_deref(), Some("b"));

        // b crashes (stops renewing without resigning): c leads once b's lease expired.
        let lc = a.campaign("ctl", "c", TTL).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!lc.leading());
        let crashed = Instant::now();
        lb.abandon();
        eventually(
            TTL + Duration::from_secs(3),
            "c to lead after b crashed",
            || lc.leading().then_some(()),
        );
        let took = crashed.elapsed();
        assert!(
            took >= TTL / 2 && took <= TTL + Duration::from_millis(1500),
            "c took {took:?} to replace a crashed leader with a {TTL:?} lease"
        );
        assert_eq!(b.leader("ctl").unwrap().as_deref(), Some("c"));
        drop(lc);
        eventually(Duration::from_secs(2), "nobody to lead", || {
            a.leader("ctl").unwrap().is_none().then_some(())
        });
    }

    #[test]
    fn a_revoked_lease_ends_the_leadership() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("revoked");
        let a = harness::connect(&etcd.etcd, &prefix);
        let la = a.campaign("ctl", "a", TTL).unwrap();
        let mut is_leader = la.is_leader();
        eventually(Duration::from_secs(5), "a to lead", || {
            la.leading().then_some(())
        });
        is_leader.borrow_and_update();
        let lb = a.campaign("ctl", "b", TTL).unwrap();
        let elections = format!("{prefix}/elections/ctl/");
        harness::raw(&etcd.etcd, |mut c| async move {
            let keys = c
                .get(
                    elections,
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .unwrap();
            let a_key = keys.kvs().iter().find(|kv| kv.value() == b"a").unwrap();
            c.lease_revoke(a_key.lease()).await.unwrap();
        });
        eventually(Duration::from_secs(3), "a to learn it lost", || {
            (!la.leading()).then_some(())
        });
        assert!(is_leader.has_changed().unwrap());
        eventually(Duration::from_secs(3), "b to lead", || {
            lb.leading().then_some(())
        });
        assert!(!la.leading(), "a campaigns again, behind b");
    }

    #[test]
    fn a_leader_cut_off_from_etcd_steps_down_and_requests_fail_clearly() {
        let running = Running::start();
        let endpoint = running.etcd.endpoint();
        let a = EtcdStore::connect(
            std::slice::from_ref(&endpoint),
            "/cut-off",
            Duration::from_secs(1),
        )
        .unwrap();
        let la = a.campaign("ctl", "a", TTL).unwrap();
        eventually(Duration::from_secs(5), "a to lead", || {
            la.leading().then_some(())
        });
        let killed = Instant::now();
        drop(running);
        eventually(TTL + Duration::from_secs(2), "a to step down", || {
            (!la.leading()).then_some(())
        });
        assert!(
            killed.elapsed() <= TTL,
            "a stepped down {:?} after etcd died: it must before its {TTL:?} lease can expire",
            killed.elapsed()
        );
        let asked = Instant::now();
        let err = a.nodes().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "cannot reach etcd at {endpoint}: is it running? check --datastore"
            )),
            "{msg}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "bounded by the timeout"
        );
    }

    #[test]
    fn an_unreachable_etcd_is_a_clear_error() {
        let endpoint = meshauth_test_support::etcd::unused_endpoint();
        let asked = Instant::now();
        let err = EtcdStore::connect(
            std::slice::from_ref(&endpoint),
            "/meshauth",
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot reach etcd at {endpoint}: is it running? check --datastore"
            )),
            "{msg}"
        );
        assert!(asked.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_store_works_inside_a_tokio_runtime() {
        let etcd = harness::shared_etcd();
        let store = harness::store(&etcd.etcd, "tokio");
        let other = harness::connect(&etcd.etcd, store.prefix());
        let mut changes = store.watch();
        other.save_ca_journal("{}").unwrap();
        assert_eq!(store.load_ca_journal().unwrap().as_deref(), Some("{}"));
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .unwrap()
            .unwrap();
        let leadership = store.campaign("ctl", "a", TTL).unwrap();
        drop(leadership);
        drop((store, other));
    }

    #[test]
    fn a_record_that_does_not_parse_is_named_with_its_key() {
        let etcd = harness::shared_etcd();
        let prefix = harness::prefix("corrupt");
        let store = harness::connect(&etcd.etcd, &prefix);
        let key = format!("{prefix}/nodes/a");
        let k = key.clone();
        harness::raw(&etcd.etcd, |mut c| async move {
            c.put(k, "not json", None).await.unwrap();
        });
        let err = store.nodes().unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptKey { key: ref k, .. } if *k == key),
            "{err}"
        );
        assert!(err.to_string().contains(&key), "{err}");
        // Evicting the node gets rid of it.
        store.evict_node(&node("a")).unwrap();
        assert!(store.nodes().unwrap().is_empty());
    }
}
