"""Steerable versions of vLLM's Llama and Qwen2 causal LMs.

Each subclasses vLLM's own class and, after it is built, gets a `StepHandle` holding the engine of
every registered steer (`patches/steers/engine.py`): its MLPs call the FFN hook, its decoder
layers the residual hook, its attention impls the attention hooks (the adapter's hook points),
and each engine installs what it serves (proxy sub-models; TAIA variants when the weights load;
steering vectors). `compute_logits` runs the engines' logits hooks.
Weights, loading, attention and compilation are vLLM's.
Selected with `hf_overrides={"architectures": ["SteerableLlamaForCausalLM"]}` (the server does this).
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .adapter.attention import make_attention_steerable
from .adapter.layers import make_decoder_layers_steerable, make_mlps_steerable
from .steers.engine import StepHandle, engine_settings


class _SteerableMixin:
    """The hook points and the engines, after vLLM builds the model."""

    def _make_steerable(self, vllm_config) -> None:
        self.steer_vllm_config = vllm_config
        self.steer_handle = StepHandle.for_registry(engine_settings(vllm_config))
        make_mlps_steerable(self, self.steer_handle)
        make_decoder_layers_steerable(self, self.steer_handle)
        make_attention_steerable(self, self.steer_handle)
        # after the scans above: sub-models an engine builds keep plain vLLM modules
        self.steer_handle.install(self)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        extra = self.steer_handle.load_weights(self, super().load_weights)
        return set(loaded or ()) | extra if extra else loaded

    def compute_logits(self, hidden_states):
        return self.steer_handle.compute_logits(self, hidden_states, super().compute_logits)


class SteerableLlamaForCausalLM(_SteerableMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._make_steerable(vllm_config)


class SteerableQwen2ForCausalLM(_SteerableMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._make_steerable(vllm_config)
