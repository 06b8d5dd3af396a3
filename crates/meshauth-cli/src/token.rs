//! `meshauth token generate`: single-use join tokens for node attestation.

use std::time::Duration;

use meshauth_datastore::NodeName;
use meshauth_proto::admin::CreateJoinTokenRequest;

use crate::common::{AdminSocket, block_on, parse_duration, rpc};

/// Join token commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Create a single-use token that lets the agent of NODE attest once; prints the token alone.
    ///
    /// Example: meshauth agent run --node n1 --join-token "$(meshauth token generate --node n1)"
    Generate {
        /// The node name the token is for (becomes spiffe://<td>/node/<name>).
        #[arg(long)]
        node: NodeName,
        /// How long the token stays valid (server default: 600s).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Bind this address to the node (where other agents reach it); default: the address it
        /// attests from. The node can never claim another.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Bind this pod range to the node (its pods' addresses must be inside), e.g.
        /// 10.200.1.0/24; default: a /24 allocated from the server's --pod-cidr.
        #[arg(long, value_parser = |s: &str| s.parse::<meshauth_datastore::Ipv4Range>())]
        pod_range: Option<meshauth_datastore::Ipv4Range>,
        #[command(flatten)]
        socket: AdminSocket,
    },
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd.command {
        Sub::Generate {
            node,
            ttl,
            address,
            pod_range,
            socket,
        } => block_on(async move {
            let mut client = socket.connect().await?;
            let token = client
                .create_join_token(CreateJoinTokenRequest {
                    node_name: node.to_string(),
                    ttl_seconds: ttl.map(|d| d.as_secs().max(1) as i64).unwrap_or(0),
                    address: address.map(|a| a.to_string()).unwrap_or_default(),
                    pod_range: pod_range.map(|r| r.to_string()).unwrap_or_default(),
                })
                .await
                .map_err(rpc)?
                .into_inner();
            out!("{}", token.token);
            Ok(())
        }),
    }
}
