//! The agent's operator API on its admin socket (mode 0600): health, the SVIDs it holds, the
//! pairs it has authenticated.

use std::time::{SystemTime, UNIX_EPOCH};

use meshauth_proto::agent::agent_admin_server::AgentAdmin;
use meshauth_proto::agent::{
    AuthEntry, Flow, HealthRequest, HealthResponse, ListAuthRequest, ListAuthResponse,
    ListSvidsRequest, ListSvidsResponse, Svid, UnsignableEntry, WatchFlowsRequest,
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
}

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
        }
    }
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
}
