//! Running code inside another network namespace.
//!
//! `setns(2)` changes the namespace of the calling thread only, so the closure runs on a
//! dedicated thread; interface names, netlink attachments and sockets it creates belong to the
//! namespace. BPF objects (maps, programs, links) are global and stay usable from anywhere.
#![allow(unsafe_code, reason = "setns(2) through libc")]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Errors entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source} (does it exist? see `ip netns list`)")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// `setns` failed.
    #[error("cannot enter network namespace {path}: {source} (this needs root)")]
    Enter {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The closure panicked.
    #[error("the code run in network namespace {0} panicked")]
    Panicked(String),
}

/// The file of a namespace created by `ip netns add NAME`.
pub fn named(name: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a thread inside the network namespace at `path`.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: shown.clone(),
        source,
    })?;
    let handle = std::thread::Builder::new()
        .name("meshauth-netns".into())
        .spawn(move || {
            // SAFETY: setns on a valid, open namespace fd; it only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .map_err(|source| NetnsError::Enter {
            path: shown.clone(),
            source,
        })?;
    match handle.join() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(NetnsError::Enter {
            path: shown,
            source,
        }),
        Err(_) => Err(NetnsError::Panicked(shown)),
    }
}
