"""Context attention steering: PASTA-style emphasis of the user's context (docs/steering.md, "Context
attention"). Request side: the wire schema, the plan and its normalisation. The emphasised spans
are resolved on the rendered prompt (`spans.py` here, driven by `prepare_request` and `on_render`);
the engine pass is `engine.py` here (paged-KV readers: `kv.py`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..base import ModelInfo, Prepared, RenderedPrompt, ServingContext, Steer, SteerError, canonical_numbers, shown
from . import spans
from ..layers import MAX_LAYER_LIST, resolve_layers

# Defaults measured with `steerserve eval-context` on the embedded model (docs/steering.md, "Context
# attention: evaluation"): on all heads, alpha 0.7 already cost 4-5 points on SQuAD and DROP, 0.9
# did not; on a profiled head set, 0.7 stayed within noise of unsteered.
CONTEXT_ALPHA_HEAD_SET = 0.7
CONTEXT_ALPHA_ALL_HEADS = 0.9
MAX_HEAD_LIST = 4096  # cap on the length of a (layer, head) list
DEFAULT_HEAD_SET = "default"


class ContextAttentionSpec(BaseModel):
    """`steer.context_attention`: user-context attention steering (see docs/steering.md, "Context attention")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    alpha: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="attention to non-emphasised keys is scaled by alpha and renormalised; 1 = off; "
        f"default {CONTEXT_ALPHA_HEAD_SET} with a head set, {CONTEXT_ALPHA_ALL_HEADS} with explicit or all heads",
    )
    layers: Literal["all"] | list[int] = Field(
        "all", max_length=MAX_LAYER_LIST, description='"all" or 0-based decoder layer indices'
    )
    heads: Literal["all"] | list[list[int]] | str | None = Field(
        None, description='"all", [[layer, head], ...], or the name of a head set the server loaded; '
        "default: the server's default head set if it has one, else all"
    )
    emphasis: Literal["user", "last_user", "marked"] | None = Field(
        None, description='"user" (default on chat), "last_user" or "marked" (the only mode on /v1/completions)'
    )


@dataclass(frozen=True)
class ContextAttentionPlan:
    """User-context attention steering (PASTA-style) on chosen (layer, heads).

    For every query of the request on a steered head, attention to keys outside `spans` is scaled
    by alpha and renormalised: log(alpha) is added to those keys' attention logits. `spans` are
    [start, end) prompt token positions (resolved by the server from the rendered prompt);
    generated tokens are never emphasised. `heads` maps each steered layer to its global head
    indices: ((layer, (head, ...)), ...), sorted.
    """

    alpha: float
    heads: tuple[tuple[int, tuple[int, ...]], ...]
    emphasis: str
    spans: tuple[tuple[int, int], ...] = ()
    prompt_len: int = 0  # the prompt length the spans were resolved for (0 = not resolved yet)
    head_set: str | None = None  # the named head set the heads came from, for the echo

    def __post_init__(self) -> None:
        canonical_numbers(self)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.heads)

    @property
    def emphasised_tokens(self) -> int:
        return sum(end - start for start, end in self.spans)

    def echo(self) -> dict:
        out: dict = {
            "steer": "context_attention", "alpha": self.alpha, "emphasis": self.emphasis,
            "layers": list(self.layers), "heads": [[layer, list(hs)] for layer, hs in self.heads],
            "num_heads": sum(len(hs) for _, hs in self.heads),
            "emphasised_tokens": self.emphasised_tokens, "spans": [list(s) for s in self.spans],
        }
        if self.head_set is not None:
            out["head_set"] = self.head_set
        return out


def check_head_pairs(pairs: object, info: ModelInfo, field: str) -> tuple[tuple[int, int], ...]:
    """Validate a [[layer, head], ...] list against the model; returns sorted unique pairs."""
    if not isinstance(pairs, list) or len(pairs) > MAX_HEAD_LIST:
        raise SteerError(field, f"must be a list of at most {MAX_HEAD_LIST} [layer, head] pairs")
    out = set()
    for i, pair in enumerate(pairs):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise SteerError(f"{field}[{i}]", "must be a [layer, head] pair of integers")
        layer, head = pair
        if not 0 <= layer < info.num_layers:
            raise SteerError(f"{field}[{i}]", f"layer {layer} out of range; allowed 0..{info.num_layers - 1}")
        if not 0 <= head < info.num_heads:
            raise SteerError(f"{field}[{i}]", f"head {head} out of range; allowed 0..{info.num_heads - 1}")
        out.add((layer, head))
    return tuple(sorted(out))


