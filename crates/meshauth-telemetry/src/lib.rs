//! What every long-running meshauth process needs:
//!
//! - one HTTP listener with `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//!   `/readyz` (it can do its job: every [`Readiness`] condition is ready) ([`serve_http`]);
//! - a [`Supervisor`] for its long-running tasks, so that none fails silently;
//! - its local Unix sockets ([`bind_unix_socket`]);
//! - its data directory, private and locked to one process ([`lock_data_dir`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use tokio::net::TcpListener;

mod data_dir;
mod readiness;
mod supervisor;

pub use data_dir::{DataDirError, DataDirLock, LOCK_FILE, lock_data_dir};

pub use readiness::{NOT_YET_REPORTED, Readiness, ReadyHandle};
pub use supervisor::{
    BoxError, CONNECTION_GRACE, DEFAULT_GRACE, MIN_BACKOFF, Restart, Supervisor, SupervisorError,
    with_connection_grace,
};
/// The token the [`Supervisor`] hands its tasks (re-exported so callers need no `tokio-util`).
pub use tokio_util::sync::CancellationToken;

/// Produces the metrics text on each scrape.
pub type Encoder = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves the three endpoints until `shutdown` completes. `/readyz` answers 200 `ready` while
/// every condition of `readiness` is ready, and otherwise 503 with one `name: reason` line per
/// condition that is not ready.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Encoder,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics();
                async move {
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let status = if readiness.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = readiness.report();
                async move { (status, body) }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Why a local socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another live process answers on the path.
    #[error("{path} is in use by another running process (stop it or use {flag})")]
    InUse {
        /// The socket path.
        path: String,
        /// The flag that chooses another path.
        flag: String,
    },
    /// A filesystem step failed.
    #[error("cannot {what} {path}: {source} (use {flag})")]
    Io {
        /// The step.
        what: &'static str,
        /// The path.
        path: String,
        /// The flag that chooses another path.
        flag: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds a Unix socket at `path` with file mode `mode`: creates the parent directory, replaces
/// a stale socket file (one nobody answers on), refuses one a live process serves. `flag` names
/// the command-line flag that picks the path, for error messages.
///
/// The socket is never connectable with a wider mode than `mode`: it is bound inside a fresh
/// directory of mode 0700 next to `path` (same filesystem), given its mode there, and only then
/// renamed onto `path`. Binding at `path` and then chmodding would leave, under a permissive
/// umask, a window in which anyone could connect to an admin socket; setting the umask around
/// `bind` would need `unsafe` (and is process-wide, racing other threads' file creation). A Unix
/// socket keeps working when its file is renamed: clients find it by the inode. The rename also
/// replaces a stale socket file atomically. (The listener's `local_addr` names the temporary
/// path; nothing here uses it.)
pub async fn bind_unix_socket(
    path: &std::path::Path,
    mode: u32,
    flag: &str,
) -> Result<tokio::net::UnixListener, SocketError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &'static str, source: std::io::Error| SocketError::Io {
        what,
        path: path.display().to_string(),
        flag: flag.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| io("create the directory of", e))?;
    // A stale socket file (nobody answers) is replaced by the rename below.
    if path.exists() && tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(SocketError::InUse {
            path: path.display().to_string(),
            flag: flag.to_owned(),
        });
    }
    // Short names: socket paths are limited to 107 bytes.
    let private = tempfile::Builder::new()
        .prefix(".s")
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(|e| io("create a private directory next to", e))?;
    let staged = private.path().join("s");
    let listener = tokio::net::UnixListener::bind(&staged).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("set the mode of", e))?;
    std::fs::rename(&staged, path).map_err(|e| io("move the socket into place at", e))?;
    // `private` is empty now and removed when dropped.
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn sockets_refuse_live_and_replace_stale() {
        let dir = std::env::temp_dir().join(format!("meshauth-telemetry-{}", std::process::id()));
        let path = dir.join("sub/a.sock");
        let first = bind_unix_socket(&path, 0o600, "--x").await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = bind_unix_socket(&path, 0o600, "--x").await.unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("use --x"));
        drop(first);
        // The file is left behind by the dropped listener: stale, so it is replaced.
        let second = bind_unix_socket(&path, 0o666, "--x").await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        // Bound in a private directory and renamed into place: it answers at `path`, and the
        // private directory is gone.
        let client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_server_side, _) = second.accept().await.unwrap();
        drop(client);
        let names: Vec<_> = std::fs::read_dir(dir.join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.sock"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
