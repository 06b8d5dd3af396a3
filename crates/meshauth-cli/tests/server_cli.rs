//! The operator CLI against a real `meshauth server run` process: tokens, entries, agents,
//! bundles, health, restarts, and clear one-line errors for bad input.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::{BIN, ServerProcess, one_line_error};

#[test]
fn tokens_entries_agents_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());

    let token = server.ok(&["token", "generate", "--node", "n1", "--ttl", "120s"]);
    let token = token.trim();
    assert_eq!(token.len(), 32, "the token alone on stdout: {token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));

    let created = server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://cli.test/web",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:0",
        "--x509-svid-ttl",
        "5m",
        "-o",
        "json",
    ]);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_string();
    assert_eq!(created[0]["x509_svid_ttl_seconds"], 300);
    assert_eq!(
        created[0]["selectors"],
        serde_json::json!(["unix:gid:0", "unix:uid:1000"])
    );

    let shown: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "show", "--entry-id", &id, "-o", "json"]))
            .unwrap();
    assert_eq!(shown[0]["spiffe_id"], "spiffe://cli.test/web");
    let filtered: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--selector",
        "unix:uid:1000",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let none: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--parent-id",
        "spiffe://cli.test/node/n9",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(none, serde_json::json!([]));

    let updated: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "update",
        "--entry-id",
        &id,
        "--spiffe-id",
        "spiffe://cli.test/web2",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1001",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(updated[0]["revision"], 2);
    assert_eq!(updated[0]["spiffe_id"], "spiffe://cli.test/web2");

    let agents: serde_json::Value =
        serde_json::from_str(&server.ok(&["agent", "list", "-o", "json"])).unwrap();
    assert_eq!(agents, serde_json::json!([]));

    let pem = server.ok(&["bundle", "show"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let jwks: serde_json::Value =
        serde_json::from_str(&server.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "x509-svid");

    let health: serde_json::Value =
        serde_json::from_str(&server.ok(&["server", "healthcheck", "-o", "json"])).unwrap();
    assert_eq!(health["trust_domain"], "cli.test");
    assert_eq!(health["entries"], 1);

    server.ok(&["entry", "delete", "--entry-id", &id]);
    let err = server.fails(&["entry", "show", "--entry-id", &id]);
    assert!(err.contains("no entry with id"), "{err}");
    server.stop();
}

#[test]
fn bad_input_gets_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://cli.test/a/../b",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "spiffe-id",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "http://cli.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "spiffe-id",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "unix:uid:0",
            ],
            "not in trust domain cli.test",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://cli.test/a",
                "--parent-id",
                "spiffe://cli.test/node/n1",
                "--selector",
                "nocolon",
            ],
            "invalid selector",
        ),
        (
            &["entry", "delete", "--entry-id", "zzz"],
            "invalid entry id",
        ),
        (
            &[
                "entry",
                "delete",
                "--entry-id",
                "0123456789abcdef0123456789abcdef",
            ],
            "no entry with id",
        ),
        (
            &["token", "generate", "--node", "Bad/Name"],
            "invalid node name",
        ),
        (
            &["token", "generate", "--node", "n1", "--ttl", "soon"],
            "duration",
        ),
        (
            &["agent", "show", "--node", "ghost"],
            "no agent named ghost",
        ),
        (&["agent", "ban", "--node", "ghost"], "no agent named ghost"),
        (&["entry", "frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let out = server.cli(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = if out.status.code() == Some(2) {
            // A usage error: clap's whole message (argument, reason, usage, --help hint).
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(err.contains("For more information, try '--help'."), "{err}");
            err
        } else {
            // An error of the command: one line.
            one_line_error(&out)
        };
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err:?}"
        );
    }
    server.stop();

    // No server: the error says where it looked and what to check.
    let out = Command::new(BIN)
        .args(["server", "healthcheck", "--admin-socket"])
        .arg(dir.path().join("nothing.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = one_line_error(&out);
    assert!(err.contains("is `meshauth server run` running?"), "{err}");
}

#[test]
fn restart_keeps_bundle_and_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://cli.test/web",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1000",
    ]);
    let bundle = server.ok(&["bundle", "show"]);
    server.stop();

    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("server-data/meshauth.db"))
            .unwrap()
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600, "the datastore holds CA keys");

    let server = ServerProcess::start(dir.path());
    assert_eq!(server.ok(&["bundle", "show"]), bundle);
    let entries: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "show", "-o", "json"])).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1);
    server.stop();
}

