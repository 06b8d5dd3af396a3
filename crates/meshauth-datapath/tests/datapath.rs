//! The datapath in the kernel, in a two-node lab: authentication required, then granted, then
//! expired; deny entries; replies through conntrack; spoofed sources; loader restarts.
//! Broad denies beside narrow allows for TCP, UDP and ICMP; established flows stopped when
//! their policy, their auth entry or the ipcache changes.
//! These tests need root: they skip with a message otherwise, and fail under
//! `MESHAUTH_REQUIRE_ROOT=1` (set by the test script and CI).

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshauth_datapath::netns;
use meshauth_datapath::{
    AuthKey, AuthType, Datapath, Direction, DropReason, EndpointId, EndpointInfo, EventReader,
    FlowEvent, PolicyEntry, PortRange, Protocol, Verdict,
};
use meshauth_lab::{Lab, Pod};
use meshauth_policy::{IdentityId, NodeId};

const A_ID: IdentityId = IdentityId::new(1000);
const B_ID: IdentityId = IdentityId::new(2000);

const SERVER: &str = r#"
import socket, sys, threading
def tcp(port):
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(64)
    while True:
        c, _ = t.accept()
        def echo(c=c):
            for d in iter(lambda: c.recv(4096), b""):
                c.sendall(d)
        threading.Thread(target=echo, daemon=True).start()
def udp(port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    while True:
        d, a = u.recvfrom(4096); u.sendto(d, a)
for p in sys.argv[1:]:
    threading.Thread(target=tcp, args=(int(p),), daemon=True).start()
    threading.Thread(target=udp, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

const TCP_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
s.sendall(b"x"); assert s.recv(1) == b"x"
"#;

const UDP_CLIENT: &str = r#"
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
u.sendto(b"x", (sys.argv[1], int(sys.argv[2]))); assert u.recvfrom(16)[0] == b"x"
"#;

const STREAM_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
for line in sys.stdin:
    s.sendall(line.encode()); print(s.recv(4096).decode().strip(), flush=True)
"#;

/// A two-node lab with pod a (identity 1000) on n1 and pod b (identity 2000) on n2, a
/// datapath loaded on each node, and an echo server in b. Torn down on drop.
struct Cluster {
    lab: Lab,
    a: Pod,
    b: Pod,
    n1: Option<Datapath>,
    n2: Option<Datapath>,
    server: Child,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        self.n1.take();
        self.n2.take();
        let _ = self.lab.down();
    }
}

fn root() -> bool {
    meshauth_test_support::require_root("the datapath tests (eBPF, network namespaces)")
}

fn load(lab: &Lab, node: &str, pods: &[&Pod]) -> Datapath {
    let ns = format!("{}-{node}", lab.name());
    let pin = Datapath::pin_dir_for(&ns);
    let veths: Vec<String> = pods.iter().map(|p| p.host_veth.clone()).collect();
    netns::run_in(&netns::named(&ns), move || {
        let mut dp = Datapath::load(&pin).unwrap();
        for v in &veths {
            dp.attach(v).unwrap();
        }
        dp
    })
    .unwrap()
}

fn program(dp: &mut Datapath, a: &Pod, b: &Pod) {
    dp.set_ipcache(a.ip, 32, A_ID, NodeId::new(1)).unwrap();
    dp.set_ipcache(b.ip, 32, B_ID, NodeId::new(2)).unwrap();
}

impl Cluster {
    fn new(name: &str, ports: &[u16]) -> Cluster {
        let lab = Lab::new(name).unwrap();
        let _ = lab.down();
        lab.up(2).unwrap();
        let a = lab.add_pod("a", "n1", BTreeMap::new()).unwrap();
        let b = lab.add_pod("b", "n2", BTreeMap::new()).unwrap();
        let mut args = vec!["python3".to_string(), "-c".into(), SERVER.into()];
        args.extend(ports.iter().map(|p| p.to_string()));
        let mut server = lab
            .exec("b", &args)
            .unwrap()
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let mut n1 = load(&lab, "n1", &[&a]);
        let mut n2 = load(&lab, "n2", &[&b]);
        n1.set_endpoint(
            a.host_ifindex,
            &EndpointInfo {
                id: EndpointId(1),
                identity: A_ID,
                ipv4: a.ip,
                policy_gen: 1,
            },
        )
        .unwrap();
        n2.set_endpoint(
            b.host_ifindex,
            &EndpointInfo {
                id: EndpointId(1),
                identity: B_ID,
                ipv4: b.ip,
                policy_gen: 1,
            },
        )
        .unwrap();
        program(&mut n1, &a, &b);
        program(&mut n2, &a, &b);
        Cluster {
            lab,
            a,
            b,
            n1: Some(n1),
            n2: Some(n2),
            server,
        }
    }

    fn n1(&mut self) -> &mut Datapath {
        self.n1.as_mut().unwrap()
    }

    fn n2(&mut self) -> &mut Datapath {
        self.n2.as_mut().unwrap()
    }

    fn ok(&self, from: &str, argv: &[&str]) -> bool {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let out = self
            .lab
            .exec(from, &argv)
            .unwrap()
            .stderr(Stdio::null())
            .output()
            .unwrap();
        out.status.success()
    }

    fn tcp(&self, from: &str, to: &Pod, port: u16) -> bool {
        self.ok(
            from,
            &[
                "python3",
                "-c",
                TCP_CLIENT,
                &to.ip.to_string(),
                &port.to_string(),
            ],
        )
    }

    fn udp(&self, from: &str, to: &Pod, port: u16) -> bool {
        self.ok(
            from,
            &[
                "python3",
                "-c",
                UDP_CLIENT,
                &to.ip.to_string(),
                &port.to_string(),
            ],
        )
    }

    fn ping(&self, from: &str, to: &Pod) -> bool {
        self.ok(from, &["ping", "-c1", "-W1", &to.ip.to_string()])
    }
}

fn allow(
    direction: Direction,
    remote: IdentityId,
    protocol: Option<Protocol>,
    ports: PortRange,
    auth: AuthType,
) -> PolicyEntry {
    PolicyEntry {
        direction,
        remote: Some(remote),
        protocol,
        ports,
        verdict: Verdict::Allow,
        auth,
    }
}

/// The first event matching `want` within 3 s.
fn wait_event(events: &mut EventReader, want: impl Fn(&FlowEvent) -> bool) -> FlowEvent {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Some(e) = events.next_event(Duration::from_millis(200))
            && want(&e)
        {
            return e;
        }
    }
    panic!("no matching event within 3 s");
}

