"""The per-step steering context and the registered op the steerable layers call.

Runs in vLLM's worker process. Once per forward step, `vllm_adapter` calls `build_step_context`
with the step's (plan, first token row, end row) for every steered request and publishes the
result with `use_step_context`; outside a steered step the context is None and the op returns at
once, so unsteered steps do no steering work at all.

The op is a `torch.library.custom_op`, opaque to torch.compile: a compiled graph calls it on every
step and the Python body reads the context then. (A Python branch on the context would be traced
once, with an empty context, and never run again.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import infosteer
from .context_attention import AttentionWork
from .mixing import StepMixing
from .plan import ContextAttentionPlan, InfoSteerPlan


@dataclass
class _Group:
    """Rows of one InfoSteer mode on one layer set, with per-row parameters (all on the device)."""

    mode: str
    rows: torch.Tensor  # [n] int64 token rows of the step's flattened batch
    alpha: torch.Tensor  # [n] float32
    count: torch.Tensor | None  # [n] int64: k (topk) or m (lift)
    count_max: int
    span: tuple[int, int] | None = None  # (start, end) when rows are one contiguous range
    uniform_alpha: float | None = None  # when every row has the same alpha

    def apply_(self, x: torch.Tensor) -> None:
        """Rewrite x[rows] in place (x: [num_tokens, d_ffn])."""
        if self.mode == "scale":
            # In-place multiply with float32 factors: computed in float32 and rounded once to x's
            # dtype, exactly as infosteer.scale_rows does; one kernel on a contiguous span.
            factor = self.uniform_alpha if self.uniform_alpha is not None else self.alpha[:, None]
            if self.span is not None:
                x[self.span[0] : self.span[1]].mul_(factor)
            else:
                x.index_copy_(0, self.rows, x.index_select(0, self.rows).mul_(factor))
            return
        sub = x.index_select(0, self.rows)
        shards = _shards
        if shards is not None:
            # Tensor parallel: x holds this rank's slice of each row's coefficients, but top-k and
            # the lift's bottom-m and mean are statistics of the whole row. Gather the steered rows
            # (every rank runs the same groups in the same order), steer them whole, keep our slice.
            gather, rank = shards
            width = sub.shape[-1]
            sub = gather(sub)
        if self.mode == "topk":
            new = infosteer.topk_rows(sub, self.alpha, self.count, self.count_max)
        else:
            new = infosteer.lift_rows(sub, self.alpha, self.count, self.count_max)
        if shards is not None:
            new = new[:, rank * width : (rank + 1) * width]
        x.index_copy_(0, self.rows, new)


# (all-gather along the last dim over the tensor-parallel group, this rank) when the FFN is sharded
_shards: tuple[Callable[[torch.Tensor], torch.Tensor], int] | None = None


def set_tensor_parallel(gather: Callable[[torch.Tensor], torch.Tensor] | None, rank: int = 0) -> None:
    """Declare the FFN coefficients sharded over ranks (vLLM's column-parallel gate/up projection:
    rank r holds the r-th contiguous slice of each row); `gather` concatenates every rank's [n, d/tp]
    into [n, d] in rank order. None: not sharded."""
    global _shards
    _shards = (gather, rank) if gather is not None else None


@dataclass
class StepContext:
    """What to steer in one forward step: `ffn_groups[layer]` lists the InfoSteer groups of a layer;
    `attention` holds the context-attention-steered requests, `mixing` the rows routed to tuned
    variants' weights (each None when there are none)."""

    ffn_groups: dict[int, list[_Group]] = field(default_factory=dict)
    num_steered_requests: int = 0
    attention: AttentionWork | None = None
    mixing: StepMixing | None = None


_current: StepContext | None = None


def current() -> StepContext | None:
    return _current


@contextlib.contextmanager
def use_step_context(ctx: StepContext | None):
    """Publish `ctx` for the duration of one forward pass (mutates this module's global)."""
    global _current
    prev, _current = _current, ctx
    try:
        yield
    finally:
        _current = prev