#[test]
fn policies_identities_and_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let walkthrough = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../meshauth-policy/tests/fixtures/walkthrough.yaml"
    );
    let out = server.ok(&["policy", "apply", "-f", walkthrough]);
    assert_eq!(out.lines().count(), 3, "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&server.ok(&["policy", "list", "-o", "json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "demo1-allow-client1",
            "demo1-allow-client2-auth",
            "demo1-default-deny"
        ]
    );
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys[0], "default/demo1-allow-client1");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|p| p["namespace"] == "default")
    );
    // A bare name is the clusterwide policy of that name or, there being none, default/<name>.
    assert_eq!(
        server
            .ok(&["policy", "delete", "demo1-allow-client1"])
            .trim(),
        "deleted policy demo1-allow-client1"
    );
    let err = server.fails(&["policy", "delete", "demo1-allow-client1"]);
    assert!(err.contains("no policy demo1-allow-client1"), "{err}");

    // The same policy in another namespace is another policy, with its own key.
    let out = server.ok(&["policy", "apply", "-f", walkthrough, "-n", "staging"]);
    assert!(
        out.contains("applied policy default/demo1-default-deny"),
        "the walkthrough names its namespace: {out}"
    );
    let plain = dir.path().join("plain.yaml");
    std::fs::write(&plain, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-all}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n").unwrap();
    let out = server.ok(&[
        "policy",
        "apply",
        "-f",
        plain.to_str().unwrap(),
        "-n",
        "staging",
    ]);
    assert_eq!(out.trim(), "applied policy staging/deny-all");
    server.ok(&["policy", "apply", "-f", plain.to_str().unwrap()]);
    let text = server.ok(&["policy", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("staging/deny-all") && l.contains("staging"))
            && text.lines().any(|l| l.starts_with("default/deny-all")),
        "{text}"
    );
    server.ok(&["policy", "delete", "-n", "staging", "deny-all"]);
    server.ok(&["policy", "delete", "default/deny-all"]);
    let err = server.fails(&["policy", "delete", "staging/deny-all"]);
    assert!(err.contains("no policy staging/deny-all"), "{err}");
    // Bad input: one sentence each.
    let err = server.fails(&[
        "policy",
        "apply",
        "-f",
        plain.to_str().unwrap(),
        "-n",
        "Bad",
    ]);
    assert!(err.contains("invalid namespace \"Bad\""), "{err}");
    let err = server.fails(&["policy", "delete", "Bad/x"]);
    assert!(err.contains("invalid namespace \"Bad\""), "{err}");
    let err = server.fails(&["policy", "delete", "-n", "staging", "a/b"]);
    assert!(err.contains("already a key"), "{err}");

    // An invalid file is refused whole, with the file and field named.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  endpointSelector: {}\n  egress: [{toFQDNs: [{matchName: example.com}]}]\n").unwrap();
    let err = server.fails(&["policy", "apply", "-f", bad.to_str().unwrap()]);
    assert!(err.contains("bad.yaml") && err.contains("toFQDNs"), "{err}");
    // CIDR peers are supported.
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr}\nspec:\n  endpointSelector: {}\n  egress: [{toCIDR: [1.2.3.4/32]}]\n").unwrap();
    server.ok(&["policy", "apply", "-f", bad.to_str().unwrap()]);
    server.ok(&["policy", "delete", "default/cidr"]);

    let status: serde_json::Value =
        serde_json::from_str(&server.ok(&["status", "-o", "json"])).unwrap();
    // default's two left, and the walkthrough's three again in default (it names default).
    assert_eq!(status["policies"], 3, "{status}");
    assert_eq!(status["agents"], serde_json::json!([]));
    assert_eq!(status["authorities"][0]["state"], "active");
    let ids: serde_json::Value =
        serde_json::from_str(&server.ok(&["identity", "list", "-o", "json"])).unwrap();
    assert_eq!(ids, serde_json::json!([]));
    let eps: serde_json::Value =
        serde_json::from_str(&server.ok(&["endpoint", "list", "-o", "json"])).unwrap();
    assert_eq!(eps, serde_json::json!([]));

    // The same labels in two namespaces: two identities; pods show the labels they were given.
    let a = server.ok(&[
        "pod", "create", "web-1", "--node", "n1", "--labels", "app=web",
    ]);
    let b = server.ok(&[
        "pod", "create", "web-1", "-n", "prod", "--node", "n1", "--labels", "app=web",
    ]);
    assert!(
        a.contains("default/web-1") && a.contains("(identity 256)"),
        "{a}"
    );
    assert!(
        b.contains("prod/web-1") && b.contains("(identity 257)"),
        "{b}"
    );
    let ids: serde_json::Value =
        serde_json::from_str(&server.ok(&["identity", "list", "-o", "json"])).unwrap();
    assert_eq!(
        ids[1]["labels"],
        serde_json::json!({"app": "web", "io.kubernetes.pod.namespace": "prod"})
    );
    let eps: serde_json::Value =
        serde_json::from_str(&server.ok(&["pod", "list", "-o", "json"])).unwrap();
    assert_eq!(eps[0]["labels"], serde_json::json!({"app": "web"}));
    let err = server.fails(&["pod", "create", "x", "-n", "Prod", "--node", "n1"]);
    assert!(err.contains("invalid namespace \"Prod\""), "{err}");

    // Trace by pod name, over the server's policies (no -f): the walkthrough's policies are
    // in default, so web-1 of default is what they select (app=web: none do) and a client1 pod
    // of prod is not client1 of default.
    server.ok(&[
        "pod",
        "create",
        "demo-1",
        "--node",
        "n1",
        "--labels",
        "app=demodeployment",
    ]);
    server.ok(&[
        "pod",
        "create",
        "c1",
        "--node",
        "n1",
        "--labels",
        "app=client1",
    ]);
    server.ok(&[
        "pod",
        "create",
        "c1",
        "-n",
        "prod",
        "--node",
        "n1",
        "--labels",
        "app=client1",
    ]);
    let trace = |src: &str, dst: &str| -> serde_json::Value {
        serde_json::from_str(&server.ok(&[
            "policy", "trace", "--src", src, "--dst", dst, "--dport", "80/TCP", "-o", "json",
        ]))
        .unwrap()
    };
    let t = trace("pod:c1", "pod:default/demo-1");
    assert_eq!(t["verdict"], "allowed", "{t}");
    assert_eq!(
        t["ingress"]["decided_by"][0],
        "default/demo1-allow-client1/ingress[0]"
    );
    assert_eq!(t["src_peer"]["pod"], "default/c1");
    let t = trace("pod:prod/c1", "pod:demo-1");
    assert_eq!(t["verdict"], "denied", "{t}");
    assert_eq!(
        t["src_peer"]["labels"],
        "app=client1,io.kubernetes.pod.namespace=prod"
    );
    let err = server.fails(&[
        "policy", "trace", "--src", "pod:nope", "--dst", "world", "--dport", "80",
    ]);
    assert!(err.contains("no pod default/nope"), "{err}");
    server.stop();
}

