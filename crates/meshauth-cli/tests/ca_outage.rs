//! A server down longer than its CA lifetime (20-second CAs, 4-second SVIDs here): when it comes
//! back, every authority it had has expired, so it starts a new CA. An agent that holds only the
//! bundle from before the outage takes the new CA without a new join token or a restart: the
//! server presents, beside its SVID, the new CA's certificate cross-signed by the last one to
//! expire, which the agent verifies with the key it already trusts; the agent (x509pop) then
//! attests again, gets the new bundle and syncs. The time to recover is printed.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{AgentProcess, ServerProcess, eventually, free_port};

const CA_TTL: Duration = Duration::from_secs(20);

/// An operator CA (`node-ca.pem`) and a certificate for node `n1` (`n1.crt`, `n1.key`).
fn operator_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test node CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("node-ca.pem"), cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "n1");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("n1.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("n1.key"), key.serialize_pem()).unwrap();
}

fn authorities(server: &ServerProcess) -> usize {
    server
        .ok(&["bundle", "show"])
        .matches("BEGIN CERTIFICATE")
        .count()
}

#[test]
fn an_agent_takes_the_new_ca_of_a_server_that_outlived_its_ca_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    operator_files(dir.path());
    let port = free_port();
    let ca = dir.path().join("node-ca.pem").display().to_string();
    let flags = ["--ca-ttl", "20s", "--svid-ttl", "4s", "--x509pop-ca", &ca];
    let server = ServerProcess::start_on(dir.path(), port, &flags);
    server.bundle_file();
    let (crt, key) = (
        dir.path().join("n1.crt").display().to_string(),
        dir.path().join("n1.key").display().to_string(),
    );
    let agent = AgentProcess::start_with(
        dir.path(),
        "n1",
        &server,
        &["--x509pop-cert", &crt, "--x509pop-key", &key],
    );
    eventually(Duration::from_secs(20), "the agent to sync", || {
        agent
            .health()
            .filter(|h| h["server_connected"] == true)
            .map(|_| ())
    });
    // At half of the CA's life the server prepares its successor and publishes it.
    eventually(Duration::from_secs(20), "the prepared CA", || {
        (authorities(&server) == 2).then_some(())
    });
    let prepared_at = Instant::now();
    eventually(Duration::from_secs(10), "the agent to hold it", || {
        agent
            .health()
            .filter(|h| h["bundle_sequence"].as_u64() >= Some(2))
            .map(|h| h["bundle_sequence"].as_u64().unwrap())
    });
    let sequence_before = agent.health().unwrap()["bundle_sequence"].as_u64().unwrap();

    // Down until both authorities have expired: the prepared one lives CA_TTL from then.
    server.stop();
    let until = prepared_at + CA_TTL + Duration::from_secs(3);
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let back = Instant::now();
    let server = ServerProcess::start_on(dir.path(), port, &flags);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("every CA authority had expired"),
        "the server says loudly that its CA expired: {log}"
    );
    assert!(log.contains("ERROR"), "at error level: {log}");
    assert_eq!(authorities(&server), 1, "a new CA only");

    // The same agent process, no new token, no new bundle file: it comes back.
    eventually(
        Duration::from_secs(60),
        "the agent to sync with the new CA",
        || {
            agent
                .health()
                .filter(|h| {
                    h["server_connected"] == true
                        && h["bundle_sequence"].as_u64() > Some(sequence_before)
                })
                .map(|_| ())
        },
    );
    let recovered = back.elapsed();
    let svids = agent.health().unwrap();
    assert_eq!(svids["spiffe_id"], "spiffe://cli.test/node/n1", "{svids}");
    let agent_log = std::fs::read_to_string(dir.path().join("n1-agent.log")).unwrap();
    assert!(agent_log.contains("attested again"), "{agent_log}");
    assert!(agent_log.contains("trust bundle updated"), "{agent_log}");
    let metrics = server.ok(&["status", "-o", "json"]);
    eprintln!(
        "CA outage: the agent verified the restarted server through the cross-signed CA, attested again and synced {recovered:?} after the server returned; status: {}",
        metrics.trim()
    );
    agent.stop();
    server.stop();
}
