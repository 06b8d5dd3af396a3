//! Helpers for meshauth's tests (a dev-dependency only).
//!
//! # Gates: skipping honestly
//!
//! Tests that need root (eBPF, network namespaces) or something from outside the workspace (a
//! Python with the `spiffe` package) start with [`require_root`] or [`require_env`]. When the
//! requirement is missing, the test
//!
//! - **fails** if `MESHAUTH_REQUIRE_ROOT=1` ([`REQUIRE_ROOT_VAR`]; `.ci/run` and
//!   `scripts/test.sh` set it), so that CI cannot turn them into silent no-ops;
//! - otherwise returns early after printing `SKIPPED <test>: <why>` straight to the process's
//!   stderr, which libtest does not capture (an `eprintln!` in a passing test is hidden).
//!
//! ```no_run
//! #[test]
//! fn lab_lifecycle() {
//!     if !meshauth_test_support::require_root("lab_lifecycle") {
//!         return;
//!     }
//!     // ...
//! }
//! ```
//!
//! # Waiting for a condition
//!
//! [`eventually`] (blocking) and [`eventually_async`] poll until a closure returns `Some`, and
//! fail the test naming what was awaited once the limit passes. Limits are for correctness, so
//! make them generous: they bound a hang, they do not measure latency.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod etcd;

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

/// `MESHAUTH_REQUIRE_ROOT=1` turns every missing requirement into a test failure.
pub const REQUIRE_ROOT_VAR: &str = "MESHAUTH_REQUIRE_ROOT";

/// How often [`eventually`] and [`eventually_async`] poll.
pub const POLL: Duration = Duration::from_millis(100);

/// Whether this process runs with effective uid 0 (read from procfs: no `unsafe` here).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Whether missing requirements fail tests ([`REQUIRE_ROOT_VAR`] is `1`).
pub fn strict() -> bool {
    std::env::var(REQUIRE_ROOT_VAR).is_ok_and(|v| v == "1")
}

/// Whether test `test` may run: `true` as root. Otherwise it panics under
/// `MESHAUTH_REQUIRE_ROOT=1`, or prints a skip line and returns `false`.
#[track_caller]
#[must_use = "return from the test when this is false"]
pub fn require_root(test: &str) -> bool {
    apply(gate(
        is_root(),
        strict(),
        test,
        "needs root (eBPF, network namespaces)",
        "run it as root",
    ))
}

/// The value of `var` if it is set and not empty. Otherwise test `test` panics under
/// `MESHAUTH_REQUIRE_ROOT=1`, or prints a skip line and gets `None`.
#[track_caller]
#[must_use = "return from the test when this is None"]
pub fn require_env(var: &str, test: &str) -> Option<String> {
    let value = std::env::var(var).ok().filter(|v| !v.is_empty());
    let need = format!("needs {var}");
    let hint = format!("set {var} (scripts/test.sh does)");
    if apply(gate(value.is_some(), strict(), test, &need, &hint)) {
        value
    } else {
        None
    }
}

/// What a gate decided.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    Run,
    Skip(String),
    Fail(String),
}

fn gate(met: bool, strict: bool, test: &str, need: &str, hint: &str) -> Gate {
    if met {
        Gate::Run
    } else if strict {
        Gate::Fail(format!(
            "{test} {need}, and {REQUIRE_ROOT_VAR}=1 forbids skipping it: {hint}"
        ))
    } else {
        Gate::Skip(format!(
            "SKIPPED {test}: {need} ({hint}; {REQUIRE_ROOT_VAR}=1 makes this a failure)"
        ))
    }
}

#[track_caller]
fn apply(gate: Gate) -> bool {
    match gate {
        Gate::Run => true,
        Gate::Skip(line) => {
            // Not `eprintln!`: libtest captures that and shows it only for failing tests.
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
            false
        }
        Gate::Fail(msg) => panic!("{msg}"),
    }
}

/// Polls `f` every [`POLL`] until it returns `Some`; panics naming `what` after `limit`.
/// Blocks the thread: for `#[test]` functions and other synchronous code.
#[track_caller]
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        let waited = start.elapsed();
        assert!(
            waited < limit,
            "timed out after {waited:?} (limit {limit:?}) waiting for {what}"
        );
        std::thread::sleep(POLL.min(limit - waited));
    }
}

/// As [`eventually`], for async tests: polls the future `f` makes every [`POLL`] of Tokio time
/// (so paused time works).
pub async fn eventually_async<T, Fut>(limit: Duration, what: &str, mut f: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        let waited = start.elapsed();
        assert!(
            waited < limit,
            "timed out after {waited:?} (limit {limit:?}) waiting for {what}"
        );
        tokio::time::sleep(POLL.min(limit - waited)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_run_skip_or_fail() {
        assert_eq!(gate(true, true, "t", "needs x", "do y"), Gate::Run);
        assert_eq!(gate(true, false, "t", "needs x", "do y"), Gate::Run);
        let Gate::Skip(line) = gate(false, false, "t", "needs root", "run it as root") else {
            panic!("not strict: skip");
        };
        assert_eq!(
            line,
            "SKIPPED t: needs root (run it as root; MESHAUTH_REQUIRE_ROOT=1 makes this a failure)"
        );
        let Gate::Fail(msg) = gate(false, true, "t", "needs root", "run it as root") else {
            panic!("strict: fail");
        };
        assert_eq!(
            msg,
            "t needs root, and MESHAUTH_REQUIRE_ROOT=1 forbids skipping it: run it as root"
        );
    }

    #[test]
    #[should_panic(expected = "forbids skipping")]
    fn a_failing_gate_panics() {
        let _ = apply(gate(false, true, "t", "needs root", "run it as root"));
    }

    #[test]
    fn a_skipping_gate_says_so_and_returns_false() {
        assert!(!apply(gate(false, false, "t", "needs root", "hint")));
        assert!(apply(Gate::Run));
    }

    #[test]
    fn require_env_returns_a_set_variable() {
        // Cargo sets this for every test process.
        let dir = require_env("CARGO_MANIFEST_DIR", "t").expect("set by cargo");
        assert!(dir.ends_with("meshauth-test-support"), "{dir}");
    }

    #[test]
    fn is_root_reads_the_effective_uid() {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .expect("a Uid line");
        assert_eq!(is_root(), euid == "0");
    }

    #[test]
    fn eventually_returns_the_first_value() {
        let mut calls = 0;
        let v = eventually(Duration::from_secs(5), "the third call", || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for something that never happens")]
    fn eventually_fails_after_the_limit() {
        eventually(
            Duration::from_millis(250),
            "something that never happens",
            || None::<()>,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_async_polls_in_tokio_time() {
        let start = tokio::time::Instant::now();
        let mut calls = 0;
        let v = eventually_async(Duration::from_secs(5), "the fifth call", || {
            calls += 1;
            let n = calls;
            async move { (n == 5).then_some(n) }
        })
        .await;
        assert_eq!(v, 5);
        assert_eq!(start.elapsed(), 4 * POLL);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 2s (limit 2s) waiting for a value")]
    async fn eventually_async_fails_after_the_limit() {
        eventually_async(Duration::from_secs(2), "a value", || async { None::<()> }).await;
    }
}