/// SIGTERM stops the server within a few seconds whatever clients hold open: an agent's sync
/// stream, a TCP connection that never starts TLS, and an idle admin-socket connection. The
/// port is free again at once, and the data is intact for the next start. The same for the
/// agent, with idle connections to its sockets.
#[test]
fn sigterm_stops_the_server_promptly_whatever_clients_hold_open() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let server = ServerProcess::start_on(dir.path(), port, &[]);
    server.bundle_file();
    let token = server.token("n1");
    let agent = support::AgentProcess::start(dir.path(), "n1", &server, Some(&token));
    support::eventually(Duration::from_secs(20), "the agent's sync stream", || {
        agent
            .health()
            .filter(|h| h["server_connected"] == true)
            .map(|_| ())
    });
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _admin = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    let stopping = std::time::Instant::now();
    server.stop();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is released");
    eprintln!(
        "server stopped on SIGTERM in {took:?} with a sync stream, a silent TCP client and an admin connection open"
    );
    let server = ServerProcess::start_on(dir.path(), port, &[]);
    assert!(server.ok(&["agent", "list"]).contains("n1"));
    // The agent too, with idle connections to its admin and Workload API sockets.
    let _admin = std::os::unix::net::UnixStream::connect(&agent.admin_socket).unwrap();
    let _workload = std::os::unix::net::UnixStream::connect(&agent.workload_socket).unwrap();
    let stopping = std::time::Instant::now();
    agent.stop();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the agent's SIGTERM took {took:?}"
    );
    eprintln!("agent stopped on SIGTERM in {took:?} with idle admin and Workload API connections");
    server.stop();
}
