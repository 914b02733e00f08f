#!/usr/bin/env bash
# Installs everything libft needs on a fresh Debian 12 machine, idempotently:
#   - Debian packages: toolchain, ninja, ccache, clang/libFuzzer, and the C++ libraries we link.
#   - A Python virtual environment with torch==2.11.0 (its LibTorch is what the C++ builds against)
#     and the packages the reference tests use. It lives outside the clone, in
#     ${LIBFT_VENV:-$HOME/.cache/libft/venv}, so fresh clones (CI's among them) reuse it.
# Re-running it is cheap: it only installs what is missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LIBFT_VENV:-$HOME/.cache/libft/venv}

debs=(build-essential cmake ninja-build ccache pkg-config git
      clang-14 libfuzzer-14-dev libclang-rt-14-dev
      libsentencepiece-dev sentencepiece libhdf5-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev
      libpcre2-dev libutf8proc-dev  # tokenizer.json's pre-tokenizer patterns and NFC
      libgloo-dev  # headers of the Gloo that libtorch_cpu contains (c10d on the CPU)
      libgtest-dev libgmock-dev libbenchmark-dev python3-venv
      fortunes jargon-text)  # real English text for the data tests and the bundled examples

missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating Python environment in $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
req="$here/scripts/requirements.txt"
stamp="$venv/.libft-requirements"
if ! cmp -s "$req" "$stamp"; then
  echo "[setup] installing Python packages (torch is several GB the first time)"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi
echo "[setup] ok: venv $venv, torch $("$venv/bin/python" -c 'import torch;print(torch.__version__)')"
