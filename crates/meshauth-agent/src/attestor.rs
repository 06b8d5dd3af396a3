//! Workload attestation: what the kernel says about the process at the other end of the
//! Workload API socket (SO_PEERCRED), turned into selectors.
//!
//! - `unix:uid:<uid>`, `unix:gid:<gid>`, `unix:pid:<pid>` from the socket's peer credentials;
//! - `unix:path:<executable>` from `/proc/<pid>/exe`;
//! - `netns:<inode>` of the caller's network namespace, from `/proc/<pid>/ns/net`.
//!
//! Nothing comes from the workload's own claims.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The socket gave no credentials (not a Unix socket peer).
    #[error("no peer credentials on the connection")]
    NoCredentials,
    /// The kernel gave no pid (e.g. the peer is in another pid namespace that hides it).
    #[error("the caller's pid is not visible to the agent")]
    NoPid,
}

/// The caller's kernel-reported identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, if visible.
    pub pid: Option<i32>,
}

/// Selectors for a caller.
pub fn selectors(cred: Option<PeerCred>) -> Result<BTreeSet<String>, AttestError> {
    let cred = cred.ok_or(AttestError::NoCredentials)?;
    let pid = cred.pid.ok_or(AttestError::NoPid)?;
    let mut out = BTreeSet::new();
    out.insert(format!("unix:uid:{}", cred.uid));
    out.insert(format!("unix:gid:{}", cred.gid));
    out.insert(format!("unix:pid:{pid}"));
    // The process may exit between connect and here; then only the credentials count.
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        out.insert(format!("unix:path:{}", exe.display()));
    }
    if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
        out.insert(format!("netns:{}", meta.ino()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_selectors() {
        let cred = PeerCred {
            uid: 1234,
            gid: 55,
            pid: Some(std::process::id() as i32),
        };
        let s = selectors(Some(cred)).unwrap();
        assert!(s.contains("unix:uid:1234"));
        assert!(s.contains("unix:gid:55"));
        let exe = std::env::current_exe().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
        let netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(s.contains(&format!("netns:{netns}")));
    }

    #[test]
    fn missing_credentials_are_refused() {
        assert!(matches!(selectors(None), Err(AttestError::NoCredentials)));
        let no_pid = PeerCred {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert!(matches!(selectors(Some(no_pid)), Err(AttestError::NoPid)));
    }
}
