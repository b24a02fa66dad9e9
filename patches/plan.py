"""Normalised steering plans: the immutable value that travels from the API server to the engine.

A plan holds only the steers that do something, with every default resolved against the served
model (layer lists expanded, `p` turned into a coefficient count). It has one serialised form
(canonical JSON, carried as `SamplingParams.extra_args["steer"]`) and a stable fingerprint
(a hash of that JSON) that also salts the prefix cache.

Pure Python; imported by the API server process and by the engine's worker processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields

EXTRA_ARGS_KEY = "steer"
# The engine only runs plans its own API server validated: `steerserve serve` puts a random key in
# this variable (inherited by the engine processes) and the API server signs each plan's JSON with
# HMAC-SHA256 under SIGNATURE_KEY. Other routes of vLLM's server (/v1/responses, /v1/messages,
# /invocations, ...) pass `vllm_xargs` through unvalidated: an unsigned or forged plan is refused
# by the engine (the request runs unsteered, logged), never parsed into a forward pass. Without the
# variable (an offline `vllm.LLM` in the caller's own code) plans are trusted.
PLAN_KEY_ENV = "STEERSERVE_PLAN_KEY"
SIGNATURE_KEY = "steer_signature"
INFOSTEER_MODES = ("scale", "topk", "lift")


def canonical_numbers(plan: object) -> None:
    """Make a frozen plan's numbers canonical in place: fields declared `float` hold floats, and
    -0.0 is 0.0 (so equal plans have one JSON form, one fingerprint and one cache salt)."""
    for f in fields(plan):
        value = getattr(plan, f.name)
        if f.type == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            object.__setattr__(plan, f.name, float(value) + 0.0)  # -0.0 + 0.0 == +0.0


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


@dataclass(frozen=True)
class SteerPlan:
    infosteer: InfoSteerPlan | None = None
    context_attention: ContextAttentionPlan | None = None
    mixing: MixingPlan | None = None
    context_indicator: str | None = None  # the indicator text appended to user turns (echo only)
    proxy: ProxyPlan | None = None

    @property
    def is_empty(self) -> bool:
        return self.infosteer is None and self.context_attention is None and self.mixing is None \
            and self.context_indicator is None and self.proxy is None

    def to_json(self) -> str:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str | None:
        if self.is_empty:
            return None
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def applied(self) -> list[dict]:
        out = [p.echo() for p in (self.infosteer, self.context_attention, self.mixing, self.proxy) if p is not None]
        if self.context_indicator is not None:
            out.append({"steer": "context_indicator", "text": self.context_indicator})
        return out

    def echo(self) -> dict:
        """The `steer` object returned to the client."""
        if self.is_empty:
            return {"applied": [], "fingerprint": None, "note": "no steering applied (empty or neutral)"}
        return {"applied": self.applied(), "fingerprint": self.fingerprint()}


def _plan_key() -> bytes | None:
    import os

    raw = os.environ.get(PLAN_KEY_ENV)
    return raw.encode() if raw else None


def plan_signature(text: str, key: bytes) -> str:
    import hashlib
    import hmac

    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def engine_args(plan: "SteerPlan") -> dict[str, str]:
    """The sampling-params extra args that carry `plan` to the engine (signed when the server has
    a plan key)."""
    text = plan.to_json()
    key = _plan_key()
    return {EXTRA_ARGS_KEY: text, **({SIGNATURE_KEY: plan_signature(text, key)} if key else {})}


class PlanRefused(ValueError):
    """A plan the engine will not run (unsigned, forged or malformed)."""


@functools.lru_cache(maxsize=4096)
def _verified(text: str, signature: str | None, key: bytes | None) -> SteerPlan:
    import hmac

    if key is not None and (not isinstance(signature, str)
                            or not hmac.compare_digest(signature, plan_signature(text, key))):
        raise PlanRefused("the steering plan is not signed by this server's API process")
    try:
        return parse_plan(text)
    except Exception as err:  # noqa: BLE001 - any malformed plan text
        raise PlanRefused(f"malformed steering plan ({type(err).__name__})") from None


def plan_from_engine_args(extra: dict) -> SteerPlan | None:
    """The plan a request's extra args carry (None: unsteered). Raises PlanRefused when it must
    not run. Cached per (text, signature): once per request per worker."""
    text = extra.get(EXTRA_ARGS_KEY)
    if not text:
        return None
    if not isinstance(text, str):
        raise PlanRefused("the steering plan is not a string")
    return _verified(text, extra.get(SIGNATURE_KEY), _plan_key())


@functools.lru_cache(maxsize=4096)
def parse_plan(text: str) -> SteerPlan:
    """Inverse of `SteerPlan.to_json`; cached, so each request's plan is parsed once per worker."""
    body = json.loads(text)
    info = body.get("infosteer")
    if info is not None:
        info = InfoSteerPlan(**{**info, "layers": tuple(info["layers"])})
    ctx = body.get("context_attention")
    if ctx is not None:
        ctx = ContextAttentionPlan(**{
            **ctx,
            "heads": tuple((int(layer), tuple(hs)) for layer, hs in ctx["heads"]),
            "spans": tuple((int(a), int(b)) for a, b in ctx["spans"]),
        })
    mixing = body.get("mixing")
    if mixing is not None:
        mixing = MixingPlan(**mixing)
    proxy = body.get("proxy")
    if proxy is not None:
        proxy = ProxyPlan(**proxy)
    return SteerPlan(infosteer=info, context_attention=ctx, mixing=mixing,
                     context_indicator=body.get("context_indicator"), proxy=proxy)
