//! The agent's operator API on its admin socket (mode 0600): health, the SVIDs it holds, the
//! pairs it has authenticated.

use std::time::{SystemTime, UNIX_EPOCH};

use meshauth_proto::agent::agent_admin_server::AgentAdmin;
use meshauth_proto::agent::{
    AddEndpointRequest, AuthEntry, DeleteEndpointReply, EndpointReply, EndpointRequest, Flow,
    HealthRequest, HealthResponse, ListAuthRequest, ListAuthResponse, ListSvidsRequest,
    ListSvidsResponse, Svid, UnsignableEntry, WatchFlowsRequest,
};
use tonic::{Request, Response, Status};

use crate::manager::Manager;

/// The admin API over the manager.
#[derive(Debug, Clone)]
pub struct AdminApi {
    manager: Manager,
    node_name: String,
    auth: crate::enforce::AuthEntries,
    flows: crate::flows::FlowLog,
    readiness: meshauth_telemetry::Readiness,
    cni: Option<crate::cni::CniEndpoints>,
    enforced: tokio::sync::watch::Receiver<crate::cni::Enforced>,
    metrics: crate::metrics::Metrics,
    tunnel: crate::tunnel::TunnelStatus,
}

fn tunnel_msgs(status: &crate::tunnel::TunnelStatus) -> Vec<meshauth_proto::agent::Tunnel> {
    status
        .get()
        .map(|(_, peers)| peers)
        .unwrap_or_default()
        .into_iter()
        .map(|t| meshauth_proto::agent::Tunnel {
            node: t.name,
            state: match t.state {
                meshauth_tunnel::TunnelState::NoKey => "no_key",
                meshauth_tunnel::TunnelState::Handshaking => "handshaking",
                meshauth_tunnel::TunnelState::Up => "up",
            }
            .into(),
            endpoint: t.endpoint.to_string(),
            allowed_ips: u32::try_from(t.allowed).unwrap_or(u32::MAX),
            last_handshake_unix: t.last_handshake.map_or(0, unix),
            tx_bytes: t.tx_bytes,
            rx_bytes: t.rx_bytes,
            key_rotations: t.rotations,
            key_derived_unix: t.key.map_or(0, |k| unix(k.0)),
            key_expires_unix: t.key.map_or(0, |k| unix(k.1)),
            last_error: t.last_error.unwrap_or_default(),
        })
        .collect()
}

