//! `meshauth policy ...`: validate policy files and trace a verdict, like `cilium policy trace`.

use std::path::PathBuf;

use anyhow::Context;
use meshauth_policy::labels::check_namespace;
use meshauth_policy::policy::DEFAULT_NAMESPACE;
use meshauth_policy::{
    AuthType, DirectionVerdict, Labels, PeerSpec, Policy, PolicyKey, Protocol, RuleRef, Verdict,
    parse_policies_in, trace_peers,
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
    /// Check CiliumNetworkPolicy files; exits non-zero with what is wrong and where. Names the
    /// policies that require authentication and how: once per identity pair, or per connection
    /// (annotation `meshauth.io/authentication: per-connection`).
    Validate {
        /// Policy files (multi-document YAML): `-f a.yaml b.yaml` or `-f a.yaml -f b.yaml`.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
    },
    /// Show whether SRC may reach DST on a port, what authentication it needs, and which
    /// policies (by key) and rules decided: the source's egress and the destination's ingress
    /// (a side that is not a pod enforces nothing).
    ///
    /// SRC and DST are labels (`app=web`, in namespace default unless they name
    /// `io.kubernetes.pod.namespace`), a pod of the server (`pod:NAME` or `pod:NAMESPACE/NAME`:
    /// its labels in its namespace), an entity (`world`, `host`, `remote-node`, `unmanaged`), an
    /// address outside the cluster (`192.0.2.1`) or a CIDR prefix (`192.0.2.0/24`: the
    /// identity of a prefix policies name). Without -f, the server's policies are traced.
    ///
    /// Example: meshauth policy trace -f demo.yaml --src app=client2 --dst app=demodeployment --dport 80/TCP
    Trace {
        /// Policy files: `-f a.yaml b.yaml` or `-f a.yaml -f b.yaml`; none: the server's
        /// policies.
        #[arg(short = 'f', long = "file", num_args = 1..)]
        files: Vec<PathBuf>,
        /// The source: labels, `pod:[NAMESPACE/]NAME`, an entity, an address or a prefix.
        #[arg(long, value_parser = parse_peer)]
        src: TracePeer,
        /// The destination, as the source.
        #[arg(long, value_parser = parse_peer)]
        dst: TracePeer,
        /// Destination port and protocol, e.g. 80/TCP, 53/UDP; for ICMP the type, e.g. 8/ICMP
        /// (echo request), 0/ICMP (echo reply). The protocol defaults to TCP.
        #[arg(long, value_parser = parse_dport)]
        dport: (u16, Protocol),
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        socket: AdminSocket,
    },
}

