#!/usr/bin/env bash
# The server at scale: N simulated nodes (default 1,000) with M pods each (default 30) against
# one real `meshauth server run` on loopback (real processes, real TLS): attestation, pod
# placement and reports, one sync stream per node, then the server's memory and CPU at rest,
# the propagation of K changes (default 20) to every stream, and SVID signing throughput
# against `openssl speed ecdsap256`. Builds the release bench (`cargo bench`), runs it with the
# defaults (the server's own datastore, SQLite) and prints its markdown table. Arguments go to
# the bench (`--nodes 100 --pods 10`, `--changes`, `--identities`, `--concurrency`,
# `--timeout`, `--rest`, `--sign`); MESHAUTH_SIM_SERVER_ARGS adds flags to `meshauth server
# run` (e.g. another datastore). Needs no root; the server and its temporary directory are
# removed at the end. Exits non-zero when a change did not reach every node in time.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

command -v openssl >/dev/null || {
  echo "bench-server: openssl is not installed; the bench compares the server's signing with openssl speed ecdsap256" >&2
  exit 1
}
cargo bench --locked -p meshauth-cli --bench server_scale --no-run
start=$(date +%s)
status=0
cargo bench --quiet --locked -p meshauth-cli --bench server_scale -- "$@" || status=$?
echo "bench-server: $(($(date +%s) - start)) s (exit $status)" >&2
exit "$status"
