//! The CNI 1.0 contract (pure): the environment and network configuration a runtime gives, the
//! result and error documents the plugin prints. Spec: containernetworking/cni `SPEC.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The one version of the spec this plugin speaks.
pub const CNI_VERSION: &str = "1.0.0";

/// The agent's admin socket when the configuration names none.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/meshauth/agent-admin.sock";

/// The error codes of the spec this plugin uses (and its own, from 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 3: container unknown or does not exist.
    UnknownContainer = 3,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// 5: I/O failure.
    Io = 5,
    /// 6: failed to decode content.
    Decode = 6,
    /// 7: invalid network config.
    InvalidConfig = 7,
    /// 11: try again later.
    TryAgainLater = 11,
    /// 100: the agent refused the container (its pod is not placed on this node, ...).
    Refused = 100,
}

/// A CNI error: printed on stdout as the spec's error document, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// Its code.
    pub code: Code,
    /// One sentence.
    pub msg: String,
    /// More, if any.
    pub details: String,
}

impl CniError {
    /// An error of `code` saying `msg`.
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The spec's error document.
    pub fn document(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": CNI_VERSION,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }
}

/// The CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach it.
    Del,
    /// Check it is as ADD left it.
    Check,
    /// Say which versions the plugin speaks.
    Version,
}

/// What the runtime set in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// CNI_COMMAND.
    pub command: Command,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS (may be empty for DEL).
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS, as key/value pairs.
    pub args: BTreeMap<String, String>,
}

fn required(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(
            Code::InvalidEnvironment,
            format!("{name} is not set: the container runtime sets it (see the CNI spec)"),
        )
    })
}

