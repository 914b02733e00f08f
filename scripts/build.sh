#!/usr/bin/env bash
# Configure (once) and build libft in build/ with ninja and ccache. Extra arguments go to CMake.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f build/build.ninja ] || cmake -S . -B build -G Ninja "$@"
cmake --build build -j"$(nproc)"