class ContextAttention(Steer):
    name = "context_attention"
    engine = __name__ + ".engine"
    reference = __name__ + ".reference"
    Spec = ContextAttentionSpec
    Plan = ContextAttentionPlan
    summary = "user-context attention steering: scale attention to keys outside the emphasised spans by alpha"
    hints = {"alpha": "(allowed range (0, 1]; 1 means no steering)",
             "layers": 'must be "all" or a list of integer layer indices',
             "heads": 'must be "all", a list of [layer, head] pairs, or the name of a head set'}

    def build(self, alpha: float | None = None, layers="all", heads=None, emphasis: str | None = None) -> dict:
        """`None` leaves a field to the server's default (alpha by head set, the server's default
        head set, emphasis "user" on chat)."""
        heads = [list(p) for p in heads] if isinstance(heads, (list, tuple)) else heads
        return super().build(alpha=None if alpha is None else float(alpha), layers=layers, heads=heads,
                             emphasis=emphasis)

    def normalise(self, spec: ContextAttentionSpec, ctx: ServingContext) -> ContextAttentionPlan | None:
        field = "steer.context_attention"
        info, head_sets = ctx.info, ctx.head_sets
        if not info.attention_steerable:  # e.g. a quantized KV cache (the server's own check)
            from steerserve.patches.architectures import unsupported

            reason = info.attention_unsupported_reason or unsupported(info.architecture)
            raise SteerError(field, f"context-attention steering is unavailable: {reason}")
        emphasis = spec.emphasis
        if ctx.endpoint == "completions":
            if emphasis != "marked":
                raise SteerError(f"{field}.emphasis", '/v1/completions has no chat roles: set "marked" and wrap the '
                                 "emphasised text in <emphasis> ... </emphasis>")
        elif emphasis is None:
            emphasis = "user"
        layers = resolve_layers(spec.layers, info, f"{field}.layers")
        heads = spec.heads
        head_set = None
        if heads is None:
            heads = DEFAULT_HEAD_SET if DEFAULT_HEAD_SET in head_sets else "all"
        if heads == "all":
            pairs = tuple((layer, h) for layer in layers for h in range(info.num_heads))
        elif isinstance(heads, str):
            if heads not in head_sets:
                known = ", ".join(sorted(head_sets)) or "none (start the server with --head-set)"
                raise SteerError(f"{field}.heads", f"unknown head set {shown(heads)}; known head sets: {known}")
            head_set = heads
            pairs = tuple(sorted({tuple(p) for p in head_sets[heads] if p[0] in set(layers)}))
        else:
            pairs = tuple(p for p in check_head_pairs(heads, info, f"{field}.heads") if p[0] in set(layers))
        if not pairs:
            raise SteerError(f"{field}.heads", "no (layer, head) left to steer: the heads and layers do not intersect")
        alpha = spec.alpha
        if alpha is None:
            alpha = CONTEXT_ALPHA_HEAD_SET if head_set is not None else CONTEXT_ALPHA_ALL_HEADS
        if alpha == 1.0:
            return None
        by_layer: dict[int, list[int]] = {}
        for layer, h in pairs:
            by_layer.setdefault(layer, []).append(h)
        return ContextAttentionPlan(
            alpha=float(alpha), heads=tuple((layer, tuple(hs)) for layer, hs in sorted(by_layer.items())),
            emphasis=emphasis, head_set=head_set,
        )

    def prepare_request(self, request: Any, plan: ContextAttentionPlan, ctx: ServingContext) -> Prepared:
        """Strip emphasis markers off the request's text (mode "marked"; mutates `request.messages` /
        `request.prompt`); the pending state is the marked character ranges (chat: message index ->
        ranges of its content; completions: ranges of the prompt)."""
        if ctx.endpoint == "completions":
            prompt = request.prompt
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise SteerError("prompt", "context-attention steering on /v1/completions needs a single text prompt")
            try:
                clean, marked = spans.strip_markers(prompt, "prompt")
            except spans.SpanError as err:
                raise SteerError(err.field, err.message) from None
            if not marked:
                raise SteerError(spans.FIELD, f'"marked" needs text wrapped in {spans.MARK_OPEN} ... '
                                              f"{spans.MARK_CLOSE}; none found in the prompt")
            request.prompt = clean
            return Prepared(pending=marked)
        marked: dict = {}
        if plan.emphasis == "marked":
            try:
                stripped = spans.strip_message_markers(list(request.messages))
            except spans.SpanError as err:
                raise SteerError(err.field, err.message) from None
            if not stripped.marked:
                raise SteerError(spans.FIELD, f'"marked" needs text wrapped in {spans.MARK_OPEN} ... '
                                              f"{spans.MARK_CLOSE}; none found in the messages")
            request.messages = stripped.messages
            marked = stripped.marked
        return Prepared(pending=marked)

    async def on_render(self, plan: ContextAttentionPlan, marked: Any, prompt: RenderedPrompt) -> ContextAttentionPlan:
        """The emphasised token spans of the rendered prompt (docs/steering.md, "How spans are found")."""
        ids = prompt.token_ids
        try:
            if prompt.kind == "chat":
                if prompt.text is None:
                    raise spans.SpanError(spans.FIELD, "the rendered prompt text is unavailable")
                sentinel_text = await prompt.render_messages(spans.sentinel_messages(list(prompt.request.messages)))
                found = spans.rendered_chat_spans(plan.emphasis, prompt.tokenizer, prompt.text, sentinel_text,
                                                  prompt.conversation, marked, ids)
            else:
                found = spans.resolve(plan.emphasis, prompt.tokenizer, prompt.request.prompt, ids, marked)
        except spans.SpanError as err:
            raise SteerError(err.field, err.message) from None
        except ValueError as err:
            raise SteerError(spans.FIELD, str(err)) from None
        return replace(plan, spans=found, prompt_len=len(ids))

    def plan_from_json(self, body: dict) -> ContextAttentionPlan:
        return ContextAttentionPlan(**{
            **body,
            "heads": tuple((int(layer), tuple(hs)) for layer, hs in body["heads"]),
            "spans": tuple((int(a), int(b)) for a, b in body["spans"]),
        })


STEER = ContextAttention()
