"""TAIA mixing of a fully fine-tuned variant inside one engine (tiny random Llama, float32, eager,
chunked prefill with a 64-token budget).

The "tuned" variant is the base with every weight perturbed; its TAIA export (tuned attention,
norms, embeddings + base FFN) and its reverse (base attention + tuned FFN) are written with the
trainer's own `merge_full`. Checks: unsteered rows of a mixed batch are bit-identical to the same
batch unmixed; each mixed row matches a Hugging Face model of the corresponding exported checkpoint
(greedy tokens equal, logprobs within LOGPROB_TOL); "base"/"base" mixing is the base.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import close_engine, make_engine
from engine_checks import LOGPROB_TOL, PROMPTS, run

from steerserve.patches.mixing import VARIANTS_ENV
from steerserve.patches.plan import MixingPlan, SteerPlan
from steerserve.patches.reference import token_logprobs
from steerserve.training.export import merge_full

pytestmark = pytest.mark.engine


def perturbed_copy(src, out, seed=7, scale=0.05):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.dim() == 2 else 0.5))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    tuned = perturbed_copy(tiny_llama, root / "tuned")
    taia = merge_full(tuned, tiny_llama, root / "taia", attention="tuned", ffn="base")
    ffn_only = merge_full(tuned, tiny_llama, root / "ffn-only", attention="base", ffn="tuned")
    return {"base": tiny_llama, "tuned": tuned, "taia": taia, "ffn-only": ffn_only}


@pytest.fixture(scope="module")
def llm(family):
    os.environ[VARIANTS_ENV] = f'[{{"name": "chat", "path": "{family["tuned"]}"}}]'
    try:
        engine = make_engine(family["base"], max_num_batched_tokens=64, max_model_len=256)
    finally:
        del os.environ[VARIANTS_ENV]
    yield engine
    close_engine(engine)


def mix(attention: str, ffn: str) -> SteerPlan:
    return SteerPlan(mixing=MixingPlan("chat", attention, ffn, via="weights", index=0))


def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_mixed_rows_match_their_exported_checkpoints(llm, family):
    kinds = [None, ("tuned", "base"), ("tuned", "tuned"), None, ("base", "tuned"), ("tuned", "base")]
    names = {None: "base", ("tuned", "base"): "taia", ("tuned", "tuned"): "tuned", ("base", "tuned"): "ffn-only"}
    items = [(t, mix(*k) if k else None) for t, k in zip(PROMPTS, kinds)]
    outs = run(llm, items, max_tokens=10)
    plain = run(llm, [(t, None) for t in PROMPTS], max_tokens=10)
    models = {}
    worst = 0.0
    for k, (toks, lps, prompt_ids, _), ref_plain in zip(kinds, outs, plain):
        if k is None:  # unmixed rows: bit-identical to the same batch without mixed neighbours
            assert (toks, lps) == (ref_plain[0], ref_plain[1])
            continue
        name = names[k]
        models.setdefault(name, hf(family[name]))
        ref = token_logprobs(models[name], prompt_ids, toks, None)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"{name}: engine vs exported checkpoint diff {diff}"
        assert lps != ref_plain[1], f"{name}: the row was not mixed"
        # greedy continuation of the exported checkpoint alone gives the same tokens
        with torch.no_grad():
            gen = models[name].generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)
        assert gen[0, len(prompt_ids):].tolist() == toks, name
    print(f"max |engine - exported checkpoint| logprob difference: {worst:.2e}")


def test_base_base_and_prompt_logprobs(llm, family):
    from vllm import SamplingParams

    from engine_checks import prompt

    # base/base is routed nowhere: bit-identical to no plan
    same = run(llm, [(PROMPTS[0], mix("base", "base")), (PROMPTS[1], None)])
    plain = run(llm, [(PROMPTS[0], None), (PROMPTS[1], None)])
    assert [x[:2] for x in same] == [x[:2] for x in plain]
    # prompt logprobs of a TAIA row come from the TAIA weights (LM head included)
    plan = mix("tuned", "base")
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args={"steer": plan.to_json()})
    out = llm.generate([prompt(PROMPTS[2], plan)], [sp], use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    got = [lp[ids[i]].logprob for i, lp in enumerate(out.prompt_logprobs) if lp is not None]
    model = hf(family["taia"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    ref = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(got, ref)) < LOGPROB_TOL
