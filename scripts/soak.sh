#!/usr/bin/env bash
# Longer runs kept out of the default suite (and CI's 30 minutes): tests labelled "soak".
# Usage: scripts/soak.sh [extra cmake args]   (build dir: $BUILD_DIR, default build/)
# Today: integration.mqtt_g_leaks, agent and receiver under valgrind through 50 broker
# restarts (about 5 minutes). It fails on the agent until the Paho workaround is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCISTERN_WERROR=ON "$@"
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -L soak
