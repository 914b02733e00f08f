#!/usr/bin/env bash
# README command 2: set up this machine, build, and run every test:
#   1. the main build's ctest (C++ unit tests, HF parity and round trips through Python transformers,
#      the installed-package consumer, the default job; CUDA tests skip where no GPU is visible);
#   2. the torch-free core under AddressSanitizer + UBSan, with a time-bounded libFuzzer run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 900
bash scripts/test-sanitized.sh
