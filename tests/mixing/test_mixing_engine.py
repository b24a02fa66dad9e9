"""TAIA mixing of a fully fine-tuned variant inside one engine (tiny random Llama, float32, eager,
chunked prefill with a 64-token budget).

The "tuned" variant is the base with every weight perturbed; its TAIA export (tuned attention,
norms, embeddings + base FFN) and its reverse (base attention + tuned FFN) are written with the
trainer's own `merge_full`. Checks: unsteered rows of a mixed batch are bit-identical to the same
batch unmixed; each mixed row matches a Hugging Face model of the corresponding exported checkpoint
(greedy tokens equal, logprobs within LOGPROB_TOL); "base"/"base" mixing is the base.
"""

from __future__ import annotations


import pytest
import torch
from conftest import close_engine, make_engine
from engine_checks import LOGPROB_TOL, PROMPTS, build_family, check_mixing_parity, hf, mix, run, variant_settings


pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    return build_family(tiny_llama, tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def llm(family):
    engine = make_engine(family["base"], max_num_batched_tokens=64, max_model_len=256, **variant_settings(family))
    yield engine
    close_engine(engine)


def test_mixed_rows_match_their_exported_checkpoints(llm, family):
    worst = check_mixing_parity(llm, family)
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


def test_batches_wholly_of_one_mix(llm, family):
    """When one variant owns every row of a component, sites run only its shadow (no base pass to
    overwrite): still equal to the exported checkpoints."""
    from steerserve.patches.reference import token_logprobs

    for kind, name in ((("tuned", "tuned"), "tuned"), (("tuned", "base"), "taia"), (("base", "tuned"), "ffn-only")):
        outs = run(llm, [(t, mix(*kind)) for t in PROMPTS[:3]], max_tokens=8)
        model = hf(family[name])
        for toks, lps, prompt_ids, _ in outs:
            ref = token_logprobs(model, prompt_ids, toks, None)
            assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL, name
