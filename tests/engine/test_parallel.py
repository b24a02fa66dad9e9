"""Every steer on vLLM's own parallelism: tensor parallelism (TP=2) and pipeline parallelism (PP=2)
on the CPU build, two ranks pinned to halves of the cores (`VLLM_CPU_OMP_THREADS_BIND="0|1"` here), tiny random
Llama models (4 heads, 2 KV heads, FFN width 256: all divide by 2), float32, eager, chunked prefill
with a 64-token budget.

What is checked, in one mixed batch per engine:
- unsteered rows of a TP=2 engine are bit-identical to a stock vLLM TP=2 engine (no steerserve
  model) on the same batch;
- steered rows (InfoSteer scale/top-k/lift, whose top-k and lift gather whole FFN rows across ranks;
  context attention on global head sets mapped to each rank's local heads; TAIA mixing of a fully
  fine-tuned variant, sharded by vLLM's loaders) give the single-rank engine's greedy tokens, with
  logprobs within LOGPROB_TOL of it and of the pure-torch reference;
- steering vectors (the residual stream is whole on every TP rank; each PP stage adds its own
  layers' vectors);
- proxy tuning at TP=2 (expert and anti-expert sharded like the base) matches the three-model
  reference; plain rows are untouched;
- the same steers at PP=2.
Engines run one at a time (each busy-polls a core while alive); results of the single-rank and
stock engines are collected, then those engines are shut down.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from conftest import close_engine, make_engine, model_info
from engine_checks import (
    LOGPROB_TOL, PROMPTS, build_family, check_mixed_batch_bit_identical, check_mixing_parity,
    check_reference_parity, hf, mix, perturbed_copy, plans, run, variant_settings, with_spans,
)
from tiny_models import build_tiny

from steerserve.patches.plan import ProxyPlan, SteerPlan
from steerserve.patches.reference import token_logprobs
from steerserve.patches.steers.proxy.reference import proxy_token_logprobs
from steerserve.server.cli import cpu_thread_binding

pytestmark = pytest.mark.engine

ENGINE = dict(max_num_batched_tokens=64, max_model_len=256)
# one rank per allowed core (e.g. "0|1"), as `steerserve serve` splits them
TWO_RANKS = cpu_thread_binding(2, sorted(os.sched_getaffinity(0)))
if TWO_RANKS is None:
    pytest.skip("two ranks need at least two CPU cores", allow_module_level=True)
MIX_NAMES = {("tuned", "base"): "taia", ("tuned", "tuned"): "tuned", ("base", "tuned"): "ffn-only"}


@pytest.fixture(scope="module")
def family(tiny_llama, tmp_path_factory):
    return build_family(tiny_llama, tmp_path_factory.mktemp("tp-family"))


@pytest.fixture(scope="module")
def info(tiny_llama):
    return model_info(tiny_llama)


def batch(info) -> list[tuple[str, SteerPlan | None]]:
    """Plain, every InfoSteer mode, context attention on chosen global heads, TAIA / tuned /
    FFN-only mixing and steering-vector rows, interleaved."""
    p = plans(info)
    return [(PROMPTS[0], None), (PROMPTS[1], p["scale"]), (PROMPTS[2], p["topk"]), (PROMPTS[3], None),
            (PROMPTS[4], p["lift"]), (PROMPTS[5], p["ctx_heads"]), (PROMPTS[0], p["ctx_and_scale"]),
            (PROMPTS[1], mix("tuned", "base")), (PROMPTS[2], mix("tuned", "tuned")),
            (PROMPTS[3], mix("base", "tuned")), (PROMPTS[4], None), (PROMPTS[5], p["vec"]), (PROMPTS[0], p["vec_gen"])]


@contextlib.contextmanager
def engine(model, family=None, **kw):
    """An engine; with several ranks, rank r's threads pinned to core r (what `steerserve serve`
    sets on the CPU build), in the environment its workers inherit at start."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = TWO_RANKS
    try:
        llm = make_engine(model, **ENGINE, **(variant_settings(family) if family is not None else {}), **kw)
    finally:
        if old is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    try:
        yield llm
    finally:
        close_engine(llm)


@pytest.fixture(scope="module")
def single_rank(family, info):
    """The batch on a single-rank steerable engine (then shut down)."""
    with engine(family["base"], family) as llm:
        return run(llm, batch(info), max_tokens=10)


@pytest.fixture(scope="module")
def stock_tp2(family, info):
    """The batch's prompts, unsteered, on a stock vLLM TP=2 engine (vLLM's own Llama, no plugin model)."""
    with engine(family["base"], tensor_parallel_size=2, hf_overrides=None) as llm:
        return run(llm, [(text, None) for text, _ in batch(info)], max_tokens=10)


