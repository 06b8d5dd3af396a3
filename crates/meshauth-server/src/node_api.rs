//! The agent-facing gRPC service (`meshauth.v1.node.Node`): wire types in, domain types to the
//! registry, wire types out. Refusals are logged with their reason and counted.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_ca::IssuedSvid;
use meshauth_datastore::{EntryId, NodeName, RegistrationEntry, StoreError};
use meshauth_proto::node::node_server::Node;
use meshauth_proto::node::{
    AttestJoinTokenRequest, AttestX509PopRequest, Bundle, Endpoint as EndpointMsg, Entry,
    Identity as IdentityMsg, NodeSvidResponse, RenewNodeSvidRequest, ReportPodRequest,
    ReportPodResponse, Selector, SignIdentitySvidsRequest, SignIdentitySvidsResponse,
    SignWorkloadSvidsRequest, SignWorkloadSvidsResponse, SignedIdentitySvid, SignedSvid,
    SyncRequest, SyncResponse, UnsignedEntry, WithdrawPodRequest, WithdrawPodResponse,
};
use meshauth_spiffe::X509Bundle;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::metrics::SyncKind;
use crate::registry::{NodeSvid, Registry, RegistryError};
use crate::tls_incoming::PeerInfo;
use crate::view::{Cursor, Next, ViewFeed};

/// Most certificates an x509pop chain may have (the node's and its intermediates).
const MAX_X509POP_CHAIN: usize = 8;
/// Messages buffered per sync stream. A slow agent holds its stream back; what changes
/// meanwhile is composed into the next delta.
const SYNC_BUFFER: usize = 2;
/// How long a new sync stream waits for the cluster view to include its node.
const VIEW_WAIT: Duration = Duration::from_secs(10);

/// The node API over a shared registry.
#[derive(Debug, Clone)]
pub struct NodeApi {
    registry: Arc<Registry>,
    views: ViewFeed,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl NodeApi {
    /// Serves `registry`, with sync streams fed from `views` (which the caller keeps built with
    /// [`ViewFeed::run`]); sync streams end when `shutdown` turns true, so that a graceful
    /// shutdown does not wait for agents to hang up.
    pub fn new(
        registry: Arc<Registry>,
        views: ViewFeed,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        NodeApi {
            registry,
            views,
            shutdown,
        }
    }

    /// Runs `f` on the registry off the async runtime: the store blocks (SQLite, etcd) and the
    /// CA signs, neither of which may hold up the tasks that serve other agents.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let registry = Arc::clone(&self.registry);
        tokio::task::spawn_blocking(move || f(&registry))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "a registry call panicked or was cancelled");
                Status::internal("the server failed to answer this call; retry")
            })
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
        node_status_of(err)
    }
}

/// The status a node gets: [`status_of`], except that an SVID the server no longer accepts
/// (evicted, re-attested since) is `UNAUTHENTICATED`, which tells the agent to attest again;
/// `PERMISSION_DENIED` (banned, not its entry) tells it that attesting again will not help.
fn node_status_of(err: RegistryError) -> Status {
    match err {
        RegistryError::StaleNodeSvid { .. } | RegistryError::Store(StoreError::NodeNotFound(_)) => {
            Status::unauthenticated(err.to_string())
        }
        other => status_of(other),
    }
}

