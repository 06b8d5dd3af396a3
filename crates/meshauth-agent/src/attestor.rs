//! Workload attestation: what the kernel says about the process at the other end of the
//! Workload API socket, turned into selectors.
//!
//! - `unix:uid:<uid>`, `unix:gid:<gid>` from the socket's peer credentials (SO_PEERCRED);
//! - `unix:path:<executable>` from `/proc/<pid>/exe`;
//! - `netns:<inode>` of the caller's network namespace, from `/proc/<pid>/ns/net`.
//!
//! Nothing comes from the workload's own claims, and there is no `unix:pid` selector: a pid
//! names a process only until it exits and the number is reused (SPIRE offers none either).
//!
//! # Pinning the process
//!
//! The caller's pid is read when the connection is accepted, but `/proc/<pid>` is read when a
//! request arrives, possibly much later. If the process that connected has exited by then and
//! its pid went to another process (while a child, or whoever the socket was passed to, keeps
//! the connection), the agent would read the other process's executable. So [`pin`] records,
//! at accept, the start time of the process (`/proc/<pid>/stat`, field 22, which differs
//! between two processes that share a pid in turn), and [`selectors`] checks that start time
//! before *and* after reading `/proc/<pid>/exe` and `/proc/<pid>/ns/net`, refusing the caller
//! if it changed or the process is gone.
//!
//! Where the kernel offers it (Linux 6.5+), [`pin`] also takes a pidfd of the peer with
//! `SO_PEERPIDFD` (captured by the kernel at `connect(2)`) and checks, after reading the start
//! time, that this pidfd still names a live process with that pid: the start time is then the
//! one of the process that connected, even if it exited between `connect` and `accept`.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The socket gave no credentials (not a Unix socket peer).
    #[error("no peer credentials on the connection")]
    NoCredentials,
    /// The kernel gave no pid (e.g. the peer is in another pid namespace that hides it).
    #[error("the caller's pid is not visible to the agent")]
    NoPid,
    /// The process that connected has exited: whoever holds the connection now is not it.
    #[error("the process that opened the connection (pid {pid}) has exited")]
    ProcessGone {
        /// The pid the connection came from.
        pid: i32,
    },
    /// The pid now belongs to another process than the one that connected.
    #[error("pid {pid} now belongs to another process than the one that opened the connection")]
    ProcessChanged {
        /// The pid the connection came from.
        pid: i32,
    },
}

/// The caller's kernel-reported identity (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, if visible.
    pub pid: Option<i32>,
}

/// A caller as recorded at accept: its credentials and the start time of the process that
/// connected, which [`selectors`] checks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedCaller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
    /// Start time of the process, in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// What attestation reads about a process; [`SystemProc`] reads `/proc`.
pub(crate) trait ProcSource {
    /// The start time of `pid`, or `None` if there is no such process.
    fn start_time(&self, pid: i32) -> Option<u64>;
    /// The executable of `pid`.
    fn exe(&self, pid: i32) -> Option<PathBuf>;
    /// The inode of the network namespace of `pid`.
    fn netns(&self, pid: i32) -> Option<u64>;
}

/// The real `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemProc;

impl ProcSource for SystemProc {
    fn start_time(&self, pid: i32) -> Option<u64> {
        parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn exe(&self, pid: i32) -> Option<PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/exe")).ok()
    }

