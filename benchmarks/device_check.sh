#!/usr/bin/env bash
# The prepared accelerator check (benchmarks/device_check.py): installs the wheels brought
# along in ./wheels (if any, without dependencies and without the network), then runs it.
#   benchmarks/device_check.sh --out=/tmp/out [--budget_s=420] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G "wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-deps --no-index wheels/*.whl
fi
exec python -m benchmarks.device_check "$@"
