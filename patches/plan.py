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
from dataclasses import asdict, field, make_dataclass

from .steers import BY_NAME, STEERS
from .steers.context_attention import ContextAttentionPlan  # noqa: F401  (re-exported)
from .steers.infosteer import InfoSteerPlan  # noqa: F401  (re-exported)
from .steers.mixing import MixingPlan  # noqa: F401  (re-exported)
from .steers.proxy import ProxyPlan  # noqa: F401  (re-exported)

EXTRA_ARGS_KEY = "steer"
# The engine only runs plans its own API server validated: `steerserve serve` puts a random key in
# this variable (inherited by the engine processes) and the API server signs each plan's JSON with
# HMAC-SHA256 under SIGNATURE_KEY. Other routes of vLLM's server (/v1/responses, /v1/messages,
# /invocations, ...) pass `vllm_xargs` through unvalidated: an unsigned or forged plan is refused
# by the engine (the request runs unsteered, logged), never parsed into a forward pass. Without the
# variable (an offline `vllm.LLM` in the caller's own code) plans are trusted.
PLAN_KEY_ENV = "STEERSERVE_PLAN_KEY"
SIGNATURE_KEY = "steer_signature"



class _PlanMethods:
    """The methods of `SteerPlan`, whose fields (one per registered steer, each None or that
    steer's plan) are made from the registry below."""

    @property
    def steers(self) -> dict:
        """name -> plan of the applied steers, in registry order."""
        return {s.name: getattr(self, s.name) for s in STEERS if getattr(self, s.name) is not None}

    @property
    def is_empty(self) -> bool:
        return not self.steers

    @property
    def salts_cache(self) -> bool:
        """Whether any applied steer changes the KV a prompt produces (the prefix cache is salted)."""
        return any(BY_NAME[name].salts_cache for name in self.steers)

    def to_json(self) -> str:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str | None:
        if self.is_empty:
            return None
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def applied(self) -> list[dict]:
        return [BY_NAME[name].echo(plan) for name, plan in self.steers.items()]

    def echo(self) -> dict:
        """The `steer` object returned to the client."""
        if self.is_empty:
            return {"applied": [], "fingerprint": None, "note": "no steering applied (empty or neutral)"}
        return {"applied": self.applied(), "fingerprint": self.fingerprint()}


SteerPlan = make_dataclass(
    "SteerPlan", [(s.name, "object", field(default=None)) for s in STEERS], bases=(_PlanMethods,), frozen=True,
)
SteerPlan.__module__ = __name__
SteerPlan.__doc__ = ("A request's normalised steering: one field per registered steer (patches/steers), "
                     "None or that steer's plan.")


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
    unknown = set(body) - set(BY_NAME)
    if unknown:
        raise ValueError(f"unknown steers in plan: {sorted(unknown)}")
    return SteerPlan(**{name: BY_NAME[name].plan_from_json(value) for name, value in body.items()
                        if value is not None})
