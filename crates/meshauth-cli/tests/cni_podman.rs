//! Enforcement without the lab's pods: two lab nodes, each with an agent run with `--cni`, and
//! containers started by podman (CNI backend, a local busybox root filesystem) through the
//! `meshauth-cni` plugin, under the walkthrough's policies. Also the plugin run directly with
//! the CNI environment (ADD, CHECK, DEL), as a runtime runs it. Needs root.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshauth_test_support::require_root;

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
mod cni_support;
use cni_support::{CNI, run_plugin};
const TD: &str = "cni.test";
const POLICIES: &str = include_str!("../../meshauth-policy/tests/fixtures/walkthrough.yaml");
const LIMIT: Duration = Duration::from_secs(30);
/// Where each agent serves /metrics, inside its node's network namespace.
const METRICS: &str = "127.0.0.1:9464";

/// The lab, its server and agents, and each node's podman; all removed when dropped.
struct Cluster {
    lab: meshauth_lab::Lab,
    work: tempfile::TempDir,
    children: Vec<Child>,
    /// Each node's agent: its process (an index of `children`) and arguments.
    agents: std::collections::BTreeMap<String, (usize, Vec<String>)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in ["n1", "n2"] {
            let _ = self.podman(node, None, &["rm", "-a", "-f", "-t", "0"]);
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    meshauth_test_support::eventually(limit, what, || f().then_some(()));
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Cluster {
    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn w(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn netns(&self, node: &str) -> String {
        format!("{}-{node}", self.lab.name())
    }

    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &self.w("server-admin.sock")])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "meshauth {}: {}",
            args.join(" "),
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn agent_socket(&self, node: &str) -> String {
        self.w(&format!("{node}-agent.sock"))
    }

    fn spawn(&mut self, netns: &str, args: Vec<String>, log: &str) {
        let mut argv = vec![BIN.to_owned()];
        argv.extend(args);
        let log = std::fs::File::create(self.path(log)).unwrap();
        let child = self
            .lab
            .exec_in(netns, &argv)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs podman in `node`'s network namespace (its own storage and CNI configuration),
    /// for pod `pod` (`CNI_ARGS=MESHAUTH_POD=default/<pod>`).
    fn podman(&self, node: &str, pod: Option<&str>, args: &[&str]) -> Output {
        let dir = self.path(&format!("podman-{node}"));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(node)))
            .arg("podman")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["--runtime", "runc", "--cgroup-manager=cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", dir.join("containers.conf"));
        if let Some(p) = pod {
            cmd.env("CNI_ARGS", format!("MESHAUTH_POD=default/{p}"));
        }
        cmd.output().unwrap()
    }

    /// Starts container `pod` on `node` running `argv` in the busybox root filesystem.
    fn run(&self, node: &str, pod: &str, argv: &[&str]) -> Output {
        let rootfs = self.w("rootfs");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            pod,
            "--network",
            "meshauth",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--rootfs",
            &rootfs,
        ];
        args.extend(argv);
        self.podman(node, Some(pod), &args)
    }

    /// One HTTP GET from container `pod` on `node` to `to`: whether it got the page.
    fn get(&self, node: &str, pod: &str, to: &str) -> bool {
        let o = self.podman(
            node,
            None,
            &[
                "exec",
                pod,
                "/bin/sh",
                "-c",
                // busybox nc (its wget crashes in Debian's static build).
                &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {to} 80"),
            ],
        );
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("meshauth-cni")
    }

    fn pod_ip(&self, pod: &str) -> Option<String> {
        let pods: serde_json::Value =
            serde_json::from_str(&self.cli(&["pod", "list", "-o", "json"])).unwrap();
        pods.as_array()?
            .iter()
            .find(|p| p["name"] == pod)
            .and_then(|p| p["ipv4"].as_str())
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned)
    }

    /// Whether `node`'s agent holds an auth entry with an identity of `app` on either side.
    fn has_pair_with(&self, node: &str, app: &str) -> bool {
        let o = Command::new(BIN)
            .args(["auth", "list", "-o", "json", "--agent-socket"])
            .arg(self.agent_socket(node))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array().is_some_and(|es| {
            es.iter()
                .any(|e| e["local"]["labels"]["app"] == app || e["remote"]["labels"]["app"] == app)
        })
    }

    /// Stops `node`'s agent (SIGTERM) and starts it again with the same arguments.
    fn restart_agent(&mut self, node: &str) {
        let (i, args) = self.agents[node].clone();
        let pid = self.children[i].id().to_string();
        assert!(Command::new("kill").arg(&pid).status().unwrap().success());
        let _ = self.children[i].wait();
        let netns = self.netns(node);
        let mut argv = vec![BIN.to_owned()];
        argv.extend(args);
        let log = std::fs::File::options()
            .append(true)
            .open(self.path(&format!("agent-{node}.log")))
            .unwrap();
        self.children[i] = self
            .lab
            .exec_in(&netns, &argv)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let socket = self.agent_socket(node);
        wait(LIMIT, "the restarted agent to be ready", || {
            Command::new(BIN)
                .args(["agent", "healthcheck", "--agent-socket", &socket])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }

    /// `node`'s agent's metrics (fetched inside the node's network namespace).
    fn metrics(&self, node: &str) -> String {
        let o = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns(node)))
            .args([
                "python3",
                "-c",
                &format!("import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())"),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "metrics of {node}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The node sides of container veths on `node`.
    fn veths(&self, node: &str) -> Vec<String> {
        let o = Command::new("ip")
            .args(["-n", &self.netns(node), "-o", "link", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n.starts_with("mc"))
            .collect()
    }
}

fn write_podman_config(dir: &Path, plugin_dir: &Path, agent_socket: &str) {
    let net = dir.join("net.d");
    std::fs::create_dir_all(&net).unwrap();
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n[engine]\nevents_logger = \"file\"\n",
            plugin_dir.display(),
            net.display()
        ),
    )
    .unwrap();
    std::fs::write(
        net.join("meshauth.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "meshauth",
            "plugins": [{"type": "meshauth-cni", "agent_socket": agent_socket}],
        })
        .to_string(),
    )
    .unwrap();
}

