#!/usr/bin/env bash
# Pod to pod across two lab nodes (client pod on n2 -> server pod on n1), four ways in one run:
# no meshauth (a plain lab, routed in the clear); authentication only (the demo's lab with server
# and agents, the pair authentication-required and pre-authenticated); the same with node-to-node
# encryption (`demo --encrypt`: the agents' WireGuard, keyed from their TLS handshake);
# and a stunnel4 mutual-TLS proxy pair on the plain lab (TLS 1.3, ECDSA P-256, both sides
# verified), as a sidecar would do it. TCP throughput (iperf3) and TCP request/response round
# trips of 64-byte messages (sockperf ping-pong, its client and server pinned to two different
# cores), in BENCH_ROUNDS (default 3) rounds that alternate the modes; the table gives each
# mode's median and its ratio to no meshauth. With --record, writes the section into
# docs/benchmarks.md. BENCH_SECONDS (default 5) per measurement; BENCH_RELEASE=1 measures a
# release build. Needs root. Only traffic between the labs' own namespaces.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
record=false
[[ ${1:-} == --record ]] && record=true
seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-3}

./scripts/setup.sh
if [[ ${BENCH_RELEASE:-0} == 1 ]]; then
  profile=release
  cargo build --quiet --locked --release --bin meshauth
else
  profile=debug
  cargo build --quiet --locked --bin meshauth
fi
bin=${CARGO_TARGET_DIR:-target}/$profile/meshauth
stunnel=$(command -v stunnel4 || command -v stunnel)
load_start=$(cut -d" " -f1 /proc/loadavg)
# sockperf's server on core 0, its client on the last core, in every mode: left to the scheduler,
# the two share a core in some runs and not in others, and on a VM a wake-up across cores costs
# tens of µs a round trip, which made the baseline's p50 bimodal (about 25 or 90 µs here).
client_cpu=$(($(nproc) - 1))

plain=bencp                # no meshauth, and stunnel
auth=bencd                 # demo: authentication only
enc=bence                  # demo: authentication + encryption
run_dir=/run/meshauth-lab  # the demo's work directory of each lab (sockets, logs)
tmp=$(mktemp -d)
jobs_started=()

ma() { "$bin" --log warn "$@"; }
lab() { ma lab --lab "$@"; }
in_pod() {
  local l=$1 pod=$2
  shift 2
  lab "$l" exec "$pod" -- "$@"
}
# A long-running process in a pod, as a background job (the wrapper is killed in cleanup;
# `lab down` kills what is left in the lab's namespaces).
start() {
  local log=$1
  shift
  in_pod "$@" >"$log" 2>&1 &
  jobs_started+=($!)
}
die() {
  echo "bench-encryption: $*" >&2
  exit 1
}

