//! `meshauth lab ...`: the network-namespace lab (filled in by the datapath work).

/// Lab commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {}

pub(crate) fn run(_cmd: Cmd) -> anyhow::Result<()> {
    anyhow::bail!("lab commands are not built yet")
}
