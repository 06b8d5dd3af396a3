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

/// Turns a gRPC status into an error whose text is the server's message (what the status code
/// means when the message is empty), followed by the transport's cause if there is one.
pub(crate) fn rpc(status: tonic::Status) -> anyhow::Error {
    let message = status.message().trim();
    let mut text = if message.is_empty() {
        format!(
            "the request failed: {} (gRPC {:?})",
            status.code().description(),
            status.code()
        )
    } else {
        message.to_owned()
    };
    if let Some(source) = std::error::Error::source(&status) {
        let causes = join_causes(std::iter::successors(Some(source), |e| e.source()));
        if !causes.is_empty() && !text.ends_with(&causes) {
            text.push_str(": ");
            text.push_str(&causes);
        }
    }
    anyhow::anyhow!("{text}")
}

/// An error as one line: its causes joined by `: `, each once (wrappers such as tonic's
/// transport error print their source's text, which is then their source), empty ones left
/// out, line breaks folded; never empty.
pub(crate) fn error_line(err: &anyhow::Error) -> String {
    let line = join_causes(err.chain());
    if line.is_empty() {
        "failed without saying why (run again with --log debug)".into()
    } else {
        line
    }
}

fn join_causes<'a>(causes: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in causes {
        let text = cause.to_string();
        let text = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Writes command output (see the `out!` macro). When the reader has gone (`meshauth observe |
/// head -1`: EPIPE), the process exits at once with status 0, as `head` intended, instead of
/// panicking like `println!`; any other write error ends it with a one-line error and status 1.
///
/// This is a writer, not `signal(SIGPIPE, SIG_DFL)`: that needs `unsafe` (the workspace denies
/// it), and it would also kill `server run` and `agent run` whenever a peer closes a socket
/// they are writing to.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let written = {
        let mut stdout = std::io::stdout().lock();
        stdout.write_fmt(args).and_then(|()| stdout.flush())
    };
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// The same for output still written with `println!` (which panics on EPIPE): a panic hook
/// that ends the process with status 0, and without the panic message, when the panic is
/// `println!` failing on a closed stdout. Every other panic goes to the default hook.
pub(crate) fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's `print!` family panics with "failed printing to stdout: <io::Error>".
        if message.starts_with("failed printing to stdout")
            && (message.contains("Broken pipe") || message.contains("os error 32"))
        {
            std::process::exit(0);
        }
        default(info);
    }));
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
    // `auth list` of a node holding 100,000 entries is about 7 MB: above tonic's 4 MiB default.
    Ok(
        meshauth_proto::agent::agent_admin_client::AgentAdminClient::new(channel)
            .max_decoding_message_size(AGENT_REPLY_LIMIT),
    )
}

/// The largest reply the CLI takes from an agent's admin socket.
const AGENT_REPLY_LIMIT: usize = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_say_each_cause_once_and_are_never_empty() {
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl std::fmt::Display for Repeats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(&self.0, f)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = anyhow::Error::new(Repeats(refused)).context("cannot reach X");
        assert_eq!(error_line(&err), "cannot reach X: connection refused");

        let err = anyhow::anyhow!("").context("two\n  lines");
        assert_eq!(error_line(&err), "two lines");
        assert!(!error_line(&anyhow::anyhow!("")).is_empty());

        let status = tonic::Status::new(tonic::Code::Unavailable, "");
        let text = error_line(&rpc(status));
        assert!(text.contains("currently unavailable"), "{text}");
    }
}
