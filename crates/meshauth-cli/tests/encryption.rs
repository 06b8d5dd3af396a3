//! Encryption bound to authentication (root only), on the demo's lab with `--encrypt`: pod
//! traffic between nodes goes through WireGuard keyed by the agents' node-SVID handshake.
//! Attacked as an attacker on the wire or on a node would: a capture of the underlay holds no
//! plaintext of a known payload (and does hold a plaintext control, so it could have seen it);
//! a packet injected on the underlay with a pod's source address is dropped as unencrypted;
//! a node sending through its tunnel with another node's pod address is dropped by the peer's
//! cryptokey routing; pre-shared keys rotate under a request loop with no failed request; a
//! tunnel taken down, or its agent killed, lets nothing through in the clear.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod demo_lab;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use demo_lab::{BIN, DemoLab, ip, until};

const LAB: &str = "encr";

fn work() -> String {
    format!("{}/{LAB}", meshauth_lab::STATE_DIR)
}

fn socket(node: &str) -> String {
    format!("{}/{node}-agent.sock", work())
}

fn node_ns(node: &str) -> String {
    format!("{LAB}-{node}")
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `node`'s tunnel to `peer`, as `meshauth status` shows it.
fn tunnel(d: &DemoLab, node: &str, peer: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&d.cli(&["status", "-o", "json", "--agent-socket", &socket(node)]))
            .unwrap();
    v["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["peer"] == peer)
        .cloned()
        .unwrap_or_else(|| panic!("{node} has no tunnel to {peer}: {v}"))
}

/// One HTTP GET of `path` from pod `pod` to `to` on a new connection: its status, if any.
fn request(d: &DemoLab, pod: &str, to: &str, path: &str) -> Option<u16> {
    let py = format!(
        "import http.client\nc = http.client.HTTPConnection('{to}', 80, timeout=2)\nc.request('GET', '/{path}'); print(c.getresponse().status)"
    );
    let out = d
        .lab
        .exec(pod, &argv(&["python3", "-c", &py]))
        .unwrap()
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// A capture of every interface of the underlay namespace (the wire between the nodes).
struct Capture {
    child: Child,
    file: String,
}

impl Capture {
    fn start(name: &str) -> Capture {
        let file = format!("{}/{name}.pcap", work());
        let _ = std::fs::remove_file(&file);
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{LAB}-ul"),
                "tcpdump",
                "-i",
                "any",
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-w",
                &file,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/setup.sh installs it)");
        // tcpdump says "listening on" once it captures.
        use std::io::BufRead;
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        for _ in 0..5 {
            let mut line = String::new();
            err.read_line(&mut line).unwrap();
            said.push_str(&line);
            if line.contains("listening") {
                break;
            }
        }
        assert!(said.contains("listening"), "tcpdump: {said}");
        Capture { child, file }
    }

    /// Stops the capture and returns the raw capture file.
    fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        sigint(self.child.id());
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGINT to `pid` (tcpdump flushes and closes its file), through kill(1).
fn sigint(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// How many captured frames are WireGuard (UDP 51871) per tcpdump's own reading.
fn wireguard_frames(file: &[u8]) -> usize {
    let path = format!("{}/wg-count.pcap", work());
    std::fs::write(&path, file).unwrap();
    let out = Command::new("tcpdump")
        .args(["-r", &path, "-n", "udp port 51871"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A UDP datagram carrying `payload` from `node`'s own stack to `to` (plaintext: not pod
/// traffic, so not tunnelled).
fn send_plain_udp(d: &DemoLab, node: &str, to: &str, payload: &str) {
    let py = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'{payload}', ('{to}', 9))"
    );
    let st = d
        .lab
        .exec_in(&node_ns(node), &argv(&["python3", "-c", &py]))
        .status()
        .unwrap();
    assert!(st.success());
}

/// Sends a raw IPv4 TCP SYN from `src` to `dst`:80 out of network namespace `netns`, as an
/// attacker with a raw socket would (source address forged, checksums correct).
fn forge_syn(netns: &str, src: &str, dst: &str, sport: u16) {
    let py = format!(
        r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton('{src}'), socket.inet_aton('{dst}')
tcp = struct.pack('!HHIIBBHHH', {sport}, 80, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
c = csum(src + dst + struct.pack('!BBH', 0, 6, len(tcp)) + tcp)
tcp = tcp[:16] + struct.pack('!H', c) + tcp[18:]
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(ip + tcp, ('{dst}', 0))
"#
    );
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "python3", "-c", &py])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `count` UDP datagrams carrying `payload` from pod `pod` to `to`:80, 50 ms apart (nobody
/// listens: what matters is what crosses the wire).
fn pod_udp(d: &DemoLab, pod: &str, to: &str, payload: &str, count: u32) {
    let py = format!(
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range({count}):\n    try: s.sendto(b'{payload}', ('{to}', 80))\n    except OSError: pass\n    time.sleep(0.05)"
    );
    let st = d
        .lab
        .exec(pod, &argv(&["python3", "-c", &py]))
        .unwrap()
        .status()
        .unwrap();
    assert!(st.success());
}

/// Flows `node`'s agent observed (JSON lines).
fn observed(node: &str) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["observe", "-o", "json", "--agent-socket", &socket(node)])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A counter of `node`'s agent `/metrics` (the sum of its lines matching `filter`).
fn metric(node: &str, filter: &str) -> f64 {
    let raw = std::fs::read_to_string(format!("{}/agent-{node}.log", work())).unwrap();
    // Without the terminal colours.
    let mut log = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            log.push(c);
        }
    }
    let addr = log
        .lines()
        .find(|l| l.contains("agent ready"))
        .and_then(|l| l.split("metrics=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(|a| a.trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':'))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no metrics address in {node}'s log"));
    let py = format!(
        "import urllib.request as u\nprint(u.urlopen('http://{addr}/metrics').read().decode())"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &node_ns(node), "python3", "-c", &py])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn pod_traffic_between_nodes_is_encrypted_and_bound_to_authentication() {
    if !meshauth_test_support::require_root("encryption e2e (network namespaces, eBPF, TUN)") {
        return;
    }
    let mut d = DemoLab::up_with(LAB, &["--encrypt", "--tunnel-rotate", "2s"]);
    d.serve_http("demodeployment-1");
    d.serve_http("demodeployment-2");
    let (server, client, authed) = ("demodeployment-1", "client1-2", "client2-2");

    // 1. Pod to pod across nodes passes, and the tunnel n1 <-> n2 is up.
    until("client1-2 reaches demodeployment-1", || {
        request(&d, client, server, "warmup").is_some()
    });
    until("the tunnel n2 -> n1 is up", || {
        tunnel(&d, "n2", "n1")["state"] == "up"
    });
    assert_eq!(tunnel(&d, "n1", "n2")["state"], "up");
    assert!(tunnel(&d, "n1", "n2")["key_derived"].is_string());

    // 2. The wire holds no plaintext of pod traffic, and does hold plaintext node traffic.
    let secret = "meshauth-secret-payload-7f3a9c";
    let control = "meshauth-plaintext-control-51d2";
    let cap = Capture::start("clear");
    for _ in 0..3 {
        assert!(
            request(&d, client, server, secret).is_some(),
            "request over the tunnel"
        );
        assert!(
            request(&d, authed, server, secret).is_some(),
            "authenticated request"
        );
    }
    send_plain_udp(&d, "n2", "10.199.0.1", control);
    let pcap = cap.stop();
    assert!(
        contains(&pcap, control.as_bytes()),
        "the capture misses the plaintext control: it could not have seen a leak"
    );
    assert!(
        !contains(&pcap, secret.as_bytes()),
        "pod traffic crossed the underlay in plaintext"
    );
    let frames = wireguard_frames(&pcap);
    assert!(frames >= 12, "only {frames} WireGuard frames on the wire");

    // 3. A packet injected on the underlay with a pod's source address (client1-2, whose
    // policy allows it to reach the server) is dropped as unencrypted on n1.
    ip(&[
        "-n",
        &format!("{LAB}-ul"),
        "route",
        "replace",
        "10.200.1.0/24",
        "via",
        "10.199.0.1",
    ]);
    let client_ip = d.ip_of(client);
    let server_ip = d.ip_of(server);
    forge_syn(&format!("{LAB}-ul"), &client_ip, &server_ip, 40123);
    until("the forged SYN is dropped as unencrypted", || {
        observed("n1").iter().any(|f| {
            let f = &f["flow"];
            f["verdict"] == "DROPPED"
                && f["drop_reason_desc"] == "UNENCRYPTED_TRAFFIC"
                && f["IP"]["source"] == client_ip.as_str()
                && f["l4"]["TCP"]["source_port"] == 40123
        })
    });
    until("the datapath counts it", || {
        metric("n1", "reason=\"Unencrypted\"") >= 1.0
    });

    // 4. Node n2 sends through its tunnel with the address of n3's pod (client1-3): n1's
    // cryptokey routing accepts from n2 only n2's pods.
    let before = metric("n1", "reason=\"source_not_peer_pod\"");
    let n3_pod = d.ip_of("client1-3");
    forge_syn(&node_ns("n2"), &n3_pod, &server_ip, 40124);
    until("n1 drops n2's tunnelled packet from n3's pod", || {
        metric("n1", "reason=\"source_not_peer_pod\"") >= before + 3.0
    });
    assert!(
        !observed("n1")
            .iter()
            .any(|f| f["flow"]["IP"]["source"] == n3_pod.as_str()
                && f["flow"]["l4"]["TCP"]["source_port"] == 40124),
        "the forged packet reached n1's pods"
    );

    // 5. Pre-shared keys rotate (every 2 s) under a request loop, with no failed request.
    let rotations =
        |node: &str, peer: &str| tunnel(&d, node, peer)["key_rotations"].as_u64().unwrap();
    let (r1, r2) = (rotations("n1", "n2"), rotations("n2", "n1"));
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(7) {
        for pod in [client, authed] {
            assert_eq!(
                request(&d, pod, server, "loop"),
                Some(404),
                "request {sent} from {pod} failed during rotation"
            );
            sent += 1;
        }
    }
    let (r1b, r2b) = (rotations("n1", "n2"), rotations("n2", "n1"));
    eprintln!("{sent} requests, rotations n1->n2 {r1}..{r1b}, n2->n1 {r2}..{r2b}");
    assert!(
        r1b >= r1 + 2 && r2b >= r2 + 2,
        "keys did not rotate: {r1}..{r1b}, {r2}..{r2b}"
    );
    assert!(metric("n1", "tunnel_key_rotations_total") >= 2.0);
    assert!(metric("n1", "tunnel_handshakes_total") >= 2.0);
    assert!(metric("n1", "tunnel_bytes_total{direction=\"tx\"") > 0.0);

    // 6. The tunnel taken down, on a node with a default route to the underlay (as real hosts
    // have): its routes go, the blackholes under them take over; nothing in the clear. The
    // agent puts the interface and its routes back (every 5 s).
    ip(&[
        "-n",
        &node_ns("n2"),
        "route",
        "replace",
        "default",
        "via",
        "10.199.0.254",
    ]);
    let cap = Capture::start("down");
    ip(&["-n", &node_ns("n2"), "link", "set", "mawg0", "down"]);
    pod_udp(&d, client, &server_ip, secret, 5);
    let pcap = cap.stop();
    assert!(
        !contains(&pcap, secret.as_bytes()),
        "plaintext with the tunnel down"
    );
    until("the agent brings the tunnel back", || {
        request(&d, client, server, "back") == Some(404)
    });

    // 7. The agent killed: the persistent TUN stays and drops; nothing in the clear.
    let pids = Command::new("pgrep")
        .args(["-f", &format!("agent run --node n2 .*--lab {LAB}")])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&pids.stdout).to_string();
    assert!(!pids.trim().is_empty(), "n2's agent not found");
    let first = pids.split_whitespace().next().unwrap().to_owned();
    let agent_argv: Vec<String> = std::fs::read(format!("/proc/{first}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    std::thread::sleep(Duration::from_millis(300));
    let cap = Capture::start("killed");
    pod_udp(&d, client, &server_ip, secret, 5);
    assert_eq!(
        request(&d, client, server, secret),
        None,
        "passed without n2's agent"
    );
    assert_eq!(request(&d, "client1-1", "demodeployment-2", secret), None);
    let pcap = cap.stop();
    assert!(
        !contains(&pcap, secret.as_bytes()),
        "plaintext without n2's agent"
    );

    // 8. The agent restarted (same data dir: same WireGuard key, no pre-shared key): it gets a
    // new key from n1 and traffic flows again, both ways.
    let log = std::fs::File::create(format!("{}/agent-n2-restarted.log", work())).unwrap();
    let mut restarted = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node_ns("n2")))
        .args(&agent_argv)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    until(
        "traffic from n2 flows again after its agent restarted",
        || request(&d, client, server, "again") == Some(404),
    );
    until("and toward n2", || {
        request(&d, "client1-1", "demodeployment-2", "again").is_some()
    });
    assert_eq!(tunnel(&d, "n2", "n1")["state"], "up");
    let _ = restarted.kill();
    let _ = restarted.wait();
}
