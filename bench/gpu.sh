#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) as one command with a time limit, model build included: QwQ-32B's shape in bf16 on
# the first GPU, 8 x 256 tokens. Prints the table and writes bench/results_gpu.json. Extra arguments go to gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout 470 "$PY" bench/gpu.py "$@"
