#!/usr/bin/env bash
# The meshauth demo: installs what it needs, builds, then runs a server (SQLite in a temporary
# data dir) and a node agent on this machine, registers this shell's user as a workload, and
# fetches its SVID over the SPIFFE Workload API. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --quiet --locked --bin meshauth
bin="$PWD/target/debug/meshauth"

work=$(mktemp -d -t meshauth-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

port=$((20000 + RANDOM % 20000))
admin="$work/server-admin.sock"
td=demo.meshauth.local

say "Start the server: CA, registry in SQLite, node API on 127.0.0.1:$port"
"$bin" server run --trust-domain "$td" --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 \
  --data-dir "$work/server" --admin-socket "$admin" 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 100); do "$bin" server healthcheck --admin-socket "$admin" >/dev/null 2>&1 && break; sleep 0.1; done
run "$bin" server healthcheck --admin-socket "$admin"

say "Register this shell's user as a workload on node n1"
run "$bin" entry create --admin-socket "$admin" --spiffe-id "spiffe://$td/demo/$(id -un)" \
  --parent-id "spiffe://$td/node/n1" --selector "unix:uid:$(id -u)" --x509-svid-ttl 10m

say "Attest node n1 with a single-use join token and start its agent"
"$bin" bundle show --admin-socket "$admin" >"$work/bundle.pem"
token=$("$bin" token generate --node n1 --admin-socket "$admin")
echo "token: $token"
"$bin" agent run --node n1 --trust-domain "$td" --server "127.0.0.1:$port" --join-token "$token" \
  --trust-bundle "$work/bundle.pem" --data-dir "$work/agent" --workload-socket "$work/workload.sock" \
  --agent-socket "$work/agent.sock" --metrics-listen 127.0.0.1:0 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 100); do "$bin" agent svids --agent-socket "$work/agent.sock" 2>/dev/null | grep -q spiffe && break; sleep 0.1; done
run "$bin" agent list --admin-socket "$admin"
run "$bin" agent healthcheck --agent-socket "$work/agent.sock"

say "Fetch this process's SVID over the SPIFFE Workload API"
run "$bin" workload fetch --socket "$work/workload.sock" --write "$work/svid"
run openssl x509 -in "$work/svid/svid.pem" -noout -subject -ext subjectAltName -enddate 2>/dev/null || true

say "The same join token does not work twice"
"$bin" agent run --node n1 --trust-domain "$td" --server "127.0.0.1:$port" --join-token "$token" \
  --trust-bundle "$work/bundle.pem" --data-dir "$work/agent2" --workload-socket "$work/w2.sock" \
  --agent-socket "$work/a2.sock" --metrics-listen 127.0.0.1:0 || true

say "Done: network enforcement (policy, eBPF datapath, lab) follows in the next milestones"
