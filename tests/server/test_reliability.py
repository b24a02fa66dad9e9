"""Reliability suite against a real server (tiny random Llama, float32, 256-token context, API key):
hostile input refused by documented caps, every route behind the key, closed metric labels, stalled
clients cut off, steering refused where it cannot apply, capped error bodies, prefix-cache isolation
of emphasis spans, a schemathesis fuzz of every route of /openapi.json (the `steer` object and the
key requirement included), 64 concurrent streaming clients with a quarter hanging up, and the
engine process killed under load. The long variants are commands: `steerserve loadtest` against
any server, and the fuzz with more examples (docs/reliability.md)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from server_proc import running_server_proc

pytestmark = pytest.mark.e2e

API_KEY = "rel-key-8c31d2e7"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "Say something."}]
FUZZ_EXAMPLES = 140  # per operation (routes with few distinct inputs run out sooner): ~1250 cases


CONFIG = """
profiles:
  strong: {infosteer: {alpha: 3.0}}
experiments:
  tone:
    arms:
      - {name: control}
      - {name: strong, profile: strong}
"""


TIMEOUT_S = 3  # --header-timeout and --body-timeout of the test server


def server_args(model, root):
    return ["--model", str(model), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256",
            "--kv-cache-gb", "0.25", "--feedback-db", str(root / "ab.sqlite3"), "--config", str(root / "config.yaml"),
            "--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S)]


def server_env(root):
    return {"STEERSERVE_API_KEY": API_KEY, "STEERSERVE_HOME": str(root / "home")}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "config.yaml").write_text(CONFIG)
    log = root / "server.log"
    with running_server_proc(server_args(tiny_llama, root), log, env=server_env(root)) as (base, proc):
        yield base, proc, log, root


@pytest.fixture(scope="module")
def experiment_record():
    """What the experiment test recorded (arm -> (responses, feedback)), for the restart test."""
    return {}


def post(base, path, body=None, headers=None, **kw):
    return httpx.post(f"{base}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=120, **kw)


def chat_body(**kw):
    return {"model": "tiny", "messages": MSG, "max_tokens": 4, "temperature": 0.0, **kw}


def error_of(r):
    return r.json()["error"]


def test_documented_caps_refuse_hostile_input(server):
    base, *_ = server
    # body size: refused from its Content-Length, before it is read
    r = post(base, "/v1/chat/completions", content=b"{" + b" " * (5 << 20) + b"}",
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4194304" in error_of(r)["message"]
    # n, prompts per request, max_tokens, logprobs: vLLM's own checks (caps lowered by serve)
    r = post(base, "/v1/chat/completions", chat_body(n=17))
    assert r.status_code == 400 and "n must be at most 16" in error_of(r)["message"]
    r = post(base, "/v1/completions", {"model": "tiny", "prompt": ["x"] * 65, "max_tokens": 1})
    assert r.status_code == 400 and "64" in error_of(r)["message"]
    r = post(base, "/v1/chat/completions", chat_body(max_tokens=10**12))
    assert r.status_code == 400 and "max_tokens" in error_of(r)["message"]
    r = post(base, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=1000))
    assert r.status_code == 400
    # the steer object: nesting depth, list lengths
    deep: dict = {"variant": "x"}
    for _ in range(20):
        deep = {"variant": deep}
    r = post(base, "/v1/chat/completions", chat_body(steer={"mixing": deep}))
    assert r.status_code == 400 and error_of(r)["param"] == "steer" and "nested deeper" in error_of(r)["message"]
    r = post(base, "/v1/chat/completions", chat_body(steer={"infosteer": {"alpha": 2, "layers": [0] * 1025}}))
    assert r.status_code == 400 and error_of(r)["param"] == "steer.infosteer.layers"
    r = post(base, "/v1/chat/completions",
             chat_body(steer={"context_attention": {"alpha": 0.5, "heads": [[0, 0]] * 4097}}))
    assert r.status_code == 400 and error_of(r)["param"] == "steer.context_attention.heads"
    r = post(base, "/v1/ab/compare", chat_body(arms=[{"name": f"a{i}", "steer": {}} for i in range(9)]))
    assert r.status_code == 400 and error_of(r)["param"] == "arms"
    r = post(base, "/v1/systemone", {})
    assert r.status_code == 404
    assert httpx.get(f"{base}/health").status_code == 200


def test_no_request_field_loads_files_models_or_code(server):
    base, *_ = server
    # a chat template in the request (Jinja code): refused, vLLM's --trust-request-chat-template is off
    r = post(base, "/v1/chat/completions", chat_body(chat_template="{{ ''.__class__ }}"))
    assert r.status_code == 400
    # local files as media: refused (no --allowed-local-media-path; the model is text-only anyway)
    r = post(base, "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]))
    assert r.status_code == 400
    # a model path instead of a served name: 404, nothing loaded
    r = post(base, "/v1/chat/completions", chat_body(model=str(Path.home())))
    assert r.status_code == 404
    # steering names only what the server loaded: head sets, profiles, variants, proxy pairs
    for steer, field in (({"context_attention": {"heads": "/etc/passwd"}}, "steer.context_attention.heads"),
                         ({"profile": "../../etc/passwd"}, "steer.profile"),
                         ({"mixing": {"variant": "/tmp/model"}}, "steer.mixing"),
                         ({"proxy": {"pair": "/tmp/expert"}}, "steer.proxy")):
        r = post(base, "/v1/chat/completions", chat_body(steer=steer))
        assert r.status_code == 400 and error_of(r)["param"].startswith(field), (steer, r.text)


def test_steering_on_routes_that_do_not_steer_is_refused(server):
    """vLLM's other generation routes would ignore `steer` (silently unsteered) and pass
    `vllm_xargs` through (a forged plan used to take the engine down; the engine still runs only
    signed plans, see test_vllm_adapter): both are refused with a 400 naming the route and field."""
    base, *_ = server
    forged = json.dumps({"infosteer": {"layers": [99], "mode": "topk", "alpha": 2.0, "k": 10**6, "m": 0, "p": 0}})
    for path, body in (("/invocations", {"model": "tiny", "prompt": "Hello there", "max_tokens": 6}),
                       ("/invocations", {"model": "tiny", "messages": MSG, "max_tokens": 6}),
                       ("/v1/chat/completions/batch", {"model": "tiny", "messages": [MSG], "max_tokens": 4}),
                       ("/v1/messages", {"model": "tiny", "messages": MSG, "max_tokens": 4})):
        r = post(base, path, {**body, "steer": {"infosteer": {"alpha": 99}}})
        assert r.status_code == 400 and error_of(r)["param"] == "steer" and path in error_of(r)["message"], r.text
        r = post(base, path, {**body, "vllm_xargs": {"steer": forged, "steer_signature": "0" * 64}})
        assert r.status_code == 400 and error_of(r)["param"] == "vllm_xargs.steer", r.text
        assert post(base, path, body).status_code == 200, (path, body)  # the route itself still serves
    assert post(base, "/v1/responses", {"model": "tiny", "input": "Hi"}).status_code == 404  # off by default
    assert httpx.get(f"{base}/health").status_code == 200


PUBLIC = {("GET", "/health"), ("GET", "/ping"), ("GET", "/metrics"), ("GET", "/playground")}


def test_every_route_requires_the_key(server, tiny_llama, monkeypatch):
    """Default deny: every route the app serves (enumerated from vLLM's own app builder, so a
    route a vLLM upgrade adds is covered) answers 401 without the key, except the public ones."""
    from steerserve.patches.adapter.server import served_routes

    base, *_ = server
    monkeypatch.setenv("VLLM_PLUGINS", "steerserve,steerserve_api")
    routes = served_routes(["--model", str(tiny_llama)])
    assert len(routes) > 30 and ("POST", "/invocations") in routes and ("POST", "/generative_scoring") in routes
    checked = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for method, path in routes:
            url = re.sub(r"\{[^}]+\}", "x", path)
            r = client.request(method, url, json={"model": "tiny", "prompt": "hi", "max_tokens": 2}
                               if method == "POST" else None)
            if (method, path) in PUBLIC:
                assert r.status_code == 200, (method, path, r.status_code)
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
                assert r.json()["error"]["code"] == 401
                checked.append(path)
            # the key in the query string is no key
            r = client.request(method, f"{url}?api_key={API_KEY}", json={} if method == "POST" else None)
            assert r.status_code == 401 or (method, path) in PUBLIC
        # the reproduction: generation on /invocations with no key
        r = client.post("/invocations", json={"model": "tiny", "messages": MSG, "max_tokens": 8})
        assert r.status_code == 401
    print(f"{len(checked)} routes answered 401 without the key: {sorted(set(checked))}")


def test_metrics_labels_do_not_grow_with_client_input(server):
    """1000 requests with unique 1 kB unknown steer keys: /metrics stays the same size (within the
    digits of its counters); the rejections count under `other`."""
    from prometheus_client.parser import text_string_to_metric_families

    base, *_ = server
    with httpx.Client(base_url=base, headers=AUTH, timeout=60) as client:
        def bad(i):
            key = f"k{i:06d}" + "x" * 1000
            r = client.post("/v1/chat/completions", json=chat_body(steer={key: 1}))
            assert r.status_code == 400 and len(r.content) < 2000, r.text[:300]

        bad(1000)  # the first rejection creates the label
        before = len(client.get("/metrics").content)
        for i in range(1000):
            bad(i)
        text = client.get("/metrics").text
    assert abs(len(text) - before) < 400, (before, len(text))
    rejected = {s.labels["field"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "steerserve_steer_rejected" for s in f.samples if s.name.endswith("_total")}
    assert rejected.get("other", 0) >= 1001 and all(len(k) < 100 for k in rejected)


def test_stalled_clients_are_cut_off(server):
    """A client that never finishes its headers is disconnected after --header-timeout; one that
    never finishes its body gets 408 after --body-timeout (with the key) or 401 at once (without)."""
    import socket

    base, *_ = server
    host, port = base.removeprefix("http://").split(":")

    def exchange(data: bytes) -> tuple[bytes, float]:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S * 5) as sock:
            sock.sendall(data)
            started, got = time.time(), b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got, time.time() - started

    got, took = exchange(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    assert got == b"" and took < TIMEOUT_S + 2, (got, took)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 500\r\nAuthorization: Bearer {API_KEY}\r\n\r\n").encode()
    got, took = exchange(head + b'{"model": "tiny", ')
    assert got.startswith(b"HTTP/1.1 408") and b"--body-timeout" in got and TIMEOUT_S - 0.5 < took < TIMEOUT_S + 2
    got, took = exchange(head.replace(API_KEY.encode(), b"wrong") + b'{"model": ')
    assert got.startswith(b"HTTP/1.1 401") and took < 1
    assert httpx.get(f"{base}/health").status_code == 200


def test_error_bodies_do_not_echo_megabytes(server):
    base, *_ = server
    huge = "p" * (1 << 20)
    for body in (chat_body(steer={"profile": huge}), chat_body(model=huge), chat_body(steer={huge: 1}),
                 chat_body(steer={"mixing": {huge: 1}}), chat_body(max_tokens=huge)):
        r = post(base, "/v1/chat/completions", body)
        assert 400 <= r.status_code < 500 and len(r.content) < 2500, (r.status_code, len(r.content))
    r = post(base, "/v1/ab/feedback", {"response_id": "r" * 256, "thumbs": "up"})
    assert r.status_code == 404 and len(r.content) < 1000


def test_contract_edges(server):
    base, *_ = server
    # nulls mean the default wherever the schema marks a field nullable
    for steer in ({"experiment": None}, {"profile": None}, {"infosteer": {"alpha": None}},
                  {"infosteer": {"alpha": 2, "layers": None}, "context_attention": None}):
        r = post(base, "/v1/chat/completions", chat_body(steer=steer))
        assert r.status_code == 200, (steer, r.text)
    # numbers are canonical in plans: -0.0 is 0.0 (one fingerprint, one cache salt)
    echoes = [post(base, "/v1/chat/completions", chat_body(steer={"infosteer": {"alpha": a}})).json()["steer"]
              for a in (0.0, -0.0)]
    assert echoes[0] == echoes[1] and echoes[1]["applied"][0]["alpha"] == 0.0
    # max_tokens beyond the context: 400; prompt + max_tokens beyond it: truncated at the context end
    r = post(base, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 257})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = post(base, "/v1/completions", {"model": "tiny", "prompt": "Hi " * 100, "max_tokens": 250, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["total_tokens"] <= 256
    # a steer object 5000 levels deep: 400 naming `steer`
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    r = post(base, "/v1/chat/completions", content=('{"model": "tiny", "messages": [{"role": "user", "content": '
                                                    '"x"}], "max_tokens": 2, "steer": ' + deep + "}").encode(),
             headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["param"] == "steer", r.text[:300]


def test_vllm_streaming_echo_logprobs_n_bug(server):
    """vLLM 0.32 puts a 500 error event in a streaming /v1/completions with echo + logprobs + n > 1
    (our route refuses the combination with a 400 naming `n`). /invocations reaches vLLM's stock
    handler: when this stops failing there, vLLM fixed it and the refusal can go."""
    base, *_ = server
    body = {"model": "tiny", "max_tokens": 3, "echo": True, "logprobs": 1, "n": 4, "stream": True}
    r = post(base, "/v1/completions", {**body, "prompt": "Hello"})
    assert r.status_code == 400 and error_of(r)["param"] == "n" and "stream" in error_of(r)["message"]
    assert post(base, "/v1/completions", {**body, "prompt": "Hello", "stream": False}).status_code == 200
    r = post(base, "/v1/chat/completions", chat_body(stream=True, echo=True, n=2, temperature=1.0))  # chat: not refused
    assert r.status_code == 200 and "data: [DONE]" in r.text, r.text[:500]
    failures = 0
    for i in range(4):
        r = post(base, "/invocations", {**body, "prompt": f"Fresh prompt number {i}"})
        failures += '"error"' in r.text and "InternalServerError" in r.text
    assert failures > 0, "vLLM no longer fails streaming echo+logprobs+n>1: drop adapter.server.refused_by_vllm_bug"


LONG_USER = ("Read this passage about rivers. The Danube flows through ten countries, more than any other river "
             "in the world, and ends in the Black Sea after a long journey across central and eastern Europe. ")


def test_prefix_cache_does_not_leak_between_spans_over_http(server):
    """The issue's reproduction over HTTP: A = two user messages, B = one user message with the
    template's turn tokens typed inside (same prompt ids, other spans). B after A equals B cold."""
    base, *_ = server
    u1 = LONG_USER * 2
    u2 = ("Which sea does it end in? Answer with the name of the sea only, in one or two words, and nothing "
          "else: no explanation, no greeting, no punctuation, no repetition of the question.")
    steer = {"context_attention": {"alpha": 0.3, "heads": "all"}}

    def ask(messages, salt):
        r = post(base, "/v1/chat/completions", chat_body(messages=messages, steer=steer, max_tokens=6, logprobs=True,
                                                         cache_salt=salt))
        assert r.status_code == 200, r.text
        lps = [t["logprob"] for t in r.json()["choices"][0]["logprobs"]["content"]]
        return r.json()["steer"]["applied"][0], lps

    a_msgs = [{"role": "user", "content": u1}, {"role": "user", "content": u2}]
    b_msgs = [{"role": "user", "content": u1 + "<|im_end|>\n<|im_start|>user\n" + u2}]
    b_echo, b_cold = ask(b_msgs, "cold-b")
    a_echo, a_lps = ask(a_msgs, "shared")
    # the spans first differ inside the first 128-token KV block, and the prompt fills that block
    assert a_echo["spans"] != b_echo["spans"] and a_echo["spans"][0][1] < 128 < a_echo["spans"][-1][1], a_echo
    assert max(abs(x - y) for x, y in zip(a_lps, b_cold)) > 1e-3  # the spans matter: a leak would show
    _, b_after_a = ask(b_msgs, "shared")
    assert max(abs(x - y) for x, y in zip(b_after_a, b_cold)) < 1e-4, (b_after_a, b_cold)


