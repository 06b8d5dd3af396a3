//! `meshauth lab ...`: a cluster of network namespaces on this machine (needs root).

use anyhow::Context;
use meshauth_lab::{Lab, parse_labels};

use crate::common::Output;

/// Lab commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    /// The lab's name: the prefix of every namespace, link and pin it creates.
    #[arg(
        long = "lab",
        global = true,
        env = "MESHAUTH_LAB",
        default_value = "ma"
    )]
    lab: String,
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Build N nodes on an underlay bridge (node i: 10.199.0.i, pods 10.200.i.0/24).
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=50))]
        nodes: u8,
    },
    /// Pods of the lab.
    Pod {
        #[command(subcommand)]
        command: PodSub,
    },
    /// Run a command inside a pod's network namespace, e.g. `meshauth lab exec client1 -- curl demodeployment`.
    Exec {
        /// The pod.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// List the lab's nodes and pods, and every namespace carrying its prefix.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove everything the lab created (also after a crash); safe to repeat.
    Down,
    /// Attach or detach the eBPF datapath on every pod, with a static allow-all policy
    /// (no agents, no handshakes): for benchmarks and experiments.
    Datapath {
        #[command(subcommand)]
        command: DatapathSub,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DatapathSub {
    /// Load the programs in every node, attach them to every pod and program the maps.
    Attach {
        /// Require authentication for every pair and pre-insert the auth entries (1 h), so
        /// that packets take the full policy + auth path.
        #[arg(long)]
        auth_all: bool,
    },
    /// Detach the programs and remove their pinned maps and links.
    Detach,
}

#[derive(Debug, clap::Subcommand)]
enum PodSub {
    /// Add a pod on a node.
    Add {
        /// Pod name (also resolvable from every pod).
        name: String,
        /// The node, e.g. n1.
        #[arg(long)]
        node: String,
        /// Its namespace (place it there with `meshauth pod create --namespace` too; pod names
        /// are unique in the lab whatever their namespace).
        #[arg(short = 'n', long, default_value = meshauth_lab::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Labels, `key=value`; repeat or separate with commas.
        #[arg(long = "labels")]
        labels: Vec<String>,
    },
    /// Remove a pod.
    Remove {
        /// Pod name.
        name: String,
    },
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    let lab = Lab::new(&cmd.lab)?;
    match cmd.command {
        Sub::Up { nodes } => {
            let state = lab.up(nodes)?;
            for n in &state.nodes {
                println!(
                    "node {}  netns {}  underlay {}  pods {}/24",
                    n.name, n.netns, n.underlay_ip, n.pod_cidr
                );
            }
        }
        Sub::Pod {
            command:
                PodSub::Add {
                    name,
                    node,
                    namespace,
                    labels,
                },
        } => {
            let pod = lab.add_pod_in(&namespace, &name, &node, parse_labels(&labels)?)?;
            println!(
                "pod {}/{} on {}  ip {}  netns {}",
                pod.namespace, pod.name, pod.node, pod.ip, pod.netns
            );
        }
        Sub::Pod {
            command: PodSub::Remove { name },
        } => {
            lab.remove_pod(&name)?;
            println!("removed pod {name}");
        }
        Sub::Exec { pod, argv } => {
            let status = lab
                .exec(&pod, &argv)?
                .status()
                .with_context(|| format!("cannot run {:?} in pod {pod}", argv.first()))?;
            if !status.success() {
                anyhow::bail!("command exited with {status}");
            }
        }
        Sub::Status { output } => {
            let (state, live) = lab.status()?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "lab": lab.name(), "state": state, "namespaces": live })
                ),
                Output::Text => match state {
                    None if live.is_empty() => println!("lab {} is down", lab.name()),
                    None => println!(
                        "lab {} has no state file but namespaces remain: {} (run `meshauth lab down`)",
                        lab.name(),
                        live.join(", ")
                    ),
                    Some(s) => {
                        for n in &s.nodes {
                            println!(
                                "node {:<4} {}  pods {}/24",
                                n.name, n.underlay_ip, n.pod_cidr
                            );
                        }
                        for p in &s.pods {
                            let labels: Vec<String> =
                                p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            println!(
                                "pod  {:<24} {:<4} {:<15} {}",
                                format!("{}/{}", p.namespace, p.name),
                                p.node,
                                p.ip,
                                labels.join(",")
                            );
                        }
                    }
                },
            }
        }
        Sub::Datapath { command } => datapath(&lab, command)?,
        Sub::Down => {
            lab.down()?;
            println!("lab {} is down", lab.name());
        }
    }
    Ok(())
}

