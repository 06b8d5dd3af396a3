//! Endpoints a container runtime hands over (the `meshauth-cni` plugin, through the admin
//! API): an [`EndpointSource`] kept in the data directory, so that an agent restarted while
//! containers run keeps enforcing on them.
//!
//! The plugin creates a container's veth and asks for an address; [`assign`] (pure) decides it:
//! only for a pod the control plane placed on this node, from this node's pod range, never an
//! address another pod has. The server checks the report again (its range, its uniqueness).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cache::ClusterState;
use crate::endpoints::{EndpointList, EndpointSource, LocalEndpoint};

/// The address of the node side of every container's veth, the containers' gateway (as Cilium
/// and Calico give each pod a link-local next hop): the same on every veth, nothing to allocate.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A container's interface, as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniEndpoint {
    /// The runtime's container ID.
    pub container_id: String,
    /// The interface name inside the container.
    pub ifname: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The address assigned.
    pub ipv4: Ipv4Addr,
    /// The node side of the veth.
    pub host_veth: String,
    /// Its index.
    pub host_ifindex: u32,
}

impl CniEndpoint {
    /// `namespace/name`.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn local(&self) -> LocalEndpoint {
        LocalEndpoint {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ipv4: self.ipv4,
            host_veth: self.host_veth.clone(),
            host_ifindex: self.host_ifindex,
        }
    }
}

/// What the plugin asks for: a pod for a container's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddRequest {
    /// The runtime's container ID.
    pub container_id: String,
    /// The interface name inside the container.
    pub ifname: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The node side of the veth the plugin made.
    pub host_veth: String,
    /// Its index.
    pub host_ifindex: u32,
}

/// Why a container gets no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    /// The control plane has no such pod.
    #[error(
        "the control plane has no pod {pod}: create it first (`meshauth pod create {name} -n {namespace} --node {node} --labels ...`)"
    )]
    UnknownPod {
        /// `namespace/name`.
        pod: String,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// This node.
        node: String,
    },
    /// It placed the pod on another node.
    #[error("pod {pod} is placed on node {placed}, not on this node ({node}): run it there")]
    OtherNode {
        /// `namespace/name`.
        pod: String,
        /// Where it is placed.
        placed: String,
        /// This node.
        node: String,
    },
    /// Another container runs the pod here already.
    #[error("pod {pod} already runs here in container {container} (remove it first)")]
    AlreadyRunning {
        /// `namespace/name`.
        pod: String,
        /// The container that has it.
        container: String,
    },
    /// This node has no pod range.
    #[error(
        "node {node} has no pod range to take addresses from (bind one: `meshauth agent register --node {node} --pod-range CIDR`, or a token with --pod-range)"
    )]
    NoPodRange {
        /// This node.
        node: String,
    },
    /// Every address of the range is taken.
    #[error("every address of node {node}'s pod range {range} is taken")]
    RangeFull {
        /// This node.
        node: String,
        /// Its range.
        range: String,
    },
}

