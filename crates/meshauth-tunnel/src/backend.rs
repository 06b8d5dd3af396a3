//! One interface over both tunnels, so that the agent can hold either: the kernel's WireGuard
//! ([`KernelDevice`]) where the kernel has it ([`kernel_available`]), else the userspace
//! [`Device`].

use std::fmt;

use meshauth_policy::NodeId;

use crate::TunnelError;
use crate::device::{Device, PeerConfig, PeerStatus};
use crate::kernel::{KernelDevice, resolve_wireguard};
use crate::keys::{Psk, PublicKey};
use crate::netlink::NlSocket;

/// Which implementation runs the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The kernel's WireGuard ([`KernelDevice`]).
    Kernel,
    /// The userspace device on a TUN ([`Device`]).
    Userspace,
}

impl Backend {
    /// `kernel` or `userspace`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the node agent does with its tunnel, whichever runs it. Both implementations keep a
/// peer from carrying traffic until its first pre-shared key, and start a peer whose public
/// key changed over without one.
pub trait Tunnel: Send + Sync {
    /// Replaces the peer set (see [`Device::set_peers`], [`KernelDevice::set_peers`]).
    fn set_peers(&self, peers: Vec<PeerConfig>);
    /// Sets a peer's pre-shared key; false for an unknown peer (see [`Device::set_psk`],
    /// [`KernelDevice::set_psk`]).
    fn set_psk(&self, node: NodeId, psk: Psk) -> bool;
    /// Per-peer state and counters, ordered by node.
    fn status(&self) -> Vec<PeerStatus>;
    /// This node's public key.
    fn public_key(&self) -> PublicKey;
    /// Which implementation this is.
    fn backend(&self) -> Backend;
}

impl Tunnel for Device {
    fn set_peers(&self, peers: Vec<PeerConfig>) {
        Device::set_peers(self, peers);
    }

    fn set_psk(&self, node: NodeId, psk: Psk) -> bool {
        Device::set_psk(self, node, psk)
    }

    fn status(&self) -> Vec<PeerStatus> {
        Device::status(self)
    }

    fn public_key(&self) -> PublicKey {
        Device::public_key(self)
    }

    fn backend(&self) -> Backend {
        Backend::Userspace
    }
}

impl Tunnel for KernelDevice {
    fn set_peers(&self, peers: Vec<PeerConfig>) {
        KernelDevice::set_peers(self, peers);
    }

    fn set_psk(&self, node: NodeId, psk: Psk) -> bool {
        KernelDevice::set_psk(self, node, psk)
    }

    fn status(&self) -> Vec<PeerStatus> {
        KernelDevice::status(self)
    }

    fn public_key(&self) -> PublicKey {
        KernelDevice::public_key(self)
    }

    fn backend(&self) -> Backend {
        Backend::Kernel
    }
}

/// Whether the kernel has WireGuard: whether it has the `wireguard` generic netlink family
/// (asking for it makes the kernel load the module where it is installed). Needs no
/// privilege, and creates nothing. Families are global, so the answer holds in every network
/// namespace (unlike sysfs, which may show another namespace's links; the module is global
/// too). Whether the agent may configure a link is another matter: see
/// [`KernelDevice::start`].
pub fn kernel_available() -> bool {
    match check_kernel() {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "no kernel WireGuard");
            false
        }
    }
}

/// Like [`kernel_available`], with the reason when the kernel has no WireGuard
/// ([`TunnelError::KernelUnavailable`]).
pub fn check_kernel() -> Result<(), TunnelError> {
    let mut genl = NlSocket::generic().map_err(|e| TunnelError::KernelUnavailable {
        detail: format!("cannot open a generic netlink socket: {e}"),
    })?;
    resolve_wireguard(&mut genl).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_devices_are_tunnels() {
        fn takes(_: Option<&dyn Tunnel>) {}
        takes(None::<&Device>.map(|d| d as &dyn Tunnel));
        takes(None::<&KernelDevice>.map(|d| d as &dyn Tunnel));
        assert_eq!(Backend::Kernel.to_string(), "kernel");
        assert_eq!(Backend::Userspace.as_str(), "userspace");
    }
}