#[test]
fn authentication_required_granted_and_expired_for_tcp_udp_icmp() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("dpauth", &[8080]);
    let (a, b) = (c.a.clone(), c.b.clone());
    c.n1()
        .set_policy(
            EndpointId(1),
            &[
                allow(
                    Direction::Egress,
                    B_ID,
                    Some(Protocol::Tcp),
                    PortRange::single(8080),
                    AuthType::Required,
                ),
                allow(
                    Direction::Egress,
                    B_ID,
                    Some(Protocol::Udp),
                    PortRange::single(8080),
                    AuthType::Required,
                ),
                allow(
                    Direction::Egress,
                    B_ID,
                    Some(Protocol::Icmp),
                    PortRange::ANY,
                    AuthType::Required,
                ),
            ],
        )
        .unwrap();
    c.n2()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Ingress,
                A_ID,
                None,
                PortRange::ANY,
                AuthType::None,
            )],
        )
        .unwrap();
    let mut events = c.n1().take_events().unwrap();
    let key = AuthKey {
        local: A_ID,
        remote: B_ID,
        remote_node: NodeId::new(2),
        auth_type: AuthType::Required,
        connection: None,
    };

    // No auth entry: all three fail, and the agent is told which pair to authenticate.
    assert!(
        !c.tcp("a", &b, 8080),
        "TCP must not pass before authentication"
    );
    assert!(
        !c.udp("a", &b, 8080),
        "UDP must not pass before authentication"
    );
    assert!(!c.ping("a", &b), "ICMP must not pass before authentication");
    for proto in [6u8, 17, 1] {
        let e = wait_event(&mut events, |e| e.protocol == proto && e.drop.is_some());
        assert_eq!(
            e.drop,
            Some(DropReason::AuthenticationRequired),
            "protocol {proto}"
        );
        assert_eq!(e.auth_key, Some(key), "protocol {proto}");
        assert_eq!((e.src, e.dst), (a.ip, b.ip));
        assert_eq!((e.src_identity, e.dst_identity), (A_ID, B_ID));
        assert_eq!(e.direction, Direction::Egress);
    }

    // Authenticated: all three pass.
    let expires = SystemTime::now() + Duration::from_secs(4);
    c.n1().insert_auth(key, expires).unwrap();
    assert_eq!(c.n1().auth_entries().unwrap().len(), 1);
    assert!(c.tcp("a", &b, 8080), "TCP passes once authenticated");
    assert!(c.udp("a", &b, 8080), "UDP passes once authenticated");
    assert!(c.ping("a", &b), "ICMP passes once authenticated");

    // Expired: new flows drop again.
    while SystemTime::now() < expires + Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!c.tcp("a", &b, 8080), "TCP drops after expiry");
    assert!(!c.udp("a", &b, 8080), "UDP drops after expiry");
    assert!(!c.ping("a", &b), "ICMP drops after expiry");
    let stats = c.n1().stats().unwrap();
    assert!(
        stats.dropped[&(Direction::Egress, DropReason::AuthenticationRequired)] >= 6,
        "{stats:?}"
    );
    assert!(stats.forwarded[&Direction::Egress] > 0);

    // The hold hook: in mark mode an unauthenticated packet is marked and passed on to where a
    // node-side queue would hold it (the lab has none) and the agent is told; the flow is tracked
    // as held, so its replies do not pass until the pair has authenticated.
    c.n1()
        .set_auth_miss_action(meshauth_datapath::AuthMissAction::Mark(0x4d41))
        .unwrap();
    assert!(
        !c.tcp("a", &b, 8080),
        "the SYN leaves marked, the SYN-ACK waits for authentication"
    );
    let e = wait_event(&mut events, |e| e.protocol == 6 && e.held);
    assert_eq!(e.drop, None, "held, not dropped");
    assert_eq!(e.auth_key, Some(key));
    c.n1()
        .insert_auth(key, SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    assert!(
        c.tcp("a", &b, 8080),
        "authenticated: held and new flows pass"
    );
    c.n1()
        .set_auth_miss_action(meshauth_datapath::AuthMissAction::Drop)
        .unwrap();
}

