"""vLLM's model registry: the classes the steerable models subclass, and their registration.

Surfaces: `vllm.ModelRegistry.models` (architecture name -> registered model, whose
`load_model_cls()` imports the class), `get_supported_archs()` and `register_model(name,
"module:Class")` (lazy: each process imports the class when a model of it is built).
"""

from __future__ import annotations


def base_model_class(name: str) -> type:
    """vLLM's own model class for architecture `name` (e.g. `Qwen3ForCausalLM`)."""
    from vllm import ModelRegistry

    registered = ModelRegistry.models.get(name)
    if registered is None:
        raise ValueError(f"steerserve: vLLM has no architecture {name!r}")
    return registered.load_model_cls()


def register_steerable(names: dict[str, str], module: str) -> list[str]:
    """Register `module:<steerable>` for each (base -> steerable) pair whose base vLLM serves
    (idempotent). Returns the steerable names registered now or before."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    out = []
    for base, steerable in names.items():
        if base not in supported:
            continue
        if steerable not in supported:
            ModelRegistry.register_model(steerable, f"{module}:{steerable}")
        out.append(steerable)
    return out