cleanup() {
  local p l
  for p in "$tmp"/*.pid; do
    [[ -f $p ]] && { kill "$(cat "$p")" 2>/dev/null || true; }
  done
  for p in "${jobs_started[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for l in "$plain" "$auth" "$enc"; do
    lab "$l" down >/dev/null 2>&1 || true
  done
  # The demo's work directories: this script's labs only.
  rm -rf "${run_dir:?}/$auth" "${run_dir:?}/$enc" "$tmp"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The address of a pod of a lab.
pod_ip() {
  lab "$1" status -o json | python3 -c '
import json, sys
pods = json.load(sys.stdin)["state"]["pods"]
print(next(p["ip"] for p in pods if p["name"] == sys.argv[1]))' "$2"
}

# Runs `cmd...` every 0.5 s until it succeeds, at most $1 seconds.
retry() {
  local limit=$1 t0=$SECONDS
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS - t0 < limit)) || return 1
    sleep 0.5
  done
}

# measure LAB POD HOST: iperf3, then sockperf, from POD to HOST (servers on 5201 and 11111).
# Prints "Gbit/s received-bytes p50-µs p99-µs".
measure() {
  local l=$1 pod=$2 host=$3 out gbps bytes p50 p99
  out=$(in_pod "$l" "$pod" iperf3 -c "$host" -p 5201 -t "$seconds" -J) ||
    die "iperf3 from $pod to $host failed: $out"
  out=$(python3 -c '
import json, sys
r = json.load(sys.stdin)["end"]["sum_received"]
print("%.2f %d" % (r["bits_per_second"] / 1e9, r["bytes"]))' <<<"$out")
  read -r gbps bytes <<<"$out"
  out=$(in_pod "$l" "$pod" taskset -c "$client_cpu" sockperf ping-pong --tcp --msg-size 64 --full-rtt \
    -i "$host" -p 11111 -t "$seconds" 2>&1) || die "sockperf from $pod to $host failed: $out"
  p50=$(sed -n 's/.*percentile 50\.000 = *\([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  p99=$(sed -n 's/.*percentile 99\.000 = *\([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  [[ -n $gbps && -n $bytes && -n $p50 && -n $p99 ]] || die "no figures from $pod to $host"
  echo "$gbps $bytes $p50 $p99"
}

# servers LAB SERVER-POD CLIENT-POD: iperf3 and sockperf servers in SERVER-POD on every address
# (stunnel forwards to 127.0.0.1), ready when a 1-s iperf3 test from CLIENT-POD passes (which
# also warms up ARP, routes and, with encryption, the tunnel; with authentication, it is the
# pair's first request).
servers() {
  local host
  host=$(pod_ip "$1" "$2")
  start "$tmp/iperf3-$1.log" "$1" "$2" iperf3 -s -p 5201
  start "$tmp/sockperf-$1.log" "$1" "$2" taskset -c 0 sockperf server --tcp -i 0.0.0.0 -p 11111
  retry 30 in_pod "$1" "$3" iperf3 -c "$host" -p 5201 -t 1 ||
    die "iperf3 from $3 to $2 in lab $1 never succeeded"
}

echo "== lab $plain: 2 nodes, pods srv on n1 and cli on n2, no meshauth" >&2
for l in "$plain" "$auth" "$enc"; do lab "$l" down >/dev/null; done
lab "$plain" up --nodes 2 >/dev/null
lab "$plain" pod add srv --node n1 >/dev/null
lab "$plain" pod add cli --node n2 >/dev/null
srv=$(pod_ip "$plain" srv)
servers "$plain" srv cli

echo "== stunnel4 on lab $plain: a TLS client proxy in cli, a TLS server proxy in srv" >&2
# A throwaway CA and one ECDSA P-256 certificate per side.
ec_req() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "$@" 2>/dev/null; }
ec_req -x509 -days 1 -subj /CN=bench-ca -keyout "$tmp/ca.key" -out "$tmp/ca.pem"
for side in server client; do
  ec_req -subj "/CN=bench-$side" -keyout "$tmp/$side.key" -out "$tmp/$side.csr"
  printf 'basicConstraints = CA:FALSE\nsubjectAltName = DNS:bench-%s\nextendedKeyUsage = %sAuth\n' \
    "$side" "$side" >"$tmp/$side.ext"
  openssl x509 -req -days 1 -in "$tmp/$side.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -extfile "$tmp/$side.ext" -out "$tmp/$side.pem" 2>/dev/null
done
tls_common() {
  cat <<CONF
foreground = yes
pid = $tmp/stunnel-$1.pid
debug = info
sslVersionMin = TLSv1.3
cert = $tmp/$1.pem
key = $tmp/$1.key
CAfile = $tmp/ca.pem
verifyChain = yes
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
CONF
}
{
  tls_common server
  echo "requireCert = yes"
  printf '[iperf3]\naccept = %s:15201\nconnect = 127.0.0.1:5201\n' "$srv"
  printf '[sockperf]\naccept = %s:21111\nconnect = 127.0.0.1:11111\n' "$srv"
} >"$tmp/server.conf"
{
  tls_common client
  printf 'client = yes\ncheckHost = bench-server\n'
  printf '[iperf3]\naccept = 127.0.0.1:5201\nconnect = %s:15201\n' "$srv"
  printf '[sockperf]\naccept = 127.0.0.1:11111\nconnect = %s:21111\n' "$srv"
} >"$tmp/client.conf"
start "$tmp/stunnel-server.log" "$plain" srv "$stunnel" "$tmp/server.conf"
start "$tmp/stunnel-client.log" "$plain" cli "$stunnel" "$tmp/client.conf"
retry 10 in_pod "$plain" cli iperf3 -c 127.0.0.1 -p 5201 -t 1 ||
  die "no iperf3 through stunnel: $(tail -5 "$tmp/stunnel-server.log" "$tmp/stunnel-client.log")"

# The demo's lab (3 nodes; demodeployment-1 on n1, client2-2 on n2), kept running, with a
# policy allowing client2 to reach the demo app on the benchmark's ports, authentication
# required, and the pair authenticated before traffic.
demo_lab() {
  local l=$1
  shift
  ma demo --lab "$l" --keep --pre-authenticate "$@" >"$tmp/demo-$l.log" 2>&1 ||
    die "meshauth demo --lab $l $* failed: $(tail -20 "$tmp/demo-$l.log")"
  cat >"$tmp/policy.yaml" <<'YAML'
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "bench-allow-client2-auth"
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: demodeployment
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client2
    toPorts:
    - ports:
      - port: "5201"
        protocol: TCP
      - port: "11111"
        protocol: TCP
    authentication:
      mode: "required"
YAML
  ma policy apply -f "$tmp/policy.yaml" --admin-socket "$run_dir/$l/server-admin.sock" >/dev/null
  # n1 (the server pod's node) holds demodeployment <-> client2 on n2.
  retry 60 authenticated "$l" ||
    die "lab $l: n1 holds no auth entry for demodeployment <-> client2 on n2"
  servers "$l" demodeployment-1 client2-2
}
authenticated() {
  ma auth list --agent-socket "$run_dir/$1/n1-agent.sock" -o json | python3 -c '
import json, sys
sys.exit(0 if any(e["local"]["labels"].get("app") == "demodeployment"
                  and e["remote"]["labels"].get("app") == "client2" and e["remote"]["node"] == "n2"
                  for e in json.load(sys.stdin)) else 1)'
}
# n1's and n2's tunnels toward each other and whether each agent encrypts, as JSON:
# {"n1": {tunnel}, "n2": {tunnel}, "encryption": {"n1": bool, "n2": bool}}.
tunnels() {
  local d=$run_dir/$1
  ma status --admin-socket "$d/server-admin.sock" --agent-socket "$d/n1-agent.sock" \
    --agent-socket "$d/n2-agent.sock" -o json | python3 -c '
import json, sys
s = json.load(sys.stdin)
t = {x["node"]: x for x in s.get("tunnels", []) if {x["node"], x["peer"]} == {"n1", "n2"}}
t["encryption"] = {a["node"]: a.get("encryption", False) for a in s.get("agents_local", [])}
print(json.dumps(t))'
}
# Authentication only: neither agent encrypts or reports a tunnel.
in_clear() {
  python3 -c '
import json, sys
t = json.loads(sys.argv[1])
if any(t["encryption"].values()) or "n1" in t or "n2" in t:
    sys.exit("authentication only, yet the agents report encryption or a tunnel: %s" % t)' \
    "$(tunnels "$auth")" || die "the authentication-only lab is not in the clear"
}
# tunnel_check BEFORE AFTER PAYLOAD: the iperf3 bytes (client2-2 on n2 -> demodeployment-1 on
# n1) came out of n2's tunnel and into n1's; otherwise this did not measure encryption. Prints
# what was observed.
tunnel_check() {
  python3 - "$@" <<'PY'
import json, sys
b, a, payload = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
if not all(a["encryption"].get(n) for n in ("n1", "n2")):
    sys.exit(f"encryption is not on in both agents: {a['encryption']}")
for n in ("n1", "n2"):
    if n not in a or n not in b:
        sys.exit(f"{n} reports no tunnel toward the other node")
    if a[n]["state"] != "up":
        sys.exit(f"{n}'s tunnel is {a[n]['state']}, not up")
d = {n: {k: a[n][k] - b[n][k] for k in ("tx_bytes", "rx_bytes")} for n in ("n1", "n2")}
if d["n2"]["tx_bytes"] < payload or d["n1"]["rx_bytes"] < payload:
    sys.exit(f"the tunnel counters did not grow by the {payload} bytes iperf3 moved: {d}")
t = a["n1"]
print(f"tunnel n1<->n2 {t['state']} (endpoint {t['endpoint']}), last WireGuard handshake "
      f"{t['last_handshake']}, its pre-shared key derived {t['key_derived']} from the agents' "
      f"TLS key exchange, key rotations {t['key_rotations']}; during the last round n2 sent "
      f"{d['n2']['tx_bytes']:,} B into it, n1 received {d['n1']['rx_bytes']:,} B "
      f"(iperf3 payload {payload:,} B)")
PY
}

echo "== lab $auth: meshauth demo --pre-authenticate (authentication only)" >&2
demo_lab "$auth"
dsrv=$(pod_ip "$auth" demodeployment-1)
in_clear
echo "== lab $enc: meshauth demo --pre-authenticate --encrypt (authentication + encryption)" >&2
demo_lab "$enc" --encrypt
esrv=$(pod_ip "$enc" demodeployment-1)
tunnel_check "$(tunnels "$enc")" "$(tunnels "$enc")" 0 >/dev/null ||
  die "lab $enc: the tunnel n1<->n2 is not up after the first request"
# The tunnel device in n1's namespace, as the kernel describes it.
dev=$(ip netns exec "$enc-n1" ip -d -o link show mawg0) || die "lab $enc: n1 has no mawg0"
case $dev in
  *" wireguard "*) dev_kind="kernel WireGuard" ;;
  *" tun type tun "*) dev_kind="a TUN (userspace WireGuard)" ;;
  *) dev_kind="of unknown kind" ;;
esac
dev_seen="device mawg0 on n1: $dev_kind, MTU $(sed -n 's/.* mtu \([0-9]*\) .*/\1/p' <<<"$dev")"

# Rounds alternating the modes; each figure is kept per mode as "gbps p50 p99" lines.
declare -A runs=()
for ((r = 1; r <= rounds; r++)); do
  echo "== round $r/$rounds" >&2
  m=$(measure "$plain" cli "$srv")
  read -r g _ p50 p99 <<<"$m"
  runs[none]+="$g $p50 $p99"$'\n'
  m=$(measure "$auth" client2-2 "$dsrv")
  read -r g _ p50 p99 <<<"$m"
  runs[auth]+="$g $p50 $p99"$'\n'
  before=$(tunnels "$enc")
  m=$(measure "$enc" client2-2 "$esrv")
  read -r g bytes p50 p99 <<<"$m"
  runs[enc]+="$g $p50 $p99"$'\n'
  tunnel_seen=$(tunnel_check "$before" "$(tunnels "$enc")" "$bytes") ||
    die "round $r: the encrypted run did not go through the tunnel"
  m=$(measure "$plain" cli 127.0.0.1)
  read -r g _ p50 p99 <<<"$m"
  runs[tls]+="$g $p50 $p99"$'\n'
done
in_clear

# What the TLS proxies negotiated and verified, from their logs (never assumed).
tls_seen=$(python3 - "$tmp/stunnel-server.log" "$tmp/stunnel-client.log" <<'PY'
import re, sys
srv, cli = (open(p).read() for p in sys.argv[1:])
def first(pat, text):
    m = re.search(pat, text)
    return m.group(1) if m else None
suite = first(r"TLSv1\.3 ciphersuite: (\S+)", srv)
kx = first(r"Peer temporary key: ([^\n]+)", srv)
client_ok = first(r"Certificate accepted at depth=0: (CN=bench-client)", srv)
server_ok = first(r"Certificate accepted at depth=0: (CN=bench-server)", cli)
if not (suite and kx and client_ok and server_ok) or re.search(r"TLSv1\.[012] ", srv + cli):
    sys.exit("stunnel: no verified TLS 1.3 session in the logs")
new = srv.count("TLS accepted: new session negotiated")
reused = srv.count("TLS accepted: previous session reused")
print(f"TLS 1.3 {suite}, key exchange {kx}; the server verified {client_ok}, the client "
      f"{server_ok}; one TLS session per TCP connection: {new} full handshakes, {reused} "
      "resumed (the client proxy caches its session)")
PY
) || die "stunnel did not negotiate what the benchmark claims"

table=$(python3 - "$seconds" "$rounds" "${runs[none]}" "${runs[auth]}" "${runs[enc]}" "${runs[tls]}" <<'PY'
import statistics, sys
seconds, rounds = sys.argv[1], int(sys.argv[2])
names = ["no meshauth", "authentication only", "authentication + encryption (WireGuard)",
         "stunnel4 mutual TLS"]
runs = [[list(map(float, l.split())) for l in a.split("\n") if l.strip()] for a in sys.argv[3:]]
med = [[statistics.median(r[i] for r in m) for i in range(3)] for m in runs]
print(f"| mode (median of {rounds} rounds) | TCP Gbit/s (iperf3, {seconds} s) | / no meshauth "
      f"| round trip p50 µs (sockperf, 64 B, {seconds} s) | / no meshauth | round trip p99 µs "
      "| / no meshauth |")
print("|---|---|---|---|---|---|---|")
for name, m in zip(names, med):
    cells = []
    for i, fmt in enumerate(["%.2f", "%.1f", "%.1f"]):
        cells += [fmt % m[i], "%.3f" % (m[i] / med[0][i])]
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
print("Every round (Gbit/s, p50 µs, p99 µs):")
print()
for name, m in zip(names, runs):
    print(f"- {name}: " + "; ".join("%.2f, %.1f, %.1f" % tuple(r) for r in m))
PY
)
observed=$(cat <<OBS
Observed:

- encryption: $dev_seen; $tunnel_seen.
- stunnel4: $tls_seen.
OBS
)
echo "$table"
echo
echo "$observed"

if $record; then
  commit=$(git rev-parse --short HEAD)
  [[ -z $(git status --porcelain --untracked-files=no) ]] || commit="$commit plus uncommitted changes"
  load="1-min load average $load_start at the start"
  cmd="./scripts/bench-encryption.sh --record"
  for v in BENCH_RELEASE BENCH_ROUNDS BENCH_SECONDS; do
    [[ -z ${!v:-} ]] || cmd="$v=${!v} $cmd"
  done
  python3 - "$table" "$observed" "$commit" "$profile" "$(nproc)" "$load" "$cmd" <<'PY'
import re, sys, datetime
table, observed, commit, profile, cores, load, cmd = sys.argv[1:]
path = "docs/benchmarks.md"
doc = open(path).read()
title = "## Encryption: throughput and latency"
section = (
    f"{title}\n\n"
    "Pod to pod between two lab nodes, client pod on n2, server pod on n1. **no meshauth**: a plain lab,\n"
    "routed in the clear; **authentication only**: `meshauth demo --pre-authenticate` (server, agents and\n"
    "datapath; the pair authentication-required and authenticated before traffic; packets in the clear);\n"
    "**authentication + encryption**: the same with `--encrypt` (WireGuard between the nodes, keyed from\n"
    "the agents' TLS handshake); **stunnel4 mutual TLS**: on the plain lab, a TLS proxy pair, one in each\n"
    "pod like a sidecar, one TLS session per TCP connection (TLS 1.3, ECDSA P-256, both sides verified).\n"
    "sockperf's client and server run on two different cores in every mode (sharing one, or not, as the\n"
    "scheduler chose, made the round trip bimodal on this VM: about 25 or 90 µs in the clear).\n\n"
    "Each ratio is the mode's median over no meshauth's in the same run (throughput: higher is better;\n"
    f"round trips: lower is better). Measured {datetime.date.today()} on commit {commit}, {profile} build,\n"
    f"{cores} cores ({load}), with `{cmd}` as root:\n\n"
    + table + "\n\n" + observed + "\n"
)
pattern = re.compile(re.escape(title) + r"\n.*?(?=\n## |\Z)", re.S)
if pattern.search(doc):
    doc = pattern.sub(lambda _: section.rstrip("\n") + "\n", doc)
else:
    doc = doc.rstrip("\n") + "\n\n" + section
open(path, "w").write(doc)
PY
  echo "recorded in docs/benchmarks.md"
fi
