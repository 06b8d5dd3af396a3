//! Root and the kernel's WireGuard: two `KernelDevice`s, each in a network namespace of this
//! test's own (`mkwg-a-<pid>`, `mkwg-b-<pid>`, a veth pair between them as the underlay).
//!
//! Each device is started from a thread that entered its namespace (`setns(2)` moves only that
//! thread); a netlink socket belongs to the namespace it was opened in, so the devices are
//! then driven from the test's thread. Sockets for the traffic are opened the same way. The
//! namespaces (with the links in them) are deleted at the end, also when the test fails.
//!
//! Ignored by default: this project's machines and CI have no WireGuard in the kernel
//! (`tests/kernel.rs` covers that). Run it where the kernel has it:
//! `cargo test -p meshauth-tunnel --test kernel_root -- --ignored`. Without root, or without
//! the kernel's WireGuard, it fails: it does not skip.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::time::{Duration, Instant};

use meshauth_policy::NodeId;
use meshauth_tunnel::{
    DropReason, KernelDevice, PeerConfig, PrivateKey, Psk, TunnelError, TunnelMetrics, TunnelState,
    check_kernel, kernel_available,
};

const WG: &str = "mkwg0";
const PORT: u16 = 51871;
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// A's and B's pod (tunnel) addresses.
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 232, 1, 1);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 232, 2, 1);
/// An address on B that is not in B's allowed set at A.
const SPOOF_B: Ipv4Addr = Ipv4Addr::new(10, 232, 9, 9);
const NODE_A: NodeId = NodeId::new(1);
const NODE_B: NodeId = NodeId::new(2);

fn euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made by this test; deleted on drop.
struct Netns(String);

