//! `meshauth observe`: flows and auth events from the agents, in the style of `hubble observe`
//! (its one-line text, and its JSON field names: see [`hubble`]).

use std::collections::HashMap;
use std::path::PathBuf;

use meshauth_agent::defaults;
use meshauth_proto::agent::{Flow, WatchFlowsRequest};
use tokio_stream::StreamExt;

use crate::common::{Output, agent_client, block_on, rpc};

pub(crate) mod hubble;

/// Observe options.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    /// Admin socket of an agent; repeat for every node to watch.
    #[arg(long = "agent-socket", default_value = defaults::ADMIN_SOCKET)]
    sockets: Vec<PathBuf>,
    /// Only flows whose source has this label (`k=v`); repeatable, all must match.
    #[arg(long = "from-label")]
    from_labels: Vec<String>,
    /// Only flows whose destination has this label (`k=v`); repeatable.
    #[arg(long = "to-label")]
    to_labels: Vec<String>,
    /// Only this verdict: FORWARDED, DROPPED (flows) or STARTED, SUCCEEDED, FAILED (auth).
    #[arg(long, value_parser = ["FORWARDED", "DROPPED", "STARTED", "SUCCEEDED", "FAILED"])]
    verdict: Option<String>,
    /// Keep streaming new events (otherwise print what the agents hold and exit).
    #[arg(short, long)]
    follow: bool,
    /// Output format (json: one object per line).
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

fn parse_pairs(items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid label {i:?}: expected key=value, e.g. app=client2")
                })
        })
        .collect()
}

fn has_all(labels: &HashMap<String, String>, want: &[(String, String)]) -> bool {
    want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Every record the agents at `sockets` hold, oldest first.
pub(crate) async fn collect(sockets: &[PathBuf]) -> anyhow::Result<Vec<Flow>> {
    let mut all = Vec::new();
    for socket in sockets {
        let mut client = agent_client(socket).await?;
        let mut stream = client
            .watch_flows(WatchFlowsRequest { follow: false })
            .await
            .map_err(rpc)?
            .into_inner();
        while let Some(f) = stream.next().await {
            all.push(f.map_err(rpc)?);
        }
    }
    all.sort_by_key(|f| f.time_unix_ms);
    Ok(all)
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    let from = parse_pairs(&cmd.from_labels)?;
    let to = parse_pairs(&cmd.to_labels)?;
    block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Flow>(1024);
        for socket in &cmd.sockets {
            let mut client = agent_client(socket).await?;
            let mut stream = client
                .watch_flows(WatchFlowsRequest { follow: cmd.follow })
                .await
                .map_err(rpc)?
                .into_inner();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(f)) = stream.next().await {
                    if tx.send(f).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let keep = |f: &Flow| {
            has_all(&f.src_labels, &from)
                && has_all(&f.dst_labels, &to)
                && cmd.verdict.as_ref().is_none_or(|v| *v == f.verdict)
        };
        let print = |f: &Flow| match cmd.output {
            Output::Json => out!("{}", hubble::flow_json(f)),
            Output::Text => out!("{}", hubble::flow_line(f)),
        };
        if cmd.follow {
            while let Some(f) = rx.recv().await {
                if keep(&f) {
                    print(&f);
                }
            }
        } else {
            let mut all = Vec::new();
            while let Some(f) = rx.recv().await {
                if keep(&f) {
                    all.push(f);
                }
            }
            all.sort_by_key(|f| f.time_unix_ms);
            for f in &all {
                print(f);
            }
        }
        Ok(())
    })
}
