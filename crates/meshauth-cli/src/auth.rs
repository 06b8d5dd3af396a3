//! `meshauth auth list`: the pairs each agent has authenticated, with labels, nodes, time left,
//! and (encryption on) each agent's tunnel to every other node.

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

fn entry_json(node: &str, e: &meshauth_proto::agent::AuthEntry) -> serde_json::Value {
    serde_json::json!({
        "node": node,
        "local": {"identity": e.local_identity, "labels": e.local_labels},
        "remote": {"identity": e.remote_identity, "labels": e.remote_labels, "node": e.remote_node},
        "seconds_left": seconds_left(e.expires_at_unix),
        "connection": (!e.connection.is_empty()).then_some(&e.connection),
    })
}

fn labels(m: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

/// One tunnel as JSON.
pub(crate) fn tunnel_json(node: &str, t: &meshauth_proto::agent::Tunnel) -> serde_json::Value {
    let at = |u: i64| (u != 0).then(|| crate::common::time(u));
    serde_json::json!({
        "node": node,
        "peer": t.node,
        "state": t.state,
        "endpoint": t.endpoint,
        "allowed_ips": t.allowed_ips,
        "last_handshake": at(t.last_handshake_unix),
        "tx_bytes": t.tx_bytes,
        "rx_bytes": t.rx_bytes,
        "key_rotations": t.key_rotations,
        "key_derived": at(t.key_derived_unix),
        "key_expires": at(t.key_expires_unix),
        "last_error": (!t.last_error.is_empty()).then_some(&t.last_error),
    })
}

/// Tunnels as text lines: a header, then one line per tunnel (and its last error).
pub(crate) fn tunnel_lines(rows: &[(String, meshauth_proto::agent::Tunnel)]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<6} {:<6} {:<12} {:<18} {:>4} {:>16} {:>12} {:>12} {:>9}",
        "NODE",
        "PEER",
        "TUNNEL",
        "ENDPOINT",
        "PODS",
        "LAST HANDSHAKE",
        "TX BYTES",
        "RX BYTES",
        "ROTATIONS"
    )];
    for (node, t) in rows {
        let ago = if t.last_handshake_unix == 0 {
            "never".to_owned()
        } else {
            format!("{}s ago", -seconds_left(t.last_handshake_unix))
        };
        out.push(format!(
            "{:<6} {:<6} {:<12} {:<18} {:>4} {:>16} {:>12} {:>12} {:>9}",
            node,
            t.node,
            t.state,
            t.endpoint,
            t.allowed_ips,
            ago,
            t.tx_bytes,
            t.rx_bytes,
            t.key_rotations
        ));
        if !t.last_error.is_empty() {
            out.push(format!("       last key exchange failed: {}", t.last_error));
        }
    }
    out
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    let Sub::List { sockets, output } = cmd.command;
    block_on(async move {
        let mut rows = Vec::new();
        let mut tunnels = Vec::new();
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
            for t in resp.tunnels {
                tunnels.push((resp.node.clone(), t));
            }
        }
        match output {
            Output::Json => out!(
                "{}",
                serde_json::Value::from(
                    rows.iter()
                        .map(|(node, e)| {
                            let mut j = entry_json(node, e);
                            // Encryption on: the state of the tunnel the pair's packets take.
                            j["tunnel"] = tunnels
                                .iter()
                                .find(|(n, t)| n == node && t.node == e.remote_node)
                                .map_or(serde_json::Value::Null, |(n, t)| tunnel_json(n, t));
                            j
                        })
                        .collect::<Vec<_>>()
                )
            ),
            Output::Text => {
                if rows.is_empty() {
                    out!("no auth entries");
                }
                out!(
                    "{:<6} {:<34} {:<34} {:<6} TIME LEFT",
                    "NODE",
                    "LOCAL",
                    "REMOTE",
                    "ON"
                );
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
                if !tunnels.is_empty() {
                    out!("");
                    for line in tunnel_lines(&tunnels) {
                        out!("{line}");
                    }
                }
            }
        }
        Ok(())
    })
}
