#!/usr/bin/env bash
# The GPU checks, as one script for a machine with CUDA and torch but no vLLM (and no network):
# the graph-safe ops of tests/infosteer/test_infosteer_graph.py, tests/mixing/test_mixing_graph.py
# and tests/vectors/test_vectors_graph.py, including their CUDA-graph capture/replay tests, and the
# context-attention Triton kernel against the torch pass (tests/context_attention/test_context_kernels.py).
# Imports steerserve from this checkout without installing it (a namespace-package link tree); needs
# pydantic and pytest: when the machine lacks them, a copy of this checkout's (Python 3.11) is read
# from build/gpu-deps if present (made by: bash tests/gpu_check.sh --pack, on the CPU machine).
# Usage: bash tests/gpu_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--pack" ]]; then
  sp=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf build/gpu-deps && mkdir -p build/gpu-deps
  for x in pydantic pydantic_core annotated_types typing_inspection typing_extensions.py pytest _pytest pluggy \
      iniconfig packaging pygments py.py; do
    if [[ -e "$sp/$x" ]]; then cp -r "$sp/$x" build/gpu-deps/; fi
  done
  # pydantic-core is compiled per Python version: add the same version's builds for 3.12 and 3.13
  # (the extension files are named by ABI, so they sit side by side)
  core=$(.venv/bin/python -c "import pydantic_core; print(pydantic_core.__version__)")
  wheels=$(mktemp -d)
  for v in 3.12 3.13; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 -d "$wheels" "pydantic-core==$core"
  done
  for w in "$wheels"/*.whl; do
    .venv/bin/python - "$w" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("pydantic_core/_pydantic_core.cpython-"):
            z.extract(name, "build/gpu-deps")
PY
  done
  du -sh build/gpu-deps; exit 0
fi
extra=""
py=$(command -v python3 || command -v python)
if ! "$py" -c "import pydantic, pytest" 2>/dev/null; then
  echo "[gpu_check] pydantic/pytest missing here: using build/gpu-deps ($("$py" -V))"
  extra="$PWD/build/gpu-deps"
fi
PYTHONPATH="$extra" "$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("[gpu_check]", torch.__version__, torch.cuda.get_device_name(0))
PY
link=$(mktemp -d)
mkdir -p "$link/steerserve"
for pkg in patches server clients training deploy; do ln -s "$PWD/$pkg" "$link/steerserve/$pkg"; done
PYTHONPATH="$link${extra:+:$extra}" "$py" -m pytest --noconftest -q -rs -s -p no:cacheprovider \
    tests/infosteer/test_infosteer_graph.py tests/mixing/test_mixing_graph.py tests/vectors/test_vectors_graph.py \
    tests/context_attention/test_context_kernels.py "$@"
