"""InfoSteer: FFN memory amplification (docs/steering.md, "InfoSteer formulas"). Request side: the wire
schema, the plan and its normalisation. The math is `formulas.py`, the engine `engine.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..base import ServingContext, Steer, SteerError, canonical_numbers
from ..layers import MAX_LAYER_LIST, resolve_layers

ALPHA_MIN, ALPHA_MAX = 0.0, 10.0
INFOSTEER_MODES = ("scale", "topk", "lift")


def lift_count(p: float, d_ffn: int) -> int:
    """Number of coefficients `lift` rewrites per token: floor(p * d_ffn)."""
    return int(p * d_ffn)


class InfoSteerSpec(BaseModel):
    """`steer.infosteer`: FFN memory amplification (see docs/steering.md, "InfoSteer formulas")."""

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


@dataclass(frozen=True)
class InfoSteerPlan:
    """FFN memory amplification on `layers` (0-based decoder layer indices, sorted).

    mode "scale": c' = alpha * c                                      (every coefficient)
    mode "topk":  c'_i = alpha * c_i for the k largest |c_i|, else c_i (per token)
    mode "lift":  c'_i = alpha * mean(c) for the m smallest c_i, else c_i (per token),
                  with m = floor(p * d_ffn) resolved by the server.
    """

    layers: tuple[int, ...]
    mode: str
    alpha: float
    k: int = 0  # topk only
    m: int = 0  # lift only: number of lifted coefficients per token
    p: float = 0.0  # lift only: the requested fraction, kept for the echo

    def __post_init__(self) -> None:
        canonical_numbers(self)

    def echo(self) -> dict:
        out: dict = {"steer": "infosteer", "mode": self.mode, "alpha": self.alpha, "layers": list(self.layers)}
        if self.mode == "topk":
            out["k"] = self.k
        if self.mode == "lift":
            out["p"] = self.p
            out["lifted_per_token"] = self.m
        return out


class InfoSteer(Steer):
    name = "infosteer"
    engine = __name__ + ".engine"
    reference = __name__ + ".reference"
    Spec = InfoSteerSpec
    Plan = InfoSteerPlan
    summary = "FFN memory amplification: scale, top-k or lift the input of down_proj on chosen layers"
    hints = {"alpha": f"(allowed range [{ALPHA_MIN}, {ALPHA_MAX}])", "p": "(allowed range (0, 1])",
             "layers": 'must be "all" or a list of integer layer indices'}

    def build(self, alpha: float, mode: str = "scale", layers="all", k: int | None = None,
              p: float | None = None) -> dict:
        return super().build(alpha=float(alpha), mode=mode, layers=layers, k=k, p=p)

    def normalise(self, spec: InfoSteerSpec, ctx: ServingContext) -> InfoSteerPlan | None:
        field = "steer.infosteer"
        info = ctx.info
        if spec.mode != "topk" and spec.k is not None:
            raise SteerError(f"{field}.k", f'only applies to mode "topk" (mode is "{spec.mode}")')
        if spec.mode != "lift" and spec.p is not None:
            raise SteerError(f"{field}.p", f'only applies to mode "lift" (mode is "{spec.mode}")')
        layers = resolve_layers(spec.layers, info, f"{field}.layers")
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
                raise SteerError(f"{field}.p", f"{p} lifts no coefficient of an FFN of width {info.ffn_width}; "
                                               f"allowed range [{1 / info.ffn_width:.6g}, 1]")
        if not layers or (spec.mode in ("scale", "topk") and spec.alpha == 1.0):
            return None
        return InfoSteerPlan(layers=layers, mode=spec.mode, alpha=float(spec.alpha), k=k, m=m, p=p)

    def plan_from_json(self, body: dict) -> InfoSteerPlan:
        return InfoSteerPlan(**{**body, "layers": tuple(body["layers"])})


STEER = InfoSteer()
