//! `meshauth policy ...`: validate policy files and trace a verdict, like `cilium policy trace`.

use std::path::PathBuf;

use anyhow::Context;
use meshauth_policy::{
    AuthType, DirectionVerdict, Labels, Policy, Protocol, Verdict, parse_policies, trace,
};

use crate::common::{AdminSocket, Output, block_on, rpc};

/// Policy commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Validate and store policies on the server; agents enforce them at once. All documents
    /// of all files are applied together, or none if any is invalid.
    Apply {
        /// Policy files: `-f a.yaml b.yaml` or `-f a.yaml -f b.yaml`.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// Delete a policy from the server.
    Delete {
        /// The policy's metadata.name.
        name: String,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// List the server's policies.
    List {
        #[command(flatten)]
        socket: AdminSocket,
        /// Output format (json includes each document's YAML).
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Check CiliumNetworkPolicy files; exits non-zero with what is wrong and where.
    Validate {
        /// Policy files (multi-document YAML): `-f a.yaml b.yaml` or `-f a.yaml -f b.yaml`.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// Show whether SRC may reach DST on a port, what authentication it needs, and which rules
    /// decided: the source's egress and the destination's ingress.
    ///
    /// Example: meshauth policy trace -f demo.yaml --src app=client2 --dst app=demodeployment --dport 80/TCP
    Trace {
        /// Policy files: `-f a.yaml b.yaml` or `-f a.yaml -f b.yaml`.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Labels of the source, `k=v,k2=v2`.
        #[arg(long)]
        src: Labels,
        /// Labels of the destination.
        #[arg(long)]
        dst: Labels,
        /// Destination port and protocol, e.g. 80/TCP, 53/UDP, 0/ICMP (protocol defaults to TCP).
        #[arg(long, value_parser = parse_dport)]
        dport: (u16, Protocol),
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

fn parse_dport(s: &str) -> Result<(u16, Protocol), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{port:?} is not a port number: write e.g. 80/TCP"))?;
    Ok((port, proto.parse()?))
}

fn load(files: &[PathBuf]) -> anyhow::Result<Vec<Policy>> {
    let mut all = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let policies = parse_policies(&text).with_context(|| format!("{}", f.display()))?;
        all.extend(policies);
    }
    Ok(all)
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allowed",
        Verdict::Deny => "denied",
    }
}

fn auth_word(a: AuthType) -> &'static str {
    match a {
        AuthType::None => "none",
        AuthType::Required => "required",
        AuthType::TestAlwaysFail => "test-always-fail",
    }
}

fn direction_json(d: &DirectionVerdict) -> serde_json::Value {
    serde_json::json!({
        "selected": d.selected,
        "selected_by": d.selected_by,
        "verdict": verdict_word(d.verdict),
        "auth": auth_word(d.auth),
        "decided_by": d.decided_by.iter().map(|r| format!("{}/{}[{}]", r.policy, r.section, r.index)).collect::<Vec<_>>(),
    })
}

fn direction_text(name: &str, d: &DirectionVerdict) {
    let why = if !d.selected {
        "no policy selects it: allowed".to_string()
    } else if d.decided_by.is_empty() {
        format!(
            "no rule matches: default deny (selected by {})",
            d.selected_by.join(", ")
        )
    } else {
        d.decided_by
            .iter()
            .map(|r| format!("{}/{}[{}]", r.policy, r.section, r.index))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out!(
        "  {name:<8} {:<8} auth {:<16} {why}",
        verdict_word(d.verdict),
        auth_word(d.auth)
    );
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd.command {
        Sub::Apply { files, socket } => {
            // Validate locally first: the error names the file.
            load(&files)?;
            let mut yaml = String::new();
            for f in &files {
                yaml.push_str(
                    &std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
                );
                yaml.push_str("\n---\n");
            }
            block_on(async move {
                let mut c = socket.connect().await?;
                let names = c
                    .apply_policies(meshauth_proto::admin::ApplyPoliciesRequest { yaml })
                    .await
                    .map_err(rpc)?
                    .into_inner()
                    .names;
                for n in names {
                    out!("applied policy {n}");
                }
                Ok(())
            })?;
        }
        Sub::Delete { name, socket } => block_on(async move {
            let mut c = socket.connect().await?;
            c.delete_policy(meshauth_proto::admin::DeletePolicyRequest { name: name.clone() })
                .await
                .map_err(rpc)?;
            out!("deleted policy {name}");
            Ok(())
        })?,
        Sub::List { socket, output } => block_on(async move {
            let mut c = socket.connect().await?;
            let list = c
                .list_policies(meshauth_proto::admin::ListPoliciesRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .policies;
            match output {
                Output::Json => out!(
                    "{}",
                    serde_json::Value::from(
                        list.iter()
                            .map(|p| serde_json::json!({"name": p.name, "yaml": p.yaml}))
                            .collect::<Vec<_>>()
                    )
                ),
                Output::Text => {
                    if list.is_empty() {
                        out!("no policies");
                    }
                    for p in &list {
                        out!("{}", p.name);
                    }
                }
            }
            Ok(())
        })?,
        Sub::Validate { files } => {
            let policies = load(&files)?;
            out!("{} policies valid", policies.len());
        }
        Sub::Trace {
            files,
            src,
            dst,
            dport: (port, protocol),
            output,
        } => {
            let policies = load(&files)?;
            let t = trace(&policies, &src, &dst, protocol, port);
            match output {
                Output::Json => out!(
                    "{}",
                    serde_json::json!({
                        "src": src.to_string(),
                        "dst": dst.to_string(),
                        "dport": port,
                        "protocol": format!("{protocol:?}").to_uppercase(),
                        "verdict": verdict_word(t.verdict),
                        "auth": auth_word(t.auth),
                        "egress": direction_json(&t.egress),
                        "ingress": direction_json(&t.ingress),
                    })
                ),
                Output::Text => {
                    out!(
                        "{src} -> {dst} {port}/{}",
                        format!("{protocol:?}").to_uppercase()
                    );
                    direction_text("egress", &t.egress);
                    direction_text("ingress", &t.ingress);
                    out!(
                        "final verdict: {}, authentication: {}",
                        verdict_word(t.verdict).to_uppercase(),
                        auth_word(t.auth)
                    );
                }
            }
        }
    }
    Ok(())
}
