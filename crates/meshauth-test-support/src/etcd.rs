//! A real etcd for tests: [`Etcd::start`] runs one member, [`Etcd::cluster`] several, each on
//! free loopback ports with its data in the given directory; dropping the [`Etcd`] kills them.
//!
//! The `etcd` binary comes from the Debian package `etcd-server` (etcd 3.4; `scripts/setup.sh`
//! installs it), or from `$MESHAUTH_ETCD`. A test that needs it **fails** when it is missing:
//! there is no skipping, so that CI cannot silently lose the etcd tests.
//!
//! Members run with short raft timers (50 ms heartbeat, 500 ms election timeout) and without
//! fsync, so that they start and elect in well under a second; nothing here is durable.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let etcd = meshauth_test_support::etcd::Etcd::start(dir.path());
//! let endpoint = etcd.endpoint(); // "127.0.0.1:<port>"
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The variable naming an `etcd` binary to use instead of the one on `PATH`.
pub const ETCD_VAR: &str = "MESHAUTH_ETCD";

/// How long a member may take to answer its health check after it was started.
const START_LIMIT: Duration = Duration::from_secs(20);

/// How many times a start is tried with fresh ports when one was taken in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// One or more etcd processes forming one cluster. Killed on drop.
#[derive(Debug)]
pub struct Etcd {
    binary: PathBuf,
    members: Vec<Member>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    /// Every member's `name=peer URL`, for `--initial-cluster`.
    initial_cluster: String,
    cluster_token: String,
    child: Option<Child>,
}

impl Etcd {
    /// Starts a single-member etcd with its data under `dir`, and waits until it answers.
    /// Panics (naming the fix) if the binary is missing or etcd does not come up.
    #[track_caller]
    pub fn start(dir: &Path) -> Etcd {
        Etcd::cluster(1, dir)
    }

    /// Starts an `n`-member cluster (`--initial-cluster`) with its data under `dir`, and waits
    /// until every member answers. Panics (naming the fix) if the binary is missing or the
    /// cluster does not come up.
    #[track_caller]
    pub fn cluster(n: usize, dir: &Path) -> Etcd {
        assert!(n > 0, "an etcd cluster needs at least one member");
        let binary = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = std::fs::create_dir_all(dir) {
            panic!("cannot create the etcd directory {}: {e}", dir.display());
        }
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut etcd = Etcd {
                binary: binary.clone(),
                members: members(n, dir),
            };
            match etcd.start_all() {
                Ok(()) => return etcd,
                // Another test took a port between our probe and etcd's bind: new ports.
                Err(e) if e.contains("address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last}")
    }

    /// The client endpoint (`127.0.0.1:<port>`) of the first member.
    pub fn endpoint(&self) -> String {
        self.member_endpoint(0)
    }

    /// The client endpoints of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.member_endpoint(i))
            .collect()
    }

    /// The client endpoint of member `i`.
    pub fn member_endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// How many members the cluster has (running or killed).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Kills member `i` with SIGKILL (a crash) and waits for it to exit. Its data stays, for
    /// [`Etcd::restart`].
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its ports and data (after [`Etcd::kill`]) and waits until it
    /// answers.
    #[track_caller]
    pub fn restart(&mut self, i: usize) {
        self.members[i].kill();
        let binary = self.binary.clone();
        let member = &mut self.members[i];
        if let Err(e) = member.spawn(&binary).and_then(|()| member.wait_healthy()) {
            panic!("{e}");
        }
    }

    /// Starts every member again on its ports and data (after the whole cluster was killed:
    /// a member alone cannot answer without quorum, so they are started together) and waits
    /// until each answers.
    #[track_caller]
    pub fn restart_all(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        if let Err(e) = self.start_all() {
            panic!("{e}");
        }
    }

