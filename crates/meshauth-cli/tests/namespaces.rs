//! Namespaces end to end (root only), on the demo's three-node lab (`nsiso`): a pod of
//! namespace `other` with client1's labels is another identity and is denied where client1 is
//! allowed; Cilium's namespace-isolation example (two policies of one name, in `ns1` and `ns2`)
//! lets each namespace's pods reach only their own namespace's, and deleting one of the two by
//! its key leaves the other in force. Each time the kernel does what `policy trace` says.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshauth");
const LAB: &str = "nsiso";
const LIMIT: Duration = Duration::from_secs(20);
const ISOLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../meshauth-policy/tests/fixtures/cilium-docs/22-isolate-namespaces.yaml"
);
const HTTP_SERVER: &str = "import http.server\nhttp.server.ThreadingHTTPServer(('0.0.0.0', 80), http.server.SimpleHTTPRequestHandler).serve_forever()";

struct Down(meshauth_lab::Lab);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn work() -> PathBuf {
    PathBuf::from(meshauth_lab::STATE_DIR).join(LAB)
}

fn admin() -> String {
    work().join("server-admin.sock").display().to_string()
}

/// Runs `meshauth` with the lab's admin socket; panics with its stderr if it fails.
fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--admin-socket", &admin()])
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

fn lab_cli(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["lab", "--lab", LAB])
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

/// `policy trace` over the policies the server holds now: the verdict.
fn trace(src: &str, dst: &str) -> String {
    let list: serde_json::Value =
        serde_json::from_str(&cli(&["policy", "list", "-o", "json"])).unwrap();
    let docs: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["yaml"].as_str().unwrap())
        .collect();
    let path = work().join("current-policies.yaml");
    std::fs::write(&path, docs.join("\n---\n")).unwrap();
    let out = Command::new(BIN)
        .args(["policy", "trace", "-f"])
        .arg(&path)
        .args([
            "--src", src, "--dst", dst, "--dport", "80/TCP", "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["verdict"].as_str().unwrap().to_owned()
}

/// One HTTP GET from `pod` to `to`: whether it got a 200.
fn get(lab: &meshauth_lab::Lab, pod: &str, to: &str) -> bool {
    let py = format!(
        "import http.client\nc = http.client.HTTPConnection('{to}', 80, timeout=2)\nc.request('GET', '/'); print(c.getresponse().status)"
    );
    let argv: Vec<String> = ["python3", "-c", &py]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = lab
        .exec(pod, &argv)
        .unwrap()
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "200"
}

/// Waits until `f` holds.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < LIMIT, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{what}: within {:?}", t.elapsed());
}

