//! `meshauth`: one binary for the server, the node agent, the lab and operators.
//!
//! Each subcommand group lives in its own module with a clap `Cmd` and a `run` function; this file
//! only parses arguments, installs logging and dispatches.

use clap::{Parser, Subcommand};

/// `println!` for command output: when the reader of stdout has gone (`meshauth observe | head
/// -1`), the process ends quietly instead of panicking. See [`common::write_stdout`].
macro_rules! out {
    () => {
        $crate::common::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::common::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod agent;
mod auth;
mod bundle;
mod cluster;
mod common;
mod demo;
mod entry;
mod lab;
mod lab_source;
mod observe;
mod policy;
mod server;
mod status;
mod token;
mod workload;

/// meshauth: SPIFFE identities for workloads, mutual authentication enforced in the kernel.
#[derive(Debug, Parser)]
#[command(name = "meshauth", version, propagate_version = true)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `meshauth_server=debug`.
    #[arg(long, global = true, env = "MESHAUTH_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the walkthrough on a lab: policies, agents, authentication, requests (needs root).
    Demo(demo::Cmd),
    /// The server, its CA, agents and registry counts at a glance.
    Status(status::Cmd),
    /// Run the identity server, or check its health.
    Server(server::Cmd),
    /// Run a node agent, ask it what it holds; list, ban and evict agents on the server.
    Agent(agent::Cmd),
    /// Show flows and auth events from the agents (like `hubble observe`).
    Observe(observe::Cmd),
    /// List the identity pairs agents have authenticated.
    Auth(auth::Cmd),
    /// Create single-use join tokens for node attestation.
    Token(token::Cmd),
    /// Register workload identities (registration entries).
    Entry(entry::Cmd),
    /// Show the trust bundle.
    Bundle(bundle::Cmd),
    /// List the identities the server allocated for label sets.
    Identity(cluster::IdentityCmd),
    /// List pods: where the control plane placed them and what their nodes reported (as `pod list`).
    Endpoint(cluster::EndpointCmd),
    /// Place pods on nodes (the orchestrator side), delete and list them.
    Pod(cluster::PodCmd),
    /// Fetch SVIDs from the local agent's Workload API, as a workload would.
    Workload(workload::Cmd),
    /// Validate, trace, apply, list and delete network policies.
    Policy(policy::Cmd),
    /// Build a cluster of network namespaces on this machine (needs root).
    Lab(lab::Cmd),
}

fn main() -> std::process::ExitCode {
    common::quiet_on_closed_stdout();
    // Usage errors go out whole, as clap renders them (the missing argument's name, "did you
    // mean", possible values), with exit code 2; help and version on stdout with 0.
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Demo(cmd) => demo::run(cmd),
        Command::Server(cmd) => server::run(cmd),
        Command::Status(cmd) => status::run(cmd),
        Command::Agent(cmd) => agent::run(cmd),
        Command::Token(cmd) => token::run(cmd),
        Command::Auth(cmd) => auth::run(cmd),
        Command::Observe(cmd) => observe::run(cmd),
        Command::Entry(cmd) => entry::run(cmd),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Identity(cmd) => cluster::run_identity(cmd),
        Command::Endpoint(cmd) => cluster::run_endpoint(cmd),
        Command::Pod(cmd) => cluster::run_pod(cmd),
        Command::Workload(cmd) => workload::run(cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Lab(cmd) => lab::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, each cause once: the user sees what is wrong and what to check.
            eprintln!("error: {}", common::error_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr so that stdout stays machine-readable (`-o json`, tokens).
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
