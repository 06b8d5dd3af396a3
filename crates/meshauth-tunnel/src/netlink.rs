//! A blocking netlink request/response transport (on `netlink-sys`'s socket) and the few
//! rtnetlink and generic-netlink requests the kernel device needs.
//!
//! Blocking on purpose: the device's methods are synchronous (the agent calls them from sync
//! hooks and from async tasks alike), and the kernel answers rtnetlink and generic-netlink
//! requests while it handles `sendmsg`, so a request costs a system call or two, not a wait.
//! A receive timeout bounds the rare case where no answer comes.
//!
//! A netlink socket belongs to the network namespace of the thread that opened it, for its
//! whole life: a device opened in a namespace stays configured in that namespace whichever
//! thread calls it later.

use std::fmt::Debug;
use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, Stats64,
};
use netlink_packet_wireguard::WireguardMessage;
use netlink_sys::{Socket, SocketAddr, protocols};

/// How long one answer may take before the request fails.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// The generic-netlink family of the kernel's WireGuard.
pub(crate) const WG_FAMILY: &str = "wireguard";

/// One netlink socket, with its own sequence numbers.
pub(crate) struct NlSocket {
    socket: Socket,
    seq: u32,
}

impl NlSocket {
    /// Opens a socket of `protocol` (`NETLINK_ROUTE`, `NETLINK_GENERIC`) in the calling
    /// thread's network namespace.
    pub(crate) fn open(protocol: isize) -> io::Result<NlSocket> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Extended acks only add a message to errors; an old kernel without them still works.
        let _ = socket.set_ext_ack(true);
        rustix::net::sockopt::set_socket_timeout(
            &socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )?;
        Ok(NlSocket { socket, seq: 0 })
    }

    /// A route (rtnetlink) socket.
    pub(crate) fn route() -> io::Result<NlSocket> {
        NlSocket::open(protocols::NETLINK_ROUTE)
    }

    /// A generic-netlink socket.
    pub(crate) fn generic() -> io::Result<NlSocket> {
        NlSocket::open(protocols::NETLINK_GENERIC)
    }

    /// Sends `payload` with `flags` (besides `NLM_F_REQUEST`, and `NLM_F_ACK` unless it is a
    /// dump) and collects the answers until the ack, or the end of the dump. A kernel error is
    /// the `io::Error` of its errno; a dump that a concurrent change made inconsistent
    /// (`NLM_F_DUMP_INTR`) is `ErrorKind::Interrupted`, to be asked again.
    pub(crate) fn request<T>(&mut self, payload: T, flags: u16) -> io::Result<Vec<T>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        message.finalize();
        let mut buf = vec![0u8; message.buffer_len()];
        message.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from the kernel within {RECV_TIMEOUT:?}"),
                    )
                } else {
                    e
                }
            })?;
            let mut offset = 0;
            while offset < datagram.len() {
                let bytes = &datagram[offset..];
                let len = NetlinkBuffer::new_checked(bytes).map_err(invalid)?.length() as usize;
                if len == 0 || len > bytes.len() {
                    return Err(invalid("a netlink message length past the datagram"));
                }
                offset += len.div_ceil(4) * 4;
                let message = NetlinkMessage::<T>::deserialize(&bytes[..len]).map_err(invalid)?;
                if message.header.sequence_number != seq {
                    // An answer to an earlier request that timed out.
                    continue;
                }
                interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) if interrupted => {
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "the dump was interrupted by a concurrent change",
                        ));
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Overrun(_) => {
                        return Err(invalid("the netlink answer overran the socket buffer"));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Resolves the id of the generic-netlink family `name`. The kernel loads the module that
/// provides it, where it can (`net-pf-16-proto-16-family-<name>`); a family it does not have
/// is `ENOENT`. Families are global: the answer is the same in every network namespace.
pub(crate) fn resolve_family(socket: &mut NlSocket, name: &str) -> io::Result<u16> {
    let request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    let answers = socket.request(request, 0)?;
    answers
        .iter()
        .flat_map(|m| m.payload.nlas.iter())
        .find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| invalid("the family's answer carries no id"))
}

/// Sends one WireGuard generic-netlink message and collects the answers.
pub(crate) fn wg_request(
    socket: &mut NlSocket,
    family: u16,
    message: WireguardMessage,
    flags: u16,
) -> io::Result<Vec<WireguardMessage>> {
    let mut request = GenlMessage::from_payload(message);
    request.set_resolved_family_id(family);
    let answers = socket.request(request, flags)?;
    Ok(answers.into_iter().map(|m| m.payload).collect())
}

/// What the kernel says about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkFacts {
    /// Its index.
    pub(crate) index: u32,
    /// Its kind (`IFLA_INFO_KIND`), if it has one.
    pub(crate) kind: Option<InfoKind>,
    /// Its 64-bit counters.
    pub(crate) stats: Option<Stats64>,
    /// Whether it is administratively up.
    pub(crate) up: bool,
}

