"""Per-request caps (body size, steer nesting) and the engine's refusal of plans its API server did
not sign, without an engine."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from steerserve.patches import plan as plan_mod
from steerserve.patches.plan import InfoSteerPlan, PlanRefused, SteerPlan, engine_args, plan_from_engine_args
from steerserve.server.limits import BodyLimit, depth_exceeds


@pytest.fixture()
def client():
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=1000)

    @app.post("/echo")
    async def echo(request: Request):
        return {"received": len(await request.body())}

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    return TestClient(app)


def test_body_limit_declared_and_chunked(client):
    assert client.post("/echo", content=b"x" * 1000).json() == {"received": 1000}
    r = client.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["param"] == "body" and "1001 bytes" in err["message"] and "--max-request-bytes" in err["message"]

    def chunks(n):  # a generator body is sent chunked, without Content-Length
        for _ in range(n):
            yield b"y" * 100

    assert client.post("/echo", content=chunks(10)).json() == {"received": 1000}
    r = client.post("/echo", content=chunks(11))
    assert r.status_code == 413 and "over the server's limit of 1000 bytes" in r.json()["error"]["message"]
    assert client.get("/ping").json() == {"ok": True}
    r = client.post("/echo", content=b"x", headers={"content-length": "abc"})
    assert r.status_code == 400


def test_depth_exceeds():
    assert not depth_exceeds({"infosteer": {"layers": [1, 2]}}, 3)
    assert depth_exceeds({"infosteer": {"layers": [1, 2]}}, 2)
    assert not depth_exceeds("scalar", 0)
    deep: list = []
    for _ in range(100_000):  # far past Python's recursion limit: the check is iterative
        deep = [deep]
    assert depth_exceeds(deep, 8)


def test_engine_runs_only_signed_plans(monkeypatch):
    plan = SteerPlan(infosteer=InfoSteerPlan(layers=(0,), mode="scale", alpha=2.0))
    monkeypatch.delenv(plan_mod.PLAN_KEY_ENV, raising=False)
    args = engine_args(plan)
    assert set(args) == {"steer"} and plan_from_engine_args(args) == plan  # offline use: trusted
    assert plan_from_engine_args({}) is None
    monkeypatch.setenv(plan_mod.PLAN_KEY_ENV, "k" * 64)
    signed = engine_args(plan)
    assert plan_from_engine_args(signed) == plan
    with pytest.raises(PlanRefused, match="not signed"):
        plan_from_engine_args({"steer": signed["steer"]})  # unsigned (e.g. vllm_xargs on /v1/responses)
    forged = plan.to_json().replace("2.0", "9.0")
    with pytest.raises(PlanRefused, match="not signed"):
        plan_from_engine_args({"steer": forged, plan_mod.SIGNATURE_KEY: signed[plan_mod.SIGNATURE_KEY]})
    bad = "garbage"
    with pytest.raises(PlanRefused, match="malformed"):
        plan_from_engine_args({"steer": bad, plan_mod.SIGNATURE_KEY: plan_mod.plan_signature(bad, b"k" * 64)})
    with pytest.raises(PlanRefused, match="not a string"):
        plan_from_engine_args({"steer": 5})


def test_unserved_vllm_routes_are_404():
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=1000)

    @app.post("/v1/systemone")
    async def systemone():
        return {"never": "reached"}

    @app.get("/v1/responses/{rid}")
    async def responses(rid: str):
        return {"id": rid}

    client = TestClient(app)
    r = client.post("/v1/systemone", json={})
    assert r.status_code == 404 and r.json()["error"]["param"] == "path"
    assert client.get("/v1/responses/x").status_code == 404
    import os

    os.environ["STEERSERVE_ENABLE_RESPONSES_API"] = "1"
    try:
        assert client.get("/v1/responses/x").json() == {"id": "x"}
    finally:
        del os.environ["STEERSERVE_ENABLE_RESPONSES_API"]
