"""Proxy tuning inside one engine (tiny random Llama base, float32, eager, chunked prefill with a
64-token budget): base + alpha * (expert - anti_expert) per request.

The pairs: a 2-layer anti-expert (another random model than the base, same tokenizer and attention
shape) and its "tuned" expert (every weight perturbed); a 3-layer pair with a vocabulary padded by
64 rows (cut to the base's, as the paper's code does); loaded as sub-models of the base's engine.
Checks: proxy rows match the pure-torch reference over three Hugging Face models (logprobs within
LOGPROB_TOL, greedy tokens equal), with chunked prefill and prompt logprobs; alpha 0 and every
plain row of a mixed batch are bit-identical to the same batch without proxy; two pairs and
different alphas in one batch; the experts' KV is only reused by requests of the same plan;
preempted requests are recomputed with their experts.
"""

from __future__ import annotations


import pytest
import torch
from conftest import close_engine, make_engine
from engine_checks import LOGPROB_TOL, PROMPTS, hf, perturbed_copy, prompt, run
from tiny_models import build_tiny

from steerserve.patches.plan import ProxyPlan, SteerPlan
from steerserve.patches.steers.base import SETTINGS_KEY
from steerserve.patches.steers.proxy import PAIRS_SETTING
from steerserve.patches.steers.proxy.reference import proxy_generate, proxy_token_logprobs

pytestmark = pytest.mark.engine

NUM_BLOCKS = 6  # x 128 tokens (the CPU block size): small enough for a burst to be preempted


@pytest.fixture(scope="module")
def pairs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    anti = build_tiny("llama", root / "anti", seed=3, num_layers=2)
    expert = perturbed_copy(anti, root / "expert", seed=11, scale=0.3)
    anti2 = build_tiny("llama", root / "anti2", seed=5, num_layers=3, vocab_pad=64)  # padded vocab: cut
    expert2 = perturbed_copy(anti2, root / "expert2", seed=13, scale=0.3)
    return {"base": tiny_llama, "task": (expert, anti), "other": (expert2, anti2)}


def pair_settings(pairs) -> dict:
    """Engine keyword arguments declaring the two pairs (what `steerserve serve --proxy` passes)."""
    declared = [{"name": n, "expert": str(pairs[n][0]), "anti_expert": str(pairs[n][1])} for n in ("task", "other")]
    return {"additional_config": {SETTINGS_KEY: {PAIRS_SETTING: declared}}}


@pytest.fixture(scope="module")
def llm(pairs):
    engine = make_engine(pairs["base"], max_num_batched_tokens=64, max_model_len=256,
                         num_gpu_blocks_override=NUM_BLOCKS, disable_log_stats=False, **pair_settings(pairs))
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def models(pairs):
    return {"base": hf(pairs["base"]), "task": tuple(hf(p) for p in pairs["task"]),
            "other": tuple(hf(p) for p in pairs["other"])}


def proxy(pair: str, alpha: float) -> SteerPlan:
    return SteerPlan(proxy=ProxyPlan(pair, alpha))


def test_proxy_rows_match_reference_and_plain_rows_are_untouched(llm, models):
    plans = [None, proxy("task", 1.0), proxy("other", 2.0), None, proxy("task", -0.5), proxy("task", 0.0)]
    items = list(zip(PROMPTS, plans))
    outs = run(llm, items, max_tokens=10)
    plain = run(llm, [(t, None) for t in PROMPTS], max_tokens=10)
    worst = 0.0
    for plan, (toks, lps, prompt_ids, _), ref_plain in zip(plans, outs, plain):
        if plan is None or plan.proxy.alpha == 0:
            assert (toks, lps) == (ref_plain[0], ref_plain[1]), "plain / alpha-0 row changed by proxy neighbours"
            continue
        expert, anti = models[plan.proxy.pair]
        ref = proxy_token_logprobs(models["base"], expert, anti, prompt_ids, toks, plan.proxy.alpha)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"{plan.proxy}: engine vs reference logprob diff {diff}"
        assert lps != ref_plain[1], f"{plan.proxy}: row not steered"
        greedy = proxy_generate(models["base"], expert, anti, [prompt_ids], 10, plan.proxy.alpha, pad_token_id=2)
        assert greedy[0] == toks, f"{plan.proxy}: greedy tokens differ from the reference"
    print(f"max |engine - reference| proxy logprob difference: {worst:.2e}")


