#!/usr/bin/env bash
# Longer runs kept out of the default suite (and CI's 30 minutes): tests labelled "soak".
# Usage: scripts/soak.sh [extra cmake args]   (build dir: $BUILD_DIR, default build/)
# Also integration.mqtt_g_leaks (in the default suite with 50 broker restarts) with 200
# restarts: agent and receiver under valgrind, about 18 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCISTERN_WERROR=ON "$@"
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure --no-tests=ignore -L soak || rc=$?
CISTERN_MQTT_RESTARTS=${CISTERN_MQTT_RESTARTS:-200} ctest --output-on-failure -R mqtt_g_leaks || rc=$?
exit "${rc:-0}"
