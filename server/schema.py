"""The `steer` request object: wire schema (pydantic) and its normalisation into a `SteerPlan`.

This is the one definition of the public steering contract; the server validates with it and the
Python client (`steerserve.clients.steer`) builds requests with it. Validation happens in two
stages, both reported as HTTP 400 naming the field and the allowed values:
1. shape and ranges that hold for every model (`SteerSpec.model_validate`);
2. ranges that depend on the served model (layer indices, FFN width) in `normalise`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steerserve.patches.infosteer import lift_count
from steerserve.patches.plan import ContextAttentionPlan, InfoSteerPlan, SteerPlan

from .limits import ECHO_CAP, shown

ALPHA_MIN, ALPHA_MAX = 0.0, 10.0
MAX_LAYER_LIST = 1024  # cap on the length of a layer list, duplicates included


class InfoSteerSpec(BaseModel):
    """`steer.infosteer`: FFN memory amplification (see README, "InfoSteer formulas")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    layers: Literal["all"] | list[int] = Field(
        "all", max_length=MAX_LAYER_LIST, description='"all" or 0-based decoder layer indices'
    )
    mode: Literal["scale", "topk", "lift"] = "scale"
    alpha: float = Field(1.0, ge=ALPHA_MIN, le=ALPHA_MAX, allow_inf_nan=False)
    k: int | None = Field(None, description="topk only: coefficients amplified per token, 1..FFN width")
    p: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False, description="lift only: fraction lifted per token (default 0.01)"
    )


# Defaults measured with `steerserve eval-context` on the embedded model (README, "Context
# attention: evaluation"): on all heads, alpha 0.7 already cost 4-5 points on SQuAD and DROP, 0.9
# did not; on a profiled head set, 0.7 stayed within noise of unsteered.
CONTEXT_ALPHA_HEAD_SET = 0.7
CONTEXT_ALPHA_ALL_HEADS = 0.9
MAX_HEAD_LIST = 4096  # cap on the length of a (layer, head) list


class ContextAttentionSpec(BaseModel):
    """`steer.context_attention`: user-context attention steering (see README, "Context attention")."""

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


class SteerSpec(BaseModel):
    """The `steer` object of a request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    profile: str | None = Field(None, description="name of a server-side profile; the other fields override it")
    experiment: str | None = Field(None, description="name of a server-side A/B experiment (alone)")
    infosteer: InfoSteerSpec | None = None
    context_attention: ContextAttentionSpec | None = None
    # any JSON value here: its shape is checked by `family.Family.resolve`, which names the field
    mixing: Any = Field(
        None, description='TAIA parameter mixing with a tuned variant: "taia", "tuned", "base", "ffn-only" or '
        '{"variant": name, "attention": "tuned"|"base", "ffn": "tuned"|"base"} (see README, "Model families")')
    context_indicator: bool | None = Field(
        None, description="append the context-dependency indicator the model was trained with to every user "
        "message (chat only; 400 for models trained without one)")
    # any JSON value here: its shape is checked by `family.Family.resolve_proxy`, which names the field
    proxy: Any = Field(
        None, description='proxy tuning {"pair": name, "alpha": number in [-10, 10], default 1}: next-token '
        "logits = base + alpha * (expert - anti_expert) with a pair the server loaded (see README, \"Proxy tuning\")")


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    architecture: str
    num_layers: int
    ffn_width: int
    ffn_steerable: bool
    tensor_parallel_size: int = 1
    num_heads: int = 0  # attention heads per layer (global, all ranks)
    attention_steerable: bool = False
    attention_unsupported_reason: str = ""

    @classmethod
    def from_checkpoint(cls, model_dir, steerable: bool | None = None) -> ModelInfo:
        """Read from a checkpoint's config.json (steerable: whether the plugin has its architecture)."""
        import json
        from pathlib import Path

        from steerserve.patches import STEERABLE_ARCHITECTURES

        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        arch = (cfg.get("architectures") or ["unknown"])[0]
        text = cfg if "num_hidden_layers" in cfg else cfg.get("text_config", {})
        if steerable is None:
            steerable = arch in STEERABLE_ARCHITECTURES or arch in STEERABLE_ARCHITECTURES.values()
        return cls.from_config(arch, text, steerable)

    @classmethod
    def from_config(cls, arch: str, text: dict, steerable: bool, tensor_parallel_size: int = 1) -> ModelInfo:
        """From a (text) model config as a dict."""
        reason = ""
        if not steerable:
            reason = f"the served model ({arch}) has no steering support; supported: Llama and Qwen2 architectures"
        elif text.get("use_sliding_window") or (text.get("sliding_window") and "use_sliding_window" not in text):
            reason = "the served model uses sliding-window attention"
        return cls(
            arch, int(text.get("num_hidden_layers", 0)), int(text.get("intermediate_size") or 0), steerable,
            tensor_parallel_size, int(text.get("num_attention_heads") or 0), steerable and not reason, reason,
        )