impl NodeApi {
    /// The node name an attestation asks for, or its refusal.
    fn node_name(
        &self,
        op: &'static str,
        peer: Option<&PeerInfo>,
        raw: &str,
    ) -> Result<NodeName, Status> {
        raw.parse()
            .map_err(|e: meshauth_datastore::InvalidNodeName| {
                self.refuse(op, peer, RegistryError::Invalid(e.to_string()))
            })
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
        | RegistryError::EntryNotForNode { .. }
        | RegistryError::IdentityNotHosted { .. }
        | RegistryError::PodNotPlacedHere { .. }
        | RegistryError::AddressOutOfRange { .. }
        | RegistryError::NodeAddressMismatch { .. } => Status::permission_denied(msg),
        RegistryError::AddressInUse { .. } | RegistryError::DuplicateTunnelKey(_) => {
            Status::already_exists(msg)
        }
        RegistryError::Store(StoreError::EntryNotFound(_) | StoreError::PolicyNotFound(_)) => {
            Status::not_found(msg)
        }
        RegistryError::X509Pop(_) | RegistryError::X509PopDisabled => Status::unauthenticated(msg),
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

pub(crate) fn identity_msg(
    id: meshauth_policy::IdentityId,
    labels: &meshauth_policy::Labels,
) -> IdentityMsg {
    IdentityMsg {
        id: id.get(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

pub(crate) fn endpoint_msg(p: &meshauth_datastore::PodRecord, node_id: u32) -> EndpointMsg {
    EndpointMsg {
        node: p.node.to_string(),
        node_id,
        name: p.name.clone(),
        ipv4: p
            .runtime
            .as_ref()
            .map(|r| r.ipv4.to_string())
            .unwrap_or_default(),
        identity: p.identity.get(),
        namespace: p.namespace.clone(),
        labels: p
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        interface: p
            .runtime
            .as_ref()
            .map(|r| r.interface.clone())
            .unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn attest_join_token(
        &self,
        request: Request<AttestJoinTokenRequest>,
    ) -> Result<Response<NodeSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        let node = self.node_name("attest", peer.as_ref(), &req.node_name)?;
        let from = peer.as_ref().map(|p| p.remote_addr.ip());
        let issued = self
            .blocking(move |r| {
                r.attest_join_token(&req.token, &node, &req.csr, from, SystemTime::now())
            })
            .await?
            .map_err(|e| self.refuse("attest", peer.as_ref(), e))?;
        Ok(Response::new(node_svid_msg(&issued)))
    }

    async fn attest_x509_pop(
        &self,
        request: Request<AttestX509PopRequest>,
    ) -> Result<Response<NodeSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let req = request.into_inner();
        let node = self.node_name("attest-x509pop", peer.as_ref(), &req.node_name)?;
        let scheme = u16::try_from(req.signature_scheme)
            .map(rustls::SignatureScheme::from)
            .map_err(|_| {
                self.refuse(
                    "attest-x509pop",
                    peer.as_ref(),
                    RegistryError::Invalid(format!(
                        "signature_scheme {} is not a TLS signature scheme code",
                        req.signature_scheme
                    )),
                )
            })?;
        if req.cert_chain.len() > MAX_X509POP_CHAIN {
            return Err(self.refuse(
                "attest-x509pop",
                peer.as_ref(),
                RegistryError::Invalid(format!(
                    "the node's certificate chain has {} certificates; at most {MAX_X509POP_CHAIN} are accepted",
                    req.cert_chain.len()
                )),
            ));
        }
        let exporter = peer.as_ref().and_then(|p| p.x509pop_exporter);
        let from = peer.as_ref().map(|p| p.remote_addr.ip());
        let issued = self
            .blocking(move |r| {
                let chain: Vec<rustls::pki_types::CertificateDer<'_>> = req
                    .cert_chain
                    .iter()
                    .map(|c| rustls::pki_types::CertificateDer::from(c.as_slice()))
                    .collect();
                r.attest_x509pop(
                    &node,
                    &chain,
                    &req.csr,
                    (scheme, &req.signature),
                    exporter.as_ref().map(|e| e.as_slice()),
                    from,
                    SystemTime::now(),
                )
            })
            .await?
            .map_err(|e| self.refuse("attest-x509pop", peer.as_ref(), e))?;
        Ok(Response::new(node_svid_msg(&issued)))
    }

    async fn renew_node_svid(
        &self,
        request: Request<RenewNodeSvidRequest>,
    ) -> Result<Response<NodeSvidResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.clone());
        let csr = request.into_inner().csr;
        let issued = self
            .blocking(move |r| r.renew_node(caller.as_ref(), &csr, SystemTime::now()))
            .await?
            .map_err(|e| self.refuse("renew", peer.as_ref(), e))?;
        Ok(Response::new(node_svid_msg(&issued)))
    }

    async fn sign_workload_svids(
        &self,
        request: Request<SignWorkloadSvidsRequest>,
    ) -> Result<Response<SignWorkloadSvidsResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.as_ref());
        // Each entry is answered on its own: a malformed id is that entry's refusal.
        let mut csrs = Vec::new();
        let mut refused: Vec<(String, RegistryError)> = Vec::new();
        for c in request.into_inner().csrs {
            match c.entry_id.parse::<EntryId>() {
                Ok(id) => csrs.push((id, c.csr)),
                Err(e) => refused.push((c.entry_id, RegistryError::Invalid(e.to_string()))),
            }
        }
        // Only a caller that is not a usable node fails the whole call.
        let owned_caller = caller.cloned();
        let results = self
            .blocking(move |r| {
                r.sign_workload_svids(owned_caller.as_ref(), &csrs, SystemTime::now())
            })
            .await?
            .map_err(|e| self.refuse("sign", peer.as_ref(), e))?;
        let mut svids = Vec::with_capacity(results.len());
        for (id, result) in results {
            match result {
                Ok((entry, svid)) => svids.push(SignedSvid {
                    entry_id: entry.id.to_string(),
                    spiffe_id: svid.spiffe_id.to_string(),
                    svid_chain: svid_chain(&svid),
                    expires_at_unix: unix(svid.not_after),
                }),
                Err(e) => refused.push((id.to_string(), e)),
            }
        }
        let refused = refused
            .into_iter()
            .map(|(entry_id, err)| {
                let reason = err.reason();
                self.registry.metrics().denied(reason);
                tracing::warn!(
                    op = "sign",
                    peer.addr = ?peer.as_ref().map(|p| p.remote_addr),
                    peer.id = ?caller.map(|c| c.spiffe_id.to_string()),
                    entry.id = %entry_id.chars().take(80).collect::<String>(),
                    reason = ?reason,
                    error = %err,
                    "workload SVID refused for one entry; the others are answered"
                );
                UnsignedEntry {
                    entry_id,
                    reason: format!("{reason:?}"),
                    message: err.to_string(),
                }
            })
            .collect();
        Ok(Response::new(SignWorkloadSvidsResponse { svids, refused }))
    }

