"""TAIA mixing's graph-safe step data: per component and variant, a fixed-capacity list of the token
rows routed to the variant's weights, filled in place before each forward, and a routing op that
runs the same kernels whatever the lists hold (see `patches/steers/infosteer/graph.py` for why).

- `rows[c, v, R]` (long) and `valid[c, v, R]` (bool) for component c ("attention", "ffn") and
  variant v: the routed rows, padded by repeating the first (valid too: the same input gives the
  same output, so duplicate writes agree), or row 0 marked invalid when none.

At a routed site every step, for each variant with a shadow there: its shadow runs on the R rows
and the valid ones are overwritten; invalid ones are written back unchanged. The cost is fixed:
each shadow on R rows per site per step (in decode, a linear layer on R rows reads its weights
once, about the cost of the module itself). The LM head is routed in `compute_logits`, outside
vLLM's captured graphs, from the step's eager state.

Capacity: R routed token rows per component and variant (`graph_mixed_rows`, default 64). A step
with more (a long prompt's prefill) runs on the eager path (`fill_` returns False).
"""

from __future__ import annotations

import torch

COMPONENT_INDEX = {"attention": 0, "ffn": 1}


class MixingBuffers:
    def __init__(self, num_variants: int, capacity: int, device: torch.device | str = "cpu"):
        self.num_variants, self.capacity = num_variants, capacity
        self.rows = torch.zeros(2, num_variants, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(2, num_variants, capacity, dtype=torch.bool, device=device)

    def fill_(self, entries) -> bool:
        """(MixingPlan, RequestRows) per request carrying a mixing plan (those that route no rows
        are skipped); an empty list clears. False, buffers untouched, over capacity."""
        lists: dict[tuple[int, int], list[torch.Tensor]] = {}
        for plan, rows in entries:
            if not plan.routes or rows.end <= rows.start:
                continue
            if not 0 <= plan.index < self.num_variants:
                return False
            span = torch.arange(rows.start, rows.end, dtype=torch.long)
            for component, choice in (("attention", plan.attention), ("ffn", plan.ffn)):
                if choice == "tuned":
                    lists.setdefault((COMPONENT_INDEX[component], plan.index), []).append(span)
        rows = torch.zeros(2, self.num_variants, self.capacity, dtype=torch.long)
        valid = torch.zeros(2, self.num_variants, self.capacity, dtype=torch.bool)
        for (c, v), spans in lists.items():
            found = torch.cat(spans)
            if found.numel() > self.capacity:
                return False
            rows[c, v] = found[0]
            rows[c, v, : found.numel()] = found
            valid[c, v] = True
        self.rows.copy_(rows, non_blocking=True)
        self.valid.copy_(valid, non_blocking=True)
        return True


def route_fixed_(out: torch.Tensor, x: torch.Tensor, shadows: list, rows: torch.Tensor, valid: torch.Tensor) -> None:
    """At one site: for each variant v with a shadow (`shadows[v]`, None when the variant's
    weights equal the base's here), out[rows[v]] = shadow(x[rows[v]]) where `valid[v]`.
    `rows`, `valid`: this site's component, [V, R]. A fixed kernel sequence."""
    n = out.shape[0]
    for v, shadow in enumerate(shadows):
        if shadow is None:
            continue
        r = rows[v].clamp(max=n - 1)
        new = shadow(x.index_select(0, r))
        if isinstance(new, tuple):
            new = new[0]
        old = out.index_select(0, r)
        out.index_copy_(0, r, torch.where(valid[v][:, None], new.to(out.dtype), old))
