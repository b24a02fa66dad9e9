"""Per-request caps: what one request may ask of the server (docs/reliability.md, "Limits").

Enforced where they are cheapest, each refused with a 4xx naming what was too large:
- body size, body read time, body nesting, steering sent to a route that does not steer:
  `RequestGuard`, a pure ASGI middleware in front of every route (413 / 408 / 400); header read
  time: the HTTP server's protocol (`patches.adapter.server.install_http_timeouts`, 408-free close);
- error bodies: client values echoed at most ECHO_CAP characters (`shown`), every string of any
  JSON error body at most ERROR_STRING_CAP (`ErrorCap`, for vLLM's own messages too);
- `n` and the number of prompts of one /v1/completions request: vLLM's own checks, with the caps
  lowered by `steerserve serve` (`VLLM_MAX_N_SEQUENCES`, `VLLM_MAX_COMPLETION_PROMPTS`);
- `max_tokens` (<= the context length), `top_logprobs`/`logprobs` (<= 20): vLLM's own checks;
- the `steer` object: nesting depth (`depth_exceeds`), list lengths (`MAX_LAYER_LIST`,
  `MAX_HEAD_LIST` of the steers' Specs), comparison arms (`compare.MAX_ARMS`), feedback comments (`feedback.MAX_COMMENT`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re

from steerserve.patches.steers.base import ECHO_CAP, shown  # noqa: F401  (re-exported)

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


# ------------------------------------------------------------------ echoed values in error messages

ERROR_STRING_CAP = 1024  # any string in an error body (vLLM's own messages included) is cut to this


def _cap_strings(value: object, cap: int) -> object:
    if isinstance(value, str) and len(value) > cap:
        return f"{value[:cap]}... [cut: {len(value)} characters]"
    if isinstance(value, dict):
        return {k: _cap_strings(v, cap) for k, v in value.items()}
    if isinstance(value, list):
        return [_cap_strings(v, cap) for v in value]
    return value


# ------------------------------------------------------------------ JSON nesting of a whole body

MAX_BODY_DEPTH = 64  # nesting levels of a request body (a chat with tool schemas needs ~10)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def body_too_deep(body: bytes, limit: int = MAX_BODY_DEPTH) -> bool:
    """Whether a JSON text nests containers deeper than `limit` (brackets inside strings do not
    count). Runs at C speed: strings are cut out by a regex, the brackets counted with numpy."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    import numpy as np

    brackets = _STRING.sub(b'""', body).translate(None, bytes(c for c in range(256) if c not in b"[]{}"))
    steps = np.frombuffer(brackets, dtype=np.uint8)
    depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1))
    return bool(depth.size) and int(depth.max()) > limit


def deepest_top_level_key(body: bytes, limit: int = MAX_BODY_DEPTH) -> str | None:
    """The top-level key of a JSON object under which nesting first passes `limit` (None when the
    body is not an object or no key is found). Stops at the first such place."""
    depth, last_string = 0, None
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return last_string
        elif token in (b"]", b"}"):
            depth -= 1
        elif depth == 1:
            try:
                last_string = json.loads(token)
            except ValueError:
                last_string = None
    return None


# ------------------------------------------------------------------ steering on routes that do not steer

STEERING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/ab/compare"})
_RESERVED_XARGS = ("steer", "steer_signature")


def misplaced_steering(path: str, body: object) -> tuple[str, str] | None:
    """(field, message) when a request to a route that does not apply steering carries it: a
    top-level `steer`, or steerserve's reserved keys in `vllm_xargs` / `sampling_params.extra_args`
    (silently ignored steering is the complaint users of steering tools make most)."""
    if path in STEERING_PATHS or not isinstance(body, dict):
        return None
    where = "steering is served on " + ", ".join(sorted(STEERING_PATHS))
    if "steer" in body:
        return "steer", f"{path} does not apply steering ({where}): remove `steer` or send the request there"
    nested = [("vllm_xargs", body.get("vllm_xargs"))]
    params = body.get("sampling_params")
    if isinstance(params, dict):
        nested.append(("sampling_params.extra_args", params.get("extra_args")))
    for prefix, extra in nested:
        if isinstance(extra, dict):
            for key in _RESERVED_XARGS:
                if key in extra:
                    return f"{prefix}.{key}", (f"{prefix}.{key} is reserved for steerserve and not applied on {path} "
                                               f"({where}, as the `steer` field)")
    return None


