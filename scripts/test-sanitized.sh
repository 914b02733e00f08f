#!/usr/bin/env bash
# Builds the torch-free core (safetensors, data pipeline) with clang-14 under AddressSanitizer + UBSan,
# with the libFuzzer targets, and runs its whole ctest suite there: the core and data unit tests, the
# crafted-corpus and truncation tests, the Python interop steps and bounded fuzz runs
# (LIBFT_FUZZ_SECONDS, default 45). Then the threaded tokenizer pipeline under ThreadSanitizer.
# Exits non-zero on any failure or sanitizer report.
#
# Idempotent: re-running reconfigures and rebuilds build-asan incrementally.
#   scripts/test-sanitized.sh                     # everything
#   scripts/test-sanitized.sh -L core             # extra arguments go to ctest
#   LIBFT_FUZZ_SECONDS=300 scripts/test-sanitized.sh -R fuzz
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$root/build-asan"
jobs=${LIBFT_JOBS:-2}

for tool in clang-14 clang++-14 cmake ninja ctest; do
  command -v "$tool" >/dev/null || { echo "[test-sanitized] $tool not found: run scripts/setup.sh" >&2; exit 1; }
done

# Stop at the first report, with a stack; leaks count as failures too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$build" -G Ninja \
  -DLIBFT_CORE_ONLY=ON -DLIBFT_SANITIZE=address,undefined -DLIBFT_FUZZ=ON -DCMAKE_BUILD_TYPE=Debug \
  -DLIBFT_BUILD_BENCHMARKS=OFF -DLIBFT_FUZZ_SECONDS="${LIBFT_FUZZ_SECONDS:-45}"
cmake --build "$build" -j "$jobs"
cd "$build"
ctest --output-on-failure -j "$jobs" "$@"

# ThreadSanitizer on the code that runs threads (the tokenizer's look-ahead pipeline), unless
# extra ctest arguments asked for a subset.
if [ $# -eq 0 ]; then
  tsan="$root/build-tsan"
  CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$tsan" -G Ninja \
    -DLIBFT_CORE_ONLY=ON -DLIBFT_SANITIZE=thread -DCMAKE_BUILD_TYPE=Debug -DLIBFT_BUILD_BENCHMARKS=OFF >/dev/null
  cmake --build "$tsan" -j "$jobs" --target ft_data_tests
  (cd "$tsan/tests" && TSAN_OPTIONS=halt_on_error=1 ./ft_data_tests --gtest_filter='*Parallel*')
fi
echo "[test-sanitized] all sanitized tests passed"
