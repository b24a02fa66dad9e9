"""Proxy tuning: next-token logits = base + alpha * (expert - anti_expert) with a pair the server
loaded (docs/proxy.md). Request side: the wire schema, the plan and its normalisation,
which asks the served family which pairs are loaded. The engine is `engine.py` here."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..base import ServingContext, Steer, canonical_numbers

ALPHA_MIN, ALPHA_MAX = -10.0, 10.0
PAIRS_SETTING = "proxy_pairs"  # engine setting: [{"name", "expert", "anti_expert"}], the engine's pairs


class ProxySpec(BaseModel):
    """`steer.proxy`: proxy tuning with a pair the server loaded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair: str | None = Field(None, description="a proxy pair the server loaded (default: the only one)")
    alpha: float = Field(1.0, ge=ALPHA_MIN, le=ALPHA_MAX, allow_inf_nan=False,
                         description="0 = the base alone, 1 = the paper's default")


@dataclass(frozen=True)
class ProxyPlan:
    """Proxy tuning: next-token logits = base + alpha * (expert - anti_expert) with the server's
    proxy pair `pair`. With alpha 0 the engine runs no expert for the request: plain base output."""

    pair: str
    alpha: float

    def __post_init__(self) -> None:
        canonical_numbers(self)

    def echo(self) -> dict:
        return {"steer": "proxy", "pair": self.pair, "alpha": self.alpha}


class Proxy(Steer):
    name = "proxy"
    engine = __name__ + ".engine"
    reference = __name__ + ".reference"
    Spec = ProxySpec
    Plan = ProxyPlan
    summary = 'proxy tuning {"pair": name, "alpha": number}: logits = base + alpha * (expert - anti_expert)'
    hints = {"alpha": f"(allowed range [{ALPHA_MIN:g}, {ALPHA_MAX:g}]; 0 = the base alone, 1 = the paper's default)"}

    def normalise(self, spec: ProxySpec, ctx: ServingContext) -> ProxyPlan | None:
        return ctx.family.resolve_proxy(spec.model_dump(exclude_none=True))  # raises a SteerError naming the field


STEER = Proxy()
