//! A client of the admin socket, for the CLI and tests.

use std::path::Path;

use anyhow::Context;
use meshauth_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

/// Connects to the server's admin socket at `path`.
pub async fn connect(path: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let channel = meshauth_proto::uds::connect(path).await.with_context(|| {
        format!(
            "cannot reach the server's admin socket {} (is `meshauth server run` running? pass --admin-socket)",
            path.display()
        )
    })?;
    Ok(AdminClient::new(channel))
}
