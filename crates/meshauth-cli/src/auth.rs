//! `meshauth auth list`: the pairs each agent has authenticated, with labels, nodes, time left.

use std::path::PathBuf;

use meshauth_agent::defaults;
use meshauth_proto::agent::ListAuthRequest;

use crate::common::{Output, agent_client, block_on, rpc, seconds_left};

/// Auth commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List every auth entry of the given agents (repeat --agent-socket for several nodes).
    List {
        /// Admin socket of an agent; repeatable.
        #[arg(long = "agent-socket", default_value = defaults::ADMIN_SOCKET)]
        sockets: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn labels(m: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    let Sub::List { sockets, output } = cmd.command;
    block_on(async move {
        let mut rows = Vec::new();
        for s in &sockets {
            let mut c = agent_client(s).await?;
            let resp = c
                .list_auth(ListAuthRequest {})
                .await
                .map_err(rpc)?
                .into_inner();
            for e in resp.entries {
                rows.push((resp.node.clone(), e));
            }
        }
        match output {
            Output::Json => out!(
                "{}",
                serde_json::Value::from(
                    rows.iter()
                        .map(|(node, e)| serde_json::json!({
                            "node": node,
                            "local": {"identity": e.local_identity, "labels": e.local_labels},
                            "remote": {"identity": e.remote_identity, "labels": e.remote_labels, "node": e.remote_node},
                            "seconds_left": seconds_left(e.expires_at_unix),
                            "connection": (!e.connection.is_empty()).then_some(&e.connection),
                        }))
                        .collect::<Vec<_>>()
                )
            ),
            Output::Text => {
                if rows.is_empty() {
                    out!("no auth entries");
                }
                out!("{:<6} {:<34} {:<34} {:<6} TIME LEFT", "NODE", "LOCAL", "REMOTE", "ON");
                for (node, e) in &rows {
                    out!(
                        "{:<6} {:<34} {:<34} {:<6} {}s",
                        node,
                        format!("{} ({})", labels(&e.local_labels), e.local_identity),
                        format!("{} ({})", labels(&e.remote_labels), e.remote_identity),
                        e.remote_node,
                        seconds_left(e.expires_at_unix)
                    );
                    if !e.connection.is_empty() {
                        out!("       per connection: {}", e.connection);
                    }
                }
            }
        }
        Ok(())
    })
}