impl Netns {
    fn create(side: &str) -> Netns {
        let name = format!("mkwg-{side}-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(format!("/run/netns/{}", self.0)).expect("the namespace file");
        let worker = std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("enter the namespace");
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn udp(&self, addr: SocketAddr) -> UdpSocket {
        let socket = self
            .run(move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("a read timeout");
        socket
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Whether `payload` arrives at `socket` within `wait`, sending it from `from` to `to` every
/// half second meanwhile (the first packets may wait for a handshake). Other datagrams (sent
/// earlier and held for a handshake) are skipped.
fn arrives(
    from: &UdpSocket,
    to: SocketAddr,
    socket: &UdpSocket,
    payload: &[u8],
    wait: Duration,
) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        // A send to a destination with no kernel peer fails (no route into a session): ignored.
        let _ = from.send_to(payload, to);
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && &buf[..n] == payload
        {
            return true;
        }
    }
    false
}

fn peer(node: NodeId, device: &KernelDevice, underlay: Ipv4Addr, pod: Ipv4Addr) -> PeerConfig {
    PeerConfig {
        node,
        public_key: device.public_key(),
        endpoint: SocketAddr::from((underlay, PORT)),
        allowed: BTreeSet::from([pod]),
    }
}

#[test]
#[ignore = "needs the kernel's wireguard module: run with --ignored where it exists"]
fn kernel_devices_carry_traffic_only_with_equal_pre_shared_keys() {
    assert!(
        euid_is_root(),
        "this test needs root: it creates network namespaces, a veth pair and WireGuard links; run it as root"
    );
    assert!(
        kernel_available(),
        "this test needs the kernel's WireGuard: {}",
        check_kernel()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    // Declared first, dropped last: after the devices' sockets, which hold the namespaces.
    let ns_a = Netns::create("a");
    let ns_b = Netns::create("b");
    ns_a.exec(&[
        "ip", "link", "add", "mkveth-a", "type", "veth", "peer", "name", "mkveth-b", "netns",
        &ns_b.0,
    ]);
    ns_a.exec(&["ip", "addr", "add", "10.231.0.1/24", "dev", "mkveth-a"]);
    ns_a.exec(&["ip", "link", "set", "mkveth-a", "up"]);
    ns_b.exec(&["ip", "addr", "add", "10.231.0.2/24", "dev", "mkveth-b"]);
    ns_b.exec(&["ip", "link", "set", "mkveth-b", "up"]);

    let (metrics_a, metrics_b) = (TunnelMetrics::new(), TunnelMetrics::new());
    let key_a = PrivateKey::generate().expect("a key");
    let (ka, ma, mb) = (key_a.clone(), metrics_a.clone(), metrics_b.clone());
    let a = ns_a
        .run(move || KernelDevice::start(WG, PORT, ka, ma))
        .expect("A's kernel device starts");
    let b = ns_b
        .run(move || KernelDevice::start(WG, PORT, PrivateKey::generate().expect("a key"), mb))
        .expect("B's kernel device starts");
    assert_eq!(a.public_key(), key_a.public());
    // Starting again (an agent restart) takes the existing link over.
    let again = ns_a
        .run({
            let key_a = key_a.clone();
            move || KernelDevice::start(WG, PORT, key_a, TunnelMetrics::new())
        })
        .expect("an existing link is taken over");
    assert_eq!(again.index(), a.index());
    drop(again);
    // A link of another kind is refused, not taken over.
    let err = ns_a
        .run(|| {
            KernelDevice::start(
                "mkveth-a",
                PORT + 1,
                PrivateKey::generate().expect("a key"),
                TunnelMetrics::new(),
            )
        })
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::NotWireguard { ref kind, .. } if kind == "veth"),
        "{err:?}"
    );

    ns_a.exec(&["ip", "addr", "add", "10.232.1.1/32", "dev", WG]);
    ns_a.exec(&["ip", "route", "add", "10.232.2.0/24", "dev", WG]);
    ns_b.exec(&["ip", "addr", "add", "10.232.2.1/32", "dev", WG]);
    ns_b.exec(&["ip", "addr", "add", "10.232.9.9/32", "dev", WG]);
    ns_b.exec(&["ip", "route", "add", "10.232.1.0/24", "dev", WG]);

    a.set_peers(vec![peer(NODE_B, &b, UNDERLAY_B, POD_B)]);
    b.set_peers(vec![peer(NODE_A, &a, UNDERLAY_A, POD_A)]);
    assert_eq!(a.status()[0].state, TunnelState::NoKey);
    assert_eq!(b.status()[0].state, TunnelState::NoKey);

    let to_b = SocketAddr::from((POD_B, 7777));
    let at_b = ns_b.udp(to_b);
    let from_a = ns_a.udp(SocketAddr::from((POD_A, 0)));

    // No pre-shared key: no kernel peer, nothing goes.
    assert!(
        !arrives(&from_a, to_b, &at_b, b"no key yet", Duration::from_secs(1)),
        "a peer without a pre-shared key carries nothing"
    );

    // Different pre-shared keys: the handshake fails, nothing arrives.
    assert!(a.set_psk(NODE_B, Psk::from_bytes([1; 32])));
    assert!(b.set_psk(NODE_A, Psk::from_bytes([2; 32])));
    assert!(
        !a.set_psk(NodeId::new(99), Psk::from_bytes([1; 32])),
        "unknown peer"
    );
    assert!(
        !arrives(
            &from_a,
            to_b,
            &at_b,
            b"different keys",
            Duration::from_secs(3)
        ),
        "different pre-shared keys must keep traffic from arriving"
    );
    let status = a.status();
    assert_eq!(status[0].state, TunnelState::Handshaking);
    assert_eq!(status[0].last_handshake, None);

    // B takes A's key (a rotation on B); the kernel's next handshake attempt succeeds.
    assert!(b.set_psk(NODE_A, Psk::from_bytes([1; 32])));
    assert_eq!(metrics_b.rotations(), 1);
    assert!(
        b.set_psk(NODE_A, Psk::from_bytes([1; 32])),
        "the same key: nothing to do"
    );
    assert_eq!(metrics_b.rotations(), 1);
    assert!(
        arrives(&from_a, to_b, &at_b, b"same keys", Duration::from_secs(20)),
        "equal pre-shared keys: the datagram arrives through the tunnel"
    );
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(sa[0].state, TunnelState::Up, "{sa:?}");
    assert_eq!(sb[0].state, TunnelState::Up, "{sb:?}");
    assert!(
        sa[0].last_handshake.is_some() && sa[0].tx_bytes > 0 && sa[0].rx_bytes > 0,
        "{sa:?}"
    );
    assert!(sb[0].rx_bytes > 0, "{sb:?}");
    assert_eq!(sb[0].rotations, 1);
    assert!(metrics_a.handshakes() >= 1 && metrics_a.bytes(meshauth_tunnel::Direction::Tx) > 0);

    // A spoofed source: B sends from an address not in its allowed set at A; A's kernel
    // drops it, counted as source_not_peer_pod.
    let to_a = SocketAddr::from((POD_A, 7778));
    let at_a = ns_a.udp(to_a);
    let spoofer = ns_b.udp(SocketAddr::from((SPOOF_B, 0)));
    assert!(
        !arrives(&spoofer, to_a, &at_a, b"spoofed", Duration::from_secs(2)),
        "a source outside the peer's allowed set never arrives"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics_a.dropped(DropReason::SourceNotPeerPod) == 0 {
        assert!(
            Instant::now() < deadline,
            "source_not_peer_pod counted at A"
        );
        let _ = a.status();
        std::thread::sleep(Duration::from_millis(100));
    }

    // Many allowed IPs (several entries, several requests): all of them are in force.
    let first_wide = u32::from(Ipv4Addr::new(10, 233, 0, 0));
    let wide: BTreeSet<Ipv4Addr> = (0..1200u32)
        .map(|i| Ipv4Addr::from(first_wide + i))
        .chain([POD_B])
        .collect();
    let last_wide = Ipv4Addr::from(first_wide + 1199);
    ns_b.exec(&["ip", "addr", "add", &format!("{last_wide}/32"), "dev", WG]);
    let mut widened = peer(NODE_B, &b, UNDERLAY_B, POD_B);
    widened.allowed = wide;
    a.set_peers(vec![widened]);
    let from_last = ns_b.udp(SocketAddr::from((last_wide, 0)));
    assert!(
        arrives(
            &from_last,
            to_a,
            &at_a,
            b"from the last allowed address",
            Duration::from_secs(5)
        ),
        "the last of 1201 allowed IPs is in force"
    );
    // Replaced, not appended: back to one address, the wide ones are refused again.
    a.set_peers(vec![peer(NODE_B, &b, UNDERLAY_B, POD_B)]);
    let before = metrics_a.dropped(DropReason::SourceNotPeerPod);
    assert!(
        !arrives(
            &from_last,
            to_a,
            &at_a,
            b"no longer allowed",
            Duration::from_secs(2)
        ),
        "allowed IPs are replaced"
    );
    let _ = a.status();
    assert!(metrics_a.dropped(DropReason::SourceNotPeerPod) > before);
    assert_eq!(
        a.status()[0].state,
        TunnelState::Up,
        "the update kept the session"
    );

    // Changed behind the agent's back: another handle takes the link over (which clears its
    // peers) and adds a peer of its own, without telling A's handle. A's next status puts its
    // peers back and removes the stranger.
    let intruder = ns_a
        .run(move || KernelDevice::start(WG, PORT, key_a, TunnelMetrics::new()))
        .expect("another handle on the link");
    let stranger = NodeId::new(7);
    intruder.set_peers(vec![PeerConfig {
        node: stranger,
        public_key: PrivateKey::generate().expect("a key").public(),
        endpoint: SocketAddr::from((UNDERLAY_B, 9)),
        allowed: BTreeSet::from([Ipv4Addr::new(10, 232, 7, 7)]),
    }]);
    assert!(intruder.set_psk(stranger, Psk::from_bytes([9; 32])));
    drop(intruder);
    assert!(
        !arrives(&from_a, to_b, &at_b, b"taken over", Duration::from_secs(1)),
        "B's peer is gone from A's kernel"
    );
    assert_eq!(a.status().len(), 1, "A's handle still has its one peer");
    assert!(
        arrives(&from_a, to_b, &at_b, b"put back", Duration::from_secs(20)),
        "A's status put B's peer back"
    );

    // A removed peer carries nothing.
    a.set_peers(vec![]);
    assert!(a.status().is_empty());
    assert!(
        !arrives(&from_a, to_b, &at_b, b"removed", Duration::from_secs(1)),
        "a removed peer carries nothing"
    );
    // Back, with a new public key for B: it starts over without a key.
    let mut rekeyed = peer(NODE_B, &b, UNDERLAY_B, POD_B);
    rekeyed.public_key = PrivateKey::generate().expect("a key").public();
    a.set_peers(vec![rekeyed]);
    assert_eq!(a.status()[0].state, TunnelState::NoKey);

    drop((a, b, at_a, at_b, from_a, spoofer));
    drop((ns_a, ns_b));
}
