//! The key-encryption key (`--kek-file`) that seals the CA journal (the CA's private keys)
//! before it goes into the datastore, so that what etcd holds, its backups and its snapshots
//! never contain the CA key in the clear. Every replica reads the same key from a file.
//!
//! Sealing is AES-256-GCM (ring) with a random 96-bit nonce per write, the trust domain bound as
//! associated data (a journal sealed for one trust domain does not open as another's).
//! A sealed journal is text: `meshauth-sealed:v1:` and the base64 of nonce and ciphertext.

use std::path::Path;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// What a sealed journal starts with.
const PREFIX: &str = "meshauth-sealed:v1:";

/// Why the key or a sealed journal was refused.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The file could not be read.
    #[error("cannot read the key-encryption key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is readable by others.
    #[error(
        "the key-encryption key {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The file does not hold a key.
    #[error(
        "the key-encryption key {path} must hold 64 hex digits (32 random bytes; make one with `openssl rand -hex 32`)"
    )]
    Malformed {
        /// The file.
        path: String,
    },
    /// The journal does not open with this key.
    #[error(
        "the CA journal in the datastore does not decrypt with this key-encryption key: every replica must read the same --kek-file"
    )]
    WrongKey,
    /// The journal is not a sealed one.
    #[error("the sealed CA journal in the datastore is corrupt: {0}")]
    Corrupt(&'static str),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
}

/// The key-encryption key.
pub struct Kek {
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the key from `path`: 64 hex digits, surrounding whitespace ignored, in a file
    /// only its owner may read.
    pub fn read(path: &Path) -> Result<Kek, KekError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read = |source| KekError::Read {
            path: shown.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KekError::Exposed {
                path: shown,
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Kek::from_hex(text.trim()).ok_or(KekError::Malformed { path: shown })
    }

    /// The key of 64 hex digits, or `None`.
    pub fn from_hex(hex: &str) -> Option<Kek> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let bytes = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).ok()?;
        Some(Kek {
            key: LessSafeKey::new(key),
        })
    }

    /// Whether `stored` is a sealed journal (else it is one from before `--kek-file`).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    /// Seals `journal`, binding `context` (the trust domain).
    pub fn seal(&self, journal: &str, context: &str) -> Result<String, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KekError::Random)?;
        let mut data = journal.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| KekError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        ))
    }

    /// Opens a journal sealed by [`Kek::seal`] with the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<String, KekError> {
        let b64 = sealed
            .strip_prefix(PREFIX)
            .ok_or(KekError::Corrupt("no sealed-journal prefix"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KekError::Corrupt("not base64"))?;
        if raw.len() < NONCE_LEN {
            return Err(KekError::Corrupt("too short"));
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Corrupt("bad nonce"))?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| KekError::WrongKey)?;
        String::from_utf8(plain.to_vec()).map_err(|_| KekError::Corrupt("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_sealed_journal_opens_with_the_same_key_and_trust_domain_only() {
        let k1 = Kek::from_hex(K1).expect("key");
        let sealed = k1.seal("{\"secret\":1}", "td.test").expect("seal");
        assert!(Kek::is_sealed(&sealed));
        assert!(
            !sealed.contains("secret"),
            "the journal is not in the clear"
        );
        assert_eq!(k1.open(&sealed, "td.test").expect("open"), "{\"secret\":1}");
        assert!(matches!(
            Kek::from_hex(K2).expect("key").open(&sealed, "td.test"),
            Err(KekError::WrongKey)
        ));
        assert!(matches!(
            k1.open(&sealed, "other.test"),
            Err(KekError::WrongKey)
        ));
        // Two seals of one journal differ (fresh nonce).
        assert_ne!(sealed, k1.seal("{\"secret\":1}", "td.test").expect("seal"));
    }

    #[test]
    fn a_tampered_journal_is_refused() {
        let k1 = Kek::from_hex(K1).expect("key");
        let sealed = k1.seal("journal", "td").expect("seal");
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&sealed[PREFIX.len()..])
            .expect("b64");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        assert!(matches!(k1.open(&tampered, "td"), Err(KekError::WrongKey)));
        assert!(matches!(k1.open("plain", "td"), Err(KekError::Corrupt(_))));
    }

    #[test]
    fn key_files_must_be_64_hex_digits_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        std::fs::write(&path, format!("{K1}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Kek::read(&path).expect("a good key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Kek::read(&path).expect_err("exposed");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "short").expect("write");
        let e = Kek::read(&path).expect_err("malformed");
        assert!(e.to_string().contains("openssl rand -hex 32"), "{e}");
        let e = Kek::read(&dir.path().join("missing")).expect_err("missing");
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