#[test]
fn deny_wins_replies_pass_and_spoofing_drops() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("dpdeny", &[8080, 9000]);
    let (a, b) = (c.a.clone(), c.b.clone());
    c.n1()
        .set_policy(
            EndpointId(1),
            &[
                PolicyEntry {
                    direction: Direction::Egress,
                    remote: None,
                    protocol: None,
                    ports: PortRange::ANY,
                    verdict: Verdict::Allow,
                    auth: AuthType::None,
                },
                PolicyEntry {
                    direction: Direction::Egress,
                    remote: Some(B_ID),
                    protocol: Some(Protocol::Tcp),
                    ports: PortRange::single(8080),
                    verdict: Verdict::Deny,
                    auth: AuthType::None,
                },
            ],
        )
        .unwrap();
    // b allows TCP in from a, and has no egress entry at all: its replies pass through
    // conntrack only.
    c.n2()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Ingress,
                A_ID,
                Some(Protocol::Tcp),
                PortRange {
                    start: 1,
                    end: 65535,
                },
                AuthType::None,
            )],
        )
        .unwrap();
    let mut events = c.n1().take_events().unwrap();

    assert!(
        !c.tcp("a", &b, 8080),
        "the deny entry wins over the allow-all"
    );
    let e = wait_event(&mut events, |e| e.drop.is_some() && e.dport == 8080);
    assert_eq!(e.drop, Some(DropReason::PolicyDenied));
    assert!(
        c.tcp("a", &b, 9000),
        "allowed, and b's replies pass without an egress entry"
    );
    let e = wait_event(&mut events, |e| e.drop.is_none() && e.dport == 9000);
    assert_eq!(e.direction, Direction::Egress);
    assert!(!c.ping("b", &a), "b itself may not send anything new");
    assert!(!c.udp("a", &b, 9000), "b's ingress allows TCP only");

    // a sends from an address that is not its own.
    assert!(c.ok("a", &["ip", "addr", "add", "10.200.1.99/32", "dev", "eth0"]));
    assert!(!c.ok(
        "a",
        &["ping", "-c1", "-W1", "-I", "10.200.1.99", &b.ip.to_string()]
    ));
    let e = wait_event(&mut events, |e| e.drop == Some(DropReason::SpoofedSource));
    assert_eq!(e.src, "10.200.1.99".parse::<std::net::Ipv4Addr>().unwrap());
}

