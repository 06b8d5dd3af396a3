//! The lab on a real kernel: namespaces, veths, routes, names; and a clean teardown.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;

use meshauth_lab::Lab;

struct Down(Lab);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

#[test]
fn pods_reach_each_other_across_nodes_and_down_removes_everything() {
    if !meshauth_test_support::require_root(
        "pods_reach_each_other_across_nodes_and_down_removes_everything",
    ) {
        return;
    }
    let lab = Lab::new("tlab").unwrap();
    let _ = lab.down();
    let guard = Down(lab.clone());
    lab.up(2).unwrap();
    assert!(matches!(
        lab.up(2),
        Err(meshauth_lab::LabError::AlreadyUp(_))
    ));
    let a = lab.add_pod("a", "n1", labels("a")).unwrap();
    let b = lab.add_pod("b", "n2", labels("b")).unwrap();
    let c = lab.add_pod("c", "n1", labels("c")).unwrap();
    assert_ne!(a.ip, c.ip);
    assert!(
        lab.add_pod("a", "n2", labels("x")).is_err(),
        "names are unique"
    );
    assert!(lab.add_pod("d", "n9", labels("x")).is_err(), "unknown node");

    for (from, to) in [("a", "b"), ("a", "c"), ("b", "c")] {
        let out = lab
            .exec(from, &["ping", "-c1", "-W1", to].map(String::from))
            .unwrap()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{from} -> {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = lab
        .exec("a", &["getent", "hosts", "b"].map(String::from))
        .unwrap()
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b.ip.to_string()));

    lab.remove_pod("c").unwrap();
    let (state, live) = lab.status().unwrap();
    assert_eq!(state.unwrap().pods.len(), 2);
    assert_eq!(live.len(), 5, "underlay, 2 nodes, 2 pods: {live:?}");

    lab.down().unwrap();
    let (state, live) = lab.status().unwrap();
    assert!(state.is_none());
    assert!(live.is_empty(), "{live:?}");
    assert!(!std::path::Path::new("/etc/netns/tlab-a").exists());
    lab.down().unwrap(); // idempotent
    drop(guard);
}