/// Identities for the static datapath setup: one per pod, from 1000 up, in pod order.
fn datapath(lab: &Lab, command: DatapathSub) -> anyhow::Result<()> {
    use meshauth_datapath::{
        AuthKey, AuthType, Datapath, Direction, EndpointId, EndpointInfo, PolicyEntry, PortRange,
        Verdict, netns,
    };
    use meshauth_policy::{IdentityId, NodeId};

    let state = lab.state()?.ok_or_else(|| {
        anyhow::anyhow!("lab {} is not up: run `meshauth lab up` first", lab.name())
    })?;
    let identity = |i: usize| IdentityId::new(1000 + i as u32);
    let node_id = |name: &str| -> NodeId {
        NodeId::new(
            state
                .nodes
                .iter()
                .find(|n| n.name == name)
                .map(|n| u32::from(n.index))
                .unwrap_or(0),
        )
    };
    for node in &state.nodes {
        let pin = Datapath::pin_dir_for(&node.netns);
        match command {
            DatapathSub::Detach => {
                Datapath::remove_pins(&pin)
                    .with_context(|| format!("removing {}", pin.display()))?;
            }
            DatapathSub::Attach { auth_all } => {
                let pods: Vec<(usize, meshauth_lab::Pod)> = state
                    .pods
                    .iter()
                    .cloned()
                    .enumerate()
                    .filter(|(_, p)| p.node == node.name)
                    .collect();
                let veths: Vec<String> = pods.iter().map(|(_, p)| p.host_veth.clone()).collect();
                let pin2 = pin.clone();
                let mut dp = netns::run_in(
                    &netns::named(&node.netns),
                    move || -> anyhow::Result<Datapath> {
                        let mut dp = Datapath::load(&pin2)?;
                        for v in &veths {
                            dp.attach(v)?;
                        }
                        Ok(dp)
                    },
                )??;
                let auth = if auth_all {
                    AuthType::Required
                } else {
                    AuthType::None
                };
                for (i, p) in state.pods.iter().enumerate() {
                    dp.set_ipcache(p.ip, 32, identity(i), node_id(&p.node))?;
                }
                for (i, p) in &pods {
                    dp.set_endpoint(
                        p.host_ifindex,
                        &EndpointInfo {
                            id: EndpointId(*i as u32 + 1),
                            identity: identity(*i),
                            ipv4: p.ip,
                            policy_gen: 1,
                        },
                    )?;
                    let all = |direction| PolicyEntry {
                        direction,
                        remote: None,
                        protocol: None,
                        ports: PortRange::ANY,
                        verdict: Verdict::Allow,
                        auth,
                    };
                    dp.set_policy(
                        EndpointId(*i as u32 + 1),
                        &[all(Direction::Egress), all(Direction::Ingress)],
                    )?;
                    if auth_all {
                        let expires =
                            std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                        for (j, q) in state.pods.iter().enumerate() {
                            dp.insert_auth(
                                AuthKey {
                                    local: identity(*i),
                                    remote: identity(j),
                                    remote_node: node_id(&q.node),
                                    auth_type: AuthType::Required,
                                    connection: None,
                                },
                                expires,
                            )?;
                        }
                    }
                }
                println!(
                    "node {}: datapath attached to {} pods{}",
                    node.name,
                    pods.len(),
                    if auth_all {
                        " (authentication required, pre-authenticated)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}