    fn start_all(&mut self) -> Result<(), String> {
        for m in &mut self.members {
            m.spawn(&self.binary)?;
        }
        // Members of a new cluster elect together: all are started before any is waited for.
        for m in &mut self.members {
            m.wait_healthy()?;
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

impl Member {
    fn args(&self) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        [
            "--name",
            &self.name,
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-token",
            &self.cluster_token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--unsafe-no-fsync",
            "--logger",
            "zap",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn spawn(&mut self, binary: &Path) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot create etcd's log {}: {e}", self.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot share etcd's log {}: {e}", self.log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // etcd 3.4 refuses to start on architectures other than amd64 unless told to.
        if std::env::consts::ARCH != "x86_64" {
            let arch = match std::env::consts::ARCH {
                "aarch64" => "arm64",
                "powerpc64" => "ppc64le",
                other => other,
            };
            cmd.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "etcd member {} exited ({status}) before it answered; its log ends with:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if healthy(addr) {
                return Ok(());
            }
            if start.elapsed() > START_LIMIT {
                return Err(format!(
                    "etcd member {} did not answer on {addr} within {START_LIMIT:?}; its log ends with:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// `n` members with fresh ports, data dirs and logs under `dir`.
fn members(n: usize, dir: &Path) -> Vec<Member> {
    static CLUSTERS: AtomicU32 = AtomicU32::new(0);
    let cluster = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    let ports = free_ports(2 * n);
    let token = format!("meshauth-test-{}-{cluster}", std::process::id());
    let names: Vec<String> = (0..n).map(|i| format!("m{i}-{cluster}")).collect();
    let initial_cluster = names
        .iter()
        .enumerate()
        .map(|(i, name)| format!("{name}=http://127.0.0.1:{}", ports[2 * i + 1]))
        .collect::<Vec<_>>()
        .join(",");
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| Member {
            data_dir: dir.join(format!("etcd-{name}")),
            log: dir.join(format!("etcd-{name}.log")),
            client_port: ports[2 * i],
            peer_port: ports[2 * i + 1],
            initial_cluster: initial_cluster.clone(),
            cluster_token: token.clone(),
            name,
            child: None,
        })
        .collect()
}

/// `n` distinct loopback ports that were free a moment ago (all held at once while chosen).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("local address: {e}"))
                .port()
        })
        .collect()
}

/// A loopback endpoint (`127.0.0.1:<port>`) nothing listens on: for tests of an unreachable
/// etcd.
pub fn unused_endpoint() -> String {
    format!("127.0.0.1:{}", free_ports(1)[0])
}

/// Whether etcd on `addr` answers `GET /health` with `{"health":"true"}`.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// The etcd binary: `$MESHAUTH_ETCD`, else `etcd` on `PATH`.
fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(ETCD_VAR).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{ETCD_VAR}={} is not a file: point it at an etcd binary, or unset it to use the etcd-server package's",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "this test needs the etcd binary, which is not installed: install the Debian package etcd-server (`apt-get install etcd-server`; scripts/setup.sh does), or set MESHAUTH_ETCD to an etcd binary".to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_starts_answers_and_dies_with_its_handle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = Etcd::start(dir.path());
        let addr: SocketAddr = etcd.endpoint().parse().expect("an address");
        assert!(healthy(addr));
        assert_eq!(etcd.endpoints(), vec![etcd.endpoint()]);
        drop(etcd);
        assert!(!healthy(addr), "killed on drop");
    }

    #[test]
    fn a_cluster_survives_one_member_killed_and_takes_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut etcd = Etcd::cluster(3, dir.path());
        assert_eq!(etcd.len(), 3);
        let addrs: Vec<SocketAddr> = etcd
            .endpoints()
            .iter()
            .map(|e| e.parse().expect("an address"))
            .collect();
        etcd.kill(0);
        assert!(!healthy(addrs[0]));
        // The other two keep a quorum (and elect a leader if the killed one led).
        let start = Instant::now();
        while !healthy(addrs[1]) {
            assert!(start.elapsed() < START_LIMIT, "two members lost quorum");
            std::thread::sleep(Duration::from_millis(25));
        }
        etcd.restart(0);
        assert!(healthy(addrs[0]));
    }

    #[test]
    fn unused_endpoints_refuse_connections() {
        let addr: SocketAddr = unused_endpoint().parse().expect("an address");
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
    }
}
