"""Proxy tuning (arXiv 2401.08565) per request: next-token logits = base + alpha * (expert - anti_expert).

The engine holds, next to the base, one *proxy pair* per name declared by `steerserve serve --proxy`:
a small tuned expert and its untuned anti-expert, both sharing the base's tokenizer. They are
sub-models of the one registered vLLM model (so vLLM's scheduler, KV-cache manager, prefix cache
and batching serve all three in lockstep: every attention layer of every sub-model gets its KV
cache, addressed by the same block table). In a step with proxy rows, after the base forward, each
pair's expert and anti-expert run on the token rows of the requests that use that pair only (their
attention metadata is the step's, cut to those requests); `compute_logits` then adds
alpha * (expert - anti_expert) to those rows' raw logits, before temperature, top-p and the other
logits processors, so sampling and the returned logprobs are the combined distribution's. Steps
without proxy rows run the base alone. Expert vocabularies larger than the base's are cut to it
(as the paper's code does).

This module is device-agnostic torch (the per-step route and the arithmetic); building, loading and
running the sub-models inside vLLM is in `vllm_adapter` (section 8).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .mixing import slice_offset
from .steers.proxy import ALPHA_MAX, ALPHA_MIN  # noqa: F401  (re-exported)

PAIRS_ENV = "STEERSERVE_PROXY_PAIRS"  # JSON list of {"name", "expert", "anti_expert"}: the engine's pairs


def proxy_pairs_from_env() -> list[dict]:
    """The proxy pairs the engine must hold, as declared by `steerserve serve`."""
    text = os.environ.get(PAIRS_ENV)
    return json.loads(text) if text else []


def combine_(logits: torch.Tensor, rows: torch.Tensor, alphas: torch.Tensor, expert: torch.Tensor,
             anti: torch.Tensor) -> None:
    """logits[rows] += alphas * (expert - anti), in float32 (`logits` float32; the experts' logits
    already cut to the base vocabulary). The pure arithmetic of proxy tuning, shared with the reference."""
    delta = expert.float() - anti.float()
    logits.index_add_(0, rows, alphas.to(torch.float32).unsqueeze(1) * delta)


@dataclass
class ProxyGroup:
    """One pair's rows in a step: the requests (batch index, token range, alpha) and the expert's
    and anti-expert's final hidden states of those rows (`sub_of_row[token row]` = their row)."""

    name: str
    requests: list[tuple[int, int, int, float]]  # (batch index, start row, end row, alpha)
    sub_of_row: torch.Tensor  # (num_tokens,) long: row in h_expert/h_anti, -1 outside the group
    h_expert: torch.Tensor | None = None
    h_anti: torch.Tensor | None = None


@dataclass
class ProxyRoute:
    """What `compute_logits` needs after a step with proxy rows (published by the runner hook)."""

    hidden: torch.Tensor  # the base forward's output (to tell a prompt-logprobs slice of it)
    num_reqs: int
    groups: list[ProxyGroup] = field(default_factory=list)

    def rows_for(self, hidden_states: torch.Tensor, group: ProxyGroup):
        """(rows of `hidden_states`, rows of the group's expert states, alphas) for a compute_logits
        input, or None when it matches neither the sampled rows nor a slice of the step's states."""
        device = hidden_states.device
        rows: list[int] = []
        tokens: list[int] = []
        alphas: list[float] = []
        offset = slice_offset(hidden_states, self.hidden)
        if offset is not None:
            # a slice of the step's hidden states (prompt logprobs): token rows [offset, offset + n)
            n = hidden_states.shape[0]
            for _, start, end, alpha in group.requests:
                for t in range(max(start, offset), min(end, offset + n)):
                    rows.append(t - offset)
                    tokens.append(t)
                    alphas.append(alpha)
        elif hidden_states.shape[0] == self.num_reqs:
            # the sampled rows: one per request in batch order, each its request's last token row
            for index, _, end, alpha in group.requests:
                rows.append(index)
                tokens.append(end - 1)
                alphas.append(alpha)
        else:
            return None
        if not rows:
            return (torch.empty(0, dtype=torch.long, device=device),) * 2 + (torch.empty(0, device=device),)
        sub = group.sub_of_row[torch.tensor(tokens, dtype=torch.long, device=group.sub_of_row.device)]
        return (torch.tensor(rows, dtype=torch.long, device=device), sub.to(device),
                torch.tensor(alphas, dtype=torch.float32, device=device))


_route: ProxyRoute | None = None


def set_route(route: ProxyRoute | None) -> None:
    """Published by the runner hook after a forward step; valid until the next step."""
    global _route
    _route = route


def route() -> ProxyRoute | None:
    return _route
