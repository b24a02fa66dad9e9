"""TAIA parameter mixing for fully fine-tuned variants: per-row weight routing inside one engine.

The engine serves the base model and holds, for each fully fine-tuned variant, the variant's
weights of every module that differs from the base. A request asks for one variant and, per
component, the tuned or the base weights (`steer.mixing`; TAIA = tuned attention + base FFN):

- component `attention`: the input embeddings, every decoder layer's norms and q/k/v/o
  projections, the final norm and the LM head (TAIA keeps all of these tuned);
- component `ffn`: every decoder layer's MLP projections.

Each routed module ("site") first runs as usual on the whole batch (so rows of requests without
mixing are computed exactly as by a plain engine), then the rows of requests that use a variant's
weights for the site's component are recomputed with a *shadow* of the module that holds the
variant's weights (same class, same kernels, weights loaded by vLLM's own weight loaders, so
tensor-parallel sharding is vLLM's) and overwritten. Sites whose variant weights equal the base's
(e.g. the FFN of a TAIA export) have no shadow and cost nothing.

This module is device-agnostic torch: the per-step routing (`StepMixing`, carried by the step's
`context.StepContext`) and the logits route; the vLLM-specific parts (which modules are sites,
loading weights, shadows) live in `vllm_adapter`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

COMPONENTS = ("attention", "ffn")
VARIANTS_ENV = "STEERSERVE_FULL_VARIANTS"  # JSON list of {"name", "path"}: the engine's full variants


def full_variants_from_env() -> list[dict]:
    """The fully fine-tuned variants the engine must hold, as declared by `steerserve serve`."""
    text = os.environ.get(VARIANTS_ENV)
    return json.loads(text) if text else []


@dataclass
class StepMixing:
    """One step's routing: token rows (device tensors) per (component, variant index), and the
    request indices of the step's batch per variant for the LM head (component attention)."""

    rows: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    spans: dict[tuple[str, int], tuple[int, int] | None] = field(default_factory=dict)
    token_rows: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # variant -> [(start, end)]
    request_rows: dict[int, list[int]] = field(default_factory=dict)  # variant -> batch indices
    num_reqs: int = 0
    num_tokens: int = 0
    # component -> the variant whose rows are every row of the step (then a site runs only its
    # shadow: no base computation to overwrite, and no unmixed row whose result could change)
    whole: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, entries: list[tuple[int, bool, bool, int, int, int]], num_reqs: int,
              device: torch.device | str, num_tokens: int = -1) -> StepMixing | None:
        """entries: (variant, attention_tuned, ffn_tuned, batch_index, start_row, end_row);
        num_tokens: the step's token rows (-1: unknown, never whole)."""
        by_key: dict[tuple[str, int], list[tuple[int, int]]] = {}
        mix = cls(num_reqs=num_reqs, num_tokens=num_tokens)
        for variant, attention, ffn, index, start, end in entries:
            if attention:
                by_key.setdefault(("attention", variant), []).append((start, end))
                mix.token_rows.setdefault(variant, []).append((start, end))
                mix.request_rows.setdefault(variant, []).append(index)
            if ffn:
                by_key.setdefault(("ffn", variant), []).append((start, end))
        if not by_key:
            return None
        for key, ranges in by_key.items():
            ranges.sort()
            contiguous = all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
            mix.spans[key] = (ranges[0][0], ranges[-1][1]) if contiguous else None
            mix.rows[key] = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in ranges]).to(device)
            if mix.spans[key] == (0, num_tokens):
                mix.whole[key[0]] = key[1]
        return mix

    def whole_variant(self, component: str, num_rows: int) -> int | None:
        """The variant that owns every one of the `num_rows` rows a site sees, if one does."""
        variant = self.whole.get(component)
        return variant if variant is not None and num_rows == self.num_tokens else None

    def groups(self, component: str):
        """(variant, rows tensor, contiguous span or None) for the component's routed rows."""
        for (comp, variant), rows in self.rows.items():
            if comp == component:
                yield variant, rows, self.spans[(comp, variant)]


def overwrite_rows_(out: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None, new: torch.Tensor) -> None:
    if span is not None:
        out[span[0] : span[1]] = new
    else:
        out.index_copy_(0, rows, new.to(out.dtype))


def select_rows(x: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    return x[span[0] : span[1]] if span is not None else x.index_select(0, rows)


def slice_offset(hidden_states: torch.Tensor, step_hidden: torch.Tensor) -> int | None:
    """The first token row of `hidden_states` in the step's hidden states when it is a row slice of
    them (vLLM's prompt-logprobs path passes such slices to `compute_logits`), else None (a gathered
    copy: the sampled rows)."""
    h = step_hidden
    if not (hidden_states.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
            and hidden_states.dim() == 2 and h.dim() == 2 and hidden_states.stride() == h.stride()):
        return None
    return (hidden_states.data_ptr() - h.data_ptr()) // (h.element_size() * h.stride(0))


@dataclass
class LogitsRoute:
    """What `compute_logits` needs after a mixed step's forward: the forward's output (to tell a
    slice of it, as the prompt-logprobs path passes, from the sampled rows) and the routing."""

    hidden: torch.Tensor
    mix: StepMixing

    def rows_for(self, hidden_states: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Per variant, the rows of `hidden_states` (a compute_logits input) that are its requests'."""
        out: dict[int, torch.Tensor] = {}
        offset = slice_offset(hidden_states, self.hidden)
        if offset is not None:
            # a slice of the step's hidden states (prompt logprobs): token rows [offset, offset + n)
            n = hidden_states.shape[0]
            for variant, ranges in self.mix.token_rows.items():
                idx = [t - offset for s, e in ranges for t in range(max(s, offset), min(e, offset + n))]
                if idx:
                    out[variant] = torch.tensor(idx, dtype=torch.long, device=hidden_states.device)
            return out
        if hidden_states.shape[0] == self.mix.num_reqs:
            # the sampled rows: one per request, in batch order (all of them when the attention
            # component is whole: then `compute_logits` used the variant's head directly)
            for variant, idx in self.mix.request_rows.items():
                out[variant] = torch.tensor(idx, dtype=torch.long, device=hidden_states.device)
            return out
        return None


_logits_route: LogitsRoute | None = None


def set_logits_route(route: LogitsRoute | None) -> None:
    """Published by the runner hook after a forward step; valid until the next step."""
    global _logits_route
    _logits_route = route


def logits_route() -> LogitsRoute | None:
    return _logits_route
