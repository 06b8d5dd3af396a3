//! Packet IO for the device: the TUN interface, or an in-memory channel pair (tests).

use std::future::Future;
use std::io;

use tokio::sync::{Mutex, mpsc};

use crate::TunnelError;

/// Where the device reads the IPv4 packets it sends to peers and writes the ones it receives.
///
/// Both methods take `&self`: the device reads and writes from two tasks at once.
pub trait PacketIo: Send + Sync + 'static {
    /// Waits for one packet and copies it into `buf`, returning its length. An error of kind
    /// `UnexpectedEof` means the IO is closed for good (the device's reader stops).
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Writes one packet. An error of kind `WouldBlock` means a full queue (counted as
    /// `queue_full`); others are counted as `io_error`.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

/// A persistent TUN interface that the caller created beforehand (`ip tuntap add dev NAME
/// mode tun`, i.e. `IFF_TUN | IFF_NO_PI`) and configured (MTU, addresses, routes, up). This
/// only attaches, reads and writes: it changes nothing on the interface.
pub struct TunIo {
    dev: tun::AsyncDevice,
    name: String,
}

impl TunIo {
    /// Attaches to the TUN interface `name`. Needs `CAP_NET_ADMIN` (or to be the interface's
    /// owner); must be called inside a Tokio runtime.
    pub fn attach(name: &str) -> Result<TunIo, TunnelError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).layer(tun::Layer::L3);
        // Attach only: no address, MTU or up/down (those are the caller's).
        config.platform_config(|p| {
            p.ensure_root_privileges(false);
        });
        let dev = tun::create_as_async(&config).map_err(|e| TunnelError::TunAttach {
            name: name.to_owned(),
            source: io::Error::other(e),
        })?;
        Ok(TunIo {
            dev,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl PacketIo for TunIo {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let n = self.dev.send(packet).await?;
        if n == packet.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short TUN write: {n} of {} bytes", packet.len()),
            ))
        }
    }
}

/// The device's side of an in-memory packet IO (see [`memory_io`]).
pub struct MemoryIo {
    from_host: Mutex<mpsc::Receiver<Vec<u8>>>,
    to_host: mpsc::Sender<Vec<u8>>,
}

/// The other side of an in-memory packet IO: what a kernel would do with a TUN.
pub struct MemoryIoHandle {
    to_device: mpsc::Sender<Vec<u8>>,
    from_device: Mutex<mpsc::Receiver<Vec<u8>>>,
}

/// A bounded in-memory packet IO pair, `capacity` packets each way: give the [`MemoryIo`] to
/// [`Device::start_with_io`](crate::Device::start_with_io) and keep the handle to inject and
/// observe packets.
pub fn memory_io(capacity: usize) -> (MemoryIo, MemoryIoHandle) {
    let capacity = capacity.max(1);
    let (to_device, from_host) = mpsc::channel(capacity);
    let (to_host, from_device) = mpsc::channel(capacity);
    (
        MemoryIo {
            from_host: Mutex::new(from_host),
            to_host,
        },
        MemoryIoHandle {
            to_device,
            from_device: Mutex::new(from_device),
        },
    )
}

impl PacketIo for MemoryIo {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let packet = self.from_host.lock().await.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the memory IO handle is gone")
        })?;
        let dst = buf.get_mut(..packet.len()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "packet larger than the buffer")
        })?;
        dst.copy_from_slice(&packet);
        Ok(packet.len())
    }

    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.to_host.try_send(packet.to_vec()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                io::Error::new(io::ErrorKind::WouldBlock, "memory IO queue full")
            }
            mpsc::error::TrySendError::Closed(_) => {
                io::Error::new(io::ErrorKind::BrokenPipe, "the memory IO handle is gone")
            }
        })
    }
}

impl MemoryIoHandle {
    /// Hands one packet to the device, as if the kernel routed it into the TUN. Waits while the
    /// queue is full; fails when the device is gone.
    pub async fn send(&self, packet: Vec<u8>) -> Result<(), TunnelError> {
        self.to_device
            .send(packet)
            .await
            .map_err(|_| TunnelError::Stopped)
    }

    /// The next packet the device wrote, or `None` when the device is gone.
    pub async fn recv(&self) -> Option<Vec<u8>> {
        self.from_device.lock().await.recv().await
    }
}
