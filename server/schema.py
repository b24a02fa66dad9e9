"""The `steer` request object: wire schema (pydantic) and its normalisation into a `SteerPlan`.

The public steering contract is derived from the steer registry (`patches/steers`): `SteerSpec`
has `profile`, `experiment` and one field per registered steer (that steer's Spec); `normalise`
runs each steer's `normalise`. The server validates with it and the Python client
(`steerserve.clients.Steer`) builds requests with the same Specs. Validation happens in two stages,
both reported as HTTP 400 naming the field and the allowed values:
1. shape and ranges that hold for every model (`SteerSpec.model_validate`);
2. ranges that depend on the served model (layer indices, FFN width) in each steer's `normalise`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from steerserve.patches.plan import SteerPlan
from steerserve.patches.steers import BY_NAME, STEERS, ServingContext
from steerserve.patches.steers.base import ECHO_CAP, ModelInfo, SteerError, shown

__all__ = ["ModelInfo", "SteerError", "SteerSpec", "normalise", "parse_spec", "resolve_profile"]


class _SteerBase(BaseModel):
    """The `steer` object of a request."""

    model_config = ConfigDict(extra="forbid", strict=True)


SteerSpec = create_model(
    "SteerSpec",
    __base__=_SteerBase,
    profile=(str | None, Field(None, description="name of a server-side profile; the other fields override it")),
    experiment=(str | None, Field(None, description="name of a server-side A/B experiment (alone)")),
    **{s.name: (s.spec_type() | None, Field(None, description=s.summary)) for s in STEERS},
)
SteerSpec.__doc__ = "The `steer` object of a request (null anywhere means the field's default)."


def _allowed() -> dict[str, list[str]]:
    """Allowed keys per object path, for unknown-field messages."""
    out = {"steer": sorted(SteerSpec.model_fields)}
    for steer in STEERS:
        for model in steer.spec_models():
            out[f"steer.{steer.name}"] = sorted(model.model_fields)
    return out


_ALLOWED = _allowed()
# every dotted field path of the schema (`steer`, `steer.infosteer`, `steer.infosteer.alpha`, ...)
FIELD_PATHS = frozenset({"steer"} | {f"{parent}.{name}" for parent, names in _ALLOWED.items() for name in names})
# union members' model names, which pydantic puts into error locations
_UNION_TAGS = {m.__name__ for s in STEERS for m in s.spec_models()}
_FIELD_NAMES = {name for names in _ALLOWED.values() for name in names}


def _hint(loc: str) -> str | None:
    """A steer's extra words for errors at `loc` (`steer.<name>` or `steer.<name>.<field>`)."""
    parts = [part.split("[", 1)[0] for part in loc.split(".")]  # list indices: steer.vectors[0].scale
    steer = BY_NAME.get(parts[1]) if len(parts) > 1 else None
    if steer is None:
        return None
    return steer.hints.get(parts[2] if len(parts) > 2 else "")


def _from_validation_error(err: ValidationError) -> SteerError:
    def is_field(part, error, last) -> bool:
        return part in _FIELD_NAMES or (last and error["type"] == "extra_forbidden")

    def depth(error) -> int:
        loc = error["loc"]
        return sum(1 for i, p in enumerate(loc) if isinstance(p, str) and is_field(p, error, i == len(loc) - 1))

    # for a value that matches no member of a union, report the member that got furthest
    first = max(err.errors(), key=depth)
    parts: list[str] = ["steer"]
    in_union = False
    loc = first["loc"]
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif part in _UNION_TAGS:
            continue
        elif is_field(part, first, i == len(loc) - 1):
            parts.append(part if len(part) <= ECHO_CAP else f"{part[:ECHO_CAP]}...")  # a key of any size: cut
        else:  # a union member's tag, such as "literal['all']", "list[int]" or "str"
            in_union = True
            break
    path = ".".join(parts)
    msg = first["msg"]
    hint = _hint(path)
    if first["type"] == "extra_forbidden":
        parent = path.rsplit(".", 1)[0].split("[", 1)[0]  # steer.vectors[0].x: the keys of steer.vectors' items
        msg = f"unknown field; allowed keys: {', '.join(_ALLOWED.get(parent, []))}"
    elif in_union and hint:
        msg = hint
    elif first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be an object"
    elif hint:
        msg = f"{msg} {hint}"
    return SteerError(path, msg)


def without_nulls(value: object) -> object:
    """`value` with every null member of an object dropped, at any depth: in the `steer` object a
    null means "the field's default" (the schema marks fields nullable)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def parse_spec(raw: object) -> Any:
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


def serving_context(info: ModelInfo, head_sets: dict | None = None, endpoint: str = "chat",
                    model: str | None = None) -> ServingContext:
    """What the steers' `normalise` and `prepare_request` consult: the served model, its head sets
    and family, the route (`endpoint`: "chat" or "completions") and the request's `model`."""
    from . import family as _family

    return ServingContext(info, head_sets or {}, endpoint, model, _family.current())


def normalise(raw: object, info: ModelInfo, head_sets: dict | None = None, endpoint: str = "chat",
              model: str | None = None) -> SteerPlan:
    """Raw `steer` JSON (profile already resolved) -> the normalised plan (only the steers that do
    something). Context-attention spans are resolved later, on the rendered prompt (`spans`).
    `endpoint`: "chat" or "completions" (which emphasis modes are allowed); `model`: the request's
    `model` (a tuned variant's name selects it for mixing)."""
    return plan_for(raw, serving_context(info, head_sets, endpoint, model))


def plan_for(raw: object, ctx: ServingContext) -> SteerPlan:
    """`normalise` in a serving context."""
    spec = parse_spec(raw)
    if spec.profile is not None:
        raise SteerError("steer.profile", "profiles cannot name other profiles")
    if spec.experiment is not None:
        raise SteerError("steer.experiment", "profiles cannot name experiments")
    plans = {}
    for steer in STEERS:
        value = getattr(spec, steer.name)
        if value is not None and steer.engine and (reason := ctx.info.refusal(steer.name)):
            # the served model's architecture (or checkpoint) cannot run it (patches/architectures.py)
            raise SteerError(f"steer.{steer.name}", f"{steer.name} is unavailable on this model: {reason}")
        if value is not None or steer.implied_by_model:
            plans[steer.name] = steer.normalise(value, ctx)
    return SteerPlan(**plans)
