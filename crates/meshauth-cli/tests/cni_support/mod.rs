//! Test support: running the `meshauth-cni` binary as a runtime does.

#![allow(dead_code, unreachable_pub, reason = "shared by several test files")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

pub const CNI: &str = env!("CARGO_BIN_EXE_meshauth-cni");

/// Runs `cmd` (the plugin, set up with its CNI environment) with the network configuration
/// `stdin`. A plugin may exit before it reads stdin (VERSION, a missing variable): a broken
/// pipe is no failure of the test.
pub fn run_plugin(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Err(e) = pipe.write_all(stdin.as_bytes()) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}
