"""Prometheus metrics of steerserve, exposed on vLLM's own `/metrics` (default registry, or the
multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set). API server process only."""

from __future__ import annotations

from prometheus_client import Counter

from steerserve.patches.plan import SteerPlan

REQUESTS = Counter(
    "steerserve_requests",
    "Generation requests by endpoint and steer kind (none: no steer field; neutral: steer given "
    "but normalised to nothing)",
    ["endpoint", "steer"],
)
REJECTED = Counter(
    "steerserve_steer_rejected",
    "Requests refused with HTTP 400 for a bad steer value, by field",
    ["field"],
)


def count_request(endpoint: str, plan: SteerPlan | None) -> None:
    if plan is None:
        kinds = ["none"]
    elif plan.is_empty:
        kinds = ["neutral"]
    else:
        kinds = [a["steer"] for a in plan.applied()]
    for kind in kinds:
        REQUESTS.labels(endpoint=endpoint, steer=kind).inc()
