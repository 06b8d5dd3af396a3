//! `meshauth workload fetch`: a Workload API client for operators, like `spire-agent api fetch`.

use std::path::PathBuf;

use anyhow::Context;
use meshauth_agent::defaults;
use meshauth_proto::workload::X509svidRequest;
use meshauth_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::common::{Output, block_on, rpc};

/// Workload API commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Cmd {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Fetch this process's X.509-SVIDs from the local agent, as any workload would.
    ///
    /// The agent identifies the caller by its uid, gid, executable and network namespace, so
    /// the result depends on who runs this command.
    Fetch {
        /// The agent's Workload API socket.
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = defaults::WORKLOAD_SOCKET, value_parser = socket_path)]
        socket: PathBuf,
        /// Write svid.pem, svid.key and bundle.pem for the first SVID into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Accepts a path or a `unix:` URI, as `SPIFFE_ENDPOINT_SOCKET` may hold either.
fn socket_path(s: &str) -> Result<PathBuf, String> {
    let path = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"))
        .unwrap_or(s);
    if path.is_empty() {
        return Err("give the socket path, e.g. /run/meshauth/workload.sock".into());
    }
    Ok(PathBuf::from(path))
}

fn split_der(concatenated: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    // DER certificates are SEQUENCEs with a definite length: walk them one by one.
    let mut out = Vec::new();
    let mut rest = concatenated;
    while !rest.is_empty() {
        let len = der_len(rest).context("the agent sent malformed DER")?;
        let (one, tail) = rest.split_at(len);
        out.push(CertificateDer::from(one.to_vec()));
        rest = tail;
    }
    Ok(out)
}

fn der_len(b: &[u8]) -> Option<usize> {
    if b.first()? != &0x30 {
        return None;
    }
    let first = *b.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = b.get(2..2 + n)?;
        (
            bytes.iter().fold(0usize, |acc, x| (acc << 8) | *x as usize),
            2 + n,
        )
    };
    let total = header.checked_add(len)?;
    (total <= b.len()).then_some(total)
}

pub(crate) fn run(cmd: Cmd) -> anyhow::Result<()> {
    let Sub::Fetch {
        socket,
        write,
        output,
    } = cmd.command;
    block_on(async move {
        let shown = socket.display().to_string();
        let channel = meshauth_proto::uds::connect(&socket)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the Workload API at {shown} (is the agent running? pass --socket)"
                )
            })?;
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut stream = client.fetch_x509svid(req).await.map_err(rpc)?.into_inner();
        let resp = stream
            .message()
            .await
            .map_err(rpc)?
            .context("the agent closed the stream without an answer")?;
        let mut listed = Vec::new();
        for svid in &resp.svids {
            let chain = split_der(&svid.x509_svid)?;
            let leaf = chain.first().context("empty SVID chain")?;
            let serial = meshauth_spiffe::serial_of(leaf)?;
            listed.push((svid, chain, serial));
        }
        match output {
            Output::Json => {
                let v: Vec<_> = listed
                    .iter()
                    .map(|(s, chain, serial)| {
                        serde_json::json!({"spiffe_id": s.spiffe_id, "serial": serial, "chain_length": chain.len()})
                    })
                    .collect();
                out!("{}", serde_json::Value::from(v));
            }
            Output::Text => {
                for (s, _, serial) in &listed {
                    out!("{}  serial {serial}", s.spiffe_id);
                }
            }
        }
        if let (Some(dir), Some((svid, chain, _))) = (write, listed.first()) {
            write_svid_files(&dir, chain, &svid.x509_svid_key, &svid.bundle)?;
        }
        Ok(())
    })
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `svid.pem` (0644), `svid.key` (0600) and `bundle.pem` (0644) into `dir`.
///
/// A missing `dir` (and its missing parents) is created with mode 0700; an existing one keeps
/// its mode (it is the user's). Each file is replaced atomically through a fresh temporary file
/// that has its mode before any data is written ([`meshauth_agent::identity::write_atomic`]):
/// an existing `svid.key` of a wider mode, or a temporary file left by an interrupted run,
/// never makes the key readable.
fn write_svid_files(
    dir: &std::path::Path,
    chain: &[CertificateDer<'_>],
    key_der: &[u8],
    bundle_der: &[u8],
) -> anyhow::Result<()> {
    use meshauth_agent::identity::write_atomic;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let certs: String = chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect();
    let bundle: String = split_der(bundle_der)?
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect();
    write_atomic(
        &dir.join("svid.key"),
        pem_block("PRIVATE KEY", key_der).as_bytes(),
        0o600,
    )?;
    write_atomic(&dir.join("svid.pem"), certs.as_bytes(), 0o644)?;
    write_atomic(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
    // Check that what was written reads back.
    CertificateDer::pem_file_iter(dir.join("svid.pem"))?.collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "wrote svid.pem, svid.key (0600) and bundle.pem to {}",
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn splits_concatenated_der() {
        let a = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let mut both = a.to_vec();
        both.extend_from_slice(&long);
        let parts = super::split_der(&both).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].len(), long.len());
        assert!(super::split_der(&[0x30, 0x05, 1]).is_err());
        assert!(super::split_der(&[0x31, 0x00]).is_err());
    }
}