#[test]
fn loader_restart_keeps_connections_and_state() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("dprst", &[8080]);
    let (a, b) = (c.a.clone(), c.b.clone());
    c.n1()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Egress,
                B_ID,
                Some(Protocol::Tcp),
                PortRange::single(8080),
                AuthType::Required,
            )],
        )
        .unwrap();
    c.n2()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Ingress,
                A_ID,
                None,
                PortRange::ANY,
                AuthType::Required,
            )],
        )
        .unwrap();
    let expires = SystemTime::now() + Duration::from_secs(600);
    c.n1()
        .insert_auth(
            AuthKey {
                local: A_ID,
                remote: B_ID,
                remote_node: NodeId::new(2),
                auth_type: AuthType::Required,
                connection: None,
            },
            expires,
        )
        .unwrap();
    c.n2()
        .insert_auth(
            AuthKey {
                local: B_ID,
                remote: A_ID,
                remote_node: NodeId::new(1),
                auth_type: AuthType::Required,
                connection: None,
            },
            expires,
        )
        .unwrap();

    let args: Vec<String> = ["python3", "-c", STREAM_CLIENT, &b.ip.to_string(), "8080"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut client = c
        .lab
        .exec("a", &args)
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = client.stdin.take().unwrap();
    let mut output = BufReader::new(client.stdout.take().unwrap());
    let mut exchange = |word: &str| {
        writeln!(input, "{word}").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            word,
            "the established connection still carries data"
        );
    };
    exchange("one");

    // The loaders exit: programs stay attached through their pinned links.
    c.n1.take();
    c.n2.take();
    exchange("two");

    // New loaders: same pinned maps (auth and conntrack kept), programs replaced in place.
    let mut n1 = load(&c.lab, "n1", &[&a]);
    c.n2 = Some(load(&c.lab, "n2", &[&b]));
    assert_eq!(
        n1.auth_entries().unwrap().len(),
        1,
        "auth entries survive the restart"
    );
    assert!(
        n1.conntrack_len().unwrap() > 0,
        "conntrack survives the restart"
    );
    c.n1 = Some(n1);
    exchange("three");
    assert!(
        c.tcp("a", &b, 8080),
        "new connections still find the auth entry"
    );
    drop(input);
    let _ = client.wait();

    let lab = c.lab.clone();
    drop(c);
    let (state, live) = lab.status().unwrap();
    assert!(state.is_none() && live.is_empty(), "{live:?}");
    assert!(
        !Datapath::pin_dir_for("dprst-n1").exists(),
        "pinned maps and links are removed"
    );
}

fn entry(
    direction: Direction,
    remote: Option<IdentityId>,
    protocol: Option<Protocol>,
    ports: (u16, u16),
    verdict: Verdict,
) -> PolicyEntry {
    PolicyEntry {
        direction,
        remote,
        protocol,
        ports: PortRange {
            start: ports.0,
            end: ports.1,
        },
        verdict,
        auth: AuthType::None,
    }
}