    async fn report_pod(
        &self,
        request: Request<ReportPodRequest>,
    ) -> Result<Response<ReportPodResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.clone());
        let req = request.into_inner();
        let ipv4 = req.ipv4.parse().map_err(|_| {
            self.refuse(
                "report-pod",
                peer.as_ref(),
                RegistryError::Invalid(format!("{:?} is not an IPv4 address", req.ipv4)),
            )
        })?;
        let identity = self
            .blocking(move |r| {
                r.report_pod(
                    caller.as_ref(),
                    &req.namespace,
                    &req.name,
                    ipv4,
                    &req.interface,
                )
            })
            .await?
            .map_err(|e| self.refuse("report-pod", peer.as_ref(), e))?;
        Ok(Response::new(ReportPodResponse {
            identity: identity.get(),
        }))
    }

    async fn withdraw_pod(
        &self,
        request: Request<WithdrawPodRequest>,
    ) -> Result<Response<WithdrawPodResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.clone());
        let req = request.into_inner();
        self.blocking(move |r| r.withdraw_pod(caller.as_ref(), &req.namespace, &req.name))
            .await?
            .map_err(|e| self.refuse("withdraw-pod", peer.as_ref(), e))?;
        Ok(Response::new(WithdrawPodResponse {}))
    }

    async fn sign_identity_svids(
        &self,
        request: Request<SignIdentitySvidsRequest>,
    ) -> Result<Response<SignIdentitySvidsResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.clone());
        let csrs: Vec<(meshauth_policy::IdentityId, Vec<u8>)> = request
            .into_inner()
            .csrs
            .into_iter()
            .map(|c| (meshauth_policy::IdentityId::new(c.identity), c.csr))
            .collect();
        let signed = self
            .blocking(move |r| r.sign_identity_svids(caller.as_ref(), &csrs, SystemTime::now()))
            .await?
            .map_err(|e| self.refuse("sign-identity", peer.as_ref(), e))?;
        Ok(Response::new(SignIdentitySvidsResponse {
            svids: signed
                .iter()
                .map(|(id, svid)| SignedIdentitySvid {
                    identity: id.get(),
                    svid_chain: svid_chain(svid),
                    expires_at_unix: unix(svid.not_after),
                })
                .collect(),
        }))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.caller.clone());
        let node = self
            .blocking(move |r| r.authenticate_node(caller.as_ref()))
            .await?
            .map_err(|e| self.refuse("sync", peer.as_ref(), e))?
            .name;
        let claimed = !request.get_ref().node_address.is_empty();
        let address = match request.get_ref().node_address.as_str() {
            "" => peer.as_ref().map(|p| p.remote_addr.ip()),
            a => Some(a.parse().map_err(|_| {
                self.refuse(
                    "sync",
                    peer.as_ref(),
                    RegistryError::Invalid(format!("node_address {a:?} is not an IP address")),
                )
            })?),
        };
        if let Some(address) = address {
            let n = node.clone();
            self.blocking(move |r| r.check_node_address(&n, address, claimed))
                .await?
                .map_err(|e| self.refuse("sync", peer.as_ref(), e))?;
        }
        let tunnel_key = &request.get_ref().tunnel_key;
        if !tunnel_key.is_empty() {
            let key = meshauth_policy::TunnelKey::from_slice(tunnel_key).ok_or_else(|| {
                self.refuse(
                    "sync",
                    peer.as_ref(),
                    RegistryError::Invalid(format!(
                        "tunnel_key has {} bytes: a WireGuard public key has 32",
                        tunnel_key.len()
                    )),
                )
            })?;
            let n = node.clone();
            self.blocking(move |r| r.publish_tunnel_key(&n, key))
                .await?
                .map_err(|e| self.refuse("sync", peer.as_ref(), e))?;
        }
        let (tx, rx) = mpsc::channel(SYNC_BUFFER);
        let registry = Arc::clone(&self.registry);
        let mut views = self.views.subscribe();
        let mut shutdown = self.shutdown.clone();
        let parent = registry
            .node_spiffe_id(&node)
            .map_err(|e| self.refuse("sync", peer.as_ref(), e))?
            .to_string();
        // The view must include what this node just did (attested, published its key).
        let opened_at = registry.revision();
        tokio::spawn(async move {
            registry.metrics().sync_stream_opened();
            tracing::info!(node = %node, "sync stream opened");
            let mut cursor = Cursor::new(node.clone(), parent);
            let Some(first) = ViewFeed::wait_for(&mut views, opened_at, VIEW_WAIT).await else {
                tracing::warn!(node = %node, "sync stream ended: the cluster view was not rebuilt in time");
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the server's cluster view is not ready; reconnect",
                    )))
                    .await;
                registry.metrics().sync_stream_closed();
                return;
            };
            let mut next = Some(first);
            'stream: loop {
                // The view is let go before the message is sent: a stream whose agent reads
                // slowly must not keep old views alive.
                let published = next
                    .take()
                    .unwrap_or_else(|| Arc::clone(&views.borrow_and_update()));
                let decided = cursor.next(&published);
                drop(published);
                let msgs = match decided {
                    Ok(Next::Nothing) => Vec::new(),
                    Ok(Next::Full(pages)) => {
                        registry.metrics().sync_message(SyncKind::Full);
                        pages
                    }
                    Ok(Next::Delta(m)) => {
                        registry.metrics().sync_message(SyncKind::Delta);
                        vec![*m]
                    }
                    Err(e) => {
                        registry.metrics().denied(e.reason());
                        tracing::warn!(node = %node, error = %e, "sync stream ended by the server");
                        let _ = tx.send(Err(node_status_of(e))).await;
                        break;
                    }
                };
                for msg in msgs {
                    if tx.send(Ok(msg)).await.is_err() {
                        break 'stream;
                    }
                }
                let stopping = tokio::select! {
                    changed = views.changed() => {
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
