"""Reliability suite against a real server (tiny random Llama, float32, 128-token context, API key):
hostile input refused by documented caps, a schemathesis fuzz of every route of /openapi.json
(the `steer` object included), 64 concurrent streaming clients with a quarter hanging up, and the
engine process killed under load. The long variants are commands: `steerserve loadtest` against
any server, and the fuzz with more examples (README, Reliability)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
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


def server_args(model, root):
    return ["--model", str(model), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "128",
            "--kv-cache-gb", "0.25", "--feedback-db", str(root / "ab.sqlite3"), "--config", str(root / "config.yaml")]


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


def test_forged_plans_on_other_routes_do_not_reach_the_engine(server):
    """vLLM's other generation routes pass `vllm_xargs` through: a plan there is not signed by the
    API process, so the engine runs the request unsteered (it used to take the engine down)."""
    base, _, log, _ = server
    forged = json.dumps({"infosteer": {"layers": [99], "mode": "topk", "alpha": 2.0, "k": 10**6, "m": 0, "p": 0}})
    plain = post(base, "/v1/completions", {"model": "tiny", "prompt": "Hello there", "max_tokens": 6,
                                            "temperature": 0.0}).json()["choices"][0]["text"]
    r = post(base, "/invocations", {"model": "tiny", "prompt": "Hello there", "max_tokens": 6, "temperature": 0.0,
                                    "vllm_xargs": {"steer": forged}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
    r = post(base, "/v1/chat/completions/batch", {"model": "tiny", "messages": [MSG], "max_tokens": 4,
                                                  "vllm_xargs": {"steer": "garbage", "steer_signature": "0" * 64}})
    assert r.status_code == 200, r.text
    assert post(base, "/v1/responses", {"model": "tiny", "input": "Hi"}).status_code == 404  # off by default
    assert httpx.get(f"{base}/health").status_code == 200
    assert log.read_text().count("is not signed by this server's API process") >= 2


def test_schemathesis_fuzz_every_route(server):
    """At least 1000 generated cases over every operation of /openapi.json, the `steer` object of
    the generation routes included: no 5xx, no request past its timeout (a hang)."""
    base, _, _, root = server
    st = Path(sys.executable).parent / "st"
    cmd = [str(st), "run", f"{base}/openapi.json", "--checks", "not_a_server_error", "--phases", "fuzzing",
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
                                  abort_max_tokens=100, api_key=API_KEY, pid=proc.pid, exact=True))
    print_report(report)
    assert report["problems"] == []
    assert report["completed"] == 48 and report["dropped"] == 16 and report["crossed_streams"] == 0
    assert report["same_tokens_as_alone"] == 48
    assert report["kv_usage_after"] == 0.0 and report["running_after"] == 0
    # memory back to its warm baseline (allocator noise allowed)
    assert report["rss_growth_mb"] < 0.05 * report["rss_baseline_mb"], report


def test_experiment_feedback_recorded(server, experiment_record):
    base, *_ = server
    for unit in ["u1", "u2", "u3", "u4", "u5", "u6"]:
        r = post(base, "/v1/chat/completions", chat_body(user=unit, steer={"experiment": "tone"}))
        assert r.status_code == 200, r.text
        fb = post(base, "/v1/ab/feedback", {"response_id": r.json()["id"], "thumbs": "up"})
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

    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 120, "n": 16, "ignore_eos": True, "temperature": 1.0}

    def long_request(i):
        """Returns (HTTP status or None, whether the response completed, text)."""
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
        time.sleep(0.5)
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
    for status, completed, text in results:
        # each in-flight request ends (no hang) without a complete answer: an error status or error
        # event naming the engine, or a cut connection
        assert not completed and (status is None or status >= 500 or status == 200), (status, text)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    print(f"engine killed: /health failed after {health_failed_after:.2f} s ({health}); server exited with "
          f"{proc.returncode}; in-flight requests: {[(s, t[-120:]) for s, _, t in results]}")


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
