//! `meshauth observe`: flows and auth events from the agents, in the style of `hubble observe`.

use std::collections::HashMap;
use std::path::PathBuf;

use meshauth_agent::defaults;
use meshauth_proto::agent::{Flow, WatchFlowsRequest};
use tokio_stream::StreamExt;

use crate::common::{Output, agent_client, block_on, rpc};

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

fn labels_text(l: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

fn time_text(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn tcp_flags(f: u32) -> String {
    let names = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_text(f: &Flow) {
    let who = |pod: &str, id: u32, labels: &HashMap<String, String>| {
        let name = if pod.is_empty() {
            "?".to_string()
        } else {
            pod.to_string()
        };
        format!("{name} (ID:{id} {})", labels_text(labels))
    };
    if f.kind == "auth" {
        let latency = if f.latency_us > 0 {
            format!(" in {:.1} ms", f.latency_us as f64 / 1000.0)
        } else {
            String::new()
        };
        let reason = if f.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", f.reason)
        };
        out!(
            "{} {}: auth ID:{} {} <-> ID:{} {} handshake {}{}{}",
            time_text(f.time_unix_ms),
            f.node,
            f.src_identity,
            labels_text(&f.src_labels),
            f.dst_identity,
            labels_text(&f.dst_labels),
            f.verdict,
            latency,
            reason
        );
        return;
    }
    let reason = match f.reason.as_str() {
        "" => String::new(),
        r => {
            let mut c = r.chars();
            format!(
                " ({}{})",
                c.next()
                    .map(|x| x.to_uppercase().to_string())
                    .unwrap_or_default(),
                c.as_str()
            )
        }
    };
    let flags = if f.protocol == "TCP" {
        format!(" (TCP Flags: {})", tcp_flags(f.tcp_flags))
    } else {
        String::new()
    };
    out!(
        "{} {}: {} -> {}:{} {} {}{}{}",
        time_text(f.time_unix_ms),
        f.node,
        who(&f.src_pod, f.src_identity, &f.src_labels),
        who(&f.dst_pod, f.dst_identity, &f.dst_labels),
        f.dport,
        f.protocol,
        f.verdict,
        reason,
        flags
    );
}

fn print_json(f: &Flow) {
    out!(
        "{}",
        serde_json::json!({
            "time": time_text(f.time_unix_ms), "node": f.node, "kind": f.kind,
            "source": {"ip": f.src_ip, "pod": f.src_pod, "identity": f.src_identity, "labels": f.src_labels},
            "destination": {"ip": f.dst_ip, "pod": f.dst_pod, "identity": f.dst_identity, "labels": f.dst_labels, "port": f.dport},
            "protocol": f.protocol, "verdict": f.verdict, "reason": f.reason, "tcp_flags": f.tcp_flags,
            "latency_us": f.latency_us,
        })
    );
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
            Output::Json => print_json(f),
            Output::Text => print_text(f),
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
