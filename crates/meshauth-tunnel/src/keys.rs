//! Node keys: the WireGuard private key on disk, public keys as `wg` shows them, and the
//! per-peer pre-shared key.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use gotatun::x25519;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::TunnelError;

/// A node's WireGuard private key (an x25519 static secret).
///
/// Its `Debug` shows the public key only.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<PrivateKey, TunnelError> {
        Ok(PrivateKey::from_bytes(random_bytes()?))
    }

    /// The key from its 32 raw bytes (clamping happens inside x25519).
    pub fn from_bytes(bytes: [u8; 32]) -> PrivateKey {
        PrivateKey(x25519::StaticSecret::from(bytes))
    }

    /// Reads the key from `path` (standard base64 of 32 bytes, as `wg genkey` writes it), or,
    /// when there is no such file, creates a new key there: mode 0600, written to a temporary
    /// file in the same directory and renamed into place, so a crash never leaves half a key.
    ///
    /// A file that is not a key is an error naming the file (never replaced silently: peers
    /// know the old public key).
    pub fn load_or_create(path: &Path) -> Result<PrivateKey, TunnelError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let key = parse_private(&text).map_err(|reason| TunnelError::MalformedKey {
                    path: path.to_path_buf(),
                    reason,
                })?;
                warn_if_readable_by_others(path);
                Ok(key)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = PrivateKey::generate()?;
                write_atomically(path, &key).map_err(|source| TunnelError::KeyFile {
                    path: path.to_path_buf(),
                    source,
                })?;
                tracing::info!(key.path = %path.display(), key.public = %key.public(),
                    "created a new node WireGuard key");
                Ok(key)
            }
            Err(source) => Err(TunnelError::KeyFile {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.0).to_bytes())
    }

    pub(crate) fn secret(&self) -> &x25519::StaticSecret {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public())
    }
}

fn parse_private(text: &str) -> Result<PrivateKey, String> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not standard base64: {e}"))?;
    let bytes = <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, expected 32", bytes.len()))?;
    Ok(PrivateKey::from_bytes(bytes))
}

fn write_atomically(path: &Path, key: &PrivateKey) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut text = STANDARD.encode(key.0.to_bytes());
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // The rename is durable once the directory is synced.
        fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(key.path = %path.display(), key.mode = format!("{:o}", mode & 0o777),
                "the node WireGuard key file is readable by others; chmod 600 it");
        }
    }
}

pub(crate) fn random_bytes() -> Result<[u8; 32], TunnelError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TunnelError::Random)?;
    Ok(bytes)
}

/// A WireGuard public key (Curve25519, 32 bytes). `Display` and `FromStr` use standard base64,
/// as `wg` shows keys.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps 32 key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = TunnelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .map(PublicKey)
            .ok_or_else(|| TunnelError::InvalidPublicKey {
                input: s.chars().take(64).collect(),
            })
    }
}

impl From<meshauth_policy::TunnelKey> for PublicKey {
    fn from(key: meshauth_policy::TunnelKey) -> Self {
        PublicKey(*key.as_bytes())
    }
}

impl From<PublicKey> for meshauth_policy::TunnelKey {
    fn from(key: PublicKey) -> Self {
        meshauth_policy::TunnelKey::new(key.0)
    }
}

/// A 32-byte WireGuard pre-shared key, mixed into every handshake with one peer.
///
/// Its `Debug` prints `Psk(..)` only.
#[derive(Clone)]
pub struct Psk([u8; 32]);

/// Compares in constant time.
impl PartialEq for Psk {
    fn eq(&self, other: &Psk) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for Psk {}

impl Psk {
    /// Wraps 32 key bytes (the agent derives them from a TLS exporter).
    pub const fn from_bytes(bytes: [u8; 32]) -> Psk {
        Psk(bytes)
    }

    /// A random key from the operating system's random number generator.
    pub fn generate() -> Result<Psk, TunnelError> {
        Ok(Psk(random_bytes()?))
    }

    pub(crate) fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_through_base64() {
        let key = PrivateKey::generate().unwrap().public();
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
        assert_eq!(format!("{key:?}"), format!("PublicKey({text})"));
    }

    #[test]
    fn public_key_parse_error_is_clear() {
        let err = "not a key".parse::<PublicKey>().unwrap_err().to_string();
        assert!(err.contains("\"not a key\""), "{err}");
        assert!(err.contains("32 bytes"), "{err}");
        let short = STANDARD.encode([1u8; 31]);
        assert!(short.parse::<PublicKey>().is_err());
    }

    #[test]
    fn psk_debug_hides_the_key() {
        assert_eq!(format!("{:?}", Psk::from_bytes([7; 32])), "Psk(..)");
        assert_eq!(Psk::from_bytes([7; 32]), Psk::from_bytes([7; 32]));
        let mut other = [7; 32];
        other[31] = 8;
        assert_ne!(Psk::from_bytes([7; 32]), Psk::from_bytes(other));
    }

    #[test]
    fn private_key_debug_shows_only_the_public_key() {
        let key = PrivateKey::from_bytes([9; 32]);
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.public().to_string()));
        assert!(!debug.contains(&STANDARD.encode(key.secret().to_bytes())));
    }

    #[test]
    fn matches_wg_pubkey() {
        // `echo YOJ... | wg pubkey` pair from the WireGuard docs' style: a fixed private key and
        // its public key computed by x25519 (RFC 7748 test vector 'Alice').
        let private = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(
            PrivateKey::from_bytes(private).public(),
            PublicKey::from_bytes(public)
        );
    }

    #[test]
    fn tunnel_key_conversion() {
        let key = PublicKey::from_bytes([3; 32]);
        let tk: meshauth_policy::TunnelKey = key.into();
        assert_eq!(tk.to_string(), key.to_string());
        assert_eq!(PublicKey::from(tk), key);
    }
}
