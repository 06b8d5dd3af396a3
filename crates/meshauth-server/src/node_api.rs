//! The agent-facing gRPC service (`meshauth.v1.node.Node`): wire types in, domain types to the
//! registry, wire types out. Refusals are logged with their reason and counted.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshauth_ca::IssuedSvid;
use meshauth_datastore::{EntryId, NodeName, RegistrationEntry, StoreError};
use meshauth_proto::node::node_server::Node;
use meshauth_proto::node::{
    AttestJoinTokenRequest, Bundle, Entry, NodeSvidResponse, RenewNodeSvidRequest, Selector,
    SignWorkloadSvidsRequest, SignWorkloadSvidsResponse, SignedSvid, SyncRequest, SyncResponse,
};
use meshauth_spiffe::X509Bundle;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::registry::{NodeSvid, Registry, RegistryError};
use crate::tls_incoming::PeerInfo;

/// Messages buffered per sync stream; each is the full state, so a slow agent only needs the last.
const SYNC_BUFFER: usize = 2;

/// The node API over a shared registry.
#[derive(Debug, Clone)]
pub struct NodeApi {
    registry: Arc<Registry>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl NodeApi {
    /// Serves `registry`; sync streams end when `shutdown` turns true, so that a graceful
    /// shutdown does not wait for agents to hang up.
    pub fn new(registry: Arc<Registry>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        NodeApi { registry, shutdown }
    }

    fn refuse(&self, op: &'static str, peer: Option<&PeerInfo>, err: RegistryError) -> Status {
        let reason = err.reason();
        self.registry.metrics().denied(reason);
        tracing::warn!(
            op,
            peer.addr = ?peer.map(|p| p.remote_addr),
            peer.id = ?peer.and_then(|p| p.caller.as_ref()).map(|c| c.spiffe_id.to_string()),
            reason = ?reason,
            error = %err,
            "node API request refused"
        );
        status_of(err)
    }
}

pub(crate) fn status_of(err: RegistryError) -> Status {
    let msg = err.to_string();
    match err {
        RegistryError::Store(
            StoreError::TokenUnknown | StoreError::TokenExpired | StoreError::TokenWrongNode { .. },
        )
        | RegistryError::Unauthenticated => Status::unauthenticated(msg),
        RegistryError::Store(StoreError::NodeBanned(_) | StoreError::NodeNotFound(_))
        | RegistryError::NotANode(_)
        | RegistryError::StaleNodeSvid { .. }
        | RegistryError::EntryNotForNode { .. } => Status::permission_denied(msg),
        RegistryError::Store(StoreError::EntryNotFound(_)) => Status::not_found(msg),
        RegistryError::Ca(_) | RegistryError::Invalid(_) => Status::invalid_argument(msg),
        RegistryError::Store(_) => Status::internal(msg),
    }
}

pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn bundle_msg(b: &X509Bundle) -> Bundle {
    Bundle {
        trust_domain: b.trust_domain.to_string(),
        authorities: b.authorities.iter().map(|c| c.to_vec()).collect(),
        sequence: b.sequence,
        refresh_hint_seconds: b.refresh_hint.map(|d| d.as_secs() as i64).unwrap_or(0),
    }
}

pub(crate) fn entry_msg(e: &RegistrationEntry) -> Entry {
    Entry {
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e
            .selectors
            .iter()
            .map(|s| Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        x509_svid_ttl_seconds: e.x509_svid_ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
        dns_names: e.dns_names.clone(),
        revision: e.revision,
    }
}

fn svid_chain(svid: &IssuedSvid) -> Vec<Vec<u8>> {
    svid.chain.iter().map(|c| c.to_vec()).collect()
}

fn node_svid_msg(n: &NodeSvid) -> NodeSvidResponse {
    NodeSvidResponse {
        spiffe_id: n.svid.spiffe_id.to_string(),
        svid_chain: svid_chain(&n.svid),
        node_id: n.node.node_id.get(),
        bundle: Some(bundle_msg(&n.bundle)),
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest_join_token(
        &self,
        request: Request<AttestJoinTokenRequest>,
    ) -> Result<Response<NodeSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        let node: NodeName =
            req.node_name
                .parse()
                .map_err(|e: meshauth_datastore::InvalidNodeName| {
                    self.refuse(
                        "attest",
                        peer.as_ref(),
                        RegistryError::Invalid(e.to_string()),
                    )
                })?;
        let issued = self
            .registry
            .attest_join_token(&req.token, &node, &req.csr, SystemTime::now())
            .map_err(|e| self.refuse("attest", peer.as_ref(), e))?;
        Ok(Response::new(node_svid_msg(&issued)))
    }

    async fn renew_node_svid(
        &self,
        request: Request<RenewNodeSvidRequest>,
    ) -> Result<Response<NodeSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.as_ref());
        let issued = self
            .registry
            .renew_node(caller, &request.get_ref().csr, SystemTime::now())
            .map_err(|e| self.refuse("renew", peer.as_ref(), e))?;
        Ok(Response::new(node_svid_msg(&issued)))
    }

