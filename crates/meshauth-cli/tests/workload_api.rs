//! A real server, a real agent and real SPIFFE clients: the `spiffe` crate (WorkloadApiClient,
//! X509Source), a raw gRPC client for the refusal cases, and the Python `spiffe` package.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::time::{Duration, SystemTime};

use meshauth_proto::workload::X509svidRequest;
use meshauth_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshauth_spiffe::X509Bundle;
use meshauth_test_support::eventually_async;
use rustls::pki_types::CertificateDer;
use support::{AgentProcess, ServerProcess, TD, eventually};
use tokio_stream::StreamExt;

fn uid() -> u32 {
    // Read from procfs: this crate has no `unsafe`, so no getuid(2).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Server + agent of node n1 + an entry for this test process's uid.
fn setup(dir: &std::path::Path, ttl: &str) -> (ServerProcess, AgentProcess) {
    let server = ServerProcess::start(dir);
    server.bundle_file();
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/workload"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--x509-svid-ttl",
        ttl,
    ]);
    let token = server.token("n1");
    let agent = AgentProcess::start(dir, "n1", &server, Some(&token));
    (server, agent)
}

fn our_bundle(b: &spiffe::X509Bundle) -> X509Bundle {
    X509Bundle {
        trust_domain: TD.parse().unwrap(),
        authorities: b
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect(),
        sequence: 0,
        refresh_hint: None,
    }
}

fn chain_of(svid: &spiffe::X509Svid) -> Vec<CertificateDer<'static>> {
    svid.cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect()
}

async fn fetch_with_retry(endpoint: &str) -> spiffe::X509Svid {
    eventually_async(
        Duration::from_secs(10),
        &format!("an SVID from {endpoint}"),
        || async move {
            let client = spiffe::WorkloadApiClient::connect_to(endpoint).await.ok()?;
            client.fetch_x509_svid().await.ok()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_client_receives_svid_and_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent) = setup(dir.path(), "4s");
    let endpoint = agent.endpoint();

    let svid = fetch_with_retry(&endpoint).await;
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/workload")
    );
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = our_bundle(bundles.get(&td).as_deref().unwrap());
    let verified =
        meshauth_spiffe::validate_x509_svid(&chain_of(&svid), &bundle, SystemTime::now())
            .expect("the SVID validates against the bundle the agent serves");
    let first_serial = verified.serial;

    // The stream delivers a new SVID after rotation (4 s TTL: renewed at about 2 s).
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let rotated = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ctx) = stream.next().await {
            let ctx = ctx.unwrap();
            let svid = ctx.default_svid().unwrap();
            let v =
                meshauth_spiffe::validate_x509_svid(&chain_of(svid), &bundle, SystemTime::now())
                    .unwrap();
            if v.serial != first_serial {
                return v;
            }
        }
        panic!("stream ended");
    })
    .await
    .expect("a rotated SVID arrives on the stream");
    assert_eq!(
        rotated.spiffe_id.to_string(),
        format!("spiffe://{TD}/workload")
    );

    // X509Source, the high-level client, works unchanged.
    let source = spiffe::X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        format!("spiffe://{TD}/workload")
    );
    source.shutdown().await;

    // The operator's client gets the same identity and writes usable files.
    let out_dir = dir.path().join("svid-out");
    let out = std::process::Command::new(support::BIN)
        .args(["workload", "fetch", "-o", "json", "--socket"])
        .arg(&agent.workload_socket)
        .arg("--write")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched[0]["spiffe_id"], format!("spiffe://{TD}/workload"));
    let pem = std::fs::read_to_string(out_dir.join("svid.pem")).unwrap();
    let bundle_pem = std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap();
    let written: Vec<CertificateDer<'static>> = {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let written_bundle = X509Bundle::from_pem(TD.parse().unwrap(), &bundle_pem).unwrap();
    meshauth_spiffe::validate_x509_svid(&written, &written_bundle, SystemTime::now()).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out_dir.join("svid.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // The agent lists what it holds, without keys.
    let held = agent.svids();
    assert_eq!(held[0]["spiffe_id"], format!("spiffe://{TD}/workload"));
    assert!(!held.to_string().contains("PRIVATE"));
}

async fn raw_client(agent: &AgentProcess) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let channel = meshauth_proto::uds::connect(&agent.workload_socket)
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_follow_the_specification() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    server.bundle_file();
    // The only entry is for another uid.
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/other"),
        "--parent-id",
        &format!("spiffe://{TD}/node/n1"),
        "--selector",
        "unix:uid:54321",
    ]);
    let agent = AgentProcess::start(dir.path(), "n1", &server, Some(&server.token("n1")));
    eventually(Duration::from_secs(10), "first sync", || {
        agent.health().filter(|h| h["entries"] == 1).map(|_| ())
    });
    let mut client = raw_client(&agent).await;

    let err = client.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let err = client.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_server_outage_and_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent) = setup(dir.path(), "4s");
    let endpoint = agent.endpoint();
    fetch_with_retry(&endpoint).await;
    let port = server.port;

    // Server gone: the agent keeps serving what it has.
    server.kill();
    eventually(Duration::from_secs(10), "agent notices the outage", || {
        agent
            .health()
            .filter(|h| h["server_connected"] == false)
            .map(|_| ())
    });
    let svid = fetch_with_retry(&endpoint).await;
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/workload")
    );
    let before = agent.svids()[0]["serial"].clone();

    // Server back on the same port and data: the agent reconnects and rotates again by itself.
    let _server = ServerProcess::start_on(dir.path(), port, &[]);
    eventually(Duration::from_secs(40), "agent reconnects", || {
        agent
            .health()
            .filter(|h| h["server_connected"] == true)
            .map(|_| ())
    });
    eventually(
        Duration::from_secs(10),
        "a renewal after the restart",
        || (agent.svids()[0]["serial"] != before).then_some(()),
    );

    // Agent restarted without a token: it re-uses its node SVID.
    let node_serial = agent.health().unwrap()["node_svid_serial"].clone();
    agent.stop();
    let agent = AgentProcess::start(dir.path(), "n1", &_server, None);
    assert_eq!(agent.health().unwrap()["node_svid_serial"], node_serial);
    let svid = fetch_with_retry(&agent.endpoint()).await;
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/workload")
    );
}

#[test]
fn python_spiffe_client() {
    // A Python with the `spiffe` package: the only client here built on gRPC C-core, which is
    // what the agent's `:authority` relay exists for.
    let Some(python) =
        meshauth_test_support::require_env("MESHAUTH_PYTHON", "python_spiffe_client")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_server, agent) = setup(dir.path(), "1h");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/fetch_svid.py");
    let out = eventually(Duration::from_secs(20), "python client succeeds", || {
        let out = std::process::Command::new(&python)
            .arg(script)
            .arg(&agent.workload_socket)
            .arg(format!("spiffe://{TD}/workload"))
            .output()
            .unwrap();
        out.status.success().then_some(out)
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("ok spiffe://{TD}/workload")),
        "{stdout}"
    );
}
