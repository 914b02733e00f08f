#!/usr/bin/env bash
# consumer_project test: install libft from BUILD_DIR into a scratch prefix, build tests/consumer
# against it with find_package(libft), run it, and check that the README's example is this file.
set -euo pipefail
build=$1 src=$2 python=$3
work=$build/consumer-check
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$src/tests/consumer" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DLIBFT_PYTHON="$python" ${CMAKE_PREFIX_PATH:+-DCMAKE_PREFIX_PATH="$work/prefix;$CMAKE_PREFIX_PATH"} >"$work/configure.log" 2>&1 \
  || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
out=$("$work/build/consumer" "$work/model")
echo "consumer generated: $out"
[ "$(echo "$out" | wc -w)" -eq 8 ] || { echo "expected 8 tokens"; exit 1; }
[ -f "$work/model/config.json" ] && [ -f "$work/model/model.safetensors" ]
# The README's C++ example must be exactly tests/consumer/main.cpp.
awk '/^```cpp$/{f=1;next} /^```$/{if(f){exit}} f' "$src/README.md" > "$work/readme_example.cpp"
diff -u "$src/tests/consumer/main.cpp" "$work/readme_example.cpp" || { echo "README example differs from tests/consumer/main.cpp"; exit 1; }
echo "consumer project OK"
