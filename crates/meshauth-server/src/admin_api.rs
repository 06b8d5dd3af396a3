//! The operator gRPC service (`meshauth.v1.admin.Admin`) on the local admin socket.
//!
//! Access control is the socket's file mode (0600, owner only), as for SPIRE's admin socket.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_datastore::{EntryFilter, EntryId, NewEntry, NodeName, NodeRecord, Selector};
use meshauth_proto::admin::admin_server::Admin;
use meshauth_proto::admin::{
    Agent, AgentRequest, ApplyPoliciesRequest, ApplyPoliciesResponse, Authority,
    CreateJoinTokenRequest, CreatePodRequest, DeleteEntryResponse, DeletePodResponse,
    DeletePolicyRequest, DeletePolicyResponse, EntryRequest, EvictAgentResponse, GetBundleRequest,
    HealthRequest, HealthResponse, JoinToken, ListAgentsRequest, ListAgentsResponse,
    ListEndpointsRequest, ListEndpointsResponse, ListEntriesRequest, ListEntriesResponse,
    ListIdentitiesRequest, ListIdentitiesResponse, ListPoliciesRequest, ListPoliciesResponse,
    NodeSpec as NodeSpecMsg, PodRequest, RegisterNodeRequest,
};
use meshauth_proto::node::{Bundle, Entry, PolicyDocument};
use meshauth_spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use crate::node_api::{bundle_msg, endpoint_msg, entry_msg, identity_msg, status_of, unix};
use crate::registry::{Registry, RegistryError};

/// The admin API over a shared registry.
#[derive(Debug, Clone)]
pub struct AdminApi {
    registry: Arc<Registry>,
}

impl AdminApi {
    /// Serves `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        AdminApi { registry }
    }

    fn agent_msg(&self, n: &NodeRecord) -> Agent {
        Agent {
            node_name: n.name.to_string(),
            node_id: n.node_id.get(),
            spiffe_id: meshauth_spiffe::node_spiffe_id(
                &self.registry.config().trust_domain,
                n.name.as_str(),
            )
            .map(|id| id.to_string())
            .unwrap_or_default(),
            serial: n.serial.clone(),
            expires_at_unix: unix(n.svid_not_after),
            banned: n.banned,
            attested_at_unix: unix(n.attested_at),
            attestation: n.attestation.as_str().to_owned(),
            can_reattest: n.attestation.can_reattest(),
        }
    }
}

/// A stored policy as the API shows it: its key, document and namespace.
/// Each node's ID by name.
fn node_ids(
    nodes: &[meshauth_datastore::NodeRecord],
) -> std::collections::HashMap<meshauth_datastore::NodeName, u32> {
    nodes
        .iter()
        .map(|n| (n.name.clone(), n.node_id.get()))
        .collect()
}

pub(crate) fn policy_document(key: String, yaml: String) -> PolicyDocument {
    let namespace = key
        .split_once('/')
        .map(|(ns, _)| ns.to_owned())
        .unwrap_or_default();
    PolicyDocument {
        name: key,
        yaml,
        namespace,
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn node_name(s: &str) -> Result<NodeName, Status> {
    s.parse().map_err(invalid)
}

fn entry_id(s: &str) -> Result<EntryId, Status> {
    s.parse().map_err(invalid)
}

fn spiffe_id(what: &str, s: &str) -> Result<SpiffeId, Status> {
    s.parse::<SpiffeId>()
        .map_err(|e| Status::invalid_argument(format!("{what} {s:?} is not a SPIFFE ID: {e}")))
}

fn selectors(list: &[meshauth_proto::node::Selector]) -> Result<Vec<Selector>, Status> {
    list.iter()
        .map(|s| Selector::new(&s.r#type, &s.value).map_err(invalid))
        .collect()
}

/// The entry of a create or update request. On the wire a TTL of 0 means the server's default
/// (proto3 cannot tell it from "not set"); a negative one is refused here, and the registry
/// bounds the rest (1 s to the CA lifetime).
fn new_entry(e: &Entry) -> Result<NewEntry, Status> {
    let ttl = match u64::try_from(e.x509_svid_ttl_seconds) {
        Ok(0) => None,
        Ok(s) => Some(Duration::from_secs(s)),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "X509-SVID TTL of {}s is out of range: it must be positive (0 means the server's default)",
                e.x509_svid_ttl_seconds
            )));
        }
    };
    Ok(NewEntry {
        spiffe_id: spiffe_id("spiffe ID", &e.spiffe_id)?,
        parent_id: spiffe_id("parent ID", &e.parent_id)?,
        selectors: selectors(&e.selectors)?,
        x509_svid_ttl: ttl,
        dns_names: e.dns_names.clone(),
    })
}

