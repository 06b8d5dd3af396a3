//! The handshake server at the file-descriptor limit: `accept` fails at once for as long as a
//! connection waits in the backlog and no descriptor is free (EMFILE). The accept loop must back
//! off instead of spinning, and log at most about one line per second, with the count of the
//! errors it did not log.
//!
//! This file holds a single test because it lowers the process's own descriptor limit.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshauth_auth::{Handshaker, LocalSvids, Placement, Timeouts};
use meshauth_ca::{Ca, CaConfig};
use meshauth_policy::{IdentityId, NodeId};
use meshauth_tls::SharedBundle;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

const TD: &str = "mesh.test";
/// EMFILE on Linux.
const EMFILE: i32 = 24;

struct Nowhere;

impl Placement for Nowhere {
    fn hosted_here(&self, _: IdentityId) -> bool {
        false
    }
    fn node_at(&self, _: IpAddr) -> Option<NodeId> {
        None
    }
    fn hosted_on(&self, _: IdentityId, _: NodeId) -> bool {
        false
    }
}

/// Warn lines of the handshake module, and the sum of their `suppressed` fields.
#[derive(Default)]
struct Seen {
    lines: AtomicU64,
    suppressed: AtomicU64,
    messages: Mutex<Vec<String>>,
}

struct Capture(Arc<Seen>);

struct Fields<'a>(&'a Seen, String);

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "suppressed" {
            self.0.suppressed.fetch_add(value, Ordering::SeqCst);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.1 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > tracing::Level::WARN || !meta.target().starts_with("meshauth_auth") {
            return;
        }
        self.0.lines.fetch_add(1, Ordering::SeqCst);
        let mut fields = Fields(&self.0, String::new());
        event.record(&mut fields);
        self.0.messages.lock().unwrap().push(fields.1);
    }
}

/// The soft limit on open files, from /proc/self/limits.
fn soft_nofile() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test]
async fn accept_errors_back_off_and_are_rate_limited() {
    // Lower the soft limit so that exhausting it is quick (unprivileged processes may lower
    // their own soft limit).
    if soft_nofile().is_none_or(|n| n > 4096) {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg("--nofile=512:")
            .status();
    }
    if soft_nofile().is_none_or(|n| n > 4096) {
        // Under MESHAUTH_REQUIRE_ROOT=1 (the test script, CI) a test that cannot run fails.
        assert!(
            !meshauth_test_support::strict(),
            "cannot lower the open-files limit: install util-linux (prlimit)"
        );
        eprintln!("skipping: cannot lower the open-files limit (is prlimit installed?)");
        return;
    }

    let seen = Arc::new(Seen::default());
    let _log = tracing_subscriber::registry()
        .with(Capture(Arc::clone(&seen)))
        .set_default();

    let now = SystemTime::now();
    let ca = Ca::new(CaConfig::new(TD.parse().unwrap()), now).unwrap();
    let hs = Handshaker::new(
        TD.parse().unwrap(),
        SharedBundle::new(ca.bundle(now)),
        LocalSvids::default(),
        Arc::new(Nowhere),
        Timeouts::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // A connection waiting in the backlog keeps the listener readable, so every accept fails.
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();

    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) if e.raw_os_error() == Some(EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
        assert!(hog.len() < 10_000, "the limit was not reached");
    }

    let (atx, _arx) = tokio::sync::mpsc::channel(8);
    let (ftx, _frx) = tokio::sync::mpsc::channel(8);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(hs.serve(listener, atx, ftx, stop_rx));
    let window = Duration::from_millis(2500);
    tokio::time::sleep(window).await;
    stop.send(true).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), server).await;
    drop(hog);
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "serve stops on shutdown while backing off"
    );

    let lines = seen.lines.load(Ordering::SeqCst);
    let suppressed = seen.suppressed.load(Ordering::SeqCst);
    let messages: Vec<String> = seen
        .messages
        .lock()
        .unwrap()
        .iter()
        .take(5)
        .cloned()
        .collect();
    assert!(lines >= 1, "the accept error is logged");
    // About one line per second over 2.5 s.
    assert!(
        lines <= 4,
        "{lines} log lines in {window:?}, the first: {messages:?}"
    );
    // 10 ms doubling to 1 s: about nine failed accepts in 2.5 s; a spinning loop makes
    // hundreds of thousands.
    assert!(
        lines + suppressed <= 20,
        "{} failed accepts in {window:?}: the loop does not back off",
        lines + suppressed
    );
}