/// Places pod `name` of `namespace` on `node` (control plane) and creates it in the lab.
fn add_pod(namespace: &str, name: &str, node: &str, labels: &str) {
    cli(&[
        "pod", "create", name, "-n", namespace, "--node", node, "--labels", labels,
    ]);
    lab_cli(&[
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

fn reported(key: &str) -> bool {
    let pods: serde_json::Value =
        serde_json::from_str(&cli(&["pod", "list", "-o", "json"])).unwrap();
    pods.as_array().unwrap().iter().any(|p| {
        format!(
            "{}/{}",
            p["namespace"].as_str().unwrap(),
            p["name"].as_str().unwrap()
        ) == key
            && p["reported"] == true
    })
}

#[test]
fn namespaces_isolate_identities_and_policies_in_the_kernel() {
    if !meshauth_test_support::require_root("the namespace end-to-end test (lab, eBPF)") {
        return;
    }
    let lab = meshauth_lab::Lab::new(LAB).unwrap();
    let _down = Down(lab.clone());
    let out = Command::new(BIN)
        .args([
            "--log", "warn", "demo", "--lab", LAB, "--keep", "-o", "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 1. client1's labels in namespace `other`: another identity, denied where client1 is
    //    allowed.
    add_pod("other", "client1-x", "n2", "app=client1");
    until("other/client1-x reported", || reported("other/client1-x"));
    let ids: serde_json::Value =
        serde_json::from_str(&cli(&["identity", "list", "-o", "json"])).unwrap();
    let client1: Vec<&serde_json::Value> = ids
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["labels"]["app"] == "client1")
        .collect();
    assert_eq!(client1.len(), 2, "one identity per namespace: {ids}");
    assert_eq!(
        trace(
            "app=client1,io.kubernetes.pod.namespace=other",
            "app=demodeployment"
        ),
        "denied"
    );
    assert_eq!(trace("app=client1", "app=demodeployment"), "allowed");
    assert!(
        get(&lab, "client1-2", "demodeployment-1"),
        "client1 of default"
    );
    for _ in 0..2 {
        assert!(
            !get(&lab, "client1-x", "demodeployment-1"),
            "client1's labels in namespace other are denied"
        );
    }

    // 2. Cilium's namespace isolation: two policies named isolate-ns1, one in ns1 and one in
    //    ns2; each namespace's pods accept only their own namespace's.
    add_pod("ns1", "web-ns1", "n1", "app=web");
    add_pod("ns2", "web-ns2", "n1", "app=web");
    add_pod("ns1", "cl-ns1", "n2", "app=cl");
    add_pod("ns2", "cl-ns2", "n2", "app=cl");
    let mut servers = Vec::new();
    for pod in ["web-ns1", "web-ns2"] {
        let argv: Vec<String> = ["python3", "-c", HTTP_SERVER]
            .iter()
            .map(|s| s.to_string())
            .collect();
        servers.push(
            lab.exec(pod, &argv)
                .unwrap()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    for p in ["ns1/web-ns1", "ns2/web-ns2", "ns1/cl-ns1", "ns2/cl-ns2"] {
        until(&format!("{p} reported"), || reported(p));
    }
    until("ns2's client reaches ns1's web before isolation", || {
        get(&lab, "cl-ns2", "web-ns1")
    });
    let applied = cli(&["policy", "apply", "-f", ISOLATE]);
    assert!(
        applied.contains("applied policy ns1/isolate-ns1")
            && applied.contains("applied policy ns2/isolate-ns1"),
        "{applied}"
    );
    let ns = |app: &str, ns: &str| format!("app={app},io.kubernetes.pod.namespace={ns}");
    assert_eq!(trace(&ns("cl", "ns2"), &ns("web", "ns1")), "denied");
    assert_eq!(trace(&ns("cl", "ns1"), &ns("web", "ns1")), "allowed");
    assert_eq!(trace(&ns("cl", "ns1"), &ns("web", "ns2")), "denied");
    assert_eq!(trace("app=client1", &ns("web", "ns1")), "denied");
    until("ns2's client is denied by ns1's isolation", || {
        !get(&lab, "cl-ns2", "web-ns1")
    });
    assert!(get(&lab, "cl-ns1", "web-ns1"), "ns1 reaches ns1");
    assert!(get(&lab, "cl-ns2", "web-ns2"), "ns2 reaches ns2");
    assert!(!get(&lab, "cl-ns1", "web-ns2"), "ns1 does not reach ns2");
    assert!(
        !get(&lab, "client1-2", "web-ns1"),
        "default does not reach ns1"
    );

    // Deleting ns2's policy by its key leaves ns1's (same name) in force.
    assert_eq!(
        cli(&["policy", "delete", "ns2/isolate-ns1"]).trim(),
        "deleted policy ns2/isolate-ns1"
    );
    assert_eq!(trace(&ns("cl", "ns1"), &ns("web", "ns2")), "allowed");
    until("ns1's client reaches ns2 once ns2's policy went", || {
        get(&lab, "cl-ns1", "web-ns2")
    });
    assert!(!get(&lab, "cl-ns2", "web-ns1"), "ns1 is still isolated");
    let list = cli(&["policy", "list"]);
    assert!(
        list.lines().any(|l| l.starts_with("ns1/isolate-ns1")) && !list.contains("ns2/isolate-ns1"),
        "{list}"
    );
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    lab.down().unwrap();
}
