"""Prometheus metrics of steerserve, exposed on vLLM's own `/metrics` (default registry, or the
multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set). API server process only."""

from __future__ import annotations

import json
import re
import time

from fastapi.responses import StreamingResponse
from prometheus_client import Counter, Histogram

from steerserve.patches.plan import SteerPlan

from .schema import FIELD_PATHS

REQUESTS = Counter(
    "steerserve_requests",
    "Generation requests by endpoint and steer kind (none: no steer field; neutral: steer given "
    "but normalised to nothing)",
    ["endpoint", "steer"],
)
REJECTED = Counter(
    "steerserve_steer_rejected",
    "Requests refused with HTTP 400 for a bad steer value, by field (a closed set: the steer "
    "object's documented fields, index-free; anything else counts as `other`)",
    ["field"],
)
OTHER = "other"


# the request fields a steer error can name besides the schema's (the unit key, the prompt, a message)
_REQUEST_FIELDS = frozenset({"user", "prompt", "messages.content"})


def field_label(field: str | None) -> str:
    """The metrics label for a rejected field: its path without list indices when the schema has
    it (an unknown key inside a steer, such as `steer.proxy.weight`, counts under that steer), else
    `other`. Client input never becomes a label."""
    if not field or len(field) > 200:
        return OTHER
    path = re.sub(r"\[[^\]]*\]", "", field)
    while path:
        if path in FIELD_PATHS or path in _REQUEST_FIELDS:
            return path
        if "." not in path:
            break
        path = path.rsplit(".", 1)[0]
        if path == "steer":  # an unknown key directly under `steer`
            break
    return OTHER


def count_rejected(field: str | None) -> None:
    REJECTED.labels(field=field_label(field)).inc()


def count_request(endpoint: str, plan: SteerPlan | None) -> None:
    if plan is None:
        kinds = ["none"]
    elif plan.is_empty:
        kinds = ["neutral"]
    else:
        kinds = [a["steer"] for a in plan.applied()]
    for kind in kinds:
        REQUESTS.labels(endpoint=endpoint, steer=kind).inc()


# ---------------------------------------------------------------- A/B experiments, per arm

_AB = ["experiment", "arm"]
AB_REQUESTS = Counter("steerserve_ab_requests", "Experiment requests by arm", _AB)
AB_ERRORS = Counter("steerserve_ab_errors", "Experiment requests that ended in an error, by arm", _AB)
AB_PROMPT_TOKENS = Counter("steerserve_ab_prompt_tokens", "Prompt tokens of experiment requests", _AB)
AB_GENERATION_TOKENS = Counter("steerserve_ab_generation_tokens", "Generated tokens of experiment requests", _AB)
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
AB_TTFT = Histogram("steerserve_ab_time_to_first_token_seconds",
                    "Time to the first token (non-streaming: to the whole response), by arm", _AB, buckets=_BUCKETS)
AB_LATENCY = Histogram("steerserve_ab_request_latency_seconds", "End-to-end request latency, by arm", _AB,
                       buckets=_BUCKETS)


def _count_usage(labels: dict, usage: dict | None) -> None:
    if usage:
        AB_PROMPT_TOKENS.labels(**labels).inc(usage.get("prompt_tokens") or 0)
        AB_GENERATION_TOKENS.labels(**labels).inc(usage.get("completion_tokens") or 0)


async def _tracked_stream(chunks, labels: dict, started: float):
    first = True
    failed = False
    try:
        async for chunk in chunks:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            if text.startswith("data: {"):
                if first:
                    AB_TTFT.labels(**labels).observe(time.perf_counter() - started)
                    first = False
                if '"usage": {' in text or '"usage":{' in text or '"error"' in text:
                    for event in text.split("\n\n"):
                        if event.startswith("data: {"):
                            payload = json.loads(event[len("data: "):])
                            _count_usage(labels, payload.get("usage"))
                            failed = failed or "error" in payload
            yield chunk
    finally:
        if failed:
            AB_ERRORS.labels(**labels).inc()
        AB_LATENCY.labels(**labels).observe(time.perf_counter() - started)


def track_experiment(response, experiment: tuple[str, str] | None, started: float):
    """Record per-arm metrics of an experiment request (streams: as they are sent)."""
    if experiment is None:
        return response
    labels = {"experiment": experiment[0], "arm": experiment[1]}
    AB_REQUESTS.labels(**labels).inc()
    if response is None or response.status_code != 200:
        AB_ERRORS.labels(**labels).inc()
        AB_LATENCY.labels(**labels).observe(time.perf_counter() - started)
        return response
    if isinstance(response, StreamingResponse):
        response.body_iterator = _tracked_stream(response.body_iterator, labels, started)
        return response
    elapsed = time.perf_counter() - started
    AB_TTFT.labels(**labels).observe(elapsed)
    AB_LATENCY.labels(**labels).observe(elapsed)
    _count_usage(labels, json.loads(response.body).get("usage"))
    return response
