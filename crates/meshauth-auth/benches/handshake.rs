//! Handshakes per second per core: full mutual TLS 1.3 handshakes (ECDSA P-256 SVIDs, both
//! sides verify chains and SPIFFE IDs, the responder checks placement) between two handshakers
//! in this process over loopback.
//!
//! Run: `cargo bench -p meshauth-auth --bench handshake`. It prints wall-clock throughput at
//! concurrency 1 and 8, and the CPU time one handshake costs both sides together (from
//! /proc/self/stat, 100 ticks per second), whence handshakes per core-second.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use meshauth_auth::{Handshaker, LocalSvid, LocalSvids, Placement, Timeouts};
use meshauth_ca::{Ca, CaConfig};
use meshauth_policy::{IdentityId, NodeId};
use meshauth_tls::{SharedBundle, SharedCertifiedKey};
use rustls::pki_types::PrivateKeyDer;

struct AllHere;

impl Placement for AllHere {
    fn hosted_here(&self, _: IdentityId) -> bool {
        true
    }
    fn node_at(&self, _: IpAddr) -> Option<NodeId> {
        Some(NodeId::new(1))
    }
    fn hosted_on(&self, _: IdentityId, _: NodeId) -> bool {
        true
    }
}

fn svids(ca: &Ca, ids: &[u32]) -> LocalSvids {
    let out = LocalSvids::default();
    for id in ids {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let spiffe = format!("spiffe://bench.test/identity/{id}")
            .parse()
            .expect("id");
        let issued = ca
            .sign_csr(csr.der(), &spiffe, None, &[], SystemTime::now())
            .expect("svid");
        let ck = SharedCertifiedKey::new(
            issued.chain,
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("key");
        out.set(
            IdentityId::new(*id),
            LocalSvid {
                key: ck,
                not_after: issued.not_after,
            },
        );
    }
    out
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ca = Ca::new(CaConfig::new("bench.test".parse().expect("td")), SystemTime::now()).expect("ca");
        let bundle = SharedBundle::new(ca.bundle(SystemTime::now()));
        let responder = Handshaker::new("bench.test".parse().expect("td"), bundle.clone(), svids(&ca, &[200]), Arc::new(AllHere), Timeouts::default());
        let initiator = Handshaker::new("bench.test".parse().expect("td"), bundle, svids(&ca, &[100]), Arc::new(AllHere), Timeouts::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (atx, mut arx) = tokio::sync::mpsc::channel(1024);
        let (ftx, _frx) = tokio::sync::mpsc::channel(1024);
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(responder.serve(listener, atx, ftx, stop_rx));
        tokio::spawn(async move { while arx.recv().await.is_some() {} });
        let one = move |h: Handshaker| async move {
            h.initiate(IdentityId::new(100), IdentityId::new(200), NodeId::new(1), addr, None).await.expect("handshake");
        };
        // Warm up.
        for _ in 0..20 {
            one(initiator.clone()).await;
        }
        for concurrency in [1usize, 8] {
            let n = 400;
            let (t, cpu0) = (Instant::now(), cpu_seconds());
            let mut tasks = Vec::new();
            for c in 0..concurrency {
                let h = initiator.clone();
                let share = n / concurrency + usize::from(c < n % concurrency);
                tasks.push(tokio::spawn(async move {
                    for _ in 0..share {
                        one(h.clone()).await;
                    }
                }));
            }
            for task in tasks {
                task.await.expect("task");
            }
            let wall = t.elapsed();
            let cpu = cpu_seconds() - cpu0;
            println!(
                "concurrency {concurrency}: {n} handshakes in {:.2} s = {:.0}/s wall; CPU {:.2} ms per handshake (both sides) = {:.0} handshakes per core-second",
                wall.as_secs_f64(),
                n as f64 / wall.as_secs_f64(),
                cpu * 1000.0 / n as f64,
                n as f64 / cpu.max(1e-9)
            );
        }
    });
}
