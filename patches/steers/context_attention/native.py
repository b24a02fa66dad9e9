"""The CPU kernel of context-attention steering (`csrc/bias_attention.cpp`): build and load.

Built once with torch's extension tooling (g++ and ninja) by `steerserve build-kernels`, which
`./run.sh setup` runs; the build lands in `$STEERSERVE_HOME/kernels/` under a name keyed by the
source, the torch version and the CPU's instruction-set flags (it is compiled for this CPU). A
worker loads it on first use (building it then if set-up did not); when it cannot be built (no
compiler) the engine logs the reason once and uses the pure-torch pass, which gives the same
results more slowly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger("steerserve")

SOURCE = Path(__file__).parent / "csrc" / "bias_attention.cpp"
LAYOUT_CODES = {"identity": 0, "transposed": 1, "amx_k": 2, "amx_v": 3, "permuted": 4}

_loaded: dict[str, Callable | None] = {}
_errors: dict[str, str] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def build_key() -> str:
    """What the build depends on: the source, torch's version, the CPU's flags (-march=native)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    # $STEERSERVE_HOME as server/model_store.py's cache_root() reads it (patches/ imports nothing from server/)
    home = Path(os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve").expanduser()
    return home / "kernels" / f"context-attention-{build_key()}"


def _name() -> str:
    """The extension's name, also its library's file name (`<name>.so` in `build_dir()`)."""
    return f"steerserve_ctx_{build_key()}"


def build(verbose: bool = False) -> Path:
    """Compile (or find up to date) the kernel and load it into this process; returns the library
    path. Raises RuntimeError with the compiler's message when it cannot be built."""
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = _name()
    try:
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], build_directory=str(out), is_python_module=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=verbose,
        )
    except Exception as err:  # noqa: BLE001 - compiler missing or failing: report it whole
        raise RuntimeError(f"could not build the context-attention CPU kernel ({SOURCE.name}) in {out}: {err}. "
                           "It needs g++ and ninja (Debian: apt-get install g++); without it context-attention "
                           "steering uses the slower pure-torch pass.") from err
    return out / f"{name}.so"


def cpu_kernel() -> Callable | None:
    """`torch.ops.steerserve_ctx.decode_bias_attention_`, built and loaded once per process, or None
    (the reason logged once) when it cannot be built."""
    key = "cpu"
    if key not in _loaded:
        try:
            library = build_dir() / f"{_name()}.so"
            if library.exists():
                torch.ops.load_library(str(library))
            else:
                build()
            _loaded[key] = torch.ops.steerserve_ctx.decode_bias_attention_
        except Exception as err:  # noqa: BLE001 - fall back to the torch pass, say why once
            _errors[key] = str(err)
            logger.warning("steerserve: %s", err)
            _loaded[key] = None
    return _loaded[key]


def cpu_kernel_error() -> str | None:
    """Why `cpu_kernel()` returned None (None when it loaded or was not tried)."""
    return _errors.get("cpu")