/// Sets b's ingress entries and bumps its policy generation, as the agent does.
fn set_b_policy(c: &mut Cluster, generation: u32, entries: &[PolicyEntry]) {
    let (b, id) = (c.b.clone(), EndpointId(1));
    // Two plans that allow nothing are the same (no keys): set_policy may report no change.
    c.n2().set_policy(id, entries).unwrap();
    c.n2()
        .set_endpoint(
            b.host_ifindex,
            &EndpointInfo {
                id,
                identity: B_ID,
                ipv4: b.ip,
                policy_gen: generation,
            },
        )
        .unwrap();
}

#[test]
fn a_broad_deny_beside_a_narrow_allow_denies_for_tcp_udp_and_icmp() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("dpbroad", &[80, 8080]);
    let b = c.b.clone();
    c.n1()
        .set_policy(
            EndpointId(1),
            &[entry(
                Direction::Egress,
                None,
                None,
                (0, 65535),
                Verdict::Allow,
            )],
        )
        .unwrap();
    let mut events = c.n2().take_events().unwrap();
    use Direction::Ingress as In;
    // `ingressDeny` of ports 1-1023 from a beside an allow of port 80 from a, TCP and UDP.
    set_b_policy(
        &mut c,
        2,
        &[
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Tcp),
                (1, 1023),
                Verdict::Deny,
            ),
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Tcp),
                (80, 80),
                Verdict::Allow,
            ),
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Tcp),
                (8080, 8080),
                Verdict::Allow,
            ),
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Udp),
                (1, 1023),
                Verdict::Deny,
            ),
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Udp),
                (80, 80),
                Verdict::Allow,
            ),
            entry(
                In,
                Some(A_ID),
                Some(Protocol::Udp),
                (8080, 8080),
                Verdict::Allow,
            ),
        ],
    );
    assert!(!c.tcp("a", &b, 80), "TCP 80: the broader deny wins");
    let e = wait_event(&mut events, |e| e.protocol == 6 && e.dport == 80);
    assert_eq!(e.drop, Some(DropReason::PolicyDenied));
    assert!(!c.udp("a", &b, 80), "UDP 80: the broader deny wins");
    let e = wait_event(&mut events, |e| e.protocol == 17 && e.dport == 80);
    assert_eq!(e.drop, Some(DropReason::PolicyDenied));
    assert!(c.tcp("a", &b, 8080), "TCP 8080 is allowed");
    assert!(c.udp("a", &b, 8080), "UDP 8080 is allowed");

    // A deny of everything from a beside an allow of ICMP from a; and a deny of ICMP from any
    // identity beside an allow of ICMP from a.
    for (generation, deny) in [
        (3, entry(In, Some(A_ID), None, (0, 65535), Verdict::Deny)),
        (
            4,
            entry(In, None, Some(Protocol::Icmp), (0, 65535), Verdict::Deny),
        ),
    ] {
        set_b_policy(
            &mut c,
            generation,
            &[
                deny,
                entry(
                    In,
                    Some(A_ID),
                    Some(Protocol::Icmp),
                    (0, 65535),
                    Verdict::Allow,
                ),
            ],
        );
        assert!(!c.ping("a", &b), "ICMP: the broader deny wins ({deny:?})");
        let e = wait_event(&mut events, |e| e.protocol == 1 && e.drop.is_some());
        assert_eq!(e.drop, Some(DropReason::PolicyDenied));
    }
    set_b_policy(
        &mut c,
        5,
        &[entry(
            In,
            Some(A_ID),
            Some(Protocol::Icmp),
            (0, 65535),
            Verdict::Allow,
        )],
    );
    assert!(c.ping("a", &b), "ICMP alone is allowed");
}

/// A long-lived connection from a to b's echo server: one line at a time.
struct Stream {
    child: Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
}

