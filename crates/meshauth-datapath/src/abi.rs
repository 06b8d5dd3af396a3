//! `#[repr(C)]` mirrors of `bpf/abi.h`: the only place the wire layouts live on the Rust side.
//! `tests::layouts_match_c` compares every size and offset with the C compiler's.
#![allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait for plain-old-data map types"
)]

/// `MA_ABI_VERSION`: part of the pin path, so maps of another layout are never reused.
pub(crate) const ABI_VERSION: u32 = 5;

/// The numeric constants of `bpf/abi.h`; `tests::constants_match_c` checks each against C.
#[allow(
    dead_code,
    reason = "mirrors every constant of abi.h, used or not, so that the check covers them all"
)]
pub(crate) mod c {
    pub(crate) const DIR_EGRESS: u8 = 0;
    pub(crate) const DIR_INGRESS: u8 = 1;
    pub(crate) const VERDICT_ALLOW: u8 = 1;
    pub(crate) const VERDICT_DENY: u8 = 2;
    pub(crate) const AUTH_NONE: u8 = 0;
    pub(crate) const AUTH_REQUIRED: u8 = 1;
    pub(crate) const AUTH_ALWAYS_FAIL: u8 = 2;
    pub(crate) const AUTH_PER_CONNECTION: u8 = 3;
    pub(crate) const EV_FORWARDED: u8 = 0;
    pub(crate) const EV_DROPPED: u8 = 1;
    pub(crate) const EV_HELD: u8 = 2;
    pub(crate) const REASON_NONE: u8 = 0;
    pub(crate) const REASON_POLICY_DENIED: u8 = 1;
    pub(crate) const REASON_AUTH_REQUIRED: u8 = 2;
    pub(crate) const REASON_NO_IDENTITY: u8 = 3;
    pub(crate) const REASON_SPOOFED: u8 = 4;
    pub(crate) const REASON_UNSUPPORTED: u8 = 5;
    pub(crate) const REASON_UNENCRYPTED: u8 = 6;
    pub(crate) const REASON_COUNT: u8 = 7;
    pub(crate) const EVF_ESTABLISHED: u8 = 1;
    pub(crate) const STAT_FORWARDED: u32 = REASON_COUNT as u32;
    pub(crate) const STAT_EVENTS_LOST: u32 = REASON_COUNT as u32 + 1;
    pub(crate) const STAT_PER_DIR: u32 = REASON_COUNT as u32 + 2;
    pub(crate) const STAT_COUNT: u32 = 2 * STAT_PER_DIR;
    pub(crate) const MAX_POLICY: u32 = 262_144;
    pub(crate) const MAX_AUTH: u32 = 131_072;
    pub(crate) const MAX_IPCACHE: u32 = 65_536;
    pub(crate) const MAX_ENDPOINTS: u32 = 4096;
    pub(crate) const MAX_CONNTRACK: u32 = 262_144;
    pub(crate) const CT_TIMEOUT_TCP: u32 = 21_600;
    pub(crate) const CT_TIMEOUT_OTHER: u32 = 60;
    pub(crate) const AUTH_MISS_DROP: u32 = 0;
    pub(crate) const AUTH_MISS_MARK: u32 = 1;
    pub(crate) const CT_HELD: u32 = 1;
    pub(crate) const CT_FIN_ORIG: u32 = 2;
    pub(crate) const CT_FIN_REPLY: u32 = 4;
    pub(crate) const PEER_ENDPOINT_BASE: u32 = 0x8000_0000;
    pub(crate) const FIRST_POD_IDENTITY: u32 = meshauth_policy::IdentityId::FIRST_ALLOCATED;
    pub(crate) const FIRST_LOCAL_IDENTITY: u32 = meshauth_policy::IdentityId::FIRST_LOCAL;
}

/// `struct ma_endpoint`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) endpoint_id: u32,
    pub(crate) identity: u32,
    pub(crate) ipv4: [u8; 4],
    pub(crate) flags: u32,
    pub(crate) policy_gen: u32,
    pub(crate) pad: u32,
}

/// Data part of `struct ma_ipcache_key` (aya adds the prefix length).
pub(crate) type IpcacheAddr = [u8; 16];

/// `struct ma_ipcache_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IpcacheValue {
    pub(crate) identity: u32,
    pub(crate) node_id: u32,
}

/// Data part of `struct ma_policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct PolicyKey {
    pub(crate) endpoint_id: u32,
    pub(crate) remote_identity: u32,
    pub(crate) direction: u8,
    pub(crate) protocol: u8,
    /// Network byte order.
    pub(crate) dport: [u8; 2],
}