/// A side of a trace, as given on the command line.
#[derive(Debug, Clone)]
pub(crate) enum TracePeer {
    /// Labels (in namespace default unless they name one), an entity, an address or a prefix,
    /// and the text it was given as.
    Spec(PeerSpec, String),
    /// A pod the server knows: its labels in its namespace.
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

fn parse_peer(s: &str) -> Result<TracePeer, String> {
    let s = s.trim();
    if let Some(pod) = s.strip_prefix("pod:") {
        let (namespace, name) = pod.split_once('/').unwrap_or((DEFAULT_NAMESPACE, pod));
        check_namespace(namespace).map_err(|e| e.to_string())?;
        if name.is_empty() || name.contains('/') {
            return Err(format!(
                "{s:?} is not a pod: write pod:NAME or pod:NAMESPACE/NAME"
            ));
        }
        return Ok(TracePeer::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    }
    let spec = s.parse::<PeerSpec>().map_err(|e| {
        if s.contains(['=', '/']) || s.parse::<std::net::IpAddr>().is_ok() {
            e
        } else {
            format!(
                "{s:?} is not a peer: use labels (app=web), a pod (pod:NAME or pod:NAMESPACE/NAME), an entity (world, host, remote-node, unmanaged), an address (192.0.2.1) or a prefix (192.0.2.0/24)"
            )
        }
    })?;
    let spec = match spec {
        PeerSpec::Endpoint(labels) => {
            PeerSpec::Endpoint(in_namespace(labels).map_err(|e| e.to_string())?)
        }
        other => other,
    };
    Ok(TracePeer::Spec(spec, s.to_owned()))
}

/// A side of a trace resolved to a [`PeerSpec`], and how to show it.
struct Resolved {
    spec: PeerSpec,
    /// What was asked for (`app=web`, `pod:default/web-1`, `world`, `192.0.2.1`).
    given: String,
    /// JSON description: kind and what identifies it.
    json: serde_json::Value,
}

fn resolve(peer: TracePeer, pods: &[meshauth_proto::node::Endpoint]) -> anyhow::Result<Resolved> {
    Ok(match peer {
        TracePeer::Pod { namespace, name } => {
            let pod = pods
                .iter()
                .find(|p| p.namespace == namespace && p.name == name)
                .ok_or_else(|| {
                    anyhow::anyhow!("no pod {namespace}/{name} (see `meshauth pod list`)")
                })?;
            let labels =
                Labels::from_pairs(pod.labels.iter().map(|(k, v)| (k.as_str(), v.clone())))?
                    .with_namespace(&namespace)?;
            Resolved {
                given: format!("pod:{namespace}/{name}"),
                json: serde_json::json!({
                    "kind": "pod",
                    "pod": format!("{namespace}/{name}"),
                    "node": pod.node,
                    "identity": pod.identity,
                    "labels": labels.to_string(),
                }),
                spec: PeerSpec::Endpoint(labels),
            }
        }
        TracePeer::Spec(spec, given) => {
            let json = match &spec {
                PeerSpec::Endpoint(l) => {
                    serde_json::json!({"kind": "labels", "labels": l.to_string()})
                }
                PeerSpec::World => serde_json::json!({"kind": "world"}),
                PeerSpec::Host => serde_json::json!({"kind": "host"}),
                PeerSpec::RemoteNode => serde_json::json!({"kind": "remote-node"}),
                PeerSpec::Unmanaged => serde_json::json!({"kind": "unmanaged"}),
                PeerSpec::Address(a) => {
                    serde_json::json!({"kind": "address", "address": a.to_string()})
                }
                PeerSpec::Cidr(c) => serde_json::json!({
                    "kind": "cidr",
                    "cidr": c.to_string(),
                    "labels": c.labels(),
                }),
            };
            Resolved { spec, given, json }
        }
    })
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
    if let Some(ns) = labels.namespace() {
        check_namespace(ns)?;
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
        AuthType::PerConnection => "per-connection",
        AuthType::TestAlwaysFail => "test-always-fail",
    }
}

fn rule_text(r: &RuleRef) -> String {
    format!("{}/{}[{}]", r.policy, r.section, r.index)
}

fn direction_json(d: &DirectionVerdict, side: &PeerSpec) -> serde_json::Value {
    serde_json::json!({
        "enforced": matches!(side, PeerSpec::Endpoint(_)),
        "selected": d.selected,
        "selected_by": d.selected_by,
        "verdict": verdict_word(d.verdict),
        "auth": auth_word(d.auth),
        "decided_by": d.decided_by.iter().map(rule_text).collect::<Vec<_>>(),
        "rules": d.decided_by.iter().map(|r| serde_json::json!({
            "policy": r.policy,
            "spec": r.rule,
            "section": r.section,
            "index": r.index,
        })).collect::<Vec<_>>(),
    })
}

fn direction_text(name: &str, d: &DirectionVerdict, side: &PeerSpec) {
    let why = if !matches!(side, PeerSpec::Endpoint(_)) {
        "not a pod: nothing enforced on this side".to_string()
    } else if !d.selected {
        "no policy selects it: allowed".to_string()
    } else if d.decided_by.is_empty() {
        format!(
            "no rule matches: default deny (selected by {})",
            d.selected_by.join(", ")
        )
    } else {
        d.decided_by
            .iter()
            .map(rule_text)
            .collect::<Vec<_>>()
            .join(", ")
    };
    out!(
        "  {name:<8} {:<8} auth {:<16} {why}",
        verdict_word(d.verdict),
        auth_word(d.auth)
    );
}

/// Runs `f` on a current-thread runtime and returns its value.
fn block_on_value<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
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
            for p in &policies {
                let modes: std::collections::BTreeSet<&str> = p
                    .rules
                    .iter()
                    .flat_map(|r| r.ingress.iter().chain(&r.egress))
                    .map(|pr| auth_word(pr.auth.auth_type()))
                    .filter(|w| *w != "none")
                    .collect();
                if !modes.is_empty() {
                    let modes: Vec<&str> = modes.into_iter().collect();
                    out!(
                        "  {}: authentication {}",
                        p.key(),
                        modes
                            .iter()
                            .map(|m| match *m {
                                "required" => "required (once per identity pair)",
                                "per-connection" =>
                                    "per connection (a fresh handshake for each new connection)",
                                other => other,
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        Sub::Trace {
            files,
            src,
            dst,
            dport: (port, protocol),
            output,
            socket,
        } => {
            let pods_needed =
                matches!(src, TracePeer::Pod { .. }) || matches!(dst, TracePeer::Pod { .. });
            let mut policies = if files.is_empty() {
                None
            } else {
                Some(load(&files)?)
            };
            let mut pods = Vec::new();
            if policies.is_none() || pods_needed {
                let (from_server, listed) = block_on_value(async move {
                    let mut c = socket.connect().await?;
                    let docs = if files.is_empty() {
                        Some(
                            c.list_policies(meshauth_proto::admin::ListPoliciesRequest {})
                                .await
                                .map_err(rpc)?
                                .into_inner()
                                .policies,
                        )
                    } else {
                        None
                    };
                    let pods = if pods_needed {
                        c.list_endpoints(meshauth_proto::admin::ListEndpointsRequest {})
                            .await
                            .map_err(rpc)?
                            .into_inner()
                            .endpoints
                    } else {
                        vec![]
                    };
                    Ok((docs, pods))
                })?;
                if let Some(docs) = from_server {
                    let mut all = Vec::new();
                    for d in docs {
                        all.extend(
                            parse_policies_in(&d.yaml, DEFAULT_NAMESPACE)
                                .with_context(|| format!("the server's policy {}", d.name))?,
                        );
                    }
                    policies = Some(all);
                }
                pods = listed;
            }
            let policies = policies.unwrap_or_default();
            let (src, dst) = (resolve(src, &pods)?, resolve(dst, &pods)?);
            let t = trace_peers(
                &policies,
                src.spec.as_peer(),
                dst.spec.as_peer(),
                protocol,
                port,
            );
            let proto = format!("{protocol:?}").to_uppercase();
            match output {
                Output::Json => out!(
                    "{}",
                    serde_json::json!({
                        "src": src.given,
                        "dst": dst.given,
                        "src_peer": src.json,
                        "dst_peer": dst.json,
                        "dport": port,
                        "protocol": proto,
                        "verdict": verdict_word(t.verdict),
                        "auth": auth_word(t.auth),
                        "egress": direction_json(&t.egress, &src.spec),
                        "ingress": direction_json(&t.ingress, &dst.spec),
                    })
                ),
                Output::Text => {
                    let what = if protocol.is_icmp() { "type " } else { "" };
                    out!("{} -> {} {what}{port}/{proto}", src.given, dst.given);
                    direction_text("egress", &t.egress, &src.spec);
                    direction_text("ingress", &t.ingress, &dst.spec);
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
