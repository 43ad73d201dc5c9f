#!/usr/bin/env bash
# `make bench-profile`: where the CPU of the zero-latency row goes. Runs bench.py's big row on
# one deployment and records the busiest nightshift process with `perf` (Debian: linux-perf)
# for PROFILE_SECS seconds once its batch runs; prints the hottest functions (self and
# inclusive) and, with inferno installed (`cargo install inferno`), writes a flame graph.
#
#   PROFILE_DEPLOYMENT=standalone|distributed   (default standalone)
#   PROFILE_PROCESS=standalone|executor|finalizer|scheduler|gateway   (default: standalone's
#                                                 process, the executor when distributed)
#   PROFILE_LINES=100000  PROFILE_SECS=6  PROFILE_DELAY=7 (seconds after the process starts)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deployment=${PROFILE_DEPLOYMENT:-standalone}
default_process=standalone
[ "$deployment" = distributed ] && default_process=executor
process=${PROFILE_PROCESS:-$default_process}
lines=${PROFILE_LINES:-100000}
secs=${PROFILE_SECS:-6}
delay=${PROFILE_DELAY:-7}
out=$root/target/bench/profile-$(date +%Y%m%dT%H%M%S)
mkdir -p "$out"
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }

python3 "$root/bench/bench.py" --rows big --deployments "$deployment" --big-lines "$lines" \
  --doc "$out/bench.md" > "$out/bench.log" 2>&1 &
bench=$!
pid=
for _ in $(seq 1 1200); do
  pid=$(pgrep -f "^$root/target/release/nightshift --config [^ ]* $process( |\$)" | head -1 || true)
  [ -n "$pid" ] && break
  kill -0 $bench 2>/dev/null || { cat "$out/bench.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$pid" ] || { echo "no nightshift $process process appeared" >&2; exit 1; }
sleep "$delay"
# cpu-clock: virtual machines often have no hardware counters
perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$pid" -o "$out/perf.data" \
  -- sleep "$secs" > "$out/perf-record.log" 2>&1
wait $bench || true
grep -E "zero latency" "$out/bench.log" || true
report() {
  perf report -i "$out/perf.data" --sort symbol --stdio -g none "$@" 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/  */ /g' | cut -c1-160
}
echo; echo "== self time (top 25) =="; report --no-children | head -25 | tee "$out/self.txt"
echo; echo "== inclusive, nightshift functions (top 25) =="
report --children | grep 'nightshift_' | grep -v 'poll<\|harness\|catch_unwind\|do_call\|call_once' \
  | head -25 | tee "$out/inclusive.txt"
if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
  perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph > "$out/flamegraph.svg"
  echo; echo "flame graph: $out/flamegraph.svg"
fi
echo "perf data: $out/perf.data"