/// `struct ma_policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PolicyValue {
    pub(crate) verdict: u8,
    pub(crate) auth_type: u8,
    pub(crate) pad: u16,
}

/// `struct ma_auth_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct AuthKey {
    pub(crate) local_identity: u32,
    pub(crate) remote_identity: u32,
    pub(crate) remote_node: u32,
    pub(crate) auth_type: u8,
    pub(crate) protocol: u8,
    pub(crate) pad: u16,
    pub(crate) saddr: [u8; 4],
    pub(crate) daddr: [u8; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// `struct ma_auth_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AuthValue {
    pub(crate) expires_ns: u64,
}

/// `struct ma_ct_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct CtKey {
    pub(crate) saddr: [u8; 4],
    pub(crate) daddr: [u8; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) protocol: u8,
    pub(crate) direction: u8,
    pub(crate) icmp_type: u8,
    pub(crate) pad: u8,
}

/// `struct ma_ct_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CtValue {
    pub(crate) created_ns: u64,
    pub(crate) last_seen_ns: u64,
    pub(crate) auth_key: AuthKey,
    pub(crate) flags: u32,
    pub(crate) endpoint_id: u32,
    pub(crate) policy_gen: u32,
    pub(crate) ipcache_gen: u32,
}

/// `struct ma_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) auth_miss_action: u32,
    pub(crate) hold_mark: u32,
    pub(crate) event_interval_ns: u64,
    pub(crate) ipcache_gen: u32,
    pub(crate) ct_timeout_tcp_s: u32,
    pub(crate) ct_timeout_other_s: u32,
    pub(crate) tunnel_ifindex: u32,
    pub(crate) local_node: u32,
    pub(crate) pad: u32,
}

/// `struct ma_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) ts_ns: u64,
    pub(crate) saddr: [u8; 4],
    pub(crate) daddr: [u8; 4],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) protocol: u8,
    pub(crate) tcp_flags: u8,
    pub(crate) verdict: u8,
    pub(crate) reason: u8,
    pub(crate) src_identity: u32,
    pub(crate) dst_identity: u32,
    pub(crate) ifindex: u32,
    pub(crate) direction: u8,
    pub(crate) flags: u8,
    pub(crate) icmp_type: u8,
    pub(crate) pad: u8,
    pub(crate) auth_key: AuthKey,
}