# ------------------------------------------------------------------ the middleware

BODY_TIMEOUT_ENV = "STEERSERVE_BODY_TIMEOUT"
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a whole body once its headers are in (4 MiB at ~140 kB/s)


def body_timeout() -> float:
    raw = os.environ.get(BODY_TIMEOUT_ENV)
    return float(raw) if raw else DEFAULT_BODY_TIMEOUT


def _error_body(status: int, message: str, param: str | None) -> bytes:
    kind = {413: "RequestEntityTooLarge", 400: "BadRequestError", 404: "NotFoundError",
            408: "RequestTimeout"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def _refuse(send, status: int, message: str, param: str | None) -> None:
    body = _error_body(status, message, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware in front of every route (API server process). In order:
    1. the vLLM routes steerserve does not serve (`unserved`) answer 404;
    2. a body over `max_bytes` is refused with 413 (from Content-Length before it is read, else as
       soon as the received bytes pass the cap);
    3. a body not received whole within `timeout` seconds of its headers is refused with 408 and
       the connection closed (a stalled client cannot hold a worker slot);
    4. a JSON body nested deeper than MAX_BODY_DEPTH is refused with 400 naming its top-level key;
    5. steering sent to a route that does not apply it is refused with 400 (`misplaced_steering`).
    The body is read once here and handed on whole."""

    def __init__(self, app, max_bytes: int | None = None, timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_request_bytes() if max_bytes is None else max_bytes
        self.timeout = body_timeout() if timeout is None else timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if unserved(path):
            await _refuse(send, 404, f"{path} is not served by steerserve", "path")
            return
        cap = self.max_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _refuse(send, 400, "invalid Content-Length header", "body")
                return
            if size > cap:
                await _refuse(send, 413, f"request body of {size} bytes is over the server's limit of {cap} bytes "
                                         "(steerserve serve --max-request-bytes)", "body")
                return
        chunks, received = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        await self.app(scope, _replay([message]), send)
                        return
                    received += len(message.get("body", b""))
                    if received > cap:
                        await _refuse(send, 413, f"request body is over the server's limit of {cap} bytes "
                                                 "(steerserve serve --max-request-bytes)", "body")
                        return
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _refuse(send, 408, f"the request body was not received within {self.timeout:g} s of its headers "
                                     "(steerserve serve --body-timeout)", "body")
            return
        body = b"".join(chunks)
        problem = self._check_body(path, scope.get("method", "GET"), body)
        if problem is not None:
            await _refuse(send, 400, problem[1], problem[0])
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    @staticmethod
    def _check_body(path: str, method: str, body: bytes) -> tuple[str, str] | None:
        if method != "POST" or not body:
            return None
        if body_too_deep(body):
            key = deepest_top_level_key(body)
            if key == "steer":
                return "steer", f"nested deeper than {MAX_STEER_DEPTH} levels (the deepest valid steer object has 4)"
            field = key if isinstance(key, str) and len(key) <= ECHO_CAP else "body"
            return field, f"nested deeper than {MAX_BODY_DEPTH} levels"
        if path in STEERING_PATHS or (b'"steer' not in body):
            return None
        try:
            parsed = json.loads(body)
        except ValueError:
            return None  # the route reports malformed JSON itself
        return misplaced_steering(path, parsed)


class ErrorCap:
    """ASGI middleware: in JSON error responses (status >= 400), every string longer than
    ERROR_STRING_CAP is cut (vLLM's own messages echo request values at any size)."""

    def __init__(self, app, cap: int = ERROR_STRING_CAP) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict = {}
        parts: list[bytes] = []

        async def capped_send(message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or ())
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"] = message
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(parts)
                if len(body) > self.cap:
                    try:
                        body = json.dumps(_cap_strings(json.loads(body), self.cap)).encode()
                    except ValueError:
                        body = body[: 4 * self.cap]
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers") or () if k.lower() != b"content-length"]
                await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capped_send)


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
