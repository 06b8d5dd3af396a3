//! Root only: the real TUN path. The test makes a network namespace of its own (`mtun-<pid>`),
//! creates a persistent TUN in it as the agent would (`ip tuntap add ... mode tun`), and runs
//! both devices inside it; nothing in the root namespace is touched, and the namespace (with
//! the TUN) is deleted at the end, also when the test fails. Without root it fails: it does
//! not skip.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use meshauth_policy::NodeId;
use meshauth_tunnel::{
    Device, DeviceConfig, DropReason, PeerConfig, PrivateKey, Psk, TunnelMetrics, TunnelState,
    memory_io,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::timeout;

const TUN: &str = "mtun0";
const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const B_POD: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 5);
const NEITHER: Ipv4Addr = Ipv4Addr::new(10, 200, 3, 7);
const WAIT: Duration = Duration::from_secs(5);

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

/// A network namespace made by this test; deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        let name = format!("mtun-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        run(&full);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
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

#[test]
fn the_device_carries_packets_between_a_real_tun_and_a_peer() {
    assert!(
        euid_is_root(),
        "this test needs root: it creates a network namespace and a TUN interface in it; run it as root"
    );
    let ns = Netns::create();
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns.exec(&["ip", "tuntap", "add", "dev", TUN, "mode", "tun"]);
    ns.exec(&["ip", "link", "set", TUN, "mtu", "1420", "up"]);
    ns.exec(&["ip", "addr", "add", "10.200.1.1/32", "dev", TUN]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        "10.200.2.0/24",
        "dev",
        TUN,
        "src",
        "10.200.1.1",
    ]);

    let ns_file = File::open(format!("/run/netns/{}", ns.0)).expect("the namespace file");
    let worker = std::thread::spawn(move || {
        // setns(2) moves this thread only: everything below lives in the namespace.
        rustix::thread::move_into_link_name_space(
            ns_file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("enter the namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async { timeout(Duration::from_secs(30), in_namespace()).await })
            .expect("the test finishes in time");
    });
    let result = worker.join();
    drop(ns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn in_namespace() {
    let (_stop, shutdown) = watch::channel(false);
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (key_a, key_b) = (
        PrivateKey::generate().expect("a key"),
        PrivateKey::generate().expect("a key"),
    );
    let metrics_a = TunnelMetrics::new();
    let a = Device::start(
        DeviceConfig {
            tun_name: TUN.into(),
            listen: loopback,
            private_key: key_a,
        },
        metrics_a.clone(),
        shutdown.clone(),
    )
    .expect("attach to the persistent TUN");
    let (io_b, host_b) = memory_io(64);
    let b = Device::start_with_io(io_b, loopback, key_b, TunnelMetrics::new(), shutdown)
        .expect("B starts");
    let host_b = Arc::new(host_b);
    let (na, nb) = (NodeId::new(1), NodeId::new(2));
    a.set_peers(vec![PeerConfig {
        node: nb,
        public_key: b.public_key(),
        endpoint: b.local_addr(),
        allowed: BTreeSet::from([B_POD]),
    }]);
    b.set_peers(vec![PeerConfig {
        node: na,
        public_key: a.public_key(),
        endpoint: a.local_addr(),
        allowed: BTreeSet::from([A_ADDR]),
    }]);
    assert!(a.set_psk(nb, Psk::from_bytes([42; 32])));
    assert!(b.set_psk(na, Psk::from_bytes([42; 32])));

    // Kernel -> TUN -> A -> WireGuard -> B.
    let app = UdpSocket::bind((A_ADDR, 0))
        .await
        .expect("a socket on the TUN address");
    let app_port = app.local_addr().expect("its address").port();
    app.send_to(b"hello over the tun", (B_POD, 7777))
        .await
        .expect("the kernel routes it into the TUN");
    let expected = common::ipv4_udp((A_ADDR, app_port), (B_POD, 7777), b"hello over the tun");
    let got = timeout(WAIT, async {
        loop {
            let p = host_b.recv().await.expect("B runs");
            // Only the UDP datagram matters (the kernel may also send other packets).
            if p.get(9) == Some(&17) && p.ends_with(b"hello over the tun") {
                return p;
            }
        }
    })
    .await
    .expect("the kernel's packet reaches B");
    // The kernel picks the IP id and checksums: compare what it must keep.
    assert_eq!(got.len(), expected.len());
    assert_eq!(&got[12..20], &expected[12..20], "addresses");
    assert_eq!(&got[20..26], &expected[20..26], "ports and length");
    assert_eq!(&got[28..], &expected[28..], "payload");

    // B -> WireGuard -> A -> TUN -> kernel -> the socket.
    let reply = common::ipv4_udp((B_POD, 7777), (A_ADDR, app_port), b"hello back");
    host_b.send(reply).await.expect("B runs");
    let mut buf = [0u8; 1500];
    let (n, from) = timeout(WAIT, app.recv_from(&mut buf))
        .await
        .expect("the reply reaches the socket through the TUN")
        .expect("recv");
    assert_eq!(&buf[..n], b"hello back");
    assert_eq!(from, SocketAddr::from((B_POD, 7777)));
    assert_eq!(a.status()[0].state, TunnelState::Up);

    // A spoofed source never reaches the kernel.
    let spoofed = common::ipv4_udp((NEITHER, 7777), (A_ADDR, app_port), b"spoofed");
    host_b.send(spoofed).await.expect("B runs");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics_a.dropped(DropReason::SourceNotPeerPod) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "source_not_peer_pod at A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        timeout(Duration::from_millis(300), app.recv_from(&mut buf))
            .await
            .is_err()
    );
}
