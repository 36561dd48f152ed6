#!/usr/bin/env bash
# GPU smoke checks: one-GPU SFT and PPO through the CLI, worker device binding,
# and native kernels vs fallbacks on CUDA. Stops at the first failure; under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
unset REAL_FORCE_CPU
exec timeout 480 python -m pytest -q -m gpu tests/gpu tests/ops -x "$@"
