//! The lab: a cluster on one machine, built from network namespaces.
//!
//! ```text
//!   <lab>-ul   underlay namespace, bridge br0
//!     ├─ n1 ── eth0 in <lab>-n1  10.199.0.1/24, pods 10.200.1.0/24
//!     └─ n2 ── eth0 in <lab>-n2  10.199.0.2/24, pods 10.200.2.0/24
//!   <lab>-<pod>  eth0 10.200.<n>.<k>/32, default via 169.254.1.1 = the node side lxc<k>
//! ```
//!
//! Nodes route each other's pod ranges over the underlay; a pod's veth peer in its node (`lxc<k>`)
//! holds 169.254.1.1/32 as the pod's gateway and a /32 route to the pod, so every packet of a
//! pod crosses the node side of its veth, where the datapath attaches. The root namespace is
//! never touched. Pod names resolve through `/etc/netns/<pod namespace>/hosts`, which
//! `ip netns exec` mounts over `/etc/hosts`.
//!
//! Everything is named with the lab's prefix, recorded in `/run/meshauth-lab/<lab>.json`, and
//! removed by [`Lab::down`], which also works after a crash: it deletes whatever carries the
//! prefix, state file or not. Commands are `ip` (iproute2) and `sysctl` run inside the
//! namespaces.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Where lab state files live.
pub const STATE_DIR: &str = "/run/meshauth-lab";
/// The underlay address reserved for a server (in the underlay namespace, on the bridge).
pub const SERVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 254);

/// Where the datapath pins maps, per node namespace (`<lab>-<node>`).
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/meshauth";

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab name is unusable.
    #[error("invalid lab name {0:?}: use 1 to 8 lowercase letters or digits")]
    InvalidName(String),
    /// A pod or node name is unusable.
    #[error(
        "invalid {what} name {name:?}: use 1 to 24 characters of [a-z0-9-], starting with a letter"
    )]
    InvalidObjectName {
        /// Pod or node.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A namespace name is unusable.
    #[error(
        "invalid namespace {0:?}: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    InvalidNamespace(String),
    /// A label is malformed.
    #[error("invalid label {0:?}: expected key=value")]
    InvalidLabel(String),
    /// Not root.
    #[error("the lab needs root (network namespaces, veths, sysctls): run as root")]
    NotRoot,
    /// The lab is already up.
    #[error("lab {0} is already up: `meshauth lab down` first, or pick another --name")]
    AlreadyUp(String),
    /// The lab is not up.
    #[error("lab {0} is not up: run `meshauth lab up` first")]
    NotUp(String),
    /// No such node.
    #[error("no node {node} in lab {lab} (nodes: {known})")]
    NoNode {
        /// The lab.
        lab: String,
        /// The node asked for.
        node: String,
        /// The nodes there are.
        known: String,
    },
    /// No such pod.
    #[error("no pod {pod} in lab {lab}")]
    NoPod {
        /// The lab.
        lab: String,
        /// The pod.
        pod: String,
    },
    /// The pod exists.
    #[error("pod {0} already exists")]
    PodExists(String),
    /// Too many nodes or pods for the address plan.
    #[error("{0}")]
    Capacity(&'static str),
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// The state file could not be used.
    #[error("lab state {path}: {detail}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, LabError>;

/// A node of the lab.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// `n1`, `n2`, ...
    pub name: String,
    /// 1-based.
    pub index: u8,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the underlay.
    pub underlay_ip: Ipv4Addr,
    /// First address of its pod range (a /24).
    pub pod_cidr: Ipv4Addr,
}

/// The namespace of a pod added without one (and of pods in state files from before
/// namespaces).
pub const DEFAULT_NAMESPACE: &str = "default";

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// A pod of the lab.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pod {
    /// Its name (unique in the lab, whatever its namespace: it names the pod's network
    /// namespace and resolves from every pod).
    pub name: String,
    /// Its Kubernetes-style namespace (part of its identity once the control plane places it
    /// there: `meshauth pod create --namespace`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Its node.
    pub node: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The node side of its veth (in the node's namespace).
    pub host_veth: String,
    /// That interface's index in the node's namespace.
    pub host_ifindex: u32,
}

/// Everything a lab holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabState {
    /// Nodes, in order.
    pub nodes: Vec<Node>,
    /// Pods, in order of creation.
    pub pods: Vec<Pod>,
}

/// A lab, by name (the prefix of everything it creates).
#[derive(Debug, Clone)]
pub struct Lab {
    name: String,
}

fn valid_object(what: &'static str, name: &str) -> Result<()> {
    let ok = (1..=24).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidObjectName {
            what,
            name: name.to_owned(),
        })
    }
}

fn valid_namespace(namespace: &str) -> Result<()> {
    let b = namespace.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidNamespace(namespace.to_owned()))
    }
}

