#!/usr/bin/env bash
# The meshauth demo: installs what it needs, builds, then replays the walkthrough on a lab of
# network namespaces on this machine (`meshauth demo`): a server with its embedded SQLite store,
# an agent per node enforcing policy with the eBPF datapath, and requests from three clients.
# Needs root. Pass --keep to leave everything running and explore (`meshauth lab down --lab demo`
# stops it).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (it creates network namespaces and loads eBPF programs)" >&2
  exit 1
fi
./scripts/setup.sh
cargo build --quiet --locked --bin meshauth
exec target/debug/meshauth --log warn demo "$@"
