"""Steerable versions of vLLM's Llama and Qwen2 causal LMs.

Each subclasses vLLM's own class and, after it is built, swaps its MLPs for steerable ones
(`vllm_adapter.make_mlps_steerable`) and their attention impls for ones that run the
context-attention second pass (`make_attention_steerable`); weights, loading, attention and compilation are vLLM's.
Selected with `hf_overrides={"architectures": ["SteerableLlamaForCausalLM"]}` (the server does this).
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .vllm_adapter import make_attention_steerable, make_mlps_steerable


class SteerableLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        make_mlps_steerable(self)
        make_attention_steerable(self)


class SteerableQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        make_mlps_steerable(self)
        make_attention_steerable(self)
