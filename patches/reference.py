"""Pure-torch reference of InfoSteer over Hugging Face transformers models (forward pre-hooks on
each `down_proj`), as hook-based steering libraries do it: one configuration at a time, global to
the model. Used by the parity tests (engine logprobs vs this) and as the benchmark baseline.

Mutates the model only inside `infosteer_hooks` (hooks are removed on exit).
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
    with infosteer_hooks(model, plan.infosteer if plan else None):
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [logprobs[n - 1 + i, tok].item() for i, tok in enumerate(output_ids)]


@torch.no_grad()
def greedy_generate(model, batch_ids: list[list[int]], max_new_tokens: int, plan: SteerPlan | None,
                    pad_token_id: int) -> list[list[int]]:
    """Batched greedy decoding with Hugging Face `generate` (left padding) under one plan."""
    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(batch_ids):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    with infosteer_hooks(model, plan.infosteer if plan else None):
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
        )
    return [row[width:].tolist() for row in out]