/// The address for `req` (pure): its pod must be placed on `node`, no other container of
/// `held` may run it, and the address is the lowest of the node's pod range (without its
/// network and broadcast addresses) that no pod of the cluster and no held container has. A
/// container the agent holds already (the runtime repeated ADD) keeps its address.
pub fn assign(
    cluster: &ClusterState,
    node: &str,
    held: &[CniEndpoint],
    req: &AddRequest,
) -> Result<Ipv4Addr, AssignError> {
    let pod = format!("{}/{}", req.namespace, req.name);
    let placed = cluster
        .endpoints
        .iter()
        .find(|e| e.namespace == req.namespace && e.name == req.name)
        .ok_or_else(|| AssignError::UnknownPod {
            pod: pod.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            node: node.to_owned(),
        })?;
    if placed.node != node {
        return Err(AssignError::OtherNode {
            pod,
            placed: placed.node.clone(),
            node: node.to_owned(),
        });
    }
    for h in held {
        if h.namespace == req.namespace && h.name == req.name {
            if h.container_id == req.container_id && h.ifname == req.ifname {
                return Ok(h.ipv4);
            }
            return Err(AssignError::AlreadyRunning {
                pod,
                container: h.container_id.clone(),
            });
        }
    }
    let range = cluster
        .pod_ranges
        .get(node)
        .copied()
        .ok_or_else(|| AssignError::NoPodRange {
            node: node.to_owned(),
        })?;
    let full = || AssignError::RangeFull {
        node: node.to_owned(),
        range: range.to_string(),
    };
    let std::net::IpAddr::V4(base) = range.addr() else {
        return Err(AssignError::NoPodRange {
            node: node.to_owned(),
        });
    };
    let host_bits = 32u32.saturating_sub(u32::from(range.prefix_len()));
    let size: u64 = 1u64 << host_bits;
    // A /31 or /32 has no network and broadcast address to leave out.
    let (first, last) = if size > 2 {
        (1, size - 2)
    } else {
        (0, size - 1)
    };
    let taken: std::collections::BTreeSet<Ipv4Addr> = cluster
        .endpoints
        .iter()
        .filter_map(|e| e.ipv4)
        .chain(held.iter().map(|h| h.ipv4))
        .collect();
    let base = u64::from(u32::from(base));
    (first..=last)
        .filter_map(|i| u32::try_from(base + i).ok().map(Ipv4Addr::from))
        .find(|a| !taken.contains(a))
        .ok_or_else(full)
}

/// The endpoints the runtime handed over, kept in a file and watched by enforcement.
#[derive(Clone)]
pub struct CniEndpoints {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    held: Mutex<Vec<CniEndpoint>>,
    tx: watch::Sender<EndpointList>,
}

impl std::fmt::Debug for CniEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CniEndpoints")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// The file, in the agent's data directory.
const FILE: &str = "cni-endpoints.json";

