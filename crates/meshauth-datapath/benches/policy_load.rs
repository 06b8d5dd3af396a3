//! Loads a node policy of about 200,000 map entries into the kernel and reports the time and
//! the policy map's memory. Needs root (eBPF); run with
//! `cargo bench -p meshauth-datapath --bench policy_load`.
//!
//! The node: 40 endpoints, each allowing TCP on 5 ports from each of 1,000 remote identities
//! (5,000 entries per endpoint, 200,000 in all), the shape of the compile benchmark's node.

#![allow(
    clippy::unwrap_used,
    reason = "benchmark code: a failed unwrap is a failed run"
)]

use std::time::Instant;

use meshauth_datapath::{
    AuthType, Datapath, Direction, EndpointId, PolicyEntry, PortRange, Protocol, Verdict,
    policy_keys::policy_keys,
};
use meshauth_policy::IdentityId;

const ENDPOINTS: u32 = 40;
const REMOTES: u32 = 1000;
const PORTS: [u16; 5] = [80, 443, 8080, 9090, 5432];

fn entries(endpoint: u32) -> Vec<PolicyEntry> {
    let mut out = Vec::new();
    for r in 0..REMOTES {
        for p in PORTS {
            out.push(PolicyEntry {
                direction: if endpoint.is_multiple_of(2) {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                remote: Some(IdentityId::new(256 + r)),
                protocol: Some(Protocol::Tcp),
                ports: PortRange::single(p),
                verdict: Verdict::Allow,
                auth: if r.is_multiple_of(2) {
                    AuthType::Required
                } else {
                    AuthType::None
                },
            });
        }
    }
    out
}

fn main() {
    if !meshauth_test_support::is_root() {
        eprintln!("policy_load: needs root (it loads eBPF programs and pins maps)");
        std::process::exit(1);
    }
    let all: Vec<Vec<PolicyEntry>> = (0..ENDPOINTS).map(entries).collect();
    let t = Instant::now();
    let keys: usize = all.iter().map(|e| policy_keys(e).len()).sum();
    let plan = t.elapsed();

    let node = Datapath::pin_dir_for("bench-policy-load");
    let _ = Datapath::remove_pins(&node);
    let mut dp = Datapath::load(&node).unwrap();
    let t = Instant::now();
    for (i, e) in all.iter().enumerate() {
        dp.set_policy(EndpointId(i as u32 + 1), e).unwrap();
    }
    let load = t.elapsed();
    assert_eq!(dp.policy_len(), keys);
    // Unchanged: a second pass writes nothing.
    let t = Instant::now();
    for (i, e) in all.iter().enumerate() {
        assert!(!dp.set_policy(EndpointId(i as u32 + 1), e).unwrap());
    }
    let noop = t.elapsed();
    let pin = node
        .join(format!("abi-v{}", meshauth_datapath::ABI_VERSION))
        .join("ma_policy");
    let show = std::process::Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(&pin)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let memlock = show
        .split_whitespace()
        .skip_while(|w| *w != "memlock")
        .nth(1)
        .unwrap_or("unknown")
        .to_owned();
    drop(dp);
    Datapath::remove_pins(&node).unwrap();
    println!(
        "policy_load: {} endpoints, {} entries -> {keys} map keys; plan {:.0} ms (pure); load {:.0} ms ({:.0} keys/s); unchanged re-apply {:.0} ms; ma_policy memlock {memlock}",
        ENDPOINTS,
        ENDPOINTS * REMOTES * PORTS.len() as u32,
        plan.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3,
        keys as f64 / load.as_secs_f64(),
        noop.as_secs_f64() * 1e3,
    );
}
