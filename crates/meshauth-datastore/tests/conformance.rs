//! The contract of [`Datastore`], run against every backend: each `fn` below takes a
//! `&dyn Datastore`, and `contract!` makes one `#[test]` per backend of it.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_datastore::{
    Datastore, EntryFilter, NewEntry, NodeAttestation, NodeName, NodeSpec, PodRecord, PodRuntime,
    StoreError,
};
use meshauth_policy::{IdentityId, Labels, TunnelKey};
use meshauth_spiffe::SpiffeId;

/// One `#[test]` per backend for each contract function: `sqlite::<name>` on an in-memory
/// store.
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
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
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
    assert!(
        store
            .set_pod_runtime("default", "web-2", Some(&rt))
            .is_err()
    );
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
        store.put_pod(&later).is_err(),
        "a new pod with a taken address"
    );
    assert_eq!(store.pods().unwrap(), vec![placed]);
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
