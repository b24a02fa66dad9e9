"""`POST /v1/ab/compare`: one chat request run under several steering arms in the same batch.

Body: a chat completion request plus `arms`, a list of {"name": str, "steer": {...}} (a steer may
name a profile; {} is the unsteered arm). All arms are submitted together, so the engine batches
them. Response: {"object": "ab.compare", "arms": [{"name", "steer", "choices", "usage",
"latency_ms", "diverges_at"}]}, where `diverges_at` is the index of the first generated token of
choice 0 that differs from the first arm's choice 0 (null if none, and for the first arm).
Runs in the API server process.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steerserve.patches.vllm_adapter import http_surface

from .api import STEER_FIELD, _pending, bad_request, take_plan

MAX_ARMS = 8
_vllm = http_surface()
router = APIRouter()


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    steer: dict = Field(default_factory=dict)


def diverges_at(reference: list[int], other: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), None if equal."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def _validation_400(err: ValidationError, prefix: str = "") -> JSONResponse:
    first = err.errors()[0]
    field = ".".join([*([prefix] if prefix else []), *(str(p) for p in first["loc"])])
    return bad_request(field, f"{field}: {first['msg']}")


def _parse_arms(raw: object) -> list[Arm] | JSONResponse:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ARMS:
        return bad_request("arms", f"must be a list of 1..{MAX_ARMS} objects {{name, steer}}")
    arms = []
    for i, item in enumerate(raw):
        try:
            arms.append(Arm.model_validate(item))
        except ValidationError as err:
            return _validation_400(err, f"arms[{i}]")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        return bad_request("arms", "arm names must be unique")
    return arms


@router.post("/v1/ab/compare")
async def compare(raw_request: Request):
    try:
        body = await raw_request.json()
    except ValueError:
        return bad_request(None, "the body must be a JSON object")
    if not isinstance(body, dict):
        return bad_request(None, "the body must be a JSON object")
    arms = _parse_arms(body.pop("arms", None))
    if isinstance(arms, JSONResponse):
        return arms
    if body.get("stream"):
        return bad_request("stream", "streaming comparisons are not available yet; send stream: false")
    if STEER_FIELD in body:
        return bad_request(STEER_FIELD, "put steering in each arm's `steer`, not at the top level")
    requests, applied = [], []
    for i, arm in enumerate(arms):
        try:
            request = _vllm.ChatCompletionRequest.model_validate(
                {**body, STEER_FIELD: arm.steer, "return_token_ids": True})
        except ValidationError as err:
            return _validation_400(err)
        arm_applied, error = take_plan(request, raw_request, field_prefix=f"arms[{i}].")
        if error is not None:
            return error
        requests.append(request)
        applied.append(arm_applied)
    handler = _vllm.serving_chat(raw_request)

    async def run(request):
        t0 = time.perf_counter()
        result = await handler.create_chat_completion(request, raw_request)
        return result, (time.perf_counter() - t0) * 1000

    try:
        results = await asyncio.gather(*(run(r) for r in requests))
    finally:
        for r in requests:
            _pending.pop(id(r), None)
    out = []
    first_tokens: list[int] | None = None
    for arm, arm_applied, (result, latency_ms) in zip(arms, applied, results):
        if not isinstance(result, _vllm.ChatCompletionResponse):  # an ErrorResponse from vLLM
            body = result.model_dump()
            return JSONResponse({**body, "arm": arm.name}, status_code=result.error.code)
        payload = result.model_dump()
        tokens = payload["choices"][0].get("token_ids") or []
        if first_tokens is None:
            first_tokens, diverge = tokens, None
        else:
            diverge = diverges_at(first_tokens, tokens)
        out.append({
            "name": arm.name,
            "steer": arm_applied.echo() if arm_applied else None,
            "choices": payload["choices"],
            "usage": payload["usage"],
            "latency_ms": round(latency_ms, 1),
            "diverges_at": diverge,
        })
    return {"object": "ab.compare", "model": body.get("model"), "arms": out}