def test_long_prompt_chunked_prefill_and_prompt_logprobs(llm, models):
    from vllm import SamplingParams

    long_prompt = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))  # > 64 tokens: chunked prefill
    plan = proxy("task", 1.5)
    sp = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, prompt_logprobs=0, ignore_eos=True,
                        extra_args={"steer": plan.to_json()})
    assert llm.reset_prefix_cache()
    out = llm.generate([prompt(long_prompt, plan), prompt(PROMPTS[0], None)],
                       [sp, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)], use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    assert len(ids) > 64
    toks = list(out.outputs[0].token_ids)
    expert, anti = models["task"]
    got = [lp[ids[i]].logprob for i, lp in enumerate(out.prompt_logprobs) if lp is not None]
    ref_prompt = proxy_token_logprobs(models["base"], expert, anti, ids[:1], ids[1:], 1.5)
    assert max(abs(a - b) for a, b in zip(got, ref_prompt)) < LOGPROB_TOL, "prompt logprobs are not the proxy's"
    lps = [lp[t].logprob for t, lp in zip(toks, out.outputs[0].logprobs)]
    ref = proxy_token_logprobs(models["base"], expert, anti, ids, toks, 1.5)
    assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def test_prefix_cache_reuse_only_within_a_plan(llm):
    """A repeat hits its own cached blocks (base *and* experts' KV: the tokens after the hit equal
    the cold run's); a proxy request never reuses blocks a plain request computed (those have no
    expert KV), nor the reverse."""
    long_prompt = " ".join(PROMPTS * 3)  # more than one full 128-token KV block
    plan = proxy("task", 1.0)
    cold = run(llm, [(long_prompt, plan)], max_tokens=6)[0]
    run(llm, [(long_prompt, None)], max_tokens=6)  # warm the cache with plain KV
    after_plain = run(llm, [(long_prompt, plan)], max_tokens=6, reset_cache=False)[0]
    assert after_plain[3] == 0, "a proxy request reused KV blocks of a plain request"
    again = run(llm, [(long_prompt, plan)], max_tokens=6, reset_cache=False)[0]
    assert again[3] > 0, "a repeat of the same proxy plan did not hit its own cache"
    assert again[0] == cold[0]
    assert max(abs(a - b) for a, b in zip(again[1], cold[1])) < LOGPROB_TOL


def test_sampling_n_and_seed(llm):
    from vllm import SamplingParams

    plan = proxy("other", 1.0)
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=123, n=3, extra_args={"steer": plan.to_json()})
    a = llm.generate([prompt(PROMPTS[1], plan)], [sp], use_tqdm=False)[0]
    b = llm.generate([prompt(PROMPTS[1], plan)], [sp], use_tqdm=False)[0]
    assert len(a.outputs) == 3
    assert [list(o.token_ids) for o in a.outputs] == [list(o.token_ids) for o in b.outputs]


def test_preempted_proxy_requests_stay_proxied(llm, models):
    """More concurrent work than KV blocks: vLLM preempts and recomputes (base and experts)."""
    from steerserve.patches.reference import token_logprobs

    items = [(" ".join([PROMPTS[i % len(PROMPTS)]] * 8), proxy("task", 1.0) if i % 2 else None) for i in range(10)]
    before = _preemptions(llm)
    outs = run(llm, items, max_tokens=60)
    assert _preemptions(llm) > before, "the burst did not cause a preemption; shrink NUM_BLOCKS"
    expert, anti = models["task"]
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        if plan is None:
            ref = token_logprobs(models["base"], prompt_ids, toks, None)
        else:
            ref = proxy_token_logprobs(models["base"], expert, anti, prompt_ids, toks, 1.0)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_reference_vocab_cut():
    from steerserve.patches.steers.proxy.reference import proxy_combine

    base = torch.zeros(2, 5)
    expert = torch.arange(14, dtype=torch.float32).reshape(2, 7)
    anti = torch.ones(2, 7)
    out = proxy_combine(base, expert, anti, 2.0)
    assert out.shape == (2, 5)
    assert torch.equal(out, 2.0 * (expert[:, :5] - 1.0))