class SteerError(ValueError):
    """A bad `steer` value; `field` is the dotted path from the request body."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_ALLOWED = {
    "steer": sorted(SteerSpec.model_fields),
    "steer.infosteer": sorted(InfoSteerSpec.model_fields),
    "steer.context_attention": sorted(ContextAttentionSpec.model_fields),
}


def _from_validation_error(err: ValidationError) -> SteerError:
    first = err.errors()[0]
    parts: list[str] = ["steer"]
    in_union = False
    for part in first["loc"]:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif part.isidentifier():
            parts.append(part if len(part) <= ECHO_CAP else f"{part[:ECHO_CAP]}...")  # a key of any size: cut
        else:  # a union member's tag, such as "literal['all']" or "list[int]"
            in_union = True
            break
    loc = ".".join(parts)
    msg = first["msg"]
    if in_union and loc.endswith(".layers"):
        msg = 'must be "all" or a list of integer layer indices'
    elif in_union and loc == "steer.context_attention.heads":
        msg = 'must be "all", a list of [layer, head] pairs, or the name of a head set'
    elif loc == "steer.context_attention.alpha":
        msg = f"{msg} (allowed range (0, 1]; 1 means no steering)"
    elif first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be an object"
    elif first["type"] == "extra_forbidden":
        parent = loc.rsplit(".", 1)[0]
        msg = f"unknown key; allowed keys: {', '.join(_ALLOWED.get(parent, []))}"
    elif loc == "steer.infosteer.alpha":
        msg = f"{msg} (allowed range [{ALPHA_MIN}, {ALPHA_MAX}])"
    elif loc == "steer.infosteer.p":
        msg = f"{msg} (allowed range (0, 1])"
    return SteerError(loc, msg)


def without_nulls(value: object) -> object:
    """`value` with every null member of an object dropped, at any depth: in the `steer` object a
    null means "the field's default" (the schema marks fields nullable)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def parse_spec(raw: object) -> SteerSpec:
    """Validate the raw JSON value of `steer` (None or {} means no steering; a null field means
    its default)."""
    if raw is None:
        return SteerSpec()
    if not isinstance(raw, dict):
        raise SteerError("steer", f"must be an object, got {type(raw).__name__}")
    try:
        return SteerSpec.model_validate(without_nulls(raw))
    except ValidationError as err:
        raise _from_validation_error(err) from None


def _resolve_layers(layers: str | list[int], info: ModelInfo, field: str = "steer.infosteer.layers") -> tuple[int, ...]:
    if layers == "all":
        return tuple(range(info.num_layers))
    for i, layer in enumerate(layers):
        if not 0 <= layer < info.num_layers:
            raise SteerError(
                f"{field}[{i}]",
                f"layer {layer} out of range; allowed 0..{info.num_layers - 1} for this model",
            )
    return tuple(sorted(set(layers)))


def _normalise_infosteer(spec: InfoSteerSpec, info: ModelInfo) -> InfoSteerPlan | None:
    field = "steer.infosteer"
    if not info.ffn_steerable:
        raise SteerError(
            field, f"the served model ({info.architecture}) has no FFN steering support; "
            "supported: Llama and Qwen2 architectures"
        )
    if spec.mode != "topk" and spec.k is not None:
        raise SteerError(f"{field}.k", f'only applies to mode "topk" (mode is "{spec.mode}")')
    if spec.mode != "lift" and spec.p is not None:
        raise SteerError(f"{field}.p", f'only applies to mode "lift" (mode is "{spec.mode}")')
    layers = _resolve_layers(spec.layers, info)
    k = m = 0
    p = 0.0
    if spec.mode == "topk":
        if spec.k is None:
            raise SteerError(f"{field}.k", f'required for mode "topk"; allowed 1..{info.ffn_width}')
        if not 1 <= spec.k <= info.ffn_width:
            raise SteerError(f"{field}.k", f"{spec.k} out of range; allowed 1..{info.ffn_width} (the FFN width)")
        k = spec.k
    if spec.mode == "lift":
        p = 0.01 if spec.p is None else spec.p
        m = lift_count(p, info.ffn_width)
        if m < 1:
            raise SteerError(
                f"{field}.p", f"{p} lifts no coefficient of an FFN of width {info.ffn_width}; "
                f"allowed range [{1 / info.ffn_width:.6g}, 1]"
            )
    neutral = not layers or (spec.mode in ("scale", "topk") and spec.alpha == 1.0)
    if neutral:
        return None
    return InfoSteerPlan(layers=layers, mode=spec.mode, alpha=float(spec.alpha), k=k, m=m, p=p)


