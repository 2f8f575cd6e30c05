#!/usr/bin/env bash
# Quick start command 1: install what is missing, build, and watch Cistern work for ~35 s.
#
# A receiver (HTTPS + mTLS, embedded SQLite) and an agent (synthetic sensor input at
# ~200 records/s) run on free loopback ports with a throwaway CA in a temp dir. The demo
# prints produced / spooled / delivered / stored once a second, stops the receiver for a
# while (records wait in the agent's spool), restarts it (the spool drains), stops the agent,
# and checks that every spooled record was stored exactly once.
#
# Exits 0 when nothing was lost or duplicated. Ctrl-C stops everything; nothing is left
# running and the temp dir is removed.   Build dir: $BUILD_DIR (default build/).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}

scripts/deps.sh
cmake -S . -B "$build" --log-level=WARNING
cmake --build "$build" -j"$(nproc)"

# The demo driver owns the processes: it traps SIGINT/SIGTERM, stops the receiver and the
# agent, kills anything left and removes its temp dir. exec so Ctrl-C reaches it directly.
exec python3 scripts/demo.py --agent "$build/bin/cistern-agent" \
    --receiver "$build/bin/cistern-receiver" "$@"
