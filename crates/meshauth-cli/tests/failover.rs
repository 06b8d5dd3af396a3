//! An agent with several servers (`--server A,B`): real `meshauth server run` and `meshauth
//! agent run` processes on loopback, no root.
//!
//! Two servers of one trust domain on one store cannot run yet (each SQLite data dir is its own
//! CA), so "two replicas" here are two addresses of one server: a loopback port with nothing
//! behind it, or a TCP forwarder the test cuts (listener and every connection through it).
//! What is checked: attestation and sync go to the first server that answers; a session cut on
//! one path fails over to the next, the agent keeps every SVID it holds (same serials), and the
//! sync goes on there (an entry created after the cut reaches the agent).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, Instant};

use support::{ListAgent as Agent, ServerProcess, TD, eventually, free_port, uid};

/// An entry of node n1 for this test process's uid.
fn create_entry(server: &ServerProcess, name: &str) {
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/{name}"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
}

/// A TCP forwarder from a loopback port to `target`: one path to the server, which
/// [`Forwarder::cut`] closes (the listener and every connection through it).
struct Forwarder {
    addr: String,
    cut: tokio::sync::watch::Sender<bool>,
    _runtime: tokio::runtime::Runtime,
}

async fn cut_signal(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|cut| *cut).await;
}

impl Forwarder {
    fn start(target: String) -> Forwarder {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, rx) = tokio::sync::watch::channel(false);
        runtime.spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        let (target, rx) = (target.clone(), rx.clone());
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                () = cut_signal(rx) => {}
                            }
                        });
                    }
                    // The listener goes with this task: the port refuses connections.
                    () = cut_signal(rx.clone()) => return,
                }
            }
        });
        Forwarder {
            addr,
            cut,
            _runtime: runtime,
        }
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

#[test]
fn an_agent_attests_and_syncs_at_the_first_server_that_answers() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    create_entry(&server, "first");
    let token = server.token("n1");
    // Nothing listens there.
    let dead = format!("127.0.0.1:{}", free_port());
    let servers = format!("{dead},{}", server.addr());

    let agent = Agent::start(dir.path(), &servers, &["--join-token", &token]);
    eventually(
        Duration::from_secs(10),
        "the SVID of the first entry",
        || agent.serial_of("first"),
    );
    let log = agent.log();
    assert!(
        log.contains("cannot attest at this server; trying the next") && log.contains(&dead),
        "the dead server was tried first and named: {log}"
    );
    // The session starts where the node attested: no failover needed.
    assert_eq!(agent.metric("meshauth_agent_server_index"), Some(1.0));
    assert_eq!(
        agent.metric("meshauth_agent_server_failovers_total"),
        Some(0.0)
    );
    create_entry(&server, "second");
    eventually(Duration::from_secs(10), "an entry created later", || {
        agent.serial_of("second")
    });
    let held = agent.svids();
    agent.stop();

    // Restarted with its node SVID on disk (no token): sessions start at the first server, the
    // dead one, and fail over to the live one; what it held comes back from the live server.
    let agent = Agent::start(dir.path(), &servers, &[]);
    eventually(Duration::from_secs(10), "the failover counted", || {
        (agent.metric("meshauth_agent_server_failovers_total")? >= 1.0
            && agent.metric("meshauth_agent_server_index")? == 1.0
            && agent.metric("meshauth_agent_server_connected")? == 1.0)
            .then_some(())
    });
    eventually(Duration::from_secs(10), "both SVIDs again", || {
        (agent.svids().len() == held.len()).then_some(())
    });
    let log = agent.log();
    assert!(
        log.contains("failing over to the next server"),
        "the failover is logged: {log}"
    );
    agent.stop();
    server.stop();
    eprintln!("dead then live: {:?} in all", started.elapsed());
}

#[test]
fn a_cut_path_fails_over_to_the_next_and_keeps_every_svid() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    create_entry(&server, "before-cut");
    let token = server.token("n1");
    let path_a = Forwarder::start(server.addr());
    let servers = format!("{},{}", path_a.addr, server.addr());

    let agent = Agent::start(dir.path(), &servers, &["--join-token", &token]);
    let serial = eventually(Duration::from_secs(10), "the SVID before the cut", || {
        agent.serial_of("before-cut")
    });
    let node_serial = agent.health().unwrap()["node_svid_serial"].clone();
    assert_eq!(agent.metric("meshauth_agent_server_index"), Some(0.0));

    path_a.cut();
    let cut_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the agent on the second path",
        || {
            (agent.metric("meshauth_agent_server_index")? == 1.0
                && agent.metric("meshauth_agent_server_connected")? == 1.0)
                .then_some(())
        },
    );
    let failed_over = cut_at.elapsed();
    assert_eq!(
        agent.metric("meshauth_agent_server_failovers_total"),
        Some(1.0)
    );
    // Everything held is kept: the same SVID and node SVID, not signed again.
    assert_eq!(agent.serial_of("before-cut").as_ref(), Some(&serial));
    let health = agent.health().unwrap();
    assert_eq!(health["node_svid_serial"], node_serial, "{health}");
    assert_eq!(health["server_connected"], true, "{health}");

    // The sync goes on through the second path.
    create_entry(&server, "after-cut");
    eventually(
        Duration::from_secs(10),
        "an entry created after the cut",
        || agent.serial_of("after-cut"),
    );
    assert_eq!(agent.serial_of("before-cut"), Some(serial));
    let log = agent.log();
    assert!(
        log.contains("failing over to the next server") && log.contains(&path_a.addr),
        "the failover names the server it left: {log}"
    );
    agent.stop();
    server.stop();
    eprintln!(
        "cut path: failed over {failed_over:?} after the cut, {:?} in all",
        started.elapsed()
    );
}
