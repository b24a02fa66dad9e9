"""Per-request caps (body size, steer nesting) and the engine's refusal of plans its API server did
not sign, without an engine."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from steerserve.patches import plan as plan_mod
from steerserve.patches.plan import InfoSteerPlan, PlanRefused, SteerPlan, engine_args, plan_from_engine_args
from steerserve.server.limits import RequestGuard, depth_exceeds


@pytest.fixture()
def client():
    app = FastAPI()
    app.add_middleware(RequestGuard, max_bytes=1000)

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
    app.add_middleware(RequestGuard, max_bytes=1000)

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


# ------------------------------------------------------------------ issue 14: the hostile-client cases


def _call(app, scope: dict, messages: list, hang_after: bool = True):
    """Run an ASGI app on one request: `messages` are what the client sends, then (hang_after) it
    sends nothing more, as a stalled client. Returns (status, parsed JSON body or raw bytes)."""
    import asyncio
    import json

    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        if hang_after:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def main():
        await app({"type": "http", "method": "POST", "path": "/echo", "headers": [], **scope}, receive, send)

    asyncio.run(asyncio.wait_for(main(), 10))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


async def _echo_app(scope, receive, send):
    import json

    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = json.dumps({"received": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


def test_stalled_body_gets_408_and_the_connection_closed():
    import time

    guard = RequestGuard(_echo_app, max_bytes=1000, timeout=0.5)
    started = time.perf_counter()
    status, body = _call(guard, {"headers": [(b"content-length", b"100")]},
                         [{"type": "http.request", "body": b"x" * 10, "more_body": True}])
    assert status == 408 and body["error"]["param"] == "body" and "--body-timeout" in body["error"]["message"]
    assert time.perf_counter() - started < 3
    # a body that arrives in time passes whole
    status, body = _call(guard, {}, [{"type": "http.request", "body": b"x" * 10, "more_body": False}], False)
    assert status == 200 and body == {"received": 10}


def test_misplaced_steering_is_a_400_naming_route_and_field():
    import json

    guard = RequestGuard(_echo_app, max_bytes=1 << 20, timeout=5)

    def post(path, payload):
        return _call(guard, {"path": path}, [{"type": "http.request", "body": json.dumps(payload).encode()}], False)

    for path in ("/invocations", "/v1/chat/completions/batch", "/v1/messages", "/tokenize"):
        status, body = post(path, {"model": "m", "steer": {"infosteer": {"alpha": 99}}})
        assert status == 400 and body["error"]["param"] == "steer", (path, body)
        assert path in body["error"]["message"] and "/v1/chat/completions" in body["error"]["message"]
    status, body = post("/invocations", {"prompt": "x", "vllm_xargs": {"steer": "{}"}})
    assert status == 400 and body["error"]["param"] == "vllm_xargs.steer"
    status, body = post("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"extra_args": {
        "steer_signature": "0" * 64}}})
    assert status == 400 and body["error"]["param"] == "sampling_params.extra_args.steer_signature"
    # the steering routes pass it on; other routes without steering pass
    assert post("/v1/chat/completions", {"steer": {}})[0] == 200
    assert post("/invocations", {"prompt": "a steer in text", "vllm_xargs": {"other": 1}})[0] == 200


def test_deep_body_is_a_400_naming_its_top_level_key():
    import json

    from steerserve.server.limits import MAX_BODY_DEPTH, body_too_deep, deepest_top_level_key

    guard = RequestGuard(_echo_app, max_bytes=1 << 20, timeout=5)
    deep = '{"model": "m", "steer": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    status, body = _call(guard, {"path": "/v1/chat/completions"}, [{"type": "http.request", "body": deep.encode()}],
                         False)
    assert status == 400 and body["error"]["param"] == "steer" and "nested deeper than 8" in body["error"]["message"]
    tools = '{"tools": ' + "[" * 100 + "]" * 100 + "}"
    status, body = _call(guard, {}, [{"type": "http.request", "body": tools.encode()}], False)
    assert status == 400 and body["error"]["param"] == "tools"
    # brackets inside strings do not count; nesting up to the cap passes
    assert not body_too_deep(json.dumps({"content": "[{" * 10_000}).encode())
    ok = "[" * MAX_BODY_DEPTH + "]" * MAX_BODY_DEPTH
    assert not body_too_deep(ok.encode()) and body_too_deep(("[" + ok + "]").encode())
    assert deepest_top_level_key(b'{"a": 1, "b": [[[[1]]]]}', 3) == "b"


def test_error_bodies_cap_every_string():
    import json

    from steerserve.server.limits import ERROR_STRING_CAP, ErrorCap, shown

    async def vllm_like(scope, receive, send):  # vLLM's "model does not exist" echoes the name
        payload = json.dumps({"error": {"message": "The model `" + "m" * (1 << 20) + "` does not exist.",
                                        "param": "model", "code": 404}}).encode()
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    status, body = _call(ErrorCap(vllm_like), {}, [{"type": "http.request", "body": b""}], False)
    assert status == 404 and len(json.dumps(body)) < ERROR_STRING_CAP + 200
    assert "characters]" in body["error"]["message"] and body["error"]["param"] == "model"
    assert shown("x" * 10) == "'xxxxxxxxxx'" and len(shown("x" * 10**6)) < 240


def test_default_deny_guards_every_path_but_the_public_ones():
    from steerserve.server.auth import DefaultDeny

    app = FastAPI()

    for path in ("/health", "/metrics", "/playground", "/invocations", "/tokenize", "/v1/models"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET", "POST"])
    app.add_middleware(DefaultDeny, key="s3cret", public=frozenset({"/health", "/metrics"}))
    client = TestClient(app)
    for path in ("/invocations", "/tokenize", "/v1/models", "/playground"):
        r = client.post(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401, path
        assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models?api_key=s3cret").status_code == 401  # no credentials in the query string
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.post("/health").status_code == 401  # public means read-only


def test_public_routes_flag_values(monkeypatch):
    from steerserve.server import auth

    monkeypatch.delenv(auth.PUBLIC_ROUTES_ENV, raising=False)
    assert auth.public_paths() == {"/health", "/ping", "/metrics", "/playground"}
    monkeypatch.setenv(auth.PUBLIC_ROUTES_ENV, "none")
    assert auth.public_paths() == {"/health", "/ping"}
    monkeypatch.setenv(auth.PUBLIC_ROUTES_ENV, "metrics")
    assert auth.public_paths() == {"/health", "/ping", "/metrics"}
    monkeypatch.setenv(auth.PUBLIC_ROUTES_ENV, "docs")
    assert auth.public_paths() == {"/health", "/ping", "/docs", "/docs/oauth2-redirect", "/openapi.json",
                                   "/static/swagger-ui-bundle.js", "/static/swagger-ui.css"}
    with pytest.raises(ValueError, match="allowed: metrics, playground, docs"):
        auth.parse_public_routes("metrics,admin")


def test_query_string_credentials_are_redacted_from_logs():
    import logging

    from steerserve.server.auth import QueryCredentialFilter, redact_query

    assert redact_query("/v1/models?api_key=abc&x=1") == "/v1/models?api_key=<redacted>&x=1"
    assert redact_query("/x?a=1&token=zz") == "/x?a=1&token=<redacted>"
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/v1/models?api_key=s3cret", "1.1", 401), None)
    QueryCredentialFilter().filter(record)
    assert "s3cret" not in record.getMessage() and "<redacted>" in record.getMessage()


def test_rejected_field_labels_are_a_closed_set():
    from steerserve.server.metrics import OTHER, field_label

    assert field_label("steer.infosteer.alpha") == "steer.infosteer.alpha"
    assert field_label("steer.context_attention.heads[3]") == "steer.context_attention.heads"
    assert field_label("steer.mixing.variant") == "steer.mixing.variant"
    assert field_label("steer.proxy.weight") == "steer.proxy"
    assert field_label("messages[2].content") == "messages.content"
    for hostile in ("steer." + "k" * 10**6, "steer.unknown", "steer.infosteer" + "[0]" * 3 + "x" * 300, "", None):
        assert field_label(hostile) in (OTHER, "steer.infosteer"), hostile
    assert field_label("steer.nope") == OTHER
