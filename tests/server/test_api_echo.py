"""The response echo on JSON and SSE responses (no server needed)."""

import asyncio
import json

from fastapi.responses import JSONResponse, StreamingResponse

from steerserve.patches.plan import InfoSteerPlan, SteerPlan
from steerserve.server.api import Applied, with_echo

PLAN = Applied(SteerPlan(infosteer=InfoSteerPlan(layers=(1,), mode="scale", alpha=2.0)), profile="p1")


def _drain(response) -> str:
    async def collect():
        return "".join([c if isinstance(c, str) else c.decode() async for c in response.body_iterator])

    return asyncio.run(collect())


def test_json_echo_and_untouched_cases():
    r = with_echo(JSONResponse({"id": "x", "choices": []}), PLAN)
    assert json.loads(r.body)["steer"] == PLAN.echo()
    assert PLAN.echo()["profile"] == "p1" and PLAN.echo()["applied"][0]["alpha"] == 2.0
    assert "profile" not in Applied(SteerPlan()).echo()
    error = JSONResponse({"error": {}}, status_code=400)
    assert with_echo(error, PLAN) is error
    plain = JSONResponse({"id": "y"})
    assert with_echo(plain, None) is plain and with_echo(None, PLAN) is None


def test_stream_echo_on_first_data_event_only():
    async def gen():
        yield ": keep-alive\n\n"
        yield 'data: {"id": "a"}\n\ndata: {"id": "b"}\n\n'
        yield 'data: {"id": "c"}\n\n'
        yield "data: [DONE]\n\n"

    text = _drain(with_echo(StreamingResponse(gen(), media_type="text/event-stream"), PLAN))
    events = [e for e in text.split("\n\n") if e]
    assert events[0] == ": keep-alive"
    assert json.loads(events[1][6:]) == {"id": "a", "steer": PLAN.echo()}
    assert json.loads(events[2][6:]) == {"id": "b"} and json.loads(events[3][6:]) == {"id": "c"}
    assert events[4] == "data: [DONE]"


def test_diverges_at():
    from steerserve.server.compare import diverges_at

    assert diverges_at([1, 2, 3], [1, 2, 3]) is None
    assert diverges_at([1, 2, 3], [1, 5, 3]) == 1
    assert diverges_at([1, 2, 3], [1, 2]) == 2 and diverges_at([1], [1, 2]) == 1
    assert diverges_at([], [4]) == 0