def check_against_single_rank_and_reference(outs, single, items, family) -> float:
    """Steered rows: the single-rank engine's greedy tokens, logprobs within LOGPROB_TOL of it and of
    the reference (InfoSteer / context attention: the HF hooks reference; mixing: a HF model of the
    exported checkpoint). Returns the worst difference to the reference."""
    models = {}
    worst = 0.0
    for (_, plan), (toks, lps, prompt_ids, _), (toks1, lps1, _, _) in zip(items, outs, single):
        if plan is None:
            continue
        what = plan.applied() if plan.mixing is None else MIX_NAMES[(plan.mixing.attention, plan.mixing.ffn)]
        assert toks == toks1, f"{what}: greedy tokens differ from the single-rank engine"
        assert max(abs(a - b) for a, b in zip(lps, lps1)) < LOGPROB_TOL, f"{what}: logprobs vs single rank"
        if plan.mixing is not None:
            models.setdefault(what, hf(family[what]))
            ref = token_logprobs(models[what], prompt_ids, toks, None)
        else:
            models.setdefault("base", hf(family["base"]))
            ref = token_logprobs(models["base"], prompt_ids, toks, plan)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"{what}: engine vs reference logprob diff {diff}"
    return worst


# --- tensor parallelism -----------------------------------------------------------------------


@pytest.fixture(scope="class")
def tp2(family, single_rank, stock_tp2):  # the reference engines first: one engine alive at a time
    with engine(family["base"], family, tensor_parallel_size=2) as llm:
        yield llm


class TestTensorParallel:
    def test_mixed_batch_plain_rows_equal_stock_tp2_and_steered_rows_the_single_rank(
            self, tp2, family, info, single_rank, stock_tp2):
        items = batch(info)
        outs = run(tp2, items, max_tokens=10)
        for (_, plan), got, stock in zip(items, outs, stock_tp2):
            if plan is None:
                assert got[:2] == stock[:2], "unsteered row differs from a stock TP=2 engine"
            else:
                assert got[1] != stock[1], f"{plan.applied() or plan.mixing}: row not steered"
        worst = check_against_single_rank_and_reference(outs, single_rank, items, family)
        print(f"TP=2: max |engine - reference| logprob difference {worst:.2e}")

    def test_every_steer_matches_the_reference(self, tp2, family, info):
        check_reference_parity(tp2, hf(family["base"]), info)
        check_mixing_parity(tp2, family)
        check_mixed_batch_bit_identical(tp2, info)

    def test_chunked_prefill_whole_row_statistics(self, tp2, family, info):
        """A 150-token prompt in 64-token chunks: top-k / lift on every chunk, context spans across
        chunk borders, on heads of both ranks."""
        long_prompt = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))
        p = plans(info)
        ctx = with_spans(p["ctx_heads"], [(3, 20), (70, 100), (140, 150)])
        items = [(long_prompt, p["topk"]), (long_prompt, p["lift"]), (long_prompt, ctx), (PROMPTS[0], None)]
        outs = run(tp2, items, max_tokens=6)
        base = hf(family["base"])
        for (_, plan), (toks, lps, prompt_ids, _) in zip(items[:3], outs):
            assert len(prompt_ids) > 128
            ref = token_logprobs(base, prompt_ids, toks, plan)
            assert max(abs(a - b) for a, b in zip(lps, ref)) < LOGPROB_TOL, plan.applied()


# --- proxy tuning under tensor parallelism ------------------------------------------------------


@pytest.fixture(scope="class")
def proxy_tp2(tiny_llama, tmp_path_factory):
    from steerserve.patches.steers.base import SETTINGS_KEY
    from steerserve.patches.steers.proxy import PAIRS_SETTING

    root = tmp_path_factory.mktemp("tp-proxy")
    anti = build_tiny("llama", root / "anti", seed=3, num_layers=2)
    expert = perturbed_copy(anti, root / "expert", seed=11, scale=0.3)
    pairs = [{"name": "task", "expert": str(expert), "anti_expert": str(anti)}]
    with engine(tiny_llama, tensor_parallel_size=2, additional_config={SETTINGS_KEY: {PAIRS_SETTING: pairs}}) as llm:
        yield llm, {"base": hf(tiny_llama), "expert": hf(expert), "anti": hf(anti)}


class TestProxyTensorParallel:
    def test_proxy_rows_match_reference_plain_rows_untouched(self, proxy_tp2):
        llm, models = proxy_tp2
        pl = [None, SteerPlan(proxy=ProxyPlan("task", 1.0)), None, SteerPlan(proxy=ProxyPlan("task", -0.5))]
        items = list(zip(PROMPTS, pl))
        outs = run(llm, items, max_tokens=10)
        plain = run(llm, [(t, None) for t, _ in items], max_tokens=10)
        worst = 0.0
        for plan, got, ref_plain in zip(pl, outs, plain):
            if plan is None:
                assert got[:2] == ref_plain[:2], "plain row changed by proxy neighbours"
                continue
            ref = proxy_token_logprobs(models["base"], models["expert"], models["anti"], got[2], got[0],
                                       plan.proxy.alpha)
            diff = max(abs(a - b) for a, b in zip(got[1], ref))
            worst = max(worst, diff)
            assert diff < LOGPROB_TOL and got[1] != ref_plain[1], f"alpha {plan.proxy.alpha}: diff {diff}"
        print(f"TP=2 proxy: max |engine - reference| logprob difference {worst:.2e}")