def resolve_profile(raw: object, profiles: dict[str, dict]) -> tuple[object, str | None]:
    """Expand `steer.profile`: the profile's steer object, with the request's other fields on top
    (per steer key: fields merged, the request's winning; a steer key set to null removes the
    profile's steer). Returns (steer object without `profile`, profile name or None)."""
    if not isinstance(raw, dict) or raw.get("profile") is None:
        return ({k: v for k, v in raw.items() if k != "profile"} if isinstance(raw, dict) else raw), None
    name = raw["profile"]
    if not isinstance(name, str):
        raise SteerError("steer.profile", f"must be a string naming a profile, got {type(name).__name__}")
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none (start the server with --config)"
        raise SteerError("steer.profile", f"unknown profile {shown(name)}; known profiles: {known}")
    merged = dict(profiles[name])
    for key, value in raw.items():
        if key == "profile":
            continue
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged, name


DEFAULT_HEAD_SET = "default"


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


def _normalise_context(spec: ContextAttentionSpec, info: ModelInfo, head_sets: dict,
                       endpoint: str) -> ContextAttentionPlan | None:
    field = "steer.context_attention"
    if not info.attention_steerable:
        reason = info.attention_unsupported_reason or (
            f"the served model ({info.architecture}) has no steering support; supported: Llama and Qwen2 architectures")
        raise SteerError(field, f"context-attention steering is unavailable: {reason}")
    emphasis = spec.emphasis
    if endpoint == "completions":
        if emphasis != "marked":
            raise SteerError(f"{field}.emphasis", '/v1/completions has no chat roles: set "marked" and wrap the '
                             "emphasised text in <emphasis> ... </emphasis>")
    elif emphasis is None:
        emphasis = "user"
    layers = _resolve_layers(spec.layers, info, f"{field}.layers")
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


def normalise(raw: object, info: ModelInfo, head_sets: dict | None = None, endpoint: str = "chat",
              model: str | None = None) -> SteerPlan:
    """Raw `steer` JSON (profile already resolved) -> the normalised plan (only the steers that do
    something). Context-attention spans are resolved later, on the rendered prompt (`spans`).
    `endpoint`: "chat" or "completions" (which emphasis modes are allowed); `model`: the request's
    `model` (a tuned variant's name selects it for mixing)."""
    spec = parse_spec(raw)
    if spec.profile is not None:
        raise SteerError("steer.profile", "profiles cannot name other profiles")
    if spec.experiment is not None:
        raise SteerError("steer.experiment", "profiles cannot name experiments")
    infosteer = _normalise_infosteer(spec.infosteer, info) if spec.infosteer is not None else None
    context = None
    if spec.context_attention is not None:
        context = _normalise_context(spec.context_attention, info, head_sets or {}, endpoint)
    from . import family as _family

    fam = _family.current()
    try:
        mixing, _ = fam.resolve(spec.mixing, model)
        proxy = fam.resolve_proxy(spec.proxy)
    except _family.MixingError as err:
        raise SteerError(err.field, err.message) from None
    indicator = None
    if spec.context_indicator:
        field = "steer.context_indicator"
        if endpoint != "chat":
            raise SteerError(field, "only on /v1/chat/completions (the indicator is appended to user messages)")
        indicator = fam.indicator_for(model)
        if indicator is None:
            who = model or fam.base_name or "the served model"
            raise SteerError(field, f"model {shown(who)} was not trained with a context-dependency indicator (its "
                                    "steerserve.json has no context_indicator; train with `steerserve train sft "
                                    "--context-indicator`)")
    return SteerPlan(infosteer=infosteer, context_attention=context, mixing=mixing, context_indicator=indicator,
                     proxy=proxy)
