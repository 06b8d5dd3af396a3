//! Test support: the demo's three-node lab (`meshauth demo --keep`) under a name of the
//! test's, driven through the real `meshauth` binary, and torn down when dropped.

#![allow(dead_code, unreachable_pub, reason = "shared by several test files")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
/// How long a change may take to reach the kernel in these tests.
pub const LIMIT: Duration = Duration::from_secs(20);
/// An HTTP/1.0 server on port 80 of every address of its namespace.
pub const HTTP_SERVER: &str = "import http.server\nhttp.server.ThreadingHTTPServer(('0.0.0.0', 80), http.server.SimpleHTTPRequestHandler).serve_forever()";

/// The demo's lab, up with its server and agents; down (processes included) when dropped.
pub struct DemoLab {
    pub lab: meshauth_lab::Lab,
    name: String,
    children: Vec<Child>,
}

impl Drop for DemoLab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl DemoLab {
    /// Runs `meshauth demo --lab <name> --keep` (which checks the walkthrough's outcome).
    pub fn up(name: &str) -> DemoLab {
        DemoLab::up_with(name, &[])
    }

    /// [`DemoLab::up`] with more `meshauth demo` flags.
    pub fn up_with(name: &str, extra: &[&str]) -> DemoLab {
        let lab = meshauth_lab::Lab::new(name).unwrap();
        let out = Command::new(BIN)
            .args([
                "--log", "warn", "demo", "--lab", name, "--keep", "-o", "json",
            ])
            .args(extra)
            .output()
            .unwrap();
        let d = DemoLab {
            lab,
            name: name.to_owned(),
            children: vec![],
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    }

    pub fn work(&self) -> PathBuf {
        PathBuf::from(meshauth_lab::STATE_DIR).join(&self.name)
    }

    fn admin(&self) -> String {
        self.work().join("server-admin.sock").display().to_string()
    }

    /// Runs `meshauth` with the lab's admin socket; panics with its stderr if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin-socket", &self.admin()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshauth {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `meshauth lab --lab <name> ...`.
    pub fn lab_cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["lab", "--lab", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "meshauth lab {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's policies now, written to a file of the lab's work directory.
    pub fn policies_file(&self) -> PathBuf {
        let list: serde_json::Value =
            serde_json::from_str(&self.cli(&["policy", "list", "-o", "json"])).unwrap();
        let docs: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["yaml"].as_str().unwrap())
            .collect();
        let path = self.work().join("current-policies.yaml");
        std::fs::write(&path, docs.join("\n---\n")).unwrap();
        path
    }

    /// `meshauth policy trace` over the server's policies now, with `extra` arguments (the
    /// peers and port): its JSON.
    pub fn trace_json(&self, extra: &[&str]) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["policy", "trace", "-f"])
            .arg(self.policies_file())
            .args(extra)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The verdict `policy trace` gives `src` → `dst` on 80/TCP.
    pub fn trace(&self, src: &str, dst: &str) -> String {
        let v = self.trace_json(&["--src", src, "--dst", dst, "--dport", "80/TCP"]);
        v["verdict"].as_str().unwrap().to_owned()
    }

    /// The verdict `policy trace` gives `src` → `dst` on 80/TCP over the server's policies
    /// (no -f; pods by name: `pod:[NAMESPACE/]NAME`).
    pub fn trace_live(&self, src: &str, dst: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.cli(&[
            "policy", "trace", "--src", src, "--dst", dst, "--dport", "80/TCP", "-o", "json",
        ]))
        .unwrap();
        v["verdict"].as_str().unwrap().to_owned()
    }

    /// Places pod `name` of `namespace` on `node` (control plane) and creates it in the lab.
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str, labels: &str) {
        self.cli(&[
            "pod", "create", name, "-n", namespace, "--node", node, "--labels", labels,
        ]);
        self.lab_cli(&[
            "pod",
            "add",
            name,
            "--namespace",
            namespace,
            "--node",
            node,
            "--labels",
            labels,
        ]);
    }

    /// Whether the pod `namespace/name` was reported by its node.
    pub fn reported(&self, key: &str) -> bool {
        let pods: serde_json::Value =
            serde_json::from_str(&self.cli(&["pod", "list", "-o", "json"])).unwrap();
        pods.as_array().unwrap().iter().any(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap()
            ) == key
                && p["reported"] == true
        })
    }

    /// Starts an HTTP server on port 80 in network namespace `netns` (stopped on drop).
    pub fn serve_http_in(&mut self, netns: &str) {
        let child = self
            .lab
            .exec_in(netns, &argv(&["python3", "-c", HTTP_SERVER]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Starts an HTTP server on port 80 in pod `pod`.
    pub fn serve_http(&mut self, pod: &str) {
        let netns = self
            .lab
            .state()
            .unwrap()
            .unwrap()
            .pods
            .into_iter()
            .find(|p| p.name == pod)
            .unwrap()
            .netns;
        self.serve_http_in(&netns);
    }

    /// One HTTP GET from network namespace `netns` to `to` (optionally from address `from`):
    /// whether it got a 200.
    pub fn get_in(&self, netns: &str, to: &str, from: Option<&str>) -> bool {
        let source = from.map_or(String::new(), |a| format!(", source_address=('{a}', 0)"));
        let py = format!(
            "import http.client\nc = http.client.HTTPConnection('{to}', 80, timeout=2{source})\nc.request('GET', '/'); print(c.getresponse().status)"
        );
        let out = self
            .lab
            .exec_in(netns, &argv(&["python3", "-c", &py]))
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "200"
    }

    /// One HTTP GET from pod `pod` to `to`: whether it got a 200.
    pub fn get(&self, pod: &str, to: &str) -> bool {
        let out = self
            .lab
            .exec(
                pod,
                &argv(&[
                    "python3",
                    "-c",
                    &format!(
                        "import http.client\nc = http.client.HTTPConnection('{to}', 80, timeout=2)\nc.request('GET', '/'); print(c.getresponse().status)"
                    ),
                ]),
            )
            .unwrap()
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "200"
    }

    /// The pid and command line of the lab's server whose data dir is `<work>/<data_dir>`
    /// (`server` for the first replica, `server-<i>` for the others).
    pub fn server_process(&self, data_dir: &str) -> (u32, Vec<String>) {
        let data_dir = self.work().join(data_dir).display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if argv.iter().any(|a| a == "server")
                && argv
                    .windows(2)
                    .any(|w| w[0] == "--data-dir" && w[1] == data_dir)
            {
                return (pid, argv);
            }
        }
        panic!(
            "no server process with data dir {data_dir} in lab {}",
            self.name
        );
    }

    /// `agent healthcheck -o json` of a node's agent (printed also when not ready).
    pub fn agent_health(&self, node: &str) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["agent", "healthcheck", "-o", "json", "--agent-socket"])
            .arg(self.work().join(format!("{node}-agent.sock")))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// The address of pod `pod`.
    pub fn ip_of(&self, pod: &str) -> String {
        self.lab
            .state()
            .unwrap()
            .unwrap()
            .pods
            .into_iter()
            .find(|p| p.name == pod)
            .unwrap()
            .ip
            .to_string()
    }
}

/// Waits until `f` holds.
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{what}: within {:?}", t.elapsed());
}

/// Runs `ip` with `args` (in the lab's own namespaces: `-n <lab>-...`); panics if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
