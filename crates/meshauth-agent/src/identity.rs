//! The node's identity on disk: its key, its node SVID and the latest trust bundle.
//!
//! Files in the data dir (mode 0700): `node.key` (PKCS#8 PEM, 0600), `node.crt` (PEM chain),
//! `bundle.pem` (the latest bundle from the server), `node.json` (name and numeric id). Writes go
//! to a temporary file first and are renamed into place, so a crash never leaves half a key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A node SVID with its key, validated.
pub struct NodeSvid {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// `spiffe://<td>/node/<name>`.
    pub spiffe_id: SpiffeId,
    /// Serial (hex).
    pub serial: String,
    /// When it was obtained (for half-life rotation).
    pub issued_at: SystemTime,
    /// Expiry.
    pub not_after: SystemTime,
    /// The server's numeric id of this node.
    pub node_id: u32,
}

impl Clone for NodeSvid {
    fn clone(&self) -> Self {
        NodeSvid {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            spiffe_id: self.spiffe_id.clone(),
            serial: self.serial.clone(),
            issued_at: self.issued_at,
            not_after: self.not_after,
            node_id: self.node_id,
        }
    }
}

impl std::fmt::Debug for NodeSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSvid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The data dir's files.
#[derive(Debug, Clone)]
pub struct DataDir {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeFile {
    node_id: u32,
    issued_at_unix: u64,
}

impl DataDir {
    /// Creates the directory (0700) if needed.
    pub fn open(dir: &Path) -> anyhow::Result<DataDir> {
        fs::create_dir_all(dir).with_context(|| {
            format!("cannot create data dir {} (use --data-dir)", dir.display())
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
        Ok(DataDir {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The node SVID saved by an earlier run, if any; it must still validate under `bundle`.
    pub fn load_node_svid(
        &self,
        bundle: &X509Bundle,
        now: SystemTime,
    ) -> anyhow::Result<Option<NodeSvid>> {
        let (key_path, crt_path, meta_path) = (
            self.path("node.key"),
            self.path("node.crt"),
            self.path("node.json"),
        );
        if !key_path.exists() || !crt_path.exists() || !meta_path.exists() {
            return Ok(None);
        }
        let key = PrivatePkcs8KeyDer::from_pem_file(&key_path)
            .with_context(|| format!("cannot read the node key {}", key_path.display()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt_path)
            .with_context(|| format!("cannot read {}", crt_path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot parse {}", crt_path.display()))?;
        let meta: NodeFile = serde_json::from_slice(&fs::read(&meta_path)?)
            .with_context(|| format!("cannot parse {}", meta_path.display()))?;
        let verified = meshauth_spiffe::validate_x509_svid(&chain, bundle, now).with_context(|| {
            format!(
                "the saved node SVID in {} is no longer valid; attest again with a new --join-token",
                crt_path.display()
            )
        })?;
        Ok(Some(NodeSvid {
            chain,
            key,
            spiffe_id: verified.spiffe_id,
            serial: verified.serial,
            issued_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(meta.issued_at_unix),
            not_after: verified.not_after,
            node_id: meta.node_id,
        }))
    }

    /// Saves the node SVID and key.
    pub fn save_node_svid(&self, svid: &NodeSvid) -> anyhow::Result<()> {
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            svid.key.secret_pkcs8_der().to_vec(),
        ));
        write_atomic(&self.path("node.key"), key_pem.as_bytes(), 0o600)?;
        write_atomic(
            &self.path("node.crt"),
            certs_pem(&svid.chain).as_bytes(),
            0o644,
        )?;
        let meta = NodeFile {
            node_id: svid.node_id,
            issued_at_unix: svid
                .issued_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        write_atomic(&self.path("node.json"), &serde_json::to_vec(&meta)?, 0o644)?;
        Ok(())
    }

    /// The bundle saved by an earlier run, if any.
    pub fn load_bundle(&self, td: &TrustDomain) -> anyhow::Result<Option<X509Bundle>> {
        let path = self.path("bundle.pem");
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(read_bundle(&path, td)?))
    }

    /// Saves the latest bundle, so that a restart trusts a rotated CA.
    pub fn save_bundle(&self, bundle: &X509Bundle) -> anyhow::Result<()> {
        write_atomic(&self.path("bundle.pem"), bundle.to_pem().as_bytes(), 0o644)
    }
}

/// Reads a PEM bundle file for trust domain `td`.
pub fn read_bundle(path: &Path, td: &TrustDomain) -> anyhow::Result<X509Bundle> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read trust bundle {} (use --trust-bundle)",
            path.display()
        )
    })?;
    X509Bundle::from_pem(td.clone(), &text)
        .with_context(|| format!("{} is not a PEM bundle of CA certificates", path.display()))
}

fn certs_pem(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// A private key of the form the TLS stack takes.
pub fn private_key(key: &PrivatePkcs8KeyDer<'_>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.clone_key())
}
