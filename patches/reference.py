"""Pure-torch references over Hugging Face transformers models, as hook-based steering libraries
do it: InfoSteer with forward pre-hooks on each `down_proj` (one configuration at a time, global to
the model); context attention (PASTA) with an additive bias in eager attention (one configuration
per batch, per-row emphasised spans, as PASTA's own library). Used by the parity tests (engine
logprobs vs these) and as the benchmarks' baseline.

Mutates the model only inside the context managers (hooks removed, attention implementation
restored on exit).
"""

from __future__ import annotations

import contextlib

import torch

from . import infosteer
from .plan import InfoSteerPlan, SteerPlan


def _decoder_layers(model: torch.nn.Module):
    inner = getattr(model, "model", model)
    return inner.layers


@contextlib.contextmanager
def infosteer_hooks(model: torch.nn.Module, plan: InfoSteerPlan | None):
    """Apply `plan` to every token of every forward pass of `model` while inside the block."""
    handles = []
    if plan is not None:
        layers = _decoder_layers(model)

        def pre_hook(_module, args):
            (coeffs,) = args  # [batch, seq, d_ffn]
            return (infosteer.apply_one(coeffs, plan.mode, plan.alpha, k=plan.k, m=plan.m),)

        for i in plan.layers:
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(pre_hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def token_logprobs(model, prompt_ids: list[int], output_ids: list[int], plan: SteerPlan | None) -> list[float]:
    """Log-probability of each of `output_ids` after `prompt_ids` under the steered model
    (teacher forcing; the steer applies to prompt and generated positions, as in the engine)."""
    ids = torch.tensor([prompt_ids + output_ids], device=model.device)
    with steered(model, [plan], [0], ids.shape[1]):
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [logprobs[n - 1 + i, tok].item() for i, tok in enumerate(output_ids)]


@torch.no_grad()
def greedy_generate(model, batch_ids: list[list[int]], max_new_tokens: int,
                    plan: SteerPlan | None | list[SteerPlan | None], pad_token_id: int) -> list[list[int]]:
    """Batched greedy decoding with Hugging Face `generate` (left padding) under one plan, or one
    plan per row (rows may differ only in their context-attention spans)."""
    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(batch_ids):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    plans = plan if isinstance(plan, list) else [plan] * len(batch_ids)
    with steered(model, plans, [width - len(r) for r in batch_ids], width + max_new_tokens):
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
        )
    return [row[width:].tolist() for row in out]


# ----------------------------------------------------------------------------- context attention

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
    from .context_attention import key_bias

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


@contextlib.contextmanager
def steered(model: torch.nn.Module, plans: list, pads: list[int] | None = None, total_len: int = 0):
    """Every steer of one-or-more plans: InfoSteer hooks (all rows must share one InfoSteer plan, as
    hook libraries do) and per-row context attention."""
    pads = pads or [0] * len(plans)
    infos = {p.infosteer for p in plans if p is not None}
    if len(infos) > 1:
        raise ValueError("the hooks reference holds one InfoSteer configuration per batch")
    info = infos.pop() if infos else None
    ctx_plans = [p.context_attention if p is not None else None for p in plans]
    with infosteer_hooks(model, info), context_attention_bias(model, ctx_plans, pads, total_len):
        yield model


# --- proxy tuning (arXiv 2401.08565): three Hugging Face models, as the paper's code runs them ----

def proxy_combine(base_logits: torch.Tensor, expert_logits: torch.Tensor, anti_logits: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """base + alpha * (expert - anti_expert) in float32, the experts cut to the base's vocabulary
    (a larger padded expert vocabulary is cut, as the reference code does)."""
    vocab = base_logits.shape[-1]
    return base_logits.float() + alpha * (expert_logits[..., :vocab].float() - anti_logits[..., :vocab].float())


@torch.no_grad()
def proxy_token_logprobs(base, expert, anti, prompt_ids: list[int], output_ids: list[int],
                         alpha: float) -> list[float]:
    """Log-probability of each of `output_ids` after `prompt_ids` under the proxy-tuned distribution
    (teacher forcing, all three models see the same tokens)."""
    ids = torch.tensor([prompt_ids + output_ids], device=base.device)
    logits = proxy_combine(base(ids).logits[0], expert(ids).logits[0], anti(ids).logits[0], alpha)
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [logprobs[n - 1 + i, tok].item() for i, tok in enumerate(output_ids)]


@torch.no_grad()
def proxy_generate(base, expert, anti, batch_ids: list[list[int]], max_new_tokens: int, alpha: float,
                   pad_token_id: int, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Proxy-tuned generation with the three models batched and stepped together, each with its own
    KV cache (the Hugging Face baseline: left padding, greedy when temperature is 0). No stop
    handling: exactly `max_new_tokens` per row."""
    device = base.device
    width = max(len(x) for x in batch_ids)
    ids = torch.tensor([[pad_token_id] * (width - len(x)) + x for x in batch_ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    models = (base, expert, anti)
    past = [None, None, None]
    out: list[list[int]] = [[] for _ in batch_ids]
    step_ids = ids
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        logits = []
        for i, m in enumerate(models):
            res = m(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past[i],
                    use_cache=True)
            past[i] = res.past_key_values
            logits.append(res.logits[:, -1])
        combined = proxy_combine(*logits, alpha)
        if temperature > 0:
            probs = torch.softmax(combined / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        else:
            nxt = combined.argmax(-1, keepdim=True)
        for row, tok in enumerate(nxt[:, 0].tolist()):
            out[row].append(tok)
        step_ids = nxt
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return out
