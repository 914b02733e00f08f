#!/usr/bin/env bash
# Run on the development machine before the GPU check: downloads the Debian packages that the
# build needs beyond what the GPU machine has (it has CUDA, torch, CMake, ninja, a compiler, but no
# package registry) into .debs/ (git-ignored; travels with the working tree as a `carry` path).
# scripts/gpu-check.sh unpacks them into .deps/root there, never into the system root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pkgs=(nlohmann-json3-dev libcli11-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian
      libsentencepiece-dev libsentencepiece0 libhdf5-dev libhdf5-103-1 libsz2 libaec0 libyaml-cpp-dev libyaml-cpp0.7
      libssl-dev libssl3 libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2 pkgconf pkgconf-bin libpkgconf3 fortunes fortunes-min jargon-text)
mkdir -p .debs
missing=()
for p in "${pkgs[@]}"; do ls .debs/"${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  (cd .debs && apt-get download "${missing[@]}")
fi
du -sh .debs
