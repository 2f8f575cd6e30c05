#!/usr/bin/env bash
# Runs every benchmark of issue 8 (B1-B7) one after the other, each the median of --runs
# runs beside a baseline measured in the same run, and collects their RESULT lines.
#
#   bench/run.sh [--build DIR] [--runs N] [--only B1,B2,...] [--no-deps]
#
# Installs what is missing (scripts/deps.sh), configures and builds DIR (default build-bench,
# RelWithDebInfo) and runs, in this order:
#   B1 bench/ingest.py        agent ingest at spool.sync normal and full vs one SQLite row per record
#   B2 bench/e2e.py           end to end over HTTPS vs the raw unique-key insert rate
#   B3 bench/mqtt_bridge.py   end to end over MQTT vs a mosquitto-to-mosquitto bridge
#   B4 bench/backlog.py       agent memory through a 1M-record backlog, and idle
#   B6 (same run as B4)       drain of that backlog under 1,000 live records/s, live latency
#   B5 bench/flash_wear.py    bytes written to disk per payload byte
#   B7 bench/cpu_cost.py      instructions per record (callgrind)
#   -- bench/sign_cost        what signing and verifying a batch costs
# Everything a benchmark prints goes to DIR/bench-report.txt; the RESULT lines are repeated
# at the end. A full run takes about 15 minutes on a 2-core machine. Nothing here asserts a
# time: a benchmark fails only when a process fails or a record is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=build-bench runs=3 only="" deps=1
while [ $# -gt 0 ]; do
    case "$1" in
    --build) build=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --no-deps) deps=0; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$build" in /*) ;; *) build="$here/$build" ;; esac
cd "$here"
[ "$deps" = 1 ] && scripts/deps.sh
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null
report="$build/bench-report.txt"
: >"$report"
want() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }
run() {
    local id=$1; shift
    echo "=== $id: $* ($(date -u '+%F %T') UTC)" | tee -a "$report"
    "$@" 2>&1 | tee -a "$report"
}
{
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo),"\
         "$(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
} | tee -a "$report"
want B1 && run B1 python3 bench/ingest.py --build "$build" --runs "$runs"
want B2 && run B2 python3 bench/e2e.py --build "$build" --runs "$runs" --transport https
want B3 && run B3 python3 bench/mqtt_bridge.py --build "$build" --runs "$runs"
if want B4 || want B6; then
    run B4+B6 python3 bench/backlog.py --build "$build" --runs "$runs"
fi
want B5 && run B5 python3 bench/flash_wear.py --build "$build" --runs "$runs" --sync normal,full
want B7 && run B7 python3 bench/cpu_cost.py --build "$build"
want sign && run sign "$build/bench/sign_cost" 5000 31
echo "=== results (medians of $runs runs; ratio = Cistern / same-run baseline)" | tee -a "$report"
grep '^RESULT ' "$report" | tee "$build/bench-results.txt"
echo "report: $report"
