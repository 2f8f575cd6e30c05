#!/usr/bin/env bash
# The chaos suite (issue 7, docs/reliability.md): kill -9 of the agent, the broker and the
# receiver, a lossy and cut link, a full spool filesystem, corrupt spools, clock jumps, power
# cuts and reconnect churn, against the real agent, receiver and mosquitto. Each scenario
# ends with the three-set verdict (lost, duplicated, unexpected: all must be 0).
#
# Usage: scripts/chaos.sh [--full] [SCENARIO...]
#   SCENARIO: c1, c2_broker_kill, chaos.c3_receiver_kill9, ... (default: every scenario)
#   --full:   the issue's full parameters (CISTERN_CHAOS_FULL=1) instead of the short forms
#             that CI runs (ctest -L chaos)
#   BUILD_DIR (default build-chaos), CISTERN_CHAOS_SEED (replay a run's random moments)
#
# It installs what is missing (scripts/deps.sh), builds with -DCISTERN_WERROR=ON, runs the
# scenarios one at a time through ctest with CISTERN_CHAOS_RESULTS pointing at a file in the
# build dir, and prints the CHAOS-RESULT lines they wrote as a Markdown table (the rows of
# docs/reliability.md). Exit status: ctest's (non-zero when a scenario failed).
#
# How long: the short forms are kept to about 8 minutes in all (c1-c3: about 80 s). The
# full forms of c1 (50 agent kills), c2 (20 broker faults) and c3 (20 receiver kills) take
# about 5 minutes together (307 s of tests, measured 2026-11-26 on a shared 2-core VM);
# the other scenarios' full forms add their own time (docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
names=()
for a in "$@"; do
    case "$a" in
        --full) full=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "chaos.sh: unknown option $a (try --help)" >&2; exit 2 ;;
        *) names+=("${a#chaos.}") ;;
    esac
done

scripts/deps.sh
build=${BUILD_DIR:-build-chaos}
# The full forms run far longer than the short ones: scale ctest's timeouts with them.
cmake -S . -B "$build" -DCISTERN_WERROR=ON -DCISTERN_CHAOS_TIMEOUT_SCALE=$([ $full = 1 ] && echo 6 || echo 1)
cmake --build "$build" -j"$(nproc)"

results="$(cd "$build" && pwd)/chaos-results-$(date +%Y%m%d-%H%M%S).txt"
: > "$results"
export CISTERN_CHAOS_RESULTS="$results"
if [ "$full" -eq 1 ]; then
    export CISTERN_CHAOS_FULL=1
else
    unset CISTERN_CHAOS_FULL
fi

# "c1" selects chaos.c1_*, "c1_agent_kill9" exactly that one
args=(-L chaos)
if [ ${#names[@]} -gt 0 ]; then
    re=$(IFS='|'; echo "${names[*]}")
    args+=(-R "^chaos\\.(${re})(_|\$)")
fi

start=$SECONDS
rc=0
# one at a time: each scenario loads the machine and some time their own faults
(cd "$build" && ctest --output-on-failure "${args[@]}") || rc=$?
echo
echo "chaos.sh: $([ "$full" -eq 1 ] && echo full || echo short) forms, $((SECONDS - start)) s;" \
     "results in $results"
echo

python3 - "$results" <<'EOF'
import json, sys

COLS = ["scenario", "parameters", "sent", "accepted", "stored", "lost", "duplicated",
        "unexpected", "stored-unacked", "drain time", "date"]
rows = []
with open(sys.argv[1]) as f:
    for line in f:
        if not line.startswith("CHAOS-RESULT "):
            continue
        r = json.loads(line[len("CHAOS-RESULT "):])
        params = ", ".join("%s=%s" % kv for kv in sorted(r.get("params", {}).items()))
        params += " (%s)" % ("full" if r.get("full") else "short")
        drain = r.get("drain_s")
        rows.append([r.get("scenario", "?"), params] +
                    ["{:,}".format(r[k]) if isinstance(r.get(k), int) else str(r.get(k, "-"))
                     for k in ("sent", "accepted", "stored", "lost", "duplicated",
                               "unexpected", "stored_unacked")] +
                    ["-" if drain is None else "%.1f s" % drain, r.get("date", "-")])
if not rows:
    print("(no CHAOS-RESULT line was written: every selected scenario failed early or "
          "was skipped)")
    sys.exit(0)
print("| " + " | ".join(COLS) + " |")
print("|" + "|".join("---" if i < 2 or i == 10 else "---:" for i in range(len(COLS))) + "|")
for r in rows:
    print("| " + " | ".join(r) + " |")
EOF
exit "$rc"
