#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ (afl.rs, stable toolchain): builds the targets in fuzz/ and
# runs each for N seconds (default 20) on a copy of its seed corpus; fails if any target
# crashes, printing how to reproduce. See docs/fuzzing.md.
#
#   scripts/fuzz.sh [--seconds N] [--execs N] [--out DIR] [target...]
#
#   --seconds N  stop each target after N seconds of fuzzing (afl-fuzz -V N; default 20)
#   --execs N    stop each target after about N executions (afl-fuzz -E N); with --seconds too,
#                whichever comes first; alone, no time limit
#   --out DIR    AFL output, one directory per target (default target/fuzz)
#
# Targets: relay policy spiffe_id svid bundle handshake (default: all).
# Installs cargo-afl (crates.io) and builds AFL++ once if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=
execs=
out=target/fuzz
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds="${2:?--seconds needs a number}"; shift 2 ;;
    --execs) execs="${2:?--execs needs a number}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
for n in "$seconds" "$execs"; do
  [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: not a positive number: $n" >&2; exit 2; }
done
# The default, 20 s, only when neither limit is given.
[[ -n "$seconds" || -n "$execs" ]] || seconds=20
limits=()
[[ -n "$seconds" ]] && limits+=(-V "$seconds")
[[ -n "$execs" ]] && limits+=(-E "$execs")
what="${seconds:+${seconds}s}${seconds:+${execs:+ or }}${execs:+$execs execs}"
all=(relay policy spiffe_id svid bundle handshake)
((${#targets[@]})) || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (one of: ${all[*]})" >&2; exit 2; }
done

if ! cargo afl --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-afl"
  cargo install cargo-afl --locked --quiet
fi
# AFL++ itself (built once per toolchain; the error says it is already there).
cargo afl config --build >/dev/null 2>&1 || true

# fuzz/ is its own workspace on the crates' path dependencies: its Cargo.lock follows theirs,
# so it is not used with --locked (a dependency added to a crate would fail the build).
# Seed check without instrumentation (the library only: the binaries link AFL's runtime):
# every seed runs, and still means what it should.
(cd fuzz && cargo test --lib --quiet)

(cd fuzz && cargo afl build --release --quiet --bins)
bin=fuzz/target/release

# On CI machines: no CPU governor tuning, no core-dump pattern, no UI.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1 AFL_SKIP_CRASHES=0 AFL_QUIET=1

mkdir -p "$out"
failed=()
for t in "${targets[@]}"; do
  dir="$out/$t"
  rm -rf "$dir"
  dict=()
  [[ -f fuzz/dict/$t.dict ]] && dict=(-x "fuzz/dict/$t.dict")
  echo "fuzz.sh: $t for $what"
  # -V: stop after N seconds; -E: stop after about N executions; -t: per-input timeout (ms);
  # handshake builds a TLS config once per process, so the first input is allowed to be slow.
  if ! cargo afl fuzz "${limits[@]}" -t 5000 -i "fuzz/corpus/$t" -o "$dir" "${dict[@]}" \
      -- "$bin/$t" >"$dir.log" 2>&1; then
    echo "fuzz.sh: afl-fuzz failed for $t; its output:" >&2
    tail -n 30 "$dir.log" >&2
    failed+=("$t")
    continue
  fi
  stats="$dir/default/fuzzer_stats"
  get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  crashes=$(get saved_crashes)
  hangs=$(get saved_hangs)
  echo "fuzz.sh: $t: $(get execs_done) execs ($(get execs_per_sec)/s), $(get corpus_count) paths, ${crashes:-?} crashes, ${hangs:-?} hangs"
  if [[ "${crashes:-1}" != 0 ]]; then
    echo "fuzz.sh: $t CRASHED; reproduce with: $bin/$t < FILE, for each FILE in $dir/default/crashes/" >&2
    ls "$dir/default/crashes/" >&2
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, no crash"
