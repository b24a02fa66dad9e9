"""InfoSteer's pure-torch reference over Hugging Face models, as hook-based steering libraries do
it: forward pre-hooks on each `down_proj` (one configuration at a time, global to the model). Used
by the parity tests (engine logprobs vs this) and as the benchmarks' baseline."""

from __future__ import annotations

import contextlib

import torch

from . import InfoSteerPlan
from . import formulas


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
            return (formulas.apply_one(coeffs, plan.mode, plan.alpha, k=plan.k, m=plan.m),)

        for i in plan.layers:
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(pre_hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def hooks(model: torch.nn.Module, plans: list, pads: list[int], total_len: int,
          prompt_width: int | None = None):
    """The reference for a batch whose row r carries `plans[r]` (an InfoSteerPlan or None): hook
    libraries hold one configuration per batch, so all rows must share one plan."""
    distinct = {p for p in plans if p is not None}
    if len(distinct) > 1:
        raise ValueError("the hooks reference holds one InfoSteer configuration per batch")
    return infosteer_hooks(model, distinct.pop() if distinct else None)
