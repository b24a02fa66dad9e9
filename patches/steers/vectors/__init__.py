"""Residual steering vectors (docs/vectors.md): per request, a sum of `scale * direction[layer]`
added to the residual stream after chosen decoder layers, from vectors the server loaded at
start-up (`steerserve serve --vector NAME=FILE`: llama.cpp / repeng control-vector GGUF or
steerserve's safetensors, see `files.py`). Request side: the wire schema, the plan and its
normalisation against the served vectors (`ServingContext.family.vectors`). The engine is
`engine.py`, the Hugging Face reference `reference.py`, the trainer `training/vectors.py`.

Where the vector goes: after decoder layer i (0-based), as repeng (`model.layers[i]` output) and
llama.cpp (`direction.i` added to block i's `l_out`) do. vLLM's decoder layers return a split
residual stream (hidden_states, residual) whose sum the next layer's fused add-norm (or the final
norm) forms; the engine adds the vector to the `hidden_states` half once, so the sum, which is the
stream, carries it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..base import ServingContext, Steer, SteerError, canonical_numbers, shown
from ..layers import MAX_LAYER_LIST

SCALE_MIN, SCALE_MAX = -100.0, 100.0
MAX_TERMS = 8
POSITIONS = ("all", "prompt", "generated")
VECTORS_SETTING = "vectors"  # engine setting: [{"name", "path"}], the vectors the engine loads
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class VectorTermSpec(BaseModel):
    """One term of `steer.vectors`: `scale * direction[layer]` of a served vector, added after
    each of `layers`, at `positions`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=64, description="a vector the server loaded (GET /v1/steer/vectors)")
    scale: float = Field(1.0, ge=SCALE_MIN, le=SCALE_MAX, allow_inf_nan=False,
                         description=f"multiplies the direction; [{SCALE_MIN:g}, {SCALE_MAX:g}], negative inverts, "
                                     "0 = no steering")
    layers: Literal["all"] | list[int] = Field(
        "all", max_length=MAX_LAYER_LIST, description='"all" (every layer the vector has) or a subset of them')
    positions: Literal["all", "prompt", "generated"] = Field(
        "all", description='"all", "prompt" (prompt tokens only) or "generated" (generated tokens only)')


VectorsSpec = Annotated[list[VectorTermSpec], Field(min_length=1, max_length=MAX_TERMS)]


@dataclass(frozen=True)
class VectorTerm:
    """`scale * direction[layer]` of vector `name` after each of `layers` (sorted), at `positions`
    ("all", "prompt": token positions < the prompt length, "generated": the others)."""

    name: str
    scale: float
    layers: tuple[int, ...]
    positions: str = "all"

    def __post_init__(self) -> None:
        canonical_numbers(self)

    def echo(self) -> dict:
        return {"name": self.name, "scale": self.scale, "layers": list(self.layers), "positions": self.positions}


@dataclass(frozen=True)
class VectorsPlan:
    """The request's terms, in request order; they add up (float32, then the model's dtype)."""

    terms: tuple[VectorTerm, ...]

    def echo(self) -> dict:
        return {"steer": "vectors", "terms": [t.echo() for t in self.terms]}


class Vectors(Steer):
    name = "vectors"
    engine = __name__ + ".engine"
    reference = __name__ + ".reference"
    Spec = VectorTermSpec
    Plan = VectorsPlan
    item = "vector"
    summary = (f"residual steering vectors: a list of up to {MAX_TERMS} terms {{name, scale, layers, positions}} "
               "added after decoder layers (vectors the server loaded: GET /v1/steer/vectors)")
    hints = {"": f"(a list of 1 to {MAX_TERMS} terms {{\"name\", \"scale\", \"layers\", \"positions\"}})",
             "scale": f"(allowed range [{SCALE_MIN:g}, {SCALE_MAX:g}])",
             "layers": 'must be "all" or a list of integer layer indices the vector has',
             "positions": '(allowed: "all", "prompt", "generated")'}

    def spec_type(self):
        return VectorsSpec

    def spec_models(self):
        return [VectorTermSpec]

    def build(self, *terms) -> list:
        """The list of terms (each a dict or a VectorTermSpec); see `Steer().vector(...)`."""
        return [VectorTermSpec.model_validate(t).model_dump() if isinstance(t, dict) else t.model_dump()
                for t in terms]

    def build_item(self, name: str, scale: float = 1.0, layers="all", positions: str = "all") -> dict:
        """One term: `Steer().vector(name, scale, layers=..., positions=...)` appends it."""
        return VectorTermSpec.model_validate(dict(name=name, scale=float(scale), layers=layers,
                                                  positions=positions)).model_dump()

    def normalise(self, spec: list[VectorTermSpec], ctx: ServingContext) -> VectorsPlan | None:
        field = "steer.vectors"
        served = getattr(ctx.family, "vectors", None) or {}
        terms = []
        for i, term in enumerate(spec):
            where = f"{field}[{i}]"
            info = served.get(term.name)
            if info is None:
                known = ", ".join(sorted(served)) or "none (start the server with --vector NAME=FILE)"
                raise SteerError(f"{where}.name", f"unknown vector {shown(term.name)}; served vectors: {known}")
            if term.layers == "all":
                layers = tuple(info.layers)
            else:
                have = set(info.layers)
                for j, layer in enumerate(term.layers):
                    if layer not in have:
                        raise SteerError(f"{where}.layers[{j}]", f"vector {term.name!r} has no direction for layer "
                                                                 f"{layer}; it has layers {_ranges(info.layers)}")
                layers = tuple(sorted(set(term.layers)))
            if term.scale == 0.0 or not layers:
                continue  # adds nothing: the unsteered output, bit for bit
            terms.append(VectorTerm(term.name, float(term.scale), layers, term.positions))
        return VectorsPlan(tuple(terms)) if terms else None

    def plan_from_json(self, body: dict) -> VectorsPlan:
        return VectorsPlan(tuple(VectorTerm(**{**t, "layers": tuple(t["layers"])}) for t in body["terms"]))


def _ranges(layers) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out: list[str] = []
    layers = sorted(layers)
    start = prev = None
    for x in layers + [None]:
        if start is None:
            start = prev = x
        elif x is not None and x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = x
    return ", ".join(out)


STEER = Vectors()
