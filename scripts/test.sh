#!/usr/bin/env bash
# Quick start command 2: install what is missing, build, and run the whole test suite.
# Usage: scripts/test.sh [extra cmake args]   (build dir: $BUILD_DIR, default build/)
# Runs every test but those labelled soak (long runs: scripts/soak.sh); the chaos suite's
# short forms are included. CTEST_EXCLUDE replaces the excluded labels (a ctest -LE regex).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCISTERN_WERROR=ON "$@"
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j2 -LE "${CTEST_EXCLUDE:-soak}"
