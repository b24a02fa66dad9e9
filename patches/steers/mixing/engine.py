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

    @classmethod
    def build(cls, entries: list[tuple[MixingPlan, RequestRows]], num_reqs: int,
              device: torch.device | str, num_tokens: int = -1) -> StepMixing | None:
        """entries: (plan, rows) per request (those whose plan routes no rows are skipped);
        num_tokens: the step's token rows (-1: unknown, never whole)."""
        by_key: dict[tuple[str, int], list[tuple[int, int]]] = {}
        mix = cls(num_reqs=num_reqs, num_tokens=num_tokens)
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
    for variant, rows, span in state.mix.groups(module.steer_component):
        shadow = adapter.shadow_for(module, variant)
        if shadow is None:
            continue
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


class MixableLinearMixin:
    def forward(self, x):
        if self.steer_routed and (shadow := whole_shadow(self, x.shape[0])) is not None:
            return shadow(x)
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
        return adapter.whole_logits(model, hidden_states, state.route) if state.route is not None else None

    def edit_logits(self, state: MixingStep, model, hidden_states, logits):
        if state.route is not None:
            adapter.route_logits_(model, hidden_states, logits, state.route)
        return logits


ENGINE = MixingEngine()
