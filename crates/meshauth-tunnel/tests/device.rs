//! Two devices on 127.0.0.1 over real UDP sockets, with in-memory packet IO, real x25519 keys
//! and pre-shared keys. Rootless.

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::checksum;
use meshauth_policy::NodeId;
use meshauth_tunnel::{
    Device, Direction, DropReason, MemoryIoHandle, PeerConfig, PrivateKey, Psk, TunnelError,
    TunnelMetrics, TunnelState, memory_io,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

const A_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 5);
const B_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 5);
const NEITHER: Ipv4Addr = Ipv4Addr::new(10, 200, 3, 7);
const NODE_A: NodeId = NodeId::new(1);
const NODE_B: NodeId = NodeId::new(2);

struct Node {
    dev: Device,
    io: Arc<MemoryIoHandle>,
    metrics: TunnelMetrics,
    shutdown: watch::Sender<bool>,
}

fn start_node() -> Node {
    let (io, handle) = memory_io(1024);
    let metrics = TunnelMetrics::new();
    let (shutdown, rx) = watch::channel(false);
    let dev = Device::start_with_io(
        io,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        PrivateKey::generate().expect("a key"),
        metrics.clone(),
        rx,
    )
    .expect("the device starts");
    Node {
        dev,
        io: Arc::new(handle),
        metrics,
        shutdown,
    }
}

fn peer_config(node: NodeId, of: &Node, allowed: &[Ipv4Addr]) -> PeerConfig {
    PeerConfig {
        node,
        public_key: of.dev.public_key(),
        endpoint: of.dev.local_addr(),
        allowed: allowed.iter().copied().collect::<BTreeSet<_>>(),
    }
}

/// A and B, each the other's peer, with the given pre-shared keys (none: not set).
fn pair(psk_a: Option<Psk>, psk_b: Option<Psk>) -> (Node, Node) {
    let a = start_node();
    let b = start_node();
    a.dev.set_peers(vec![peer_config(NODE_B, &b, &[B_POD])]);
    b.dev.set_peers(vec![peer_config(NODE_A, &a, &[A_POD])]);
    if let Some(psk) = psk_a {
        assert!(a.dev.set_psk(NODE_B, psk));
    }
    if let Some(psk) = psk_b {
        assert!(b.dev.set_psk(NODE_A, psk));
    }
    (a, b)
}

fn psk(n: u8) -> Psk {
    Psk::from_bytes([n; 32])
}

fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    common::ipv4_udp((src, 40000), (dst, 5353), payload)
}

#[test]
fn the_test_packet_is_valid_ipv4_udp() {
    let p = ipv4_udp(A_POD, B_POD, b"hello");
    assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum verifies");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&A_POD.octets());
    pseudo.extend_from_slice(&B_POD.octets());
    pseudo.extend_from_slice(&[0, 17, 0, 13]);
    assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "UDP checksum verifies");
}

