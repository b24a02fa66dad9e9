"""Proxy tuning over HTTP with the OpenAI SDK: a tiny random Llama served with one proxy pair (a
2-layer anti-expert and its perturbed "tuned" expert), compiled as `steerserve serve` runs by default.
Outputs are compared with the pure-torch reference over three Hugging Face models."""

from __future__ import annotations

import httpx
import openai
import pytest
from engine_checks import hf, perturbed_copy
from server_proc import running_server
from tiny_models import build_tiny

from steerserve.patches.steers.proxy.reference import proxy_generate, proxy_token_logprobs

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over the lazy dog because"
SERVER_ARGS = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gb", "0.25"]


@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy-e2e")
    anti = build_tiny("llama", root / "anti", seed=3, num_layers=2)
    expert = perturbed_copy(anti, root / "expert", seed=11, scale=0.3)
    return {"base": tiny_llama, "expert": expert, "anti": anti, "root": root}


@pytest.fixture(scope="module")
def server(pair):
    args = ["--model", str(pair["base"]), "--proxy", f"task={pair['expert']},{pair['anti']}", *SERVER_ARGS]
    with running_server(args, pair["root"] / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def models(pair):
    return hf(pair["base"]), hf(pair["expert"]), hf(pair["anti"])


def complete(client, steer=None, n=8, **kw):
    extra = {"steer": steer} if steer is not None else {}
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=n, temperature=0.0, logprobs=0,
                                     extra_body={**extra, "return_token_ids": True}, **kw)


def test_proxy_completion_matches_reference_and_echoes(client, models):
    r = complete(client, {"proxy": {"pair": "task", "alpha": 1.5}})
    assert r.model == "tiny"
    assert r.steer["applied"] == [{"steer": "proxy", "pair": "task", "alpha": 1.5}]
    prompt_ids = list(r.choices[0].prompt_token_ids)
    toks = list(r.choices[0].token_ids)
    base, expert, anti = models
    assert proxy_generate(base, expert, anti, [prompt_ids], 8, 1.5, pad_token_id=2)[0] == toks
    ref = proxy_token_logprobs(base, expert, anti, prompt_ids, toks, 1.5)
    got = r.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(got, ref)) < 2e-3
    plain = complete(client)
    assert plain.choices[0].logprobs.token_logprobs != got


def test_alpha_zero_is_the_base(client):
    plain = complete(client)
    zero = complete(client, {"proxy": {"pair": "task", "alpha": 0}})
    assert zero.steer["applied"] == [{"steer": "proxy", "pair": "task", "alpha": 0.0}]
    assert list(zero.choices[0].token_ids) == list(plain.choices[0].token_ids)
    assert zero.choices[0].logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs


def test_streaming_chat_n_seed_and_stop(client):
    steer = {"proxy": {"alpha": 1.0}}  # the only pair by default
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.0,
                                           extra_body={"steer": steer})
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.0,
                                            stream=True, extra_body={"steer": steer})
    chunks = list(stream)
    assert chunks[0].steer["applied"] == [{"steer": "proxy", "pair": "task", "alpha": 1.0}]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    # n > 1 with a seed: reproducible
    a = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.0, n=3, seed=7,
                                       extra_body={"steer": steer})
    b = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.0, n=3, seed=7,
                                       extra_body={"steer": steer})
    assert len(a.choices) == 3
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    # a stop string cut inside the proxied text
    full = whole.choices[0].message.content
    if len(full) > 4:
        stop = full[2:4]
        cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.0,
                                             stop=[stop], extra_body={"steer": steer})
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].message.content == full[: full.index(stop)]


@pytest.mark.parametrize("steer, field, text", [
    ({"proxy": {"pair": "nope"}}, "steer.proxy.pair", "unknown proxy pair"),
    ({"proxy": {"alpha": 50}}, "steer.proxy.alpha", "[-10, 10]"),
    ({"proxy": {"alpha": "high"}}, "steer.proxy.alpha", "[-10, 10]"),
    ({"proxy": ["task"]}, "steer.proxy", "must be an object"),
    ({"proxy": {"pair": "task", "weight": 2}}, "steer.proxy.weight", "unknown field"),
])
def test_bad_proxy_requests_are_400s(server, steer, field, text):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                                    "steer": steer}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and text in err["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_ab_compare_across_alphas(server, client):
    """`/v1/ab/compare` runs plain and proxy arms in one batch; each arm equals its single request."""
    messages = [{"role": "user", "content": "Name a colour."}]
    arms = [{"name": "plain", "steer": {}}, {"name": "proxy-1", "steer": {"proxy": {"alpha": 1.0}}},
            {"name": "proxy-3", "steer": {"proxy": {"pair": "task", "alpha": 3.0}}}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0.0, "arms": arms}
    r = httpx.post(f"{server}/v1/ab/compare", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {a["name"]: a for a in r.json()["arms"]}
    assert out["proxy-3"]["steer"]["applied"] == [{"steer": "proxy", "pair": "task", "alpha": 3.0}]
    single = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.0,
                                            extra_body={"steer": {"proxy": {"alpha": 3.0}}})
    assert out["proxy-3"]["choices"][0]["message"]["content"] == single.choices[0].message.content
    assert out["proxy-3"]["diverges_at"] is not None
