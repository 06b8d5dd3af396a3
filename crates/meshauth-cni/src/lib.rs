//! The meshauth CNI plugin (CNI 1.0): ADD makes a container's veth, asks the local agent (on its
//! admin socket) for an address of the node's pod range, for the pod `MESHAUTH_POD` names, and
//! configures the container once the agent enforces on the veth; DEL gives it back and removes
//! the veth; CHECK verifies both; VERSION says `1.0.0`.
//!
//! Fail closed: the node side of the veth stays down until the agent answers that its eBPF
//! programs are attached and the pod's policy written; a container whose pod the control plane
//! did not place on this node gets no network and the runtime shows the agent's reason.
//!
//! - [`spec`]: the environment, the configuration, results and errors (pure).
//! - [`link`]: the veth, through iproute2.

pub mod link;
pub mod spec;

use std::io::Read as _;
use std::net::Ipv4Addr;

use meshauth_proto::agent::agent_admin_client::AgentAdminClient;
use meshauth_proto::agent::{AddEndpointRequest, EndpointReply, EndpointRequest};
use spec::{AddResult, CniError, Code, Command, Interface, Invocation, IpConfig, NetConf, Route};

/// The largest network configuration read from stdin.
const STDIN_LIMIT: u64 = 1024 * 1024;
/// Longest a call to the agent may take (ADD waits up to 15 s for enforcement).
const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);

/// Runs the plugin: what it prints on stdout, and whether it succeeded.
pub fn run() -> (String, bool) {
    let env = |k: &str| std::env::var(k).ok();
    match dispatch(&env) {
        Ok(out) => (out, true),
        Err(e) => (e.document().to_string(), false),
    }
}

fn dispatch(env: &dyn Fn(&str) -> Option<String>) -> Result<String, CniError> {
    let inv = spec::invocation(env)?;
    if inv.command == Command::Version {
        return Ok(spec::version_document().to_string());
    }
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(STDIN_LIMIT)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::new(Code::Io, format!("cannot read stdin: {e}")))?;
    let conf = spec::netconf(&stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, format!("cannot start: {e}")))?;
    runtime.block_on(async {
        match inv.command {
            Command::Add => add(&inv, &conf).await,
            Command::Del => del(&inv, &conf).await.map(|()| String::new()),
            Command::Check => check(&inv, &conf).await.map(|()| String::new()),
            Command::Version => Ok(spec::version_document().to_string()),
        }
    })
}

type Client = AgentAdminClient<tonic::transport::Channel>;

async fn agent(conf: &NetConf) -> Result<Client, CniError> {
    let path = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| spec::DEFAULT_AGENT_SOCKET.to_owned());
    match meshauth_proto::uds::connect(std::path::Path::new(&path)).await {
        Ok(c) => Ok(AgentAdminClient::new(c)),
        Err(e) => Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "cannot reach the meshauth agent at {path} ({e}): is `meshauth agent run --cni` running on this node, and is \"agent_socket\" in the network configuration its --agent-socket?"
            ),
        )),
    }
}

/// The agent's refusal as a CNI error.
fn refused(what: &str, s: &tonic::Status) -> CniError {
    let code = match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Code::TryAgainLater,
        tonic::Code::InvalidArgument => Code::InvalidEnvironment,
        tonic::Code::NotFound => Code::UnknownContainer,
        _ => Code::Refused,
    };
    CniError::new(code, format!("{what}: {}", s.message()))
}

async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CniError> {
    match tokio::time::timeout(AGENT_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(refused(what, &s)),
        Err(_) => Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "{what}: the agent did not answer within {}s",
                AGENT_TIMEOUT.as_secs()
            ),
        )),
    }
}

fn parse_addr(what: &str, s: &str) -> Result<Ipv4Addr, CniError> {
    s.parse().map_err(|_| {
        CniError::new(
            Code::Refused,
            format!("the agent gave {what} {s:?}, not an IPv4 address"),
        )
    })
}

