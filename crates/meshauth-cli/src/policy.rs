//! `meshauth policy ...`: validate and trace policies (filled in by the policy work).

/// Policy commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {}

pub(crate) fn run(_cmd: Cmd) -> anyhow::Result<()> {
    anyhow::bail!("policy commands are not built yet")
}
