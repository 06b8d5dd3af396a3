//! Node attestation: how the agent obtains a node SVID when it has none the server accepts, at
//! its first start and again whenever its SVID expired (a server outage longer than the SVID
//! lifetime) or the server no longer knows it (evicted).
//!
//! - x509pop ([`X509PopFiles`]): proof of possession of an operator-issued node certificate
//!   ([`meshauth_tls::x509pop`]). Repeatable, so a node comes back by itself after any outage.
//! - A join token: single use. A node whose SVID expired needs a new one. With
//!   `--join-token-file`, the agent reads the file again on every attempt, so writing a new
//!   token there (`meshauth token generate --node NAME`) is the whole recovery: no restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use meshauth_proto::node::{AttestJoinTokenRequest, AttestX509PopRequest};
use meshauth_spiffe::{TrustDomain, X509Bundle};
use meshauth_tls::SharedBundle;
use meshauth_tls::x509pop::{EXPORTER_LEN, NodeCredential};

use crate::identity::NodeSvid;
use crate::manager::ServerList;
use crate::server_client::{connect_for_attestation, key_and_csr};

/// The files of a node's x509pop credential, read again at each attestation (so an operator
/// may replace them before they expire, without restarting the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopFiles {
    /// PEM certificate issued by the operator CA for this node (leaf first, then intermediates).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

impl X509PopFiles {
    /// Reads and checks the credential.
    pub fn load(&self) -> anyhow::Result<NodeCredential> {
        let cert = std::fs::read_to_string(&self.cert).with_context(|| {
            format!(
                "cannot read the node certificate {} (--x509pop-cert)",
                self.cert.display()
            )
        })?;
        let key = std::fs::read_to_string(&self.key).with_context(|| {
            format!(
                "cannot read the node key {} (--x509pop-key)",
                self.key.display()
            )
        })?;
        NodeCredential::from_pem(&cert, &key).map_err(|e| {
            anyhow::anyhow!(
                "{} and {} (--x509pop-cert, --x509pop-key) are not a usable node credential: {e}",
                self.cert.display(),
                self.key.display()
            )
        })
    }
}

/// What the agent attests with. Its `Debug` never shows a token.
#[derive(Clone, Default)]
pub struct NodeAttestor {
    /// The x509pop credential, if the node has one.
    pub x509pop: Option<X509PopFiles>,
    /// The join token given at start (flag or environment).
    pub join_token: Option<String>,
    /// The file the join token came from, read again whenever the node must attest again.
    pub join_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for NodeAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAttestor")
            .field("x509pop", &self.x509pop)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("join_token_file", &self.join_token_file)
            .finish()
    }
}

/// How an attestation went wrong: the server refused it (what to do is in the message), or
/// it could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    /// Nothing to attest with.
    #[error("{0}")]
    NoCredential(String),
    /// The server was not reached, or failed.
    #[error(transparent)]
    Unreachable(anyhow::Error),
    /// The server refused the credential.
    #[error("{0}")]
    Refused(String),
}

impl NodeAttestor {
    /// Whether this node comes back by itself once its SVID expired.
    pub fn can_reattest(&self) -> bool {
        self.x509pop.is_some()
    }

    /// Whether there is anything to attest with at first start.
    pub fn has_credential(&self) -> bool {
        self.x509pop.is_some() || self.join_token.is_some() || self.join_token_file.is_some()
    }

    /// Obtains a node SVID from `server`, trusting `bundle` for the server's certificate.
    /// `again`: the node attested before (its SVID expired or was refused), so a join token
    /// is read afresh from its file rather than taken from the command line.
    pub async fn attest(
        &self,
        node_name: &str,
        server: &str,
        td: &TrustDomain,
        bundle: &X509Bundle,
        again: bool,
    ) -> Result<(NodeSvid, X509Bundle), AttestationError> {
        let exporter = Arc::new(Mutex::new(None::<[u8; EXPORTER_LEN]>));
        let (key, csr) = key_and_csr().map_err(AttestationError::Unreachable)?;
        let resp = if let Some(files) = &self.x509pop {
            let credential = files
                .load()
                .map_err(|e| AttestationError::NoCredential(format!("{e:#}")))?;
            let mut client = connect_for_attestation(
                server,
                td,
                SharedBundle::new(bundle.clone()),
                Some(Arc::clone(&exporter)),
            )
            .await
            .map_err(AttestationError::Unreachable)?;
            let bound = (*exporter.lock().unwrap_or_else(|p| p.into_inner())).ok_or_else(|| {
                AttestationError::Unreachable(anyhow::anyhow!(
                    "the TLS connection to the server has no exporter value"
                ))
            })?;
            let (scheme, signature) = credential
                .prove(&bound, node_name, &csr)
                .map_err(|e| AttestationError::NoCredential(e.to_string()))?;
            client
                .attest_x509_pop(AttestX509PopRequest {
                    node_name: node_name.to_owned(),
                    cert_chain: credential.chain.iter().map(|c| c.to_vec()).collect(),
                    csr,
                    signature_scheme: u32::from(u16::from(scheme)),
                    signature,
                })
                .await
                .map_err(|s| refused("x509pop attestation", &s))?
                .into_inner()
        } else {
            let token = self.token(node_name, again)?;
            let mut client =
                connect_for_attestation(server, td, SharedBundle::new(bundle.clone()), None)
                    .await
                    .map_err(AttestationError::Unreachable)?;
            client
                .attest_join_token(AttestJoinTokenRequest {
                    token,
                    node_name: node_name.to_owned(),
                    csr,
                })
                .await
                .map_err(|s| match refused("attestation", &s) {
                    AttestationError::Refused(m) if again => AttestationError::Refused(format!(
                        "{m}: this node attested with a join token, which works once; write a new one \
                         (`meshauth token generate --node {node_name}`) to {} and the agent takes it \
                         on its next attempt",
                        self.join_token_file
                            .as_ref()
                            .map_or("--join-token-file".into(), |p| p.display().to_string())
                    )),
                    other => other,
                })?
                .into_inner()
        };
        crate::manager::node_svid_of(resp, key, td, bundle).map_err(AttestationError::Unreachable)
    }

