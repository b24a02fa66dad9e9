"""`POST /v1/ab/compare`: one chat request run under several steering arms in the same batch.

Body: a chat completion request plus `arms`, a list of {"name": str, "steer": {...}} (a steer may
name a profile; {} is the unsteered arm). All arms are submitted together, so the engine batches
them. Response: {"object": "ab.compare", "arms": [{"name", "steer", "choices", "usage",
"latency_ms", "diverges_at"}]}, where `diverges_at` is the index of the first generated token of
choice 0 that differs from the first arm's choice 0 (null if none, and for the first arm).
With `"stream": true` the arms stream side by side as interleaved SSE events (`_stream_arms`).
Runs in the API server process.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steerserve.patches.adapter.server import http_surface

from .api import STEER_FIELD, bad_request, rendering, take_plan

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
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return bad_request("stream", "must be true or false")
    if STEER_FIELD in body:
        return bad_request(STEER_FIELD, "put steering in each arm's `steer`, not at the top level")
    requests, applied = [], []
    for i, arm in enumerate(arms):
        try:
            fields = {**body, STEER_FIELD: arm.steer, "return_token_ids": True}
            if stream:
                fields["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            request = _vllm.ChatCompletionRequest.model_validate(fields)
        except ValidationError as err:
            return _validation_400(err)
        arm_applied, error = take_plan(request, raw_request, field_prefix=f"arms[{i}].")
        if error is not None:
            return error
        requests.append(request)
        applied.append(arm_applied)
    handler = _vllm.serving_chat(raw_request)
    if stream:
        return StreamingResponse(_stream_arms(handler, arms, requests, applied, raw_request),
                                 media_type="text/event-stream")

    async def run(request, arm_applied):
        t0 = time.perf_counter()
        with rendering(arm_applied):
            result = await handler.create_chat_completion(request, raw_request)
        return result, (time.perf_counter() - t0) * 1000

    results = await asyncio.gather(*(run(r, a) for r, a in zip(requests, applied)))
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


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream_arms(handler, arms, requests, applied, raw_request):
    """Run every arm as a vLLM stream, concurrently (one batch), and interleave their chunks.

    Events (SSE, `data: {...}`):
    - {"object": "ab.compare.chunk", "arm": name, "arm_index": i, "choices": [...]} for each vLLM
      chunk (choices carry `delta` and `token_ids`); an arm's first chunk also has its `steer` echo;
    - {"object": "ab.compare.arm_done", "arm", "arm_index", "usage", "latency_ms"} when an arm ends;
    - {"object": "ab.compare.error", "arm", "arm_index", "error"} if an arm fails;
    - {"object": "ab.compare.summary", "arms": [{"name", "latency_ms", "usage", "diverges_at",
      "text"}]} once all arms ended; then `data: [DONE]`.
    A client that disconnects cancels every arm (vLLM aborts their requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    started = time.perf_counter()

    async def pump(i: int, request) -> None:
        try:
            with rendering(applied[i]):
                result = await handler.create_chat_completion(request, raw_request)
            if not hasattr(result, "__aiter__"):  # an ErrorResponse
                await queue.put((i, "error", result.model_dump()["error"]))
                return
            async for chunk in result:
                await queue.put((i, "chunk", chunk))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - reported to the client as the arm's error
            await queue.put((i, "error", {"message": str(err), "type": type(err).__name__, "code": 500}))
        finally:
            await queue.put((i, "end", (time.perf_counter() - started) * 1000))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    tokens: list[list[int]] = [[] for _ in arms]
    texts: list[list[str]] = [[] for _ in arms]
    usage: list[dict | None] = [None] * len(arms)
    latency: list[float | None] = [None] * len(arms)
    echoed = [False] * len(arms)
    open_arms = len(arms)
    try:
        while open_arms:
            i, kind, item = await queue.get()
            name = arms[i].name
            if kind == "end":
                latency[i] = round(item, 1)
                open_arms -= 1
                yield _sse({"object": "ab.compare.arm_done", "arm": name, "arm_index": i,
                            "usage": usage[i], "latency_ms": latency[i]})
                continue
            if kind == "error":
                yield _sse({"object": "ab.compare.error", "arm": name, "arm_index": i, "error": item})
                continue
            text = item.decode() if isinstance(item, bytes) else item
            for event in text.split("\n\n"):
                if not event.startswith("data: {"):
                    continue
                payload = json.loads(event[len("data: "):])
                if payload.get("usage"):
                    usage[i] = payload["usage"]
                choices = payload.get("choices") or []
                for choice in choices:
                    if choice.get("index", 0) == 0:
                        tokens[i] += choice.get("token_ids") or []
                        texts[i].append((choice.get("delta") or {}).get("content") or "")
                if not choices:
                    continue
                out = {"object": "ab.compare.chunk", "arm": name, "arm_index": i, "choices": choices}
                if not echoed[i]:
                    out["steer"] = applied[i].echo() if applied[i] else None
                    echoed[i] = True
                yield _sse(out)
        summary = []
        for i, arm in enumerate(arms):
            summary.append({"name": arm.name, "latency_ms": latency[i], "usage": usage[i], "text": "".join(texts[i]),
                            "diverges_at": None if i == 0 else diverges_at(tokens[0], tokens[i])})
        yield _sse({"object": "ab.compare.summary", "arms": summary})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
