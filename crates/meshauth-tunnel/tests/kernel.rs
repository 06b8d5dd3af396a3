//! The kernel path where the kernel has no WireGuard (this project's machines and CI:
//! `CONFIG_WIREGUARD` unset): `kernel_available()` says so, and `KernelDevice::start` fails
//! with `KernelUnavailable`, whose message says the userspace device is used, and creates
//! nothing. Where the kernel has WireGuard, the unavailability checks do not apply and say so
//! (`kernel_root.rs` covers that kernel).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use meshauth_policy::NodeId;
use meshauth_tunnel::{
    Backend, Device, KernelDevice, PeerConfig, PrivateKey, Psk, Tunnel, TunnelError, TunnelMetrics,
    TunnelState, check_kernel, kernel_available, memory_io,
};
use tokio::sync::watch;

/// `CONFIG_WIREGUARD` from /proc/config.gz: `Some("y")`, `Some("m")`, `Some("n")` (not set),
/// or `None` when the kernel does not publish its configuration.
fn kernel_config_wireguard() -> Option<String> {
    let out = Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| {
        if l == "# CONFIG_WIREGUARD is not set" {
            Some("n".to_owned())
        } else {
            l.strip_prefix("CONFIG_WIREGUARD=").map(str::to_owned)
        }
    })
}

#[test]
fn kernel_available_agrees_with_the_kernel_configuration() {
    let available = kernel_available();
    eprintln!(
        "kernel_available() = {available}; CONFIG_WIREGUARD = {:?}",
        kernel_config_wireguard()
    );
    match kernel_config_wireguard().as_deref() {
        Some("n") => {
            assert!(!available, "CONFIG_WIREGUARD is unset");
            let err = check_kernel().unwrap_err();
            assert!(
                matches!(err, TunnelError::KernelUnavailable { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("generic netlink family"), "{err}");
        }
        Some("y") => assert!(available, "CONFIG_WIREGUARD=y"),
        // A module may or may not be installed; no configuration to compare with.
        _ => assert_eq!(available, check_kernel().is_ok()),
    }
    // The same answer twice (nothing cached wrongly, no socket left in a bad state).
    assert_eq!(kernel_available(), available);
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["-o", "link", "show", "dev", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn start_without_kernel_wireguard_fails_clearly_and_creates_nothing() {
    if kernel_available() {
        eprintln!(
            "this kernel has WireGuard: the unavailability path does not apply (kernel_root.rs covers this kernel)"
        );
        return;
    }
    let name = format!("mkwgx{}", std::process::id() % 100_000);
    let metrics = TunnelMetrics::new();
    let err = KernelDevice::start(
        &name,
        0,
        PrivateKey::generate().expect("a key"),
        metrics.clone(),
    )
    .unwrap_err();
    assert!(
        matches!(err, TunnelError::KernelUnavailable { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    eprintln!("KernelDevice::start: {text}");
    assert!(text.contains("the kernel has no WireGuard"), "{text}");
    assert!(
        text.contains("the userspace device is used instead"),
        "{text}"
    );
    assert!(text.contains("modprobe wireguard"), "{text}");
    assert!(!link_exists(&name), "nothing is created");
    assert_eq!(metrics.rotations(), 0);
}

#[test]
fn start_rejects_a_bad_link_name_before_asking_the_kernel() {
    for name in ["", "a-name-longer-than-15", "a/b"] {
        let err = KernelDevice::start(
            name,
            0,
            PrivateKey::generate().expect("a key"),
            TunnelMetrics::new(),
        )
        .unwrap_err();
        assert!(matches!(err, TunnelError::Netlink { .. }), "{err:?}");
        assert!(err.to_string().contains("1 to 15 bytes"), "{name:?}: {err}");
    }
}

/// The agent can hold the userspace device as a `dyn Tunnel`.
#[tokio::test]
async fn the_userspace_device_is_a_tunnel() {
    let (_stop, shutdown) = watch::channel(false);
    let (io, _host) = memory_io(8);
    let device = Device::start_with_io(
        io,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        PrivateKey::generate().expect("a key"),
        TunnelMetrics::new(),
        shutdown,
    )
    .expect("the device starts");
    let tunnel: Arc<dyn Tunnel> = Arc::new(device.clone());
    assert_eq!(tunnel.backend(), Backend::Userspace);
    assert_eq!(tunnel.public_key(), device.public_key());
    let node = NodeId::new(2);
    tunnel.set_peers(vec![PeerConfig {
        node,
        public_key: PrivateKey::generate().expect("a key").public(),
        endpoint: SocketAddr::from(([127, 0, 0, 1], 9)),
        allowed: BTreeSet::from([Ipv4Addr::new(10, 200, 2, 5)]),
    }]);
    assert_eq!(tunnel.status()[0].state, TunnelState::NoKey);
    assert!(tunnel.set_psk(node, Psk::from_bytes([1; 32])));
    assert_eq!(tunnel.status()[0].state, TunnelState::Handshaking);
    assert!(!tunnel.set_psk(NodeId::new(99), Psk::from_bytes([1; 32])));
}

#[test]
fn backends_are_named() {
    assert_eq!(Backend::Kernel.to_string(), "kernel");
    assert_eq!(Backend::Userspace.to_string(), "userspace");
}
