"""InfoSteer's graph-safe step data: persistent buffers of fixed capacity, filled in place before
each forward, and an FFN op that runs the same kernel sequence whatever they hold.

A captured CUDA graph (or a compiled graph) replays the kernels it recorded; a Python branch on
the step's steering is frozen at capture. So in graph mode the engine writes each step's steering
into tensors that live for the engine's lifetime (the pattern of vLLM's multi-LoRA punica buffers
and its own steering op) and the op reads only those:

- `row_slot[T]`: per token row, the slot of its request's configuration (0: unsteered);
- per slot (`S + 1` slots, slot 0 the identity): `mode` (0 none, 1 scale, 2 topk, 3 lift),
  `alpha` (float32), `count` (k or m), and `layer_on[L, S + 1]`;
- `sorted_rows[R]`: the token rows of top-k and lift requests (the modes that rank a row's
  coefficients), padded by repeating the first (identical writes), with R fixed.

The op: every row is multiplied by its factor (alpha for scale rows on this layer, exactly 1
elsewhere: bit-identical), then the R sorted rows are ranked with two stable sorts (descending
magnitude for top-k, ascending value for lift) and rewritten where their mode applies. Its cost is
fixed per step (one multiply over the batch, two sorts of R rows per layer), whatever the steering.
It equals the eager path (`engine.py`) bit for bit, up to how ties are broken when coefficients
share a magnitude (the stable sorts take the lowest index; `torch.topk`'s choice is unspecified).

Capacity: T token rows, S distinct configurations and R top-k/lift rows per step (from the
engine's `max_num_batched_tokens`, `max_num_seqs` and `--graph-sorted-rows`). `fill_` returns
False when a step does not fit; the engine then runs that step on the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = {"scale": 1, "topk": 2, "lift": 3}


@dataclass
class Capacity:
    tokens: int  # T: token rows per step
    slots: int  # S: distinct configurations per step
    sorted_rows: int  # R: top-k / lift token rows per step
    num_layers: int


class InfoSteerBuffers:
    """The persistent step buffers (on the engine's device), filled in place by `fill_`."""

    def __init__(self, cap: Capacity, device: torch.device | str = "cpu"):
        self.cap = cap
        s = cap.slots + 1
        self.row_slot = torch.zeros(cap.tokens, dtype=torch.long, device=device)
        self.mode = torch.zeros(s, dtype=torch.long, device=device)
        self.alpha = torch.ones(s, dtype=torch.float32, device=device)
        self.count = torch.zeros(s, dtype=torch.long, device=device)
        self.layer_on = torch.zeros(cap.num_layers, s, dtype=torch.bool, device=device)
        self.sorted_rows = torch.zeros(cap.sorted_rows, dtype=torch.long, device=device)
        self.sorted_count = 0  # host-side, for tests and logs
        self.shards = None  # (all-gather, rank) when the FFN is sharded over tensor-parallel ranks

    def fill_(self, entries) -> bool:
        """Write a step's InfoSteer steering: (InfoSteerPlan, RequestRows) per steered request
        (an empty list clears it). False, buffers untouched, when the step exceeds the capacity."""
        cap = self.cap
        slots: dict = {}
        row_slot = torch.zeros(cap.tokens, dtype=torch.long)
        sorted_rows: list[torch.Tensor] = []
        for plan, rows in entries:
            if rows.end <= rows.start:
                continue
            if rows.end > cap.tokens:
                return False
            slot = slots.setdefault(plan, len(slots) + 1)
            row_slot[rows.start : rows.end] = slot
            if plan.mode != "scale":
                sorted_rows.append(torch.arange(rows.start, rows.end, dtype=torch.long))
        if len(slots) > cap.slots:
            return False
        sorted_all = torch.cat(sorted_rows) if sorted_rows else torch.zeros(0, dtype=torch.long)
        if sorted_all.numel() > cap.sorted_rows:
            return False
        s = cap.slots + 1
        mode = torch.zeros(s, dtype=torch.long)
        alpha = torch.ones(s, dtype=torch.float32)
        count = torch.zeros(s, dtype=torch.long)
        layer_on = torch.zeros(cap.num_layers, s, dtype=torch.bool)
        for plan, slot in slots.items():
            mode[slot] = MODES[plan.mode]
            alpha[slot] = plan.alpha
            count[slot] = plan.k if plan.mode == "topk" else plan.m
            layer_on[list(plan.layers), slot] = True
        padded = torch.zeros(cap.sorted_rows, dtype=torch.long)
        if sorted_all.numel():
            padded[:] = sorted_all[0]
            padded[: sorted_all.numel()] = sorted_all
        for buf, host in ((self.row_slot, row_slot), (self.mode, mode), (self.alpha, alpha), (self.count, count),
                          (self.layer_on, layer_on), (self.sorted_rows, padded)):
            buf.copy_(host, non_blocking=True)
        self.sorted_count = int(sorted_all.numel())
        return True


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """rank[r, order[r, i]] = i."""
    ar = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def infosteer_fixed_(x: torch.Tensor, row_slot: torch.Tensor, mode: torch.Tensor, alpha: torch.Tensor,
                     count: torch.Tensor, layer_on: torch.Tensor, sorted_rows: torch.Tensor,
                     gather=None, rank: int = 0) -> None:
    """Apply the buffered steering to x ([n, d] FFN coefficients of one layer, n <= T) in place.
    `layer_on` is this layer's row of the table ([S + 1] bool). A fixed kernel sequence: no Python
    branch on the buffers' contents. `gather`/`rank`: the tensor-parallel all-gather and this rank
    when x holds one rank's slice of each row (the sorted rows' statistics are of whole rows)."""
    n = x.shape[0]
    slot = row_slot[:n]
    row_mode = torch.where(layer_on.index_select(0, slot), mode.index_select(0, slot), 0)
    row_alpha = alpha.index_select(0, slot)
    factor = torch.where(row_mode == MODES["scale"], row_alpha, torch.ones_like(row_alpha))
    x.copy_((x.float() * factor[:, None]).to(x.dtype))
    rows = sorted_rows.clamp(max=n - 1)
    sub = x.index_select(0, rows)
    width = sub.shape[-1]
    if gather is not None:
        sub = gather(sub)
    s_mode = row_mode.index_select(0, rows)
    s_alpha = row_alpha.index_select(0, rows)[:, None]
    s_count = count.index_select(0, slot.index_select(0, rows))[:, None]
    sf = sub.float()
    top_rank = _ranks(sf.abs().argsort(dim=-1, descending=True, stable=True))
    top = torch.where(top_rank < s_count, (sf * s_alpha).to(sub.dtype).float(), sf)
    low_rank = _ranks(sf.argsort(dim=-1, stable=True))
    target = (sf.mean(dim=-1, keepdim=True) * s_alpha).to(sub.dtype).float()
    lifted = torch.where(low_rank < s_count, target.expand_as(sf), sf)
    new = torch.where((s_mode == MODES["topk"])[:, None], top,
                      torch.where((s_mode == MODES["lift"])[:, None], lifted, sf)).to(x.dtype)
    if gather is not None:
        new = new[:, rank * width : (rank + 1) * width]
    x.index_copy_(0, rows, new)


def apply_buffers_(x: torch.Tensor, buffers: InfoSteerBuffers, layer: int, shards=None) -> None:
    gather, rank = shards if shards is not None else (None, 0)
    infosteer_fixed_(x, buffers.row_slot, buffers.mode, buffers.alpha, buffers.count, buffers.layer_on[layer],
                     buffers.sorted_rows, gather, rank)
