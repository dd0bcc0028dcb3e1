#!/usr/bin/env bash
# The prepared GPU verification run (details: benchmarks/gpu_check.py). Run from anywhere after the README set-up:
#   bash benchmarks/gpu_check.sh OUT            # one NVIDIA GPU (A100/H100/H200); under 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run OUT  # on any machine: what it would run
# Exit status: 0 all correctness checks passed (benchmark failures are reported, not fatal), 1 a correctness check
# failed (a line "FAILED <step>: <reason>" names it), 2 no usable GPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