def test_schemathesis_fuzz_every_route(server):
    """At least 1000 generated cases over every operation of /openapi.json, the `steer` object of
    the generation routes included: no 5xx, no request past its timeout (a hang), and every
    operation the schema marks as keyed refuses the same request without the key or with a wrong
    one (`ignored_auth`)."""
    base, _, _, root = server
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "run", f"{base}/openapi.json", "--checks", "not_a_server_error,ignored_auth", "--phases", "fuzzing",
           "--max-examples", str(FUZZ_EXAMPLES), "--request-timeout", "60", "--seed", "7", "--no-shrink",
           "--workers", "1", "-H", f"Authorization: Bearer {API_KEY}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=root)
    text = out.stdout + out.stderr
    (root / "schemathesis.txt").write_text(text)
    generated = re.search(r"(\d+) generated", text)
    print(text[-1500:])
    assert generated and int(generated.group(1)) >= 1000, text[-3000:]
    assert out.returncode == 0 and "failed" not in text.split("SUMMARY")[-1], text[-3000:]
    assert httpx.get(f"{base}/health").status_code == 200


def test_64_streaming_clients_a_quarter_hanging_up(server):
    import asyncio

    from steerserve.clients.loadtest import print_report, run_load

    base, proc, _, _ = server
    report = asyncio.run(run_load(base, "tiny", clients=64, disconnect_fraction=0.25, max_tokens=24,
                                  abort_max_tokens=200, api_key=API_KEY, pid=proc.pid, exact=True,
                                  check_aborts=False))
    print_report(report)
    assert report["problems"] == []
    assert report["completed"] == 48 and report["dropped"] == 16 and report["crossed_streams"] == 0
    assert report["same_tokens_as_alone"] == 48
    assert report["kv_usage_after"] == 0.0 and report["running_after"] == 0
    # memory back to its warm baseline (allocator noise allowed)
    assert report["rss_growth_mb"] < 0.05 * report["rss_baseline_mb"], report


