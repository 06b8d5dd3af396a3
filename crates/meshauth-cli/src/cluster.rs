//! `meshauth identity list` and `meshauth endpoint list`: what the server knows of workloads.

use meshauth_proto::admin::{ListEndpointsRequest, ListIdentitiesRequest};

use crate::common::{AdminSocket, Output, block_on, rpc};

/// Identity commands.
#[derive(Debug, clap::Args)]
pub(crate) struct IdentityCmd {
    #[command(subcommand)]
    command: ListOnly,
}

/// Endpoint commands.
#[derive(Debug, clap::Args)]
pub(crate) struct EndpointCmd {
    #[command(subcommand)]
    command: ListOnly,
}

#[derive(Debug, clap::Subcommand)]
enum ListOnly {
    /// List them.
    List {
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

pub(crate) fn run_identity(cmd: IdentityCmd) -> anyhow::Result<()> {
    let ListOnly::List { socket, output } = cmd.command;
    block_on(async move {
        let mut c = socket.connect().await?;
        let ids = c
            .list_identities(ListIdentitiesRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .identities;
        let label_text = |l: &std::collections::HashMap<String, String>| {
            let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            v.sort();
            v.join(",")
        };
        match output {
            Output::Json => out!(
                "{}",
                serde_json::Value::from(
                    ids.iter()
                        .map(|i| serde_json::json!({"id": i.id, "labels": i.labels}))
                        .collect::<Vec<_>>()
                )
            ),
            Output::Text => {
                out!("{:>8}  LABELS", "ID");
                for i in &ids {
                    out!("{:>8}  {}", i.id, label_text(&i.labels));
                }
            }
        }
        Ok(())
    })
}

pub(crate) fn run_endpoint(cmd: EndpointCmd) -> anyhow::Result<()> {
    let ListOnly::List { socket, output } = cmd.command;
    block_on(async move {
        let mut c = socket.connect().await?;
        let eps = c
            .list_endpoints(ListEndpointsRequest {})
            .await
            .map_err(rpc)?
            .into_inner()
            .endpoints;
        match output {
            Output::Json => out!(
                "{}",
                serde_json::Value::from(
                    eps.iter()
                        .map(|e| serde_json::json!({"node": e.node, "node_id": e.node_id, "name": e.name, "ipv4": e.ipv4, "identity": e.identity}))
                        .collect::<Vec<_>>()
                )
            ),
            Output::Text => {
                out!("{:<12} {:<24} {:<15} IDENTITY", "NODE", "ENDPOINT", "IPV4");
                for e in &eps {
                    out!("{:<12} {:<24} {:<15} {}", e.node, e.name, e.ipv4, e.identity);
                }
            }
        }
        Ok(())
    })
}
