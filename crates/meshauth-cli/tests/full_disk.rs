//! An agent whose data dir fills up while it renews its node SVID (root only: the data dir is a
//! small tmpfs). With 20-second SVIDs, the disk is full from before the first renewal until
//! after several renewal attempts: the server signs each one, the agent cannot save it and keeps
//! its old SVID. Once space is freed, the next renewal goes through. Before, the server recorded
//! serials the agent never saved and refused the node for good.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use support::{AgentProcess, ServerProcess, eventually};

/// Unmounts the tmpfs when dropped, whatever happened.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=128k,mode=0700", "meshauth-test"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` until a write fails; returns the filler file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [0u8; 4096];
    loop {
        if f.write_all(&block).and_then(|()| f.sync_all()).is_err() {
            break;
        }
    }
    // Whatever fits in single bytes, too.
    while f.write_all(&[0]).and_then(|()| f.sync_all()).is_ok() {}
    path
}

fn unix_of(v: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

#[test]
fn an_agent_that_could_not_save_its_renewals_recovers_once_space_is_freed() {
    if !meshauth_test_support::require_root("the full-disk fault test (tmpfs mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n1-data");
    let _tmpfs = Tmpfs::mount(&data);
    let server = ServerProcess::start_on(dir.path(), support::free_port(), &["--svid-ttl", "20s"]);
    server.bundle_file();
    let token = server.token("n1");
    let agent = AgentProcess::start(dir.path(), "n1", &server, Some(&token));
    let health = || agent.health().unwrap();
    eventually(Duration::from_secs(20), "the agent to sync", || {
        (health()["server_connected"] == true).then_some(())
    });
    let first = health();
    let first_serial = first["node_svid_serial"].clone();
    let first_expiry = unix_of(&first["node_svid_expires_at"]);

    // Full before the renewal at half-life (10 s), for three renewal attempts or more.
    let filler = fill(&data);
    let log = dir.path().join("n1-agent.log");
    let failed = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("node SVID renewal failed")
            .count()
    };
    let full_since = Instant::now();
    eventually(Duration::from_secs(20), "three failed renewals", || {
        (failed() >= 3).then_some(())
    });
    let h = health();
    assert_eq!(
        h["node_svid_serial"], first_serial,
        "the agent kept the SVID it has on disk: {h}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("No space left"),
        "the failure says why"
    );
    let attempts = failed();

    // Space again, before the old SVID expires: the next renewal goes through.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    eventually(Duration::from_secs(30), "a renewal that is saved", || {
        let h = health();
        (h["node_svid_serial"] != first_serial && h["server_connected"] == true).then_some(())
    });
    let h = health();
    assert!(unix_of(&h["node_svid_expires_at"]) > first_expiry, "{h}");
    assert!(
        SystemTime::now() < first_expiry + Duration::from_secs(1),
        "recovered while the old SVID still lived (else this is not the renewal path)"
    );
    // What is on disk is what the agent uses: a restart of the agent re-uses it.
    let on_disk = std::fs::read_to_string(data.join("node.crt")).unwrap();
    assert!(on_disk.contains("BEGIN CERTIFICATE"));
    eprintln!(
        "full disk for {:?}: {attempts} renewals signed and not saved; renewed {:?} after space was freed",
        freed - full_since,
        freed.elapsed()
    );
    agent.stop();
    let again = AgentProcess::start(dir.path(), "n1", &server, None);
    eventually(
        Duration::from_secs(20),
        "the restarted agent to sync with what it saved",
        || {
            again
                .health()
                .filter(|h| h["server_connected"] == true)
                .map(|_| ())
        },
    );
    again.stop();
    server.stop();
}