def test_a_dropped_stream_is_aborted(server):
    """A client that hangs up after the first chunk of a long stream stops its generation: far fewer
    tokens than it asked for are generated. vLLM's CPU build sometimes delivers a stream's chunks
    all at once when the request ends (measured on a stock vLLM 0.32 server with this tiny model: a
    230-token stream's first chunk at 0.68 s, with the last), and then there is nothing left to
    abort; the check takes up to four tries, two seconds apart, and needs one aborted stream (a
    server that ignores hang-ups fails all four). Under the 64-client load above, the API process
    on 2 cores may see hang-ups late for the same reason: that test checks that nothing leaks."""
    import asyncio

    from steerserve.clients.loadtest import metrics

    base, *_ = server
    asked = 230

    async def attempt() -> float:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=60) as client:
            before = (await metrics(client)).get("vllm:generation_tokens_total", 0)
            body = {"model": "tiny", "prompt": "Count:", "max_tokens": asked, "ignore_eos": True, "stream": True,
                    "temperature": 0.0}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # hang up after the first chunk
            for _ in range(100):  # wait until nothing runs
                m = await metrics(client)
                if m.get("vllm:num_requests_running", 0) == 0:
                    break
                await asyncio.sleep(0.1)
            return m.get("vllm:generation_tokens_total", 0) - before

    tries = []
    for _ in range(4):
        tries.append(asyncio.run(attempt()))
        if tries[-1] < asked / 2:
            break
        time.sleep(2)
    print(f"[abort] tokens generated after a hang-up at the first chunk of a {asked}-token stream: {tries}")
    assert tries[-1] < asked / 2, f"no hang-up aborted its request in {len(tries)} tries: {tries}"


