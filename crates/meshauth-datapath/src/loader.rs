//! Loading, attaching and programming the datapath of one node.
//!
//! Maps are pinned under `<pin dir>/` (by name) and TCX links under `<pin dir>/links/`, so a
//! restarted loader finds both: the maps keep their entries (auth, conntrack, policy) and the
//! links are updated in place with `bpf_link_update`, which swaps the program atomically: there
//! is no moment when a pod's traffic is unfiltered or all dropped.
#![allow(unsafe_code, reason = "clock_gettime, poll and mount through libc")]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use meshauth_policy::{AuthType, Connection, IdentityId, NodeId};

use crate::abi;
use crate::abi::c;
use crate::policy_keys::{PolicyKeys, policy_keys};
use crate::types::{
    AuthKey, Direction, DropReason, EndpointId, EndpointInfo, FlowEvent, PolicyEntry,
};

/// The compiled programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.bpf.o"));

/// Where every node's pins live: `/sys/fs/bpf/meshauth/<node>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/meshauth";

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Loading or verifying the programs failed.
    #[error("cannot load the eBPF programs: {0} (needs root, a kernel with BTF, and bpffs)")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    /// A link operation failed.
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    /// Pinning failed.
    #[error("eBPF pin: {0}")]
    PinObject(#[from] aya::pin::PinError),
    /// A pin file could not be handled.
    #[error("pin path {path}: {source}")]
    Pin {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A map or program the object should contain is missing.
    #[error("the eBPF object has no {0}: rebuild meshauth")]
    Missing(&'static str),
    /// The interface does not exist in this network namespace.
    #[error("no interface {0} in this network namespace")]
    NoInterface(String),
}

type Result<T> = std::result::Result<T, DatapathError>;

/// Gives freed heap back to the kernel (glibc keeps it mapped otherwise). The loader calls it:
/// aya 0.14's `EbpfLoader::new` parses the kernel's BTF whether or not the programs need it
/// (ours have no CO-RE relocations; aya 0.15 parses it only when they do, but needs a newer
/// compiler), about 13 MB of small allocations all freed once loading is done. The agent calls
/// it after a reconcile, whose compilation and planning free what they used. Here because this
/// is the one crate allowed `unsafe`.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages of the heap to the
    // kernel, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn pin_err(path: &Path, source: std::io::Error) -> DatapathError {
    DatapathError::Pin {
        path: path.display().to_string(),
        source,
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (as Cilium's agent does). Loading
/// does it first; whoever creates pin directories without loading (tests) calls it too, since
/// on a fresh machine /sys/fs/bpf is a plain sysfs directory where nothing can be created.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(pin_err(
            Path::new("/sys/fs/bpf"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Nanoseconds of CLOCK_BOOTTIME, the clock `bpf_ktime_get_boot_ns` reads.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts a wall-clock instant to CLOCK_BOOTTIME nanoseconds (0 when already past).
fn to_boot_ns(t: SystemTime) -> u64 {
    let now_boot = boot_time_ns();
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => now_boot.saturating_add(ahead.as_nanos() as u64),
        Err(behind) => now_boot.saturating_sub(behind.duration().as_nanos() as u64),
    }
}

fn from_boot_ns(ns: u64) -> SystemTime {
    let now_boot = boot_time_ns();
    let now = SystemTime::now();
    if ns >= now_boot {
        now + Duration::from_nanos(ns - now_boot)
    } else {
        now - Duration::from_nanos(now_boot - ns)
    }
}

fn ifindex(iface: &str) -> Result<u32> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| DatapathError::NoInterface(iface.into()))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(DatapathError::NoInterface(iface.into()));
    }
    Ok(idx)
}

/// Counters kept by the programs, per direction (from the pod's point of view).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets passed.
    pub forwarded: BTreeMap<Direction, u64>,
    /// Packets dropped, by direction and reason.
    pub dropped: BTreeMap<(Direction, DropReason), u64>,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
}

