//! Three server replicas on a three-member etcd cluster, as real processes: any replica serves,
//! one leads (CA rotation), the CA key is sealed in etcd under `--kek-file`, and an agent given
//! every replica fails over.
//!
//! The leader is killed (SIGKILL) in the middle of a loop of registrations (entries created
//! through each replica in turn) while the agent gets each entry's SVID signed: every
//! registration a replica acknowledged is there afterwards, another replica leads within a few
//! seconds, and the agent keeps getting SVIDs for new entries. Then the whole etcd cluster is
//! killed and started again: the replicas recover with no step of ours.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use meshauth_test_support::etcd::Etcd;
use support::{ListAgent, ServerProcess, TD, eventually, free_port, uid};

const REPLICAS: usize = 3;
const REGISTRATIONS: usize = 30;
/// The registration after which the leader is killed.
const KILL_AT: usize = 10;

struct Replica {
    process: Option<ServerProcess>,
    addr: String,
}

impl Replica {
    fn health(&self) -> Option<serde_json::Value> {
        let p = self.process.as_ref()?;
        let out = p.cli(&["server", "healthcheck", "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn is_leader(&self) -> bool {
        self.health().is_some_and(|h| h["leader"] == true)
    }
}

fn entry_args(name: &str) -> Vec<String> {
    [
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/{name}"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Creates entry `name` through the first live replica from `start` on; the index of the one
/// that acknowledged it, or `None` if none did.
fn register(replicas: &[Replica], start: usize, name: &str) -> Option<usize> {
    let args = entry_args(name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (0..replicas.len())
        .map(|k| (start + k) % replicas.len())
        .find(|&i| {
            replicas[i]
                .process
                .as_ref()
                .is_some_and(|p| p.cli(&args).status.success())
        })
}

fn leaders(replicas: &[Replica]) -> Vec<usize> {
    (0..replicas.len())
        .filter(|&i| replicas[i].is_leader())
        .collect()
}

fn kek_file(dir: &Path) -> String {
    let path = dir.join("kek");
    std::fs::write(&path, format!("{}\n", "5a".repeat(32))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

#[test]
fn replicas_on_etcd_survive_the_leader_and_etcd_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::cluster(3, &dir.path().join("etcd"));
    let url = format!("etcd://{}", etcd.endpoints().join(","));
    let kek = kek_file(dir.path());
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| {
            let rdir = dir.path().join(format!("r{i}"));
            std::fs::create_dir_all(&rdir).unwrap();
            let port = free_port();
            let flags = ["--datastore", &url, "--kek-file", &kek];
            let process = ServerProcess::start_on(&rdir, port, &flags);
            Replica {
                addr: process.addr(),
                process: Some(process),
            }
        })
        .collect();

    // One CA, one leader.
    let bundles: Vec<String> = replicas
        .iter()
        .map(|r| r.process.as_ref().unwrap().ok(&["bundle", "show"]))
        .collect();
    assert!(
        bundles.iter().all(|b| *b == bundles[0]),
        "every replica serves the same CA"
    );
    let leader = eventually(Duration::from_secs(15), "one leader", || {
        let l = leaders(&replicas);
        (l.len() == 1).then(|| l[0])
    });
    for r in &replicas {
        assert_eq!(r.health().unwrap()["datastore"], "etcd");
    }

    // An agent that knows every replica, attesting with a token made through another one.
    std::fs::write(dir.path().join("bundle.pem"), &bundles[0]).unwrap();
    let token = replicas[(leader + 1) % REPLICAS]
        .process
        .as_ref()
        .unwrap()
        .token("n1");
    // The leader first: the agent's sessions start there, so its death is the agent's too.
    let order: Vec<usize> = (0..REPLICAS).map(|k| (leader + k) % REPLICAS).collect();
    let servers: Vec<String> = order.iter().map(|&i| replicas[i].addr.clone()).collect();
    let agent = ListAgent::start(dir.path(), &servers.join(","), &["--join-token", &token]);

    // Registrations through each replica in turn; the leader is killed in the middle.
    let mut acknowledged = Vec::new();
    let mut killed_at = None;
    for i in 0..REGISTRATIONS {
        if i == KILL_AT {
            replicas[leader].process.take().unwrap().kill();
            killed_at = Some(Instant::now());
        }
        let name = format!("w{i}");
        if register(&replicas, i, &name).is_some() {
            acknowledged.push(name);
        }
    }
    let killed_at = killed_at.unwrap();
    let new_leader = eventually(Duration::from_secs(20), "a new leader", || {
        let l = leaders(&replicas);
        (l.len() == 1).then(|| l[0])
    });
    let took = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    assert!(
        took < Duration::from_secs(15),
        "a new leader within a few seconds, not {took:?}"
    );
    assert_eq!(
        acknowledged.len(),
        REGISTRATIONS,
        "the live replicas acknowledged every registration"
    );

    // No registration lost: every acknowledged entry is on every live replica, and the agent
    // (which failed over if it was on the leader) holds an SVID of each.
    for r in replicas.iter().filter(|r| r.process.is_some()) {
        let listed = r
            .process
            .as_ref()
            .unwrap()
            .ok(&["entry", "show", "-o", "json"]);
        for name in &acknowledged {
            assert!(
                listed.contains(&format!("spiffe://{TD}/{name}\"")),
                "{name} is missing on {}",
                r.addr
            );
        }
    }
    eventually(
        Duration::from_secs(30),
        "the agent to hold every SVID",
        || {
            let held = agent.svids();
            acknowledged
                .iter()
                .all(|n| {
                    held.iter()
                        .any(|(id, _)| *id == format!("spiffe://{TD}/{n}"))
                })
                .then_some(())
        },
    );
    let failed_over = killed_at.elapsed();
    assert!(
        agent.metric("meshauth_agent_server_failovers_total") >= Some(1.0),
        "the agent left the dead leader"
    );
    assert_ne!(
        agent.metric("meshauth_agent_server_index"),
        Some(0.0),
        "the agent is on another replica"
    );
    let on = agent.health().unwrap()["server"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        on != replicas[leader].addr && servers.contains(&on),
        "agent healthcheck names the replica it is on now: {on}"
    );
    eprintln!(
        "leader killed: a new leader after {took:?}; the agent held all {} SVIDs {failed_over:?} after the kill",
        acknowledged.len()
    );

    // etcd itself goes away and comes back: the replicas recover by themselves.
    for i in 0..etcd.len() {
        etcd.kill(i);
    }
    std::thread::sleep(Duration::from_secs(2));
    etcd.restart_all();
    let back = Instant::now();
    eventually(
        Duration::from_secs(40),
        "a registration after etcd came back",
        || register(&replicas, 0, "after-etcd").map(|_| ()),
    );
    eprintln!(
        "etcd restarted: a registration acknowledged {:?} after",
        back.elapsed()
    );
    eventually(
        Duration::from_secs(30),
        "one leader after etcd came back",
        || (leaders(&replicas).len() == 1).then_some(()),
    );
    eventually(Duration::from_secs(30), "the agent's SVID of it", || {
        agent.serial_of("after-etcd")
    });
    agent.stop();
}

#[test]
fn etcd_without_a_key_encryption_key_or_reachable_members_is_refused_with_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = std::process::Command::new(support::BIN)
        .args(["server", "run", "--trust-domain", TD])
        .args(["--datastore", &format!("etcd://127.0.0.1:{port}")])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--admin-socket")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --kek-file"), "{err}");

    let kek = kek_file(dir.path());
    let out = std::process::Command::new(support::BIN)
        .args(["server", "run", "--trust-domain", TD])
        .args(["--datastore", &format!("etcd://127.0.0.1:{port}")])
        .args(["--kek-file", &kek])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--admin-socket")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach etcd"), "{err}");
}
