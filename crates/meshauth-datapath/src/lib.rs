//! The meshauth datapath: eBPF programs at tc on each pod's veth, and the typed API over their
//! maps. The only crate that talks to the kernel's BPF interfaces.
//!
//! # Layout
//! - `bpf/datapath.bpf.c`, `bpf/abi.h`: the programs and their shared layouts (built by clang
//!   from `build.rs`).
//! - `abi`: the `#[repr(C)]` mirrors, checked against the C compiler's layout by a test.
//! - [`types`]: domain types (`PolicyEntry`, `AuthKey`, `FlowEvent`, ...).
//! - [`policy_keys`]: the policy map's keys, planned so that the kernel's lookup answers what
//!   `meshauth_policy::lookup` answers (pure), and the model of the kernel's lookup.
//! - [`Datapath`]: load, pin, attach (atomic replacement on restart), program the maps, read
//!   events.
//! - [`netns`]: running the loader inside a node's network namespace.
//!
//! # Holding instead of dropping
//! A packet whose pair is not authenticated is dropped by default. With
//! [`AuthMissAction::Mark`] the program instead marks it and lets it pass, so that a node-side
//! queue (an nftables rule sending the mark to NFQUEUE) can hold it until the agent has written
//! the auth entry. The flow is tracked as *held*: its later packets are marked again and its
//! replies dropped until the auth entry exists; from then on it is an ordinary established flow.
//!
//! # Pins
//! `/sys/fs/bpf/meshauth/<node>/abi-v<N>/`: maps by name and `links/`. The ABI version in the
//! path means maps of an older layout are never reused by a newer program.
//!
//! # Clock
//! Auth entry expiries are CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`); the API takes
//! `SystemTime` and converts.

mod abi;
mod loader;
pub mod netns;
pub mod policy_keys;
pub mod types;

/// The version of the maps' layout (`MA_ABI_VERSION`): the maps of a node live in
/// `<pin dir>/abi-v<ABI_VERSION>/`, so maps of another layout are never reused.
pub const ABI_VERSION: u32 = abi::ABI_VERSION;

/// How many entries each map holds at most (`MA_MAX_*` in `bpf/abi.h`).
pub mod capacity {
    use crate::abi::c;
    /// Pods on one node.
    pub const ENDPOINTS: usize = c::MAX_ENDPOINTS as usize;
    /// ipcache prefixes.
    pub const IPCACHE: usize = c::MAX_IPCACHE as usize;
    /// Policy keys, all endpoints of the node together.
    pub const POLICY: usize = c::MAX_POLICY as usize;
    /// Auth entries.
    pub const AUTH: usize = c::MAX_AUTH as usize;
    /// Tracked flows (least recently used go first).
    pub const CONNTRACK: usize = c::MAX_CONNTRACK as usize;
}

pub use loader::{
    AuthMapReader, AuthMissAction, Datapath, DatapathError, EventReader, Observed, PIN_ROOT, Stats,
    boot_time_ns, ensure_bpffs, release_freed_heap,
};
pub use types::{
    AuthKey, AuthType, Direction, DropReason, EndpointId, EndpointInfo, FlowEvent, PolicyEntry,
    PortRange, Protocol, Verdict,
};