/// Longest the CNI plugin's ADD waits for enforcement to take its container's interface.
const ENFORCE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// Longest its DEL waits for enforcement to let the interface go.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl AdminApi {
    /// Serves `manager`'s state and what enforcement publishes (auth entries, flows).
    pub fn new(
        manager: Manager,
        node_name: String,
        auth: crate::enforce::AuthEntries,
        flows: crate::flows::FlowLog,
        readiness: meshauth_telemetry::Readiness,
    ) -> Self {
        AdminApi {
            manager,
            node_name,
            auth,
            flows,
            readiness,
            cni: None,
            enforced: tokio::sync::watch::channel(crate::cni::Enforced::default()).1,
            metrics: crate::metrics::Metrics::default(),
            tunnel: crate::tunnel::TunnelStatus::default(),
        }
    }

    /// Takes the CNI plugin's calls into `cni` (none: they are refused), answering once
    /// `enforced` says enforcement took or let go of an interface, and counting them in
    /// `metrics`.
    pub fn with_cni(
        mut self,
        cni: Option<crate::cni::CniEndpoints>,
        enforced: tokio::sync::watch::Receiver<crate::cni::Enforced>,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        self.cni = cni;
        self.enforced = enforced;
        self.metrics = metrics;
        self
    }

    /// Serves the tunnel's state in `Health` and `ListAuth` (encryption on).
    pub fn with_tunnel(mut self, tunnel: crate::tunnel::TunnelStatus) -> Self {
        self.tunnel = tunnel;
        self
    }

    /// Counts the outcome of a CNI call by its status.
    fn count<T>(
        &self,
        operation: crate::metrics::CniOperation,
        r: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        use crate::metrics::CniResult as R;
        let result = match &r {
            Ok(_) => R::Ok,
            Err(s) => match s.code() {
                tonic::Code::FailedPrecondition => R::Refused,
                tonic::Code::InvalidArgument => R::Invalid,
                tonic::Code::Unavailable => R::Unavailable,
                tonic::Code::NotFound => R::NotFound,
                _ => R::Failed,
            },
        };
        self.metrics.cni_request(operation, result);
        r
    }

    fn cni(&self) -> Result<&crate::cni::CniEndpoints, Status> {
        self.cni.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this agent does not take containers from the CNI plugin: run it with `meshauth agent run --cni`",
            )
        })
    }

    fn reply(&self, e: &crate::cni::CniEndpoint) -> EndpointReply {
        let enforced = self.enforced.borrow();
        EndpointReply {
            container_id: e.container_id.clone(),
            ifname: e.ifname.clone(),
            namespace: e.namespace.clone(),
            name: e.name.clone(),
            host_veth: e.host_veth.clone(),
            ipv4: e.ipv4.to_string(),
            gateway: crate::cni::GATEWAY.to_string(),
            node_address: enforced
                .node_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            enforced: enforced.pods.get(&e.pod()) == Some(&e.host_veth),
        }
    }

    /// Waits until `done` holds of what enforcement enforces on, or `limit` passed.
    async fn wait_enforced(
        &self,
        limit: std::time::Duration,
        done: impl Fn(&crate::cni::Enforced) -> bool,
    ) -> bool {
        let mut rx = self.enforced.clone();
        tokio::time::timeout(limit, rx.wait_for(|e| done(e)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// A container ID, interface and pod as the runtime gave them; one sentence if not.
fn parse_endpoint(r: &EndpointRequest) -> Result<(), Status> {
    let id_ok = !r.container_id.is_empty()
        && r.container_id.len() <= 256
        && r.container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !id_ok {
        return Err(Status::invalid_argument(
            "container_id must be 1 to 256 letters, digits, '_', '.' or '-' (CNI_CONTAINERID)",
        ));
    }
    if !valid_ifname(&r.ifname) {
        return Err(Status::invalid_argument(
            "ifname must be a Linux interface name: 1 to 15 characters, no '/', ':' or whitespace (CNI_IFNAME)",
        ));
    }
    Ok(())
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl AgentAdmin for AdminApi {
    async fn health(&self, _r: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let node = self.manager.node_svid();
        let snap = self.manager.subscribe().borrow().clone();
        Ok(Response::new(HealthResponse {
            node_name: self.node_name.clone(),
            node_id: node.node_id,
            spiffe_id: node.spiffe_id.to_string(),
            node_svid_serial: node.serial.clone(),
            node_svid_expires_at_unix: unix(node.not_after),
            server_connected: snap.connected,
            server: self.manager.current_server().to_string(),
            bundle_sequence: snap.bundle.as_ref().map(|b| b.sequence).unwrap_or(0),
            entries: snap.entries.len() as u32,
            svids: snap.svids.len() as u32,
            ready: self.readiness.is_ready(),
            not_ready: self
                .readiness
                .not_ready()
                .into_iter()
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect(),
            unsignable_entries: snap
                .unsignable
                .values()
                .map(|u| {
                    format!(
                        "{} (entry {}): {}",
                        u.entry.spiffe_id, u.entry.id, u.message
                    )
                })
                .collect(),
            encryption: self.tunnel.get().is_some(),
            encryption_backend: self
                .tunnel
                .get()
                .map(|(b, _)| crate::tunnel::backend_name(b).to_owned())
                .unwrap_or_default(),
            tunnels: tunnel_msgs(&self.tunnel),
        }))
    }

    async fn list_auth(
        &self,
        _r: Request<ListAuthRequest>,
    ) -> Result<Response<ListAuthResponse>, Status> {
        let snap = self.manager.subscribe().borrow().clone();
        let cluster = snap.cluster.clone().unwrap_or_default();
        let labels = |id: meshauth_policy::IdentityId| {
            cluster
                .identities
                .get(&id)
                .map(|l| {
                    l.iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let node_name = |id: meshauth_policy::NodeId| {
            cluster
                .nodes
                .iter()
                .find(|(_, (n, _))| *n == id)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| format!("node-{id}"))
        };
        Ok(Response::new(ListAuthResponse {
            node: self.node_name.clone(),
            entries: self
                .auth
                .get()
                .into_iter()
                .map(|(k, exp)| AuthEntry {
                    local_identity: k.local.get(),
                    local_labels: labels(k.local),
                    remote_identity: k.remote.get(),
                    remote_labels: labels(k.remote),
                    remote_node: node_name(k.remote_node),
                    expires_at_unix: unix(exp),
                    connection: k.connection.map(|c| c.to_string()).unwrap_or_default(),
                })
                .collect(),
            tunnels: tunnel_msgs(&self.tunnel),
        }))
    }

    type WatchFlowsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Flow, Status>> + Send>>;

    async fn watch_flows(
        &self,
        r: Request<WatchFlowsRequest>,
    ) -> Result<Response<Self::WatchFlowsStream>, Status> {
        let (past, mut rx) = self.flows.snapshot_and_follow();
        let follow = r.get_ref().follow;
        let (tx, out) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for f in past {
                if tx.send(Ok(f)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(f) => {
                        if tx.send(Ok(f)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "a flow follower fell behind");
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_svids(
        &self,
        _r: Request<ListSvidsRequest>,
    ) -> Result<Response<ListSvidsResponse>, Status> {
        let snap = self.manager.subscribe().borrow().clone();
        Ok(Response::new(ListSvidsResponse {
            svids: snap
                .svids
                .values()
                .map(|s| Svid {
                    spiffe_id: s.entry.spiffe_id.to_string(),
                    entry_id: s.entry.id.clone(),
                    serial: s.serial.clone(),
                    expires_at_unix: unix(s.not_after),
                    selectors: s.entry.selectors.iter().cloned().collect(),
                })
                .collect(),
            unsignable: snap
                .unsignable
                .values()
                .map(|u| UnsignableEntry {
                    spiffe_id: u.entry.spiffe_id.to_string(),
                    entry_id: u.entry.id.clone(),
                    selectors: u.entry.selectors.iter().cloned().collect(),
                    reason: u.reason.clone(),
                    message: u.message.clone(),
                    refused_at_unix: unix(u.refused_at),
                })
                .collect(),
        }))
    }

    async fn add_endpoint(
        &self,
        r: Request<AddEndpointRequest>,
    ) -> Result<Response<EndpointReply>, Status> {
        let r = self.add(r.into_inner()).await;
        self.count(crate::metrics::CniOperation::Add, r)
    }

    async fn delete_endpoint(
        &self,
        r: Request<EndpointRequest>,
    ) -> Result<Response<DeleteEndpointReply>, Status> {
        let r = self.delete(r.into_inner()).await;
        self.count(crate::metrics::CniOperation::Delete, r)
    }

    async fn check_endpoint(
        &self,
        r: Request<EndpointRequest>,
    ) -> Result<Response<EndpointReply>, Status> {
        let r = self.check(&r.into_inner());
        self.count(crate::metrics::CniOperation::Check, r)
    }
}

impl AdminApi {
    async fn add(&self, r: AddEndpointRequest) -> Result<Response<EndpointReply>, Status> {
        let cni = self.cni()?;
        parse_endpoint(&EndpointRequest {
            container_id: r.container_id.clone(),
            ifname: r.ifname.clone(),
        })?;
        // The pod's name is checked by looking it up in the cluster view (`cni::assign`).
        if meshauth_policy::labels::check_namespace(&r.namespace).is_err() || r.name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "pod {:?}/{:?}: the namespace must be a DNS-1123 label and the name not empty (set MESHAUTH_POD=namespace/name in CNI_ARGS)",
                r.namespace, r.name
            )));
        }
        if !valid_ifname(&r.host_veth) || r.host_ifindex == 0 {
            return Err(Status::invalid_argument(
                "host_veth must name the node side of the container's veth, with its index",
            ));
        }
        let snap = self.manager.subscribe().borrow().clone();
        let Some(cluster) = snap.cluster.clone() else {
            return Err(Status::unavailable(
                "the agent has not synced with the server yet: try again",
            ));
        };
        let req = crate::cni::AddRequest {
            container_id: r.container_id,
            ifname: r.ifname,
            namespace: r.namespace,
            name: r.name,
            host_veth: r.host_veth,
            host_ifindex: r.host_ifindex,
        };
        let endpoint = match cni.add(&cluster, &self.node_name, &req) {
            Ok(Ok(e)) => e,
            Ok(Err(refused)) => {
                tracing::warn!(
                    container = %req.container_id,
                    pod = %format!("{}/{}", req.namespace, req.name),
                    reason = %refused,
                    "container refused: no network"
                );
                return Err(Status::failed_precondition(refused.to_string()));
            }
            Err(e) => return Err(Status::internal(format!("{e:#}"))),
        };
        let (pod, iface) = (endpoint.pod(), endpoint.host_veth.clone());
        if !self
            .wait_enforced(ENFORCE_WAIT, |e| e.pods.get(&pod) == Some(&iface))
            .await
        {
            // Not enforced: give the address back; the plugin removes the veth.
            let _ = cni.remove(&endpoint.container_id, &endpoint.ifname);
            let why = self
                .readiness
                .not_ready()
                .into_iter()
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(container = %endpoint.container_id, pod = %pod, reason = %why, "container refused: not enforced in time");
            return Err(Status::unavailable(format!(
                "enforcement did not take pod {pod} on {iface} within {}s ({}): try again",
                ENFORCE_WAIT.as_secs(),
                if why.is_empty() {
                    "no reason given"
                } else {
                    &why
                }
            )));
        }
        tracing::info!(container = %endpoint.container_id, pod = %pod, ip = %endpoint.ipv4, iface = %iface, "container added");
        Ok(Response::new(self.reply(&endpoint)))
    }

    async fn delete(&self, r: EndpointRequest) -> Result<Response<DeleteEndpointReply>, Status> {
        let cni = self.cni()?;
        parse_endpoint(&r)?;
        let gone = cni
            .remove(&r.container_id, &r.ifname)
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let Some(gone) = gone else {
            return Ok(Response::new(DeleteEndpointReply { existed: false }));
        };
        let (pod, iface) = (gone.pod(), gone.host_veth.clone());
        if !self
            .wait_enforced(RELEASE_WAIT, |e| e.pods.get(&pod) != Some(&iface))
            .await
        {
            return Err(Status::unavailable(format!(
                "enforcement still holds pod {pod} on {iface} after {}s: try again",
                RELEASE_WAIT.as_secs()
            )));
        }
        tracing::info!(container = %gone.container_id, pod = %pod, "container deleted");
        Ok(Response::new(DeleteEndpointReply { existed: true }))
    }

    fn check(&self, r: &EndpointRequest) -> Result<Response<EndpointReply>, Status> {
        let cni = self.cni()?;
        parse_endpoint(r)?;
        let e = cni.get(&r.container_id, &r.ifname).ok_or_else(|| {
            Status::not_found(format!(
                "the agent holds no interface {} of container {}",
                r.ifname, r.container_id
            ))
        })?;
        Ok(Response::new(self.reply(&e)))
    }
}