def build_step_context(
    entries: list[tuple[InfoSteerPlan, int, int]],
    device: torch.device | str,
    attention_entries: list[tuple[ContextAttentionPlan, int, int, int]] = (),
    mixing_entries: list[tuple[int, bool, bool, int, int, int]] = (),
    num_reqs: int = 0,
    num_tokens: int = -1,
) -> StepContext | None:
    """entries: (plan, start_row, end_row) per InfoSteer-steered request, rows of the flattened
    batch; attention_entries: (plan, batch_index, start_row, end_row) per context-attention-steered
    request (batch_index: the request's index in the step's attention metadata); mixing_entries:
    (variant, attention tuned, ffn tuned, batch_index, start_row, end_row) per request routed to a
    variant's weights, of the step's `num_reqs` requests and `num_tokens` token rows.

    Requests with the same layer set and mode share one group, so per-layer work is a handful of
    batched ops whatever the number of distinct configurations.
    """
    attention = AttentionWork.build(list(attention_entries), device) if attention_entries else None
    mixing = StepMixing.build(list(mixing_entries), num_reqs, device, num_tokens) if mixing_entries else None
    if not entries and attention is None and mixing is None:
        return None
    if not entries:
        steered = len(attention.requests) if attention is not None else 0
        return StepContext(num_steered_requests=steered, attention=attention, mixing=mixing)
    # (layers, mode) -> lists of row ranges and per-row parameters
    buckets: dict[tuple[tuple[int, ...], str], list[tuple[int, int, float, int]]] = {}
    for plan, start, end in entries:
        count = plan.k if plan.mode == "topk" else plan.m
        buckets.setdefault((plan.layers, plan.mode), []).append((start, end, plan.alpha, count))
    ctx = StepContext(num_steered_requests=len(entries), attention=attention, mixing=mixing)
    for (layers, mode), ranges in buckets.items():
        lengths = [end - start for start, end, _, _ in ranges]
        rows = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e, _, _ in ranges])
        alpha = torch.repeat_interleave(
            torch.tensor([a for _, _, a, _ in ranges], dtype=torch.float32), torch.tensor(lengths)
        )
        count = None
        count_max = 0
        if mode != "scale":
            counts = [c for _, _, _, c in ranges]
            count = torch.repeat_interleave(torch.tensor(counts, dtype=torch.long), torch.tensor(lengths))
            count = count.to(device, non_blocking=True)
            count_max = max(counts)
        alphas = {a for _, _, a, _ in ranges}
        contiguous = all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        group = _Group(
            mode=mode,
            rows=rows.to(device, non_blocking=True),
            alpha=alpha.to(device, non_blocking=True),
            count=count,
            count_max=count_max,
            span=(ranges[0][0], ranges[-1][1]) if contiguous else None,
            uniform_alpha=alphas.pop() if len(alphas) == 1 else None,
        )
        for layer in layers:
            ctx.ffn_groups.setdefault(layer, []).append(group)
    return ctx


def apply_ffn_steer_(x: torch.Tensor, layer: int) -> None:
    """Apply this step's InfoSteer groups for `layer` to x ([num_tokens, d_ffn]) in place."""
    ctx = _current
    if ctx is None:
        return
    for group in ctx.ffn_groups.get(layer, ()):
        group.apply_(x)


@torch.library.custom_op("steerserve::ffn_steer_", mutates_args=("x",))
def ffn_steer_(x: torch.Tensor, layer: int) -> None:
    """`apply_ffn_steer_` as a registered op, for compiled graphs."""
    apply_ffn_steer_(x, layer)


def ffn_steer(x: torch.Tensor, layer: int) -> None:
    """What steerable layers call: the registered op under torch.compile, else the plain function
    (same body, without the dispatcher's per-call cost on 30 layers x every eager step)."""
    if torch.compiler.is_compiling():
        ffn_steer_(x, layer)
    else:
        apply_ffn_steer_(x, layer)


@ffn_steer_.register_fake
def _(x: torch.Tensor, layer: int) -> None:
    return None
