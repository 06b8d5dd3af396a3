#!/usr/bin/env bash
# Runs every check CI runs: system packages, format, lints, then all tests. Tests that need root
# (eBPF, network namespaces) run when this is run as root and skip with a message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

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
cargo test --workspace --locked
