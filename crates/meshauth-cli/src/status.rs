//! `meshauth status`: the server, its CA, agents, and what the registry holds, at a glance.

use meshauth_proto::admin::{
    HealthRequest, ListAgentsRequest, ListEndpointsRequest, ListEntriesRequest,
    ListIdentitiesRequest, ListPoliciesRequest,
};

use crate::common::{AdminSocket, Output, block_on, rpc, seconds_left, time};

/// Status options.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(flatten)]
    socket: AdminSocket,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    block_on(async move {
        let mut c = cmd.socket.connect().await?;
        let health = c.health(HealthRequest {}).await.map_err(rpc)?.into_inner();
        let agents = c
            .list_agents(ListAgentsRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .agents;
        let identities = c
            .list_identities(ListIdentitiesRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .identities;
        let endpoints = c
            .list_endpoints(ListEndpointsRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .endpoints;
        let policies = c
            .list_policies(ListPoliciesRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .policies;
        let entries = c
            .list_entries(ListEntriesRequest::default())
            .await
            .map_err(rpc)?
            .into_inner()
            .entries;
        match cmd.output {
            Output::Json => out!(
                "{}",
                serde_json::json!({
                    "trust_domain": health.trust_domain,
                    "bundle_sequence": health.bundle_sequence,
                    "authorities": health.authorities.iter().map(|a| serde_json::json!({"state": a.state, "serial": a.serial, "expires_at": time(a.not_after_unix)})).collect::<Vec<_>>(),
                    "agents": agents.iter().map(|a| serde_json::json!({"node": a.node_name, "banned": a.banned, "svid_expires_at": time(a.expires_at_unix)})).collect::<Vec<_>>(),
                    "identities": identities.len(),
                    "endpoints": endpoints.len(),
                    "policies": policies.len(),
                    "entries": entries.len(),
                })
            ),
            Output::Text => {
                out!(
                    "server: healthy, trust domain {}, bundle sequence {}",
                    health.trust_domain,
                    health.bundle_sequence
                );
                for a in &health.authorities {
                    out!(
                        "  CA {:<8} expires {} (in {}s)",
                        a.state,
                        time(a.not_after_unix),
                        seconds_left(a.not_after_unix)
                    );
                }
                out!("agents: {}", agents.len());
                for a in &agents {
                    out!(
                        "  {:<12} {:<7} node SVID expires {} (in {}s)",
                        a.node_name,
                        if a.banned { "banned" } else { "active" },
                        time(a.expires_at_unix),
                        seconds_left(a.expires_at_unix)
                    );
                }
                out!(
                    "identities: {}  endpoints: {}  policies: {}  registration entries: {}",
                    identities.len(),
                    endpoints.len(),
                    policies.len(),
                    entries.len()
                );
            }
        }
        Ok(())
    })
}