impl CniEndpoints {
    /// Opens what the runtime handed over before (in `data_dir`), or nothing.
    pub fn open(data_dir: &Path) -> anyhow::Result<CniEndpoints> {
        use anyhow::Context as _;
        let path = data_dir.join(FILE);
        let held: Vec<CniEndpoint> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is damaged (it lists the containers the CNI plugin handed over; remove it and restart the containers)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let (tx, _) = watch::channel(Ok(held.iter().map(CniEndpoint::local).collect()));
        Ok(CniEndpoints {
            inner: Arc::new(Inner {
                path,
                held: Mutex::new(held),
                tx,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CniEndpoint>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every endpoint held now.
    pub fn list(&self) -> Vec<CniEndpoint> {
        self.lock().clone()
    }

    /// The endpoint of a container's interface.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<CniEndpoint> {
        self.lock()
            .iter()
            .find(|e| e.container_id == container_id && e.ifname == ifname)
            .cloned()
    }

    /// Assigns `req` an address by the cluster view (see [`assign`]), saves it and tells
    /// enforcement. `Ok(Err(_))`: refused; `Err`: it could not be saved.
    pub fn add(
        &self,
        cluster: &ClusterState,
        node: &str,
        req: &AddRequest,
    ) -> anyhow::Result<Result<CniEndpoint, AssignError>> {
        let mut held = self.lock();
        let ipv4 = match assign(cluster, node, &held, req) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let endpoint = CniEndpoint {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            ipv4,
            host_veth: req.host_veth.clone(),
            host_ifindex: req.host_ifindex,
        };
        let mut next = held.clone();
        next.retain(|e| !(e.container_id == req.container_id && e.ifname == req.ifname));
        next.push(endpoint.clone());
        self.save(&next)?;
        *held = next;
        self.publish(&held);
        Ok(Ok(endpoint))
    }

    /// Removes a container's interface; `None` if it was not held.
    pub fn remove(&self, container_id: &str, ifname: &str) -> anyhow::Result<Option<CniEndpoint>> {
        let mut held = self.lock();
        let Some(i) = held
            .iter()
            .position(|e| e.container_id == container_id && e.ifname == ifname)
        else {
            return Ok(None);
        };
        let mut next = held.clone();
        let gone = next.remove(i);
        self.save(&next)?;
        *held = next;
        self.publish(&held);
        Ok(Some(gone))
    }

    /// Drops the endpoints whose node-side interface is gone (`exists(name, index)` is false):
    /// the host rebooted or the veth was deleted while the agent was down, and no DEL will
    /// come for them. Each is logged; returns them.
    pub fn prune(&self, exists: impl Fn(&str, u32) -> bool) -> anyhow::Result<Vec<CniEndpoint>> {
        let mut held = self.lock();
        let (kept, gone): (Vec<CniEndpoint>, Vec<CniEndpoint>) = held
            .iter()
            .cloned()
            .partition(|e| exists(&e.host_veth, e.host_ifindex));
        if gone.is_empty() {
            return Ok(gone);
        }
        self.save(&kept)?;
        *held = kept;
        self.publish(&held);
        for e in &gone {
            tracing::warn!(container = %e.container_id, pod = %e.pod(), iface = %e.host_veth, "container's interface is gone: dropped");
        }
        Ok(gone)
    }

    fn save(&self, list: &[CniEndpoint]) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(list)?;
        crate::identity::write_atomic(&self.inner.path, &data, 0o600)
    }

    fn publish(&self, held: &[CniEndpoint]) {
        // The previous list, replaced (whether or not enforcement listens yet).
        let _previous = self
            .inner
            .tx
            .send_replace(Ok(held.iter().map(CniEndpoint::local).collect()));
    }

    /// A source for enforcement: the endpoints held now, and every change.
    pub fn source(&self) -> Box<dyn EndpointSource> {
        Box::new(Source(self.clone()))
    }
}

struct Source(CniEndpoints);

impl EndpointSource for Source {
    fn watch(self: Box<Self>) -> watch::Receiver<EndpointList> {
        self.0.inner.tx.subscribe()
    }
}

/// Whether interface `name` exists in this network namespace with index `index`.
pub fn interface_exists(name: &str, index: u32) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok_and(|i| i == index)
}

/// What enforcement enforces on now, for the admin API to wait on: pod (`namespace/name`) →
/// interface, and the node's address (the source of what the node sends its pods).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforced {
    /// Pods whose interface has the datapath attached and their policy applied.
    pub pods: BTreeMap<String, String>,
    /// The node's address, once enforcement runs.
    pub node_address: Option<std::net::IpAddr>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use crate::cache::ClusterEndpoint;
    use meshauth_policy::{Cidr, IdentityId, NodeId};

    fn pod(node: &str, name: &str, ip: Option<[u8; 4]>) -> ClusterEndpoint {
        ClusterEndpoint {
            node: node.into(),
            node_id: NodeId::new(1),
            namespace: "default".into(),
            name: name.into(),
            ipv4: ip.map(Ipv4Addr::from),
            interface: String::new(),
            identity: IdentityId::new(300),
        }
    }

    fn cluster(pods: Vec<ClusterEndpoint>) -> ClusterState {
        ClusterState {
            endpoints: pods,
            pod_ranges: BTreeMap::from([(
                "n1".to_string(),
                Cidr::parse_prefix("10.200.1.0/24").unwrap(),
            )]),
            ..Default::default()
        }
    }

    fn req(container: &str, name: &str) -> AddRequest {
        AddRequest {
            container_id: container.into(),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            host_veth: "mcabc".into(),
            host_ifindex: 7,
        }
    }

    fn held(container: &str, name: &str, ip: [u8; 4]) -> CniEndpoint {
        CniEndpoint {
            container_id: container.into(),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            ipv4: Ipv4Addr::from(ip),
            host_veth: "mcabc".into(),
            host_ifindex: 7,
        }
    }

    #[test]
    fn the_lowest_free_address_of_the_range() {
        let c = cluster(vec![
            pod("n1", "a", None),
            pod("n1", "b", Some([10, 200, 1, 1])),
            pod("n2", "c", Some([10, 200, 1, 3])),
        ]);
        let h = [held("c9", "x", [10, 200, 1, 2])];
        assert_eq!(
            assign(&c, "n1", &h, &req("c1", "a")),
            Ok(Ipv4Addr::new(10, 200, 1, 4))
        );
    }

    #[test]
    fn only_pods_placed_here() {
        let c = cluster(vec![pod("n2", "a", None)]);
        let e = assign(&c, "n1", &[], &req("c1", "a")).unwrap_err();
        assert!(matches!(e, AssignError::OtherNode { .. }));
        assert!(e.to_string().contains("placed on node n2"), "{e}");
        let e = assign(&c, "n1", &[], &req("c1", "nope")).unwrap_err();
        assert!(matches!(e, AssignError::UnknownPod { .. }), "{e}");
    }

    #[test]
    fn one_container_a_pod_and_repeated_adds_keep_their_address() {
        let c = cluster(vec![pod("n1", "a", None)]);
        let h = [held("c1", "a", [10, 200, 1, 9])];
        assert_eq!(
            assign(&c, "n1", &h, &req("c1", "a")),
            Ok(Ipv4Addr::new(10, 200, 1, 9))
        );
        let e = assign(&c, "n1", &h, &req("c2", "a")).unwrap_err();
        assert!(matches!(e, AssignError::AlreadyRunning { .. }), "{e}");
    }

    #[test]
    fn no_range_and_a_full_range_are_refused() {
        let mut c = cluster(vec![pod("n1", "a", None)]);
        c.pod_ranges.clear();
        assert!(matches!(
            assign(&c, "n1", &[], &req("c1", "a")),
            Err(AssignError::NoPodRange { .. })
        ));
        let mut c = cluster(vec![
            pod("n1", "a", None),
            pod("n1", "b", Some([10, 200, 1, 1])),
            pod("n1", "d", Some([10, 200, 1, 2])),
        ]);
        c.pod_ranges
            .insert("n1".into(), Cidr::parse_prefix("10.200.1.0/30").unwrap());
        assert!(matches!(
            assign(&c, "n1", &[], &req("c1", "a")),
            Err(AssignError::RangeFull { .. })
        ));
    }

    #[test]
    fn held_endpoints_survive_a_restart_and_reach_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let c = cluster(vec![pod("n1", "a", None), pod("n1", "b", None)]);
        let store = CniEndpoints::open(dir.path()).unwrap();
        let a = store.add(&c, "n1", &req("c1", "a")).unwrap().unwrap();
        let mut r = req("c2", "b");
        r.host_veth = "mcdef".into();
        store.add(&c, "n1", &r).unwrap().unwrap();
        assert!(store.remove("c2", "eth0").unwrap().is_some());
        assert!(store.remove("c2", "eth0").unwrap().is_none());
        let again = CniEndpoints::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec![a.clone()]);
        let rx = again.source().watch();
        assert_eq!(*rx.borrow(), Ok(vec![a.local()]));
        // An interface gone while the agent was down: dropped at start.
        let gone = again.prune(|name, _| name != "mcabc").unwrap();
        assert_eq!(gone, vec![a]);
        assert_eq!(*rx.borrow(), Ok(vec![]));
        assert!(CniEndpoints::open(dir.path()).unwrap().list().is_empty());
        assert!(!interface_exists("mc-no-such-if", 1));
        assert!(interface_exists("lo", 1));
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let e = CniEndpoints::open(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("is damaged"), "{e:#}");
    }
}
