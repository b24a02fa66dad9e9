"""TAIA parameter mixing for fully fine-tuned variants: per-row weight routing inside one engine.

The engine serves the base model and holds, for each fully fine-tuned variant, the variant's
weights of every module that differs from the base. A request asks for one variant and, per
component, the tuned or the base weights (`steer.mixing`; TAIA = tuned attention + base FFN):

- component `attention`: the input embeddings, every decoder layer's norms and q/k/v/o
  projections, the final norm and the LM head (TAIA keeps all of these tuned);
- component `ffn`: every decoder layer's MLP projections.

In an eager mixed step each routed linear module ("site": q/k/v/o, gate/up, down) splits the step's
rows into groups, one per set of weights (`row_segments`, made once per step): the rows of requests
that use a variant's weights for the site's component are computed by a *shadow* of the module that
holds the variant's weights (same class, same kernels, weights loaded by vLLM's own weight loaders,
so tensor-parallel sharding is vLLM's), the rest by the module itself, each row once: a mixed step
does the linear work of one plain step (plus reading the variant's weights). Norms and embeddings
(elementwise, cheap) run on every row and the routed rows are overwritten by the shadow's result;
so do all sites in graph mode and under torch.compile, where shapes must stay fixed. The LM head is
split like the linear sites, in `compute_logits`. Sites whose variant weights equal the base's (e.g.
the FFN of a TAIA export) have no shadow and cost nothing.

This module: the per-step routing (`StepMixing`), the routing op the sites call, the logits route
and the engine; the vLLM-specific parts (which modules are sites, loading weights, shadows, the LM
head) are `adapter/mixing.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...adapter import mixing as adapter
from ..engine import HANDLES, RequestRows, SteerEngine, StepHandle, StepShape, slice_offset
from . import VARIANTS_SETTING, MixingPlan, graph

COMPONENTS = ("attention", "ffn")


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
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    device: torch.device | str = "cpu"
    _segments: dict = field(default_factory=dict)  # (component, variants) -> segments, made on first use

    @classmethod
    def build(cls, entries: list[tuple[MixingPlan, RequestRows]], num_reqs: int,
              device: torch.device | str, num_tokens: int = -1) -> StepMixing | None:
        """entries: (plan, rows) per request (those whose plan routes no rows are skipped);
        num_tokens: the step's token rows (-1: unknown, never whole)."""
        by_key: dict[tuple[str, int], list[tuple[int, int]]] = {}
        mix = cls(num_reqs=num_reqs, num_tokens=num_tokens, ranges=by_key, device=device)
        for plan, (index, start, end, *_) in entries:
            if not plan.routes or end <= start:
                continue
            variant, attention, ffn = plan.index, plan.attention == "tuned", plan.ffn == "tuned"
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
            mix.rows[key], mix.spans[key] = rows_and_span(ranges, device)
            if mix.spans[key] == (0, num_tokens):
                mix.whole[key[0]] = key[1]
        return mix

    def variants(self, component: str) -> list[int]:
        """The variants this step routes rows of `component` to."""
        return [variant for (comp, variant) in self.rows if comp == component]

    def segments(self, component: str, variants: tuple[int, ...]) -> list[tuple[int | None, torch.Tensor, tuple]]:
        """Every token row of the step in exactly one group, for a site of `component` where
        `variants` have weights of their own: (variant, rows, contiguous span or None) per variant,
        and (None, ...) for the rows the base weights compute (the rest; absent when none)."""
        key = (component, variants)
        found = self._segments.get(key)
        if found is None:
            taken = sorted(r for v in variants for r in self.ranges.get((component, v), ()))
            free, at = [], 0
            for start, end in taken:
                if start > at:
                    free.append((at, start))
                at = max(at, end)
            if at < self.num_tokens:
                free.append((at, self.num_tokens))
            found = [(None, *rows_and_span(free, self.device))] if free else []
            found += [(v, self.rows[(component, v)], self.spans[(component, v)]) for v in variants
                      if (component, v) in self.rows]
            self._segments[key] = found
        return found

    def whole_variant(self, component: str, num_rows: int) -> int | None:
        """The variant that owns every one of the `num_rows` rows a site sees, if one does."""
        variant = self.whole.get(component)
        return variant if variant is not None and num_rows == self.num_tokens else None

    def groups(self, component: str):
        """(variant, rows tensor, contiguous span or None) for the component's routed rows."""
        for (comp, variant), rows in self.rows.items():
            if comp == component:
                yield variant, rows, self.spans[(comp, variant)]


