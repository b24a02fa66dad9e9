"""Reference generation over Hugging Face transformers models under steering plans: each steer's
pure-torch reference is its package's `reference.py` (`Steer.reference`); `steered` applies every
steer of the plans through them. Used by the parity tests (engine logprobs vs these) and as the
benchmarks' baseline.

Mutates the model only inside the context managers (hooks removed, attention implementation
restored on exit).
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from .plan import SteerPlan
from .steers import STEERS


@torch.no_grad()
def token_logprobs(model, prompt_ids: list[int], output_ids: list[int], plan: SteerPlan | None) -> list[float]:
    """Log-probability of each of `output_ids` after `prompt_ids` under the steered model
    (teacher forcing; the steer applies to prompt and generated positions, as in the engine)."""
    ids = torch.tensor([prompt_ids + output_ids], device=model.device)
    with steered(model, [plan], [0], ids.shape[1], prompt_width=len(prompt_ids)):
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
    with steered(model, plans, [width - len(r) for r in batch_ids], width + max_new_tokens, prompt_width=width):
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
        )
    return [row[width:].tolist() for row in out]


@contextlib.contextmanager
def steered(model: torch.nn.Module, plans: list, pads: list[int] | None = None, total_len: int = 0,
            prompt_width: int | None = None):
    """Every steer of one-or-more plans (row r: `plans[r]`, a SteerPlan or None, left-padded by
    `pads[r]`; columns below `prompt_width` are prompt tokens), each through its steer's reference
    (`Steer.reference`, a module with `hooks(model, plans, pads, total_len, prompt_width)`)."""
    pads = pads or [0] * len(plans)
    with contextlib.ExitStack() as stack:
        for steer in STEERS:
            if not steer.reference:
                continue
            module = importlib.import_module(steer.reference)
            mine = [getattr(p, steer.name) if p is not None else None for p in plans]
            if hasattr(module, "hooks") and any(m is not None for m in mine):
                stack.enter_context(module.hooks(model, mine, pads, total_len, prompt_width))
        yield model
