#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang, AddressSanitizer and
# UndefinedBehaviorSanitizer, and runs each for SECONDS over a copy of its seed corpus.
# Exits non-zero when any target crashed (or leaked, or hung), after printing the input's path.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s each, every target)
#   targets: agent_config recv_config batch_decode http_ingest mqtt_ingest envelope
#   scripts/fuzz.sh                    the CI run: 60 s each, about 5 min and a build
#   scripts/fuzz.sh 3600               longer: an hour each (overnight: 28800)
#   scripts/fuzz.sh 600 http_ingest    one target
# Build dir: $BUILD_DIR, default build-fuzz, configured as
#   CC=clang cmake -S . -B build-fuzz -DCISTERN_FUZZ=ON -DCISTERN_TESTS=OFF -DCMAKE_BUILD_TYPE=Debug
# What a run leaves there (none of it goes into git):
#   build-fuzz/corpus-TARGET/   the seeds plus every input the fuzzer found new coverage with;
#                               kept, so the next run starts where this one stopped
#   build-fuzz/crashes/TARGET/  crash-*, leak-*, timeout-*, oom-*: the inputs that failed
#   build-fuzz/logs/TARGET.log  libFuzzer's output
#
# When a target fails:
#   1. reproduce it:  build-fuzz/fuzz/fuzz_TARGET build-fuzz/crashes/TARGET/crash-...
#      (the stack trace names the bug; -minimize_crash=1 -runs=10000 shrinks the input)
#   2. fix the bug in the project's code, and add a unit test when it fits one;
#   3. add the input to the seeds, so every later run checks it again:
#        cp build-fuzz/crashes/TARGET/crash-HASH tests/fuzz/corpus/TARGET/crash-WHAT
#      and name WHAT after the bug (the seeds are small on purpose: keep only such inputs and a
#      few valid ones; a long run's corpus-TARGET/ can be shrunk into a new directory with
#      build-fuzz/fuzz/fuzz_TARGET -merge=1 NEWDIR build-fuzz/corpus-TARGET);
#   4. run this script again.
# The batch seeds (batch_decode, http_ingest, mqtt_ingest, envelope) are made by
# tests/fuzz/make_seeds.c: after a change of the wire format, run
# build-fuzz/fuzz/make_seeds tests/fuzz/corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(agent_config recv_config batch_decode http_ingest mqtt_ingest envelope)
secs=60
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    secs=$1
    shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz: unknown target '$t' (${all[*]})" >&2; exit 2; }
done
build=${BUILD_DIR:-build-fuzz}

# clang with libFuzzer's runtime (Debian: libclang-rt-dev, which the clang package does not
# pull in). Checked by linking a fuzz target, the only test that does not guess paths.
have_libfuzzer() {
    local d
    d=$(mktemp -d)
    printf '#include <stddef.h>\n#include <stdint.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return d && n; }\n' >"$d/t.c"
    clang -fsanitize=fuzzer,address,undefined "$d/t.c" -o "$d/t" >/dev/null 2>&1
    local rc=$?
    rm -rf "$d"
    return $rc
}
scripts/deps.sh
if ! command -v clang >/dev/null || ! have_libfuzzer; then
    echo "fuzz: installing clang and libFuzzer"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends clang libclang-rt-dev
    have_libfuzzer || { echo "fuzz: clang cannot link -fsanitize=fuzzer" >&2; exit 1; }
fi

if [ -f "$build/CMakeCache.txt" ] && ! grep -q '^CMAKE_C_COMPILER:.*clang' "$build/CMakeCache.txt"; then
    echo "fuzz: $build was configured with another compiler than clang; remove it or set BUILD_DIR" >&2
    exit 1
fi
CC=clang cmake -S . -B "$build" -DCISTERN_FUZZ=ON -DCISTERN_TESTS=OFF -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$build" -j2 --target $(printf 'fuzz_%s ' "${targets[@]}")

# Leaks count as failures (libFuzzer checks after each input); UBSan stops at the first report.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=0
summary=()
for t in "${targets[@]}"; do
    corpus=$build/corpus-$t crashes=$build/crashes/$t log=$build/logs/$t.log
    mkdir -p "$corpus" "$crashes" "$build/logs"
    # A copy of the seeds: libFuzzer writes what it finds into the first directory it is given.
    cp tests/fuzz/corpus/"$t"/* "$corpus"/
    case $t in
        *config) dict=tests/fuzz/config.dict ;;
        *) dict=tests/fuzz/batch.dict ;;
    esac
    echo "== fuzz: $t for ${secs}s (corpus $corpus, log $log)"
    rc=0
    "$build/fuzz/fuzz_$t" -max_total_time="$secs" -timeout=30 -max_len=16384 -dict="$dict" \
        -artifact_prefix="$crashes/" -print_final_stats=1 "$corpus" >"$log" 2>&1 || rc=$?
    # The last status line: "#RUNS DONE cov: N ft: N corp: N/SIZE lim: N exec/s: N rss: NMb".
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")
    eps=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -1)
    new=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log")
    if [ $rc -ne 0 ] || [ -n "$new" ]; then
        failed=1
        summary+=("$(printf '%-13s FAILED (exit %d) after %s runs' "$t" "$rc" "${runs:-?}")")
        echo "fuzz: $t FAILED (exit $rc); the end of $log:" >&2
        grep -E 'ERROR|SUMMARY|runtime error|==[0-9]+==' "$log" | head -20 >&2 || true
        for f in $new; do
            echo "fuzz: $t: failing input: $f" >&2
        done
        [ -n "$new" ] || echo "fuzz: $t: no input was written; see $log" >&2
    else
        summary+=("$(printf '%-13s ok  %9s runs %7s exec/s  cov %5s  ft %6s  corpus %5s' \
            "$t" "${runs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
    fi
done

echo "== fuzz: ${secs}s each"
printf '%s\n' "${summary[@]}"
if [ $failed -ne 0 ]; then
    echo "fuzz: FAILED: see above for the inputs; scripts/fuzz.sh's header says what to do" >&2
    exit 1
fi
