#!/usr/bin/env bash
# Pod-to-pod across two lab nodes, without and with the meshauth datapath attached (every pair
# authentication-required and pre-authenticated, so packets take the full policy + auth path),
# measured in one run: TCP throughput (iperf3) and TCP request/response latency (sockperf).
# Prints a table with ratios and, with --record, writes it into docs/benchmarks.md.
# Needs root. Only traffic between the lab's own namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
record=false
[[ ${1:-} == --record ]] && record=true
seconds=${BENCH_SECONDS:-5}

./scripts/setup.sh
cargo build --quiet --locked --bin meshauth
m() { target/debug/meshauth --log warn lab --lab bench "$@"; }
trap 'm down >/dev/null 2>&1 || true' EXIT

m down >/dev/null
m up --nodes 2 >/dev/null
m pod add srv --node n1 >/dev/null
m pod add cli --node n2 >/dev/null
srv=10.200.1.10
m exec srv -- iperf3 -s -D -B "$srv" >/dev/null
m exec srv -- sockperf server --tcp -i "$srv" -p 11111 >/dev/null 2>&1 &
sleep 1

measure() {
  local gbps lat p99
  gbps=$(m exec cli -- iperf3 -c "$srv" -t "$seconds" -J | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))')
  local out
  out=$(m exec cli -- sockperf ping-pong --tcp -i "$srv" -p 11111 -t "$seconds" 2>&1)
  lat=$(sed -n 's/.*avg-latency=\([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  p99=$(sed -n 's/.*percentile 99.000 = *\([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  echo "$gbps $lat $p99"
}

read -r base_gbps base_lat base_p99 < <(measure)
m datapath attach --auth-all >/dev/null
read -r dp_gbps dp_lat dp_p99 < <(measure)
m datapath detach >/dev/null

ratio() { python3 -c "print('%.3f' % ($1 / $2))"; }
table=$(cat <<TABLE
| measure | detached | attached | attached / detached |
|---|---|---|---|
| TCP throughput, Gbit/s (iperf3, ${seconds} s) | $base_gbps | $dp_gbps | $(ratio "$dp_gbps" "$base_gbps") |
| TCP round trip, avg µs (sockperf ping-pong, ${seconds} s) | $base_lat | $dp_lat | $(ratio "$dp_lat" "$base_lat") |
| TCP round trip, p99 µs | $base_p99 | $dp_p99 | $(ratio "$dp_p99" "$base_p99") |
TABLE
)
echo "$table"

if $record; then
  python3 - "$table" <<'PY'
import re, sys, datetime
table = sys.argv[1]
path = "docs/benchmarks.md"
doc = open(path).read()
section = (
    "## Datapath overhead\n\n"
    "Pod to pod across two lab nodes (veth → node → underlay bridge → node → veth), without\n"
    "and with the datapath attached to both pods' veths, every pair requiring authentication and\n"
    "pre-authenticated (so each new flow takes the policy and auth lookups, then conntrack).\n"
    f"Measured {datetime.date.today()} with `sudo ./scripts/bench-datapath.sh --record`:\n\n"
    + table + "\n\n"
)
doc = re.sub(r"## Datapath overhead\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", doc, flags=re.S)
open(path, "w").write(doc)
PY
  echo "recorded in docs/benchmarks.md"
fi
