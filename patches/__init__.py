"""steerserve's vLLM plugin (entry point group `vllm.general_plugins`, name `steerserve`).

`register()` is called by vLLM in every process that builds or serves a model, possibly several
times: it registers the steerable architectures and installs the per-step steering hook, both
idempotently.
"""

from __future__ import annotations

# base architecture -> steerable architecture registered by this plugin (patches/architectures.py)
from .architectures import STEERABLE_ARCHITECTURES  # noqa: E402


def register() -> None:
    from .adapter.block_hash import install_prefix_cache_keys
    from .adapter.lora_cpu import install_cpu_lora_fix
    from .adapter.registry import register_steerable
    from .adapter.runner import install_cpu_pipeline_fix, install_runner_hook

    register_steerable(STEERABLE_ARCHITECTURES, "steerserve.patches.models")
    install_runner_hook()
    install_cpu_pipeline_fix()
    install_prefix_cache_keys()
    install_cpu_lora_fix()
