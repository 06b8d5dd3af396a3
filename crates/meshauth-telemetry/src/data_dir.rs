//! A process's private data directory, and the lock that makes it one process's.
//!
//! [`lock_data_dir`] never changes the mode of a directory it did not create: a path that does not
//! exist is created with mode 0700 (its missing parents with the default mode); an existing
//! directory is used where it is, so data written by earlier runs is found, but only if it belongs
//! to this process's user and no one else may write in it. A directory such as `/tmp` (mode 1777)
//! is refused, and left as it is, instead of being chmodded.
//!
//! The directory then holds `meshauth.lock`, locked exclusively (`flock`) for as long as the
//! returned [`DataDirLock`] lives, and holding the owner's pid, so that a second process on the
//! same directory fails at once, naming the directory and the process that has it.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock file's name in the data dir.
pub const LOCK_FILE: &str = "meshauth.lock";

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A filesystem step failed.
    #[error("cannot {what} data dir {path}: {source} (use {flag})")]
    Io {
        /// The step.
        what: &'static str,
        /// The directory.
        path: String,
        /// The flag that chooses another directory.
        flag: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The path exists and is not a directory.
    #[error("data dir {path} exists and is not a directory (use {flag})")]
    NotADirectory {
        /// The path.
        path: String,
        /// The flag that chooses another directory.
        flag: String,
    },
    /// The directory belongs to another user, who could replace its files.
    #[error(
        "data dir {path} belongs to uid {owner}, not to this process's uid {uid}: give a \
         directory of your own, or a path that does not exist yet (it is created with mode 0700) \
         (use {flag})"
    )]
    NotOwned {
        /// The directory.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
        /// The flag that chooses another directory.
        flag: String,
    },
    /// Group or others may write in the directory, so they could replace its files.
    #[error(
        "data dir {path} is writable by group or others (mode {mode:04o}) and is left as it is: \
         give a private directory, or a path that does not exist yet (it is created with mode \
         0700), e.g. a subdirectory of it (use {flag})"
    )]
    Shared {
        /// The directory.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// The flag that chooses another directory.
        flag: String,
    },
    /// Another process holds the directory's lock.
    #[error(
        "data dir {path} is in use by another meshauth process{by}: stop it, or give this one its \
         own directory (use {flag})",
        by = match pid { Some(p) => format!(" (pid {p})"), None => String::new() }
    )]
    InUse {
        /// The directory.
        path: String,
        /// The process holding the lock, as it wrote it in the lock file.
        pid: Option<u32>,
        /// The flag that chooses another directory.
        flag: String,
    },
}

/// The exclusive lock on a data directory; released when dropped (or when the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    /// The open, locked lock file.
    _file: fs::File,
    dir: PathBuf,
}

impl DataDirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `dir` (mode 0700) or checks the existing one, then locks it for this process. `flag`
/// names the command-line flag that picks the directory, for error messages. See the module
/// documentation for what is refused.
pub fn lock_data_dir(dir: &Path, flag: &str) -> Result<DataDirLock, DataDirError> {
    let shown = || dir.display().to_string();
    let io = |what: &'static str, source: std::io::Error| DataDirError::Io {
        what,
        path: shown(),
        flag: flag.to_owned(),
        source,
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| io("create the parent of", e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        // Created just now: 0700, or narrower under the umask; nothing to check.
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_existing(dir, flag)?,
        Err(e) => return Err(io("create", e)),
    }
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io("open the lock file in", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DataDirError::InUse {
                path: shown(),
                pid,
                flag: flag.to_owned(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("lock", e)),
    }
    // Ours now: record who holds it, for the error message of the next one.
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.flush())
        .map_err(|e| io("write the lock file in", e))?;
    Ok(DataDirLock {
        _file: file,
        dir: dir.to_owned(),
    })
}

/// An existing directory is used only if it is ours and no one else may write in it.
fn check_existing(dir: &Path, flag: &str) -> Result<(), DataDirError> {
    let meta = fs::metadata(dir).map_err(|source| DataDirError::Io {
        what: "inspect",
        path: dir.display().to_string(),
        flag: flag.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(DataDirError::NotADirectory {
            path: dir.display().to_string(),
            flag: flag.to_owned(),
        });
    }
    let uid = rustix::process::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(DataDirError::NotOwned {
            path: dir.display().to_string(),
            owner: meta.uid(),
            uid,
            flag: flag.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DataDirError::Shared {
            path: dir.display().to_string(),
            mode,
            flag: flag.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_dir_is_created_private_and_locked_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let lock = lock_data_dir(&dir, "--data-dir").unwrap();
        assert_eq!(lock.dir(), dir);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let err = lock_data_dir(&dir, "--data-dir").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DataDirError::InUse { pid: Some(p), .. } if p == std::process::id()),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        drop(lock);
        // Released: the next run gets it, in the directory as it is.
        let _again = lock_data_dir(&dir, "--data-dir").unwrap();
    }

    #[test]
    fn an_existing_private_dir_is_used_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(tmp.path().join("data"), "kept").unwrap();
        let _lock = lock_data_dir(tmp.path(), "--data-dir").unwrap();
        assert_eq!(mode(tmp.path()), 0o750, "never chmodded");
        assert_eq!(fs::read_to_string(tmp.path().join("data")).unwrap(), "kept");
    }

    #[test]
    fn a_shared_dir_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        for m in [0o1777, 0o770, 0o702] {
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(m)).unwrap();
            let err = lock_data_dir(tmp.path(), "--data-dir").unwrap_err();
            assert!(matches!(err, DataDirError::Shared { .. }), "{err}");
            assert!(err.to_string().contains("use --data-dir"), "{err}");
            assert_eq!(mode(tmp.path()), m, "the mode is left as it was");
            assert!(!tmp.path().join(LOCK_FILE).exists());
        }
        // A subdirectory of it is fine: created private.
        let _lock = lock_data_dir(&tmp.path().join("meshauth"), "--data-dir").unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn another_users_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = rustix::process::geteuid().as_raw();
        // Only root can give a directory away; as anyone else, the directory is ours.
        if uid != 0 {
            return;
        }
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let err = lock_data_dir(&theirs, "--data-dir").unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::NotOwned {
                    owner: 65534,
                    uid: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, "").unwrap();
        let err = lock_data_dir(&file, "--data-dir").unwrap_err();
        assert!(matches!(err, DataDirError::NotADirectory { .. }), "{err}");
    }
}