# --- pipeline parallelism -----------------------------------------------------------------------


@pytest.fixture(scope="class")
def pp2(family, single_rank):
    # eager PP on the CPU build needs steerserve's `install_cpu_pipeline_fix` (vLLM 0.32 skips the
    # warm-up that creates a later stage's activation buffer)
    with engine(family["base"], family, pipeline_parallel_size=2) as llm:
        yield llm


class TestPipelineParallel:
    def test_every_steer_at_pp2(self, pp2, family, info, single_rank):
        items = batch(info)
        outs = run(pp2, items, max_tokens=10)
        plain = run(pp2, [(t, None) for t, _ in items], max_tokens=10)
        for (_, plan), got, ref_plain in zip(items, outs, plain):
            if plan is None:
                assert got[:2] == ref_plain[:2], "unsteered row changed by steered neighbours"
        worst = check_against_single_rank_and_reference(outs, single_rank, items, family)
        print(f"PP=2: max |engine - reference| logprob difference {worst:.2e}")


# --- the server at TP=2 -------------------------------------------------------------------------

API_KEY = "tp-secret-4f1b9c"


@pytest.fixture(scope="class")
def tp2_server(tiny_llama, tmp_path_factory):
    """`steerserve serve -tp 2` with a LoRA variant (vLLM multi-LoRA, sharded) and an API key in
    the environment; the server pins the ranks to the cores itself."""
    from engine_checks import build_lora_family
    from server_proc import running_server

    root = tmp_path_factory.mktemp("tp-server")
    build_lora_family(tiny_llama, root)
    args = ["--model", str(tiny_llama), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len",
            "256", "--kv-cache-gb", "0.25", "--tensor-parallel-size", "2", "--variant", f"sft={root / 'adapter'}"]
    log = root / "server.log"
    saved = os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    try:
        # the server inherits this environment without a binding: it sets its own
        with running_server(args, log, env={"STEERSERVE_API_KEY": API_KEY,
                                            "STEERSERVE_HOME": str(root / "home")}) as base:
            yield base, log, root
    finally:
        if saved is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


class TestServeTensorParallel:
    def test_steering_and_lora_variant_over_http(self, tp2_server, tiny_llama):
        import openai

        base, log, root = tp2_server
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        def complete(model, steer=None):
            r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0.0, logprobs=0,
                                          extra_body={"return_token_ids": True, **({"steer": steer} if steer else {})})
            return r.choices[0].logprobs.token_logprobs, r

        plain, _ = complete("tiny")
        topk, r = complete("tiny", {"infosteer": {"mode": "topk", "k": 8, "alpha": 4.0, "layers": [0, 3]}})
        assert r.model_extra["steer"]["applied"][0]["mode"] == "topk" and topk != plain
        lift, _ = complete("tiny", {"infosteer": {"mode": "lift", "p": 0.1, "alpha": 3.0}})
        assert lift != plain

        def chat(steer=None):
            r = client.chat.completions.create(
                model="tiny", max_tokens=8, temperature=0.0, logprobs=True,
                messages=[{"role": "system", "content": "Answer from the context."},
                          {"role": "user", "content": "Context: the door is blue. What colour is the door?"}],
                extra_body={"steer": steer} if steer else None)
            return [t.logprob for t in r.choices[0].logprobs.content]

        # heads of both ranks (global heads 1 and 2 live on ranks 0 and 1)
        assert chat({"context_attention": {"alpha": 0.2, "heads": [[0, 1], [3, 2]]}}) != chat()
        taia, r_taia = complete("sft", {"mixing": "taia"})
        tuned, r_tuned = complete("sft")
        assert taia != plain and tuned != plain and taia != tuned
        # the sharded LoRA layers give the single-device Hugging Face model's greedy tokens
        from engine_checks import greedy_hf

        prompt_ids = list(r_taia.choices[0].prompt_token_ids)
        assert list(r_taia.choices[0].token_ids) == greedy_hf(tiny_llama, prompt_ids, adapter=root / "adapter-taia")
        assert list(r_tuned.choices[0].token_ids) == greedy_hf(tiny_llama, prompt_ids, adapter=root / "adapter")
        text = log.read_text()
        assert f"VLLM_CPU_OMP_THREADS_BIND={TWO_RANKS}" in text and "tensor_parallel_size=2" in text
        assert API_KEY not in text, "the API key was written to the server log"