async fn recv_within(io: &MemoryIoHandle, wait: Duration) -> Option<Vec<u8>> {
    timeout(wait, io.recv()).await.ok().flatten()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn status_of(dev: &Device, node: NodeId) -> meshauth_tunnel::PeerStatus {
    dev.status()
        .into_iter()
        .find(|s| s.node == node)
        .expect("peer in status")
}

const ARRIVE: Duration = Duration::from_secs(5);
const NOTHING: Duration = Duration::from_millis(700);

/// Both directions work once; returns nothing, panics otherwise.
async fn exchange(a: &Node, b: &Node, tag: &[u8]) {
    let there = ipv4_udp(A_POD, B_POD, tag);
    a.io.send(there.clone()).await.expect("A's device runs");
    assert_eq!(
        recv_within(&b.io, ARRIVE).await.as_deref(),
        Some(&there[..])
    );
    let back = ipv4_udp(B_POD, A_POD, tag);
    b.io.send(back.clone()).await.expect("B's device runs");
    assert_eq!(recv_within(&a.io, ARRIVE).await.as_deref(), Some(&back[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_cross_the_tunnel_byte_identical_both_ways() {
    let (a, b) = pair(Some(psk(1)), Some(psk(1)));
    let there = ipv4_udp(A_POD, B_POD, b"ping through the node tunnel");
    a.io.send(there.clone()).await.unwrap();
    let got = recv_within(&b.io, ARRIVE).await.expect("arrives at B");
    assert_eq!(got, there, "byte-identical");

    let back = ipv4_udp(B_POD, A_POD, b"pong");
    b.io.send(back.clone()).await.unwrap();
    let got = recv_within(&a.io, ARRIVE)
        .await
        .expect("reply arrives at A");
    assert_eq!(got, back);

    for (dev, node, metrics) in [(&a.dev, NODE_B, &a.metrics), (&b.dev, NODE_A, &b.metrics)] {
        let s = status_of(dev, node);
        assert_eq!(s.state, TunnelState::Up, "{s:?}");
        assert!(s.handshakes >= 1, "{s:?}");
        assert!(s.tx_bytes > 0 && s.rx_bytes > 0, "{s:?}");
        assert!(s.last_handshake.is_some_and(|d| d < ARRIVE), "{s:?}");
        assert_eq!(s.rotations, 0);
        assert!(metrics.handshakes() >= 1);
        assert!(metrics.bytes(Direction::Tx) > 0 && metrics.bytes(Direction::Rx) > 0);
        for reason in DropReason::ALL {
            assert_eq!(metrics.dropped(reason), 0, "{reason}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_psk_nothing_is_sent_and_drops_count_no_key() {
    // B's endpoint is a bare socket: anything A sends would land there.
    let a = start_node();
    let watcher = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a.dev.set_peers(vec![PeerConfig {
        node: NODE_B,
        public_key: PrivateKey::generate().unwrap().public(),
        endpoint: watcher.local_addr().unwrap(),
        allowed: [B_POD].into_iter().collect(),
    }]);
    for i in 0..3u8 {
        a.io.send(ipv4_udp(A_POD, B_POD, &[i])).await.unwrap();
    }
    wait_until("3 no_key drops", ARRIVE, || {
        a.metrics.dropped(DropReason::NoKey) == 3
    })
    .await;
    // Longer than two timer ticks: the timers do not handshake either.
    let mut buf = [0u8; 2048];
    assert!(
        timeout(NOTHING, watcher.recv_from(&mut buf)).await.is_err(),
        "no UDP packet (no handshake) may leave without a PSK"
    );
    let s = status_of(&a.dev, NODE_B);
    assert_eq!(s.state, TunnelState::NoKey);
    assert_eq!((s.tx_bytes, s.rx_bytes, s.handshakes), (0, 0, 0));

    // Only one side keyed: A's handshake reaches B, which has no key and drops it.
    let (a, b) = pair(Some(psk(2)), None);
    a.io.send(ipv4_udp(A_POD, B_POD, b"x")).await.unwrap();
    wait_until("B drops A's handshake as no_key", ARRIVE, || {
        b.metrics.dropped(DropReason::NoKey) >= 1
    })
    .await;
    assert_eq!(recv_within(&b.io, NOTHING).await, None);
    assert_eq!(status_of(&b.dev, NODE_A).state, TunnelState::NoKey);
    assert_ne!(status_of(&a.dev, NODE_B).state, TunnelState::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_psks_never_bring_a_session_up() {
    let (a, b) = pair(Some(psk(3)), Some(psk(4)));
    a.io.send(ipv4_udp(A_POD, B_POD, b"a")).await.unwrap();
    // B answers A's handshake, but A cannot authenticate the answer.
    wait_until("A rejects B's handshake response", ARRIVE, || {
        a.metrics.dropped(DropReason::Invalid) >= 1
    })
    .await;
    b.io.send(ipv4_udp(B_POD, A_POD, b"b")).await.unwrap();
    assert_eq!(recv_within(&b.io, NOTHING).await, None);
    assert_eq!(recv_within(&a.io, NOTHING).await, None);
    for (dev, node) in [(&a.dev, NODE_B), (&b.dev, NODE_A)] {
        let s = status_of(dev, node);
        assert_eq!(s.state, TunnelState::Handshaking, "{s:?}");
        assert_eq!(s.handshakes, 0, "{s:?}");
        assert_eq!(s.last_handshake, None, "{s:?}");
    }
    assert_eq!(a.metrics.handshakes() + b.metrics.handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_send_packets_from_addresses_that_are_not_its_pods() {
    let (a, b) = pair(Some(psk(5)), Some(psk(5)));
    exchange(&a, &b, b"warm up").await;

    // From an address of neither node, through B's tunnel to A.
    b.io.send(ipv4_udp(NEITHER, A_POD, b"spoofed"))
        .await
        .unwrap();
    wait_until("source_not_peer_pod at A", ARRIVE, || {
        a.metrics.dropped(DropReason::SourceNotPeerPod) == 1
    })
    .await;
    // From A's own pod address, also not B's.
    b.io.send(ipv4_udp(A_POD, A_POD, b"spoofed 2"))
        .await
        .unwrap();
    wait_until("second source_not_peer_pod at A", ARRIVE, || {
        a.metrics.dropped(DropReason::SourceNotPeerPod) == 2
    })
    .await;
    // A genuine packet after them still arrives, and is the first thing A's IO sees.
    let genuine = ipv4_udp(B_POD, A_POD, b"genuine");
    b.io.send(genuine.clone()).await.unwrap();
    assert_eq!(recv_within(&a.io, ARRIVE).await, Some(genuine));
    assert_eq!(status_of(&a.dev, NODE_B).state, TunnelState::Up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_rotation_loses_no_packet() {
    let (a, b) = pair(Some(psk(10)), Some(psk(10)));
    exchange(&a, &b, b"warm up").await;
    let hs_before = (
        status_of(&a.dev, NODE_B).handshakes,
        status_of(&b.dev, NODE_A).handshakes,
    );

    const PACKETS: u32 = 300; // one every 10 ms: 3 s
    const ROTATE_EVERY: u32 = 50; // 500 ms
    let collect = |io: Arc<MemoryIoHandle>| {
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            while seen.len() < PACKETS as usize {
                let Ok(Some(p)) = tokio::time::timeout_at(deadline, io.recv()).await else {
                    break;
                };
                let seq = u32::from_be_bytes(p[28..32].try_into().unwrap());
                seen.insert(seq);
            }
            seen
        })
    };
    let at_b = collect(Arc::clone(&b.io));
    let at_a = collect(Arc::clone(&a.io));

    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut rotations = 0;
    for seq in 0..PACKETS {
        tick.tick().await;
        if seq > 0 && seq % ROTATE_EVERY == 0 {
            rotations += 1;
            let fresh = psk(10 + rotations);
            assert!(a.dev.set_psk(NODE_B, fresh.clone()));
            assert!(b.dev.set_psk(NODE_A, fresh));
        }
        let mut payload = seq.to_be_bytes().to_vec();
        payload.extend_from_slice(b"rotation");
        a.io.send(ipv4_udp(A_POD, B_POD, &payload)).await.unwrap();
        b.io.send(ipv4_udp(B_POD, A_POD, &payload)).await.unwrap();
    }
    let (seen_b, seen_a) = (at_b.await.unwrap(), at_a.await.unwrap());
    let lost = |seen: &HashSet<u32>| (0..PACKETS).filter(|s| !seen.contains(s)).count();
    assert_eq!(lost(&seen_b), 0, "packets lost A to B");
    assert_eq!(lost(&seen_a), 0, "packets lost B to A");

    assert_eq!(rotations, 5);
    for (dev, node, metrics, before) in [
        (&a.dev, NODE_B, &a.metrics, hs_before.0),
        (&b.dev, NODE_A, &b.metrics, hs_before.1),
    ] {
        let s = status_of(dev, node);
        assert_eq!(s.rotations, u64::from(rotations), "{s:?}");
        assert_eq!(metrics.rotations(), u64::from(rotations));
        assert!(s.handshakes > before, "handshakes increase: {s:?}");
        assert_eq!(s.state, TunnelState::Up);
        assert_eq!(metrics.dropped(DropReason::QueueFull), 0);
        assert_eq!(metrics.dropped(DropReason::SourceNotPeerPod), 0);
    }
    // The last key is in use: a new handshake with it completed after the last rotation.
    let hs = status_of(&a.dev, NODE_B).handshakes;
    assert!(a.dev.set_psk(NODE_B, psk(99)));
    assert!(b.dev.set_psk(NODE_A, psk(99)));
    wait_until("a handshake with the newest key", ARRIVE, || {
        status_of(&a.dev, NODE_B).handshakes > hs
    })
    .await;
    exchange(&a, &b, b"after rotation").await;
    // Setting the key a peer already has is no rotation.
    assert!(a.dev.set_psk(NODE_B, psk(99)));
    assert_eq!(
        status_of(&a.dev, NODE_B).rotations,
        u64::from(rotations) + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_gets_nothing_and_drops_count_no_peer() {
    let (a, b) = pair(Some(psk(6)), Some(psk(6)));
    exchange(&a, &b, b"before removal").await;
    a.dev.set_peers(vec![]);
    assert!(a.dev.status().is_empty());
    assert!(!a.dev.set_psk(NODE_B, psk(6)), "unknown peer");
    a.io.send(ipv4_udp(A_POD, B_POD, b"after removal"))
        .await
        .unwrap();
    wait_until("no_peer at A", ARRIVE, || {
        a.metrics.dropped(DropReason::NoPeer) == 1
    })
    .await;
    assert_eq!(recv_within(&b.io, NOTHING).await, None);
    // B's packets to A now come from a session A no longer knows.
    b.io.send(ipv4_udp(B_POD, A_POD, b"to a")).await.unwrap();
    wait_until("unknown_sender at A", ARRIVE, || {
        a.metrics.dropped(DropReason::UnknownSender) >= 1
    })
    .await;
    assert_eq!(recv_within(&a.io, NOTHING).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_key_changed_starts_over_without_a_psk() {
    let (a, b) = pair(Some(psk(7)), Some(psk(7)));
    exchange(&a, &b, b"before").await;
    let mut moved = peer_config(NODE_B, &b, &[B_POD]);
    moved.public_key = PrivateKey::generate().unwrap().public();
    a.dev.set_peers(vec![moved.clone()]);
    let s = status_of(&a.dev, NODE_B);
    assert_eq!(
        (s.state, s.handshakes, s.tx_bytes, s.public_key),
        (TunnelState::NoKey, 0, 0, moved.public_key)
    );
    a.io.send(ipv4_udp(A_POD, B_POD, b"after")).await.unwrap();
    wait_until("no_key at A", ARRIVE, || {
        a.metrics.dropped(DropReason::NoKey) == 1
    })
    .await;
    assert_eq!(recv_within(&b.io, NOTHING).await, None);

    // An endpoint or allowed-set update keeps the tunnel.
    let (a, b) = pair(Some(psk(8)), Some(psk(8)));
    exchange(&a, &b, b"before").await;
    let extra = Ipv4Addr::new(10, 200, 2, 6);
    a.dev
        .set_peers(vec![peer_config(NODE_B, &b, &[B_POD, extra])]);
    assert_eq!(status_of(&a.dev, NODE_B).state, TunnelState::Up);
    let p = ipv4_udp(A_POD, extra, b"to the new pod");
    a.io.send(p.clone()).await.unwrap();
    assert_eq!(recv_within(&b.io, ARRIVE).await, Some(p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_and_unroutable_packets_are_counted() {
    let (a, _b) = pair(Some(psk(9)), Some(psk(9)));
    let mut v6 = vec![0u8; 40];
    v6[0] = 0x60;
    a.io.send(v6).await.unwrap();
    a.io.send(ipv4_udp(A_POD, NEITHER, b"nowhere"))
        .await
        .unwrap();
    let mut short = ipv4_udp(A_POD, B_POD, b"x");
    short.truncate(24);
    a.io.send(short).await.unwrap();
    wait_until("the three drops", ARRIVE, || {
        a.metrics.dropped(DropReason::Unsupported) == 1
            && a.metrics.dropped(DropReason::NoPeer) == 1
            && a.metrics.dropped(DropReason::Invalid) == 1
    })
    .await;
    // Garbage on the UDP port is invalid, not a crash.
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(b"\x04garbage", a.dev.local_addr()).await.unwrap();
    wait_until("invalid datagram", ARRIVE, || {
        a.metrics.dropped(DropReason::Invalid) == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_stops_on_shutdown() {
    let (a, b) = pair(Some(psk(11)), Some(psk(11)));
    exchange(&a, &b, b"x").await;
    a.shutdown.send(true).unwrap();
    timeout(Duration::from_secs(2), a.dev.stopped())
        .await
        .expect("tasks end");
    let _ = b.shutdown.send(true);
}

#[test]
fn load_or_create_makes_a_0600_key_and_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wg.key");
    let first = PrivateKey::load_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = PrivateKey::load_or_create(&path).unwrap();
    assert_eq!(first.public(), second.public());
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    // The file is what `wg genkey` writes: 44 base64 characters.
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim().len(), 44);
}

#[test]
fn a_garbage_key_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wg.key");
    for garbage in ["not base64 at all!", "c2hvcnQ=", ""] {
        std::fs::write(&path, garbage).unwrap();
        let err = PrivateKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, TunnelError::MalformedKey { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("delete it"), "{msg}");
        // The file is left alone.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), garbage);
    }
    let missing_dir = dir.path().join("no/such/dir/wg.key");
    let err = PrivateKey::load_or_create(&missing_dir).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn starting_outside_a_runtime_is_an_error() {
    let (io, _h) = memory_io(4);
    let (_tx, rx) = watch::channel(false);
    let err = Device::start_with_io(
        io,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        PrivateKey::generate().unwrap(),
        TunnelMetrics::new(),
        rx,
    )
    .unwrap_err();
    assert!(matches!(err, TunnelError::NoRuntime), "{err}");
}