/// Parses an optional node address and pod range (empty: none).
fn node_binding(
    address: &str,
    pod_range: &str,
) -> Result<
    (
        Option<std::net::IpAddr>,
        Option<meshauth_datastore::Ipv4Range>,
    ),
    Status,
> {
    let address = match address {
        "" => None,
        a => Some(a.parse().map_err(|_| {
            Status::invalid_argument(format!("{a:?} is not an IP address (use e.g. 10.199.0.1)"))
        })?),
    };
    let range = match pod_range {
        "" => None,
        r => Some(r.parse().map_err(|e: String| Status::invalid_argument(e))?),
    };
    Ok((address, range))
}

fn status(e: RegistryError) -> Status {
    status_of(e)
}

impl AdminApi {
    /// Runs `f` on the registry off the async runtime (the store blocks: SQLite, etcd).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, Status> {
        let registry = Arc::clone(&self.registry);
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "a registry call panicked or was cancelled");
                Status::internal("the server failed to answer this call; retry")
            })?
            .map_err(status)
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn health(&self, _r: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let now = SystemTime::now();
        let bundle = self.registry.bundle(now);
        Ok(Response::new(HealthResponse {
            trust_domain: self.registry.config().trust_domain.to_string(),
            bundle_sequence: bundle.sequence,
            authorities: self
                .registry
                .authorities()
                .into_iter()
                .map(|a| Authority {
                    state: a.state.to_string(),
                    serial: a.serial,
                    not_after_unix: unix(a.not_after),
                })
                .collect(),
            agents: self.blocking(|r| r.nodes()).await?.len() as u32,
            entries: self.blocking(|r| r.count_entries()).await? as u32,
            datastore: self.registry.datastore_kind().to_owned(),
            leader: self.registry.is_leader(),
        }))
    }

    async fn create_join_token(
        &self,
        r: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let r = r.into_inner();
        let node = node_name(&r.node_name)?;
        let ttl = match r.ttl_seconds {
            0 => None,
            s if s < 0 => return Err(Status::invalid_argument("token TTL must be positive")),
            s => Some(Duration::from_secs(s as u64)),
        };
        if !r.address.is_empty() || !r.pod_range.is_empty() {
            let (address, range) = node_binding(&r.address, &r.pod_range)?;
            let n = node.clone();
            self.blocking(move |reg| reg.register_node(&n, address, range))
                .await?;
        }
        let t = self
            .blocking(move |reg| reg.create_join_token(&node, ttl, SystemTime::now()))
            .await?;
        Ok(Response::new(JoinToken {
            token: t.token,
            node_name: t.node.to_string(),
            expires_at_unix: unix(t.expires_at),
        }))
    }

    async fn list_agents(
        &self,
        _r: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let nodes = self.blocking(|r| r.nodes()).await?;
        Ok(Response::new(ListAgentsResponse {
            agents: nodes.iter().map(|n| self.agent_msg(n)).collect(),
        }))
    }

    async fn get_agent(&self, r: Request<AgentRequest>) -> Result<Response<Agent>, Status> {
        let node = node_name(&r.get_ref().node_name)?;
        let n = self.blocking(move |reg| reg.node(&node)).await?;
        Ok(Response::new(self.agent_msg(&n)))
    }

    async fn ban_agent(&self, r: Request<AgentRequest>) -> Result<Response<Agent>, Status> {
        let node = node_name(&r.get_ref().node_name)?;
        let n = self.blocking(move |reg| reg.ban_node(&node)).await?;
        Ok(Response::new(self.agent_msg(&n)))
    }

    async fn evict_agent(
        &self,
        r: Request<AgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let node = node_name(&r.get_ref().node_name)?;
        self.blocking(move |reg| reg.evict_node(&node)).await?;
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn create_entry(&self, r: Request<Entry>) -> Result<Response<Entry>, Status> {
        let new = new_entry(r.get_ref())?;
        let e = self.blocking(move |reg| reg.create_entry(new)).await?;
        Ok(Response::new(entry_msg(&e)))
    }

    async fn update_entry(&self, r: Request<Entry>) -> Result<Response<Entry>, Status> {
        let id = entry_id(&r.get_ref().id)?;
        let new = new_entry(r.get_ref())?;
        let e = self.blocking(move |reg| reg.update_entry(&id, new)).await?;
        Ok(Response::new(entry_msg(&e)))
    }

    async fn delete_entry(
        &self,
        r: Request<EntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        let id = entry_id(&r.get_ref().id)?;
        self.blocking(move |reg| reg.delete_entry(&id)).await?;
        Ok(Response::new(DeleteEntryResponse {}))
    }

    async fn get_entry(&self, r: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        let id = entry_id(&r.get_ref().id)?;
        let e = self.blocking(move |reg| reg.entry(&id)).await?;
        Ok(Response::new(entry_msg(&e)))
    }

    async fn list_entries(
        &self,
        r: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let r = r.into_inner();
        let filter = EntryFilter {
            spiffe_id: (!r.spiffe_id.is_empty())
                .then(|| spiffe_id("spiffe ID", &r.spiffe_id))
                .transpose()?,
            parent_id: (!r.parent_id.is_empty())
                .then(|| spiffe_id("parent ID", &r.parent_id))
                .transpose()?,
            selectors: selectors(&r.selectors)?,
        };
        let entries = self.blocking(move |reg| reg.entries(&filter)).await?;
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(entry_msg).collect(),
        }))
    }

    async fn apply_policies(
        &self,
        r: Request<ApplyPoliciesRequest>,
    ) -> Result<Response<ApplyPoliciesResponse>, Status> {
        let r = r.into_inner();
        let keys = self
            .blocking(move |reg| {
                let namespace = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
                reg.apply_policies(&r.yaml, namespace)
            })
            .await?;
        Ok(Response::new(ApplyPoliciesResponse {
            names: keys.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn delete_policy(
        &self,
        r: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let name = r.into_inner().name;
        self.blocking(move |reg| reg.delete_policy(&name)).await?;
        Ok(Response::new(DeletePolicyResponse {}))
    }

    async fn list_policies(
        &self,
        _r: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let policies = self.blocking(|r| r.policies()).await?;
        Ok(Response::new(ListPoliciesResponse {
            policies: policies
                .into_iter()
                .map(|(key, yaml)| policy_document(key, yaml))
                .collect(),
        }))
    }

    async fn list_identities(
        &self,
        _r: Request<ListIdentitiesRequest>,
    ) -> Result<Response<ListIdentitiesResponse>, Status> {
        let ids = self.blocking(|r| r.identities()).await?;
        Ok(Response::new(ListIdentitiesResponse {
            identities: ids.iter().map(|(id, l)| identity_msg(*id, l)).collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        _r: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let (pods, nodes) = self.blocking(|r| Ok((r.pods()?, r.nodes()?))).await?;
        let ids = node_ids(&nodes);
        Ok(Response::new(ListEndpointsResponse {
            endpoints: pods
                .iter()
                .map(|p| endpoint_msg(p, ids.get(&p.node).copied().unwrap_or(0)))
                .collect(),
        }))
    }

    async fn create_pod(
        &self,
        r: Request<CreatePodRequest>,
    ) -> Result<Response<meshauth_proto::node::Endpoint>, Status> {
        let r = r.into_inner();
        let node = node_name(&r.node)?;
        let labels = meshauth_policy::Labels::from_pairs(
            r.labels.iter().map(|(k, v)| (k.as_str(), v.clone())),
        )
        .map_err(invalid)?;
        let (pod, nodes) = self
            .blocking(move |reg| {
                let namespace = if r.namespace.is_empty() {
                    meshauth_policy::policy::DEFAULT_NAMESPACE
                } else {
                    r.namespace.as_str()
                };
                Ok((
                    reg.create_pod(namespace, &r.name, labels, &node)?,
                    reg.nodes()?,
                ))
            })
            .await?;
        let ids = node_ids(&nodes);
        Ok(Response::new(endpoint_msg(
            &pod,
            ids.get(&pod.node).copied().unwrap_or(0),
        )))
    }

    async fn delete_pod(
        &self,
        r: Request<PodRequest>,
    ) -> Result<Response<DeletePodResponse>, Status> {
        let r = r.into_inner();
        self.blocking(move |reg| {
            let namespace = if r.namespace.is_empty() {
                "default"
            } else {
                r.namespace.as_str()
            };
            reg.delete_pod(namespace, &r.name)
        })
        .await?;
        Ok(Response::new(DeletePodResponse {}))
    }

    async fn register_node(
        &self,
        r: Request<RegisterNodeRequest>,
    ) -> Result<Response<NodeSpecMsg>, Status> {
        let r = r.into_inner();
        let node = node_name(&r.node_name)?;
        let (address, range) = node_binding(&r.address, &r.pod_range)?;
        let spec = self
            .blocking(move |reg| reg.register_node(&node, address, range))
            .await?;
        Ok(Response::new(NodeSpecMsg {
            node_name: spec.name.to_string(),
            address: spec.address.map(|a| a.to_string()).unwrap_or_default(),
            pod_range: spec.pod_range.to_string(),
        }))
    }

    async fn get_bundle(&self, _r: Request<GetBundleRequest>) -> Result<Response<Bundle>, Status> {
        Ok(Response::new(bundle_msg(
            &self.registry.bundle(SystemTime::now()),
        )))
    }
}