impl Stream {
    fn open(c: &Cluster, port: u16) -> Stream {
        let args: Vec<String> = [
            "python3",
            "-c",
            STREAM_CLIENT,
            &c.b.ip.to_string(),
            &port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = c
            .lab
            .exec("a", &args)
            .unwrap()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Stream {
            child,
            input,
            output,
        }
    }

    /// Whether `word` comes back (the client gives up after 2 s).
    fn echo(&mut self, word: &str) -> bool {
        if writeln!(self.input, "{word}").is_err() {
            return false;
        }
        let mut line = String::new();
        matches!(self.output.read_line(&mut line), Ok(n) if n > 0) && line.trim() == word
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn established_flows_stop_when_policy_auth_or_ipcache_change() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("dpest", &[8080]);
    let b = c.b.clone();
    let key = AuthKey {
        local: A_ID,
        remote: B_ID,
        remote_node: NodeId::new(2),
        auth_type: AuthType::Required,
        connection: None,
    };
    c.n1()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Egress,
                B_ID,
                Some(Protocol::Tcp),
                PortRange::single(8080),
                AuthType::Required,
            )],
        )
        .unwrap();
    let allow_a = [allow(
        Direction::Ingress,
        A_ID,
        None,
        PortRange::ANY,
        AuthType::None,
    )];
    set_b_policy(&mut c, 2, &allow_a);
    c.n1()
        .insert_auth(key, SystemTime::now() + Duration::from_secs(600))
        .unwrap();
    let mut n2_events = c.n2().take_events().unwrap();
    let mut n1_events = c.n1().take_events().unwrap();

    // 1. b's policy stops allowing a: the open connection stops at its next packet.
    let mut s = Stream::open(&c, 8080);
    assert!(s.echo("one"));
    set_b_policy(&mut c, 3, &[]);
    assert!(
        !s.echo("two"),
        "the established flow is decided again and denied"
    );
    let e = wait_event(&mut n2_events, |e| {
        e.drop == Some(DropReason::PolicyDenied) && e.established
    });
    assert_eq!(e.direction, Direction::Ingress);
    drop(s);
    set_b_policy(&mut c, 4, &allow_a);

    // 2. The auth entry is revoked: the open connection stops, the agent is told again.
    let mut s = Stream::open(&c, 8080);
    assert!(s.echo("one"));
    c.n1().remove_auth(key).unwrap();
    assert!(!s.echo("two"), "the established flow needs its auth entry");
    let e = wait_event(&mut n1_events, |e| {
        e.drop == Some(DropReason::AuthenticationRequired) && e.established
    });
    assert_eq!(e.auth_key, Some(key));
    drop(s);
    c.n1()
        .insert_auth(key, SystemTime::now() + Duration::from_secs(600))
        .unwrap();

    // 3. b's address is given to an identity a may not reach: on n1 the ipcache changes and
    //    its generation is bumped.
    let mut s = Stream::open(&c, 8080);
    assert!(s.echo("one"));
    let other = IdentityId::new(3000);
    c.n1().set_ipcache(b.ip, 32, other, NodeId::new(2)).unwrap();
    c.n1().set_ipcache_generation(7).unwrap();
    assert!(!s.echo("two"), "the peer's identity changed under the flow");
    let e = wait_event(&mut n1_events, |e| {
        e.drop == Some(DropReason::PolicyDenied) && e.established
    });
    assert_eq!(e.dst_identity, other);
    drop(s);

    // 4. And back: a new connection passes again; idle flows are swept with short timeouts.
    c.n1().set_ipcache(b.ip, 32, B_ID, NodeId::new(2)).unwrap();
    c.n1().set_ipcache_generation(8).unwrap();
    assert!(c.tcp("a", &b, 8080));
    assert!(c.n1().conntrack_len().unwrap() > 0);
    c.n1()
        .set_conntrack_timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .unwrap();
    let later = meshauth_datapath::boot_time_ns() + 3_000_000_000;
    assert!(c.n1().sweep_conntrack(later).unwrap() > 0);
    assert_eq!(c.n1().conntrack_len().unwrap(), 0);
}

/// One ICMP message of `type` with echo id `id` from a raw socket; exits 0 when the answer
/// (echo reply for 8, timestamp reply for 13) with the same id comes back within a second.
const ICMP_CLIENT: &str = r#"
import socket, struct, sys, time
dst, typ, ident = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
payload = b"\0" * 12 if typ == 13 else b"meshauth"
head = struct.pack("!BBHHH", typ, 0, 0, ident, 1)
pkt = struct.pack("!BBHHH", typ, 0, csum(head + payload), ident, 1) + payload
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(1)
s.sendto(pkt, (dst, 0))
want = {8: 0, 13: 14}[typ]
end = time.time() + 1
while time.time() < end:
    try:
        data, addr = s.recvfrom(2048)
    except socket.timeout:
        break
    ihl = (data[0] & 15) * 4
    t, _, _, i = struct.unpack("!BBHH", data[ihl:ihl + 6])
    if addr[0] == dst and t == want and i == ident:
        sys.exit(0)
