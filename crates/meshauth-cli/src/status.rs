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
    /// Also show this agent's readiness and (encryption on) its tunnel to every other node;
    /// repeatable, one admin socket per node.
    #[arg(long = "agent-socket", value_name = "SOCKET")]
    agent_sockets: Vec<std::path::PathBuf>,
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
        let mut agent_health = Vec::new();
        for s in &cmd.agent_sockets {
            let mut a = crate::common::agent_client(s).await?;
            agent_health.push(
                a.health(meshauth_proto::agent::HealthRequest {})
                    .await
                    .map_err(rpc)?
                    .into_inner(),
            );
        }
        let tunnels: Vec<(String, meshauth_proto::agent::Tunnel)> = agent_health
            .iter()
            .flat_map(|h| h.tunnels.iter().map(|t| (h.node_name.clone(), t.clone())))
            .collect();
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
                    "agents_local": agent_health.iter().map(|h| serde_json::json!({"node": h.node_name, "ready": h.ready, "not_ready": h.not_ready, "encryption": h.encryption, "encryption_backend": (!h.encryption_backend.is_empty()).then_some(&h.encryption_backend)})).collect::<Vec<_>>(),
                    "tunnels": tunnels.iter().map(|(n, t)| crate::auth::tunnel_json(n, t)).collect::<Vec<_>>(),
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
                for h in &agent_health {
                    out!(
                        "agent {}: {}, encryption {}",
                        h.node_name,
                        if h.ready {
                            "ready".to_owned()
                        } else {
                            format!("not ready ({})", h.not_ready.join("; "))
                        },
                        if h.encryption {
                            format!("on ({})", h.encryption_backend)
                        } else {
                            "off".to_owned()
                        }
                    );
                }
                if !tunnels.is_empty() {
                    for line in crate::auth::tunnel_lines(&tunnels) {
                        out!("  {line}");
                    }
                }
            }
        }
        Ok(())
    })
}
