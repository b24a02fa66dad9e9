#!/usr/bin/env bash
# The GPU checks, as one script for a machine with CUDA, torch and pytest but no vLLM (and no
# network): the graph-safe ops of tests/infosteer/test_infosteer_graph.py,
# tests/mixing/test_mixing_graph.py and tests/vectors/test_vectors_graph.py, including their
# CUDA-graph capture/replay tests (skipped without CUDA). Imports steerserve from this checkout
# without installing it (a namespace-package link tree); needs pydantic for the plans and numpy.
# Usage: bash tests/gpu_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("[gpu_check]", torch.__version__, torch.cuda.get_device_name(0))
PY
link=$(mktemp -d)
mkdir -p "$link/steerserve"
for pkg in patches server clients training deploy; do ln -s "$PWD/$pkg" "$link/steerserve/$pkg"; done
PYTHONPATH="$link" python -m pytest --noconftest -q -rs -p no:cacheprovider \
    tests/infosteer/test_infosteer_graph.py tests/mixing/test_mixing_graph.py tests/vectors/test_vectors_graph.py "$@"