/// Parses `key=value` labels.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        for part in item.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| LabError::InvalidLabel(part.to_owned()))?;
            if k.is_empty() {
                return Err(LabError::InvalidLabel(part.to_owned()));
            }
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    Ok(out)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().map_err(|e| LabError::Command {
        cmd: format!("{cmd:?}"),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{cmd:?}").replace('"', ""),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether this process can build labs (root).
pub fn can_run() -> bool {
    is_root()
}

/// The network namespaces that exist now.
fn netns_list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

impl Lab {
    /// A lab named `name` (1 to 8 lowercase letters or digits).
    pub fn new(name: &str) -> Result<Lab> {
        if name.is_empty()
            || name.len() > 8
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(LabError::InvalidName(name.to_owned()));
        }
        Ok(Lab {
            name: name.to_owned(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn state_path(&self) -> PathBuf {
        PathBuf::from(STATE_DIR).join(format!("{}.json", self.name))
    }

    fn prefix(&self) -> String {
        format!("{}-", self.name)
    }

    /// The underlay namespace.
    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.name)
    }

    /// The state, if the lab is up.
    pub fn state(&self) -> Result<Option<LabState>> {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| LabError::State {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::State {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
        }
    }

    fn save(&self, state: &LabState) -> Result<()> {
        let path = self.state_path();
        let err = |e: &dyn std::fmt::Display| LabError::State {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(STATE_DIR).map_err(|e| err(&e))?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| err(&e))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&e))
    }

    fn require(&self) -> Result<LabState> {
        self.state()?
            .ok_or_else(|| LabError::NotUp(self.name.clone()))
    }

    /// Builds `nodes` nodes on an underlay bridge.
    pub fn up(&self, nodes: u8) -> Result<LabState> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        if !(1..=50).contains(&nodes) {
            return Err(LabError::Capacity("a lab has 1 to 50 nodes"));
        }
        if self.state()?.is_some() || netns_list()?.iter().any(|n| n.starts_with(&self.prefix())) {
            return Err(LabError::AlreadyUp(self.name.clone()));
        }
        let result = self.build(nodes);
        if result.is_err() {
            // Leave nothing half-built behind.
            let _ = self.down();
        }
        result
    }

    fn build(&self, nodes: u8) -> Result<LabState> {
        let ul = self.underlay_netns();
        ip(&["netns", "add", &ul])?;
        ip(&["-n", &ul, "link", "set", "lo", "up"])?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        // The address a lab server listens on, reachable from every node.
        ip(&[
            "-n",
            &ul,
            "addr",
            "add",
            &format!("{SERVER_ADDRESS}/24"),
            "dev",
            "br0",
        ])?;
        let mut state = LabState::default();
        for i in 1..=nodes {
            let name = format!("n{i}");
            let netns = format!("{}{name}", self.prefix());
            ip(&["netns", "add", &netns])?;
            ip(&[
                "-n", &ul, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ])?;
            ip(&["-n", &ul, "link", "set", &name, "master", "br0", "up"])?;
            let underlay_ip = Ipv4Addr::new(10, 199, 0, i);
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{underlay_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            in_ns(&netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            state.nodes.push(Node {
                name,
                index: i,
                netns,
                underlay_ip,
                pod_cidr: Ipv4Addr::new(10, 200, i, 0),
            });
        }
        for a in &state.nodes {
            for b in state.nodes.iter().filter(|b| b.index != a.index) {
                ip(&[
                    "-n",
                    &a.netns,
                    "route",
                    "add",
                    &format!("{}/24", b.pod_cidr),
                    "via",
                    &b.underlay_ip.to_string(),
                ])?;
            }
        }
        self.save(&state)?;
        tracing::info!(lab = %self.name, nodes, "lab up");
        Ok(state)
    }

    /// Adds pod `name` on `node` with `labels`, in namespace `default`.
    pub fn add_pod(&self, name: &str, node: &str, labels: BTreeMap<String, String>) -> Result<Pod> {
        self.add_pod_in(DEFAULT_NAMESPACE, name, node, labels)
    }

    /// Adds pod `name` of namespace `namespace` (a DNS-1123 label) on `node` with `labels`.
    /// Pod names are unique in the lab across namespaces.
    pub fn add_pod_in(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Pod> {
        valid_namespace(namespace)?;
        valid_object("pod", name)?;
        let mut state = self.require()?;
        if state.pods.iter().any(|p| p.name == name) {
            return Err(LabError::PodExists(name.to_owned()));
        }
        let n = state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .cloned()
            .ok_or_else(|| LabError::NoNode {
                lab: self.name.clone(),
                node: node.to_owned(),
                known: state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        // Pod k of a node gets 10.200.<node>.<10 + k> and lxc<k>; k never repeats on a node.
        let used: Vec<u8> = state
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| p.ip.octets()[3])
            .collect();
        let host = (10..=250u8)
            .find(|h| !used.contains(h))
            .ok_or(LabError::Capacity("a node holds at most 241 pods"))?;
        let ip_addr = Ipv4Addr::new(10, 200, n.index, host);
        let netns = format!("{}{name}", self.prefix());
        let host_veth = format!("lxc{host}");
        ip(&["netns", "add", &netns])?;
        let result = (|| -> Result<Pod> {
            ip(&[
                "-n", &n.netns, "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                "169.254.1.1/32",
                "dev",
                &host_veth,
            ])?;
            ip(&["-n", &n.netns, "link", "set", &host_veth, "up"])?;
            // `src`: what the node itself sends its pod leaves from the node's address (the
            // `host` entity), not from the pod's gateway.
            ip(&[
                "-n",
                &n.netns,
                "route",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                &host_veth,
                "src",
                &n.underlay_ip.to_string(),
            ])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip_addr}/32"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            let out = ip(&["-n", &n.netns, "-o", "link", "show", &host_veth])?;
            let host_ifindex = String::from_utf8_lossy(&out.stdout)
                .split(':')
                .next()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| LabError::Command {
                    cmd: format!("ip -n {} link show {host_veth}", n.netns),
                    stderr: "no interface index in the output".into(),
                })?;
            Ok(Pod {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                node: node.to_owned(),
                netns: netns.clone(),
                ip: ip_addr,
                labels,
                host_veth: host_veth.clone(),
                host_ifindex,
            })
        })();
        let pod = match result {
            Ok(p) => p,
            Err(e) => {
                let _ = ip(&["netns", "del", &netns]);
                let _ = ip(&["-n", &n.netns, "link", "del", &host_veth]);
                return Err(e);
            }
        };
        state.pods.push(pod.clone());
        self.write_hosts(&state)?;
        self.save(&state)?;
        tracing::info!(lab = %self.name, pod = %name, node, ip = %ip_addr, "pod added");
        Ok(pod)
    }

    /// Removes a pod (its namespace and veth).
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let mut state = self.require()?;
        let idx = state
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| LabError::NoPod {
                lab: self.name.clone(),
                pod: name.to_owned(),
            })?;
        let pod = state.pods.remove(idx);
        ip(&["netns", "del", &pod.netns])?;
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&pod.netns));
        self.write_hosts(&state)?;
        self.save(&state)
    }

    fn write_hosts(&self, state: &LabState) -> Result<()> {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for p in &state.pods {
            hosts.push_str(&format!("{} {}\n", p.ip, p.name));
        }
        for p in &state.pods {
            let dir = PathBuf::from("/etc/netns").join(&p.netns);
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("hosts"), &hosts))
                .map_err(|e| LabError::State {
                    path: dir.display().to_string(),
                    detail: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// A command run inside network namespace `netns` (a node's or the underlay's) and
    /// nothing else: unlike `ip netns exec`, `nsenter --net` keeps the host's mount namespace,
    /// so an agent started this way pins its BPF objects in the host's bpffs, where they
    /// outlive the agent and a restarted agent finds them.
    pub fn exec_in(&self, netns: &str, argv: &[String]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(argv);
        cmd
    }

    /// A command run inside `pod`'s network namespace (not started).
    pub fn exec(&self, pod: &str, argv: &[String]) -> Result<Command> {
        let state = self.require()?;
        let p = state
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| LabError::NoPod {
                lab: self.name.clone(),
                pod: pod.to_owned(),
            })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &p.netns]).args(argv);
        Ok(cmd)
    }

    /// What exists now: the recorded state and the namespaces carrying the prefix.
    pub fn status(&self) -> Result<(Option<LabState>, Vec<String>)> {
        let prefix = self.prefix();
        let live = netns_list()?
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        Ok((self.state()?, live))
    }

    /// Removes everything carrying the prefix: processes left in its namespaces, the namespaces
    /// (and with them every veth and the bridge), hosts files, pinned BPF objects of its nodes, the state file. Idempotent.
    pub fn down(&self) -> Result<()> {
        let prefix = self.prefix();
        let mut first_error = None;
        for ns in netns_list()?.into_iter().filter(|n| n.starts_with(&prefix)) {
            // Processes left in the namespace (servers, agents) would keep it alive unseen.
            if let Ok(out) = ip(&["netns", "pids", &ns]) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").arg(pid).status();
                }
            }
            if let Err(e) = ip(&["netns", "del", &ns]) {
                first_error.get_or_insert(e);
            }
        }
        for dir in [PathBuf::from("/etc/netns"), PathBuf::from(BPF_PIN_ROOT)] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let _ = std::fs::remove_file(self.state_path());
        tracing::info!(lab = %self.name, "lab down");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(Lab::new("ma").is_ok());
        for bad in ["", "Ma", "a-b", "toolongname"] {
            assert!(Lab::new(bad).is_err(), "{bad:?}");
        }
        assert!(valid_object("pod", "client1").is_ok());
        assert!(valid_object("pod", "1client").is_err());
        let l = parse_labels(&["app=x,tier=web".into(), "k8s:team=a".into()]).unwrap();
        assert_eq!(l.get("app").map(String::as_str), Some("x"));
        assert_eq!(l.get("k8s:team").map(String::as_str), Some("a"));
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["=x".into()]).is_err());
    }
}