impl Stats {
    /// Drops of `reason`, both directions.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.dropped
            .iter()
            .filter(|((_, r), _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }
}

/// What the datapath holds, read back (after a restart, to diff against).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Endpoints by host-side ifindex.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// ipcache: (address, prefix length) → (identity, node).
    pub ipcache: BTreeMap<(Ipv4Addr, u8), (IdentityId, NodeId)>,
    /// Endpoints that have policy entries.
    pub policy_endpoints: std::collections::BTreeSet<EndpointId>,
    /// Interfaces with pinned links.
    pub attached: std::collections::BTreeSet<String>,
    /// The ipcache generation.
    pub ipcache_gen: u32,
}

/// What to do with a packet whose identity pair has not authenticated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMissAction {
    /// Drop it (the sender retransmits).
    Drop,
    /// Mark it with this value and let it pass to a node-side hold queue (e.g. an nftables rule
    /// sending marked packets to NFQUEUE) that releases it once the pair is authenticated.
    Mark(u32),
}

/// The datapath of one node: programs loaded, maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The policy keys written per endpoint (read back from the map at load), so that a change
    /// writes only its difference.
    written: std::collections::HashMap<EndpointId, PolicyKeys>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the programs; maps are pinned under `node_dir` (see [`Datapath::pin_dir_for`]) and
    /// re-used if already there.
    pub fn load(node_dir: &Path) -> Result<Datapath> {
        ensure_bpffs()?;
        // Maps of another layout version are never reused: they live in another directory.
        let pin_dir = node_dir.join(format!("abi-v{}", abi::ABI_VERSION));
        let pin_dir = pin_dir.as_path();
        std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| pin_err(pin_dir, e))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)?;
        release_freed_heap();
        for name in ["from_pod", "to_pod"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing("program"))?
                .try_into()?;
            prog.load()?;
        }
        let mut dp = Datapath {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            written: std::collections::HashMap::new(),
        };
        dp.written = dp.read_policy()?;
        // Keep an existing configuration (restart); set defaults on first load.
        let cfg = dp.config()?;
        if cfg.event_interval_ns == 0 {
            dp.write_config(abi::Config {
                event_interval_ns: 100_000_000,
                ..cfg
            })?;
        }
        Ok(dp)
    }

    /// The pin directory of node `node`: `/sys/fs/bpf/meshauth/<node>`.
    pub fn pin_dir_for(node: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(node)
    }

    fn link_pin(&self, iface: &str, idx: u32, dir: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{iface}-{idx}-{dir}"))
    }

    /// Attaches to `iface` (in the calling thread's network namespace): `from_pod` on tc
    /// ingress, `to_pod` on tc egress. If a previous loader pinned links for it, they are
    /// updated in place (atomic program replacement).
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        let idx = ifindex(iface)?;
        for (prog_name, attach_type, dir) in [
            ("from_pod", TcAttachType::Ingress, "ingress"),
            ("to_pod", TcAttachType::Egress, "egress"),
        ] {
            let pin = self.link_pin(iface, idx, dir);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_name)
                .ok_or(DatapathError::Missing("program"))?
                .try_into()?;
            let existing = match PinnedLink::from_pin(&pin) {
                Ok(old) => Some(old),
                Err(aya::programs::links::LinkError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let replaced = existing.is_some();
            let link_id = match existing {
                Some(old) => {
                    let link: SchedClassifierLink = FdLink::from(old).try_into()?;
                    prog.attach_to_link(link)?
                }
                None => prog.attach_with_options(
                    iface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?,
            };
            let link = prog.take_link(link_id)?;
            let fd_link: FdLink = link.try_into()?;
            if !replaced {
                fd_link.pin(&pin)?;
            }
            tracing::debug!(iface, prog = prog_name, replaced, "attached");
        }
        Ok(())
    }

    /// Detaches from `iface` by removing its pinned links (the kernel then releases them). The
    /// interface may be gone already (a removed pod): its pins are found by name.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let links = self.pin_dir.join("links");
        let prefix = format!("{iface}-");
        for entry in std::fs::read_dir(&links)
            .map_err(|e| pin_err(&links, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            // `<ifindex>-<ingress|egress>`: the rest must be exactly that, so that detaching
            // `veth1` leaves `veth1-x`'s pins alone.
            let mut parts = rest.splitn(2, '-');
            let idx_ok = parts.next().is_some_and(|i| i.parse::<u32>().is_ok());
            let dir_ok = parts
                .next()
                .is_some_and(|d| d == "ingress" || d == "egress");
            if idx_ok && dir_ok {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
            }
        }
        Ok(())
    }

    /// Removes a node's pins (maps and links): its datapath ends when the last user goes.
    pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
        if pin_dir.exists() {
            std::fs::remove_dir_all(pin_dir)?;
        }
        Ok(())
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))
    }

    fn config(&mut self) -> Result<abi::Config> {
        let arr: Array<&mut MapData, abi::Config> = Array::try_from(self.map("ma_config")?)?;
        Ok(arr.get(&0, 0)?)
    }

    fn write_config(&mut self, cfg: abi::Config) -> Result<()> {
        let mut arr: Array<&mut MapData, abi::Config> = Array::try_from(self.map("ma_config")?)?;
        arr.set(0, cfg, 0)?;
        Ok(())
    }

    /// Sets what happens to packets of pairs not authenticated yet (default: drop).
    pub fn set_auth_miss_action(&mut self, action: AuthMissAction) -> Result<()> {
        let mut cfg = self.config()?;
        (cfg.auth_miss_action, cfg.hold_mark) = match action {
            AuthMissAction::Drop => (c::AUTH_MISS_DROP, 0),
            AuthMissAction::Mark(mark) => (c::AUTH_MISS_MARK, mark),
        };
        self.write_config(cfg)
    }

    /// Sets the per-flow minimum interval between events (0 reports every packet).
    pub fn set_event_interval(&mut self, interval: Duration) -> Result<()> {
        let mut cfg = self.config()?;
        cfg.event_interval_ns = (interval.as_nanos() as u64).max(1);
        self.write_config(cfg)
    }

    /// Sets the idle timeouts of tracked flows (TCP, everything else); zero keeps the default.
    pub fn set_conntrack_timeouts(&mut self, tcp: Duration, other: Duration) -> Result<()> {
        let mut cfg = self.config()?;
        cfg.ct_timeout_tcp_s = u32::try_from(tcp.as_secs()).unwrap_or(u32::MAX);
        cfg.ct_timeout_other_s = u32::try_from(other.as_secs()).unwrap_or(u32::MAX);
        self.write_config(cfg)
    }

    /// Encryption on (`Some`): packets into a pod from a pod of another node must arrive on
    /// the tunnel device `tunnel_ifindex`, else they are dropped as unencrypted; `local_node`
    /// is this node's id as the ipcache names it. `None` turns the check off.
    pub fn set_tunnel(&mut self, tunnel: Option<(u32, meshauth_policy::NodeId)>) -> Result<()> {
        let mut cfg = self.config()?;
        (cfg.tunnel_ifindex, cfg.local_node) = match tunnel {
            Some((ifindex, node)) => (ifindex, node.get()),
            None => (0, 0),
        };
        self.write_config(cfg)
    }

    /// Sets the ipcache generation: tracked flows accepted under another one are decided again
    /// on their next packet. Bump it after an ipcache entry changed or went away.
    pub fn set_ipcache_generation(&mut self, generation: u32) -> Result<()> {
        let mut cfg = self.config()?;
        cfg.ipcache_gen = generation;
        self.write_config(cfg)
    }

    /// Registers the pod behind host-side veth `ifindex`.
    pub fn set_endpoint(&mut self, ifindex: u32, ep: &EndpointInfo) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, abi::Endpoint> =
            HashMap::try_from(self.map("ma_endpoints")?)?;
        m.insert(
            ifindex,
            abi::Endpoint {
                endpoint_id: ep.id.0,
                identity: ep.identity.get(),
                ipv4: ep.ipv4.octets(),
                flags: 0,
                policy_gen: ep.policy_gen,
                pad: 0,
            },
            0,
        )?;
        Ok(())
    }

    /// Forgets the pod behind `ifindex`.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        let mut m: HashMap<&mut MapData, u32, abi::Endpoint> =
            HashMap::try_from(self.map("ma_endpoints")?)?;
        ignore_missing(m.remove(&ifindex))
    }

    fn ipcache_key(ip: Ipv4Addr, prefix: u8) -> Key<abi::IpcacheAddr> {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&ip.octets());
        Key::new(96 + u32::from(prefix.min(32)), addr)
    }

    /// Maps an IPv4 prefix to an identity on a node.
    pub fn set_ipcache(
        &mut self,
        ip: Ipv4Addr,
        prefix: u8,
        identity: IdentityId,
        node: NodeId,
    ) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, abi::IpcacheAddr, abi::IpcacheValue> =
            LpmTrie::try_from(self.map("ma_ipcache")?)?;
        m.insert(
            &Self::ipcache_key(ip, prefix),
            abi::IpcacheValue {
                identity: identity.get(),
                node_id: node.get(),
            },
            0,
        )?;
        Ok(())
    }

    /// Removes an ipcache prefix.
    pub fn remove_ipcache(&mut self, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut m: LpmTrie<&mut MapData, abi::IpcacheAddr, abi::IpcacheValue> =
            LpmTrie::try_from(self.map("ma_ipcache")?)?;
        ignore_missing(m.remove(&Self::ipcache_key(ip, prefix)))
    }

    /// Replaces the policy of `endpoint` with the keys planned from `entries` (see
    /// [`crate::policy_keys`]), writing only the difference: new and changed keys first, then
    /// stale ones removed. Returns whether anything changed; the caller then bumps the
    /// endpoint's [`EndpointInfo::policy_gen`] so that tracked flows are decided again.
    pub fn set_policy(&mut self, endpoint: EndpointId, entries: &[PolicyEntry]) -> Result<bool> {
        let wanted = policy_keys(entries);
        let old = self.written.remove(&endpoint).unwrap_or_default();
        let result = self.write_policy(endpoint, &old, &wanted);
        // On error the map holds some mix: remember the union so a retry removes what is stale.
        let record = match &result {
            Ok(_) => wanted,
            Err(_) => old.into_iter().chain(wanted).collect(),
        };
        self.written.insert(endpoint, record);
        result
    }

    /// Removes every policy entry of `endpoint`.
    pub fn remove_policy(&mut self, endpoint: EndpointId) -> Result<()> {
        let old = self.written.remove(&endpoint).unwrap_or_default();
        if let Err(e) = self.write_policy(endpoint, &old, &PolicyKeys::new()) {
            self.written.insert(endpoint, old);
            return Err(e);
        }
        Ok(())
    }

    /// How many policy entries the map holds (all endpoints).
    pub fn policy_len(&self) -> usize {
        self.written.values().map(BTreeMap::len).sum()
    }

    fn write_policy(
        &mut self,
        endpoint: EndpointId,
        old: &PolicyKeys,
        new: &PolicyKeys,
    ) -> Result<bool> {
        let mut m: LpmTrie<&mut MapData, abi::PolicyKey, abi::PolicyValue> =
            LpmTrie::try_from(self.map("ma_policy")?)?;
        let mut changed = false;
        for (k, d) in new {
            if old.get(k) == Some(d) {
                continue;
            }
            let (key, value) = policy_key_raw(endpoint, k, d);
            m.insert(&key, value, 0)?;
            changed = true;
        }
        for k in old.keys().filter(|k| !new.contains_key(*k)) {
            let (key, _) = policy_key_raw(endpoint, k, &crate::policy_keys::Decision::DENY);
            ignore_missing(m.remove(&key))?;
            changed = true;
        }
        Ok(changed)
    }

    /// Reads the policy map back into keys per endpoint (once, at load).
    fn read_policy(&mut self) -> Result<std::collections::HashMap<EndpointId, PolicyKeys>> {
        let m: LpmTrie<&mut MapData, abi::PolicyKey, abi::PolicyValue> =
            LpmTrie::try_from(self.map("ma_policy")?)?;
        let mut out: std::collections::HashMap<EndpointId, PolicyKeys> =
            std::collections::HashMap::new();
        for k in m.keys().filter_map(|k| k.ok()) {
            let Ok(v) = m.get(&k, 0) else { continue };
            if let Some((ep, key, d)) = policy_key_from_raw(&k, &v) {
                out.entry(ep).or_default().insert(key, d);
            }
        }
        Ok(out)
    }

    /// What the maps and pins hold now (endpoints, ipcache, which endpoints have policy,
    /// attached interfaces, the ipcache generation).
    pub fn observe(&mut self) -> Result<Observed> {
        let mut out = Observed {
            policy_endpoints: self.written.keys().copied().collect(),
            ipcache_gen: self.config()?.ipcache_gen,
            ..Observed::default()
        };
        {
            let m: HashMap<&mut MapData, u32, abi::Endpoint> =
                HashMap::try_from(self.map("ma_endpoints")?)?;
            for (ifindex, e) in m.iter().filter_map(|r| r.ok()) {
                out.endpoints.insert(
                    ifindex,
                    EndpointInfo {
                        id: EndpointId(e.endpoint_id),
                        identity: IdentityId::new(e.identity),
                        ipv4: Ipv4Addr::from(e.ipv4),
                        policy_gen: e.policy_gen,
                    },
                );
            }
        }
        {
            let m: LpmTrie<&mut MapData, abi::IpcacheAddr, abi::IpcacheValue> =
                LpmTrie::try_from(self.map("ma_ipcache")?)?;
            for k in m.keys().filter_map(|k| k.ok()) {
                let Ok(v) = m.get(&k, 0) else { continue };
                let a = k.data();
                let ip = Ipv4Addr::new(a[12], a[13], a[14], a[15]);
                let prefix = u8::try_from(k.prefix_len().saturating_sub(96)).unwrap_or(32);
                out.ipcache.insert(
                    (ip, prefix),
                    (IdentityId::new(v.identity), NodeId::new(v.node_id)),
                );
            }
        }
        let links = self.pin_dir.join("links");
        for entry in std::fs::read_dir(&links)
            .map_err(|e| pin_err(&links, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `<iface>-<ifindex>-<ingress|egress>`; interface names may contain dashes.
            let mut parts = name.rsplitn(3, '-');
            if let (Some(_dir), Some(_idx), Some(iface)) =
                (parts.next(), parts.next(), parts.next())
            {
                out.attached.insert(iface.to_owned());
            }
        }
        Ok(out)
    }

    /// Removes tracked flows idle past their timeout at CLOCK_BOOTTIME `now_boot_ns` (see
    /// [`boot_time_ns`]); returns how many. The program re-checks idle flows by itself; this
    /// only frees their slots.
    pub fn sweep_conntrack(&mut self, now_boot_ns: u64) -> Result<usize> {
        let cfg = self.config()?;
        let timeout = |proto: u8| -> u64 {
            let s = match proto {
                6 if cfg.ct_timeout_tcp_s > 0 => cfg.ct_timeout_tcp_s,
                6 => c::CT_TIMEOUT_TCP,
                _ if cfg.ct_timeout_other_s > 0 => cfg.ct_timeout_other_s,
                _ => c::CT_TIMEOUT_OTHER,
            };
            u64::from(s) * 1_000_000_000
        };
        let mut m: HashMap<&mut MapData, abi::CtKey, abi::CtValue> =
            HashMap::try_from(self.map("ma_conntrack")?)?;
        let stale: Vec<abi::CtKey> = m
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v)| now_boot_ns.saturating_sub(v.last_seen_ns) > timeout(k.protocol))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            ignore_missing(m.remove(k))?;
        }
        Ok(stale.len())
    }

    /// Records that a pair authenticated, valid until `expires`.
    pub fn insert_auth(&mut self, key: AuthKey, expires: SystemTime) -> Result<()> {
        let mut m: HashMap<&mut MapData, abi::AuthKey, abi::AuthValue> =
            HashMap::try_from(self.map("ma_auth")?)?;
        m.insert(
            auth_key(key),
            abi::AuthValue {
                expires_ns: to_boot_ns(expires),
            },
            0,
        )?;
        Ok(())
    }

    /// Removes an auth entry (revocation).
    pub fn remove_auth(&mut self, key: AuthKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, abi::AuthKey, abi::AuthValue> =
            HashMap::try_from(self.map("ma_auth")?)?;
        ignore_missing(m.remove(&auth_key(key)))
    }

    /// Every auth entry with its expiry.
    pub fn auth_entries(&mut self) -> Result<Vec<(AuthKey, SystemTime)>> {
        let m: HashMap<&mut MapData, abi::AuthKey, abi::AuthValue> =
            HashMap::try_from(self.map("ma_auth")?)?;
        // Counted first (a walk of the keys) so that a map of 100,000 entries is read into one
        // allocation of its size, not a vector that doubles its way past it.
        let mut out = Vec::with_capacity(m.keys().count());
        out.extend(
            m.iter()
                .filter_map(|r| r.ok())
                .filter_map(|(k, v)| Some((from_abi_auth_key(&k)?, from_boot_ns(v.expires_ns)))),
        );
        Ok(out)
    }

    /// A handle of its own on the auth map (the same kernel map, through a duplicate of its
    /// file descriptor): it reads the entries while this `Datapath` is owned elsewhere, and
    /// one at a time, so that a restarted agent adopts 100,000 inherited entries without a
    /// copy of them all.
    pub fn auth_map_reader(&mut self) -> Result<AuthMapReader> {
        let aya::maps::Map::HashMap(data) = self.map("ma_auth")? else {
            return Err(DatapathError::Missing("ma_auth"));
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd())
            .try_clone_to_owned()
            .map_err(|e| pin_err(&self.pin_dir, e))?;
        Ok(AuthMapReader(HashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_fd(fd)?,
        ))?))
    }

    /// The auth key of a flow the datapath holds (marked for the hold queue), by the packet's
    /// addresses, ports, protocol and (ICMP) type as the pod sent it; `None` when it is not
    /// held. For ICMP both ports are the echo id; `icmp_type` is ignored for other protocols.
    pub fn held_flow(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        protocol: u8,
        icmp_type: u8,
    ) -> Result<Option<AuthKey>> {
        let m: HashMap<&mut MapData, abi::CtKey, abi::CtValue> =
            HashMap::try_from(self.map("ma_conntrack")?)?;
        let key = abi::CtKey {
            saddr: src.octets(),
            daddr: dst.octets(),
            sport,
            dport,
            protocol,
            direction: c::DIR_EGRESS,
            icmp_type: if protocol == 1 { icmp_type } else { 0 },
            pad: 0,
        };
        match m.get(&key, 0) {
            Ok(v) if v.flags & c::CT_HELD != 0 => Ok(from_abi_auth_key(&v.auth_key)),
            Ok(_) => Ok(None),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the datapath tracks connection `c` (its conntrack entry, in either direction):
    /// a per-connection auth entry lives only as long as that.
    pub fn connection_tracked(&mut self, c: &Connection) -> Result<bool> {
        let m: HashMap<&mut MapData, abi::CtKey, abi::CtValue> =
            HashMap::try_from(self.map("ma_conntrack")?)?;
        for direction in [c::DIR_EGRESS, c::DIR_INGRESS] {
            let key = abi::CtKey {
                saddr: c.src.octets(),
                daddr: c.dst.octets(),
                sport: c.sport,
                dport: c.dport,
                protocol: c.protocol,
                direction,
                // ICMP: the echo request's flow (what a per-connection echo authenticates).
                icmp_type: if c.protocol == 1 { 8 } else { 0 },
                pad: 0,
            };
            match m.get(&key, 0) {
                Ok(_) => return Ok(true),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Whether `key` has a live auth entry now.
    pub fn auth_live(&mut self, key: AuthKey) -> Result<bool> {
        let m: HashMap<&mut MapData, abi::AuthKey, abi::AuthValue> =
            HashMap::try_from(self.map("ma_auth")?)?;
        match m.get(&auth_key(key), 0) {
            Ok(v) => Ok(v.expires_ns > boot_time_ns()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Number of conntrack entries (for tests and metrics).
    pub fn conntrack_len(&mut self) -> Result<usize> {
        let m: HashMap<&mut MapData, abi::CtKey, abi::CtValue> =
            HashMap::try_from(self.map("ma_conntrack")?)?;
        Ok(m.keys().filter(|k| k.is_ok()).count())
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&mut self) -> Result<Stats> {
        let m: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map("ma_stats")?)?;
        let sum = |i: u32| -> u64 { m.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        let mut out = Stats::default();
        for d in [Direction::Egress, Direction::Ingress] {
            let base = u32::from(crate::types::direction_raw(d)) * c::STAT_PER_DIR;
            for r in DropReason::ALL {
                out.dropped.insert((d, r), sum(base + u32::from(r.raw())));
            }
            out.forwarded.insert(d, sum(base + c::STAT_FORWARDED));
            out.events_lost += sum(base + c::STAT_EVENTS_LOST);
        }
        Ok(out)
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Result<EventReader> {
        let map = self
            .ebpf
            .take_map("ma_events")
            .ok_or(DatapathError::Missing("ma_events"))?;
        Ok(EventReader {
            ring: RingBuf::try_from(map)?,
        })
    }
}

fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn policy_key_raw(
    endpoint: EndpointId,
    k: &crate::policy_keys::PolicyKey,
    d: &crate::policy_keys::Decision,
) -> (Key<abi::PolicyKey>, abi::PolicyValue) {
    let key = abi::PolicyKey {
        endpoint_id: endpoint.0,
        remote_identity: k.remote.map_or(0, IdentityId::get),
        direction: crate::types::direction_raw(k.direction),
        protocol: k.protocol.map_or(0, |p| p.number()),
        dport: k.port.to_be_bytes(),
    };
    let value = abi::PolicyValue {
        verdict: crate::types::verdict_raw(d.verdict),
        auth_type: crate::types::auth_raw(d.auth),
        pad: 0,
    };
    (Key::new(80 + u32::from(k.bits), key), value)
}

fn policy_key_from_raw(
    k: &Key<abi::PolicyKey>,
    v: &abi::PolicyValue,
) -> Option<(
    EndpointId,
    crate::policy_keys::PolicyKey,
    crate::policy_keys::Decision,
)> {
    let data = k.data();
    let protocol = match data.protocol {
        0 => None,
        n => Some(crate::types::Protocol::from_number(n)?),
    };
    Some((
        EndpointId(data.endpoint_id),
        crate::policy_keys::PolicyKey {
            direction: crate::types::direction_from_raw(data.direction)?,
            remote: (data.remote_identity != 0).then(|| IdentityId::new(data.remote_identity)),
            protocol,
            port: u16::from_be_bytes(data.dport),
            bits: u8::try_from(k.prefix_len().checked_sub(80)?).ok()?,
        },
        crate::policy_keys::Decision {
            verdict: crate::types::verdict_from_raw(v.verdict)?,
            auth: crate::types::auth_from_raw(v.auth_type)?,
        },
    ))
}

fn auth_key(k: AuthKey) -> abi::AuthKey {
    let c = k.connection.unwrap_or(Connection {
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        sport: 0,
        dport: 0,
        protocol: 0,
    });
    abi::AuthKey {
        local_identity: k.local.get(),
        remote_identity: k.remote.get(),
        remote_node: k.remote_node.get(),
        auth_type: crate::types::auth_raw(k.auth_type),
        protocol: c.protocol,
        pad: 0,
        saddr: c.src.octets(),
        daddr: c.dst.octets(),
        sport: c.sport,
        dport: c.dport,
    }
}

/// Reads the auth map without holding the [`Datapath`] (see [`Datapath::auth_map_reader`]).
pub struct AuthMapReader(HashMap<MapData, abi::AuthKey, abi::AuthValue>);

impl AuthMapReader {
    /// How many entries the map holds now (a walk of its keys).
    pub fn count(&self) -> usize {
        self.0.keys().filter(|k| k.is_ok()).count()
    }

    /// Calls `f` with each entry and its expiry, one at a time; returns how many there were.
    /// Entries whose key the ABI does not know are skipped.
    pub fn for_each(&self, mut f: impl FnMut(AuthKey, SystemTime)) -> usize {
        let mut n = 0usize;
        for (k, v) in self.0.iter().filter_map(|r| r.ok()) {
            if let Some(key) = from_abi_auth_key(&k) {
                f(key, from_boot_ns(v.expires_ns));
                n = n.saturating_add(1);
            }
        }
        n
    }
}

impl std::fmt::Debug for AuthMapReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthMapReader")
    }
}

fn from_abi_auth_key(k: &abi::AuthKey) -> Option<AuthKey> {
    let auth_type = crate::types::auth_from_raw(k.auth_type)?;
    Some(AuthKey {
        local: IdentityId::new(k.local_identity),
        remote: IdentityId::new(k.remote_identity),
        remote_node: NodeId::new(k.remote_node),
        auth_type,
        connection: (auth_type == AuthType::PerConnection).then(|| Connection {
            src: Ipv4Addr::from(k.saddr),
            dst: Ipv4Addr::from(k.daddr),
            sport: k.sport,
            dport: k.dport,
            protocol: k.protocol,
        }),
    })
}

/// Reads flow events from the ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

impl EventReader {
    /// The next event, waiting up to `timeout`. Malformed records are skipped.
    pub fn next_event(&mut self, timeout: Duration) -> Option<FlowEvent> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            while let Some(item) = self.ring.next() {
                if let Some(ev) = abi::Event::from_bytes(&item).and_then(|e| decode(&e)) {
                    return Some(ev);
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the ring buffer's fd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        }
    }

    /// The raw fd, for async readiness (e.g. tokio's `AsyncFd`).
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

fn decode(e: &abi::Event) -> Option<FlowEvent> {
    Some(FlowEvent {
        boot_ns: e.ts_ns,
        src: Ipv4Addr::from(e.saddr),
        dst: Ipv4Addr::from(e.daddr),
        sport: e.sport,
        dport: e.dport,
        protocol: e.protocol,
        icmp_type: e.icmp_type,
        tcp_flags: e.tcp_flags,
        drop: if e.verdict == c::EV_DROPPED {
            Some(DropReason::from_raw(e.reason)?)
        } else {
            None
        },
        held: e.verdict == c::EV_HELD,
        src_identity: IdentityId::new(e.src_identity),
        dst_identity: IdentityId::new(e.dst_identity),
        ifindex: e.ifindex,
        direction: crate::types::direction_from_raw(e.direction)?,
        established: e.flags & c::EVF_ESTABLISHED != 0,
        auth_key: if e.reason == c::REASON_AUTH_REQUIRED {
            from_abi_auth_key(&e.auth_key)
        } else {
            None
        },
    })
}
