//! `meshauth lab` as an operator uses it (root only): up, pods, exec, status, datapath, down.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");

fn lab(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--log", "warn", "lab", "--lab", "tcli"])
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = lab(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn lab_lifecycle_through_the_cli() {
    if !meshauth_test_support::require_root("lab_lifecycle_through_the_cli") {
        return;
    }
    let _ = lab(&["down"]);
    ok(&["up", "--nodes", "2"]);
    ok(&["pod", "add", "web", "--node", "n1", "--labels", "app=web"]);
    ok(&[
        "pod",
        "add",
        "client",
        "--node",
        "n2",
        "--labels",
        "app=client,tier=front",
    ]);
    let status: serde_json::Value = serde_json::from_str(&ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["state"]["pods"][1]["labels"]["tier"], "front");
    assert_eq!(status["namespaces"].as_array().unwrap().len(), 5);

    ok(&["exec", "client", "--", "ping", "-c1", "-W1", "web"]);
    ok(&["datapath", "attach", "--auth-all"]);
    ok(&["exec", "client", "--", "ping", "-c1", "-W1", "web"]);
    assert!(
        meshauth_datapath::Datapath::pin_dir_for("tcli-n1")
            .join(format!("abi-v{}", meshauth_datapath::ABI_VERSION))
            .join("ma_auth")
            .exists()
    );
    ok(&["datapath", "detach"]);

    let err = lab(&["pod", "add", "x", "--node", "n7"]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no node n7"));

    ok(&["down"]);
    let status: serde_json::Value = serde_json::from_str(&ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["namespaces"], serde_json::json!([]));
    assert!(!std::path::Path::new("/sys/fs/bpf/meshauth/tcli-n1").exists());
    ok(&["down"]);
}
