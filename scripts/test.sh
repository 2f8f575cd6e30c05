#!/usr/bin/env bash
# Quick start command 2: install what is missing, build, and run the whole test suite.
# Usage: scripts/test.sh [extra cmake args]   (build dir: $BUILD_DIR, default build/)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCISTERN_WERROR=ON "$@"
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure -j2 -LE soak