// SAFETY: all of these are #[repr(C)] structs of integers and byte arrays with explicit
// padding fields, so every bit pattern is valid and there is no uninitialised padding.
unsafe impl aya::Pod for Endpoint {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for AuthKey {}
unsafe impl aya::Pod for AuthValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for Config {}

impl Event {
    /// Reads a ring buffer record; `None` when it is too short.
    pub(crate) fn from_bytes(b: &[u8]) -> Option<Event> {
        if b.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: the length is checked above, Event is plain old data (any bit pattern is
        // valid), and read_unaligned makes no alignment assumption about the record.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Event>()) })
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    include!(concat!(env!("OUT_DIR"), "/abi_layout.rs"));

    fn rust_layout(s: &str, f: &str) -> usize {
        use super::*;
        // The Rust mirrors of the LPM trie keys omit the prefix length that aya adds in front.
        match (s, f) {
            ("ma_endpoint", "(size)") => size_of::<Endpoint>(),
            ("ma_endpoint", "endpoint_id") => offset_of!(Endpoint, endpoint_id),
            ("ma_endpoint", "identity") => offset_of!(Endpoint, identity),
            ("ma_endpoint", "ipv4") => offset_of!(Endpoint, ipv4),
            ("ma_endpoint", "flags") => offset_of!(Endpoint, flags),
            ("ma_endpoint", "policy_gen") => offset_of!(Endpoint, policy_gen),
            ("ma_ipcache_key", "(size)") => 4 + size_of::<IpcacheAddr>(),
            ("ma_ipcache_key", "prefixlen") => 0,
            ("ma_ipcache_key", "addr") => 4,
            ("ma_ipcache_value", "(size)") => size_of::<IpcacheValue>(),
            ("ma_ipcache_value", "identity") => offset_of!(IpcacheValue, identity),
            ("ma_ipcache_value", "node_id") => offset_of!(IpcacheValue, node_id),
            ("ma_policy_key", "(size)") => 4 + size_of::<PolicyKey>(),
            ("ma_policy_key", "prefixlen") => 0,
            ("ma_policy_key", "endpoint_id") => 4 + offset_of!(PolicyKey, endpoint_id),
            ("ma_policy_key", "remote_identity") => 4 + offset_of!(PolicyKey, remote_identity),
            ("ma_policy_key", "direction") => 4 + offset_of!(PolicyKey, direction),
            ("ma_policy_key", "protocol") => 4 + offset_of!(PolicyKey, protocol),
            ("ma_policy_key", "dport") => 4 + offset_of!(PolicyKey, dport),
            ("ma_policy_value", "(size)") => size_of::<PolicyValue>(),
            ("ma_policy_value", "verdict") => offset_of!(PolicyValue, verdict),
            ("ma_policy_value", "auth_type") => offset_of!(PolicyValue, auth_type),
            ("ma_auth_key", "(size)") => size_of::<AuthKey>(),
            ("ma_auth_key", "local_identity") => offset_of!(AuthKey, local_identity),
            ("ma_auth_key", "remote_identity") => offset_of!(AuthKey, remote_identity),
            ("ma_auth_key", "remote_node") => offset_of!(AuthKey, remote_node),
            ("ma_auth_key", "auth_type") => offset_of!(AuthKey, auth_type),
            ("ma_auth_key", "protocol") => offset_of!(AuthKey, protocol),
            ("ma_auth_key", "saddr") => offset_of!(AuthKey, saddr),
            ("ma_auth_key", "daddr") => offset_of!(AuthKey, daddr),
            ("ma_auth_key", "sport") => offset_of!(AuthKey, sport),
            ("ma_auth_key", "dport") => offset_of!(AuthKey, dport),
            ("ma_auth_value", "(size)") => size_of::<AuthValue>(),
            ("ma_auth_value", "expires_ns") => offset_of!(AuthValue, expires_ns),
            ("ma_ct_key", "(size)") => size_of::<CtKey>(),
            ("ma_ct_key", "saddr") => offset_of!(CtKey, saddr),
            ("ma_ct_key", "daddr") => offset_of!(CtKey, daddr),
            ("ma_ct_key", "sport") => offset_of!(CtKey, sport),
            ("ma_ct_key", "dport") => offset_of!(CtKey, dport),
            ("ma_ct_key", "protocol") => offset_of!(CtKey, protocol),
            ("ma_ct_key", "direction") => offset_of!(CtKey, direction),
            ("ma_ct_key", "icmp_type") => offset_of!(CtKey, icmp_type),
            ("ma_ct_value", "(size)") => size_of::<CtValue>(),
            ("ma_ct_value", "created_ns") => offset_of!(CtValue, created_ns),
            ("ma_ct_value", "last_seen_ns") => offset_of!(CtValue, last_seen_ns),
            ("ma_ct_value", "auth_key") => offset_of!(CtValue, auth_key),
            ("ma_ct_value", "flags") => offset_of!(CtValue, flags),
            ("ma_ct_value", "endpoint_id") => offset_of!(CtValue, endpoint_id),
            ("ma_ct_value", "policy_gen") => offset_of!(CtValue, policy_gen),
            ("ma_ct_value", "ipcache_gen") => offset_of!(CtValue, ipcache_gen),
            ("ma_config", "(size)") => size_of::<Config>(),
            ("ma_config", "auth_miss_action") => offset_of!(Config, auth_miss_action),
            ("ma_config", "hold_mark") => offset_of!(Config, hold_mark),
            ("ma_config", "event_interval_ns") => offset_of!(Config, event_interval_ns),
            ("ma_config", "ipcache_gen") => offset_of!(Config, ipcache_gen),
            ("ma_config", "ct_timeout_tcp_s") => offset_of!(Config, ct_timeout_tcp_s),
            ("ma_config", "ct_timeout_other_s") => offset_of!(Config, ct_timeout_other_s),
            ("ma_config", "tunnel_ifindex") => offset_of!(Config, tunnel_ifindex),
            ("ma_config", "local_node") => offset_of!(Config, local_node),
            ("ma_event", "(size)") => size_of::<Event>(),
            ("ma_event", "ts_ns") => offset_of!(Event, ts_ns),
            ("ma_event", "saddr") => offset_of!(Event, saddr),
            ("ma_event", "daddr") => offset_of!(Event, daddr),
            ("ma_event", "sport") => offset_of!(Event, sport),
            ("ma_event", "dport") => offset_of!(Event, dport),
            ("ma_event", "protocol") => offset_of!(Event, protocol),
            ("ma_event", "tcp_flags") => offset_of!(Event, tcp_flags),
            ("ma_event", "verdict") => offset_of!(Event, verdict),
            ("ma_event", "reason") => offset_of!(Event, reason),
            ("ma_event", "src_identity") => offset_of!(Event, src_identity),
            ("ma_event", "dst_identity") => offset_of!(Event, dst_identity),
            ("ma_event", "ifindex") => offset_of!(Event, ifindex),
            ("ma_event", "direction") => offset_of!(Event, direction),
            ("ma_event", "flags") => offset_of!(Event, flags),
            ("ma_event", "icmp_type") => offset_of!(Event, icmp_type),
            ("ma_event", "auth_key") => offset_of!(Event, auth_key),
            _ => panic!("no Rust mirror for {s}.{f}"),
        }
    }

    #[test]
    fn abi_versions_match() {
        assert_eq!(super::ABI_VERSION, C_ABI_VERSION);
    }

    fn rust_constant(name: &str) -> u64 {
        use super::c::*;
        match name {
            "MA_DIR_EGRESS" => DIR_EGRESS.into(),
            "MA_DIR_INGRESS" => DIR_INGRESS.into(),
            "MA_VERDICT_ALLOW" => VERDICT_ALLOW.into(),
            "MA_VERDICT_DENY" => VERDICT_DENY.into(),
            "MA_AUTH_NONE" => AUTH_NONE.into(),
            "MA_AUTH_REQUIRED" => AUTH_REQUIRED.into(),
            "MA_AUTH_ALWAYS_FAIL" => AUTH_ALWAYS_FAIL.into(),
            "MA_AUTH_PER_CONNECTION" => AUTH_PER_CONNECTION.into(),
            "MA_EV_FORWARDED" => EV_FORWARDED.into(),
            "MA_EV_DROPPED" => EV_DROPPED.into(),
            "MA_EV_HELD" => EV_HELD.into(),
            "MA_REASON_NONE" => REASON_NONE.into(),
            "MA_REASON_POLICY_DENIED" => REASON_POLICY_DENIED.into(),
            "MA_REASON_AUTH_REQUIRED" => REASON_AUTH_REQUIRED.into(),
            "MA_REASON_NO_IDENTITY" => REASON_NO_IDENTITY.into(),
            "MA_REASON_SPOOFED" => REASON_SPOOFED.into(),
            "MA_REASON_UNSUPPORTED" => REASON_UNSUPPORTED.into(),
            "MA_REASON_UNENCRYPTED" => REASON_UNENCRYPTED.into(),
            "MA_REASON_COUNT" => REASON_COUNT.into(),
            "MA_EVF_ESTABLISHED" => EVF_ESTABLISHED.into(),
            "MA_STAT_FORWARDED" => STAT_FORWARDED.into(),
            "MA_STAT_EVENTS_LOST" => STAT_EVENTS_LOST.into(),
            "MA_STAT_PER_DIR" => STAT_PER_DIR.into(),
            "MA_STAT_COUNT" => STAT_COUNT.into(),
            "MA_MAX_ENDPOINTS" => MAX_ENDPOINTS.into(),
            "MA_MAX_IPCACHE" => MAX_IPCACHE.into(),
            "MA_MAX_POLICY" => MAX_POLICY.into(),
            "MA_MAX_AUTH" => MAX_AUTH.into(),
            "MA_MAX_CONNTRACK" => MAX_CONNTRACK.into(),
            "MA_CT_TIMEOUT_TCP" => CT_TIMEOUT_TCP.into(),
            "MA_CT_TIMEOUT_OTHER" => CT_TIMEOUT_OTHER.into(),
            "MA_AUTH_MISS_DROP" => AUTH_MISS_DROP.into(),
            "MA_AUTH_MISS_MARK" => AUTH_MISS_MARK.into(),
            "MA_CT_HELD" => CT_HELD.into(),
            "MA_CT_FIN_ORIG" => CT_FIN_ORIG.into(),
            "MA_CT_FIN_REPLY" => CT_FIN_REPLY.into(),
            "MA_PEER_ENDPOINT_BASE" => PEER_ENDPOINT_BASE.into(),
            "MA_FIRST_POD_IDENTITY" => FIRST_POD_IDENTITY.into(),
            "MA_FIRST_LOCAL_IDENTITY" => FIRST_LOCAL_IDENTITY.into(),
            _ => panic!("no Rust constant for {name}"),
        }
    }

    #[test]
    fn constants_match_c() {
        assert!(C_CONSTANTS.len() >= 30);
        for (name, c) in C_CONSTANTS {
            assert_eq!(rust_constant(name), *c, "{name}: Rust and C disagree");
        }
    }

    #[test]
    fn layouts_match_c() {
        assert!(C_LAYOUT.len() > 40);
        for (s, f, c) in C_LAYOUT {
            assert_eq!(rust_layout(s, f), *c, "{s}.{f}: Rust and C disagree");
        }
    }
}