/// A busybox root filesystem: a shell, an HTTP server, nc, ip; a page to serve.
fn write_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox (Debian package busybox-static) is needed for the containers");
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for app in ["sh", "httpd", "nc", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(app)).unwrap();
    }
    for d in ["etc", "proc", "sys", "dev", "tmp", "www"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), "served by meshauth-cni\n").unwrap();
}

fn up(name: &str) -> Cluster {
    let lab = meshauth_lab::Lab::new(name).unwrap();
    let _ = lab.down();
    lab.up(2).unwrap();
    let mut c = Cluster {
        lab,
        work: tempfile::tempdir().unwrap(),
        children: vec![],
        agents: Default::default(),
    };
    write_rootfs(&c.path("rootfs"));
    let plugins = c.path("cni-bin");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(CNI, plugins.join("meshauth-cni")).unwrap();
    for node in ["n1", "n2"] {
        write_podman_config(
            &c.path(&format!("podman-{node}")),
            &plugins,
            &c.agent_socket(node),
        );
    }
    let server = format!("{}:8081", meshauth_lab::SERVER_ADDRESS);
    let underlay = c.lab.underlay_netns();
    let args = s(&[
        "server",
        "run",
        "--trust-domain",
        TD,
        "--listen",
        &server,
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        &c.w("server"),
        "--admin-socket",
        &c.w("server-admin.sock"),
    ]);
    c.spawn(&underlay, args, "server.log");
    let admin = c.w("server-admin.sock");
    wait(LIMIT, "the server", || {
        Command::new(BIN)
            .args(["server", "healthcheck", "--admin-socket", &admin])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    std::fs::write(c.path("bundle.pem"), c.cli(&["bundle", "show"])).unwrap();
    std::fs::write(c.path("policies.yaml"), POLICIES).unwrap();
    c.cli(&["policy", "apply", "-f", &c.w("policies.yaml")]);
    for (pod, node, app) in [
        ("demo-1", "n1", "demodeployment"),
        ("client1-2", "n2", "client1"),
        ("client2-2", "n2", "client2"),
        ("client3-2", "n2", "client3"),
        // Placed on n1; the test starts it on n2.
        ("stray-1", "n1", "client1"),
        // For the plugin run directly.
        ("direct-1", "n1", "client3"),
    ] {
        c.cli(&[
            "pod",
            "create",
            pod,
            "--node",
            node,
            "--labels",
            &format!("app={app}"),
        ]);
    }
    for (i, node) in ["n1", "n2"].into_iter().enumerate() {
        let i = i + 1;
        let token = c
            .cli(&[
                "token",
                "generate",
                "--node",
                node,
                "--address",
                &format!("10.199.0.{i}"),
                "--pod-range",
                &format!("10.200.{i}.0/24"),
            ])
            .trim()
            .to_owned();
        let token_file = c.path(&format!("{node}.token"));
        std::fs::write(&token_file, token).unwrap();
        let args = s(&[
            "agent",
            "run",
            "--cni",
            "--node",
            node,
            "--trust-domain",
            TD,
            "--server",
            &server,
            "--trust-bundle",
            &c.w("bundle.pem"),
            "--data-dir",
            &c.w(node),
            "--workload-socket",
            &c.w(&format!("{node}-workload.sock")),
            "--agent-socket",
            &c.agent_socket(node),
            // In the node's network namespace: the same port on every node.
            "--metrics-listen",
            METRICS,
            "--join-token-file",
            &token_file.display().to_string(),
            // Under the lab's prefix, so that taking the lab down removes the pins.
            "--pin-dir",
            &format!("{}/{}-{node}", meshauth_lab::BPF_PIN_ROOT, c.lab.name()),
        ]);
        let netns = c.netns(node);
        c.agents
            .insert(node.to_owned(), (c.children.len(), args.clone()));
        c.spawn(&netns, args, &format!("agent-{node}.log"));
    }
    for node in ["n1", "n2"] {
        let socket = c.agent_socket(node);
        wait(LIMIT, "the agent to be ready", || {
            Command::new(BIN)
                .args(["agent", "healthcheck", "--agent-socket", &socket])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }
    c
}

#[test]
fn podman_containers_are_enforced_as_the_walkthrough_says() {
    if !require_root("cni_podman") {
        return;
    }
    let mut c = up("cnipm");
    let o = c.run(
        "n1",
        "demo-1",
        &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
    );
    assert!(o.status.success(), "podman run demo-1: {}", text(&o));
    for client in ["client1-2", "client2-2", "client3-2"] {
        let o = c.run("n2", client, &["/bin/sleep", "600"]);
        assert!(o.status.success(), "podman run {client}: {}", text(&o));
    }
    let demo = c
        .pod_ip("demo-1")
        .expect("demo-1 was reported with its address");
    assert!(demo.starts_with("10.200.1."), "{demo}");
    // Each container's address is the one the agent assigned and the server accepted.
    let o = c.podman(
        "n1",
        None,
        &[
            "exec", "demo-1", "/bin/ip", "-o", "-4", "addr", "show", "eth0",
        ],
    );
    assert!(text(&o).contains(&format!("{demo}/32")), "{}", text(&o));

    wait(LIMIT, "client1 to reach demo-1", || {
        c.get("n2", "client1-2", &demo)
    });
    wait(LIMIT, "client2 to reach demo-1 (authenticated)", || {
        c.get("n2", "client2-2", &demo)
    });
    assert!(
        c.has_pair_with("n1", "client2"),
        "n1 holds the client2 pair"
    );
    assert!(
        c.has_pair_with("n2", "client2"),
        "n2 holds the client2 pair"
    );
    for _ in 0..3 {
        assert!(
            !c.get("n2", "client3-2", &demo),
            "client3 is denied by policy"
        );
    }

    // A container of a pod the control plane placed on another node gets no network.
    let o = c.run("n2", "stray-1", &["/bin/sleep", "600"]);
    assert!(!o.status.success(), "stray-1 started on n2: {}", text(&o));
    assert!(
        text(&o).contains("pod default/stray-1 is placed on node n1, not on this node (n2)"),
        "the runtime shows why: {}",
        text(&o)
    );
    assert_eq!(
        c.veths("n2").len(),
        3,
        "no veth left for stray-1: {:?}",
        c.veths("n2")
    );
    assert!(c.pod_ip("stray-1").is_none(), "stray-1 was never reported");
    let m = c.metrics("n2");
    assert!(
        m.contains("meshauth_agent_cni_requests_total{operation=\"Add\",result=\"Refused\"} 1"),
        "the refusal is counted: {m}"
    );
    assert!(
        m.contains("meshauth_agent_cni_requests_total{operation=\"Add\",result=\"Ok\"} 3"),
        "{m}"
    );

    // Removing a container revokes its pairs on both nodes.
    let start = Instant::now();
    let o = c.podman("n2", None, &["rm", "-f", "-t", "0", "client2-2"]);
    assert!(o.status.success(), "podman rm: {}", text(&o));
    let removed = start.elapsed();
    let revoked = loop {
        if !c.has_pair_with("n1", "client2") && !c.has_pair_with("n2", "client2") {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < removed + Duration::from_secs(5),
            "client2's pairs still held 5 s after its container was removed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "client2-2 removed in {} ms; its pairs revoked on both nodes {} ms after the removal started",
        removed.as_millis(),
        revoked.as_millis()
    );
    assert!(
        revoked <= removed + Duration::from_secs(1),
        "revoked {} ms after `podman rm` returned (limit 1 s)",
        (revoked - removed).as_millis()
    );
    assert!(
        c.pod_ip("client2-2").is_none(),
        "client2-2's address withdrawn"
    );
    assert_eq!(c.veths("n2").len(), 2, "{:?}", c.veths("n2"));
    // The others are untouched.
    assert!(c.get("n2", "client1-2", &demo));

    // An agent restarted while its containers run keeps them: same address, still enforced.
    c.restart_agent("n1");
    assert_eq!(c.pod_ip("demo-1").as_deref(), Some(demo.as_str()));
    wait(
        LIMIT,
        "client1 to reach demo-1 after n1's agent restarted",
        || c.get("n2", "client1-2", &demo),
    );
    assert!(!c.get("n2", "client3-2", &demo), "client3 is still denied");
}

/// Runs the plugin binary as a runtime does, in `netns` of `node` (`CNI_NETNS` = `sandbox`).
fn plugin(c: &Cluster, node: &str, command: &str, sandbox: &str, conf: &str) -> Output {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", c.netns(node)))
        .arg(CNI)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "direct0123456789")
        .env("CNI_NETNS", sandbox)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "IgnoreUnknown=1;MESHAUTH_POD=default/direct-1");
    run_plugin(cmd, conf)
}

#[test]
fn the_plugin_run_directly_returns_spec_results() {
    if !require_root("cni_podman") {
        return;
    }
    let c = up("cnidir");
    let sandbox_name = format!("{}-direct", c.lab.name());
    let sandbox = format!("/run/netns/{sandbox_name}");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &sandbox_name])
            .status()
            .unwrap()
            .success()
    );
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _netns = Netns(sandbox_name);
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "meshauth",
        "type": "meshauth-cni",
        "agent_socket": c.agent_socket("n1"),
    })
    .to_string();

    let o = plugin(&c, "n1", "ADD", &sandbox, &conf);
    assert!(o.status.success(), "ADD: {}", text(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(result["cniVersion"], "1.0.0");
    let ifs = result["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2, "{result}");
    assert!(
        ifs[0]["name"].as_str().unwrap().starts_with("mc"),
        "{result}"
    );
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], sandbox.as_str());
    for i in ifs {
        assert_eq!(i["mac"].as_str().unwrap().len(), 17, "{result}");
    }
    let ip = &result["ips"][0];
    assert_eq!(ip["interface"], 1);
    assert_eq!(ip["gateway"], "169.254.1.1");
    let address = ip["address"].as_str().unwrap().to_owned();
    assert!(
        address.starts_with("10.200.1.") && address.ends_with("/32"),
        "{result}"
    );
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    // The address is the pod's, as the server accepted it.
    wait(LIMIT, "direct-1 reported", || {
        c.pod_ip("direct-1")
            .is_some_and(|a| format!("{a}/32") == address)
    });

    let mut with_prev: serde_json::Value = serde_json::from_str(&conf).unwrap();
    with_prev["prevResult"] = result.clone();
    let o = plugin(&c, "n1", "CHECK", &sandbox, &with_prev.to_string());
    assert!(o.status.success(), "CHECK: {}", text(&o));
    // CHECK notices a container whose address was taken away.
    let st = Command::new("ip")
        .args([
            "-n",
            &format!("{}-direct", c.lab.name()),
            "addr",
            "del",
            &address,
            "dev",
            "eth0",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let o = plugin(&c, "n1", "CHECK", &sandbox, &with_prev.to_string());
    assert!(!o.status.success());
    let err: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(err["code"].as_u64().unwrap() >= 100, "{err}");
    assert!(err["msg"].as_str().unwrap().contains(&address), "{err}");

    let o = plugin(&c, "n1", "DEL", &sandbox, &with_prev.to_string());
    assert!(o.status.success(), "DEL: {}", text(&o));
    assert!(o.stdout.is_empty(), "DEL prints nothing");
    assert!(c.veths("n1").is_empty(), "{:?}", c.veths("n1"));
    wait(LIMIT, "direct-1 withdrawn", || {
        c.pod_ip("direct-1").is_none()
    });
    // DEL again: nothing left to do, still a success.
    let o = plugin(&c, "n1", "DEL", &sandbox, &with_prev.to_string());
    assert!(o.status.success(), "second DEL: {}", text(&o));
    // CHECK of what is gone: the spec's "container unknown".
    let o = plugin(&c, "n1", "CHECK", &sandbox, &conf);
    let err: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(err["code"], 3, "{err}");
}
