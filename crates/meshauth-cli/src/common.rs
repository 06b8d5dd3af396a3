//! Flags and helpers shared by the operator commands.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_server::defaults;

/// Where the server's admin socket is.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AdminSocket {
    /// Path of the server's admin socket.
    #[arg(long, env = "MESHAUTH_ADMIN_SOCKET", default_value = defaults::ADMIN_SOCKET)]
    pub(crate) admin_socket: PathBuf,
}

impl AdminSocket {
    pub(crate) async fn connect(
        &self,
    ) -> anyhow::Result<meshauth_proto::admin::admin_client::AdminClient<tonic::transport::Channel>>
    {
        meshauth_server::admin_client::connect(&self.admin_socket).await
    }
}

/// Output format of list commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Parses `600s`, `10m`, `1h`, `1h30m` (humantime syntax).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e}: write a duration such as 600s, 10m or 1h"))?;
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

/// A Unix timestamp in RFC 3339 (UTC), or `-` for 0.
pub(crate) fn time(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix as u64)).to_string()
}

/// Seconds from now until `unix` (negative when past).
pub(crate) fn seconds_left(unix: i64) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    unix - now
}

/// Turns a gRPC status into an error whose text is the server's message.
pub(crate) fn rpc(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// Runs an async command on a small runtime (CLI commands are short).
pub(crate) fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Connects to an agent's admin socket.
pub(crate) async fn agent_client(
    path: &std::path::Path,
) -> anyhow::Result<
    meshauth_proto::agent::agent_admin_client::AgentAdminClient<tonic::transport::Channel>,
> {
    use anyhow::Context;
    let channel = meshauth_proto::uds::connect(path).await.with_context(|| {
        format!(
            "cannot reach the agent's admin socket {} (is `meshauth agent run` running? pass --agent-socket)",
            path.display()
        )
    })?;
    Ok(meshauth_proto::agent::agent_admin_client::AgentAdminClient::new(channel))
}
