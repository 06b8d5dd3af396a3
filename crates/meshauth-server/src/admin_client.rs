//! A client of the admin socket, for the CLI and tests.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use meshauth_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

/// Connects to the server's admin socket at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let path: PathBuf = path.to_owned();
    let shown = path.display().to_string();
    // The URI is required by tonic but unused: the connector below dials the socket.
    let channel = Endpoint::try_from("http://admin.socket")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| {
            format!("cannot reach the server's admin socket {shown} (is `meshauth server run` running? pass --admin-socket)")
        })?;
    Ok(AdminClient::new(channel))
}
