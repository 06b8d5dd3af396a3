//! Node-to-node WireGuard for meshauth: one device per node, carrying pod packets to and from
//! other nodes, one WireGuard peer per other node. The node agent decides the peers (public
//! key, UDP endpoint, allowed pod addresses) and each peer's pre-shared key; this crate runs
//! the tunnels and enforces cryptokey routing both ways. Where the kernel has WireGuard
//! ([`kernel_available`]), the tunnel is the kernel's ([`KernelDevice`], configured over
//! netlink); where it has not, the userspace [`Device`] on a TUN. Both are a [`Tunnel`].
//!
//! Modules:
//! - [`keys`]: the node's private key on disk, public keys in `wg`'s base64, pre-shared keys.
//! - [`device`]: the userspace device (peers, pre-shared keys, status) on a TUN or any
//!   [`PacketIo`].
//! - [`kernel`]: the kernel's WireGuard link, configured over netlink.
//! - [`backend`]: the [`Tunnel`] interface over both, and [`kernel_available`].
//! - [`io`]: packet IO: the persistent TUN interface, and an in-memory pair for tests.
//! - [`metrics`]: the Prometheus counters (bytes, drops by reason, handshakes, rotations).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod io;
pub mod kernel;
pub mod keys;
pub mod metrics;
mod netlink;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use backend::{Backend, Tunnel, check_kernel, kernel_available};
pub use device::{Device, DeviceConfig, PeerConfig, PeerStatus, TunnelState};
pub use io::{MemoryIo, MemoryIoHandle, PacketIo, TunIo, memory_io};
pub use kernel::KernelDevice;
pub use keys::{PrivateKey, Psk, PublicKey};
pub use metrics::{Direction, DropReason, TunnelMetrics};

/// What can go wrong setting up the tunnel. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The key file could not be read or written.
    #[error(
        "cannot read or write the node WireGuard key file {}: {source}; check that its directory exists and is writable by the agent",
        path.display()
    )]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds something that is not a key.
    #[error(
        "the node WireGuard key file {} is not a private key ({reason}); delete it to make a new key (the node then publishes a new public key to its peers)",
        path.display()
    )]
    MalformedKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A public key did not parse.
    #[error(
        "{input:?} is not a WireGuard public key; check that it is 32 bytes in standard base64, as `wg` shows keys"
    )]
    InvalidPublicKey {
        /// The text (at most 64 characters of it).
        input: String,
    },
    /// The operating system's random number generator failed.
    #[error(
        "the system random number generator failed; check that getrandom(2) works in this sandbox"
    )]
    Random,
    /// Attaching to the TUN interface failed.
    #[error(
        "cannot attach to the TUN interface {name}: {source}; check that it exists as a persistent TUN (ip tuntap add dev {name} mode tun), that no other process holds it, and that the agent has CAP_NET_ADMIN"
    )]
    TunAttach {
        /// The interface name.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Binding the UDP socket failed.
    #[error(
        "cannot bind the WireGuard UDP socket on {addr}: {source}; check that the address is local and no other process uses the port"
    )]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Started outside a Tokio runtime.
    #[error(
        "the tunnel device must be started inside a Tokio runtime; check that the caller runs on one"
    )]
    NoRuntime,
    /// The device is gone.
    #[error("the tunnel device has stopped; check the shutdown signal and the device's logs")]
    Stopped,
    /// The kernel has no WireGuard (no `wireguard` generic netlink family or link kind).
    #[error(
        "the kernel has no WireGuard ({detail}): the userspace device is used instead; for the kernel's, load the module (modprobe wireguard) or run a kernel built with CONFIG_WIREGUARD"
    )]
    KernelUnavailable {
        /// What the kernel answered.
        detail: String,
    },
    /// The kernel tunnel's name belongs to a link that is not WireGuard.
    #[error(
        "the link {name} exists and is not a WireGuard link (kind {kind}); delete it (ip link del {name}) or give the kernel tunnel another name"
    )]
    NotWireguard {
        /// The link name.
        name: String,
        /// Its kind, as the kernel names it (`tun`, `veth`; `none` for a link without one, such as
        /// the loopback).
        kind: String,
    },
    /// The kernel refused a netlink request for its WireGuard link.
    #[error("cannot {what} (kernel WireGuard link {name}): {source}; {check}")]
    Netlink {
        /// The link name.
        name: String,
        /// What was asked.
        what: String,
        /// What to check.
        check: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
}
