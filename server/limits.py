"""Per-request caps: what one request may ask of the server (README, "Limits").

Enforced where they are cheapest, each refused with a 4xx naming what was too large:
- body size: `BodyLimit`, a pure ASGI middleware in front of every route (413 before the body is
  read when Content-Length says so, else as soon as the received bytes pass the cap);
- `n` and the number of prompts of one /v1/completions request: vLLM's own checks, with the caps
  lowered by `steerserve serve` (`VLLM_MAX_N_SEQUENCES`, `VLLM_MAX_COMPLETION_PROMPTS`);
- `max_tokens` (<= the context length), `top_logprobs`/`logprobs` (<= 20): vLLM's own checks;
- the `steer` object: nesting depth (`depth_exceeds`), list lengths (schema `MAX_LAYER_LIST`,
  `MAX_HEAD_LIST`), comparison arms (`compare.MAX_ARMS`), feedback comments (`feedback.MAX_COMMENT`).
"""

from __future__ import annotations

import json
import os

MAX_REQUEST_BYTES_ENV = "STEERSERVE_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: ~100x the longest prompt a 4096-token context holds
DEFAULT_MAX_N = 16  # completions per request (vLLM's own default cap is 16384)
DEFAULT_MAX_PROMPTS = 64  # prompts per /v1/completions request (vLLM's default cap is 1024)
MAX_STEER_DEPTH = 8  # nesting levels of the `steer` object (the deepest valid one has 4)
# vLLM routes steerserve does not serve (answered 404, left out of /openapi.json): the structured
# decision API (no model here supports it: vLLM answers 501), elastic expert-parallel scaling
# (administrative, for MoE deployments launched for it), and the Responses API unless
# `serve --enable-responses-api` (steering does not apply there, and vLLM 0.32 answers 500 to some
# inputs: the API fuzz found a `refusal` item in `input` raising AttributeError)
UNSERVED_PATHS = frozenset({"/v1/systemone", "/scale_elastic_ep", "/is_scaling_elastic_ep"})
RESPONSES_API_PREFIX = "/v1/responses"
RESPONSES_API_ENV = "STEERSERVE_ENABLE_RESPONSES_API"


def unserved(path: str) -> bool:
    if path in UNSERVED_PATHS:
        return True
    return (path == RESPONSES_API_PREFIX or path.startswith(RESPONSES_API_PREFIX + "/")) and \
        os.environ.get(RESPONSES_API_ENV) != "1"


def max_request_bytes() -> int:
    raw = os.environ.get(MAX_REQUEST_BYTES_ENV)
    return int(raw) if raw else DEFAULT_MAX_REQUEST_BYTES


def depth_exceeds(value: object, limit: int) -> bool:
    """Whether a JSON value nests containers deeper than `limit` levels (iterative: no recursion
    limit to hit, stops at the first path that is too deep)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _error_body(status: int, message: str, param: str) -> bytes:
    kind = {413: "RequestEntityTooLarge", 400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 (OpenAI error object), and
    answer the vLLM routes steerserve does not serve (`unserved`) with 404."""

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_request_bytes() if max_bytes is None else max_bytes

    async def _refuse(self, send, status: int, message: str) -> None:
        body = _error_body(status, message, "path" if status == 404 else "body")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if unserved(scope.get("path", "")):
            await self._refuse(send, 404, f"{scope.get('path')} is not served by steerserve")
            return
        cap = self.max_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await self._refuse(send, 400, "invalid Content-Length header")
                return
            if size > cap:
                await self._refuse(send, 413, f"request body of {size} bytes is over the server's limit of {cap} "
                                              f"bytes (steerserve serve --max-request-bytes)")
                return
            await self.app(scope, receive, send)  # the HTTP server holds the body to its declared length
            return
        # no declared length (chunked): read the body up to the cap, then hand it on whole
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message]), send)
                return
            received += len(message.get("body", b""))
            if received > cap:
                await self._refuse(send, 413, f"request body is over the server's limit of {cap} bytes "
                                              "(steerserve serve --max-request-bytes)")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages: list, then=None):
    """An ASGI receive that yields `messages`, then defers to `then` (e.g. for http.disconnect)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
