"""The attention hook point (worker process): steerable attention impls and paged-KV readers.

Surfaces: vLLM's `Attention` layers and their `impl` (the CPU and FlashAttention impls, subclassed
in place), `forward`'s arguments, the impls' `num_heads` / `scale` / `sliding_window` /
`alibi_slopes` / `sinks` / `logits_soft_cap` / `kv_cache_dtype`, the metadata's `seq_lens` /
`block_table`, the paged KV cache layouts and the CPU cache-write op
(`cpu_attn_reshape_and_cache`) used to calibrate the CPU layout, and `extract_layer_index`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..steers.context_attention.kv import CpuPagedKV, FlashPagedKV, PagedKV
from ..steers.engine import AttentionCall, StepHandle
from .parallel import tensor_parallel

logger = logging.getLogger("steerserve")


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, vLLM `Attention` layer) for every decoder self-attention of `model`."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    return [(extract_layer_index(name), m) for name, m in model.named_modules() if isinstance(m, Attention)]


_readers: dict[tuple, PagedKV] = {}


def paged_kv_reader(impl: Any, layer: Any, kv_cache: torch.Tensor) -> PagedKV:
    """The reader for this attention backend's paged KV layout (cached per layout)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    _, kvh, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    if isinstance(impl, CPUAttentionBackendImpl):
        key = ("cpu", layer.isa, kv_cache.dtype, kvh, block_size, head_dim)
        if key not in _readers:
            from vllm import _custom_ops as ops

            def write(k, v, key_cache, value_cache, slots):
                ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, layer.isa,
                                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

            _readers[key] = CpuPagedKV.calibrate(write, kvh, block_size, head_dim, kv_cache.dtype)
            logger.info("steerserve: CPU paged KV layout (isa %s): K %s, V %s", layer.isa,
                        _readers[key].kind_k, _readers[key].kind_v)
        return _readers[key]
    key = ("flash", block_size, head_dim)
    if key not in _readers:
        _readers[key] = FlashPagedKV(block_size, head_dim)
    return _readers[key]


def attention_supports_steering(impl: Any) -> str | None:
    """None when context-attention steering can run on this attention impl, else the reason."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    supported = (CPUAttentionBackendImpl,)
    try:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

        supported += (FlashAttentionImpl,)
    except Exception:  # noqa: BLE001 - not importable on every platform
        pass
    if not isinstance(impl, supported):
        return f"attention backend {type(impl).__name__} (supported: CPU_ATTN, FLASH_ATTN)"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        return "sliding-window attention"
    if getattr(impl, "alibi_slopes", None) is not None or getattr(impl, "sinks", None) is not None:
        return "ALiBi or attention sinks"
    if getattr(impl, "logits_soft_cap", 0) not in (0, None):
        return "logit soft-capping"
    if getattr(impl, "kv_cache_dtype", "auto") != "auto":
        return f"quantized KV cache ({impl.kv_cache_dtype})"
    return None


def _steerable_impl_class(cls: type) -> type:
    """A subclass of the attention impl class `cls` whose forward is the backend's forward, then the
    attention hooks of the step's engines (the context-attention second pass for the steered rows
    of this layer). It runs eagerly every step: vLLM calls attention through an opaque custom op,
    also under torch.compile. (Built as a direct subclass with no mixin base, so instances keep
    their object layout and `__class__` can be swapped in place.)"""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = cls.forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        calls = self.steer_handle.calls("attention_")
        if not calls or attn_metadata is None:
            return out

        def reader():
            if self.steer_reader is None:  # the layout is fixed once the cache exists
                self.steer_reader = paged_kv_reader(self, layer, kv_cache)
            return self.steer_reader

        call = AttentionCall(self.steer_layer, query, output, kv_cache, attn_metadata.seq_lens,
                             attn_metadata.block_table, self.scale, self.steer_head_offset, reader,
                             self.steer_unsupported)
        for engine, state in calls:
            engine.attention_(state, call)
        return out

    return type(f"Steerable{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


_steerable_impls: dict[type, type] = {}


def make_attention_steerable(model: torch.nn.Module, handle: StepHandle) -> int:
    """Swap the attention impl of every decoder self-attention for a steerable subclass of its own
    class, in place, calling `handle`'s attention hooks. Returns the number of layers swapped."""
    rank, _ = tensor_parallel()
    swapped = 0
    for layer, attn in attention_modules(model):
        impl = attn.impl
        cls = type(impl)
        if cls not in _steerable_impls:
            _steerable_impls[cls] = _steerable_impl_class(cls)
        impl.__class__ = _steerable_impls[cls]
        impl.steer_layer = layer
        impl.steer_head_offset = rank * impl.num_heads  # local heads of this tensor-parallel rank
        impl.steer_unsupported = attention_supports_steering(impl)  # fixed at build: checked once
        impl.steer_reader = None
        impl.steer_handle = handle
        swapped += 1
    return swapped