async fn add(inv: &Invocation, conf: &NetConf) -> Result<String, CniError> {
    let (namespace, name) = spec::pod(&inv.args)?;
    let mut client = agent(conf).await?;
    let host = spec::host_veth(&inv.container_id, &inv.ifname);
    let (host_link, container_link) = link::create(&host, &inv.ifname, &inv.netns)?;
    let attached = async {
        let reply = call(
            &format!("the agent refused pod {namespace}/{name}"),
            client.add_endpoint(AddEndpointRequest {
                container_id: inv.container_id.clone(),
                ifname: inv.ifname.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                host_veth: host.clone(),
                host_ifindex: host_link.index,
            }),
        )
        .await?;
        let address = parse_addr("the address", &reply.ipv4)?;
        let gateway = parse_addr("the gateway", &reply.gateway)?;
        let node_address = reply.node_address.parse::<Ipv4Addr>().ok();
        link::configure(
            &host,
            &inv.ifname,
            &inv.netns,
            address,
            gateway,
            node_address,
        )?;
        Ok::<_, CniError>((address, gateway))
    }
    .await;
    let (address, gateway) = match attached {
        Ok(a) => a,
        Err(e) => {
            // Leave nothing behind: no address held, no veth.
            let _ = client
                .delete_endpoint(EndpointRequest {
                    container_id: inv.container_id.clone(),
                    ifname: inv.ifname.clone(),
                })
                .await;
            let _ = link::delete(&host);
            return Err(e);
        }
    };
    let result = AddResult {
        cni_version: spec::CNI_VERSION.into(),
        interfaces: vec![
            Interface {
                name: host,
                mac: host_link.mac,
                sandbox: None,
            },
            Interface {
                name: inv.ifname.clone(),
                mac: container_link.mac,
                sandbox: Some(inv.netns.clone()),
            },
        ],
        ips: vec![IpConfig {
            address: format!("{address}/32"),
            gateway: gateway.to_string(),
            interface: 1,
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: gateway.to_string(),
        }],
        dns: serde_json::json!({}),
    };
    serde_json::to_string(&result)
        .map_err(|e| CniError::new(Code::Io, format!("cannot encode the result: {e}")))
}

async fn del(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let host = spec::host_veth(&inv.container_id, &inv.ifname);
    let released = match agent(conf).await {
        Ok(mut client) => call(
            "the agent could not release the container",
            client.delete_endpoint(EndpointRequest {
                container_id: inv.container_id.clone(),
                ifname: inv.ifname.clone(),
            }),
        )
        .await
        .map(|_| ()),
        Err(e) => Err(e),
    };
    // The veth goes either way (the container is going); an agent that could not be told
    // makes DEL fail, so the runtime calls it again and the agent lets the pod go.
    link::delete(&host)?;
    released
}

async fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let mut client = agent(conf).await?;
    let reply: EndpointReply = call(
        "the agent does not hold the container",
        client.check_endpoint(EndpointRequest {
            container_id: inv.container_id.clone(),
            ifname: inv.ifname.clone(),
        }),
    )
    .await?;
    let wrong = |msg: String| CniError::new(Code::Refused, msg);
    if !reply.enforced {
        return Err(wrong(format!(
            "the agent does not enforce on {} (pod {}/{}) now: see `meshauth status`",
            reply.host_veth, reply.namespace, reply.name
        )));
    }
    if !link::exists(&reply.host_veth) {
        return Err(wrong(format!(
            "the node side of the container's veth, {}, is gone",
            reply.host_veth
        )));
    }
    let want = format!("{}/32", reply.ipv4);
    let have = link::addresses(&inv.netns, &inv.ifname)?;
    if !have.contains(&want) {
        return Err(wrong(format!(
            "{} in the container has {have:?}, not {want}",
            inv.ifname
        )));
    }
    if let Some(prev) = &conf.prev_result {
        let listed = prev["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|ip| ip["address"] == want.as_str()));
        if !listed {
            return Err(wrong(format!(
                "prevResult does not list {want}, the address the agent holds for the container"
            )));
        }
    }
    Ok(())
}
