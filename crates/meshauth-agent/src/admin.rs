//! The agent's operator API on its admin socket (mode 0600): health and the SVIDs it holds.

use std::time::{SystemTime, UNIX_EPOCH};

use meshauth_proto::agent::agent_admin_server::AgentAdmin;
use meshauth_proto::agent::{
    HealthRequest, HealthResponse, ListSvidsRequest, ListSvidsResponse, Svid,
};
use tonic::{Request, Response, Status};

use crate::manager::Manager;

/// The admin API over the manager.
#[derive(Debug, Clone)]
pub struct AdminApi {
    manager: Manager,
    node_name: String,
}

impl AdminApi {
    /// Serves `manager`'s state.
    pub fn new(manager: Manager, node_name: String) -> Self {
        AdminApi { manager, node_name }
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
        }))
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
        }))
    }
}
