"""Steerable versions of vLLM's Llama and Qwen2 causal LMs.

Each subclasses vLLM's own class and, after it is built, swaps its MLPs for steerable ones
(`vllm_adapter.make_mlps_steerable`) and their attention impls for ones that run the
context-attention second pass (`make_attention_steerable`); weights, loading, attention and compilation are vLLM's.
Selected with `hf_overrides={"architectures": ["SteerableLlamaForCausalLM"]}` (the server does this).
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .mixing import full_variants_from_env
from .proxy import proxy_pairs_from_env
from .vllm_adapter import (
    build_proxy_models, load_proxy_weights, load_variant_weights, make_attention_steerable, make_mlps_steerable,
    proxy_logits, route_logits_, whole_logits,
)


class _SteerableMixin:
    """After vLLM builds the model: steerable MLPs and attention. Loading also loads the fully
    fine-tuned variants declared by the server (TAIA mixing); logits of mixed rows use their
    variant's LM head."""

    def _make_steerable(self, vllm_config) -> None:
        make_mlps_steerable(self)
        make_attention_steerable(self)
        pairs = proxy_pairs_from_env()
        if pairs:
            # after the scans above: the experts' modules are plain vLLM ones
            build_proxy_models(self, vllm_config, pairs)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        variants = full_variants_from_env()
        if variants:
            load_variant_weights(self, super().load_weights, variants)
        if hasattr(self, "steer_proxy"):
            loaded = set(loaded or ()) | load_proxy_weights(self)
        return loaded

    def compute_logits(self, hidden_states):
        logits = whole_logits(self, hidden_states)
        if logits is None:
            logits = super().compute_logits(hidden_states)
            route_logits_(self, hidden_states, logits)
        return proxy_logits(self, hidden_states, logits)


class SteerableLlamaForCausalLM(_SteerableMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._make_steerable(vllm_config)


class SteerableQwen2ForCausalLM(_SteerableMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._make_steerable(vllm_config)
