"""Context attention's pure-torch reference over Hugging Face models, as PASTA's own library does it:
an additive bias in eager attention (one configuration per batch, per-row emphasised spans). Used
by the parity tests (engine logprobs vs this) and as the benchmarks' baseline. The model's
attention implementation is switched inside the context manager and restored on exit."""

from __future__ import annotations

import contextlib

import torch

from .engine import key_bias

_ATTN_IMPL = "steerserve_context"
_bias_state: dict = {"by_layer": None}


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def steered_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """Eager attention (float additive mask) plus this layer's steering bias, per row and head."""
        by_layer = _bias_state["by_layer"]
        bias = by_layer.get(module.layer_idx) if by_layer else None
        if bias is not None:
            key_len = key.shape[2]
            extra = bias[..., :key_len].to(query.dtype)  # [B, H, 1, key_len]
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register(_ATTN_IMPL, steered_eager)
    AttentionMaskInterface.register(_ATTN_IMPL, eager_mask)


def pasta_bias(plans: list, pads: list[int], total_len: int, num_heads: int) -> dict[int, torch.Tensor]:
    """Per steered layer, the additive bias [B, num_heads, 1, total_len] for a left-padded batch:
    row r's token at padded index j is position j - pads[r]; log(alpha) on keys outside the row's
    emphasised spans (generated positions included) on the row's steered heads, 0 elsewhere."""
    layers = sorted({layer for p in plans if p is not None for layer in p.layers})
    out = {layer: torch.zeros(len(plans), num_heads, 1, total_len) for layer in layers}
    for r, (plan, pad) in enumerate(zip(plans, pads)):
        if plan is None:
            continue
        row = torch.zeros(total_len)
        row[pad:] = key_bias(plan, total_len - pad)
        for layer, heads in plan.heads:
            out[layer][r, list(heads), 0, :] = row
    return out


@contextlib.contextmanager
def context_attention_bias(model: torch.nn.Module, plans: list, pads: list[int], total_len: int):
    """Steer attention as PASTA's own code does (one batch, per-row emphasised spans, an additive
    bias in eager attention) while inside the block; `plans[r]` is row r's ContextAttentionPlan or
    None. The model's attention implementation is switched and restored on exit."""
    if all(p is None for p in plans):
        yield model
        return
    _register_attention()
    cfg = model.config
    previous = cfg._attn_implementation
    num_heads = cfg.num_attention_heads
    _bias_state["by_layer"] = {k: v.to(model.device) for k, v in pasta_bias(plans, pads, total_len, num_heads).items()}
    model.set_attn_implementation(_ATTN_IMPL)
    try:
        yield model
    finally:
        _bias_state["by_layer"] = None
        model.set_attn_implementation(previous)


def hooks(model: torch.nn.Module, plans: list, pads: list[int], total_len: int,
          prompt_width: int | None = None):
    """The reference for a batch whose row r carries `plans[r]` (a ContextAttentionPlan or None)."""
    return context_attention_bias(model, plans, pads, total_len)
