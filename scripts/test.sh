#!/usr/bin/env bash
# Runs every check CI runs: system packages, format, lints, then all tests. Run it as root: with
# MESHAUTH_REQUIRE_ROOT=1 a test that needs root (eBPF, network namespaces) or MESHAUTH_PYTHON
# fails instead of skipping. (Plain `cargo test` as a user skips those, printing a SKIPPED line.)
set -euo pipefail
cd "$(dirname "$0")/.."
export MESHAUTH_REQUIRE_ROOT=1

./scripts/setup.sh

# The Python `spiffe` package, as a second standard client of the Workload API.
if [[ ! -x target/py-venv/bin/python ]]; then
  mkdir -p target
  python3 -m venv target/py-venv
fi
target/py-venv/bin/pip install --quiet --disable-pip-version-check spiffe==0.3.2
export MESHAUTH_PYTHON="$PWD/target/py-venv/bin/python"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast

# Coverage-guided fuzzing (AFL++ via cargo-afl, installed if missing): a short run of every
# target on its seed corpus; any crash fails. Long runs and figures: docs/fuzzing.md.
./scripts/fuzz.sh --seconds 10