    fn netns(&self, pid: i32) -> Option<u64> {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .ok()
            .map(|m| m.ino())
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The second field, the command name in
/// parentheses, may itself contain spaces and parentheses, so fields are counted from the last
/// `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // After the name come field 3 (state) onwards: starttime is the 20th of those.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo`: `Some(-1)` once the process has
/// exited, `None` if the kernel does not say.
fn pidfd_pid(pidfd: &std::os::fd::OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()
}

/// Records the caller of an accepted Workload API connection: its peer credentials and the
/// start time of the process that connected (see the module documentation).
pub fn pin(stream: &tokio::net::UnixStream) -> Result<PinnedCaller, AttestError> {
    let cred = stream.peer_cred().map_err(|_| AttestError::NoCredentials)?;
    let cred = PeerCred {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    // Linux 6.5+; older kernels answer ENOPROTOOPT, and then the start time read below is that
    // of whichever process has the pid at accept.
    let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok();
    pin_with(&SystemProc, cred, || pidfd.as_ref().and_then(pidfd_pid))
}

/// [`pin`] over `proc`; `pidfd_pid` tells the pid the kernel's pidfd of the peer now refers to
/// (`-1`: exited; `None`: no pidfd).
pub(crate) fn pin_with(
    proc: &impl ProcSource,
    cred: PeerCred,
    pidfd_pid: impl FnOnce() -> Option<i32>,
) -> Result<PinnedCaller, AttestError> {
    let pid = cred.pid.filter(|p| *p > 0).ok_or(AttestError::NoPid)?;
    let start_time = proc
        .start_time(pid)
        .ok_or(AttestError::ProcessGone { pid })?;
    match pidfd_pid() {
        None => {}
        Some(p) if p == pid => {}
        Some(p) if p <= 0 => return Err(AttestError::ProcessGone { pid }),
        Some(_) => return Err(AttestError::ProcessChanged { pid }),
    }
    Ok(PinnedCaller {
        uid: cred.uid,
        gid: cred.gid,
        pid,
        start_time,
    })
}

/// Selectors for a caller pinned at accept. Refused if its process is gone or its pid now
/// belongs to another process.
pub fn selectors(caller: &PinnedCaller) -> Result<BTreeSet<String>, AttestError> {
    selectors_with(&SystemProc, caller)
}

/// [`selectors`] over `proc`.
pub(crate) fn selectors_with(
    proc: &impl ProcSource,
    caller: &PinnedCaller,
) -> Result<BTreeSet<String>, AttestError> {
    let pid = caller.pid;
    let same_process = || match proc.start_time(pid) {
        Some(t) if t == caller.start_time => Ok(()),
        Some(_) => Err(AttestError::ProcessChanged { pid }),
        None => Err(AttestError::ProcessGone { pid }),
    };
    same_process()?;
    let exe = proc.exe(pid);
    let netns = proc.netns(pid);
    // Whatever was read above belonged to the pinned process only if it still has the pid.
    same_process()?;
    let mut out = BTreeSet::new();
    out.insert(format!("unix:uid:{}", caller.uid));
    out.insert(format!("unix:gid:{}", caller.gid));
    // A zombie has no executable or namespace any more; then only the credentials count
    // (entries match callers that have all their selectors, so fewer selectors never match
    // more entries).
    if let Some(exe) = exe {
        out.insert(format!("unix:path:{}", exe.display()));
    }
    if let Some(ino) = netns {
        out.insert(format!("netns:{ino}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn own_cred() -> PeerCred {
        PeerCred {
            uid: 1234,
            gid: 55,
            pid: Some(std::process::id() as i32),
        }
    }

    #[test]
    fn own_process_selectors() {
        let caller = pin_with(&SystemProc, own_cred(), || None).unwrap();
        let s = selectors(&caller).unwrap();
        assert!(s.contains("unix:uid:1234"));
        assert!(s.contains("unix:gid:55"));
        assert!(
            !s.iter().any(|s| s.starts_with("unix:pid:")),
            "no pid selector: {s:?}"
        );
        let exe = std::env::current_exe().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
        let netns = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(s.contains(&format!("netns:{netns}")));
    }

    #[tokio::test]
    async fn pinning_a_real_socket_peer() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let caller = pin(&ours).unwrap();
        assert_eq!(caller.pid, std::process::id() as i32);
        assert_eq!(
            Some(caller.start_time),
            SystemProc.start_time(caller.pid),
            "the start time of this very process"
        );
        let s = selectors(&caller).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(s.contains(&format!("unix:path:{}", exe.display())), "{s:?}");
    }

    #[test]
    fn a_changed_start_time_is_refused() {
        let mut caller = pin_with(&SystemProc, own_cred(), || None).unwrap();
        caller.start_time += 1;
        assert_eq!(
            selectors(&caller),
            Err(AttestError::ProcessChanged { pid: caller.pid })
        );
    }

    /// A process table whose start times follow a script, one per read.
    struct Scripted {
        starts: RefCell<Vec<Option<u64>>>,
    }

    impl ProcSource for Scripted {
        fn start_time(&self, _pid: i32) -> Option<u64> {
            let mut s = self.starts.borrow_mut();
            if s.is_empty() { None } else { s.remove(0) }
        }
        fn exe(&self, _pid: i32) -> Option<PathBuf> {
            Some(PathBuf::from("/usr/bin/privileged"))
        }
        fn netns(&self, _pid: i32) -> Option<u64> {
            Some(4026531840)
        }
    }

    fn scripted(starts: &[Option<u64>]) -> Scripted {
        Scripted {
            starts: RefCell::new(starts.to_vec()),
        }
    }

    #[test]
    fn the_start_time_is_checked_before_and_after_reading_proc() {
        let caller = PinnedCaller {
            uid: 1000,
            gid: 1000,
            pid: 42,
            start_time: 100,
        };
        // Same process throughout.
        let s = selectors_with(&scripted(&[Some(100), Some(100)]), &caller).unwrap();
        assert!(s.contains("unix:path:/usr/bin/privileged"), "{s:?}");
        // Reused before the request.
        assert_eq!(
            selectors_with(&scripted(&[Some(250), Some(250)]), &caller),
            Err(AttestError::ProcessChanged { pid: 42 })
        );
        // Reused while /proc was read: what was read may be the new process's.
        assert_eq!(
            selectors_with(&scripted(&[Some(100), Some(250)]), &caller),
            Err(AttestError::ProcessChanged { pid: 42 })
        );
        // Gone.
        assert_eq!(
            selectors_with(&scripted(&[None]), &caller),
            Err(AttestError::ProcessGone { pid: 42 })
        );
        assert_eq!(
            selectors_with(&scripted(&[Some(100), None]), &caller),
            Err(AttestError::ProcessGone { pid: 42 })
        );
    }

    #[test]
    fn pinning_checks_the_pidfd() {
        let cred = PeerCred {
            uid: 1,
            gid: 1,
            pid: Some(42),
        };
        let pinned = pin_with(&scripted(&[Some(7)]), cred, || Some(42)).unwrap();
        assert_eq!(pinned.start_time, 7);
        // The process that connected exited before accept: its pid may be someone else's.
        assert_eq!(
            pin_with(&scripted(&[Some(7)]), cred, || Some(-1)),
            Err(AttestError::ProcessGone { pid: 42 })
        );
        assert_eq!(
            pin_with(&scripted(&[None]), cred, || None),
            Err(AttestError::ProcessGone { pid: 42 })
        );
    }

    #[test]
    fn stat_lines_with_odd_command_names() {
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn missing_credentials_are_refused() {
        let no_pid = PeerCred {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert_eq!(
            pin_with(&SystemProc, no_pid, || None),
            Err(AttestError::NoPid)
        );
    }
}
