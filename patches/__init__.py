"""steerserve's vLLM plugin (entry point group `vllm.general_plugins`, name `steerserve`).

`register()` is called by vLLM in every process that builds or serves a model, possibly several
times: it registers the steerable architectures and installs the per-step steering hook, both
idempotently.
"""

from __future__ import annotations

# base architecture -> steerable architecture registered by this plugin
STEERABLE_ARCHITECTURES = {
    "LlamaForCausalLM": "SteerableLlamaForCausalLM",
    "Qwen2ForCausalLM": "SteerableQwen2ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    from .adapter.block_hash import install_prefix_cache_keys
    from .adapter.runner import install_cpu_pipeline_fix, install_runner_hook

    supported = set(ModelRegistry.get_supported_archs())
    for steerable in STEERABLE_ARCHITECTURES.values():
        if steerable not in supported:
            ModelRegistry.register_model(steerable, f"steerserve.patches.models:{steerable}")
    install_runner_hook()
    install_cpu_pipeline_fix()
    install_prefix_cache_keys()
