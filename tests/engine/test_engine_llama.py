"""Steerable Llama in a real vLLM engine (eager, float32, chunked prefill with a 64-token budget,
a small KV cache so that a burst of requests is preempted)."""

import pytest
import torch
from conftest import close_engine, make_engine, model_info
from engine_checks import (
    LOGPROB_TOL,
    PROMPTS,
    check_context_alpha_one_is_close,
    check_mixed_batch_bit_identical,
    check_neutral_identity,
    check_prefix_cache_isolates_spans,
    check_prefix_cache_salted,
    check_reference_parity,
    plans,
    run,
    with_spans,
)

from steerserve.patches.reference import token_logprobs

pytestmark = pytest.mark.engine

NUM_BLOCKS = 6  # x 128 tokens (the CPU block size): less than the preemption burst below needs


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = make_engine(tiny_llama, max_num_batched_tokens=64, num_gpu_blocks_override=NUM_BLOCKS,
                         max_model_len=256, disable_log_stats=False)
    yield engine
    close_engine(engine)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def info(tiny_llama):
    return model_info(tiny_llama)


def test_mixed_batch_unsteered_rows_bit_identical(llm, info):
    check_mixed_batch_bit_identical(llm, info)


def test_neutral_plan_is_identity(llm, info):
    check_neutral_identity(llm, info)


def test_context_attention_alpha_one_recomputes_the_kernel(llm, info):
    check_context_alpha_one_is_close(llm, info)


def test_prefix_cache_isolates_emphasis_spans(llm, info):
    check_prefix_cache_isolates_spans(llm, info)


def test_logprobs_match_hf_reference(llm, hf, info):
    check_reference_parity(llm, hf, info)


def test_prefix_cache_is_salted_by_plan(llm, info):
    check_prefix_cache_salted(llm, info)


def test_chunked_prefill_long_prompt_matches_reference(llm, hf, info):
    """A 150-token prompt is prefilled in 64-token chunks: every chunk is steered."""
    long_prompt = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))
    p = plans(info)
    ctx = with_spans(p["ctx_heads"], [(3, 20), (70, 100), (140, 150)])  # spans across chunk borders
    outs = run(llm, [(long_prompt, p["lift"]), (long_prompt, ctx), (PROMPTS[0], None)], max_tokens=8)
    for plan, (toks, lps, prompt_ids, _) in zip([p["lift"], ctx], outs):
        assert len(prompt_ids) > 64 * 2
        ref = token_logprobs(hf, prompt_ids, toks, plan)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def test_preempted_requests_stay_steered(llm, hf, info):
    """More concurrent work than KV blocks: vLLM preempts and recomputes; steering survives."""
    p = plans(info)
    # ~110-token prompts growing past one 128-token block while decoding
    steer = [None, p["scale"], None, with_spans(p["ctx_heads"], [(5, 40)])]
    items = [(" ".join([PROMPTS[i % len(PROMPTS)]] * 8), steer[i % 4]) for i in range(10)]
    before = _preemptions(llm)
    outs = run(llm, items, max_tokens=60)
    assert _preemptions(llm) > before, "the burst did not cause a preemption; shrink NUM_BLOCKS"
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        ref = token_logprobs(hf, prompt_ids, toks, plan)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
