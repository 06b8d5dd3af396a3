//! The `meshauth-cni` binary as a runtime runs it: VERSION, and the spec's error documents for
//! what a runtime or an operator can get wrong. No root needed (ADD, CHECK and DEL against a
//! real agent are in cni_podman.rs).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::{Command, Output};

mod cni_support;
use cni_support::{CNI, run_plugin};

fn run(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(CNI);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied());
    run_plugin(cmd, stdin)
}

/// The error document of a failed run: its code and message.
fn error(o: &Output) -> (u64, String) {
    assert!(!o.status.success(), "expected a failure");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is no JSON ({e}): {:?}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    assert_eq!(v["cniVersion"], "1.0.0", "{v}");
    (
        v["code"].as_u64().unwrap(),
        v["msg"].as_str().unwrap().to_owned(),
    )
}

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"meshauth","type":"meshauth-cni","agent_socket":"/nonexistent/agent.sock"}"#;

fn add_env(args: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/nonexistent"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args),
    ]
}

#[test]
fn version_lists_1_0_0() {
    let o = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], serde_json::json!(["1.0.0"]));
}

#[test]
fn an_unsupported_version_is_error_1() {
    let conf = CONF.replace("1.0.0", "0.3.1");
    let (code, msg) = error(&run(&add_env("MESHAUTH_POD=default/web"), &conf));
    assert_eq!(code, 1);
    assert!(msg.contains("0.3.1") && msg.contains("1.0.0"), "{msg}");
}

#[test]
fn a_configuration_that_is_no_json_is_error_6() {
    let (code, _) = error(&run(&add_env("MESHAUTH_POD=default/web"), "{not json"));
    assert_eq!(code, 6);
}

#[test]
fn missing_environment_is_error_4() {
    let (code, msg) = error(&run(&[("CNI_COMMAND", "ADD")], CONF));
    assert_eq!(code, 4);
    assert!(msg.contains("CNI_CONTAINERID"), "{msg}");
    let (code, msg) = error(&run(&[], CONF));
    assert_eq!(code, 4);
    assert!(msg.contains("CNI_COMMAND"), "{msg}");
    let (code, msg) = error(&run(&[("CNI_COMMAND", "STATUS")], CONF));
    assert_eq!(code, 4);
    assert!(msg.contains("STATUS"), "{msg}");
}

#[test]
fn a_container_without_a_pod_is_error_4_naming_meshauth_pod() {
    // What podman passes by itself: its container name, which names no pod.
    let (code, msg) = error(&run(
        &add_env("IgnoreUnknown=1;K8S_POD_NAME=vigilant_margulis"),
        CONF,
    ));
    assert_eq!(code, 4);
    assert!(msg.contains("MESHAUTH_POD=namespace/name"), "{msg}");
}

#[test]
fn an_agent_that_cannot_be_reached_is_try_again_later() {
    let (code, msg) = error(&run(&add_env("MESHAUTH_POD=default/web"), CONF));
    assert_eq!(code, 11);
    assert!(
        msg.contains("/nonexistent/agent.sock") && msg.contains("--cni"),
        "{msg}"
    );
    let mut del = add_env("MESHAUTH_POD=default/web");
    del[0] = ("CNI_COMMAND", "DEL");
    let (code, _) = error(&run(&del, CONF));
    assert_eq!(code, 11, "DEL fails so that the runtime calls it again");
}
