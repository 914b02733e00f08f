#!/usr/bin/env bash
# README command 1: set up this machine, build libft, and run the bundled default job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/build.sh
bash scripts/default-job.sh build/apps/ft runs/default