def rows_and_span(ranges: list[tuple[int, int]], device) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Sorted, disjoint [start, end) ranges -> (their rows as a long tensor on `device`, the span
    (first, last + 1) when they are contiguous, else None)."""
    contiguous = all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    rows = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in ranges]).to(device)
    return rows, ((ranges[0][0], ranges[-1][1]) if contiguous else None)


def overwrite_rows_(out: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None, new: torch.Tensor) -> None:
    if span is not None:
        out[span[0] : span[1]] = new
    else:
        out.index_copy_(0, rows, new if new.dtype == out.dtype else new.to(out.dtype))


def select_rows(x: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    return x[span[0] : span[1]] if span is not None else x.index_select(0, rows)


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


# --------------------------------------------------------------------------- routing at the sites


def _mixing_state(module: torch.nn.Module) -> MixingStep | None:
    step = module.steer_handle.step
    return step.state("mixing") if step is not None else None


def _route_rows_(out: torch.Tensor, x: torch.Tensor, module: torch.nn.Module) -> None:
    """Overwrite the rows of `out` that this step routes to a variant at the site `module`,
    computed by the site's shadow for that variant from `x` (the site's input, or for a norm with a
    residual the pre-norm sum): from the graph-safe buffers every step in graph mode, else (and for
    steps over their capacity) from the step's state."""
    buffers = module.steer_handle.buffers.get("mixing")
    if buffers is not None:
        shadows = module.__dict__.get("steer_shadow_list")
        if shadows is None:
            shadows = [adapter.shadow_for(module, v) for v in range(buffers.num_variants)]
            module.steer_shadow_list = shadows
        c = graph.COMPONENT_INDEX[module.steer_component]
        graph.route_fixed_(out, x, shadows, buffers.rows[c], buffers.valid[c])
    state = _mixing_state(module)
    if state is None or state.by_buffers:
        return
    cached = module.__dict__.get("steer_routes")
    if cached is None or cached[0] is not state.mix:  # made at this site's first call of the step
        routes = [(adapter.shadow_for(module, variant), rows, span)
                  for variant, rows, span in state.mix.groups(module.steer_component)]
        cached = module.__dict__["steer_routes"] = (state.mix, [r for r in routes if r[0] is not None])
    for shadow, rows, span in cached[1]:
        new = shadow(select_rows(x, rows, span))
        if isinstance(new, tuple):
            new = new[0]
        overwrite_rows_(out, rows, span, new)


@torch.library.custom_op("steerserve::route_rows_", mutates_args=("out",))
def route_rows_op_(out: torch.Tensor, x: torch.Tensor, handle: int, site: int) -> None:
    """`_route_rows_` as a registered op, for compiled graphs."""
    _route_rows_(out, x, HANDLES[handle].modules[site])


@route_rows_op_.register_fake
def _(out: torch.Tensor, x: torch.Tensor, handle: int, site: int) -> None:
    return None


def route_rows_(out: torch.Tensor, x: torch.Tensor, module: torch.nn.Module) -> None:
    if torch.compiler.is_compiling():
        route_rows_op_(out, x, module.steer_handle.index, module.steer_site)
    elif module.steer_handle.step is not None or module.steer_handle.graph_safe:
        _route_rows_(out, x, module)


def whole_shadow(module: torch.nn.Module, num_rows: int) -> torch.nn.Module | None:
    """Eager steps where one variant owns every row of this site's component: its shadow, which
    then runs alone (nothing to overwrite: no unmixed row exists). None otherwise, and always under
    torch.compile (there the registered op overwrites after the plain forward)."""
    if torch.compiler.is_compiling() or module.steer_handle.graph_safe:
        return None  # graph mode: every site runs its fixed routing
    state = _mixing_state(module)
    if state is None:
        return None
    variant = state.mix.whole_variant(module.steer_component, num_rows)
    return adapter.shadow_for(module, variant) if variant is not None else None


def row_segments(module: torch.nn.Module, num_rows: int) -> list | None:
    """Eager steps that route rows at this linear site: every row in one group, each with the module
    that computes it ((module or shadow, rows, span); the base group's module is None), so a mixed
    step does the linear work of one plain step. None: no routed rows here, or graph mode and
    torch.compile (there the registered op overwrites after the plain forward, at fixed shapes)."""
    if torch.compiler.is_compiling() or module.steer_handle.graph_safe:
        return None
    state = _mixing_state(module)
    if state is None or state.by_buffers or num_rows != state.mix.num_tokens:
        return None
    cached = module.__dict__.get("steer_segments")
    if cached is not None and cached[0] is state.mix:  # this step's, made at this site's first call
        return cached[1]
    variants = tuple(v for v in state.mix.variants(module.steer_component) if adapter.shadow_for(module, v) is not None)
    segments = [(None if v is None else adapter.shadow_for(module, v), rows, span)
                for v, rows, span in state.mix.segments(module.steer_component, variants)] if variants else None
    module.__dict__["steer_segments"] = (state.mix, segments)  # not nn.Module.__setattr__: per step, per site
    return segments


