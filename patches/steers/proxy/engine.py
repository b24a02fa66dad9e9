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

This module: the per-step route, the arithmetic and the engine; building, loading and running the
sub-models inside vLLM is `adapter/submodels.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...adapter import submodels
from . import PAIRS_SETTING
from ..engine import SteerEngine, StepHandle, StepShape, slice_offset

logger = logging.getLogger("steerserve")



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


@dataclass
class ProxyStep:
    """A step's proxy requests by pair: name -> [(batch index, start row, end row, alpha)] (sorted),
    and after the forward the route `compute_logits` reads."""

    by_pair: dict[str, list[tuple[int, int, int, float]]]
    num_reqs: int
    metadata: object = None  # the step's attention metadata per layer (adapter), for the experts
    route: ProxyRoute | None = None


class ProxyEngine(SteerEngine):
    name = "proxy"
    settings_keys = (PAIRS_SETTING,)

    def install(self, model, handle: StepHandle) -> None:
        pairs = handle.settings.get(PAIRS_SETTING) or []
        if pairs:
            submodels.build_proxy_models(model, model.steer_vllm_config, pairs)

    def load_weights(self, model, handle: StepHandle, load) -> set[str]:
        return submodels.load_proxy_weights(model)

    def warm_up(self, model, handle: StepHandle, input_ids, positions) -> None:
        # in a compiled engine the experts compile here, in vLLM's warm-up, not in a request
        for prefix in submodels.warm_up_pairs(model, input_ids, positions):
            logger.info("steerserve: proxy sub-model %s compiled", prefix)

    def build_step(self, entries, shape: StepShape, handle: StepHandle) -> ProxyStep | None:
        by_pair: dict[str, list[tuple[int, int, int, float]]] = {}
        for plan, rows in entries:
            if plan.alpha != 0 and rows.end > rows.start:  # alpha 0: no expert runs, plain base logits
                by_pair.setdefault(plan.pair, []).append((rows.index, rows.start, rows.end, plan.alpha))
        if not by_pair:
            return None
        for requests in by_pair.values():
            requests.sort()
        return ProxyStep(by_pair, shape.num_reqs, shape.attention_metadata)

    def after_forward(self, state: ProxyStep, model, out, input_ids, positions) -> ProxyStep | None:
        """Run each pair's expert and anti-expert on the rows of the requests that use the pair."""
        if input_ids is None or positions is None:
            logger.error("steerserve: proxy tuning needs token ids (this step has input embeddings); "
                         "proxy requests in it get the base's logits")
            return None
        loaded = submodels.loaded_pairs(model)
        step_metadata = state.metadata() if state.metadata is not None else {}
        route = ProxyRoute(out, state.num_reqs)
        for name, requests in state.by_pair.items():
            if name not in loaded:
                logger.error("steerserve: proxy pair %r is not loaded in the engine; base logits used", name)
                continue
            try:
                sub_of_row, h_expert, h_anti = submodels.run_pair(model, name, requests, input_ids, positions,
                                                                  out.shape[0], step_metadata)
            except submodels.ProxyUnavailable as err:
                logger.error("steerserve: %s; base logits used", err)
                return None
            route.groups.append(ProxyGroup(name, requests, sub_of_row, h_expert, h_anti))
        return ProxyStep(state.by_pair, state.num_reqs, None, route) if route.groups else None

    def edit_logits(self, state: ProxyStep, model, hidden_states, logits):
        """base + alpha * (expert - anti_expert) on the proxy rows (float32 then; `logits` itself
        when no row of `hidden_states` is a proxy row)."""
        route = state.route
        if route is None:
            return logits
        out = None
        vocab = logits.shape[-1]
        for group in route.groups:
            found = route.rows_for(hidden_states, group)
            if found is None:
                logger.error("steerserve: compute_logits got %d rows that match neither the step's requests nor "
                             "its hidden states; proxy requests' logits are the base's", hidden_states.shape[0])
                return logits
            rows, sub, alphas = found
            if rows.numel() == 0:
                continue
            expert = submodels.pair_logits(model, group.name, "expert", group.h_expert.index_select(0, sub))
            anti = submodels.pair_logits(model, group.name, "anti_expert", group.h_anti.index_select(0, sub))
            if out is None:
                out = logits.to(torch.float32)
            combine_(out, rows, alphas, expert[:, :vocab], anti[:, :vocab])
        return out if out is not None else logits


ENGINE = ProxyEngine()
