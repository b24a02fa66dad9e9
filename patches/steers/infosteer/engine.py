"""InfoSteer's engine: per step, the steered requests' token rows grouped by (layer set, mode), and
the FFN-coefficients hook that rewrites those rows on each layer (the formulas are `formulas.py`).

Requests with the same layer set and mode share one group, so per-layer work is a handful of
batched ops whatever the number of distinct configurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import RequestRows, SteerEngine, StepHandle, StepShape
from . import InfoSteerPlan
from . import formulas, graph


@dataclass
class Group:
    """Rows of one InfoSteer mode on one layer set, with per-row parameters (all on the device)."""

    mode: str
    rows: torch.Tensor  # [n] int64 token rows of the step's flattened batch
    alpha: torch.Tensor  # [n] float32
    count: torch.Tensor | None  # [n] int64: k (topk) or m (lift)
    count_max: int
    span: tuple[int, int] | None = None  # (start, end) when rows are one contiguous range
    uniform_alpha: float | None = None  # when every row has the same alpha

    def apply_(self, x: torch.Tensor, shards: tuple[Callable[[torch.Tensor], torch.Tensor], int] | None = None) -> None:
        """Rewrite x[rows] in place (x: [num_tokens, d_ffn]). `shards`: (all-gather over the
        tensor-parallel group along the last dim, this rank) when x holds one rank's slice."""
        if self.mode == "scale":
            # In-place multiply with float32 factors: computed in float32 and rounded once to x's
            # dtype, exactly as formulas.scale_rows does; one kernel on a contiguous span.
            factor = self.uniform_alpha if self.uniform_alpha is not None else self.alpha[:, None]
            if self.span is not None:
                x[self.span[0] : self.span[1]].mul_(factor)
            else:
                x.index_copy_(0, self.rows, x.index_select(0, self.rows).mul_(factor))
            return
        sub = x.index_select(0, self.rows)
        if shards is not None:
            # Tensor parallel: x holds this rank's slice of each row's coefficients, but top-k and
            # the lift's bottom-m and mean are statistics of the whole row. Gather the steered rows
            # (every rank runs the same groups in the same order), steer them whole, keep our slice.
            gather, rank = shards
            width = sub.shape[-1]
            sub = gather(sub)
        if self.mode == "topk":
            new = formulas.topk_rows(sub, self.alpha, self.count, self.count_max)
        else:
            new = formulas.lift_rows(sub, self.alpha, self.count, self.count_max)
        if shards is not None:
            new = new[:, rank * width : (rank + 1) * width]
        x.index_copy_(0, self.rows, new)


@dataclass
class InfoSteerStep:
    """One step's InfoSteer work: `groups[layer]` lists the groups of a layer."""

    groups: dict[int, list[Group]] = field(default_factory=dict)
    num_requests: int = 0
    shards: tuple[Callable[[torch.Tensor], torch.Tensor], int] | None = None


def build_groups(entries: list[tuple[InfoSteerPlan, RequestRows]], device: torch.device | str,
                 shards=None) -> InfoSteerStep | None:
    """entries: (plan, rows) per InfoSteer-steered request (rows of the flattened batch)."""
    buckets: dict[tuple[tuple[int, ...], str], list[tuple[int, int, float, int]]] = {}
    for plan, rows in entries:
        if rows.end <= rows.start:
            continue
        count = plan.k if plan.mode == "topk" else plan.m
        buckets.setdefault((plan.layers, plan.mode), []).append((rows.start, rows.end, plan.alpha, count))
    if not buckets:
        return None
    step = InfoSteerStep(num_requests=sum(len(r) for r in buckets.values()), shards=shards)
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
        group = Group(
            mode=mode,
            rows=rows.to(device, non_blocking=True),
            alpha=alpha.to(device, non_blocking=True),
            count=count,
            count_max=count_max,
            span=(ranges[0][0], ranges[-1][1]) if contiguous else None,
            uniform_alpha=alphas.pop() if len(alphas) == 1 else None,
        )
        for layer in layers:
            step.groups.setdefault(layer, []).append(group)
    return step


DEFAULT_GRAPH_SORTED_ROWS = 64  # top-k / lift token rows per step in graph mode


class InfoSteerEngine(SteerEngine):
    name = "infosteer"
    settings_keys = ("graph_sorted_rows",)

    def make_buffers(self, model, handle: StepHandle) -> graph.InfoSteerBuffers:
        config = model.steer_vllm_config
        sched = config.scheduler_config
        cap = graph.Capacity(
            tokens=int(sched.max_num_batched_tokens), slots=int(sched.max_num_seqs),
            sorted_rows=int(handle.settings.get("graph_sorted_rows", DEFAULT_GRAPH_SORTED_ROWS)),
            num_layers=int(config.model_config.hf_text_config.num_hidden_layers),
        )
        device = next(model.parameters()).device
        buffers = graph.InfoSteerBuffers(cap, device)
        buffers.shards = handle.shards  # set by the FFN hook point (tensor parallelism) before install
        return buffers

    def ffn_fixed_(self, buffers: graph.InfoSteerBuffers, x: torch.Tensor, layer: int) -> None:
        graph.apply_buffers_(x, buffers, layer, buffers.shards)

    def build_step(self, entries, shape: StepShape, handle: StepHandle) -> InfoSteerStep | None:
        if self.name in handle.buffer_served:
            return None  # graph mode: the fixed op reads this step from the buffers
        return build_groups(entries, shape.device, handle.shards)

    def ffn_(self, state: InfoSteerStep, x: torch.Tensor, layer: int) -> None:
        for group in state.groups.get(layer, ()):
            group.apply_(x, state.shards)


ENGINE = InfoSteerEngine()