    async fn sign_workload_svids(
        &self,
        request: Request<SignWorkloadSvidsRequest>,
    ) -> Result<Response<SignWorkloadSvidsResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.as_ref());
        let mut csrs = Vec::new();
        for c in request.into_inner().csrs {
            let id: EntryId =
                c.entry_id
                    .parse()
                    .map_err(|e: meshauth_datastore::InvalidEntryId| {
                        self.refuse("sign", peer.as_ref(), RegistryError::Invalid(e.to_string()))
                    })?;
            csrs.push((id, c.csr));
        }
        let signed = self
            .registry
            .sign_workload_svids(caller, &csrs, SystemTime::now())
            .map_err(|e| self.refuse("sign", peer.as_ref(), e))?;
        Ok(Response::new(SignWorkloadSvidsResponse {
            svids: signed
                .iter()
                .map(|(entry, svid)| SignedSvid {
                    entry_id: entry.id.to_string(),
                    spiffe_id: svid.spiffe_id.to_string(),
                    svid_chain: svid_chain(svid),
                    expires_at_unix: unix(svid.not_after),
                })
                .collect(),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.as_ref());
        let node = self
            .registry
            .authenticate_node(caller)
            .map_err(|e| self.refuse("sync", peer.as_ref(), e))?
            .name;
        let (tx, rx) = mpsc::channel(SYNC_BUFFER);
        let registry = Arc::clone(&self.registry);
        let mut changes = registry.subscribe();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            registry.metrics().sync_stream_opened();
            tracing::info!(node = %node, "sync stream opened");
            let mut last_sent: Option<SyncResponse> = None;
            loop {
                changes.borrow_and_update();
                let msg = match registry.node_view(&node, SystemTime::now()) {
                    Ok(view) => Ok(SyncResponse {
                        bundle: Some(bundle_msg(&view.bundle)),
                        entries: view.entries.iter().map(entry_msg).collect(),
                    }),
                    Err(e) => Err(e),
                };
                let ended = msg.is_err();
                // Changes of other nodes' entries wake every stream; send only what differs.
                let unchanged = matches!((&msg, &last_sent), (Ok(m), Some(l)) if m == l);
                if let Ok(m) = &msg {
                    last_sent = Some(m.clone());
                }
                let msg = msg.map_err(|e| {
                    registry.metrics().denied(e.reason());
                    tracing::warn!(node = %node, error = %e, "sync stream ended by the server");
                    status_of(e)
                });
                if !unchanged && (tx.send(msg).await.is_err() || ended) {
                    break;
                }
                let stopping = tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        false
                    }
                    () = tx.closed() => break,
                    _ = shutdown.wait_for(|s| *s) => true,
                };
                if stopping {
                    let _ = tx
                        .send(Err(Status::unavailable("server shutting down; reconnect")))
                        .await;
                    break;
                }
            }
            registry.metrics().sync_stream_closed();
            tracing::info!(node = %node, "sync stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