def segmented_forward(x: torch.Tensor, segments: list, base_forward):
    """A linear site's output with each row group computed by its own weights (`base_forward` for
    the base group): the result's structure (out, or (out, bias)) is the first group's."""
    if len(segments) == 1:  # one owner of every row: nothing to split or assemble
        shadow = segments[0][0]
        return base_forward(x) if shadow is None else shadow(x)
    out = rest = None
    for shadow, rows, span in segments:
        part = select_rows(x, rows, span)
        result = base_forward(part) if shadow is None else shadow(part)
        new = result[0] if isinstance(result, tuple) else result
        if out is None:
            out = new.new_empty((x.shape[0], *new.shape[1:]))
            rest = result[1:] if isinstance(result, tuple) else None
        overwrite_rows_(out, rows, span, new)
    return out if rest is None else (out, *rest)


class MixableLinearMixin:
    def forward(self, x):
        if self.steer_routed and (segments := row_segments(self, x.shape[0])) is not None:
            return segmented_forward(x, segments, super().forward)
        result = super().forward(x)
        if self.steer_routed:
            route_rows_(result[0] if isinstance(result, tuple) else result, x, self)
        return result


class MixableNormMixin:
    def forward(self, x, residual=None):
        if not self.steer_routed:
            return super().forward(x, residual)
        if (shadow := whole_shadow(self, x.shape[0])) is not None:
            return shadow(x) if residual is None else shadow(x, residual)
        if residual is None:
            out = super().forward(x)
            route_rows_(out, x, self)
            return out
        out, summed = super().forward(x, residual)
        route_rows_(out, summed, self)  # the shadow normalises the pre-norm sum
        return out, summed


class MixableEmbeddingMixin:
    def forward(self, input_):
        if self.steer_routed and (shadow := whole_shadow(self, input_.shape[0])) is not None:
            return shadow(input_)
        out = super().forward(input_)
        if self.steer_routed:
            route_rows_(out, input_, self)
        return out


DEFAULT_GRAPH_MIXED_ROWS = 64  # routed token rows per component and variant per step in graph mode

MIXINS = {"linear": MixableLinearMixin, "norm": MixableNormMixin, "embedding": MixableEmbeddingMixin}


# --------------------------------------------------------------------------- the engine


@dataclass
class MixingStep:
    """A step's mixing: the routing, and after the forward the logits route."""

    mix: StepMixing
    route: LogitsRoute | None = None
    by_buffers: bool = False  # the sites were routed from the graph-safe buffers this step


class MixingEngine(SteerEngine):
    name = "mixing"
    settings_keys = (VARIANTS_SETTING, "graph_mixed_rows")

    def load_weights(self, model, handle: StepHandle, load) -> set[str]:
        variants = handle.settings.get(VARIANTS_SETTING) or []
        if variants:
            for module in adapter.load_variant_weights(model, load, variants, MIXINS):
                module.steer_handle = handle
                module.steer_site = len(handle.modules)
                handle.modules.append(module)
        return set()

    def make_buffers(self, model, handle: StepHandle) -> graph.MixingBuffers | None:
        variants = handle.settings.get(VARIANTS_SETTING) or []
        if not variants:
            return None
        capacity = int(handle.settings.get("graph_mixed_rows", DEFAULT_GRAPH_MIXED_ROWS))
        return graph.MixingBuffers(len(variants), capacity, next(model.parameters()).device)

    def build_step(self, entries, shape: StepShape, handle: StepHandle) -> MixingStep | None:
        # in graph mode the sites read the buffers; the step's state still routes the LM head
        mix = StepMixing.build(entries, shape.num_reqs, shape.device, shape.num_tokens)
        return MixingStep(mix, by_buffers=self.name in handle.buffer_served) if mix is not None else None

    def after_forward(self, state: MixingStep, model, out, input_ids, positions) -> MixingStep:
        # compute_logits runs after the forward: it routes the LM head by this step's rows
        return MixingStep(state.mix, LogitsRoute(out, state.mix), state.by_buffers)

    def replace_logits(self, state: MixingStep, model, hidden_states):
        # each row's logits from its own LM head, computed once (None: no row routed to a head of
        # its own, or rows that match neither the step's requests nor its hidden states, logged)
        return adapter.segmented_logits(model, hidden_states, state.route) if state.route is not None else None


ENGINE = MixingEngine()
