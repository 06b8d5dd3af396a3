#!/usr/bin/env bash
# Runs every check CI runs: system packages, format, lints, then all tests. Tests that need root
# (eBPF, network namespaces) run when this is run as root and skip with a message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
