//! `meshauth`: one binary for the server, the node agent, the lab and operators.
//!
//! Each subcommand group lives in its own module with a clap `Cmd` and a `run` function; this file
//! only parses arguments, installs logging and dispatches.

use clap::{Parser, Subcommand};

mod lab;
mod policy;

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
    /// Validate policies and trace a verdict between two label sets.
    Policy(policy::Cmd),
    /// Build a cluster of network namespaces on this machine (needs root).
    Lab(lab::Cmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Lab(cmd) => lab::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, causes chained: the user sees what is wrong and what to check.
            eprintln!("error: {err:#}");
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
