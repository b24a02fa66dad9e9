"""Residual steering vectors in a real vLLM engine (tiny Llama, eager, float32, chunked prefill with
a 64-token budget, a small KV cache so that a burst is preempted) against the Hugging Face
reference (`steers/vectors/reference.py`, repeng's hook placement)."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import LOGPROB_TOL, PROMPTS, _check_prefix_cache_salted, run
from tiny_models import tiny_vectors

from steerserve.patches.plan import SteerPlan
from steerserve.patches.reference import token_logprobs
from steerserve.patches.steers.vectors import VectorsPlan, VectorTerm, reference
from steerserve.server import family as _family
from steerserve.server.schema import SteerError, normalise

pytestmark = pytest.mark.engine

NUM_BLOCKS = 6  # x 128 tokens: less than the preemption burst below needs


@pytest.fixture(scope="module")
def vector_files(tiny_llama):
    """The tiny model's test vectors: `joy` (GGUF, layers 1-3) and `calm` (safetensors, layers 1-2)."""
    return tiny_vectors(tiny_llama)


@pytest.fixture(scope="module")
def info(tiny_llama, vector_files):
    """The model info, with the vectors served by this (test) process's family."""
    fam = _family.Family()
    _family.prepare_vectors(vector_files, tiny_llama, fam)
    _family.set_current(fam)
    yield model_info(tiny_llama)
    _family.set_current(None)


@pytest.fixture(scope="module")
def llm(tiny_llama, info):
    # make_engine serves the checkpoint's test vectors (engine setting "vectors")
    engine = make_engine(tiny_llama, max_num_batched_tokens=64, num_gpu_blocks_override=NUM_BLOCKS,
                         max_model_len=256, disable_log_stats=False)
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def hf(tiny_llama, vector_files):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()
    reference.attach(model, vector_files)
    return model


def vplans(info) -> dict[str, SteerPlan]:
    """Configurations that differ in vector, scale, layers and positions (normalised as the server does)."""
    return {
        "joy": normalise({"vectors": [{"name": "joy", "scale": 1.0}]}, info),
        "joy_neg": normalise({"vectors": [{"name": "joy", "scale": -2.0, "layers": [2, 3]}]}, info),
        "calm_prompt": normalise({"vectors": [{"name": "calm", "scale": 1.5, "positions": "prompt"}]}, info),
        "calm_generated": normalise({"vectors": [{"name": "calm", "scale": 1.5, "positions": "generated"}]}, info),
        "sum": normalise({"vectors": [{"name": "joy", "scale": 0.5, "layers": [1]},
                                      {"name": "calm", "scale": -1.0, "positions": "generated"},
                                      {"name": "joy", "scale": 0.25}]}, info),
        "with_infosteer": normalise({"vectors": [{"name": "calm", "scale": 1.0}],
                                     "infosteer": {"alpha": 1.5, "layers": [1]}}, info),
    }


def test_mixed_batch_unsteered_rows_bit_identical(llm, info):
    """Six requests with different vectors, scales, layers and positions next to unsteered ones:
    the unsteered rows equal the same batch unsteered, bit for bit; every steered row differs."""
    p = vplans(info)
    plain = run(llm, [(t, None) for t in PROMPTS] * 2)
    mixed_plans = [None, p["joy"], p["joy_neg"], None, p["calm_prompt"], p["calm_generated"],
                   p["sum"], None, p["with_infosteer"], None, None, None]
    mixed = run(llm, list(zip(PROMPTS * 2, mixed_plans)))
    for i, plan in enumerate(mixed_plans):
        if plan is None:
            assert mixed[i][:2] == plain[i][:2], f"row {i} changed by steered neighbours"
        else:
            assert mixed[i][1] != plain[i][1], f"row {i} ({plan.applied()}) was not steered"


def test_logprobs_match_hf_reference(llm, hf, info):
    """Engine logprobs == the Hugging Face reference (teacher forced), every configuration in one batch."""
    p = vplans(info)
    items = [(PROMPTS[i % len(PROMPTS)], plan) for i, plan in enumerate(p.values())] + [(PROMPTS[1], None)]
    outs = run(llm, items)
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        ref = token_logprobs(hf, prompt_ids, toks, plan)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        assert diff < LOGPROB_TOL, f"{plan.applied() if plan else 'plain'}: engine vs reference diff {diff}"