fn link_facts(message: &LinkMessage) -> LinkFacts {
    let mut facts = LinkFacts {
        index: message.header.index,
        kind: None,
        stats: None,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                facts.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(kind) => Some(kind.clone()),
                    _ => None,
                });
            }
            LinkAttribute::Stats64(stats) => facts.stats = Some(*stats),
            _ => {}
        }
    }
    facts
}

/// The link named `name` (`ENODEV` when there is none), or with index `index` when `name` is
/// empty.
pub(crate) fn get_link(socket: &mut NlSocket, name: &str, index: u32) -> io::Result<LinkFacts> {
    let mut message = LinkMessage::default();
    if name.is_empty() {
        message.header.index = index;
    } else {
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
    }
    let answers = socket.request(RouteNetlinkMessage::GetLink(message), 0)?;
    answers
        .iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => Some(link_facts(link)),
            _ => None,
        })
        .ok_or_else(|| invalid("the link's answer carries no link"))
}

/// Creates the link `name` of kind `wireguard` (`EEXIST` when a link has that name; the kernel
/// answers `EOPNOTSUPP` when it has no such kind).
pub(crate) fn create_wireguard_link(socket: &mut NlSocket, name: &str) -> io::Result<()> {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    message
        .attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Wireguard,
        )]));
    socket
        .request(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
}

/// Deletes the link with index `index`.
pub(crate) fn delete_link(socket: &mut NlSocket, index: u32) -> io::Result<()> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    socket
        .request(RouteNetlinkMessage::DelLink(message), 0)
        .map(drop)
}

/// Sets the link with index `index` administratively up.
pub(crate) fn set_link_up(socket: &mut NlSocket, index: u32) -> io::Result<()> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    socket
        .request(RouteNetlinkMessage::SetLink(message), 0)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The transport against the running kernel, with requests any kernel answers the same
    /// way (no privilege needed, nothing changed).
    #[test]
    fn talks_to_this_kernel() {
        let mut genl = NlSocket::generic().expect("a generic netlink socket");
        // The controller's own family has the fixed id GENL_ID_CTRL.
        assert_eq!(resolve_family(&mut genl, "nlctrl").expect("nlctrl"), 0x10);
        let err = resolve_family(&mut genl, "mkwg-nosuch").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(2), "{err}");
        // Still usable after an error (sequence numbers, no stale answers).
        assert_eq!(resolve_family(&mut genl, "nlctrl").expect("nlctrl"), 0x10);

        let mut route = NlSocket::route().expect("a route netlink socket");
        let lo = get_link(&mut route, "lo", 0).expect("the loopback link");
        assert_eq!(lo.kind, None, "loopback has no link kind");
        assert!(lo.stats.is_some(), "the kernel sends 64-bit counters");
        assert_eq!(
            get_link(&mut route, "", lo.index).expect("by index").index,
            lo.index
        );
        let err = get_link(&mut route, "mkwg-none0", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(19), "no such link: ENODEV, {err}");
    }

    /// Creating a `wireguard` link: where the kernel has no WireGuard it answers EOPNOTSUPP
    /// and creates nothing; where it has, the throwaway link is deleted at once. Needs root
    /// (CAP_NET_ADMIN); without it only EPERM can be checked.
    #[test]
    fn creating_a_wireguard_link_matches_the_family() {
        let mut genl = NlSocket::generic().expect("a generic netlink socket");
        let has_family = resolve_family(&mut genl, WG_FAMILY).is_ok();
        let mut route = NlSocket::route().expect("a route netlink socket");
        let name = format!("mkwgp{}", std::process::id() % 100_000);
        let created = create_wireguard_link(&mut route, &name);
        if !euid_is_root() {
            assert_eq!(created.unwrap_err().raw_os_error(), Some(1), "EPERM");
            return;
        }
        if has_family {
            created.expect("the kernel has WireGuard: the link is created");
            let link = get_link(&mut route, &name, 0).expect("the new link");
            assert_eq!(link.kind, Some(InfoKind::Wireguard));
            delete_link(&mut route, link.index).expect("deleted");
        } else {
            let err = created.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(95), "EOPNOTSUPP: {err}");
            assert_eq!(
                get_link(&mut route, &name, 0).unwrap_err().raw_os_error(),
                Some(19),
                "nothing created"
            );
        }
    }

    #[test]
    fn link_facts_read_kind_counters_and_flags() {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.flags = LinkFlags::Up;
        let mut stats = Stats64::default();
        stats.rx_frame_errors = 3;
        message.attributes = vec![
            LinkAttribute::IfName("mkwg0".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Wireguard)]),
            LinkAttribute::Stats64(stats),
        ];
        let facts = link_facts(&message);
        assert_eq!(facts.index, 7);
        assert_eq!(facts.kind, Some(InfoKind::Wireguard));
        assert_eq!(facts.stats.map(|s| s.rx_frame_errors), Some(3));
        assert!(facts.up);
        assert_eq!(link_facts(&LinkMessage::default()).kind, None);
    }
}
