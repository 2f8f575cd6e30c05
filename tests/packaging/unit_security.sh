#!/usr/bin/env bash
# The systemd units' hardening, as systemd rates it: runs
#   systemd-analyze security --offline=true UNIT
# on packaging/systemd/cistern-agent.service and cistern-receiver.service and fails if
# either "Overall exposure level" is above MAX_EXPOSURE (default 2.0, issue 6).
# Exits 77 (skipped) when systemd-analyze is missing (it comes with the systemd package,
# which this test does not install). --offline=true needs systemd 250 or later (bookworm
# has 252); it reads the unit files only, so no systemd needs to run.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
max=${MAX_EXPOSURE:-2.0}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "unit_security: skipped: systemd-analyze is not installed (apt-get install systemd)"
    exit 77
fi

fail=0
for unit in cistern-agent.service cistern-receiver.service; do
    # Run it where the unit file is: --offline=true takes a unit file path, and a plain
    # name would be looked up in the system's unit directories instead.
    if ! out=$(cd packaging/systemd && systemd-analyze security --offline=true --no-pager "./$unit" 2>&1); then
        # It exits non-zero only when it cannot rate the unit (a parse error, say).
        printf '%s\n' "$out" | tail -20 | sed 's/^/    | /'
        echo "FAIL $unit: systemd-analyze security could not rate it"
        fail=1
        continue
    fi
    level=$(printf '%s\n' "$out" | sed -n 's/^.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*$/\1/p')
    if [ -z "$level" ]; then
        printf '%s\n' "$out" | tail -20 | sed 's/^/    | /'
        echo "FAIL $unit: no \"Overall exposure level\" line in the output"
        fail=1
    elif awk -v l="$level" -v m="$max" 'BEGIN { exit !(l + 0 > m + 0) }'; then
        printf '%s\n' "$out" | grep '✗' | sed 's/^/    | /'
        echo "FAIL $unit: exposure $level is above $max (what is still open is listed above)"
        fail=1
    else
        echo "ok   $unit: exposure $level (at most $max)"
    fi
done
if [ $fail -eq 0 ]; then
    echo "2 passed, 0 failed"
else
    exit 1
fi