sys.exit(1)
"#;

impl Cluster {
    fn icmp(&self, from: &str, to: &Pod, icmp_type: u8, id: u16) -> bool {
        self.ok(
            from,
            &[
                "python3",
                "-c",
                ICMP_CLIENT,
                &to.ip.to_string(),
                &icmp_type.to_string(),
                &id.to_string(),
            ],
        )
    }
}

/// b's ingress entries compiled from a policy in namespace default (a is app=a, b app=b).
fn compiled_for_b(yaml: &str) -> Vec<PolicyEntry> {
    let ns = |app: &str| {
        format!("app={app}")
            .parse::<meshauth_policy::Labels>()
            .unwrap()
            .with_namespace("default")
            .unwrap()
    };
    let ids = BTreeMap::from([(A_ID, ns("a")), (B_ID, ns("b"))]);
    let policies = meshauth_policy::parse_policies(yaml).unwrap();
    meshauth_policy::compile_endpoint(&policies, &ids, &ns("b"))
        .into_iter()
        .filter(|e| e.direction == Direction::Ingress)
        .collect()
}

#[test]
fn icmp_types_decide_and_echo_replies_pass_as_replies() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("nsicmp", &[]);
    let (a, b) = (c.a.clone(), c.b.clone());
    c.n1()
        .set_policy(
            EndpointId(1),
            &[entry(
                Direction::Egress,
                None,
                None,
                (0, 65535),
                Verdict::Allow,
            )],
        )
        .unwrap();
    let mut events = c.n2().take_events().unwrap();

    // `icmps: type 8` from a: echo requests pass; the echo reply (type 0) passes as the reply
    // of the request's flow, though neither b's egress nor a's ingress allows anything.
    let allow_echo = compiled_for_b(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: echo}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: a}}]\n    icmps: [{fields: [{type: 8, family: IPv4}]}]\n",
    );
    assert_eq!(
        allow_echo
            .iter()
            .map(|e| (e.remote, e.protocol, e.ports))
            .collect::<Vec<_>>(),
        [(Some(A_ID), Some(Protocol::Icmp), PortRange::single(8))],
        "the type is the port of the entry"
    );
    set_b_policy(&mut c, 2, &allow_echo);
    assert!(c.icmp("a", &b, 8, 4242), "an echo request is allowed");
    assert!(c.ping("a", &b), "and so is ping");
    // Another type with the same echo id is another flow: denied at b's ingress.
    assert!(!c.icmp("a", &b, 13, 4242), "a timestamp request is not");
    let e = wait_event(&mut events, |e| {
        e.protocol == 1 && e.drop.is_some() && e.direction == Direction::Ingress
    });
    assert_eq!(e.drop, Some(DropReason::PolicyDenied));
    assert_eq!((e.src, e.dst), (a.ip, b.ip));
    assert_eq!(
        e.icmp_type, 13,
        "the event names the type policy decided on"
    );
    // b's own echo request is no reply: b's egress allows nothing.
    assert!(!c.ping("b", &a), "b may not start anything");

    // A deny of type 8 beside an allow of every ICMP type from a: echo requests drop.
    let deny_echo = compiled_for_b(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: echo}\nspec:\n  endpointSelector: {matchLabels: {app: b}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: a}}]\n    toPorts: [{ports: [{port: \"0\", protocol: ICMP}]}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: a}}]\n    icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]\n",
    );
    set_b_policy(&mut c, 3, &deny_echo);
    assert!(!c.icmp("a", &b, 8, 4243), "the deny of type 8 wins");
    assert!(!c.ping("a", &b), "ping is denied");
    let e = wait_event(&mut events, |e| {
        e.protocol == 1
            && e.drop == Some(DropReason::PolicyDenied)
            && e.direction == Direction::Ingress
            && e.dport == 4243
    });
    assert_eq!((e.src_identity, e.dst_identity), (A_ID, B_ID));
    assert_eq!(e.icmp_type, 8);
    // Type 13 is allowed in now (its reply, type 14, is no echo reply: b's egress drops it).
    let before = c.n2().stats().unwrap().forwarded[&Direction::Ingress];
    assert!(!c.icmp("a", &b, 13, 4244));
    let e = wait_event(&mut events, |e| e.protocol == 1 && e.dport == 4244);
    assert_eq!(
        (e.drop, e.direction),
        (None, Direction::Ingress),
        "the timestamp request is forwarded to b"
    );
    assert!(c.n2().stats().unwrap().forwarded[&Direction::Ingress] > before);
}

#[test]
fn the_ipcache_is_a_longest_prefix_match_and_identity_0_has_no_identity() {
    if !root() {
        return;
    }
    let mut c = Cluster::new("nsipc", &[]);
    let b = c.b.clone();
    let cidr_id = IdentityId::new(IdentityId::FIRST_LOCAL);
    let icmp_to = |remote: IdentityId| PolicyEntry {
        direction: Direction::Egress,
        remote: Some(remote),
        protocol: Some(Protocol::Icmp),
        ports: PortRange::ANY,
        verdict: Verdict::Allow,
        auth: AuthType::None,
    };
    // a may ping the world only; b accepts anything from a.
    c.n1()
        .set_policy(EndpointId(1), &[icmp_to(IdentityId::WORLD)])
        .unwrap();
    c.n2()
        .set_policy(
            EndpointId(1),
            &[allow(
                Direction::Ingress,
                A_ID,
                None,
                PortRange::ANY,
                AuthType::None,
            )],
        )
        .unwrap();
    let mut events = c.n1().take_events().unwrap();
    // On n1, b's address leaves the cluster: the world is 0.0.0.0/0, and 10.200.2.0/24 (b's
    // node's pod range) has no identity.
    c.n1().remove_ipcache(b.ip, 32).unwrap();
    c.n1()
        .set_ipcache(
            "0.0.0.0".parse().unwrap(),
            0,
            IdentityId::WORLD,
            NodeId::new(0),
        )
        .unwrap();
    c.n1()
        .set_ipcache(
            "10.200.2.0".parse().unwrap(),
            24,
            IdentityId::UNKNOWN,
            NodeId::new(2),
        )
        .unwrap();
    assert!(!c.ping("a", &b), "inside a pod range without a pod");
    let e = wait_event(&mut events, |e| e.protocol == 1 && e.drop.is_some());
    assert_eq!(e.drop, Some(DropReason::NoIdentity));
    // Without the pod range's entry, b's address is the world's: allowed.
    c.n1()
        .remove_ipcache("10.200.2.0".parse().unwrap(), 24)
        .unwrap();
    assert!(c.ping("a", &b), "the world is allowed");
    // A CIDR prefix of a policy takes its addresses from the world: a longer match, another
    // identity, which a's policy does not allow until it names it.
    c.n1()
        .set_ipcache("10.200.0.0".parse().unwrap(), 16, cidr_id, NodeId::new(0))
        .unwrap();
    c.n1().set_ipcache_generation(1).unwrap();
    assert!(!c.ping("a", &b), "the prefix's identity is not the world");
    let e = wait_event(&mut events, |e| {
        e.protocol == 1 && e.drop == Some(DropReason::PolicyDenied)
    });
    assert_eq!(e.dst_identity, cidr_id);
    c.n1()
        .set_policy(EndpointId(1), &[icmp_to(cidr_id)])
        .unwrap();
    assert!(c.ping("a", &b), "allowed by the prefix's identity");
    // b's own /32 is longer still: b's identity, which a may not reach.
    c.n1().set_ipcache(b.ip, 32, B_ID, NodeId::new(2)).unwrap();
    c.n1().set_ipcache_generation(2).unwrap();
    assert!(!c.ping("a", &b), "the pod's /32 wins");
}
