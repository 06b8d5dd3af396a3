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
                        .map(|e| serde_json::json!({
                            "namespace": e.namespace,
                            "name": e.name,
                            "node": e.node,
                            "node_id": e.node_id,
                            "labels": e.labels,
                            "identity": e.identity,
                            "ipv4": e.ipv4,
                            "interface": e.interface,
                            "reported": !e.ipv4.is_empty(),
                        }))
                        .collect::<Vec<_>>()
                )
            ),
            Output::Text => {
                out!(
                    "{:<12} {:<32} {:<15} {:<10} IDENTITY",
                    "NODE",
                    "POD",
                    "IPV4",
                    "INTERFACE"
                );
                for e in &eps {
                    let ip = if e.ipv4.is_empty() {
                        "(not reported)"
                    } else {
                        e.ipv4.as_str()
                    };
                    out!(
                        "{:<12} {:<32} {:<15} {:<10} {}",
                        e.node,
                        format!("{}/{}", e.namespace, e.name),
                        ip,
                        e.interface,
                        e.identity
                    );
                }
            }
        }
        Ok(())
    })
}

/// Pod commands: the orchestrator side of placement.
#[derive(Debug, clap::Args)]
pub(crate) struct PodCmd {
    #[command(subcommand)]
    command: PodSub,
}

#[derive(Debug, clap::Subcommand)]
enum PodSub {
    /// Place a pod on a node, as an orchestrator does (Kubernetes' API server in a cluster):
    /// its labels decide its identity; its node may only report where it runs.
    ///
    /// Example: meshauth pod create web-1 --node n1 --labels app=web
    Create {
        /// The pod's name.
        name: String,
        /// Its namespace (a DNS-1123 label; part of its identity).
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The node it runs on.
        #[arg(long)]
        node: meshauth_datastore::NodeName,
        /// Labels, `key=value`; repeat or separate with commas.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// Remove a pod: its identity's SVIDs are no longer signed for its node, and every auth
    /// entry that depended on it is revoked.
    Delete {
        /// The pod's name.
        name: String,
        /// Its namespace (a DNS-1123 label; part of its identity).
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// List pods: where the control plane placed them and what their nodes reported.
    List {
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn parse_label(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => anyhow::bail!("invalid label {s:?}: use key=value, e.g. app=web"),
    }
}

pub(crate) fn run_pod(cmd: PodCmd) -> anyhow::Result<()> {
    match cmd.command {
        PodSub::Create {
            name,
            namespace,
            node,
            labels,
            socket,
        } => {
            let labels = labels
                .iter()
                .map(|l| parse_label(l))
                .collect::<anyhow::Result<std::collections::HashMap<_, _>>>()?;
            block_on(async move {
                let mut c = socket.connect().await?;
                let pod = c
                    .create_pod(meshauth_proto::admin::CreatePodRequest {
                        namespace,
                        name,
                        labels,
                        node: node.to_string(),
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                out!(
                    "pod {}/{} placed on {} (identity {})",
                    pod.namespace,
                    pod.name,
                    pod.node,
                    pod.identity
                );
                Ok(())
            })
        }
        PodSub::Delete {
            name,
            namespace,
            socket,
        } => block_on(async move {
            let mut c = socket.connect().await?;
            c.delete_pod(meshauth_proto::admin::PodRequest {
                namespace: namespace.clone(),
                name: name.clone(),
            })
            .await
            .map_err(rpc)?;
            out!("pod {namespace}/{name} deleted");
            Ok(())
        }),
        PodSub::List { socket, output } => run_endpoint(EndpointCmd {
            command: ListOnly::List { socket, output },
        }),
    }
}