def test_positions_split_prompt_and_generated(llm, info):
    """`positions: prompt` changes the first sampled token's logprob (its forward is the last prompt
    token's) and `generated` does not; the two together equal `all` on every token."""
    p = vplans(info)
    plain, prompt_only, gen_only, both, all_ = run(llm, [
        (PROMPTS[0], None), (PROMPTS[0], p["calm_prompt"]), (PROMPTS[0], p["calm_generated"]),
        (PROMPTS[0], normalise({"vectors": [{"name": "calm", "scale": 1.5, "positions": "prompt"},
                                            {"name": "calm", "scale": 1.5, "positions": "generated"}]}, info)),
        (PROMPTS[0], normalise({"vectors": [{"name": "calm", "scale": 1.5}]}, info))])
    assert prompt_only[1][0] != plain[1][0]
    assert gen_only[1][0] == plain[1][0] and gen_only[1][1:] != plain[1][1:]
    assert both[:2] == all_[:2]


def test_scale_zero_is_unsteered_bit_for_bit(llm, info):
    """The server drops scale-0 terms (no plan); a scale-0 plan forced into the engine adds zeros:
    the same tokens and logprobs as no plan."""
    assert normalise({"vectors": [{"name": "joy", "scale": 0.0}]}, info).is_empty
    zero = SteerPlan(vectors=VectorsPlan((VectorTerm("joy", 0.0, tuple(range(1, info.num_layers))),)))
    plain = run(llm, [(t, None) for t in PROMPTS[:3]])
    forced = run(llm, [(t, zero) for t in PROMPTS[:3]])
    assert [x[:2] for x in plain] == [x[:2] for x in forced]


def test_chunked_prefill_long_prompt_matches_reference(llm, hf, info):
    """A 150-token prompt is prefilled in 64-token chunks: every chunk is steered, and the
    prompt/generated split holds across chunks."""
    long_prompt = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))
    p = vplans(info)
    outs = run(llm, [(long_prompt, p["sum"]), (long_prompt, p["calm_prompt"]), (PROMPTS[0], None)], max_tokens=8)
    for plan, (toks, lps, prompt_ids, _) in zip([p["sum"], p["calm_prompt"]], outs):
        assert len(prompt_ids) > 64 * 2
        ref = token_logprobs(hf, prompt_ids, toks, plan)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def test_preempted_requests_stay_steered(llm, hf, info):
    """More concurrent work than KV blocks: vLLM preempts and recomputes prompt and generated
    tokens as a prefill; positions keep each token's prompt/generated class."""
    p = vplans(info)
    steer = [None, p["joy"], p["calm_generated"], p["sum"]]
    items = [(" ".join([PROMPTS[i % len(PROMPTS)]] * 8), steer[i % 4]) for i in range(10)]
    before = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    outs = run(llm, items, max_tokens=60)
    assert sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") > before
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        ref = token_logprobs(hf, prompt_ids, toks, plan)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def test_prefix_cache_is_salted_by_plan(llm, info):
    """A steered request never reuses unsteered KV (nor another plan's), and a repeat of it hits
    its own cache."""
    _check_prefix_cache_salted(llm, info, vplans(info)["sum"])


def test_unknown_vector_in_a_forged_plan_runs_unsteered(llm, info):
    """A plan naming a vector the engine did not load (a server/engine mismatch) runs unsteered,
    logged, without taking the engine down."""
    ghost = SteerPlan(vectors=VectorsPlan((VectorTerm("ghost", 1.0, (1,)),)))
    plain = run(llm, [(PROMPTS[0], None)])
    assert run(llm, [(PROMPTS[0], ghost)])[0][:2] == plain[0][:2]


def test_requests_are_validated_against_the_served_vectors(info):
    for steer, field in [({"vectors": []}, "steer.vectors"),
                         ({"vectors": [{"name": "nope"}]}, "steer.vectors[0].name"),
                         ({"vectors": [{"name": "joy", "scale": 101}]}, "steer.vectors[0].scale"),
                         ({"vectors": [{"name": "calm", "layers": [3]}]}, "steer.vectors[0].layers[0]"),
                         ({"vectors": [{"name": "joy"}] * 9}, "steer.vectors")]:
        with pytest.raises(SteerError) as err:
            normalise(steer, info)
        assert err.value.field == field, err.value
