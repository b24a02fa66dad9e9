"""TAIA parameter mixing with a tuned variant (docs/families.md). Request
side: the wire schema, the plan and its normalisation, which asks the served family
(`server/family.py`) what the variant is and how it is served. The engine's row routing is
`engine.py` here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ..base import Prepared, ServingContext, Steer

VARIANTS_SETTING = "full_variants"  # engine setting: [{"name", "path"}], the engine's full variants

SHORTHANDS = ("taia", "tuned", "base", "ffn-only")


class MixingObject(BaseModel):
    """`steer.mixing` as an object: which components of which variant a request uses."""

    model_config = ConfigDict(extra="forbid", strict=True, title="MixingSpec")

    variant: str | None = Field(None, description="a tuned variant the server loaded (default: the request's "
                                                  "`model` when it names one, else the only variant)")
    attention: Literal["tuned", "base"] | None = Field(None, description='default "tuned"')
    ffn: Literal["tuned", "base"] | None = Field(None, description='default "tuned"')


MixingValue = Literal["taia", "tuned", "base", "ffn-only"] | MixingObject


@dataclass(frozen=True)
class MixingPlan:
    """TAIA parameter mixing: which weights of the tuned variant `variant` a request uses, per
    component ("tuned" or "base"). `via` is how the engine serves it: "weights" (a fully
    fine-tuned variant, rows routed inside the engine; `index` is its position in the engine's
    variant list) or "lora" (vLLM multi-LoRA with the component's adapter, `adapter` its name;
    nothing for the engine hook to do)."""

    variant: str
    attention: str
    ffn: str
    via: str
    index: int = -1
    adapter: str | None = None

    @property
    def label(self) -> str:
        if self.attention == "tuned" and self.ffn == "base":
            return "taia"
        if self.attention == "tuned" and self.ffn == "tuned":
            return "tuned"
        if self.attention == "base" and self.ffn == "base":
            return "base"
        return "ffn-only"

    @property
    def routes(self) -> bool:
        """Whether the engine routes rows for it (weights-served, at least one tuned component)."""
        return self.via == "weights" and "tuned" in (self.attention, self.ffn)

    def echo(self) -> dict:
        out = {"steer": "mixing", "variant": self.variant, "attention": self.attention, "ffn": self.ffn,
               "mode": self.label, "served_by": "multi-LoRA adapter" if self.via == "lora" else "routed weights"}
        if self.adapter:
            out["adapter"] = self.adapter
        return out


class Mixing(Steer):
    name = "mixing"
    engine = __name__ + ".engine"
    Spec = MixingObject
    Plan = MixingPlan
    implied_by_model = True  # a request whose `model` names a variant gets its mix without `steer.mixing`
    summary = ('TAIA parameter mixing with a tuned variant: "taia", "tuned", "base", "ffn-only" or '
               '{"variant", "attention": "tuned"|"base", "ffn": "tuned"|"base"}')
    hints = {"": 'must be "taia", "tuned", "base", "ffn-only" or an object {"variant": name, '
                 '"attention": "tuned"|"base", "ffn": "tuned"|"base"}'}

    def spec_type(self):
        return MixingValue

    def build(self, mode: str | None = None, *, variant: str | None = None, attention: str | None = None,
              ffn: str | None = None):
        """`Steer().mixing("taia")`, or `.mixing(variant="chat", attention="tuned", ffn="base")`."""
        if mode is not None:
            if variant is not None or attention is not None or ffn is not None:
                raise TypeError('give a shorthand ("taia", ...) or the object fields, not both')
            return TypeAdapter(MixingValue).validate_python(mode)
        return MixingObject(variant=variant, attention=attention, ffn=ffn).model_dump(exclude_none=True)

    def normalise(self, spec, ctx: ServingContext) -> MixingPlan | None:
        raw = spec.model_dump(exclude_none=True) if isinstance(spec, BaseModel) else spec
        plan, _ = ctx.family.resolve(raw, ctx.model)  # raises a SteerError naming the field
        return plan

    def prepare_request(self, request, plan: MixingPlan, ctx: ServingContext) -> Prepared | None:
        """Route the request to the name vLLM serves the mix under (a LoRA adapter or the base);
        the response keeps the `model` the client asked for."""
        served = ctx.family.served_name(plan)
        if served and served != ctx.model:
            request.model = served
            return Prepared(response_model=ctx.model or plan.variant)
        return None


STEER = Mixing()
