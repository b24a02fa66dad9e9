"""Steerable versions of vLLM's causal LMs, one per architecture of `patches/architectures.py`,
built from vLLM's own class when vLLM asks for it (`SteerableLlamaForCausalLM`,
`SteerableQwen3ForCausalLM`, ...: this module's attributes, made on first access).

Each subclasses vLLM's class and, after it is built, gets a `StepHandle` holding the engine of
every registered steer (`patches/steers/engine.py`); the hook points attach by structure: its
gated MLPs call the FFN hook, its decoder layers the residual hook, its attention impls the
attention hooks (`adapter/layers.py`, `adapter/attention.py`), and each engine installs what it
serves (proxy sub-models; TAIA variants when the weights load; steering vectors).
`compute_logits` runs the engines' logits hooks. Weights, loading, attention and compilation are
vLLM's. Selected with `hf_overrides={"architectures": ["Steerable<Arch>"]}` (the server does this).
"""

from __future__ import annotations

from .adapter.attention import make_attention_steerable
from .adapter.layers import make_decoder_layers_steerable, make_mlps_steerable
from .adapter.registry import base_model_class
from .architectures import ARCHITECTURES
from .steers.engine import StepHandle, engine_settings


class _SteerableMixin:
    """The hook points and the engines, after vLLM builds the model."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._make_steerable(vllm_config)

    def _make_steerable(self, vllm_config) -> None:
        self.steer_vllm_config = vllm_config
        self.steer_handle = StepHandle.for_registry(engine_settings(vllm_config))
        found = {"gated MLPs": make_mlps_steerable(self, self.steer_handle),
                 "decoder layers": make_decoder_layers_steerable(self, self.steer_handle),
                 "attention layers": make_attention_steerable(self, self.steer_handle)}
        missing = [what for what, n in found.items() if n == 0]
        if missing:  # on this pipeline stage every layer is one of each
            raise RuntimeError(f"steerserve: {type(self).__name__}: found no {', '.join(missing)} to attach the "
                               f"steers to ({found}); this architecture's layout is not supported")
        # after the scans above: sub-models an engine builds keep plain vLLM modules
        self.steer_handle.install(self)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        extra = self.steer_handle.load_weights(self, super().load_weights)
        return set(loaded or ()) | extra if extra else loaded

    def compute_logits(self, hidden_states):
        return self.steer_handle.compute_logits(self, hidden_states, super().compute_logits)


_classes: dict[str, type] = {}


def steerable_class(base_name: str) -> type:
    """The steerable subclass of vLLM's class for architecture `base_name` (made once)."""
    if base_name not in _classes:
        base = base_model_class(base_name)
        cls = type(ARCHITECTURES[base_name].steerable_name, (_SteerableMixin, base), {"__module__": __name__})
        _classes[base_name] = cls
    return _classes[base_name]


def __getattr__(name: str) -> type:
    """`Steerable<Arch>` for each architecture of `patches/architectures.py` (what vLLM's registry
    imports, by the name `register()` gave it)."""
    for arch in ARCHITECTURES.values():
        if arch.steerable_name == name:
            return steerable_class(arch.name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