def test_experiment_feedback_recorded(server, experiment_record):
    base, *_ = server
    for unit in ["u1", "u2", "u3", "u4", "u5", "u6"]:
        r = post(base, "/v1/chat/completions", chat_body(user=unit, steer={"experiment": "tone"}))
        assert r.status_code == 200, r.text
        # feedback only from the unit the response was served to (another key holder gets 403)
        for other in ({}, {"user": "intruder"}):
            fb = post(base, "/v1/ab/feedback", {"response_id": r.json()["id"], "thumbs": "down", **other})
            assert fb.status_code == 403 and error_of(fb)["param"] == "user", fb.text
        fb = post(base, "/v1/ab/feedback", {"response_id": r.json()["id"], "thumbs": "up", "user": unit})
        assert fb.status_code == 200, fb.text
        fb = post(base, "/v1/ab/feedback", {"response_id": r.json()["id"], "thumbs": "up"},
                  headers={"X-Steerserve-Unit": unit})
        assert fb.status_code == 200, fb.text
    arms = httpx.get(f"{base}/v1/ab/experiments/tone", headers=AUTH).json()["arms"]
    experiment_record.update({a["arm"]: (a["responses"], a["feedback"]) for a in arms})
    assert sum(feedback for _, feedback in experiment_record.values()) == 6


