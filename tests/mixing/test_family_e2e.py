"""Model families over HTTP: a tiny random Llama served with a fully fine-tuned variant (weights
routed in the engine) and, in a second server, with a LoRA variant (vLLM multi-LoRA), driven by the
OpenAI SDK. Mixed outputs are compared with Hugging Face models of the exported checkpoints."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
import torch
from server_proc import running_server
from engine_checks import build_lora_family, greedy_hf, perturbed_copy

from steerserve.training import checkpoints as ck
from steerserve.training.export import export_taia

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over the lazy dog because"
SERVER_ARGS = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256", "--kv-cache-gb", "0.25"]


def complete(client, model, steer=None, n=8):
    extra = {"steer": steer} if steer is not None else {}
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0.0, logprobs=0,
                                  extra_body={**extra, "return_token_ids": True})
    return r


def ids_of(r):
    return list(r.choices[0].token_ids)


@pytest.fixture(scope="module")
def full_family(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("full-family")
    tuned = perturbed_copy(tiny_llama, root / "chat")
    ck.write_metadata(tuned, "full", tiny_llama, ck.base_digest(tiny_llama), context_indicator=" [ctx]")
    taia = export_taia(tuned, root / "chat-taia")
    return {"base": tiny_llama, "tuned": tuned, "taia": taia, "root": root}


@pytest.fixture(scope="module")
def full_server(full_family):
    args = ["--model", str(full_family["base"]), "--variant", f"chat={full_family['tuned']}", *SERVER_ARGS]
    with running_server(args, full_family["root"] / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def full_client(full_server):
    return openai.OpenAI(base_url=f"{full_server}/v1", api_key="none", max_retries=0, timeout=120)


def test_models_list_the_family(full_server):
    data = httpx.get(f"{full_server}/v1/models").json()["data"]
    ids = {m["id"]: m for m in data}
    assert {"tiny", "chat", "chat:taia", "chat:ffn-only"} <= set(ids)
    assert ids["chat:taia"]["steerserve"] == {"variant": "chat", "mixing": "taia", "kind": "full"}
    assert ids["chat"]["parent"] == "tiny"


def test_taia_three_ways_equal_the_exported_checkpoint(full_client, full_family):
    by_alias = complete(full_client, "chat:taia")
    by_variant = complete(full_client, "chat", {"mixing": "taia"})
    by_object = complete(full_client, "tiny", {"mixing": {"variant": "chat", "attention": "tuned", "ffn": "base"}})
    assert ids_of(by_alias) == ids_of(by_variant) == ids_of(by_object)
    prompt_ids = list(by_alias.choices[0].prompt_token_ids)
    assert ids_of(by_alias) == greedy_hf(full_family["taia"], prompt_ids)
    assert by_alias.model == "chat:taia" and by_variant.model == "chat" and by_object.model == "tiny"
    echo = by_variant.model_extra["steer"]["applied"][0]
    assert echo["steer"] == "mixing" and echo["mode"] == "taia" and echo["served_by"] == "routed weights"
    tuned = complete(full_client, "chat")
    assert ids_of(tuned) == greedy_hf(full_family["tuned"], prompt_ids)
    base = complete(full_client, "tiny")
    assert ids_of(base) == greedy_hf(full_family["base"], prompt_ids)
    assert len({tuple(ids_of(x)) for x in (by_alias, tuned, base)}) == 3


def test_mixed_concurrent_requests(full_client):
    import concurrent.futures as cf

    kinds = [("tiny", None), ("chat", None), ("chat", {"mixing": "taia"}), ("tiny", {"mixing": "ffn-only"})] * 3
    alone = {k: ids_of(complete(full_client, m, s)) for k, (m, s) in enumerate(kinds[:4])}
    with cf.ThreadPoolExecutor(len(kinds)) as pool:
        outs = list(pool.map(lambda ms: ids_of(complete(full_client, *ms)), kinds))
    for i, out in enumerate(outs):
        assert out == alone[i % 4], f"request {i} ({kinds[i]}) changed in a mixed batch"


def test_context_indicator(full_client):
    r = full_client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0,
        extra_body={"steer": {"context_indicator": True}})
    applied = r.model_extra["steer"]["applied"]
    assert {"steer": "context_indicator", "text": " [ctx]"} in applied
    assert r.usage.prompt_tokens > full_client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0).usage.prompt_tokens


@pytest.mark.parametrize("model,steer,field", [
    ("tiny", {"mixing": {"variant": "nope"}}, "steer.mixing.variant"),
    ("tiny", {"mixing": "half"}, "steer.mixing"),
    ("tiny", {"mixing": {"attention": "tuned", "ffn": "both"}}, "steer.mixing.ffn"),
    ("tiny", {"mixing": {"varient": "chat"}}, "steer.mixing.varient"),
    ("chat:taia", {"mixing": "tuned"}, "steer.mixing"),
    ("tiny", {"context_indicator": True}, "steer.context_indicator"),
])
def test_bad_mixing_is_400(full_client, model, steer, field):
    with pytest.raises(openai.BadRequestError) as err:
        complete(full_client, model, steer) if "indicator" not in field else full_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"steer": steer})
    assert err.value.body["param"] == field, err.value.body
    assert complete(full_client, "chat:taia").choices[0].text  # the server is fine


def test_indicator_on_completions_is_400(full_client):
    with pytest.raises(openai.BadRequestError) as err:
        complete(full_client, "chat", {"context_indicator": True})
    assert err.value.body["param"] == "steer.context_indicator"


# --- LoRA variant -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_family(tiny_llama, tmp_path_factory):
    return build_lora_family(tiny_llama, tmp_path_factory.mktemp("lora-family"))


@pytest.fixture(scope="module")
def lora_client(lora_family, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    args = ["--model", str(lora_family["base"]), "--variant", f"sft={lora_family['adapter']}", *SERVER_ARGS]
    with running_server(args, lora_family["root"] / "server.log", env={"STEERSERVE_HOME": str(home)}) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def test_lora_family_mixing(lora_client, lora_family):
    ids = {m.id for m in lora_client.models.list().data}
    assert {"tiny", "sft", "sft:taia", "sft:ffn-only"} <= ids
    taia = complete(lora_client, "sft", {"mixing": "taia"})
    assert ids_of(taia) == ids_of(complete(lora_client, "sft:taia"))
    prompt_ids = list(taia.choices[0].prompt_token_ids)
    assert ids_of(taia) == greedy_hf(lora_family["base"], prompt_ids, adapter=lora_family["taia"])
    tuned = complete(lora_client, "sft")
    assert ids_of(tuned) == greedy_hf(lora_family["base"], prompt_ids, adapter=lora_family["adapter"])
    assert ids_of(tuned) != ids_of(taia)
    base_mix = complete(lora_client, "sft", {"mixing": "base"})
    assert ids_of(base_mix) == ids_of(complete(lora_client, "tiny"))
    # with every adapter slot filled, a plain request next to adapter requests is still the base model
    # (vLLM 0.32's CPU LoRA ops gave it the last slot's adapter: patches/adapter/lora_cpu.py)
    from transformers import AutoModelForCausalLM

    from steerserve.patches.reference import token_logprobs

    # a plain request in the same steps as adapter requests (the bug needs LoRA rows in the batch)
    with cf.ThreadPoolExecutor(3) as pool:
        plain, *_ = pool.map(lambda m: complete(lora_client, m, n=16), ["tiny", "sft:ffn-only", "sft"])
    base = AutoModelForCausalLM.from_pretrained(lora_family["base"], dtype=torch.float32).eval()
    ref = token_logprobs(base, prompt_ids, ids_of(plain), None)
    assert max(abs(a - b) for a, b in zip(plain.choices[0].logprobs.token_logprobs, ref)) < 1e-3
    echo = taia.model_extra["steer"]["applied"][0]
    assert echo["served_by"] == "multi-LoRA adapter" and echo["adapter"] == "sft:taia"
    assert taia.model == "sft"


def test_incompatible_base_refused(lora_family, tiny_qwen2, tmp_path):
    from steerserve.server.family import FamilyError, prepare_family

    with pytest.raises(FamilyError, match="incompatible base"):
        prepare_family([f"x={lora_family['adapter']}"], tiny_qwen2, "q", tmp_path)
    meta = json.loads((lora_family["adapter"] / "steerserve.json").read_text())
    assert meta["base"]["digest"] == ck.base_digest(lora_family["base"])


def test_streaming_keeps_the_model_name_and_text(full_client):
    whole = full_client.chat.completions.create(model="chat:taia", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0.0)
    chunks = list(full_client.chat.completions.create(model="chat:taia", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=8, temperature=0.0, stream=True))
    assert {c.model for c in chunks} == {"chat:taia"}
    assert chunks[0].model_extra["steer"]["applied"][0]["mode"] == "taia"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.model == "chat:taia"


def test_ab_compare_of_mixes(full_server, full_client):
    arms = [{"name": "tuned", "steer": {"mixing": "tuned"}}, {"name": "taia", "steer": {"mixing": "taia"}},
            {"name": "base", "steer": {"mixing": "base"}}]
    body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0.0,
            "arms": arms}
    r = httpx.post(f"{full_server}/v1/ab/compare", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = {a["name"]: a for a in r.json()["arms"]}
    single = full_client.chat.completions.create(model="chat:taia", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0.0)
    assert out["taia"]["choices"][0]["message"]["content"] == single.choices[0].message.content
    assert out["taia"]["steer"]["applied"][0]["mode"] == "taia"
    assert len({a["choices"][0]["message"]["content"] for a in out.values()}) >= 2
