//! `meshauth policy ...`: validate policy files and trace a verdict, like `cilium policy trace`.

use std::path::PathBuf;

use anyhow::Context;
use meshauth_policy::labels::check_namespace;
use meshauth_policy::policy::DEFAULT_NAMESPACE;
use meshauth_policy::{
    AuthType, DirectionVerdict, Labels, Policy, PolicyKey, Protocol, Verdict, parse_policies_in,
    trace,
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
        /// The namespace of the CiliumNetworkPolicy documents without metadata.namespace (as
        /// `kubectl apply -n`); those that name one keep it.
        #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        socket: AdminSocket,
    },
    /// Delete a policy from the server, by key: `namespace/name` for a CiliumNetworkPolicy
    /// (or `-n namespace name`), `name` for a CiliumClusterwideNetworkPolicy (a bare name with
    /// no clusterwide policy of that name means `default/name`).
    ///
    /// Example: meshauth policy delete default/demo1-allow-client1
    Delete {
        /// The policy's key (`namespace/name` or `name`), or its name with `-n`.
        key: String,
        /// The namespace of the CiliumNetworkPolicy named KEY.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
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
    load_in(files, DEFAULT_NAMESPACE)
}

/// The policies of `files`, CiliumNetworkPolicies without a namespace in `namespace`.
fn load_in(files: &[PathBuf], namespace: &str) -> anyhow::Result<Vec<Policy>> {
    let mut all = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let policies =
            parse_policies_in(&text, namespace).with_context(|| format!("{}", f.display()))?;
        all.extend(policies);
    }
    Ok(all)
}

/// The key `delete` names: KEY, or NAME in namespace `-n`.
fn delete_key(key: &str, namespace: Option<&str>) -> anyhow::Result<String> {
    match namespace {
        None => {
            key.parse::<PolicyKey>().map_err(anyhow::Error::msg)?;
            Ok(key.to_owned())
        }
        Some(_) if key.contains('/') => anyhow::bail!(
            "{key:?} is already a key (namespace/name): drop -n, or give only the name with -n"
        ),
        Some(ns) => {
            check_namespace(ns)?;
            let k = format!("{ns}/{key}");
            k.parse::<PolicyKey>().map_err(anyhow::Error::msg)?;
            Ok(k)
        }
    }
}

/// A label set as an endpoint of the trace: in namespace `default` unless it names one.
fn in_namespace(labels: Labels) -> anyhow::Result<Labels> {
    if labels.namespace().is_some() {
        return Ok(labels);
    }
    Ok(labels.with_namespace(DEFAULT_NAMESPACE)?)
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
        Sub::Apply {
            files,
            namespace,
            socket,
        } => {
            check_namespace(&namespace)?;
            // Validate locally first: the error names the file.
            load_in(&files, &namespace)?;
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
                    .apply_policies(meshauth_proto::admin::ApplyPoliciesRequest { yaml, namespace })
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
        Sub::Delete {
            key,
            namespace,
            socket,
        } => {
            let key = delete_key(&key, namespace.as_deref())?;
            block_on(async move {
                let mut c = socket.connect().await?;
                c.delete_policy(meshauth_proto::admin::DeletePolicyRequest { name: key.clone() })
                    .await
                    .map_err(rpc)?;
                out!("deleted policy {key}");
                Ok(())
            })?
        }
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
                            .map(|p| {
                                let name = p.name.rsplit('/').next().unwrap_or(&p.name);
                                serde_json::json!({
                                    "key": p.name,
                                    "namespace": (!p.namespace.is_empty()).then_some(&p.namespace),
                                    "name": name,
                                    "yaml": p.yaml,
                                })
                            })
                            .collect::<Vec<_>>()
                    )
                ),
                Output::Text => {
                    if list.is_empty() {
                        out!("no policies");
                    } else {
                        out!("{:<48} {:<20} KIND", "KEY", "NAMESPACE");
                    }
                    for p in &list {
                        let (ns, kind) = if p.namespace.is_empty() {
                            ("(clusterwide)", "CiliumClusterwideNetworkPolicy")
                        } else {
                            (p.namespace.as_str(), "CiliumNetworkPolicy")
                        };
                        out!("{:<48} {:<20} {kind}", p.name, ns);
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
            let t = trace(
                &policies,
                &in_namespace(src.clone())?,
                &in_namespace(dst.clone())?,
                protocol,
                port,
            );
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