def test_api_key_never_logged(server):
    _, _, log, _ = server
    assert API_KEY not in log.read_text()


def test_engine_death_fails_requests_and_health_then_exits(server):
    """Kill the engine process under load: in-flight requests end with an error (not a hang),
    /health fails at once, and the server exits non-zero so an orchestrator restarts it. (Last in
    the module: it ends the server.)"""
    import concurrent.futures as cf

    base, proc, log, _ = server
    engine = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
              or p.name().startswith("VLLM::EngineCor")]
    assert engine, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]

    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 250, "n": 16, "ignore_eos": True, "temperature": 1.0}

    started = threading.Barrier(9)  # the eight request threads and this one

    def long_request(i):
        """Returns (HTTP status or None, whether the response completed, text)."""
        started.wait(30)
        try:
            if i % 2:  # streaming: an error event or a cut stream, never a [DONE]
                with httpx.stream("POST", f"{base}/v1/completions", headers=AUTH, timeout=60,
                                  json={**body, "stream": True}) as r:
                    lines = [line for line in r.iter_lines() if line]
                done = "data: [DONE]" in lines and not any('"error"' in line for line in lines)
                return r.status_code, done, "\n".join(lines[-2:])[:300]
            r = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=60, json=body)
            return r.status_code, r.status_code == 200, r.text[:300]
        except httpx.HTTPError as err:
            return None, False, repr(err)

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_request, i) for i in range(8)]
        started.wait(30)
        # Kill early: the engine outruns the API process here (a tiny model on its own core), so by
        # the time a client sees a stream's first token the engine may have produced every token.
        time.sleep(0.15)
        killed_at = time.time()
        for p in engine:
            p.send_signal(signal.SIGKILL)
        health = None
        while time.time() - killed_at < 10:
            try:
                health = httpx.get(f"{base}/health", timeout=2).status_code
            except httpx.HTTPError:
                health = "unreachable"
            if health != 200:
                break
            time.sleep(0.1)
        health_failed_after = time.time() - killed_at
        results = [f.result(timeout=60) for f in futures]
    assert health != 200 and health_failed_after < 5, (health, health_failed_after)
    # every request ended (no hang: the results came back within their timeout); the ones the kill
    # cut (at least one) ended without a complete answer: an error status or an error event naming
    # the engine, or a cut connection; a request the engine had already finished may complete
    cut = [(status, text) for status, completed, text in results if not completed]
    assert cut, f"the kill cut no request: {results}"
    for status, text in cut:
        assert status is None or status >= 500 or status == 200, (status, text)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    print(f"engine killed: /health failed after {health_failed_after:.2f} s ({health}); server exited with "
          f"{proc.returncode}; {len(cut)} of 8 requests cut: {[(s, t[-120:]) for s, t in cut]}")


def test_restarted_server_keeps_the_feedback(server, experiment_record, tiny_llama):
    """What an orchestrator does after the exit above: start the server again on the same state.
    The A/B responses and feedback are all there."""
    _, proc, _, root = server
    assert proc.returncode is not None and experiment_record  # after the engine-death test
    with running_server_proc(server_args(tiny_llama, root), root / "server-restarted.log",
                             env=server_env(root)) as (base, _):
        arms = httpx.get(f"{base}/v1/ab/experiments/tone", headers=AUTH).json()["arms"]
        assert {a["arm"]: (a["responses"], a["feedback"]) for a in arms} == experiment_record
        r = post(base, "/v1/chat/completions", chat_body())
        assert r.status_code == 200