    /// [`NodeAttestor::attest`] at each of `servers` in turn, from index `start` (wrapping
    /// around), until one issues a node SVID; also returns that server's index. A server that
    /// cannot be reached (or fails) is skipped; a refusal, or a credential that cannot be read,
    /// ends the search at once: replicas share one registry, so the next would refuse too.
    pub async fn attest_first_answering(
        &self,
        node_name: &str,
        servers: &ServerList,
        start: usize,
        td: &TrustDomain,
        bundle: &X509Bundle,
        again: bool,
    ) -> Result<(NodeSvid, X509Bundle, usize), AttestationError> {
        let several = servers.as_slice().len() > 1;
        let mut last = None;
        for (index, server) in servers.starting_at(start) {
            match self
                .attest(node_name, &server.to_string(), td, bundle, again)
                .await
            {
                Ok((svid, bundle)) => return Ok((svid, bundle, index)),
                Err(AttestationError::Unreachable(e)) => {
                    if several {
                        tracing::warn!(server = %server, error = %format!("{e:#}"), "cannot attest at this server; trying the next");
                    }
                    last = Some((server, e));
                }
                Err(other) => return Err(other),
            }
        }
        Err(match last {
            Some((_, e)) if !several => AttestationError::Unreachable(e),
            Some((server, e)) => AttestationError::Unreachable(e.context(format!(
                "none of the servers {servers} could attest this node; the last one tried, {server}"
            ))),
            None => AttestationError::NoCredential("no server to attest at: pass --server".into()),
        })
    }

    fn token(&self, node_name: &str, again: bool) -> Result<String, AttestationError> {
        if let Some(path) = &self.join_token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AttestationError::NoCredential(format!(
                    "cannot read --join-token-file {}: {e}",
                    path.display()
                ))
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(AttestationError::NoCredential(format!(
                    "--join-token-file {} is empty (write the output of `meshauth token generate --node {node_name}` to it)",
                    path.display()
                )));
            }
            return Ok(token.to_owned());
        }
        match (&self.join_token, again) {
            (Some(t), false) => Ok(t.clone()),
            (Some(_), true) | (None, _) => Err(AttestationError::NoCredential(format!(
                "this node's SVID is no longer usable and it has no credential to attest again with: \
                 give it a new join token (`meshauth token generate --node {node_name}`) in --join-token-file, \
                 or an operator certificate (--x509pop-cert, --x509pop-key) to come back by itself"
            ))),
        }
    }
}

/// One sentence for a refused (or failed) attestation call.
fn refused(what: &str, s: &tonic::Status) -> AttestationError {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument
        | tonic::Code::NotFound => {
            AttestationError::Refused(format!("{what} refused: {}", s.message()))
        }
        _ => AttestationError::Unreachable(anyhow::anyhow!("{what} failed: {}", s.message())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn a_join_token_is_never_shown() {
        let a = NodeAttestor {
            join_token: Some("s3cr3t".into()),
            ..NodeAttestor::default()
        };
        assert!(!format!("{a:?}").contains("s3cr3t"));
        assert!(!a.can_reattest());
    }

    #[test]
    fn a_token_from_the_command_line_is_used_once() {
        let a = NodeAttestor {
            join_token: Some("t".into()),
            ..NodeAttestor::default()
        };
        assert_eq!(a.token("n1", false).unwrap(), "t");
        let Err(AttestationError::NoCredential(m)) = a.token("n1", true) else {
            panic!("a spent token was offered again");
        };
        assert!(
            m.contains("--join-token-file") && m.contains("--x509pop-cert"),
            "{m}"
        );
    }

    #[test]
    fn the_token_file_is_read_again_at_each_attempt() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("token");
        std::fs::write(&file, "first\n").unwrap();
        let a = NodeAttestor {
            join_token: Some("first".into()),
            join_token_file: Some(file.clone()),
            ..NodeAttestor::default()
        };
        assert_eq!(a.token("n1", true).unwrap(), "first");
        std::fs::write(&file, "second\n").unwrap();
        assert_eq!(a.token("n1", true).unwrap(), "second");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            a.token("n1", true),
            Err(AttestationError::NoCredential(_))
        ));
    }

    #[test]
    fn unreadable_credential_files_say_which_flag() {
        let files = X509PopFiles {
            cert: "/nonexistent/node.crt".into(),
            key: "/nonexistent/node.key".into(),
        };
        let e = format!("{:#}", files.load().unwrap_err());
        assert!(e.contains("--x509pop-cert"), "{e}");
    }
}
