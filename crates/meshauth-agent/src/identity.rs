//! The node's identity on disk: its key, its node SVID and the latest trust bundle.
//!
//! Files in the data dir: `node.key` (PKCS#8 PEM, 0600), `node.crt` (PEM chain), `bundle.pem`
//! (the latest bundle from the server), `node.json` (name and numeric id), `meshauth.lock` (held
//! by the running agent). The directory is created with mode 0700, or must already be this
//! user's and not writable by group or others; it is never chmodded. Each write goes to a fresh
//! temporary file with a unique name, given its mode before any data is written, synced, then
//! renamed into place: a crash never leaves half a key, and a temporary file left by an
//! interrupted write is never reused, so it cannot give a key a wider mode.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// The data dir's files, and its lock (shared by the clones; released when the last goes).
#[derive(Debug, Clone)]
pub struct DataDir {
    dir: PathBuf,
    _lock: Arc<meshauth_telemetry::DataDirLock>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeFile {
    node_id: u32,
    issued_at_unix: u64,
}

impl DataDir {
    /// Creates the directory (mode 0700), or checks the existing one (this user's, not writable
    /// by group or others; never chmodded, so `--data-dir /tmp` is refused rather than made
    /// 0700), and locks it: a second agent on the same directory fails here, naming the
    /// directory and the pid of the first.
    pub fn open(dir: &Path) -> anyhow::Result<DataDir> {
        let lock = meshauth_telemetry::lock_data_dir(dir, "--data-dir")?;
        Ok(DataDir {
            dir: dir.to_owned(),
            _lock: Arc::new(lock),
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
                "the saved node SVID in {} is no longer valid; attest again with a new join token (--join-token-file)",
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
        let meta = NodeFile {
            node_id: svid.node_id,
            issued_at_unix: svid
                .issued_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // All three written before any replaces its file: a full disk fails the writes and
        // leaves the node's current key and certificate as they were (never a new key beside
        // an old certificate); the renames need no space.
        write_all_atomic(&[
            (&self.path("node.key"), key_pem.as_bytes(), 0o600),
            (
                &self.path("node.crt"),
                certs_pem(&svid.chain).as_bytes(),
                0o644,
            ),
            (&self.path("node.json"), &serde_json::to_vec(&meta)?, 0o644),
        ])
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

/// Replaces `path` with `data`, atomically, as a file of mode `mode`.
///
/// The temporary file is new (`O_EXCL`, random name, in `path`'s directory, created 0600) and is
/// given `mode` before anything is written to it, so neither a stale temporary file nor an
/// existing `path` lends its mode to the result; it is synced before the rename, and removed if
/// any step fails.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    write_all_atomic(&[(path, data, mode)])
}

/// Replaces several files, as [`write_atomic`] does each: every temporary file is written and
/// synced first, and only then are they renamed into place, so that a failed write (a full
/// disk) replaces none of them.
pub fn write_all_atomic(files: &[(&Path, &[u8], u32)]) -> anyhow::Result<()> {
    let mut staged = Vec::new();
    for (path, data, mode) in files {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .with_context(|| {
                format!(
                    "cannot create a temporary file in {} (for {})",
                    dir.display(),
                    path.display()
                )
            })?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(*mode))
            .and_then(|()| tmp.write_all(data))
            .and_then(|()| tmp.as_file().sync_all())
            .with_context(|| {
                format!(
                    "cannot write {} (for {})",
                    tmp.path().display(),
                    path.display()
                )
            })?;
        staged.push((tmp, *path));
    }
    let mut dirs = Vec::new();
    for (tmp, path) in staged {
        tmp.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        dirs.push(path.parent().unwrap_or(Path::new(".")).to_owned());
    }
    dirs.dedup();
    for d in dirs {
        if let Ok(d) = fs::File::open(d) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A private key of the form the TLS stack takes.
pub fn private_key(key: &PrivatePkcs8KeyDer<'_>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.clone_key())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_failed_write_replaces_none_of_the_files() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("node.key");
        fs::write(&key, b"old key").unwrap();
        // The second file cannot be written (as on a full disk): the first stays as it was.
        let unwritable = d.path().join("no-such-dir/node.crt");
        let err = write_all_atomic(&[(&key, b"new key", 0o600), (&unwritable, b"new crt", 0o644)])
            .unwrap_err();
        assert!(format!("{err:#}").contains("node.crt"), "{err:#}");
        assert_eq!(fs::read(&key).unwrap(), b"old key");
        let left: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");
        // Both writable: both replaced.
        let crt = d.path().join("node.crt");
        write_all_atomic(&[(&key, b"new key", 0o600), (&crt, b"new crt", 0o644)]).unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"new key");
        assert_eq!(fs::read(&crt).unwrap(), b"new crt");
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn a_key_is_0600_whatever_an_interrupted_write_left_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(&tmp.path().join("agent")).unwrap();
        // What the old shared temporary file looked like after an interrupted node.crt write,
        // and a key file that an earlier version left too wide.
        for stale in ["node.tmp", "node.key"] {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(data.path(stale))
                .unwrap();
            fs::set_permissions(data.path(stale), fs::Permissions::from_mode(0o644)).unwrap();
        }
        write_atomic(&data.path("node.key"), b"secret", 0o600).unwrap();
        assert_eq!(mode(&data.path("node.key")), 0o600);
        assert_eq!(fs::read(data.path("node.key")).unwrap(), b"secret");
        assert_eq!(mode(&data.path("node.tmp")), 0o644, "not reused");
        write_atomic(&data.path("node.crt"), b"public", 0o644).unwrap();
        assert_eq!(mode(&data.path("node.crt")), 0o644);
        // No temporary file is left behind.
        let mut names: Vec<_> = fs::read_dir(&data.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["meshauth.lock", "node.crt", "node.key", "node.tmp"]);
    }

    #[test]
    fn a_second_agent_on_the_data_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another meshauth process"), "{err}");
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");
        // A clone shares the lock; the lock goes with the last of them.
        let clone = data.clone();
        drop(data);
        assert!(DataDir::open(tmp.path()).is_err());
        drop(clone);
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_world_writable_data_dir_is_refused_not_chmodded() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert_eq!(mode(tmp.path()), 0o1777);
    }
}