/// Reads the invocation from `env` (the process environment, or a map in tests).
pub fn invocation(env: &dyn Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let command = match required(env, "CNI_COMMAND")?.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "VERSION" => Command::Version,
        other => {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!(
                    "CNI_COMMAND {other:?} is not one this plugin knows (ADD, DEL, CHECK, VERSION)"
                ),
            ));
        }
    };
    if command == Command::Version {
        return Ok(Invocation {
            command,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: BTreeMap::new(),
        });
    }
    let container_id = required(env, "CNI_CONTAINERID")?;
    let ifname = required(env, "CNI_IFNAME")?;
    // DEL may come after the namespace is gone; ADD and CHECK need it.
    let netns = match command {
        Command::Del => env("CNI_NETNS").unwrap_or_default(),
        _ => required(env, "CNI_NETNS")?,
    };
    let mut args = BTreeMap::new();
    for pair in env("CNI_ARGS").unwrap_or_default().split(';') {
        if pair.is_empty() {
            continue;
        }
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_ARGS has {pair:?}, not KEY=VALUE"),
            ));
        };
        args.insert(k.to_owned(), v.to_owned());
    }
    Ok(Invocation {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// The pod a container runs, `namespace/name`: `MESHAUTH_POD`, else kubelet's
/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` together (podman sets `K8S_POD_NAME` alone, to the
/// container's name, which names no pod).
pub fn pod(args: &BTreeMap<String, String>) -> Result<(String, String), CniError> {
    let bad = |what: String| {
        CniError::new(
            Code::InvalidEnvironment,
            format!(
                "{what}: set MESHAUTH_POD=namespace/name in CNI_ARGS (podman: `CNI_ARGS=MESHAUTH_POD=default/web podman run ...`), or K8S_POD_NAMESPACE and K8S_POD_NAME"
            ),
        )
    };
    let (ns, name) = if let Some(p) = args.get("MESHAUTH_POD") {
        match p.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => return Err(bad(format!("MESHAUTH_POD {p:?} is not namespace/name"))),
        }
    } else if let (Some(ns), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    {
        (ns.clone(), name.clone())
    } else {
        return Err(bad("no pod named for the container".into()));
    };
    // Whether such a pod exists (and runs here) is the agent's answer, by the control plane's
    // names; only an empty part is refused here.
    if ns.is_empty() || name.is_empty() {
        return Err(bad(format!(
            "pod {ns:?}/{name:?}: both the namespace and the name are needed"
        )));
    }
    Ok((ns, name))
}

/// The network configuration (stdin), the fields this plugin reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The spec version the runtime speaks.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The plugin's name.
    #[serde(rename = "type")]
    pub kind: String,
    /// The local agent's admin socket.
    #[serde(default, rename = "agent_socket")]
    pub agent_socket: Option<String>,
    /// What ADD returned (CHECK, DEL).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

/// Parses the network configuration and checks its version.
pub fn netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::Decode,
            format!("the network configuration on stdin is not valid: {e}"),
        )
    })?;
    if conf.cni_version != CNI_VERSION {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {:?} is not supported: this plugin speaks {CNI_VERSION} (set \"cniVersion\": \"{CNI_VERSION}\" in the network configuration)",
                conf.cni_version
            ),
        ));
    }
    if conf.name.is_empty() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "the network configuration has no \"name\"",
        ));
    }
    Ok(conf)
}

/// The VERSION document.
pub fn version_document() -> serde_json::Value {
    serde_json::json!({ "cniVersion": CNI_VERSION, "supportedVersions": [CNI_VERSION] })
}

/// An interface of the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    pub mac: String,
    /// The container's network namespace, for the container's interface.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address of the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpConfig {
    /// Address and prefix.
    pub address: String,
    /// The gateway.
    pub gateway: String,
    /// Index of the interface in `interfaces`.
    pub interface: usize,
}

/// A route of the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Destination prefix.
    pub dst: String,
    /// Next hop.
    pub gw: String,
}

/// The ADD result document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    /// The spec version.
    pub cni_version: String,
    /// The host side, then the container side.
    pub interfaces: Vec<Interface>,
    /// The container's address.
    pub ips: Vec<IpConfig>,
    /// Its routes.
    pub routes: Vec<Route>,
    /// No DNS settings (the runtime's own).
    pub dns: serde_json::Value,
}

/// The node side of a container's veth: `mc` and 12 hex digits of a hash of the container ID
/// and interface name (at most 15 characters, stable across calls, so DEL finds what ADD made).
pub fn host_veth(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64-bit: stable across Rust versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain(*b"/").chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("mc{:012x}", h >> 16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn add_needs_the_container_its_netns_and_ifname() {
        let e = invocation(&env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")])).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        let i = invocation(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;MESHAUTH_POD=default/web"),
        ]))
        .unwrap();
        assert_eq!(i.command, Command::Del);
        assert_eq!(pod(&i.args).unwrap(), ("default".into(), "web".into()));
        let e = invocation(&env(&[("CNI_COMMAND", "GC")])).unwrap_err();
        assert!(e.msg.contains("GC"), "{e}");
    }

    #[test]
    fn the_pod_comes_from_meshauth_pod_or_both_kubelet_args() {
        let args = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            pod(&args(&[
                ("K8S_POD_NAMESPACE", "prod"),
                ("K8S_POD_NAME", "db-0")
            ]))
            .unwrap(),
            ("prod".into(), "db-0".into())
        );
        // podman's K8S_POD_NAME alone (the container name) names no pod.
        let e = pod(&args(&[("K8S_POD_NAME", "vigilant_margulis")])).unwrap_err();
        assert!(e.msg.contains("MESHAUTH_POD"), "{e}");
        assert!(pod(&args(&[("MESHAUTH_POD", "web")])).is_err());
        assert!(pod(&args(&[("MESHAUTH_POD", "/web")])).is_err());
        assert!(pod(&args(&[("MESHAUTH_POD", "default/")])).is_err());
        // Pod names may hold dots, as the control plane's do.
        assert_eq!(
            pod(&args(&[("MESHAUTH_POD", "default/web.v1")])).unwrap(),
            ("default".into(), "web.v1".into())
        );
    }

    #[test]
    fn only_version_1_0_0_and_errors_are_spec_documents() {
        let e = netconf(br#"{"cniVersion":"0.4.0","name":"n","type":"meshauth-cni"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert_eq!(e.document()["code"], 1);
        assert_eq!(e.document()["cniVersion"], "1.0.0");
        assert_eq!(netconf(b"{").unwrap_err().code, Code::Decode);
        let c = netconf(
            br#"{"cniVersion":"1.0.0","name":"n","type":"meshauth-cni","agent_socket":"/a.sock"}"#,
        )
        .unwrap();
        assert_eq!(c.agent_socket.as_deref(), Some("/a.sock"));
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth("f5725c39a9ac", "eth0");
        assert_eq!(a, host_veth("f5725c39a9ac", "eth0"));
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, host_veth("f5725c39a9ac", "eth1"));
        assert_ne!(a, host_veth("f5725c39a9ad", "eth0"));
    }
}
