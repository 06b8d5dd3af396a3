//! `meshauth bundle show`: the trust bundle, as PEM or SPIFFE JSON (JWKS).

use anyhow::Context;
use meshauth_proto::admin::GetBundleRequest;
use meshauth_spiffe::{TrustDomain, X509Bundle};
use rustls::pki_types::CertificateDer;

use crate::common::{AdminSocket, block_on, rpc};

/// Bundle commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

/// Bundle encodings.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
enum Format {
    /// Concatenated PEM CA certificates (what `--trust-bundle` of an agent takes).
    #[default]
    Pem,
    /// The SPIFFE bundle format (a JWK set with `x509-svid` keys).
    Spiffe,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Print the trust domain's current bundle (every non-expired CA).
    Show {
        /// Encoding.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        #[command(flatten)]
        socket: AdminSocket,
    },
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd.command {
        Sub::Show { format, socket } => block_on(async move {
            let mut client = socket.connect().await?;
            let b = client
                .get_bundle(GetBundleRequest {})
                .await
                .map_err(rpc)?
                .into_inner();
            let td: TrustDomain = b
                .trust_domain
                .parse()
                .context("the server sent an invalid trust domain")?;
            let bundle = X509Bundle {
                trust_domain: td,
                authorities: b
                    .authorities
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect(),
                sequence: b.sequence,
                refresh_hint: (b.refresh_hint_seconds > 0)
                    .then(|| std::time::Duration::from_secs(b.refresh_hint_seconds as u64)),
            };
            match format {
                Format::Pem => crate::common::write_stdout(format_args!("{}", bundle.to_pem())),
                Format::Spiffe => out!("{}", bundle.to_jwks_json()),
            }
            Ok(())
        }),
    }
}
